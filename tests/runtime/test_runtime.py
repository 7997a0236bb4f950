"""BundleRuntime: tasks served from memory equal what materialize writes, bit for bit.

Bundles are tiny BERT and GPT-2 models made and saved by transformers (see hf_models),
folded through a real workspace (local store, SQLite registry) and pulled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from randes import kernels
from randes.errors import InvalidNameError
from storage.file_maps import LEND_MIN
from storage.pulled import PulledVersion, PulledVersionError
from storage.registry import TaskNotFoundError
from storage.runtime import BundleRuntime, BundleRuntimeError
from storage.runtime_readers import ResidentReader
from storage.runtime_sources import RuntimeSourceError
from tests.runtime.conftest import Served
from tests.runtime.hf_models import inputs


def _files(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_state_dict_is_what_materialize_writes_bit_for_bit(served: Served, ws, tmp_path) -> None:
    with (
        BundleRuntime.open(served.pulled) as pulled_rt,
        BundleRuntime.open("b", settings=served.settings) as ref_rt,
        BundleRuntime.open(served.pulled_master, master=True) as master_rt,
        BundleRuntime.open(served.pulled, base_resident=True) as resident_rt,
    ):
        assert pulled_rt.quantized and ref_rt.quantized and not master_rt.quantized
        assert pulled_rt.task_names == ref_rt.task_names == served.tasks
        for task in served.tasks:
            served_dir = ws.materialize("b", None, task, tmp_path / f"{task}-served")
            master_dir = ws.materialize("b", None, task, tmp_path / f"{task}-master", master=True)
            want = _files(served_dir)
            _assert_same(pulled_rt.state_dict(task), want)
            _assert_same(ref_rt.state_dict(task), want)
            _assert_same(resident_rt.state_dict(task), want)
            _assert_same(master_rt.state_dict(task), _files(master_dir))
            # the offline materialize of the pulled directory agrees too
            offline = PulledVersion(served.pulled).materialize(task, tmp_path / f"{task}-offline")
            _assert_same(pulled_rt.state_dict(task), _files(offline))


def test_tasks_report_seed_lambda_and_config(served: Served, ws) -> None:
    _, manifest = ws.resolve("b")
    with BundleRuntime.open(served.pulled) as rt:
        for info, entry in zip(rt.tasks, manifest.tasks, strict=True):
            assert (info.name, info.seed) == (entry.name, entry.seed)
            with ws.open_task(manifest, entry.name) as opened:
                assert info.scale == ws.task_scale(manifest, entry, opened.base)
            assert info.config is not None and info.config["architectures"][0].endswith(
                "ForSequenceClassification"
            )
        # held on the CPU: with the fused kernel nothing before a task is computed (base
        # and quantized codes are read slot by slot from their verified files: the page
        # cache), then only tensors under LEND_MIN; the quantized superposition with
        # the torch path; no private tensor of any task
        base_bytes = sum(r.size for r in PulledVersion(served.pulled).base.shards)
        serving_bytes = sum(r.size for r in manifest.serving.shards)
        assert serving_bytes < base_bytes / 2
        if kernels.available():
            assert rt.resident_bytes == 0
        else:
            assert 0 < rt.resident_bytes <= serving_bytes  # payload, no headers
        assert rt._private == {}  # nothing read for any task yet
        if kernels.available():
            rt.state_dict(rt.tasks[0].name)
            small = [m for m in rt.base.metas().values() if m.nbytes < LEND_MIN]
            assert 0 < rt.base.nbytes <= sum(m.nbytes for m in small)  # those the task uses
    with BundleRuntime.open(served.pulled, base_resident=True) as rt:
        assert rt.resident_bytes > 0.9 * base_bytes


def test_model_equals_from_pretrained_of_the_materialized_directory(
    served: Served, ws, tmp_path
) -> None:
    import transformers

    batch = inputs(7)
    with BundleRuntime.open(served.pulled) as rt:
        for task in served.tasks:
            model = rt.model(task)
            assert not model.training
            directory = ws.materialize("b", None, task, tmp_path / task)
            cls = getattr(transformers, rt.info(task).config["architectures"][0])
            loaded = cls.from_pretrained(directory).eval()
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, loaded(**batch).logits), task


@pytest.mark.parametrize("resident", [False, True], ids=["page-cache-base", "resident-base"])
def test_switch_in_place_equals_a_fresh_model_and_accumulates_no_drift(
    served: Served, resident: bool
) -> None:
    # tasks t1 and t3 have the same head shape (3 labels), t2 has 2
    batch = inputs(11)
    with BundleRuntime.open(served.pulled, base_resident=resident) as rt:
        model = rt.model("t1")
        params = {n: p.data_ptr() for n, p in model.named_parameters()}
        for task in ["t3", "t1", "t3", "t1", "t3"]:
            assert rt.switch(model, task) is model
            assert rt.task_of(model) == task
        # same storage: switched in place, nothing reallocated
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
        fresh = rt.model("t3")
        _assert_same(model.state_dict(), fresh.state_dict())
        _assert_same(dict(model.state_dict()), rt.state_dict("t3") | _buffers(model, rt, "t3"))
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def _buffers(model: torch.nn.Module, rt: BundleRuntime, task: str) -> dict[str, torch.Tensor]:
    """State entries of the module that the task does not set (tied aliases)."""
    names = set(rt.state_dict(task))
    return {k: v for k, v in model.state_dict().items() if k not in names}


def test_switch_refuses_a_module_of_another_shape_before_touching_it(served: Served) -> None:
    with BundleRuntime.open(served.pulled) as rt:
        model = rt.model("t1")  # 3 labels; t2 has 2
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(BundleRuntimeError, match="the module holds torch.float32\\[3"):
            rt.switch(model, "t2")
        _assert_same(dict(model.state_dict()), before)
        assert rt.task_of(model) == "t1"
        with pytest.raises(BundleRuntimeError, match="the module lacks"):
            rt.switch(torch.nn.Linear(2, 2), "t1")
        with pytest.raises(TaskNotFoundError):
            rt.state_dict("nope")


def test_bad_sources_are_one_clear_error(served: Served, tmp_path: Path) -> None:
    with pytest.raises(PulledVersionError, match="not a pulled bundle version"):
        BundleRuntime.open(tmp_path)
    with pytest.raises(RuntimeSourceError, match="not a directory written by"):
        BundleRuntime.open(str(tmp_path / "missing" / "dir"))
    with pytest.raises(InvalidNameError):
        BundleRuntime.open("bad name!", settings=served.settings)
    with pytest.raises(PulledVersionError, match="master superposition was not pulled"):
        BundleRuntime.open(served.pulled, master=True)
    if not torch.cuda.is_available():
        with pytest.raises(BundleRuntimeError, match="CUDA is not available"):
            BundleRuntime.open(served.pulled, device="cuda")


def test_rank1_flip_bundle_serves_superposed_norms_and_biases(served_flip: Served, tmp_path):
    with served_flip.workspace() as ws, BundleRuntime.open(served_flip.pulled) as rt:
        for task in served_flip.tasks:
            want = _files(ws.materialize("b", None, task, tmp_path / task))
            _assert_same(rt.state_dict(task), want)
        model = rt.model("t1")
        rt.switch(model, "t3")
        _assert_same(
            rt.state_dict("t3"),
            {k: v for k, v in model.state_dict().items() if k in rt.state_dict("t3")},
        )


def test_switching_never_writes_the_resident_base_or_superposition(served: Served) -> None:
    """A switch computes each tensor in the module's storage (the base tensor is lent for
    that one read): the resident tensors themselves must stay what was pulled."""
    pulled = PulledVersion(served.pulled)
    with BundleRuntime.open(served.pulled, base_resident=True) as rt:
        base_files = [pulled.verified(r) for r in pulled.base.shards]
        want = {}
        for path in base_files:
            want |= load_file(str(path))
        # the quantized copy is resident on the torch path; with the fused kernel it is
        # read slot by slot from its files (then nothing resident to overwrite)
        resident = isinstance(rt._stored, ResidentReader)
        stored = {n: rt._stored.get(n).clone() for n in rt._stored.keys()}  # noqa: SIM118
        model = rt.model("t1")
        for task in ["t3", "t1", "t3"]:
            rt.switch(model, task)
        rt.state_dict("t2")
        _assert_same({n: rt.base.view(n) for n in rt.base}, want)
        after = rt._stored.view if resident else rt._stored.get
        _assert_same({n: after(n) for n in rt._stored.keys()}, stored)  # noqa: SIM118


def test_a_version_reference_serves_that_version(served: Served, ws, tmp_path) -> None:
    with BundleRuntime.open("b@1", settings=served.settings) as rt:
        assert rt.manifest.version == 1 and rt.task_names == ["t1"]
        want = _files(ws.materialize("b", "1", "t1", tmp_path / "v1"))
        _assert_same(rt.state_dict("t1"), want)
    with pytest.raises(RuntimeSourceError, match="empty version or alias"):
        BundleRuntime.open("b@", settings=served.settings)


def test_bf16_fine_tunes_over_an_fp32_base_are_served_in_their_own_dtype(tmp_path: Path) -> None:
    """The usual LLM case: the task's dtype is restored by retrieval, so the runtime
    serves (and builds, and switches) it in bf16, equal to materialize."""
    import transformers

    from randes.config import TransformConfig
    from storage.settings import Settings
    from storage.workspace import Workspace
    from tests.runtime.hf_models import make_models

    models = make_models(tmp_path / "models", "gpt2", tasks=3)
    for task in ("t1", "t3"):
        cls = transformers.GPT2ForSequenceClassification
        cls.from_pretrained(models[task]).to(torch.bfloat16).save_pretrained(models[task])
    settings = Settings(home=tmp_path / "home")
    with Workspace(settings) as ws:
        ws.init()
        ws.add_base("base", str(models["base"]))
        ws.create_bundle("b", "base", TransformConfig())
        for task in ("t1", "t3"):
            ws.fold("b", str(models[task]), task)
        with BundleRuntime.open("b", settings=settings) as rt:
            for task in ("t1", "t3"):
                want = _files(ws.materialize("b", None, task, tmp_path / task))
                assert {t.dtype for t in want.values() if t.is_floating_point()} == {torch.bfloat16}
                _assert_same(rt.state_dict(task), want)
            model = rt.model("t1")
            assert next(model.parameters()).dtype == torch.bfloat16
            rt.switch(model, "t3")
            _assert_same(
                {k: v for k, v in model.state_dict().items() if k in want}, rt.state_dict("t3")
            )


@pytest.mark.parametrize("fixture", ["served_elementwise", "served_flip"])
@pytest.mark.parametrize("resident", [False, True], ids=["mapped-base", "resident-base"])
def test_fused_kernel_serves_the_torch_paths_bits(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fixture: str, resident: bool
) -> None:
    """The CPU runtime computes tensors with the fused kernel (randes.kernels) from the
    base's mapped pages; the eager torch path (RANDES_NO_KERNELS=1) is the reference:
    state dicts and switched modules agree bit for bit."""
    from randes import kernels

    if not kernels.available():
        pytest.skip("numba is not importable")
    served = request.getfixturevalue(fixture)
    monkeypatch.setenv("RANDES_NO_KERNELS", "1")
    with BundleRuntime.open(served.pulled, base_resident=resident) as rt:
        want = {task: rt.state_dict(task) for task in served.tasks}
    monkeypatch.delenv("RANDES_NO_KERNELS")
    with BundleRuntime.open(served.pulled, base_resident=resident) as rt:
        assert rt.plan("t1")._fused
        model = rt.model("t1")
        for task in served.tasks:
            _assert_same(rt.state_dict(task), want[task])
        for task in ["t3", "t1", "t3"]:
            rt.switch(model, task)
            got = model.state_dict()
            _assert_same({n: got[n] for n in want[task]}, want[task])


def test_switches_reuse_the_sign_streams_drawn_ahead(
    served_elementwise: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The elementwise sign streams a helper thread draws ahead are lent from the
    runtime's pool and given back: after the first switch, the next ones allocate none
    (no fresh pages per tensor, every switch), and what they compute is unchanged."""
    if not kernels.available():
        pytest.skip("numba is not importable")
    monkeypatch.setattr("randes.retrieve.SIGNS_AHEAD_MIN", 0)  # tiny tensors drawn ahead too
    # the plan's own path: a compiled switch (randes.switch_program) draws no streams
    monkeypatch.setattr("storage.runtime.SwitchProgram.build", lambda *a, **k: None)
    with BundleRuntime.open(served_elementwise.pulled) as rt:
        model = rt.model("t1")
        rt.switch(model, "t3")
        pool = rt._buffers.streams
        held = pool.nbytes
        assert held > 0  # the streams came from the pool and went back to it
        for task in ["t1", "t3", "t1"]:
            rt.switch(model, task)
            assert pool.nbytes == held
        got = model.state_dict()
        want = rt.state_dict("t1")
        _assert_same({n: got[n] for n in want}, want)
