"""Reconciling a fine-tune's tensors with its base's: one decision table.

Real checkpoints rarely match their base key for key. transformers saves a task model
(``BertForSequenceClassification``) with the encoder under ``bert.`` while the published
base names it bare; DDP and accelerate wrap names in ``module.``, ``torch.compile`` in
``_orig_mod.``; a fine-tune lacks what its head does not use (a pooler, the base's own
pretraining head), buffers transformers no longer saves (``position_ids``) and weights
its loader ties (``lm_head.weight``); LLM fine-tunes come in bf16 over an fp32 base.
`reconcile` decides, once per task, what happens to every tensor:

1. training wrappers are stripped from the checkpoint's names: ``_orig_mod``,
   ``_fsdp_wrapped_module`` and ``_checkpoint_wrapped_module`` components anywhere,
   then ``module.`` while every name starts with it;
2. the model prefix is mapped: of the candidate rewrites ``base_prefix -> checkpoint_
   prefix`` (up to two dotted components on either side: ``bert.``, ``model.``,
   ``model.decoder.``), the one that matches the most base parameters wins, the
   identity on ties;
3. every tensor then falls in one row:

   ============================================  =========================================
   base tensor ... / checkpoint tensor ...        decision
   ============================================  =========================================
   float, same shape / float (any float dtype)    delta, computed in float32; the task's
                                                  dtype recorded (``dtypes``) and restored
   non-float, same shape and dtype                compared by fold: equal -> the base's,
                                                  different -> private
   present / missing                              ``absent``: no delta, not materialized
                                                  (its loader re-creates or re-ties it;
                                                  ties per config.json in ``tied``)
   present / other shape, float-ness or dtype     ``absent`` + the checkpoint's private
   missing / present                              private (stored verbatim for the task)
   any / named by the source as private           ``absent`` + private (PEFT
                                                  ``modules_to_save``)
   ============================================  =========================================

4. refused when the matches cover less than `MIN_MATCHED_FRACTION` of the base's
   parameters (what a wrong base looks like), naming unmatched tensors on both sides.

The outcome is a `KeyMap` (recorded in the task's manifest entry; materialize undoes it)
and `Reconciled.source`, the checkpoint under its unwrapped names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from randes.errors import IncompatibleCheckpointError
from randes.header import DTYPE_NAMES
from randes.manifest import KeyMap
from randes.source import NamedView, TensorMeta, TensorSource

MIN_MATCHED_FRACTION = 0.5
"""Share of the base's parameters a fine-tune must match for the base to be its base."""

ANYWHERE_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name components training wrappers insert at any depth (torch.compile, FSDP,
activation checkpointing); no model names a module like this."""
LEADING_WRAPPERS = ("module",)
"""Leading components of whole-model wrappers (DDP, DataParallel, accelerate)."""

_MAX_CANDIDATES = 16
_MAX_PREFIX_DEPTH = 2
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "decoder.weight", "embed_tokens.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "shared.weight", "wte.weight", "word_embeddings.weight")


class Renamed(NamedView):
    """A tensor source under other names (``names`` maps new -> inner name)."""

    def __init__(self, inner: TensorSource, names: Mapping[str, str]) -> None:
        self.inner = inner
        self.names: dict[str, str] = dict(names)
        self.forced_private: frozenset[str] = frozenset(
            new for new, old in self.names.items() if old in _forced(inner)
        )

    def meta(self, name: str) -> TensorMeta:
        return self.inner.meta(self.names[name])

    def metas(self) -> dict[str, TensorMeta]:
        return {n: self.meta(n) for n in self.keys()}

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.names[name])


def _forced(source: object) -> frozenset[str]:
    forced: object = getattr(source, "forced_private", frozenset())
    if isinstance(forced, frozenset):
        return forced
    return frozenset(forced) if isinstance(forced, set | list | tuple) else frozenset()


@dataclass(frozen=True)
class Reconciled:
    """One task's decisions: the record for the manifest and what fold acts on."""

    key_map: KeyMap
    source: Renamed
    """The checkpoint under unwrapped names (the names ``key_map`` speaks of)."""
    deltas: tuple[str, ...]
    """Base names whose fine-tuned tensor is folded as a delta (float, same shape)."""
    buffers: tuple[str, ...]
    """Non-float base names present in the checkpoint: equal -> base, else private."""
    extras: tuple[str, ...]
    """Checkpoint names stored privately whatever their value (the base lacks them,
    their shape or kind differs, or the source names them private)."""

    @property
    def absent(self) -> frozenset[str]:
        return frozenset(self.key_map.absent)


