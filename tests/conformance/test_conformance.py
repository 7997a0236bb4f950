"""Conformance: real checkpoints of common architectures, as their tools save them.

Each case folds fine-tunes made by a few optimizer steps on a tiny transformers model
and saved by ``save_pretrained`` (or peft, or sentence-transformers, or a training
wrapper's state dict), materializes them, and loads them back with their own class:

- one task, materialized from the master: outputs within 1e-5 of the fine-tune's;
- three tasks at the defaults (int4 serving copy, data-free lambda): the argmax of the
  outputs on fixed inputs agrees with each fine-tune's.

``RANDES_CONFORMANCE_DOC=docs/conformance.md`` writes the measured table (see
tests/conformance/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conformance import harness as h
from tests.conformance import models as m

AGREEMENT = 0.75
"""Least argmax agreement at 3 tasks (defaults) any case may show. Measured 84-100% over five runs
(docs/conformance.md); each run draws fresh task seeds, so the cross-talk, and with it
the agreement on these near-tie-prone tiny random models, moves by several points from
run to run."""

N3 = {"num_labels": 3}
CASES = [
    m.Case(
        "bert-seqcls-bare",
        "bert",
        "BertForSequenceClassification",
        "BertModel",
        "bare backbone",
        config=N3,
    ),
    m.Case(
        "bert-seqcls-position-ids",
        "bert",
        "BertForSequenceClassification",
        "BertModel",
        "bare backbone",
        "position-ids",
        config=N3,
    ),
    m.Case(
        "bert-seqcls-same",
        "bert",
        "BertForSequenceClassification",
        "BertForSequenceClassification",
        "same head class",
        config=N3,
        base_config=N3,
    ),
    m.Case(
        "bert-seqcls-mlm",
        "bert",
        "BertForSequenceClassification",
        "BertForMaskedLM",
        "pretraining head",
        config=N3,
    ),
    m.Case(
        "bert-tokcls-bare",
        "bert",
        "BertForTokenClassification",
        "BertModel",
        "bare backbone",
        config=N3,
    ),
    m.Case(
        "bert-seqcls-sharded",
        "bert",
        "BertForSequenceClassification",
        "BertModel",
        "bare backbone",
        "sharded",
        config=N3,
    ),
    m.Case(
        "bert-seqcls-fp16",
        "bert",
        "BertForSequenceClassification",
        "BertModel",
        "bare backbone",
        "fp16",
        config=N3,
    ),
    m.Case(
        "bert-seqcls-ddp",
        "bert",
        "BertForSequenceClassification",
        "BertModel",
        "bare backbone",
        "ddp",
        config=N3,
    ),
    m.Case(
        "roberta-seqcls-bare",
        "roberta",
        "RobertaForSequenceClassification",
        "RobertaModel",
        "bare backbone",
        config=N3,
    ),
    m.Case("gpt2-lm-tied", "gpt2", "GPT2LMHeadModel", "GPT2LMHeadModel", "same head class", "tied"),
    m.Case(
        "gpt2-seqcls-bare",
        "gpt2",
        "GPT2ForSequenceClassification",
        "GPT2Model",
        "bare backbone",
        config=N3,
    ),
    m.Case(
        "llama-lm-untied",
        "llama",
        "LlamaForCausalLM",
        "LlamaForCausalLM",
        "same head class",
        "untied",
    ),
    m.Case(
        "llama-lm-bf16", "llama", "LlamaForCausalLM", "LlamaForCausalLM", "same head class", "bf16"
    ),
    m.Case(
        "llama-lm-fp16", "llama", "LlamaForCausalLM", "LlamaForCausalLM", "same head class", "fp16"
    ),
    m.Case(
        "llama-lm-tied-over-untied",
        "llama",
        "LlamaForCausalLM",
        "LlamaForCausalLM",
        "same head class",
        "tied over untied",
        config={"tie_word_embeddings": True},
    ),
    m.Case("llama-lm-bare", "llama", "LlamaForCausalLM", "LlamaModel", "bare backbone", "untied"),
    m.Case(
        "llama-lm-compiled",
        "llama",
        "LlamaForCausalLM",
        "LlamaForCausalLM",
        "same head class",
        "compiled",
    ),
    m.Case(
        "llama-lm-sharded-chat",
        "llama",
        "LlamaForCausalLM",
        "LlamaForCausalLM",
        "same head class",
        "sharded+chat-template",
    ),
    m.Case(
        "qwen2-lm-tied-bf16",
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2ForCausalLM",
        "same head class",
        "bf16",
    ),
    m.Case(
        "qwen2-seqcls-bare",
        "qwen2",
        "Qwen2ForSequenceClassification",
        "Qwen2Model",
        "bare backbone",
        config=N3,
    ),
    m.Case(
        "t5-cg-same",
        "t5",
        "T5ForConditionalGeneration",
        "T5ForConditionalGeneration",
        "same head class",
        "tied",
    ),
    m.Case("t5-cg-bare", "t5", "T5ForConditionalGeneration", "T5Model", "bare backbone", "tied"),
    m.Case(
        "vit-imgcls-bare",
        "vit",
        "ViTForImageClassification",
        "ViTModel",
        "bare backbone",
        config=N3,
    ),
    m.Case("clip-same", "clip", "CLIPModel", "CLIPModel", "same head class"),
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.Pipeline]:
    pipeline = h.Pipeline(tmp_path_factory.mktemp("conformance"))
    yield pipeline
    pipeline.close()


def _check(result: h.Result) -> None:
    assert result.one_task_max_diff <= h.ONE_TASK_ATOL, result
    assert result.three_task_agreement >= AGREEMENT, result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dense_case(case: m.Case, pipe: h.Pipeline, tmp_path: Path) -> None:
    result = h.run_case(case, pipe, tmp_path)
    _check(result)
    entry = pipe.entry(f"{h.slug(case.id)}-one", "t0")
    if case.variant in ("ddp", "compiled"):
        # validation measures the retrieved task against its source, wrappers stripped
        from flows.validation import validate_task

        report = validate_task(pipe.ws, f"{h.slug(case.id)}-one", 1, "t0", master=True)
        assert report.delta_cosine is not None and report.delta_cosine > 1 - 1e-6
    if case.variant == "ddp":
        assert entry.key_map.wrappers == ("module.",)
    if case.variant == "compiled":
        assert entry.key_map.wrappers == ("_orig_mod.",)
    if case.variant in ("bf16", "fp16"):
        assert entry.key_map.dtypes == {"*": "BF16" if case.variant == "bf16" else "F16"}
    if case.variant == "position-ids":
        assert "embeddings.position_ids" in entry.key_map.absent
    if case.variant == "tied over untied":
        assert entry.key_map.absent == ("lm_head.weight",)
        assert entry.key_map.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    if case.layout == "pretraining head":
        assert any(a.startswith("cls.") for a in entry.key_map.absent)
    if case.variant.endswith("chat-template"):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "one-t0")
        text = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False)
        assert text == "<user>w5 w6"


def test_lora_adapter_alone_and_among_dense(pipe: h.Pipeline, tmp_path: Path) -> None:
    """A rsLoRA adapter (peft; per-module rank and alpha, LoRA on the embeddings too)
    folded alone retrieves as base + merged adapter; it folds into a bundle of dense
    fine-tunes, and the manifest says it came from an adapter."""
    case = m.Case(
        "llama-lm-peft-rslora",
        "llama",
        "LlamaForCausalLM",
        "LlamaForCausalLM",
        "same head class",
        "peft-lora (rsLoRA)",
    )

    result = h.run_adapter_among_dense(
        case,
        pipe,
        tmp_path,
        r=4,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 8},
    )
    _check(result)
    entry = pipe.entry(f"{h.slug(case.id)}-one", "t0")
    assert entry.source_kind == "peft-lora"
    from flows.validation import validate_task

    report = validate_task(pipe.ws, f"{h.slug(case.id)}-one", 1, "t0", master=True)
    assert (
        report.delta_cosine is not None and report.delta_cosine > 1 - 1e-6
    )  # against the merged model
    assert "adapter_config.json" not in entry.files and "config.json" in entry.files
    assert not (tmp_path / "one-t0" / "adapter_config.json").exists()


def test_lora_fan_in_fan_out_gpt2(pipe: h.Pipeline, tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are stored in x out: peft's fan_in_fan_out transposes."""
    case = m.Case(
        "gpt2-lm-peft-fan-in-fan-out",
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2LMHeadModel",
        "same head class",
        "peft-lora (fan_in_fan_out)",
    )

    _check(
        h.run_adapter_among_dense(
            case,
            pipe,
            tmp_path,
            r=2,
            lora_alpha=4,
            fan_in_fan_out=True,
            target_modules=["c_attn", "c_fc"],
        )
    )


