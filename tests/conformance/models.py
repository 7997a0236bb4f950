"""Tiny real models for the conformance suite, built and saved by the ecosystem's tools.

Every model comes from a transformers config (random init: weights cannot be
downloaded here), fine-tunes are a few optimizer steps on fixed random data, and every
checkpoint on disk is written by ``save_pretrained`` (transformers, peft,
sentence-transformers) or by the training tool's own state dict (DDP, torch.compile)
saved with safetensors: never by this project's writers, so what the suite folds is
what users have.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.hf_models import VOCAB, config_of

transformers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)  # tiny models: threads only add overhead (and the CI box has 2 cores)
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

SEQ = 8
BATCH = 4
STEPS = 3
LR = 3e-4
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def inputs(arch: str, seed: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Fixed model inputs of an architecture (seeded: the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, SEQ), generator=g)
    pixels = torch.randn(batch, 3, 16, 16, generator=g)
    if arch == "vit":
        return {"pixel_values": pixels}
    if arch == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(5, VOCAB, (batch, 4), generator=g)
    return out


def labels(model: Any, batch: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    """What makes the model's forward return a loss for this batch."""
    g = torch.Generator().manual_seed(seed)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    name = type(inner).__name__
    batch_size = next(iter(batch.values())).shape[0]
    if name == "CLIPModel":
        return {"return_loss": True}
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return {"labels": batch["input_ids"]}
    if name.endswith("ForConditionalGeneration"):
        return {"labels": torch.randint(5, VOCAB, (batch_size, 4), generator=g)}
    if name.endswith("ForTokenClassification"):
        return {"labels": torch.randint(0, 3, (batch_size, SEQ), generator=g)}
    return {"labels": torch.randint(0, 3, (batch_size,), generator=g)}


def output(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction scores on ``batch`` (float32, eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    value = out.logits_per_image if hasattr(out, "logits_per_image") else out.logits
    return value.detach().float()


def train(model: Any, arch: str, seed: int, *, steps: int = STEPS) -> Any:
    """A few AdamW steps on fixed random data: a real (if small) fine-tune."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    for step in range(steps):
        batch = inputs(arch, 1000 * seed + step)
        loss = model(**batch, **labels(model, batch, 1000 * seed + step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@dataclass(frozen=True)
class Case:
    """One row of the conformance table."""

    id: str
    arch: str
    task: str
    """transformers class of the fine-tune (or "SentenceTransformer")."""
    base: str
    """transformers class of the base model."""
    layout: str
    """bare backbone / same head class / pretraining head."""
    variant: str = "fp32"
    """How the fine-tune was saved: fp32, bf16, fp16, sharded, tied, ddp, compiled,
    chat-template, peft-lora, legacy-st..."""
    config: dict[str, Any] = field(default_factory=dict)
    """Config overrides of the fine-tunes (tie_word_embeddings, num_labels...)."""
    base_config: dict[str, Any] = field(default_factory=dict)


def build_base(case: Case, directory: Path) -> Path:
    """The base model of ``case``, random init, saved by save_pretrained."""
    torch.manual_seed(0)
    cls = getattr(transformers, case.base)
    model = cls(config_of(case.arch, **case.base_config))
    model.save_pretrained(directory)
    if case.variant == "position-ids":  # what transformers 4.x saved: the int64 buffer
        weights = directory / "model.safetensors"
        state = load_file(weights)
        state["embeddings.position_ids"] = torch.arange(32, dtype=torch.int64)[None]
        save_file(state, weights, metadata={"format": "pt"})
    return directory


def tokenizer(directory: Path, *, chat: bool) -> Any:
    """A tiny word-level fast tokenizer (tokenizers + transformers), optionally with a
    chat template: save_pretrained writes tokenizer.json, its config, chat_template.jinja."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab |= {f"w{i}": i for i in range(5, VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return tok


def save_variant(model: Any, case: Case, directory: Path) -> None:
    """Save a trained fine-tune the way ``case.variant`` says its tool would."""
    if case.variant in ("bf16", "fp16"):
        model.to(torch.bfloat16 if case.variant == "bf16" else torch.float16)
    if case.variant == "ddp":
        state = _ddp_state_dict(model, directory.parent)
        _save_state(model, state, directory)
    elif case.variant == "compiled":
        compiled = torch.compile(model)  # lazy: nothing is compiled until called
        _save_state(model, compiled.state_dict(), directory)
    elif case.variant.startswith("sharded"):
        model.save_pretrained(directory, max_shard_size="40KB")
    else:
        model.save_pretrained(directory)
    if case.variant.endswith("chat-template"):
        tokenizer(directory, chat=True)


def _save_state(model: Any, state: dict[str, torch.Tensor], directory: Path) -> None:
    """A training script's checkpoint: the wrapper's state dict through safetensors,
    next to the model's config (what `accelerate`/custom loops commonly write)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()}, directory / "model.safetensors"
    )
    model.config.save_pretrained(directory)


def _ddp_state_dict(model: Any, scratch: Path) -> dict[str, torch.Tensor]:
    """``DistributedDataParallel(model).state_dict()``: a real one-process gloo group."""
    import torch.distributed as dist

    init = scratch / "ddp-rendezvous"
    init.unlink(missing_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        return {k: v.clone() for k, v in wrapped.state_dict().items()}
    finally:
        dist.destroy_process_group()


def finetune(case: Case, base_dir: Path, seed: int) -> Any:
    """The fine-tune model: the base's weights loaded into the task class, then trained."""
    cls = getattr(transformers, case.task)
    torch.manual_seed(seed)
    if case.variant == "tied over untied":
        # A tied model initialised from an untied base: its output embedding is its input
        # embedding, so save_pretrained leaves lm_head.weight out.
        model = cls(config_of(case.arch, **case.config))
        state = load_file(base_dir / "model.safetensors")
        model.load_state_dict({k: v for k, v in state.items() if "lm_head" not in k}, strict=False)
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        model = cls.from_pretrained(base_dir, **case.config)
    return train(model, case.arch, seed)


def load(case: Case, directory: Path) -> Any:
    """The fine-tune's own loader on a directory (a fine-tune, or a materialized task),
    with the overrides its training loaded the base with (an adapter's task keeps the
    base's config.json, as peft users load it: ``from_pretrained(base, num_labels=3)``)."""
    return getattr(transformers, case.task).from_pretrained(directory, dtype="auto", **case.config)


UNLOADABLE = ("ddp", "compiled")
"""Variants whose files transformers cannot load as they are (their reference outputs
come from the trained model in memory)."""
