"""Suites for the storage benchmark: digits (8 or 13 tasks, normal or large deltas), MiniLM.

Each adapter returns a benchmarks.storage_core.StorageSuite: model dirs on disk,
fine-tuned reference accuracies on val and test, and an accuracy function.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from benchmarks.quality import SEEDS, load_suite
from benchmarks.storage_core import StorageSuite
from flows.digits.data import ALL_TASKS
from flows.digits.evaluator import evaluate
from flows.digits.train import Recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS_DIR = ROOT / "benchmarks/out/digits-models"
LARGE_DIR = ROOT / "benchmarks/out/digits-models-large"
MINILM_DIR = ROOT / "benchmarks/out/minilm-models"

LARGE_RECIPE = Recipe(finetune_steps=300, finetune_lr=1.5e-3)
"""Digits fine-tuned harder (2x the steps, 3x the learning rate): ~2x larger deltas."""
QUICK_RECIPE = Recipe(pretrain_steps=60, probe_steps=10, finetune_steps=15)
"""``--quick`` runs: a tenth of the training steps, models kept apart (QUICK_DIR)."""
QUICK_DIR = ROOT / "benchmarks/out/quick/digits-models"


def _digits_accuracy(task: str, state: Mapping[str, Tensor], split: str) -> float:
    return evaluate(state, task, split)["accuracy"]


def digits(
    n_tasks: int = 8, large: bool = False, retrain: bool = False, quick: bool = False
) -> StorageSuite:
    """The digits ViT suite of benchmarks.quality (first n tasks of ALL_TASKS)."""
    tasks = list(ALL_TASKS)[:n_tasks]
    recipe = QUICK_RECIPE if quick else LARGE_RECIPE if large else Recipe()
    models_dir = QUICK_DIR if quick else LARGE_DIR if large else DIGITS_DIR
    s = load_suite(models_dir, tasks, recipe, reuse=not retrain)
    rel = sum(s.rel_delta.values()) / len(tasks)
    name = f"digits-{n_tasks}" + ("-large" if large else "")
    what = (
        f"digits ViT, {n_tasks} tasks, fine-tuned {recipe.finetune_steps} steps at lr"
        f" {recipe.finetune_lr:g}; ‖δ‖/‖W‖ {100 * min(s.rel_delta.values()):.1f}-"
        f"{100 * max(s.rel_delta.values()):.1f}% (mean {100 * rel:.1f}%)"
    )
    stamp = models_dir / "storage_train_s.json"
    if s.train_s > 30:  # trained now, not loaded: remember what training cost
        stamp.write_text(json.dumps({"seconds": round(s.train_s)}) + "\n")
    trained = json.loads(stamp.read_text())["seconds"] if stamp.exists() else None
    notes = [f"Models loaded from `{models_dir.relative_to(ROOT)}` in {s.train_s:.0f} s"]
    if trained is not None:
        notes.append(f"(training them took {trained} s once)")
    return StorageSuite(
        name=name,
        description=what,
        base_dir=s.base_dir,
        task_dirs=s.task_dirs,
        ref=s.ref,
        accuracy=_digits_accuracy,
        seeds={t: SEEDS[i] for i, t in enumerate(tasks)},
        notes=notes,
    )


def minilm_available() -> bool:
    return importlib.util.find_spec("benchmarks.minilm_suite") is not None


def minilm(models_dir: Path = MINILM_DIR, retrain: bool = False) -> StorageSuite:
    """The MiniLM suite (benchmarks.minilm_suite.build_suite): a real pretrained transformer."""
    from benchmarks import minilm_suite  # built concurrently; imported only when asked for

    s = minilm_suite.build_suite(models_dir, retrain=retrain)
    tasks = list(s.tasks)
    seeds = {t: SEEDS[i] if i < len(SEEDS) else 1000 + 17 * i for i, t in enumerate(tasks)}
    ref = {split: {t: float(s.finetuned_acc[t][split]) for t in tasks} for split in ("val", "test")}
    rel = [float(s.rel_delta[t]) for t in tasks]
    what = (
        f"all-MiniLM-L6-v2 (BERT, 22.7M parameters), {len(tasks)} real text tasks;"
        f" ‖δ‖/‖W‖ {100 * min(rel):.2f}-{100 * max(rel):.2f}%"
        f" (mean {100 * sum(rel) / len(rel):.2f}%)"
    )
    notes = [f"Fine-tunes trained once in {sum(s.train_s.values()):.0f} s (recorded, cached)"]
    return StorageSuite(
        name="minilm",
        description=what,
        base_dir=Path(s.base_dir),
        task_dirs={t: Path(s.task_dirs[t]) for t in tasks},
        ref=ref,
        accuracy=s.accuracy,
        seeds=seeds,
        notes=notes,
    )