def test_lora_modules_to_save_over_bare_base(pipe: h.Pipeline, tmp_path: Path) -> None:
    """A sequence-classification adapter whose head is a ``modules_to_save`` copy: the
    head is the task's private tensor, the base is the bare backbone."""
    case = m.Case(
        "llama-seqcls-peft-bare",
        "llama",
        "LlamaForSequenceClassification",
        "LlamaModel",
        "bare backbone",
        "peft-lora (modules_to_save)",
        config=N3,
    )

    _check(
        h.run_adapter_among_dense(
            case,
            pipe,
            tmp_path,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["score"],
            task_type="SEQ_CLS",
        )
    )
    private = {t for ref in pipe.entry(f"{h.slug(case.id)}-one", "t0").private for t in ref.tensors}
    assert "score.weight" in private


def test_unsupported_adapter_kind_one_line(pipe: h.Pipeline, tmp_path: Path) -> None:
    import peft
    import transformers

    from randes.errors import CheckpointError

    case = CASES[11]  # llama-lm-untied
    base_dir = m.build_base(case, tmp_path / "base")
    pipe.ws.add_base("dora-base", str(base_dir))
    bundle = pipe.bundle("dora", "dora-base")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    tuned = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    tuned.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="DoRA adapters are not supported yet") as info:
        pipe.fold(bundle, tmp_path / "dora", "t")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------ sentence-transformers
