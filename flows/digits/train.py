"""Pretraining of the base and fine-tuning of the task models, deterministic by seed.

Deterministic means bit-identical weights for the same recipe and seeds, in any process:
training always runs on ONE torch thread, whatever the caller set. The thread count
changes float summation order, and training amplifies those last-bit differences into
visibly different models, so a free thread count would give the demo other models than
the benchmark. One thread is also the fast choice here: these tiny ops gain little from
a second thread on an idle 2-core machine and stall badly on a shared, busy one
(measured: pretraining 2.5x slower with 2 threads under load).

Recipe, chosen to look like real fine-tunes rather than to flatter any merge method:

- the base is pretrained on upright digits only (supervised digit classification), like a
  backbone pretrained on one domain; its pretraining head is discarded, so the saved base
  checkpoint has no head. (Random-shift augmentation exists as an option; at this step
  budget it underfits, by several points of test accuracy, so it is off.)
- each task starts from the base with a zero head, trains the head alone for a few steps
  (linear probing), then the whole model with a small learning rate for 150 steps
  (LP-FT), so the backbone delta is small relative to the weights (reported as
  ||delta|| / ||W||) but carries what the head cannot: tasks on rotated, mirrored,
  inverted or shifted images need other features than the upright base provides.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.digits.data import ALL_TASKS, TASKS, digits_split, get_task, task_split
from flows.digits.model import (
    CONFIG_FILE,
    MODEL_TYPE,
    WEIGHTS_FILE,
    DigitsConfig,
    DigitsViT,
    load_pretrained,
    save_pretrained,
    set_head,
)
from flows.training import (
    batches,
    fit_probe,
    train_steps,
    training_threads,
)
from randes.atomic import write_atomic

TASK_SEEDS: dict[str, int] = {name: 101 + 7 * i for i, name in enumerate(ALL_TASKS)}
"""Training seed of each task (distinct, fixed; the suite's 8 come first)."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; stored next to them for reuse checks."""

    code_version: int = 3
    """Bump when the model or training code changes: saved models then count as stale."""
    model: DigitsConfig = field(default_factory=DigitsConfig)
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    pretrain_seed: int = 7
    pretrain_augment: bool = False
    """Random +-1 px shifts during pretraining (off: underfits at this step budget)."""
    probe_steps: int = 40
    probe_lr: float = 2e-2
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    head_lr: float = 5e-3
    batch_size: int = 128

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["model"] = self.model.to_json()
        return data


def _augment_shift(images: Tensor, gen: torch.Generator) -> Tensor:
    """Random +-1 pixel translation per image (zero padded), for pretraining only."""
    padded = F.pad(images, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (images.shape[0],), generator=gen)
    dy = torch.randint(0, 3, (images.shape[0],), generator=gen)
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        out[i] = padded[i, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def pretrain(recipe: Recipe) -> DigitsViT:
    """Train the backbone on upright digit classification; return it without its head."""
    with training_threads():
        return _pretrain(recipe)


def _pretrain(recipe: Recipe) -> DigitsViT:
    torch.manual_seed(recipe.pretrain_seed)
    gen = torch.Generator().manual_seed(recipe.pretrain_seed)
    model = DigitsViT(recipe.model)
    set_head(model, 10)
    assert model.head is not None
    torch.nn.init.normal_(model.head.weight, std=0.02)  # pretraining head: random, discarded
    images, labels = digits_split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.pretrain_lr, total_steps=recipe.pretrain_steps, pct_start=0.1
    )
    model.train()

    def loss_of(idx: Tensor) -> Tensor:
        x = _augment_shift(images[idx], gen) if recipe.pretrain_augment else images[idx]
        return F.cross_entropy(model(x), labels[idx])

    train_steps(
        loss_of, batches(len(labels), recipe.batch_size, recipe.pretrain_steps, gen), opt, sched
    )
    model.head = None
    return model.eval()


def finetune(base: DigitsViT, task: str, recipe: Recipe, seed: int | None = None) -> DigitsViT:
    """LP-FT of a copy of `base` on one task; the base is left untouched."""
    with training_threads():
        return _finetune(base, task, recipe, seed)


def _finetune(base: DigitsViT, task: str, recipe: Recipe, seed: int | None) -> DigitsViT:
    spec = get_task(task)
    seed = TASK_SEEDS[task] if seed is None else seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = DigitsConfig(**{**asdict(base.cfg), "num_classes": spec.num_classes, "task": task})
    model = DigitsViT(cfg)
    missing = model.load_state_dict(base.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"head.weight", "head.bias"}, missing
    set_head(model, spec.num_classes)
    assert model.head is not None
    images, labels = task_split(task, "train")

    # Linear probe: backbone frozen, the head finds the readout of the base features.
    model.eval()
    with torch.no_grad():
        feats = model.features(images)
    probe = torch.optim.Adam(model.head.parameters(), lr=recipe.probe_lr)
    fit_probe(model.head, feats, labels, probe, recipe.probe_steps)

    # Full fine-tune at a small learning rate: the delta stays small, as in real fine-tunes.
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW(
        [
            {"params": body, "lr": recipe.finetune_lr},
            {"params": head_params, "lr": recipe.head_lr},
        ],
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, recipe.finetune_steps))
    model.train()
    train_steps(
        lambda idx: F.cross_entropy(model(images[idx]), labels[idx]),
        batches(len(labels), recipe.batch_size, recipe.finetune_steps, gen),
        opt,
        sched,
    )
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsViT, task: str, split: str = "test") -> float:
    """Fraction of correct predictions of `model` on `task`'s `split`."""
    images, labels = task_split(task, split)
    model.eval()
    return float((model(images).argmax(dim=-1) == labels).float().mean())


