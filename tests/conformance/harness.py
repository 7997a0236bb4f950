"""Runs one conformance case through the real pipeline and measures it.

For each case: the base is registered (`Workspace.add_base`), one fine-tune is folded
alone into a bundle and materialized from the fp32 master (``--master``): its own class
loads it and its outputs must match the fine-tune's within 1e-5; three fine-tunes are
folded into another bundle and materialized at the defaults (int4 serving copy,
data-free lambda): the argmax of each one's outputs on fixed inputs is compared with
its fine-tune's. Results are kept in `RESULTS` for the table (tests/conformance/
conftest.py writes docs/conformance.md from them when asked).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from randes.config import TransformConfig
from randes.manifest import KeyMap, TaskEntry
from storage.settings import Settings
from storage.workspace import Workspace
from tests.conformance import models as m

ONE_TASK_ATOL = 1e-5
EVAL_SEED = 424242
EVAL_BATCH = 64
"""Evaluation inputs per case (sequences or images): argmax agreement is over all of
their predictions (per sequence, per token for LMs and token classifiers)."""


@dataclass
class Result:
    case: m.Case
    one_task_max_diff: float
    three_task_agreement: float
    """Argmax agreement with the fine-tunes at 3 tasks (min cosine for embeddings)."""
    metric: str
    recorded: str
    notes: list[str] = field(default_factory=list)


RESULTS: list[Result] = []


class Pipeline:
    """One embedded workspace (SQLite registry + local store) for many cases."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ws = Workspace(Settings(home=root / "home"))
        self.ws.init()

    def close(self) -> None:
        self.ws.close()

    def bundle(self, name: str, base: str) -> str:
        self.ws.create_bundle(name, base, TransformConfig())
        return name

    def fold(self, bundle: str, source: Path, task: str) -> None:
        outcome = self.ws.fold(bundle, str(source), task)
        assert not outcome.skipped

    def materialize(self, bundle: str, task: str, dest: Path, *, master: bool) -> Path:
        return self.ws.materialize(bundle, None, task, dest, master=master)

    def entry(self, bundle: str, task: str) -> TaskEntry:
        _, manifest = self.ws.resolve(bundle)
        return manifest.task(task)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60]


def describe(entry: TaskEntry) -> str:
    """What the manifest recorded about a task's reconciliation, in a few words."""
    km: KeyMap = entry.key_map
    parts = []
    if km.base_prefix or km.checkpoint_prefix:
        parts.append(f"`{km.base_prefix or '∅'}`→`{km.checkpoint_prefix or '∅'}`")
    if km.wrappers:
        parts.append("stripped " + "".join(f"`{w}`" for w in km.wrappers))
    if km.absent:
        shown = ", ".join(f"`{a}`" for a in km.absent[:2])
        more = f" +{len(km.absent) - 2}" if len(km.absent) > 2 else ""
        parts.append(f"absent {shown}{more}")
    if km.tied:
        parts.append("tied " + ", ".join(f"`{k}`→`{v}`" for k, v in km.tied.items()))
    if km.dtypes:
        parts.append("dtype " + ",".join(sorted(set(km.dtypes.values()))))
    if entry.source_kind != "checkpoint":
        parts.append(entry.source_kind)
    if entry.weights_dir:
        parts.append(f"weights in `{entry.weights_dir}/`")
    return "; ".join(parts) or "identity"


Source = tuple[Path, torch.Tensor]
"""A saved fine-tune and its reference outputs on the evaluation inputs."""


def dense_sources(case: m.Case, base_dir: Path, root: Path, n: int) -> list[Source]:
    batch = m.inputs(case.arch, EVAL_SEED, EVAL_BATCH)
    out: list[Source] = []
    for k in range(n):
        model = m.finetune(case, base_dir, seed=k + 1)
        directory = root / f"ft{k}"
        m.save_variant(model, case, directory)
        if case.variant not in m.UNLOADABLE:  # the fine-tune as its own loader sees it
            model = m.load(case, directory)
        out.append((directory, m.output(model, batch)))
    return out


def adapter_source(case: m.Case, base_dir: Path, root: Path, **lora: Any) -> Source:
    """A PEFT LoRA adapter trained on the task class, saved by peft; its reference is
    the merged model (base + B @ A * scaling), what merge_and_unload computes."""
    import peft
    import transformers

    torch.manual_seed(7)
    model = getattr(transformers, case.task).from_pretrained(base_dir, **case.config)
    tuned = peft.get_peft_model(model, peft.LoraConfig(**lora))
    m.train(tuned, case.arch, seed=7)
    directory = root / "adapter"
    tuned.save_pretrained(directory)
    merged = tuned.merge_and_unload()
    return directory, m.output(merged, m.inputs(case.arch, EVAL_SEED, EVAL_BATCH))


def _agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.argmax(-1) == want.argmax(-1)).float().mean())


def run_case(
    case: m.Case,
    pipe: Pipeline,
    root: Path,
    *,
    sources: Callable[[Path], list[Source]] | None = None,
    notes: list[str] | None = None,
) -> Result:
    """Fold and materialize ``case`` (one task --master; three tasks at defaults)."""
    root.mkdir(parents=True, exist_ok=True)
    base_dir = m.build_base(case, root / "base")
    name = slug(case.id)
    pipe.ws.add_base(name, str(base_dir))
    made = sources(base_dir) if sources else dense_sources(case, base_dir, root, 3)
    batch = m.inputs(case.arch, EVAL_SEED, EVAL_BATCH)

    one = pipe.bundle(f"{name}-one", name)
    pipe.fold(one, made[0][0], "t0")
    got = m.output(m.load(case, pipe.materialize(one, "t0", root / "one-t0", master=True)), batch)
    diff = float((got - made[0][1]).abs().max())

    three = pipe.bundle(f"{name}-three", name)
    for k, (directory, _) in enumerate(made):
        pipe.fold(three, directory, f"t{k}")
    agreements = []
    for k, (_, want) in enumerate(made):
        dest = pipe.materialize(three, f"t{k}", root / f"three-t{k}", master=False)
        agreements.append(_agreement(m.output(m.load(case, dest), batch), want))
    result = Result(
        case=case,
        one_task_max_diff=diff,
        three_task_agreement=min(agreements),
        metric="argmax agreement",
        recorded=describe(pipe.entry(one, "t0")),
        notes=list(notes or []),
    )
    RESULTS.append(result)
    return result


def run_adapter_among_dense(case: m.Case, pipe: Pipeline, root: Path, **lora: Any) -> Result:
    """``run_case`` with a peft adapter of ``case`` (``lora``: its LoraConfig) as task t0
    and two dense fine-tunes after it: the adapter folded alone and among dense ones."""

    def sources(base_dir: Path) -> list[Source]:
        adapter = adapter_source(case, base_dir, root, **lora)
        return [adapter, *dense_sources(case, base_dir, root, 2)]

    return run_case(case, pipe, root, sources=sources, notes=["+2 dense fine-tunes"])
