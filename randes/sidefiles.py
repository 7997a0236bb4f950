"""Which files of a model directory travel with its weights, and where the weights are.

A fine-tune is more than its tensors: its loader also reads config.json, the tokenizer,
``chat_template.jinja``, sentence-transformers' ``modules.json`` with ``1_Pooling/`` and
``2_Normalize/``... A materialized task must carry all of them, or it loads as
something else (``apply_chat_template`` fails; ``SentenceTransformer(dir)`` silently
falls back to mean pooling without normalization). So every small non-weight file of
the source directory is kept, subfolders included, by its relative path, except what
must not or need not travel:

- weights, read separately (``*.safetensors`` and their index) or in another format
  (ONNX, GGUF, TF, Flax...), and pickles (``training_args.bin``, optimizer states):
  never copied, since they can run code or describe other weights;
- hidden files and folders (``.git``, ``.cache``), Trainer's intermediate
  ``checkpoint-*`` folders and TensorBoard ``runs``;
- names that could not be written back safely (not plain '/'-separated names);
- files over `MAX_SIDE_FILE_BYTES`, beyond `MAX_SIDE_FILES` files or `MAX_DEPTH` levels.

sentence-transformers' legacy layout keeps the transformer's weights in a subfolder
(``0_Transformer/``) named by ``modules.json``: `st_weights_dir` finds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024
MAX_SIDE_FILES = 512
MAX_DEPTH = 4
MODULES_JSON = "modules.json"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_WEIGHT_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".pkl",
        ".pickle",
        ".onnx",
        ".onnx_data",
        ".gguf",
        ".h5",
        ".msgpack",
        ".ot",
        ".tflite",
        ".pb",
        ".npz",
        ".npy",
    }
)
_SKIP_DIRS = re.compile(r"^(checkpoint-\d+|runs|__pycache__)$")


def _skipped(name: str) -> bool:
    return (
        name.startswith(".")
        or not _NAME.fullmatch(name)
        or Path(name).suffix.lower() in _WEIGHT_SUFFIXES
        or name.endswith(".safetensors.index.json")
    )


def collect_side_files(root: Path) -> dict[str, Path]:
    """{relative path: file} of the files that travel with the weights under ``root``."""
    out: dict[str, Path] = {}
    root = Path(root)

    def walk(folder: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.debug("cannot list %s: %s", folder, exc)
            return
        for entry in entries:
            if _skipped(entry.name):
                continue
            rel = f"{prefix}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH and not _SKIP_DIRS.match(entry.name):
                        walk(Path(entry.path), f"{rel}/", depth + 1)
                    continue
                if not entry.is_file():  # follows file links: the Hub cache is made of them
                    continue
                if entry.stat().st_size > MAX_SIDE_FILE_BYTES:
                    log.warning("not keeping %s: over %d bytes", rel, MAX_SIDE_FILE_BYTES)
                    continue
            except OSError:
                continue
            if len(out) >= MAX_SIDE_FILES:
                log.warning("keeping the first %d side files of %s only", MAX_SIDE_FILES, root)
                return
            out[rel] = Path(entry.path)

    walk(root, "", 1)
    return out


def st_weights_dir(root: Path) -> str | None:
    """The subfolder sentence-transformers' ``modules.json`` puts the transformer in,
    when it holds safetensors weights (legacy ``0_Transformer/`` layout); else None."""
    path = Path(root) / MODULES_JSON
    try:
        if not path.is_file() or path.stat().st_size > 1024 * 1024:
            return None
        modules = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(modules, list):
        return None
    for module in modules:
        if not isinstance(module, dict):
            continue
        sub, kind = module.get("path"), str(module.get("type", ""))
        if not isinstance(sub, str) or not sub or not kind.endswith("Transformer"):
            continue
        parts = sub.split("/")
        if not all(_NAME.fullmatch(p) for p in parts):
            return None
        folder = Path(root).joinpath(*parts)
        if folder.is_dir() and any(p.suffix == ".safetensors" for p in folder.iterdir()):
            return sub
    return None
