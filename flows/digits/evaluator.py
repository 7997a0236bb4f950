"""Evaluator entry point for the pipeline: `flows.digits.evaluator:evaluate`.

`randes validate --evaluator flows.digits.evaluator:evaluate` calls it with a retrieved
(or materialized) state dict and a task name; it rebuilds backbone + that task's head
from the tensors alone and reports held-out test accuracy. Shapes are inferred from the
tensors, so it needs no config.json and works on anything the pipeline hands it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from flows.digits.data import get_task
from flows.digits.model import model_from_state_dict
from flows.digits.train import accuracy


def evaluate(state_dict: Mapping[str, Tensor], task: str, split: str = "test") -> dict[str, float]:
    """{"accuracy": a} of the model in `state_dict` on `task`'s `split` (test by default)."""
    spec = get_task(task)
    if "head.weight" not in state_dict:
        raise ValueError(f"state dict has no task head ('head.weight') to evaluate {task!r}")
    classes = state_dict["head.weight"].shape[0]
    if classes != spec.num_classes:
        raise ValueError(f"head has {classes} classes, task {task!r} has {spec.num_classes}")
    model = model_from_state_dict(state_dict)
    return {"accuracy": accuracy(model, task, split)}