def unwrap(names: Collection[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Strip training wrappers: {clean name: original name}, and the wrappers found."""
    found: list[str] = []
    clean: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for part in parts:
            if part in ANYWHERE_WRAPPERS and f"{part}." not in found:
                found.append(f"{part}.")
        key = ".".join(p for p in parts if p not in ANYWHERE_WRAPPERS)
        if key in clean:
            raise IncompatibleCheckpointError(
                f"checkpoint names {clean[key]!r} and {name!r} collide once training "
                "wrappers are stripped"
            )
        clean[key] = name
    while clean and all("." in k for k in clean):
        heads = {k.split(".", 1)[0] for k in clean}
        head = heads.pop()
        if heads or head not in LEADING_WRAPPERS:
            break
        found.insert(0, f"{head}.")
        clean = {k.split(".", 1)[1]: v for k, v in clean.items()}
    return clean, tuple(found)


def _prefixes(keys: Collection[str]) -> list[str]:
    """Leading dotted prefixes up to _MAX_PREFIX_DEPTH components, most frequent first."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for depth in range(1, min(_MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    return [p for p, _ in counts.most_common(_MAX_CANDIDATES)]


def _candidates(base_keys: Collection[str], checkpoint_keys: Collection[str]) -> list[KeyMap]:
    base_first, ckpt_first = _prefixes(base_keys), _prefixes(checkpoint_keys)
    out = [KeyMap()]
    out += [KeyMap(checkpoint_prefix=p) for p in ckpt_first]  # checkpoint adds a prefix
    out += [KeyMap(base_prefix=p) for p in base_first]  # checkpoint strips one
    out += [
        KeyMap(base_prefix=b, checkpoint_prefix=c) for b in base_first for c in ckpt_first if b != c
    ]
    return out


def _matches(base: TensorMeta, tuned: TensorMeta) -> bool:
    """Whether a checkpoint tensor can be folded as a delta of (or equal to) the base's."""
    if base.shape != tuned.shape or base.is_float != tuned.is_float:
        return False
    return base.is_float or base.dtype == tuned.dtype


def _score(
    key_map: KeyMap, base: Mapping[str, TensorMeta], checkpoint: Mapping[str, TensorMeta]
) -> int:
    """Base parameters (elements) the mapping finds in the checkpoint, matching."""
    total = 0
    for name, meta in base.items():
        if not name.startswith(key_map.base_prefix):
            continue
        tuned = checkpoint.get(key_map.to_checkpoint(name))
        if tuned is not None and _matches(meta, tuned):
            total += max(meta.numel, 1)
    return total


def detect_key_map(
    base: Mapping[str, TensorMeta], checkpoint: Mapping[str, TensorMeta]
) -> tuple[KeyMap, int]:
    """The prefix rewrite matching the most base parameters, and how many it matches."""
    best, best_score = KeyMap(), -1
    total = sum(max(m.numel, 1) for m in base.values())
    for candidate in _candidates(list(base), list(checkpoint)):
        score = _score(candidate, base, checkpoint)
        if score > best_score:
            best, best_score = candidate, score
            if score == total:  # nothing can do better; earlier candidates are simpler
                break
    return best, best_score


def reconcile(
    base: Mapping[str, TensorMeta],
    checkpoint: TensorSource,
    *,
    config: Mapping[str, Any] | None = None,
) -> Reconciled:
    """Apply the decision table (module docstring) to one fine-tune over one base.

    ``config`` is the fine-tune's config.json, which says which omitted tensors its
    loader ties. Raises IncompatibleCheckpointError (one line) for a wrong base.
    """
    names, wrappers = unwrap(checkpoint.keys())
    source = Renamed(checkpoint, names)
    metas = source.metas()
    key_map, matched = detect_key_map(base, metas)
    total = sum(max(m.numel, 1) for m in base.values())
    if total and matched < MIN_MATCHED_FRACTION * total:
        raise IncompatibleCheckpointError(_mismatch(key_map, matched, total, base, metas))

    deltas: list[str] = []
    buffers: list[str] = []
    absent: list[str] = []
    extras: list[str] = []
    dtypes: dict[str, str] = {}
    covered: set[str] = set()
    for name in sorted(base):
        meta = base[name]
        ck = key_map.to_checkpoint(name) if name.startswith(key_map.base_prefix) else None
        tuned = metas.get(ck) if ck is not None else None
        if ck is None or tuned is None or ck in source.forced_private:
            absent.append(name)
            continue
        covered.add(ck)
        if not _matches(meta, tuned):
            absent.append(name)
            extras.append(ck)
        elif meta.is_float:
            deltas.append(name)
            if tuned.dtype != meta.dtype:
                dtypes[name] = DTYPE_NAMES[tuned.dtype]
        else:
            buffers.append(name)
    extras += [n for n in metas if n not in covered]
    record = KeyMap(
        base_prefix=key_map.base_prefix,
        checkpoint_prefix=key_map.checkpoint_prefix,
        wrappers=wrappers,
        absent=tuple(absent),
        tied=_tied(absent, key_map, metas, config),
        dtypes=_compact(dtypes, deltas),
    )
    return Reconciled(record, source, tuple(deltas), tuple(buffers), tuple(sorted(set(extras))))


def _compact(dtypes: dict[str, str], deltas: list[str]) -> dict[str, str]:
    """``{'*': dtype}`` when every delta tensor has the same other dtype."""
    values = set(dtypes.values())
    if len(values) == 1 and len(dtypes) == len(deltas):
        return {"*": values.pop()}
    return dtypes


def _tied(
    absent: list[str],
    key_map: KeyMap,
    metas: Mapping[str, TensorMeta],
    config: Mapping[str, Any] | None,
) -> dict[str, str]:
    """Absent output embeddings that the fine-tune's config says its loader ties."""
    if not config or not config.get("tie_word_embeddings", config.get("tie_encoder_decoder")):
        return {}
    inputs = [n for n in metas if n.endswith(_INPUT_EMBEDDINGS)]
    out: dict[str, str] = {}
    for name in absent:
        ck = key_map.to_checkpoint(name) if name.startswith(key_map.base_prefix) else name
        if not ck.endswith(_OUTPUT_EMBEDDINGS) or ck in metas:
            continue
        same = [n for n in inputs if n != ck]
        if same:
            out[ck] = min(same, key=len)
    return out


def _mismatch(
    key_map: KeyMap,
    matched: int,
    total: int,
    base: Mapping[str, TensorMeta],
    metas: Mapping[str, TensorMeta],
) -> str:
    mapped = {key_map.to_checkpoint(n) for n in base if n.startswith(key_map.base_prefix)} & set(
        metas
    )
    base_only = sorted(
        n
        for n in base
        if not n.startswith(key_map.base_prefix) or key_map.to_checkpoint(n) not in metas
    )
    ck_only = sorted(n for n in metas if n not in mapped)
    rewrite = (
        f"best name mapping {key_map.base_prefix!r} -> {key_map.checkpoint_prefix!r}"
        if key_map != KeyMap()
        else "names compared as they are"
    )
    return (
        f"checkpoint matches only {100 * matched / total:.0f}% of the base's parameters "
        f"({rewrite}); is this the right base? unmatched: base {_few(base_only)}; "
        f"checkpoint {_few(ck_only)}"
    )


def _few(names: list[str], n: int = 1) -> str:
    """An example, cut to its last 40 characters (the layer and weight
    names that tell tensors apart), so the error stays one readable line for the real
    names of a transformers model (``transformer.h.0.attn.c_attn.weight``)."""
    if not names:
        return "none (shapes differ)"
    shown = ", ".join(repr(x if len(x) <= 40 else "..." + x[-37:]) for x in names[:n])
    return f"{shown}{f' and {len(names) - n} more' if len(names) > n else ''}"


def read_config(path: Path | None) -> dict[str, Any] | None:
    """A fine-tune's config.json (bounded read), or None when absent or unreadable."""
    if path is None:
        return None
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
