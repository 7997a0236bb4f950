"""A tiny pre-LN vision transformer whose parameter names follow GPT-2.

The names matter more than the architecture: RanDeS' layer shuffling permutes tensors
that differ only by their layer index (`h.{i}.mlp.c_fc.weight` for every i), and the
pipeline recognises that pattern in GPT-2 style checkpoints. Using the same names here
means the benchmark exercises exactly the code path real checkpoints take.

Layout (all float32; Linear weights are (out, in)):

    wte.weight                       patch embedding (patch*patch x d_model): like GPT-2's
                                     token table, row j is the embedding of pixel j of a patch
    wpe.weight                       position embedding (n_tokens x d_model)
    h.{i}.ln_1.weight/bias
    h.{i}.attn.c_attn.weight/bias    fused q,k,v (3*d_model x d_model)
    h.{i}.attn.c_proj.weight/bias
    h.{i}.ln_2.weight/bias
    h.{i}.mlp.c_fc.weight/bias       (4*d_model x d_model)
    h.{i}.mlp.c_proj.weight/bias
    ln_f.weight/bias
    head.weight/bias                 task head: only fine-tuned checkpoints have one
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from randes.atomic import replacing, write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "randes-digits-vit"


@dataclass(frozen=True)
class DigitsConfig:
    """Model hyper-parameters, written as the checkpoint's config.json."""

    image_size: int = 8
    patch_size: int = 2
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    mlp_ratio: int = 4
    num_classes: int | None = None
    """Classes of the task head; None for a headless base checkpoint."""
    task: str | None = None

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size

    def to_json(self) -> dict[str, object]:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> DigitsConfig:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)  # type: ignore[arg-type]


class Attention(nn.Module):
    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        shape = (b, n, self.n_head, d // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PatchEmbedding(nn.Module):
    """`wte.weight` of shape (patch_dim, d_model): a patch embeds as pixels @ weight."""

    def __init__(self, patch_dim: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(patch_dim, d_model))

    def forward(self, patches: Tensor) -> Tensor:
        return patches @ self.weight


class DigitsViT(nn.Module):
    """Backbone + optional head. `features` is the mean-pooled, final-normed token state."""

    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # (patch_dim, d_model), GPT-2's (vocab, d) orientation: a patch embeds as pixels @ wte,
        # as a one-hot token embeds as one_hot @ wte. Its columns are the model width, so
        # column sign flips randomise it as much as any other matrix.
        self.wte = PatchEmbedding(cfg.patch_dim, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_tokens, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head: nn.Linear | None = (
            nn.Linear(cfg.d_model, cfg.num_classes) if cfg.num_classes else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name == "wte.weight":
                nn.init.normal_(p, std=0.5)  # pixels are in [0, 1]: O(1) token norms
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, H, W) -> (B, n_tokens, patch*patch), row-major over patches."""
        p = self.cfg.patch_size
        b, hgt, wid = images.shape
        x = images.reshape(b, hgt // p, p, wid // p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(b, (hgt // p) * (wid // p), p * p)

    def features(self, images: Tensor) -> Tensor:
        x = self.wte(self.patchify(images)) + self.wpe.weight
        for block in self.h:
            x = block(x)
        return self.ln_f(x).mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        if self.head is None:
            raise RuntimeError("this is a headless base model: attach a task head first")
        return self.head(self.features(images))


def set_head(model: DigitsViT, num_classes: int) -> None:
    """Give the model a fresh zero head (zero: fine-tuning starts from the base's function)."""
    head = nn.Linear(model.cfg.d_model, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.head = head


_LAYER = re.compile(r"^h\.(\d+)\.")


def config_from_state_dict(
    state_dict: Mapping[str, Tensor], base: DigitsConfig | None = None
) -> DigitsConfig:
    """Infer the shape hyper-parameters from tensor shapes (n_head cannot be: taken from base)."""
    base = base or DigitsConfig()
    patch_dim, d_model = state_dict["wte.weight"].shape
    n_tokens = state_dict["wpe.weight"].shape[0]
    layers = {int(m.group(1)) for k in state_dict if (m := _LAYER.match(k))}
    patch = int(round(math.sqrt(patch_dim)))
    mlp_ratio = state_dict["h.0.mlp.c_fc.weight"].shape[0] // d_model
    head = state_dict.get("head.weight")
    return DigitsConfig(
        image_size=patch * int(round(math.sqrt(n_tokens))),
        patch_size=patch,
        d_model=int(d_model),
        n_layer=len(layers),
        n_head=base.n_head,
        mlp_ratio=int(mlp_ratio),
        num_classes=None if head is None else int(head.shape[0]),
        task=base.task,
    )


def model_from_state_dict(
    state_dict: Mapping[str, Tensor], cfg: DigitsConfig | None = None
) -> DigitsViT:
    """Rebuild a model; every tensor must be present and float (strict load)."""
    cfg = config_from_state_dict(state_dict, cfg)
    model = DigitsViT(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def save_pretrained(model: DigitsViT, out_dir: Path) -> Path:
    """Write a Hugging Face style dir: model.safetensors + config.json. Returns the dir."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    # Each file is written aside and renamed into place, so a reader (or a second process
    # building the same dir) never sees a half-written file.
    with replacing(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = json.dumps(model.cfg.to_json(), indent=2) + "\n"
    write_atomic(out_dir / CONFIG_FILE, config.encode("utf-8"))
    return out_dir


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a saved dir (or a bare .safetensors file)."""
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE if path.is_dir() else path
    return load_file(str(file))


def load_pretrained(path: Path) -> DigitsViT:
    """Inverse of save_pretrained."""
    cfg = DigitsConfig.from_json(json.loads((path / CONFIG_FILE).read_text()))
    return model_from_state_dict(load_state_dict(path), cfg)
