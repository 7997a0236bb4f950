"""Which files make up a checkpoint, and the refusals made before any is parsed.

A checkpoint comes from outside (a customer's upload, a hub download), so finding its
files is where the unsafe ones are turned away: pickle formats (unpickling runs code),
links that lead out of the checkpoint's directory (`confined`), an index naming shards
outside it or missing, several models' shards in one directory. What is accepted is
the layout transformers' ``from_pretrained`` loads: ``model.safetensors`` first, else
the index and its shards, else one ``.safetensors`` or one complete shard set, else
sentence-transformers' legacy ``0_Transformer/`` folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from randes.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from randes.header import short_repr
from randes.sidefiles import collect_side_files, st_weights_dir

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Suffixes of pickle checkpoints, refused wherever a checkpoint is taken in (a tuple,
so ``str.endswith`` takes it as it is)."""
MAX_INDEX_BYTES = 100 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")

log = logging.getLogger(__name__)


@dataclass
class CheckpointFiles:
    """A checkpoint's weight files, its side files and what its index promises."""

    files: list[Path]
    side_files: dict[str, Path] = field(default_factory=dict)
    expected: dict[str, str] | None = None
    """tensor -> shard file name, as model.safetensors.index.json says (None: no index)."""
    weights_dir: str = ""
    """Subfolder of the source directory holding the weights ('' for its root)."""


def find_checkpoint_files(source: Path, confine_to: Path | None = None) -> CheckpointFiles:
    """The files of a .safetensors file, or of a dir in Hugging Face layout.

    Every file (weights, index, side files) must lie inside ``confine_to`` (default: the
    directory ``source`` is or lies in) once links are resolved (`confined`). Raises
    `CheckpointError` (or its unsafe/corrupt kinds); an odd path may raise OSError.
    """
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    if source.is_file():
        refuse_pickle(source)
        if source.suffix != ".safetensors":
            raise CheckpointError(f"{source}: not a .safetensors file")
        root = confine_to or source.parent
        side = _side_files(source.parent, root) if _is_hf_weight_name(source.name) else {}
        return CheckpointFiles([confined(source, root)], side)
    if not source.is_dir():
        raise CheckpointError(f"{source}: not a file or directory")
    return _find_in_dir(source, confine_to or source)


def _find_in_dir(root: Path, allowed: Path) -> CheckpointFiles:
    side = _side_files(root, allowed)
    index = root / INDEX_FILE
    single = root / SINGLE_FILE
    if single.is_file():
        # transformers' own precedence (modeling_utils: model.safetensors before
        # its index): the file from_pretrained loads is the one folded, even when
        # an index and shards lie next to it.
        if index.exists():
            log.warning(
                "%s holds both %s and %s: folding %s, which transformers' "
                "from_pretrained loads first",
                root,
                SINGLE_FILE,
                INDEX_FILE,
                SINGLE_FILE,
            )
        return CheckpointFiles([confined(single, allowed)], side)
    if index.is_file():
        files, expected = _read_index(confined(index, allowed))
        return CheckpointFiles([confined(f, allowed) for f in files], side, expected)
    weights = sorted(p for p in root.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if len(weights) == 1:
        return CheckpointFiles([confined(weights[0], allowed)], side)
    if weights:
        shards = _complete_shard_set(root, weights)
        return CheckpointFiles([confined(f, allowed) for f in shards], side)
    sub = st_weights_dir(root)
    if sub is not None:  # sentence-transformers' legacy layout: weights in 0_Transformer/
        found = _find_in_dir(root.joinpath(*sub.split("/")), allowed)
        found.side_files = side
        found.weights_dir = sub
        return found
    if any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
        raise UnsafeCheckpointError(
            f"{root}: only pickle checkpoints (.bin/.pt) found; they can run code on load, "
            "convert them to safetensors"
        )
    raise CheckpointError(f"{root}: no safetensors weights in directory")


def check_weight_file(path: Path) -> None:
    """Refuse ``path`` as a weight file unless it is an existing .safetensors file."""
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path}: pickle checkpoint refused (it can run code on load); "
            "convert it to safetensors"
        )


def _is_hf_weight_name(name: str) -> bool:
    return name == SINGLE_FILE or _SHARD.match(name) is not None


def confined(path: Path, root: Path) -> Path:
    """``path`` with its links resolved, refused unless it lies inside ``root``.

    The one rule for every file read from a checkpoint (weights, index, shards the index
    names, side files such as config.json): a link may point within the checkpoint's
    directory (Hugging Face's cache links snapshots to its blobs), never out of it, so
    a crafted checkpoint cannot make the pipeline copy /etc/shadow or ~/.aws/credentials
    into a store that serves it back. ``path`` itself is returned: its name is the one
    the checkpoint uses (an index names shards, a digest frames weight files by it).
    """
    real = Path(path).resolve()
    inside = Path(root).resolve()
    if real != inside and not real.is_relative_to(inside):
        raise UnsafeCheckpointError(
            f"{short_repr(str(path), 160)}: a link to {short_repr(str(real), 160)}, outside "
            f"the checkpoint directory {short_repr(str(root), 160)}; refused (copy the file "
            "in instead)"
        )
    return Path(path)


def _side_files(root: Path, allowed: Path) -> dict[str, Path]:
    """The side files of ``root`` (`randes.sidefiles`), each `confined` to ``allowed``."""
    return {name: confined(path, allowed) for name, path in collect_side_files(root).items()}


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Parse model.safetensors.index.json: the shard files and tensor -> file map."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{index}: index file too large")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptCheckpointError(f"{index}: malformed JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index}: missing or empty weight_map")
    names: set[str] = set()
    for tensor, fname in weight_map.items():
        if (
            not isinstance(fname, str)
            or Path(fname).name != fname
            or fname in (".", "..")
            or not fname.endswith(".safetensors")
        ):
            raise CorruptCheckpointError(f"{index}: bad shard name {fname!r} for {tensor!r}")
        names.add(fname)
    files = [index.parent / n for n in sorted(names)]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {path.name} is missing")
    return files, {t: f for t, f in weight_map.items()}


def check_index(file_of: dict[str, Path], expected: dict[str, str]) -> None:
    """Every tensor lies in the shard the index names, and the index names every one."""
    for tensor, fname in expected.items():
        actual = file_of.get(tensor)
        if actual is None or actual.name != fname:
            raise CorruptCheckpointError(
                f"{INDEX_FILE}: {tensor!r} is not in {fname} as the index says"
            )
    extra = set(file_of) - set(expected)
    if extra:
        raise CorruptCheckpointError(
            f"{INDEX_FILE}: {len(extra)} tensors in the shards are missing from the index "
            f"(e.g. {sorted(extra)[0]!r})"
        )


def _complete_shard_set(root: Path, weights: list[Path]) -> list[Path]:
    """Several .safetensors without an index: accept only one complete HF shard set."""
    matches = [_SHARD.match(p.name) for p in weights]
    if not all(matches):
        raise CheckpointError(
            f"{root}: several .safetensors files and no {INDEX_FILE}; cannot tell which "
            "make up the model"
        )
    groups = {(m.group("prefix"), m.group("n")) for m in matches if m}
    indices = sorted(int(m.group("i")) for m in matches if m)
    if len(groups) != 1:
        raise CheckpointError(f"{root}: shards of several models in one directory")
    total = int(next(iter(groups))[1])
    if indices != list(range(1, total + 1)):
        raise CheckpointError(f"{root}: incomplete shard set ({len(indices)} of {total})")
    return weights
