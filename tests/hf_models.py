"""Configs of the tiny transformers models the test suites build (random init).

Weights cannot be downloaded here, so every model a test folds or serves is built from
one of these configs: a few hundred K parameters at most, with the architecture's real
parameter names and shapes. The conformance suite and the serving-runtime tests build
from the same table, so a change of size lands in both at once.

`save_base` and `save_finetune` write checkpoints the way users get them (the bare
backbone as published, a task model trained a few steps, saved by ``save_pretrained``,
in fp32 or bf16, with or without a pooler): the pipeline tests fold these rather than
hand-made state dicts. `resave` and `set_weight` make a test's corruption of such a
checkpoint (a NaN, a huge weight) and save it again the same way; `save_state` writes
what no model class can hold (float8 tensors, most tensors removed) as save_pretrained
lays it out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 64

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2}


def _configs() -> dict[str, Callable[..., Any]]:
    import transformers as t

    def text(cls: Any, **fixed: Any) -> Callable[..., Any]:
        """``cls`` with the tiny sizes and ``fixed`` settings, overridable per call."""
        return lambda **kw: cls(**({"vocab_size": VOCAB} | SMALL | HEADS | fixed | kw))

    def decoder(cls: Any, *, tied: bool) -> Callable[..., Any]:
        return text(cls, num_key_value_heads=1, pad_token_id=0, tie_word_embeddings=tied)

    return {
        "bert": text(t.BertConfig, max_position_embeddings=32),
        "roberta": text(t.RobertaConfig, max_position_embeddings=40, pad_token_id=1),
        "gpt2": lambda **kw: t.GPT2Config(
            **(
                {
                    "vocab_size": VOCAB,
                    "n_embd": 32,
                    "n_layer": 2,
                    "n_head": 2,
                    "n_positions": 32,
                    "pad_token_id": 0,
                }
                | kw
            )
        ),
        "llama": decoder(t.LlamaConfig, tied=False),
        "qwen2": decoder(t.Qwen2Config, tied=True),
        "t5": lambda **kw: t.T5Config(
            **(
                {
                    "vocab_size": VOCAB,
                    "d_model": 32,
                    "d_ff": 64,
                    "num_layers": 2,
                    "num_decoder_layers": 2,
                    "num_heads": 2,
                    "d_kv": 16,
                    "decoder_start_token_id": 0,
                    "pad_token_id": 0,
                }
                | kw
            )
        ),
        "vit": lambda **kw: t.ViTConfig(
            **({"image_size": 16, "patch_size": 8, "num_channels": 3} | SMALL | HEADS | kw)
        ),
        "clip": lambda **kw: t.CLIPConfig(
            **(
                {  # type: ignore[arg-type]
                    "text_config": {
                        "vocab_size": VOCAB,
                        **SMALL,
                        **HEADS,
                        "num_hidden_layers": 1,
                        "max_position_embeddings": 16,
                    },
                    "vision_config": {
                        "image_size": 16,
                        "patch_size": 8,
                        **SMALL,
                        **HEADS,
                        "num_hidden_layers": 1,
                    },
                    "projection_dim": 16,
                }
                | kw
            )
        ),
    }


def config_of(arch: str, **overrides: Any) -> Any:
    """The tiny config of ``arch`` (``bert``, ``gpt2``, ``llama``...), with ``overrides``."""
    return _configs()[arch](**overrides)


# ------------------------------------------------------------ saved checkpoints
BASES = {"bert": "BertModel", "gpt2": "GPT2Model", "llama": "LlamaModel"}
"""The bare backbone of an architecture, as its base is published on the hub."""

TASK_HEADS = {
    "bert": "BertForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
"""The fine-tune class a test gets unless it names another (backbone under a prefix,
plus a head the base lacks)."""


def _quiet() -> Any:
    """transformers, without its load reports and progress bars (one per model saved)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def save_base(directory: Path, arch: str = "bert", *, seed: int = 0, **overrides: Any) -> Path:
    """The tiny bare backbone of ``arch``, random init, saved by ``save_pretrained``
    (fp32, the base's ``config.json`` next to ``model.safetensors``)."""
    import torch

    transformers = _quiet()
    torch.manual_seed(seed)
    getattr(transformers, BASES[arch])(config_of(arch, **overrides)).save_pretrained(directory)
    return directory


