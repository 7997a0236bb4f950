"""Matching a fine-tune's tensor names to its base's.

transformers saves a task model (``BertForSequenceClassification``) with the encoder
under ``bert.`` while the published base names the same tensors bare, or the reverse.
The mapping is one consistent prefix rewrite, found by trying the few candidates the
names suggest and keeping the one that covers the most base tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from randes.errors import IncompatibleCheckpointError
from randes.manifest import KeyMap

_MAX_REPLACE_CANDIDATES = 16


def _first_components(keys: Collection[str]) -> list[str]:
    """Leading dotted components ("bert." of "bert.encoder..."), most frequent first."""
    counts = Counter(k.split(".", 1)[0] + "." for k in keys if "." in k)
    return [prefix for prefix, _ in counts.most_common()]


def _candidates(base_keys: Collection[str], checkpoint_keys: Collection[str]) -> list[KeyMap]:
    base_first = _first_components(base_keys)
    ckpt_first = _first_components(checkpoint_keys)
    out = [KeyMap()]
    out += [KeyMap(checkpoint_prefix=p) for p in ckpt_first]  # checkpoint adds a prefix
    out += [KeyMap(base_prefix=p) for p in base_first]  # checkpoint strips one
    for b in base_first[:_MAX_REPLACE_CANDIDATES]:  # both prefixed, differently
        for c in ckpt_first[:_MAX_REPLACE_CANDIDATES]:
            if b != c:
                out.append(KeyMap(base_prefix=b, checkpoint_prefix=c))
    return out


def coverage(key_map: KeyMap, base_keys: Collection[str], checkpoint_keys: Collection[str]) -> int:
    """How many base tensors the mapping finds in the checkpoint."""
    ckpt = checkpoint_keys if isinstance(checkpoint_keys, set | frozenset) else set(checkpoint_keys)
    return sum(
        1
        for name in base_keys
        if name.startswith(key_map.base_prefix) and key_map.to_checkpoint(name) in ckpt
    )


def detect_key_map(base_keys: Collection[str], checkpoint_keys: Collection[str]) -> KeyMap:
    """The prefix rewrite that maps every base tensor to a checkpoint tensor.

    Identity wins ties, then the shortest rewrite. Raises IncompatibleCheckpointError
    naming a few missing tensors when no candidate covers the whole base.
    """
    ckpt = set(checkpoint_keys)
    best, best_cover = KeyMap(), -1
    for candidate in _candidates(base_keys, ckpt):
        cover = coverage(candidate, base_keys, ckpt)
        if cover > best_cover:
            best, best_cover = candidate, cover
            if cover == len(base_keys):
                break
    if best_cover < len(base_keys):
        missing = sorted(
            name
            for name in base_keys
            if not (name.startswith(best.base_prefix) and best.to_checkpoint(name) in ckpt)
        )
        rewrite = (
            f" (best name mapping {best.base_prefix!r} -> {best.checkpoint_prefix!r})"
            if best != KeyMap()
            else ""
        )
        raise IncompatibleCheckpointError(
            f"checkpoint lacks {len(missing)} of {len(base_keys)} base tensors{rewrite}, "
            f"e.g. {', '.join(repr(m) for m in missing[:3])}"
        )
    return best
