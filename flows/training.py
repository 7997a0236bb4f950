"""The training loop the digits trainer and the MiniLM benchmark share: LP-FT, deterministic.

Both fine-tune the same way (a linear probe of a zero head on frozen features, then a few
hundred full steps over epoch-shuffled minibatches) and both must give bit-identical
weights for the same recipe in any process, so both run on one torch thread (the thread
count changes float summation order, which training amplifies; see flows/digits/train.py)
and draw batch order from their own generator only. One copy of that loop, here: the
models, data and optimizers stay with each caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

TRAIN_THREADS = 1
"""torch threads used for training: part of determinism (see the module docstring)."""


@contextmanager
def training_threads() -> Iterator[None]:
    """Train on ``TRAIN_THREADS`` threads, then restore the caller's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batches(n: int, batch: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """`steps` minibatch index sets, reshuffled every epoch, drawn from `gen` only."""
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield perm[start : start + batch]
            done += 1
            if done >= steps:
                return


def fit_probe(
    head: torch.nn.Module,
    feats: Tensor,
    labels: Tensor,
    opt: torch.optim.Optimizer,
    steps: int,
) -> None:
    """Linear probe: full-batch cross-entropy steps of ``head`` on frozen features."""
    for _ in range(steps):
        loss = F.cross_entropy(head(feats), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_steps(
    loss_of: Callable[[Tensor], Tensor],
    index_sets: Iterable[Tensor],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """One optimizer and scheduler step per index set, on ``loss_of(indices)``."""
    for idx in index_sets:
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def relative_delta_norm(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor]) -> float:
    """||theta_t - theta_base|| / ||theta_base|| over the base's tensors (heads excluded)."""
    num = 0.0
    den = 0.0
    for name, w in base.items():
        d = tuned[name].float() - w.float()
        num += float(d.pow(2).sum())
        den += float(w.float().pow(2).sum())
    return (num / den) ** 0.5