def _st_model(base_dir: Path) -> object:
    """A sentence-transformers model (BERT + CLS pooling + Normalize) on a tiny BERT."""
    import transformers
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    transformers.BertModel(m.config_of("bert")).save_pretrained(base_dir / "hf")
    m.tokenizer(base_dir / "hf", chat=False)
    body = models.Transformer(str(base_dir / "hf"), max_seq_length=m.SEQ)
    return SentenceTransformer(
        modules=[body, models.Pooling(32, "cls"), models.Normalize()], device="cpu"
    )


def _st_save(model: object, directory: Path, *, legacy: bool) -> Path:
    """model.save (current layout: transformer at the root), or the legacy layout with
    the transformer module saved in 0_Transformer/ and modules.json pointing there."""
    import json

    model.save(str(directory))  # type: ignore[attr-defined]
    if legacy:
        model[0].save(str(directory / "0_Transformer"))  # type: ignore[index]
        for name in list(directory.iterdir()):
            keep = {
                "modules.json",
                "1_Pooling",
                "2_Normalize",
                "0_Transformer",
                "README.md",
                "config_sentence_transformers.json",
            }
            if name.name not in keep:
                name.unlink()
        modules = json.loads((directory / "modules.json").read_text())
        modules[0]["path"] = "0_Transformer"
        (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    return directory


def _st_train(model: object, seed: int) -> None:
    torch.manual_seed(seed)
    body = model[0].auto_model  # type: ignore[index]
    opt = torch.optim.AdamW(body.parameters(), lr=m.LR)
    for step in range(m.STEPS):
        batch = m.inputs("bert", 1000 * seed + step)
        target = torch.randn(m.BATCH, 32, generator=torch.Generator().manual_seed(step))
        out = model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})  # type: ignore[operator]
        loss = (out["sentence_embedding"] - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


SENTENCES = [" ".join(f"w{(7 * i + j) % 59 + 5}" for j in range(6)) for i in range(6)]


@pytest.mark.parametrize("legacy", [False, True], ids=["st-current", "st-legacy-0_Transformer"])
def test_sentence_transformers_round_trip(pipe: h.Pipeline, tmp_path: Path, legacy: bool) -> None:
    from sentence_transformers import SentenceTransformer

    name = "st-legacy" if legacy else "st-current"
    base_model = _st_model(tmp_path / "src")
    base_dir = _st_save(base_model, tmp_path / "base", legacy=legacy)
    pipe.ws.add_base(name, str(base_dir))
    tuned, wants = [], []
    for k in range(3):
        model = SentenceTransformer(str(base_dir), device="cpu")
        _st_train(model, seed=k + 1)
        tuned.append(_st_save(model, tmp_path / f"ft{k}", legacy=legacy))
        wants.append(torch.tensor(model.encode(SENTENCES)))

    one = pipe.bundle(f"{name}-one", name)
    pipe.fold(one, tuned[0], "t0")
    dest = pipe.materialize(one, "t0", tmp_path / "one-t0", master=True)
    got = SentenceTransformer(str(dest), device="cpu")
    assert [type(mod).__name__ for mod in got] == ["Transformer", "Pooling", "Normalize"]
    cos = torch.nn.functional.cosine_similarity(torch.tensor(got.encode(SENTENCES)), wants[0])
    assert float(cos.min()) >= 1 - 1e-5
    diff = float((torch.tensor(got.encode(SENTENCES)) - wants[0]).abs().max())
    entry = pipe.entry(one, "t0")
    assert entry.weights_dir == ("0_Transformer" if legacy else "")
    assert {"modules.json", "1_Pooling/config.json"} <= set(entry.files)
    # a pulled bundle materializes offline into the same layout
    from storage.pulled import PulledVersion

    pipe.ws.pull(one, None, tmp_path / "pulled", master=True)
    offline = PulledVersion(tmp_path / "pulled").materialize(
        "t0", tmp_path / "offline", master=True
    )
    emb = torch.tensor(SentenceTransformer(str(offline), device="cpu").encode(SENTENCES))
    assert float(torch.nn.functional.cosine_similarity(emb, wants[0]).min()) >= 1 - 1e-5

    three = pipe.bundle(f"{name}-three", name)
    for k, directory in enumerate(tuned):
        pipe.fold(three, directory, f"t{k}")
    cosines = []
    for k in range(3):
        dest = pipe.materialize(three, f"t{k}", tmp_path / f"three-t{k}", master=False)
        emb = torch.tensor(SentenceTransformer(str(dest), device="cpu").encode(SENTENCES))
        cosines.append(float(torch.nn.functional.cosine_similarity(emb, wants[k]).min()))
    case = m.Case(
        name,
        "bert",
        "SentenceTransformer",
        "SentenceTransformer",
        "same head class",
        "legacy 0_Transformer/" if legacy else "save()",
    )
    h.RESULTS.append(
        h.Result(
            case,
            diff,
            min(cosines),
            "min embedding cosine",
            h.describe(entry),
            [f"1-task cosine >= {float(cos.min()):.7f}"],
        )
    )
    assert min(cosines) >= 0.99
