"""Tiny BERT and GPT-2 bundles made with transformers itself, for the serving runtime.

The base is the bare backbone (``BertModel`` / ``GPT2Model``) saved by ``save_pretrained``,
as on the hub; each fine-tune is the sequence-classification model started from that base
and trained a few optimizer steps on random data, saved by ``save_pretrained`` (so the
backbone sits under ``bert.`` / ``transformer.``, with a head the base lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.hf_models import config_of

VOCAB = 96
SEQ = 12


def _configs(arch: str, **overrides: Any) -> tuple[Any, Any, Any]:
    import transformers as tf

    if arch == "bert":
        cfg = config_of("bert", **({"vocab_size": VOCAB} | overrides))
        return cfg, tf.BertModel, tf.BertForSequenceClassification
    if arch == "gpt2":
        cfg = config_of(
            "gpt2", **({"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 1} | overrides)
        )
        return cfg, tf.GPT2Model, tf.GPT2ForSequenceClassification
    raise ValueError(arch)


def inputs(seed: int, batch: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, SEQ), generator=gen)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, SEQ - 3 :] = 0  # one padded row
    ids[0, SEQ - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_models(
    root: Path, arch: str, tasks: int = 3, steps: int = 3, **config: Any
) -> dict[str, Path]:
    """``{"base": dir, "t1": dir, ...}`` for ``arch`` in {"bert", "gpt2"} (``config``:
    overrides of its tiny config)."""
    cfg, base_cls, task_cls = _configs(arch, **config)
    torch.manual_seed(0)
    base = base_cls(cfg)
    out = {"base": root / f"{arch}-base"}
    base.save_pretrained(out["base"])
    for k in range(1, tasks + 1):
        torch.manual_seed(100 + k)
        model = task_cls.from_pretrained(out["base"], num_labels=2 + k % 2)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for step in range(steps):
            batch = inputs(1000 * k + step, batch=8)
            labels = torch.randint(0, model.config.num_labels, (8,))
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[f"t{k}"] = root / f"{arch}-t{k}"
        model.save_pretrained(out[f"t{k}"])
    return out
