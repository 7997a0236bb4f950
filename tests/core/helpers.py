"""Small GPT-2-shaped models for the core tests (test data may use torch's RNG)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from randes.checkpoint import CheckpointReader


def gpt2_like(
    *, n_layer: int = 3, d: int = 8, vocab: int = 32, n_pos: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Base model tensors with GPT-2 names: wte, wpe, h.{i}.*, ln_f, an int64 buffer."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t: dict[str, torch.Tensor] = {
        "wte.weight": rnd(vocab, d),
        "wpe.weight": rnd(n_pos, d),
        "ln_f.weight": 1 + 0.1 * rnd(d),
        "ln_f.bias": 0.1 * rnd(d),
        "position_ids": torch.arange(n_pos, dtype=torch.int64).unsqueeze(0),
    }
    for i in range(n_layer):
        p = f"h.{i}."
        t[p + "ln_1.weight"] = 1 + 0.1 * rnd(d)
        t[p + "ln_1.bias"] = 0.1 * rnd(d)
        t[p + "attn.c_attn.weight"] = rnd(d, 3 * d)
        t[p + "attn.c_attn.bias"] = 0.1 * rnd(3 * d)
        t[p + "attn.c_proj.weight"] = rnd(d, d)
        t[p + "attn.c_proj.bias"] = 0.1 * rnd(d)
        t[p + "ln_2.weight"] = 1 + 0.1 * rnd(d)
        t[p + "ln_2.bias"] = 0.1 * rnd(d)
        t[p + "mlp.c_fc.weight"] = rnd(d, 4 * d)
        t[p + "mlp.c_fc.bias"] = 0.1 * rnd(4 * d)
        t[p + "mlp.c_proj.weight"] = rnd(4 * d, d)
        t[p + "mlp.c_proj.bias"] = 0.1 * rnd(d)
    return t


def finetune(
    base: dict[str, torch.Tensor],
    *,
    seed: int,
    prefix: str = "",
    head: bool = True,
    step: float = 0.05,
    classes: int = 3,
) -> dict[str, torch.Tensor]:
    """base + a random delta on every float tensor, names prefixed, plus a task head."""
    g = torch.Generator().manual_seed(1000 + seed)
    out: dict[str, torch.Tensor] = {}
    for name, value in base.items():
        if value.dtype.is_floating_point:
            noise = step * torch.randn(value.shape, generator=g)
            value = (value.float() + noise).to(value.dtype)
        out[prefix + name] = value.clone()
    if head:
        d = base["wte.weight"].shape[1]
        out["score.weight"] = torch.randn(classes, d, generator=g)
        out["score.bias"] = torch.randn(classes, generator=g)
    return out


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def open_dict(path: Path, tensors: dict[str, torch.Tensor]) -> CheckpointReader:
    return CheckpointReader.open(save(path, tensors))


def load_all(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    return {name: reader.get(name) for name in reader}
