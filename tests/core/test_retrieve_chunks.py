"""Chunked retrieval gives, bit for bit, the whole-tensor formula theta + lambda T^-1(S).

Retrieval computes each tensor a chunk of entries at a time, flipping the int8 codes of a
quantized slot before they are scaled (randes.retrieve, randes.quantize). The reference
here is the formula written out whole, with the signs unpacked from the XOF stream by
hand: chunking, the order of sign and scale, and the buffers must change no bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import randes.retrieve as retrieve_mod
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.fold import fold
from randes.layout import layout_of, superposition_metas
from randes.quantize import QuantizedTensor, QuantScheme, _qmax, _unpack
from randes.retrieve import retrieve
from randes.rng import ELEMENT_CHUNK, element_sign_bytes, row_sign_vector, sign_vector
from randes.serving import QuantizedReader, codes_name, scales_name
from randes.transforms import TaskTransform
from tests.core.helpers import finetune, gpt2_like, open_dict


def _bits_to_signs(raw: bytes, n: int) -> torch.Tensor:
    octets = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    bits = (octets[:, None] >> torch.arange(8)) & 1
    return (1.0 - 2.0 * bits.to(torch.float32)).reshape(-1)[:n]


def _signs(kind: str, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The map's signs as a dense float tensor of ``shape``, drawn by hand."""
    numel = math.prod(shape)
    if kind == "elementwise":
        parts = [
            _bits_to_signs(
                element_sign_bytes(seed, name, k, min(ELEMENT_CHUNK, numel - start)),
                min(ELEMENT_CHUNK, numel - start),
            )
            for k, start in enumerate(range(0, numel, ELEMENT_CHUNK))
        ]
        return torch.cat(parts).reshape(shape)
    if len(shape) <= 1:
        return sign_vector(seed, name, numel).reshape(shape)
    rows, cols = shape[0], numel // shape[0]
    dense = sign_vector(seed, name, cols).expand(rows, cols).clone()
    if kind == "two-sided":
        dense *= row_sign_vector(seed, name, rows)[:, None]
    return dense.reshape(shape)


def _dequantized(codes: CheckpointReader, slot: str, shape: tuple[int, ...], s: QuantScheme):
    q = QuantizedTensor(codes.get(codes_name(slot)), codes.get(scales_name(slot)))
    group, numel = s.group_of(shape), math.prod(shape)
    values = _unpack(q.codes, s.bits, q.scales.numel() * group).to(torch.float32) - _qmax(s.bits)
    return (values.view(-1, group) * q.scales[:, None]).reshape(-1)[:numel].reshape(shape)


@pytest.mark.parametrize("kind", ["columns", "two-sided", "elementwise"])
@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=64),
        QuantScheme(bits=3, group_size=24),
        QuantScheme(bits=8, group_size=None),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("chunk", [1, 1 << 19])
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_chunked_retrieval_is_the_whole_tensor_formula_bit_for_bit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    scheme: QuantScheme,
    chunk: int,
    path: str,
) -> None:
    monkeypatch.setattr(retrieve_mod, "CHUNK_ELEMENTS", chunk)  # 1: the smallest aligned chunks
    monkeypatch.setattr(retrieve_mod, "FUSED_CHUNK", chunk)  # the fused kernel's chunks
    if path == "torch":  # the eager torch path (else the fused kernel, where numba is)
        monkeypatch.setenv("RANDES_NO_KERNELS", "1")
    base_model = gpt2_like(n_layer=3, d=24)
    base = open_dict(tmp_path / "base.safetensors", base_model)
    tuned = open_dict(tmp_path / "ft" / "model.safetensors", finetune(base_model, seed=1))
    config = TransformConfig(map=kind, rank1="flip", serving=scheme)  # type: ignore[arg-type]
    result = fold(
        base=base, checkpoint=tuned, parent=None, seed=5, config=config, out_dir=tmp_path / "v"
    )
    codes = CheckpointReader.from_files([s.path for s in result.serving])
    served = QuantizedReader(
        CheckpointReader.from_files([s.path for s in result.serving]),
        scheme,
        superposition_metas(base, config),
    )
    got = dict(
        retrieve(
            base=base,
            superposition=served,
            private=None,
            seed=5,
            key_map=result.key_map,
            config=config,
            scale=0.7,
        )
    )
    layout = layout_of(base, config)
    transform = TaskTransform(layout, 5)
    checked = 0
    for name in layout.superposed:
        shape = tuple(base.meta(name).shape)
        delta = _dequantized(codes, transform.slot_of(name), shape, scheme)
        if name in layout.flipped:
            delta = delta * _signs(kind, 5, name, shape)
        want = base.get(name).to(torch.float32).add_(delta, alpha=0.7)
        ck = result.key_map.to_checkpoint(name)
        assert torch.equal(got[ck], want), name
        checked += 1
    assert checked > 10
