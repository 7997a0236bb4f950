"""The fused retrieval kernel (randes.kernels) gives the torch path's bits, every case.

The kernel is a second implementation of the retrieval math (dequantize, unflip, scale,
add); the eager torch path (randes.quantize.dequantize_range + randes.transforms.SignMap
+ ``Tensor.add_``) is the reference. Checked on raw ranges (every map kind, int3/4/8,
odd sizes, chunk offsets, more than one sign-stream chunk) and through a real fold and
`TaskRetrieval` (layer shuffling on and off, fp32/bf16/fp16 outputs, many chunks split
over two threads, into given output memory), plus the fallback without numba.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import randes.retrieve as retrieve_mod
from randes import kernels
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.fold import fold
from randes.layout import superposition_metas
from randes.quantize import QuantScheme, chunk_alignment, dequantize_range, quantize
from randes.retrieve import TaskRetrieval
from randes.rng import ELEMENT_CHUNK
from randes.serving import QuantizedReader
from randes.transforms import SignMap
from tests.core.helpers import finetune, gpt2_like, open_dict

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not importable")


def _torch_range(base, q, shape, scheme, kind, lo, hi, alpha):  # type: ignore[no-untyped-def]
    signs = SignMap(kind, 5, "w", shape) if kind else None
    delta = dequantize_range(q, shape, scheme, lo, hi, None, signs.apply_ if signs else None)
    return base.view(-1)[lo:hi].clone().add_(delta, alpha=alpha)


def _kernel_range(base, q, shape, scheme, kind, lo, hi, alpha, in_place):  # type: ignore[no-untyped-def]
    signs = SignMap(kind, 5, "w", shape).kernel_signs() if kind else {}
    group = scheme.group_of(shape)
    src = base.view(-1)[lo:hi].numpy()
    out = src.copy() if in_place else np.full(hi - lo, np.nan, dtype=np.float32)
    ebits = signs.pop("ebits", None)
    kernels.dequant_add_(
        out,
        q.codes.numpy()[lo * scheme.bits // 8 :],
        scheme.bits,
        q.scales.numpy()[lo // group :],
        group,
        alpha,
        lo=lo,
        ebits=ebits[lo // 8 :] if ebits is not None else None,
        base=None if in_place else src,
        **signs,
    )
    return torch.from_numpy(out)


@pytest.mark.parametrize("kind", [None, "columns", "two-sided", "elementwise"])
@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=64),
        QuantScheme(bits=3, group_size=24),
        QuantScheme(bits=8, group_size=None),
        QuantScheme(bits=4, group_size=None),
        QuantScheme(bits=8, group_size=128),  # elementwise: 64-entry words, 2 per group
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("shape", [(37, 51), (1001,), (5, 7, 9), (3, 1), (24, 64)], ids=str)
def test_kernel_equals_torch_path_on_ranges(
    kind: str | None, scheme: QuantScheme, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(sum(shape) + scheme.bits)
    # magnitudes spread over decades: a product rounded before the add, or a float64
    # scalar, would change some of these bits
    base = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, shape, generator=g)
    q = quantize(torch.randn(shape, generator=g), scheme)
    numel = math.prod(shape)
    align = chunk_alignment(scheme, shape)
    if kind is not None:  # the torch path flips whole rows
        align = math.lcm(align, SignMap(kind, 5, "w", shape).alignment)
    cuts = sorted({0, numel, *(align * k for k in (1, 2, 5) if align * k < numel)})
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        want = _torch_range(base, q, shape, scheme, kind, lo, hi, 0.37)
        for in_place in (True, False):
            got = _kernel_range(base, q, shape, scheme, kind, lo, hi, 0.37, in_place)
            assert torch.equal(got, want), (lo, hi, in_place)


def test_kernel_adds_with_one_rounding_as_torch_does() -> None:
    """torch's add_(x, alpha) is a fused multiply-add; the kernel's too (a separately
    rounded product differs from it on these values, so the test can tell)."""
    g = torch.Generator().manual_seed(0)
    shape = (4096,)
    scheme = QuantScheme(bits=8, group_size=64)
    base = torch.randn(shape, generator=g)
    q = quantize(torch.randn(shape, generator=g), scheme)
    want = _torch_range(base, q, shape, scheme, None, 0, 4096, 0.37)
    delta = dequantize_range(q, shape, scheme, 0, 4096)
    unfused = base + delta * torch.tensor(0.37, dtype=torch.float32)
    assert not torch.equal(unfused, want)
    assert torch.equal(_kernel_range(base, q, shape, scheme, None, 0, 4096, 0.37, True), want)


def test_kernel_elementwise_across_sign_stream_chunks() -> None:
    shape = (ELEMENT_CHUNK + 4099,)
    scheme = QuantScheme(bits=4, group_size=64)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    q = quantize(torch.randn(shape, generator=g), scheme)
    lo = ELEMENT_CHUNK - 64 * 8  # a range straddling the stream's chunk boundary
    want = _torch_range(base, q, shape, scheme, "elementwise", lo, shape[0], -1.5)
    got = _kernel_range(base, q, shape, scheme, "elementwise", lo, shape[0], -1.5, True)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=64), QuantScheme(bits=3, group_size=192)],
    ids=lambda s: s.name,
)
def test_elementwise_signs_in_the_add_s_pass_equal_the_separate_flip(
    scheme: QuantScheme, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups of a multiple of 64 entries take the signs 64 to a word, in the add's pass
    (MODE_ELEMENTWISE_UNITS); the separate int8 flip gives the same bits, over many
    kernel blocks and a last, partial word."""
    shape = (3 * 4096 + 64 * 5 + 29,)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, shape, generator=g)
    q = quantize(torch.randn(shape, generator=g), scheme)
    want = _torch_range(base, q, shape, scheme, "elementwise", 0, shape[0], 0.37)
    got = {}
    for units in (True, False):
        monkeypatch.setattr(kernels, "WORD_SIGNS", units)
        got[units] = _kernel_range(base, q, shape, scheme, "elementwise", 0, shape[0], 0.37, True)
    assert torch.equal(got[True], want) and torch.equal(got[False], want)


