"""Digits flow: a real, small multi-task testbed for RanDeS.

scikit-learn's bundled handwritten digits (1797 real 8x8 images), a tiny GPT-2-named
vision transformer, a pretrained base and 8 genuinely different fine-tuned tasks, saved
as Hugging Face style dirs, plus an evaluator for `randes validate` and the quality
benchmark (benchmarks/quality.py).
"""

from flows.digits.data import TASKS, get_task, task_split
from flows.digits.evaluator import evaluate
from flows.digits.model import (
    DigitsConfig,
    DigitsViT,
    load_pretrained,
    load_state_dict,
    model_from_state_dict,
    save_pretrained,
)
from flows.digits.train import TASK_SEEDS, Recipe, build_models, finetune, pretrain

__all__ = [
    "TASKS",
    "TASK_SEEDS",
    "DigitsConfig",
    "DigitsViT",
    "Recipe",
    "build_models",
    "evaluate",
    "finetune",
    "get_task",
    "load_pretrained",
    "load_state_dict",
    "model_from_state_dict",
    "pretrain",
    "save_pretrained",
    "task_split",
]