def train(
    model: Any,
    seed: int,
    *,
    steps: int = 2,
    lr: float = 2e-3,
    labels: Callable[[Any], Any] | None = None,
) -> Any:
    """``steps`` Adam steps on random token ids (seeded), so every weight the loss
    reaches moves: a real, if small, fine-tune delta. The labels are random, or
    ``labels(ids)`` (a task the model can learn, e.g. ``ids % 3`` per token: a model
    trained hard on random labels collapses to one class, one trained on a task
    does not)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    per_token = type(model).__name__.endswith("ForTokenClassification")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = torch.randint(2, vocab, (4, 8), generator=gen)
        shape = (4, 8) if per_token else (4,)
        if labels is None:
            target = torch.randint(0, model.config.num_labels, shape, generator=gen)
        else:
            target = labels(ids)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def save_finetune(
    base_dir: Path,
    directory: Path,
    seed: int,
    *,
    task: str | None = None,
    dtype: str | None = None,
    num_labels: int = 3,
    steps: int = 2,
    lr: float = 2e-3,
    labels: Callable[[Any], Any] | None = None,
    edit: Callable[[Any], None] | None = None,
) -> Path:
    """A fine-tune of the base saved in ``base_dir`` (by `save_base`), saved by
    ``save_pretrained`` into ``directory``: the ``task`` class (the architecture's
    sequence classifier by default) loaded from the base, trained ``steps`` Adam steps at
    ``lr`` (seeded by ``seed``; Adam moves every weight by ~``lr`` a step, so ``lr`` sets
    the delta's size; ``labels`` as `train`'s), ``edit`` applied to the model (no grad:
    a test's corruption), then cast to ``dtype`` (``"bfloat16"``: the usual LLM
    fine-tune over an fp32 base).

    A token classifier (``BertForTokenClassification``) has no pooler: a fine-tune that
    lacks tensors its base has, as real ones do."""
    import json

    import torch

    transformers = _quiet()
    arch = json.loads((base_dir / "config.json").read_text())["model_type"]
    cls = getattr(transformers, task or TASK_HEADS[arch])
    torch.manual_seed(seed)
    model = train(
        cls.from_pretrained(base_dir, num_labels=num_labels),
        seed,
        steps=steps,
        lr=lr,
        labels=labels,
    )
    if edit is not None:
        with torch.no_grad():
            edit(model)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    return directory


def resave(src: Path, directory: Path, edit: Callable[[Any], None]) -> Path:
    """The checkpoint saved in ``src`` loaded with its own class (``architectures`` in
    its config.json), ``edit`` applied (no grad: a test's corruption, e.g. a NaN the
    training run wrote) and saved again by ``save_pretrained`` into ``directory``."""
    import json

    import torch

    transformers = _quiet()
    config = json.loads((src / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(directory)
    return directory


def set_weight(name: str, index: tuple[int, ...] | None, value: float) -> Callable[[Any], None]:
    """An ``edit`` (for `save_finetune`, `resave`): parameter ``name`` set to ``value``
    at ``index``, or everywhere when ``index`` is None."""

    def edit(model: Any) -> None:
        weight = dict(model.named_parameters())[name]
        if index is None:
            weight.fill_(value)
        else:
            weight[index] = value

    return edit


def save_state(directory: Path, state: dict[str, Any], like: Path) -> Path:
    """A hand-edited state dict (tensors no model class declares, tensors removed)
    written as ``save_pretrained`` writes one: ``model.safetensors`` with its
    ``{"format": "pt"}`` metadata, next to a copy of ``like``'s config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_bytes((like / "config.json").read_bytes())
    return directory