CASES = [
    ("columns", QuantScheme(bits=4, group_size=64), True, torch.float32),
    ("two-sided", QuantScheme(bits=3, group_size=24), False, torch.float32),
    ("elementwise", QuantScheme(bits=8, group_size=None), True, torch.float32),
    ("elementwise", QuantScheme(bits=4, group_size=64), False, torch.bfloat16),
    ("two-sided", QuantScheme(bits=4, group_size=None), True, torch.float16),
]


def _plans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case
) -> tuple[TaskRetrieval, TaskRetrieval]:  # type: ignore[no-untyped-def]
    kind, scheme, shuffle, dtype = case
    base_model = gpt2_like(n_layer=3, d=13, vocab=29, n_pos=11)  # sizes off every group
    tuned = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in finetune(base_model, seed=1).items()
    }
    base = open_dict(tmp_path / "base.safetensors", base_model)
    ckpt = open_dict(tmp_path / "ft.safetensors", tuned)
    config = TransformConfig(map=kind, layer_shuffle=shuffle, rank1="flip", serving=scheme)
    result = fold(
        base=base, checkpoint=ckpt, parent=None, seed=5, config=config, out_dir=tmp_path / "v"
    )
    metas = superposition_metas(base, config)

    def plan() -> TaskRetrieval:
        served = QuantizedReader(
            CheckpointReader.from_files([s.path for s in result.serving]), scheme, metas
        )
        return TaskRetrieval(
            base=base,
            superposition=served,
            private=None,
            seed=5,
            key_map=result.key_map,
            config=config,
            scale=0.7,
        )

    monkeypatch.setenv("RANDES_NO_KERNELS", "1")
    reference = plan()
    monkeypatch.delenv("RANDES_NO_KERNELS")
    return reference, plan()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1].name}-{c[2]}-{c[3]}")
def test_retrieval_kernel_equals_torch_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setattr(retrieve_mod, "FUSED_CHUNK", 64)  # many chunks
    monkeypatch.setattr(kernels, "SPLIT_ENTRIES", 16)  # two threads split every tensor
    reference, fused = _plans(tmp_path, monkeypatch, case)
    names = list(reference.plan)
    want = dict(reference.tensors(names))
    assert not reference.fusable(names[0]) and any(fused.fusable(n) for n in names)
    for threads in (1, 2):
        got = dict(fused.tensors(names, threads=threads))
        for name in names:
            assert got[name].dtype == want[name].dtype
            assert torch.equal(got[name], want[name]), (name, threads)
    outs = {
        n: torch.full_like(want[n], float("nan"))
        if want[n].is_floating_point()
        else torch.zeros_like(want[n])
        for n in names
    }
    for name, value in fused.tensors(names, outs):
        assert value.data_ptr() == outs[name].data_ptr()
        assert torch.equal(outs[name], want[name]), name
    for name in names:
        assert torch.equal(fused.tensor(name), want[name]), name


def test_outputs_sharing_memory_are_computed_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tensors` yields a tensor once the next one's first half is computed (the helper
    finishes the last half meanwhile); two outputs in one memory (a module's tied
    weights) must not overlap that way: the second one's bits are what stays."""
    monkeypatch.setattr(retrieve_mod, "FUSED_CHUNK", 64)
    monkeypatch.setattr(kernels, "SPLIT_ENTRIES", 16)
    reference, fused = _plans(tmp_path, monkeypatch, CASES[2])
    first, second = "h.0.mlp.c_fc.weight", "h.1.mlp.c_fc.weight"
    want = dict(reference.tensors([first, second]))
    shared = torch.full_like(want[first], float("nan"))
    for name, value in fused.tensors([first, second], {first: shared, second: shared}):
        assert torch.equal(value, want[name]), name
    assert torch.equal(shared, want[second])


def test_without_numba_retrieval_takes_the_torch_path(tmp_path: Path) -> None:
    """numba blocked from import: randes imports, kernels are unavailable, and a
    materialize still runs (the torch path)."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from randes import kernels, retrieve\n"
        "assert not kernels.available()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_kernel_compiles_in_memory_when_no_cache_location_is_writable() -> None:
    """numba finds no cache location (read-only package, home and NUMBA_CACHE_DIR):
    the kernel compiles in memory instead of failing the import."""
    code = (
        "import numba.core.caching as c\n"
        "c.CacheImpl._locator_classes = []\n"
        "import numpy as np\n"
        "from randes import kernels\n"
        "out = np.zeros(16, np.float32)\n"
        "codes, scales = np.full(8, 0x98, np.uint8), np.ones(1, np.float32)\n"
        "kernels.dequant_add_(out, codes, 4, scales, 16, 0.5)\n"
        "print(out[:2].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0.5, 1.0]"  # codes 8 and 9: q = 1 and 2
