"""GPT-2-shaped fp32 models written tensor by tensor: the cost and runtime benchmarks' inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    d: int
    vocab: int
    ctx: int
    labels: int = 2

    def base_tensors(self) -> dict[str, tuple[int, ...]]:
        """GPT-2 names and shapes (Conv1D weights are (in, out), as in transformers)."""
        d = self.d
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab, d),
            "wpe.weight": (self.ctx, d),
            "ln_f.weight": (d,),
            "ln_f.bias": (d,),
        }
        for i in range(self.layers):
            p = f"h.{i}."
            shapes |= {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        return shapes

    def params(self) -> int:
        return sum(_numel(s) for s in self.base_tensors().values())

    def largest_bytes(self) -> int:
        return 4 * max(_numel(s) for s in self.base_tensors().values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


FULL = (
    ModelSpec("small", layers=6, d=768, vocab=8192, ctx=1024),
    ModelSpec("large", layers=12, d=768, vocab=8192, ctx=1024),
)
GPT2_SMALL = ModelSpec("gpt2-small", layers=12, d=768, vocab=50257, ctx=1024)
"""The real GPT-2 small shapes (124M parameters, wte 154 MB): ``--gpt2-small``."""
QUICK = (
    ModelSpec("small", layers=4, d=384, vocab=4096, ctx=512),
    ModelSpec("large", layers=8, d=384, vocab=4096, ctx=512),
)


def write_streaming(path: Path, shapes: dict[str, tuple[int, ...]], make: Any) -> int:
    """A standard fp32 safetensors file written one tensor at a time; returns its size.

    ``make(name)`` returns the tensor; the header is computed from ``shapes`` first.
    """
    import torch

    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        nbytes = 4 * _numel(shapes[n])
        header[n] = {
            "dtype": "F32",
            "shape": list(shapes[n]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for n in names:
            t = make(n)
            assert t.dtype == torch.float32 and tuple(t.shape) == shapes[n], n
            fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return path.stat().st_size


def generate(spec: ModelSpec, root: Path, tasks: int) -> tuple[Path, list[Path]]:
    """base.safetensors and task{k}/model.safetensors (fine-tunes) under ``root``."""
    import torch
    from safetensors import safe_open

    shapes = spec.base_tensors()
    base_path = root / "base" / "model.safetensors"

    def base_tensor(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash_name(name))
        if len(shapes[name]) == 1:
            return (
                torch.ones(shapes[name]) if name.endswith("weight") else torch.zeros(shapes[name])
            )
        return torch.randn(shapes[name], generator=g).mul_(0.02)

    write_streaming(base_path, shapes, base_tensor)
    task_paths = []
    prefix = "transformer."
    with safe_open(str(base_path), framework="pt") as base:
        for k in range(1, tasks + 1):
            tuned_shapes = {prefix + n: s for n, s in shapes.items()}
            tuned_shapes["score.weight"] = (spec.labels, spec.d)
            g = torch.Generator().manual_seed(1000 + k)

            def tuned(name: str, g: torch.Generator = g) -> torch.Tensor:
                if name == "score.weight":
                    return torch.randn((spec.labels, spec.d), generator=g).mul_(0.02)
                t = base.get_tensor(name[len(prefix) :]).clone()
                return t.add_(torch.randn(t.shape, generator=g), alpha=1e-3)

            path = root / f"task{k}" / "model.safetensors"
            write_streaming(path, tuned_shapes, tuned)
            task_paths.append(path.parent)
    return base_path, task_paths


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")
