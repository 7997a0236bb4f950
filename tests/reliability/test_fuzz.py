"""Property-based fuzzing of the parsers of untrusted input (hypothesis).

Checkpoints come from outside (a customer's upload, a hub download) and manifests from
a store that may be damaged, so every parser of their bytes must fail only with the
project's own error (`RandesError`: one line, no traceback at the command line) and
must never size an allocation by a number the input chose. Fed to them here:

- random bytes as a safetensors file, and as a bundle / base manifest;
- structured safetensors headers with hostile values: unknown dtypes, negative, huge
  or non-integer dims, offsets out of range, overlapping or gapped, nested objects,
  lying header length fields, 2**60-byte claims;
- valid files (every dtype the reader knows) mutated: bit flips, truncations,
  insertions, the length field rewritten; whatever still parses must read back tensor
  by tensor with the declared shapes, and its tensors never add up to more bytes than
  the file holds (that bound is what keeps every allocation in check);
- Hugging Face index files (``model.safetensors.index.json``) with hostile shard names;
- valid manifests mutated at a random place of their JSON tree, or byte-flipped;
  whatever still loads must dump and load back equal.

Plus deterministic allocation checks (tracemalloc): a header claiming 2**60 bytes, a
shape of thousands of huge dimensions, a zero-size tensor whose other dims overflow
torch's strides.

Runs are derandomized (a fixed seed sequence, no example database), so CI sees the same
examples every time; ``max_examples`` is sized to keep the file well under a minute.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from randes.checkpoint import DTYPES, CheckpointReader, dtype_size, read_header
from randes.checkpoint_files import INDEX_FILE
from randes.config import TransformConfig
from randes.errors import CorruptCheckpointError, ManifestError, RandesError
from randes.header import MAX_ELEMENTS
from randes.manifest import (
    BaseManifest,
    BaseRef,
    BundleManifest,
    KeyMap,
    ShardRef,
    TaskEntry,
    dump_manifest,
    load_base_manifest,
    load_bundle_manifest,
)

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=200)

MB = 1024 * 1024


# ----------------------------------------------------------------- scaffolding
@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for the whole module: each example overwrites its files."""
    root = Path(tempfile.mkdtemp(prefix="randes-fuzz-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _only_randes_errors(action: Callable[[], Any]) -> Any:
    """Run ``action``; a RandesError is a correct refusal, anything else fails the test."""
    try:
        return action()
    except RandesError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return None


def _read_everything(path: Path) -> None:
    """Open a checkpoint and read every tensor; check what the header promised."""
    with CheckpointReader.open(path) as reader:
        files = reader.files
        total = 0
        for name in reader:
            meta = reader.meta(name)
            tensor = reader.get(name)
            assert tuple(tensor.shape) == meta.shape and tensor.dtype == meta.dtype
            total += meta.nbytes
        # Every allocation `get` makes is one tensor's validated byte count: together
        # they never exceed the bytes actually on disk.
        assert total <= sum(f.stat().st_size for f in files)


def _file(scratch: Path, blob: bytes, name: str = "model.safetensors") -> Path:
    path = scratch / name
    path.write_bytes(blob)
    return path


def _pack(header: Any, data: bytes, *, length: int | None = None, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode("utf-8") + b" " * pad
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + data


# ------------------------------------------------------------------ strategies
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

HUGE = st.sampled_from([2**31, 2**32, 2**53, 2**60, 2**62, 2**63, 2**64, 2**100, MAX_ELEMENTS + 1])
DIM = (
    st.integers(min_value=-3, max_value=12)
    | HUGE
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
)
OFFSET = st.integers(min_value=-4, max_value=300) | HUGE | st.booleans() | st.text(max_size=3)
DTYPE = st.sampled_from(sorted(DTYPES)) | st.text(max_size=6) | JSON_LEAVES


@st.composite
def tensor_entries(draw: st.DrawFn) -> Any:
    """What a header says about one tensor: mostly well-formed keys, hostile values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    entry: dict[str, Any] = {
        "dtype": draw(DTYPE),
        "shape": draw(st.lists(DIM, max_size=5) | JSON),
        "data_offsets": draw(st.lists(OFFSET, min_size=0, max_size=3) | JSON),
    }
    if draw(st.integers(0, 9)) == 0:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.text(max_size=6))] = draw(JSON)
    return entry


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    header: dict[str, Any] = draw(
        st.dictionaries(st.text(max_size=10), tensor_entries(), max_size=4)
    )
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), JSON, max_size=3))
    data = draw(st.binary(max_size=200))
    length = draw(
        st.none() | st.sampled_from([0, 1, 7, 2**60, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
    )
    return _pack(header, data, length=length, pad=draw(st.integers(0, 8)))


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    """A well-formed safetensors file in any dtype the reader knows (some tensors empty)."""
    n = draw(st.integers(1, 4))
    header: dict[str, Any] = {}
    data = b""
    for i in range(n):
        dtype_name = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * dtype_size(DTYPES[dtype_name])
        header[f"t{i}"] = {
            "dtype": dtype_name,
            "shape": shape,
            "data_offsets": [len(data), len(data) + size],
        }
        data += draw(st.binary(min_size=size, max_size=size))
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return _pack(header, data, pad=draw(st.integers(0, 7)))


@st.composite
def consistent_hostile_shapes(draw: st.DrawFn) -> bytes:
    """Headers whose offsets tile the data exactly, with shapes a reader must still
    refuse or survive: empty tensors with enormous other dims, ranks past 64, dims at
    the int64 edges. The byte counts agree, so only the shape checks stand in the way."""
    header: dict[str, Any] = {}
    data = b""
    for i in range(draw(st.integers(1, 3))):
        dtype_name = draw(st.sampled_from(sorted(DTYPES)))
        dims = st.integers(0, 3) | HUGE | st.integers(0, 2**64)
        shape = draw(st.lists(dims, max_size=4) | st.lists(st.just(1), min_size=60, max_size=70))
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * dtype_size(DTYPES[dtype_name])
        if size > 64:  # keep the file small: make the tensor empty, keep the huge dims
            shape = [0, *shape]
            size = 0
        header[f"t{i}"] = {
            "dtype": dtype_name,
            "shape": shape,
            "data_offsets": [len(data), len(data) + size],
        }
        data += b"\x01" * size
    return _pack(header, data)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "byte"]))
        if kind == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and blob:
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[draw(st.integers(0, len(blob))) :]
        elif kind == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i : i + draw(st.integers(1, 16))]
        elif kind == "length" and len(blob) >= 8:
            value = draw(
                st.sampled_from([0, 2**60, 2**63, 2**64 - 1, len(blob), len(blob) - 8])
                | st.integers(0, 2**64 - 1)
            )
            blob[:8] = struct.pack("<Q", value % 2**64)
    return bytes(blob)


# --------------------------------------------------------- safetensors parsers
def _header_and_tensors_fail_cleanly(path: Path) -> None:
    """Reading ``path``'s header, then every tensor, raises nothing but a RandesError."""
    _only_randes_errors(lambda: read_header(path))
    _only_randes_errors(lambda: _read_everything(path))


@FUZZ
@given(blob=st.binary(max_size=600))
def test_random_bytes_as_a_checkpoint(scratch: Path, blob: bytes) -> None:
    _header_and_tensors_fail_cleanly(_file(scratch, blob))


@FUZZ
@given(blob=hostile_headers())
def test_hostile_headers(scratch: Path, blob: bytes) -> None:
    _header_and_tensors_fail_cleanly(_file(scratch, blob))


@FUZZ
@given(blob=consistent_hostile_shapes())
def test_consistent_headers_with_hostile_shapes(scratch: Path, blob: bytes) -> None:
    path = _file(scratch, blob)
    _only_randes_errors(lambda: _read_everything(path))


@FUZZ
@given(blob=valid_files())
def test_valid_files_of_every_dtype_read_back(scratch: Path, blob: bytes) -> None:
    path = _file(scratch, blob)
    _read_everything(path)  # must not even raise a RandesError


@FUZZ
@given(blob=mutated_files())
def test_mutated_files(scratch: Path, blob: bytes) -> None:
    path = _file(scratch, blob)
    _only_randes_errors(lambda: _read_everything(path))


@st.composite
def hostile_indexes(draw: st.DrawFn) -> Any:
    hostile = st.sampled_from(
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "../model.safetensors",
            "/etc/passwd.safetensors",
            "sub/x.safetensors",
            ".safetensors",
            "..",
            "",
            "a\x00b.safetensors",
            "x" * 300 + ".safetensors",
            "pytorch_model.bin",
        ]
    )
    # mostly names that pass the syntax checks, so the file system gets asked about them
    shard_name = st.one_of(hostile, hostile, hostile, st.text(max_size=20), JSON_LEAVES)
    if draw(st.integers(0, 4)) == 0:
        return draw(JSON)
    weight_map = draw(st.dictionaries(st.text(max_size=6), shard_name, min_size=1, max_size=4))
    index: dict[str, Any] = {"weight_map": weight_map}
    if draw(st.booleans()):
        index["metadata"] = draw(JSON)
    return index


@FEW
@given(index=hostile_indexes(), shard=valid_files())
def test_hostile_hugging_face_index(scratch: Path, index: Any, shard: bytes) -> None:
    root = scratch / "hf"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    (root / "model-00001-of-00002.safetensors").write_bytes(shard)
    (root / INDEX_FILE).write_text(json.dumps(index))
    _only_randes_errors(lambda: _read_everything(root))


@pytest.mark.parametrize(
    "name",
    ["x" * 300 + ".safetensors", "model-00002-of-00002.safetensors", "a\x00b.safetensors"],
    ids=["name-too-long", "missing-shard", "nul-byte"],
)
def test_index_naming_an_unopenable_shard(scratch: Path, name: str) -> None:
    """The file system's own refusals (ENAMETOOLONG...) are CheckpointErrors too."""
    root = scratch / "hf-odd"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    (root / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(RandesError) as info:
        CheckpointReader.open(root)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------- manifests
def _ref(n: int) -> ShardRef:
    sha = f"{n:064x}"
    return ShardRef(key=f"objects/{sha[:2]}/{sha}", sha256=sha, size=100 + n, tensors=[f"t{n}"])


def _bundle_manifest() -> BundleManifest:
    sha = "ab" * 32
    return BundleManifest(
        bundle="b",
        version=3,
        parent_version=2,
        created_at="2026-01-01T00:00:00+00:00",
        base=BaseRef(
            name="tiny",
            uri="file:///models/base",
            sha256=sha,
            manifest_key=f"manifests/{sha}.json",
            manifest_sha256=sha,
        ),
        transform=TransformConfig(),
        superposition=[_ref(1), _ref(2)],
        tasks=[
            TaskEntry(
                name=f"task{i}",
                seed=12345 + i,
                source_uri=f"file:///models/t{i}",
                source_sha256=f"{i + 7:064x}",
                added_in_version=i + 1,
                scale=0.5 if i else None,
                key_map=KeyMap(base_prefix="", checkpoint_prefix="bert." if i else ""),
                delta_norms={"h.0.w": 1.5, "h.1.w": 0.25},
                private=[_ref(10 + i)],
                files={"config.json": _ref(20 + i)},
            )
            for i in range(2)
        ],
    )


def _base_manifest() -> BaseManifest:
    return BaseManifest(
        name="tiny",
        uri="file:///models/base",
        sha256="cd" * 32,
        shards=[_ref(30)],
        files={"config.json": _ref(31)},
        norms={"wte.weight": 3.0},
    )


VALID_BUNDLE = json.loads(dump_manifest(_bundle_manifest()))
VALID_BASE = json.loads(dump_manifest(_base_manifest()))

REPLACEMENTS = (
    JSON
    | HUGE
    | st.sampled_from(
        [
            -1,
            -(2**63),
            2**63,
            10**30,
            "",
            "../../etc/passwd",
            "/abs/key",
            "objects/../x",
            "a\nb",
            "x" * 2000,
            "ZZ" * 32,
            float("1e308"),
            [[[[[[[]]]]]]],
            {"nested": {"deeper": [1, {"k": None}]}},
        ]
    )
)


@st.composite
def mutated_manifests(draw: st.DrawFn, valid: Any) -> bytes:
    """``valid`` with one to three random changes somewhere in its JSON tree."""
    doc = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        parent: Any = None
        key: Any = None
        node = doc
        # walk down a random path; stop at a random depth
        while isinstance(node, dict | list) and node and draw(st.integers(0, 3)) > 0:
            key = (
                draw(st.sampled_from(sorted(node)))
                if isinstance(node, dict)
                else draw(st.integers(0, len(node) - 1))
            )
            parent, node = node, node[key]
        if parent is None:
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        # a copy: sampled_from hands out the same list/dict objects every time, and a
        # later mutation must not change the strategy's constants
        value = copy.deepcopy(draw(REPLACEMENTS))
        if action == "replace":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = value
        else:
            parent.append(value)
    text = json.dumps(doc).encode("utf-8")
    if draw(st.integers(0, 4)) == 0 and text:  # and sometimes a damaged byte on top
        blob = bytearray(text)
        blob[draw(st.integers(0, len(blob) - 1))] ^= 1 << draw(st.integers(0, 7))
        text = bytes(blob)
    return text


def _check_manifest(loader: Callable[[bytes], Any], data: bytes) -> None:
    loaded = _only_randes_errors(lambda: loader(data))
    if loaded is not None:  # still valid: it must survive a round trip unchanged
        assert loader(dump_manifest(loaded)) == loaded
        for ref in getattr(loaded, "shards", lambda: [])() if hasattr(loaded, "tasks") else []:
            assert ".." not in ref.key.split("/") and not ref.key.startswith("/")


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_manifests(data: bytes) -> None:
    _check_manifest(load_bundle_manifest, data)
    _check_manifest(load_base_manifest, data)


@FUZZ
@given(doc=JSON)
def test_random_json_as_manifests(doc: Any) -> None:
    data = json.dumps(doc).encode("utf-8")
    _check_manifest(load_bundle_manifest, data)
    _check_manifest(load_base_manifest, data)


@FUZZ
@given(data=mutated_manifests(VALID_BUNDLE))
def test_mutated_bundle_manifests(data: bytes) -> None:
    _check_manifest(load_bundle_manifest, data)


@FEW
@given(data=mutated_manifests(VALID_BASE))
def test_mutated_base_manifests(data: bytes) -> None:
    _check_manifest(load_base_manifest, data)


def test_the_unmutated_manifests_load() -> None:
    """The fuzzers' starting points are valid, so the mutations explore near them."""
    assert load_bundle_manifest(json.dumps(VALID_BUNDLE).encode()) == _bundle_manifest()
    assert load_base_manifest(json.dumps(VALID_BASE).encode()) == _base_manifest()


@pytest.mark.parametrize(
    ("where", "value", "why"),
    [
        (("superposition", 0, "key"), "../../etc/passwd", "superposition.0.key"),
        (("superposition", 0, "key"), "/etc/passwd", "superposition.0.key"),
        (("superposition", 0, "key"), "objects/./x", "superposition.0.key"),
        (("tasks", 0, "private", 0, "key"), "objects\\x", "tasks.0.private.0.key"),
        (("base", "manifest_key"), "manifests/../../x.json", "base.manifest_key"),
        (("tasks", 0, "files"), {"../config.json": None}, "tasks.0.files"),
        (("tasks", 0, "files"), {"1_Pooling/../../x": None}, "tasks.0.files"),
        (("tasks", 0, "files"), {"/etc/passwd": None}, "tasks.0.files"),
        (("tasks", 0, "weights_dir"), "../x", "tasks.0.weights_dir"),
    ],
)
def test_manifest_keys_and_file_names_cannot_escape(
    where: tuple[Any, ...], value: Any, why: str
) -> None:
    """`pull` writes DEST/<key> and materialize DEST/<file name>: a manifest naming a
    path out of DEST is refused when it is loaded, whatever later reads it."""
    doc = json.loads(json.dumps(VALID_BUNDLE))
    node = doc
    for step in where[:-1]:
        node = node[step]
    if isinstance(value, dict):  # a side-file map: keep a valid ref under the bad name
        value = {name: VALID_BUNDLE["tasks"][0]["files"]["config.json"] for name in value}
    node[where[-1]] = value
    with pytest.raises(ManifestError) as info:
        load_bundle_manifest(json.dumps(doc).encode())
    assert why in str(info.value) and "\n" not in str(info.value)


def test_manifest_error_quoting_a_huge_key_stays_short() -> None:
    doc = json.loads(json.dumps(VALID_BUNDLE))
    doc["tasks"][0]["delta_norms"] = {"x\n" * 5000: "not a number"}
    with pytest.raises(ManifestError) as info:
        load_bundle_manifest(json.dumps(doc).encode())
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)


# ---------------------------------------------------------- bounded allocation
def _peak_bytes(action: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _only_randes_errors(action)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("claimed", [2**60, 2**63, 2**64 - 1, 100 * MB + 1])
def test_absurd_header_length_allocates_nothing(scratch: Path, claimed: int) -> None:
    path = _file(scratch, struct.pack("<Q", claimed) + b'{"a":1}' + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match="absurd"):
        read_header(path)
    assert _peak_bytes(lambda: read_header(path)) < 1 * MB


def test_header_length_within_the_cap_but_past_the_file_end(scratch: Path) -> None:
    """A 50 MB claim in a 100-byte file: refused before a 50 MB read buffer exists."""
    path = _file(scratch, struct.pack("<Q", 50 * MB) + b"{}" + b" " * 90)
    assert _peak_bytes(lambda: read_header(path)) < 1 * MB


@pytest.mark.parametrize(
    "shape",
    [
        [2**31, 2**31, 2**31],  # claims 2**93 elements in a tiny file
        [0, 2**62, 2**62],  # zero bytes, yet torch's strides overflow
        [0, MAX_ELEMENTS + 1],
        [1] * 65,  # rank beyond any real tensor
    ],
    ids=["huge", "zero-size-overflow", "zero-size-past-cap", "rank-65"],
)
def test_implausible_shapes_are_refused_before_any_tensor(scratch: Path, shape: list[int]) -> None:
    numel = 1
    for dim in shape:
        numel *= dim
    nbytes = numel * 4
    path = _file(
        scratch,
        _pack(
            {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}},
            b"\0" * min(nbytes, 64),
        ),
    )
    with pytest.raises(CorruptCheckpointError):
        CheckpointReader.open(path)
    assert _peak_bytes(lambda: CheckpointReader.open(path)) < 1 * MB


def test_thousands_of_huge_dims_cost_no_bigint_arithmetic(scratch: Path) -> None:
    """A 1.4 MB header whose shape multiplies 70,000 numbers near 2**62: the check exits
    at the second factor instead of building a 4-million-bit product (minutes of CPU)."""
    shape = [2**62 - i for i in range(70_000)]
    path = _file(
        scratch, _pack({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    )
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="implausible shape"):
        read_header(path)
    assert time.perf_counter() - started < 5.0


def test_zero_size_tensors_with_real_dims_still_read(scratch: Path) -> None:
    """The new shape bounds keep what real checkpoints hold: empty tensors, scalars."""
    header = {
        "empty": {"dtype": "F32", "shape": [0, 768], "data_offsets": [0, 0]},
        "scalar": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]},
    }
    path = _file(scratch, _pack(header, struct.pack("<d", 2.5)))
    with CheckpointReader.open(path) as reader:
        assert reader.get("empty").shape == torch.Size([0, 768])
        assert float(reader.get("scalar")) == 2.5


def test_manifest_with_absurd_sizes_and_counts_allocates_by_input_only() -> None:
    """Sizes in a manifest are checked against stored bytes, never used to allocate."""
    doc = json.loads(json.dumps(VALID_BUNDLE))
    doc["superposition"][0]["size"] = 2**62
    data = json.dumps(doc).encode()
    peak = _peak_bytes(lambda: load_bundle_manifest(data))
    assert peak < 2 * MB, peak
    doc["superposition"][0]["size"] = 2**64
    with pytest.raises(ManifestError):
        load_bundle_manifest(json.dumps(doc).encode())


def test_deeply_nested_json_is_a_clean_refusal(scratch: Path) -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ManifestError):
        load_bundle_manifest(nested)
    path = _file(scratch, struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(CorruptCheckpointError):
        read_header(path)