STAMP_FILE = "recipe.json"


def _read_stamp(path: Path) -> tuple[str, set[str]] | None:
    """(recipe as canonical JSON, tasks trained with it) of a models dir, None if unusable."""
    try:
        data = json.loads(path.read_text())
        return json.dumps(data["recipe"], sort_keys=True), set(data["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_our_model_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == MODEL_TYPE


def build_models(
    out_dir: Path,
    tasks: Iterable[str] | None = None,
    recipe: Recipe | None = None,
    reuse: bool = True,
    log: bool = False,
) -> tuple[Path, dict[str, Path]]:
    """Pretrain a base and fine-tune every task, saved as HF style dirs under `out_dir`.

    Layout: `out_dir/base/` and `out_dir/tasks/<task>/`, each with model.safetensors and
    config.json. `out_dir/recipe.json` records the recipe and the tasks trained with it;
    with `reuse`, exactly those dirs are kept (repeated benchmark runs are cheap, and
    training is deterministic, so reuse never changes results). Otherwise the base is
    trained again, and task dirs of an older base that this call does not rebuild are
    deleted: a fine-tune is only meaningful against its own base, and the pipeline
    ingests every dir under `tasks/`.
    """
    recipe = recipe or Recipe()
    names = list(TASKS) if tasks is None else list(tasks)
    for name in names:
        get_task(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_file = out_dir / STAMP_FILE
    recipe_json = json.dumps(recipe.to_json(), sort_keys=True)
    base_dir = out_dir / "base"
    stamp = _read_stamp(stamp_file) if reuse else None
    same = stamp is not None and stamp[0] == recipe_json and (base_dir / WEIGHTS_FILE).exists()
    built = stamp[1] if same and stamp is not None else set()

    t0 = time.perf_counter()
    if same:
        base = load_pretrained(base_dir)
    else:
        stamp_file.unlink(missing_ok=True)  # nothing below is certified until rewritten
        tasks_root = out_dir / "tasks"
        if tasks_root.is_dir():
            for stale in tasks_root.iterdir():
                if stale.name not in names and _is_our_model_dir(stale):
                    shutil.rmtree(stale)
        base = pretrain(recipe)
        save_pretrained(base, base_dir)
    if log:
        print(f"base ready in {time.perf_counter() - t0:.1f}s")
    task_dirs: dict[str, Path] = {}
    for name in names:
        t1 = time.perf_counter()
        tdir = out_dir / "tasks" / name
        if not (name in built and (tdir / WEIGHTS_FILE).exists()):
            save_pretrained(finetune(base, name, recipe), tdir)
        task_dirs[name] = tdir
        if log:
            print(f"task {name} ready in {time.perf_counter() - t1:.1f}s")
    stamp_json = json.dumps(
        {"recipe": recipe.to_json(), "tasks": sorted(built | set(names))}, indent=2
    )
    # last: every dir it names is complete when it appears
    write_atomic(stamp_file, (stamp_json + "\n").encode("utf-8"))
    return base_dir, task_dirs
