"""Bad checkpoints and bad names are refused before anything is written.

Every case drives the real command line (`flows.cli.main`, in-process, on the embedded
default: local store + SQLite) against a bundle that already holds one task, and holds
the refusal to the contract of DESIGN.md:

- a non-zero exit status;
- stderr is exactly one line, starting ``error:``, short, with no control character
  (a hostile name or path is quoted escaped, never sent raw to the terminal);
- no ``Traceback`` anywhere;
- the registry is unchanged, every row of every table (versions, tasks, the ingestion
  ledger, object references, leases...);
- the store holds exactly the same objects (no orphan, no temp file) and no work
  directory is left behind.

A few cases run the installed ``randes`` script in a subprocess as well, to cover the
real entry point (``entry()``), and pickle checkpoints carry a payload that would
create a marker file if they were ever unpickled.

Same checkpoint twice: under the SAME task name it is a no-op with exit 0 (a retried
command or ingest run is harmless: DESIGN's "folding the same checkpoint twice must be
a no-op"); under ANOTHER task name it is refused (exit 1, one line naming the task that
holds it), because the bundle cannot hold one delta twice and exit 0 would tell a
script that a task exists which does not. Either way nothing changes.

The models are saved by transformers' ``save_pretrained``: a tiny bare GPT2Model as the
base, sequence classifiers trained two steps from it (backbone under ``transformer.``,
head ``score``). A malformed file is made by hand from a real save (its
model.safetensors truncated, its header rewritten...); a NaN or an Inf is written into
the model before ``save_pretrained`` saves it, as a diverged training run would; the
wrong base is another, wider GPT-2's fine-tune; the IA3 adapter is peft's.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_run import Result, cli
from tests.hf_models import save_base, save_finetune, save_state, set_weight
from tests.reliability.test_data_loss import snapshot_registry_and_store

BUNDLE = "b"
BASE = "tiny"
MAX_ERROR_LINE = 300
RANDES = Path(sys.executable).parent / "randes"
PAST_EOF = 200_000  # a header length past the end of beta's ~115 KB model.safetensors


# ----------------------------------------------------------------- the world
@dataclass
class World:
    root: Path
    home: Path
    base: Path
    alpha: Path  # folded as task "alpha" in version 1
    beta: Path  # a fine-tune not folded yet
    marker: Path  # created if a pickle payload ever runs

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def work(self) -> Path:
        return self.home / "cache" / "work"

    def models(self, name: str) -> Path:
        path = self.root / "bad" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.beta / "model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("bad-input")
    mp = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        mp.delenv(name)
    home = root / "home"
    mp.setenv("RANDES_HOME", str(home))
    try:
        base = save_base(root / "models" / "base", "gpt2")
        world = World(
            root=root,
            home=home,
            base=base,
            alpha=save_finetune(base, root / "models" / "alpha", 1),
            beta=save_finetune(base, root / "models" / "beta", 2),
            marker=root / "PICKLE-PAYLOAD-RAN",
        )
        for argv in (
            ["init"],
            ["base", "add", BASE, str(base)],
            ["bundle", "create", BUNDLE, "--base", BASE, "--rank1", "flip"],
            ["fold", BUNDLE, str(world.alpha), "--task", "alpha"],
        ):
            result = cli(*argv)
            assert result.code == 0, (argv, result)
        yield world
    finally:
        mp.undo()


def snapshot(world: World) -> dict[str, Any]:
    """Everything a refusal must leave as it was: registry rows, store objects, work dirs."""
    work = sorted(p.name for p in world.work.iterdir()) if world.work.exists() else []
    return {**snapshot_registry_and_store(world.home), "work": work}


def assert_refused(result: Result, *needles: str, code: int | None = None) -> str:
    """The one-line error contract; returns the line."""
    assert result.code != 0, result
    if code is not None:
        assert result.code == code, result
    assert "Traceback" not in result.out + result.err, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and result.err.endswith("\n"), result
    line = lines[0]
    assert line.startswith("error: "), result
    assert len(line) <= MAX_ERROR_LINE, (len(line), line)
    assert all(ch.isprintable() for ch in line), repr(line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    """Assert after the test that the registry, store and work dirs did not change."""
    before = snapshot(world)
    assert before["tables"]["bundle_versions"], "the world has its version 1"
    yield
    after = snapshot(world)
    assert after == before
    assert not world.marker.exists(), "a pickle payload ran"


# ------------------------------------------------------------ bad checkpoints
class _Payload:
    """Unpickling this creates the marker file (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _pickle(world: World, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weight": _Payload(world.marker)}))
    return path


def _safetensors_bytes(world: World) -> bytes:
    return (world.beta / "model.safetensors").read_bytes()


def _header_len(blob: bytes) -> int:
    return int(struct.unpack("<Q", blob[:8])[0])


def _dir_with(world: World, name: str, blob: bytes) -> Path:
    directory = world.models(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(blob)
    return directory


def _modified(world: World, name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """beta's saved tensors changed by hand, written next to its config.json."""
    state = world.state()
    change(state)
    return save_state(world.models(name), state, like=world.beta)


def _diverged(world: World, name: str, key: str, index: tuple[int, ...], value: float) -> Path:
    """beta's training run (same seed) with ``value`` (a NaN, an Inf) written into
    parameter ``key`` at ``index``, then saved by ``save_pretrained``."""
    return save_finetune(world.base, world.models(name), 2, edit=set_weight(key, index, value))


def _case_pickle_bin(w: World) -> Path:
    return _pickle(w, w.models("bin") / "pytorch_model.bin")


def _case_pickle_pt(w: World) -> Path:
    return _pickle(w, w.models("pt") / "model.pt")


def _case_pickle_only_dir(w: World) -> Path:
    directory = w.models("pickle-dir")
    _pickle(w, directory / "pytorch_model.bin")
    (directory / "config.json").write_text("{}")
    return directory


def _case_pickle_renamed_safetensors(w: World) -> Path:
    """A pickle renamed model.safetensors: parsed as a header (absurd), never unpickled."""
    directory = w.models("pickle-renamed")
    _pickle(w, directory / "model.safetensors")
    return directory


def _case_truncated_data(w: World) -> Path:
    blob = _safetensors_bytes(w)
    return _dir_with(w, "truncated-data", blob[: len(blob) * 3 // 5])


def _case_truncated_header(w: World) -> Path:
    blob = _safetensors_bytes(w)
    return _dir_with(w, "truncated-header", blob[: 8 + _header_len(blob) // 2])


def _case_corrupt_header_json(w: World) -> Path:
    blob = bytearray(_safetensors_bytes(w))
    blob[8 + _header_len(bytes(blob)) // 2] = ord("\x01")
    return _dir_with(w, "corrupt-json", bytes(blob))


def _case_corrupt_offsets(w: World) -> Path:
    """Valid JSON whose offsets overlap: the data region is not tiled."""
    blob = _safetensors_bytes(w)
    n = _header_len(blob)
    header = json.loads(blob[8 : 8 + n])
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    second = spans[1][1]  # slides 4 bytes back, over the end of the first tensor
    header[second]["data_offsets"] = [o - 4 for o in header[second]["data_offsets"]]
    raw = json.dumps(header).encode()
    return _dir_with(w, "corrupt-offsets", struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _case_garbage(w: World) -> Path:
    return _dir_with(w, "garbage", os.urandom(4096))


def _case_header_length(value: int) -> Callable[[World], Path]:
    def build(w: World) -> Path:
        blob = _safetensors_bytes(w)
        if value == PAST_EOF:  # the claim of that case: the length points past the file
            assert value > len(blob), len(blob)
        return _dir_with(w, f"length-{value}", struct.pack("<Q", value) + blob[8:])

    return build


def _case_nan(w: World) -> Path:
    return _diverged(w, "nan", "transformer.h.0.mlp.c_fc.weight", (1, 2), float("nan"))


def _case_inf_rank1(w: World) -> Path:
    return _diverged(w, "inf-rank1", "transformer.ln_f.weight", (3,), float("inf"))


def _case_neg_inf_head(w: World) -> Path:
    return _diverged(w, "neg-inf-head", "score.weight", (0, 0), float("-inf"))


def _case_wrong_base(w: World) -> Path:
    """Another model's checkpoint: a fine-tune of a wider GPT-2 (48 wide, not 32), so no
    tensor has the base's shape."""
    other = save_base(w.models("wider-base"), "gpt2", n_embd=48)
    return save_finetune(other, w.models("wrong-base"), 2)


def _case_most_missing(w: World) -> Path:
    def change(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if not n.startswith("score.")]:
            del state[name]

    return _modified(w, "missing", change)


def _case_unsupported_adapter(w: World) -> Path:
    """An IA3 adapter of the base, saved by peft (adapter_config.json says ``IA3``)."""
    import transformers
    from peft import IA3Config, get_peft_model

    directory = w.models("ia3")
    model = transformers.GPT2Model.from_pretrained(w.base)
    config = IA3Config(
        target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True,  # GPT-2's Conv1D weights are stored in x out
    )
    with warnings.catch_warnings():  # peft calls transformers' deprecated
        warnings.simplefilter("ignore", FutureWarning)  # is_gradient_checkpointing
        get_peft_model(model, config).save_pretrained(directory)
    assert (directory / "adapter_model.safetensors").is_file()
    return directory


def _case_empty_dir(w: World) -> Path:
    directory = w.models("empty")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _case_nonexistent(w: World) -> Path:
    return w.models("does-not-exist")


def _case_name_too_long(w: World) -> Path:
    return w.models("x" * 300)


def _case_control_chars_in_path(w: World) -> Path:
    return w.models("evil\x1b[2J\x07name")


def _case_not_safetensors(w: World) -> Path:
    path = w.models("weights.npz")
    path.write_bytes(b"PK\x03\x04")
    return path


def _case_index_missing_shard(w: World) -> Path:
    directory = w.models("index-missing")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model-00001-of-00002.safetensors").write_bytes(_safetensors_bytes(w))
    weight_map = {"transformer.wte.weight": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _case_index_escapes(w: World) -> Path:
    directory = w.models("index-escape")
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {"transformer.wte.weight": "../beta/model.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


CHECKPOINT_CASES: dict[str, tuple[Callable[[World], Path], str]] = {
    "pickle-bin-file": (_case_pickle_bin, "pickle"),
    "pickle-pt-file": (_case_pickle_pt, "pickle"),
    "pickle-only-dir": (_case_pickle_only_dir, "pickle"),
    "pickle-renamed-safetensors": (_case_pickle_renamed_safetensors, "absurd"),
    "truncated-in-data": (_case_truncated_data, "corrupt safetensors header"),
    "truncated-in-header": (_case_truncated_header, "header"),
    "corrupt-header-json": (_case_corrupt_header_json, "malformed JSON"),
    "corrupt-overlapping-offsets": (_case_corrupt_offsets, "overlaps"),
    "random-garbage": (_case_garbage, "header"),
    "header-length-2**60": (_case_header_length(2**60), "absurd safetensors header length"),
    "header-length-2**64-1": (_case_header_length(2**64 - 1), "absurd"),
    "header-length-past-eof": (_case_header_length(PAST_EOF), "absurd"),
    "header-length-zero": (_case_header_length(0), "malformed JSON"),
    "nan-in-superposed-weight": (_case_nan, "NaN or Inf"),
    "inf-in-rank1-tensor": (_case_inf_rank1, "NaN or Inf"),
    "neg-inf-in-private-head": (_case_neg_inf_head, "NaN or Inf"),
    "wrong-base": (_case_wrong_base, "matches only"),
    "most-tensors-missing": (_case_most_missing, "score.weight"),
    "unsupported-adapter": (_case_unsupported_adapter, "'IA3' is not supported yet"),
    "empty-directory": (_case_empty_dir, "no safetensors"),
    "nonexistent-path": (_case_nonexistent, "no such file"),
    "path-name-too-long": (_case_name_too_long, "too long"),
    "control-chars-in-path": (_case_control_chars_in_path, "\\x1b"),
    "not-safetensors": (_case_not_safetensors, "not a .safetensors"),
    "index-missing-shard": (_case_index_missing_shard, "missing"),
    "index-shard-escapes-dir": (_case_index_escapes, "bad shard name"),
}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused(world: World, case: str) -> None:
    build, needle = CHECKPOINT_CASES[case]
    source = build(world)
    result = cli("fold", BUNDLE, str(source), "--task", "newtask")
    assert_refused(result, needle, code=1)


# ------------------------------------------------------------------ bad names
BAD_TASK_NAMES = {
    "dotdot-slash": "../x",
    "slash": "/",
    "absolute": "/etc/passwd",
    "nested": "a/b",
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "nul": "x\x00y",
    "newline": "a\nb",
    "trailing-newline": "task\n",
    "escape-sequence": "\x1b[31mred",
    "tab": "a\tb",
    "rtl-override": "abc\u202edef",
    "unicode-line-separator": "a\u2028b",
    "backslash": "a\\b",
    "leading-dash": "-rf",
    "too-long": "x" * 129,
    "fullwidth": "\uff21\uff22",
    "space": "a b",
}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("name", list(BAD_TASK_NAMES))
def test_task_name_that_could_escape_is_refused(world: World, name: str) -> None:
    result = cli("fold", BUNDLE, str(world.beta), f"--task={BAD_TASK_NAMES[name]}")
    assert_refused(result, "invalid task name", code=1)


@pytest.mark.usefixtures("unchanged")
def test_duplicate_task_name_is_refused(world: World) -> None:
    """Another checkpoint under a name the bundle already holds."""
    result = cli("fold", BUNDLE, str(world.beta), "--task", "alpha")
    assert_refused(result, "already has a task 'alpha'", code=1)


@pytest.mark.usefixtures("unchanged")
def test_same_checkpoint_under_a_second_task_name_is_refused(world: World) -> None:
    result = cli("fold", BUNDLE, str(world.alpha), "--task", "alpha-again")
    line = assert_refused(result, "as task 'alpha'", code=1)
    assert "version 1" in line and "'alpha-again'" in line


@pytest.mark.usefixtures("unchanged")
def test_same_checkpoint_under_the_same_name_is_a_no_op(world: World) -> None:
    """What a retried command or a second scheduled ingest does: exit 0, nothing written."""
    result = cli("fold", BUNDLE, str(world.alpha), "--task", "alpha")
    assert result.code == 0 and result.err == "", result
    assert "already folded as task 'alpha' in version 1: nothing to do" in result.out


@pytest.mark.usefixtures("unchanged")
def test_a_copy_of_the_checkpoint_elsewhere_is_the_same_checkpoint(world: World) -> None:
    """The ledger goes by content: the same bytes at another path are recognised."""
    copy = world.models("alpha-copy")
    copy.mkdir(parents=True, exist_ok=True)
    for item in world.alpha.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    assert cli("fold", BUNDLE, str(copy), "--task", "alpha").code == 0
    assert_refused(cli("fold", BUNDLE, str(copy), "--task", "other"), "as task 'alpha'")


# ------------------------------------------------------ bad command lines
@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "argv",
    [
        ["fold", BUNDLE, "{beta}"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--scale", "nan"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--scale", "-1"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--scale", "0"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--scale", "inf"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--scale", "lots"],
        ["fold", BUNDLE, "{beta}", "--task", "t", "--unknown"],
        ["materialize", BUNDLE, "alpha", "{out}", "--scale", "nan"],
        ["bundle", "create", "c", "--base", BASE, "--gate", "nan"],
        ["bundle", "create", "c", "--base", BASE, "--scale", "-2"],
        ["bundle", "create", "c", "--base", BASE, "--rank1", "sideways"],
        ["no-such-command"],
    ],
    ids=[
        "missing-task",
        "scale-nan",
        "scale-negative",
        "scale-zero",
        "scale-inf",
        "scale-not-a-number",
        "unknown-option",
        "materialize-scale-nan",
        "gate-nan",
        "bundle-scale-negative",
        "bad-enum",
        "unknown-command",
    ],
)
def test_bad_command_line_is_one_line(world: World, argv: list[str]) -> None:
    """Usage errors keep the contract too (exit 2, like click's usage errors)."""
    args = [a.format(beta=world.beta, out=world.root / "never") for a in argv]
    assert_refused(cli(*args), code=2)
    assert not (world.root / "never").exists()


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fold", "nobundle", "{beta}", "--task", "t"], "does not exist"),
        (["fold", "../b", "{beta}", "--task", "t"], "does not exist"),
        (["fold", BUNDLE, "ftp://host/x", "--task", "t"], "unsupported source"),
        (["fold", BUNDLE, "hf://../../x", "--task", "t"], "invalid Hugging Face source"),
        (["fold", BUNDLE, "s3://", "--task", "t"], "invalid S3 source"),
        (["materialize", f"{BUNDLE}@nope", "alpha", "{out}"], "no alias 'nope'"),
        (["materialize", BUNDLE, "nosuchtask", "{out}"], "no task 'nosuchtask'"),
        (["pull", f"{BUNDLE}@99", "{out}"], "no version 99"),
        (["remove", BUNDLE, "nosuchtask"], "no task 'nosuchtask'"),
        (["publish", BUNDLE, "--version", "1", "--alias", "7"], ""),
        (["base", "add", "../evil", "{beta}"], "invalid base name"),
        (["bundle", "create", "a/b", "--base", BASE], "invalid bundle name"),
    ],
)
def test_other_refusals_are_one_line(world: World, argv: list[str], needle: str) -> None:
    args = [a.format(beta=world.beta, out=world.root / "never") for a in argv]
    assert_refused(cli(*args), needle, code=1)
    assert not (world.root / "never").exists()


# ----------------------------------------------------- the installed script
@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("case", "code"),
    [("pickle-only-dir", 1), ("header-length-2**60", 1), ("nan-in-superposed-weight", 1)],
)
def test_installed_script_refuses_with_one_line(world: World, case: str, code: int) -> None:
    source = CHECKPOINT_CASES[case][0](world)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDES_")}
    env["RANDES_HOME"] = str(world.home)
    proc = subprocess.run(
        [str(RANDES), "fold", BUNDLE, str(source), "--task", "newtask"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_refused(Result(proc.returncode, proc.stdout, proc.stderr), code=code)


def test_installed_script_usage_errors_are_one_line(world: World) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDES_")}
    env["RANDES_HOME"] = str(world.home)
    proc = subprocess.run(
        [str(RANDES), "fold", BUNDLE, str(world.beta)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_refused(Result(proc.returncode, proc.stdout, proc.stderr), "--task", code=2)
    bare = subprocess.run([str(RANDES)], capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare
    assert "Usage" in bare.stdout + bare.stderr  # `randes` alone shows the help


# ------------------------------------------------------------- the ingest flow
@pytest.mark.usefixtures("unchanged")
def test_ingest_of_a_bad_checkpoint_is_one_line(world: World) -> None:
    """`randes ingest` runs a Prefect flow: its console log (a traceback per failed task
    run, the temporary server's start and stop) stays off stderr, so the refusal is one
    line there too, and nothing is folded."""
    incoming = world.models("incoming")
    _diverged(world, "incoming/nan", "transformer.h.0.mlp.c_fc.weight", (0, 0), float("nan"))
    result = cli("ingest", BUNDLE, str(incoming), "--no-validate")
    assert_refused(result, "NaN or Inf", code=1)
