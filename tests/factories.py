"""Small GPT-2-shaped checkpoints written as Hugging Face style directories.

Real fine-tunes differ from their base by small deltas and carry a task head the base
lacks; these factories reproduce exactly that shape at a size tests can afford.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

N_LAYER = 3
D_MODEL = 32
VOCAB = 50


def gpt2_state(seed: int, *, n_layer: int = N_LAYER, d: int = D_MODEL) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    state: dict[str, torch.Tensor] = {
        "wte.weight": rnd(VOCAB, d),
        "wpe.weight": rnd(16, d),
        "ln_f.weight": torch.ones(d) + rnd(d),
        "ln_f.bias": rnd(d),
        "position_ids": torch.arange(16, dtype=torch.int64),
    }
    for i in range(n_layer):
        state |= {
            f"h.{i}.ln_1.weight": torch.ones(d) + rnd(d),
            f"h.{i}.ln_1.bias": rnd(d),
            f"h.{i}.attn.c_attn.weight": rnd(d, 3 * d),
            f"h.{i}.attn.c_attn.bias": rnd(3 * d),
            f"h.{i}.attn.c_proj.weight": rnd(d, d),
            f"h.{i}.mlp.c_fc.weight": rnd(d, 4 * d),
            f"h.{i}.mlp.c_proj.weight": rnd(4 * d, d),
        }
    return state


def write_model(
    directory: Path, state: dict[str, torch.Tensor], config: dict | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def make_base(directory: Path, seed: int = 0) -> Path:
    return write_model(directory, gpt2_state(seed), {"model_type": "gpt2", "n_layer": N_LAYER})


def make_finetune(
    base_dir: Path,
    directory: Path,
    seed: int,
    *,
    rel_delta: float = 0.02,
    prefix: str = "",
    n_classes: int = 3,
) -> Path:
    """A fine-tune of ``base_dir``: small deltas on every float tensor plus its own head."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(10_000 + seed)
    tuned: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=gen)
            tensor = tensor + rel_delta * tensor.abs().mean() * noise
        tuned[prefix + name] = tensor
    tuned["score.weight"] = torch.randn(n_classes, D_MODEL, generator=gen)
    tuned["score.bias"] = torch.randn(n_classes, generator=gen)
    return write_model(directory, tuned, {"model_type": "gpt2", "task_seed": seed})
