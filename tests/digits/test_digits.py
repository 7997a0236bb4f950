"""Fast checks of the digits testbed (flows.digits): names, saved dirs, evaluator.

Training runs with tiny step counts: these tests check plumbing and that training
learns at all, not the benchmark's quality numbers (benchmarks/quality.py does that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.digits import (
    TASKS,
    DigitsConfig,
    DigitsViT,
    Recipe,
    build_models,
    evaluate,
    load_pretrained,
    pretrain,
)
from flows.digits.model import CONFIG_FILE, WEIGHTS_FILE

TINY = Recipe(pretrain_steps=80, probe_steps=20, finetune_steps=20, pretrain_lr=3e-3)


def test_state_dict_follows_gpt2_naming() -> None:
    cfg = DigitsConfig(n_layer=2, num_classes=10)
    names = set(DigitsViT(cfg).state_dict())
    for i in range(cfg.n_layer):
        for part in (
            "ln_1.weight",
            "ln_1.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "ln_2.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ):
            assert f"h.{i}.{part}" in names
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "head.weight"} <= names
    headless = DigitsViT(DigitsConfig(n_layer=2)).state_dict()
    assert not any(k.startswith("head.") for k in headless)
    # Layer shuffling needs every h.{i} tensor to have the same shape across layers.
    assert headless["h.0.mlp.c_fc.weight"].shape == headless["h.1.mlp.c_fc.weight"].shape
    assert all(v.dtype == torch.float32 for v in headless.values())


def test_pretraining_is_deterministic_whatever_the_thread_count() -> None:
    recipe = Recipe(pretrain_steps=3)
    a = pretrain(recipe).state_dict()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        b = pretrain(recipe).state_dict()
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("digits")
    return build_models(out, ["digit", "parity"], TINY)


def test_build_writes_loadable_hf_dirs(built: tuple[Path, dict[str, Path]]) -> None:
    base_dir, task_dirs = built
    assert set(task_dirs) == {"digit", "parity"}
    base = load_file(str(base_dir / WEIGHTS_FILE))
    assert "head.weight" not in base  # the base has no task head
    assert json.loads((base_dir / CONFIG_FILE).read_text())["num_classes"] is None
    for task, tdir in task_dirs.items():
        tensors = load_file(str(tdir / WEIGHTS_FILE))
        assert set(tensors) == set(base) | {"head.weight", "head.bias"}
        assert tensors["head.weight"].shape[0] == TASKS[task].num_classes
        assert all(tensors[k].shape == base[k].shape for k in base)
        assert load_pretrained(tdir).cfg.task == task
        # fine-tuning moved the backbone, but only a little
        num = sum(float((tensors[k] - base[k]).norm() ** 2) for k in base)
        den = sum(float(base[k].norm() ** 2) for k in base)
        assert 0 < (num / den) ** 0.5 < 0.2


def test_reuse_is_per_task_and_a_new_base_drops_stale_fine_tunes(tmp_path: Path) -> None:
    tiny = Recipe(pretrain_steps=4, probe_steps=2, finetune_steps=2)
    _, dirs = build_models(tmp_path, ["digit"], tiny)
    digit = dirs["digit"] / WEIGHTS_FILE
    before = digit.stat().st_mtime_ns
    _, dirs = build_models(tmp_path, ["digit", "parity"], tiny)
    assert digit.stat().st_mtime_ns == before  # reused
    assert (dirs["parity"] / WEIGHTS_FILE).exists()  # trained: not in the stamp before
    build_models(tmp_path, ["digit"], Recipe(pretrain_steps=5, probe_steps=2, finetune_steps=2))
    assert digit.stat().st_mtime_ns != before  # new base, new fine-tune
    assert not (tmp_path / "tasks" / "parity").exists()  # fine-tune of the old base: gone


def test_evaluator_accuracy(built: tuple[Path, dict[str, Path]]) -> None:
    base_dir, task_dirs = built
    for task, chance in (("digit", 0.1), ("parity", 0.5)):
        sd = load_file(str(task_dirs[task] / WEIGHTS_FILE))
        acc = evaluate(sd, task)["accuracy"]
        assert 0.0 <= acc <= 1.0
        assert acc > chance + 0.15, (task, acc)
    with pytest.raises(ValueError, match="head"):
        evaluate(load_file(str(base_dir / WEIGHTS_FILE)), "digit")
    with pytest.raises(ValueError, match="classes"):
        evaluate(load_file(str(task_dirs["parity"] / WEIGHTS_FILE)), "digit")
