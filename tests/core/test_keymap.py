"""Prefix mapping between a fine-tune's names and its base's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from randes.errors import IncompatibleCheckpointError
from randes.keymap import detect_key_map
from randes.manifest import KeyMap

BASE = [
    "embeddings.word_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.output.dense.bias",
    "pooler.dense.weight",
]


def test_identity() -> None:
    assert detect_key_map(BASE, [*BASE, "classifier.weight"]) == KeyMap()


def test_checkpoint_adds_prefix() -> None:
    ckpt = ["bert." + k for k in BASE] + ["classifier.weight", "classifier.bias"]
    km = detect_key_map(BASE, ckpt)
    assert km == KeyMap(checkpoint_prefix="bert.")
    assert km.to_checkpoint(BASE[1]) == "bert." + BASE[1]
    assert km.to_base("bert.pooler.dense.weight") == "pooler.dense.weight"
    assert km.to_base("classifier.weight") is None


def test_checkpoint_strips_prefix() -> None:
    base = ["bert." + k for k in BASE]
    km = detect_key_map(base, BASE)
    assert km == KeyMap(base_prefix="bert.")
    assert km.to_checkpoint(base[0]) == BASE[0]


def test_prefix_replaced() -> None:
    km = detect_key_map(["roberta." + k for k in BASE], ["bert." + k for k in BASE])
    assert km == KeyMap(base_prefix="roberta.", checkpoint_prefix="bert.")


def test_incompatible() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="lacks 1 of 4") as info:
        detect_key_map(BASE, ["bert." + k for k in BASE[:3]])
    assert "pooler.dense.weight" in str(info.value)
    assert "\n" not in str(info.value)


NAME = st.lists(st.from_regex(r"[a-z_]{1,6}|[0-9]{1,2}", fullmatch=True), min_size=1, max_size=4)


@given(
    st.lists(NAME, min_size=1, max_size=8, unique_by=lambda p: ".".join(p)),
    st.from_regex(r"[a-z]{1,8}", fullmatch=True),
)
def test_detects_added_prefix(parts: list[list[str]], prefix: str) -> None:
    base = [".".join(p) for p in parts]
    km = detect_key_map(base, [f"{prefix}.{b}" for b in base])
    assert all(f"{prefix}.{b}" == km.to_checkpoint(b) for b in base)
