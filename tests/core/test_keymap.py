"""Reconciling a fine-tune's names, absences and dtypes with its base's (randes.keymap)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from randes.checkpoint import TensorMeta
from randes.errors import IncompatibleCheckpointError
from randes.keymap import reconcile, unwrap
from randes.manifest import KeyMap

F32 = TensorMeta(torch.float32, (4, 4))
BASE = {
    "embeddings.word_embeddings.weight": TensorMeta(torch.float32, (10, 4)),
    "encoder.layer.0.attention.self.query.weight": F32,
    "encoder.layer.0.output.dense.bias": TensorMeta(torch.float32, (4,)),
    "pooler.dense.weight": F32,
}


class Metas:
    """A header-only tensor source (reconcile never reads data)."""

    def __init__(self, metas: dict[str, TensorMeta]) -> None:
        self.metas = metas

    def keys(self) -> list[str]:
        return sorted(self.metas)

    def meta(self, name: str) -> TensorMeta:
        return self.metas[name]

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - never called
        raise AssertionError("reconcile read data")

    def __contains__(self, name: object) -> bool:
        return name in self.metas


def _rec(base: dict[str, TensorMeta], ckpt: dict[str, TensorMeta], **kw: object):  # type: ignore[no-untyped-def]
    return reconcile(base, Metas(ckpt), **kw)  # type: ignore[arg-type]


def test_identity_with_a_head() -> None:
    rec = _rec(BASE, {**BASE, "classifier.weight": F32})
    assert rec.key_map == KeyMap()
    assert rec.extras == ("classifier.weight",)


def test_checkpoint_adds_prefix() -> None:
    ckpt = {"bert." + k: v for k, v in BASE.items()} | {"classifier.weight": F32}
    km = _rec(BASE, ckpt).key_map
    assert (km.base_prefix, km.checkpoint_prefix) == ("", "bert.")
    assert km.to_base("bert.pooler.dense.weight") == "pooler.dense.weight"
    assert km.to_base("classifier.weight") is None


def test_checkpoint_strips_prefix() -> None:
    km = _rec({"bert." + k: v for k, v in BASE.items()}, BASE).key_map
    assert (km.base_prefix, km.checkpoint_prefix) == ("bert.", "")


def test_prefix_replaced() -> None:
    km = _rec(
        {"roberta." + k: v for k, v in BASE.items()}, {"bert." + k: v for k, v in BASE.items()}
    ).key_map
    assert (km.base_prefix, km.checkpoint_prefix) == ("roberta.", "bert.")


def test_missing_pooler_recorded_absent() -> None:
    ckpt = {"bert." + k: v for k, v in BASE.items() if not k.startswith("pooler")}
    rec = _rec(BASE, ckpt)
    assert rec.key_map.absent == ("pooler.dense.weight",)
    assert rec.key_map.checkpoint_prefix == "bert."


@pytest.mark.parametrize(
    ("wrap", "found"),
    [
        ("module.", ("module.",)),
        ("module.module.", ("module.", "module.")),
        ("_orig_mod.", ("_orig_mod.",)),
        ("module._orig_mod.", ("module.", "_orig_mod.")),
    ],
)
def test_training_wrappers_stripped(wrap: str, found: tuple[str, ...]) -> None:
    ckpt = {f"{wrap}bert.{k}": v for k, v in BASE.items()} | {f"{wrap}classifier.weight": F32}
    rec = _rec(BASE, ckpt)
    assert rec.key_map.checkpoint_prefix == "bert."
    assert rec.key_map.wrappers == found
    assert rec.key_map.absent == ()
    assert rec.extras == ("classifier.weight",)
    assert rec.source.names["classifier.weight"] == f"{wrap}classifier.weight"


def test_orig_mod_at_depth() -> None:
    names, wrappers = unwrap(["bert._orig_mod.encoder.w", "classifier._orig_mod.w"])
    assert names == {
        "bert.encoder.w": "bert._orig_mod.encoder.w",
        "classifier.w": "classifier._orig_mod.w",
    }
    assert wrappers == ("_orig_mod.",)


def test_module_kept_when_not_every_name_has_it() -> None:
    names, wrappers = unwrap(["module.a", "b"])
    assert set(names) == {"module.a", "b"} and wrappers == ()


def test_colliding_unwrapped_names_refused() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="collide"):
        unwrap(["a._orig_mod.w", "a.w"])


def test_dtypes_recorded_compactly() -> None:
    half = {k: TensorMeta(torch.bfloat16, v.shape) for k, v in BASE.items()}
    assert _rec(BASE, half).key_map.dtypes == {"*": "BF16"}
    mixed = dict(half) | {"pooler.dense.weight": F32}
    assert _rec(BASE, mixed).key_map.dtypes == {
        k: "BF16" for k in BASE if k != "pooler.dense.weight"
    }


def test_tied_output_embedding_follows_config() -> None:
    base = {
        "model.embed_tokens.weight": TensorMeta(torch.float32, (10, 4)),
        "lm_head.weight": TensorMeta(torch.float32, (10, 4)),
        "model.layers.0.w": F32,
    }
    ckpt = {k: v for k, v in base.items() if k != "lm_head.weight"}
    rec = _rec(base, ckpt, config={"tie_word_embeddings": True})
    assert rec.key_map.absent == ("lm_head.weight",)
    assert rec.key_map.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert _rec(base, ckpt, config={"tie_word_embeddings": False}).key_map.tied == {}


def test_wrong_base_refused() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="matches only") as info:
        _rec(BASE, {"bert.pooler.dense.weight": F32, "x.y": F32})
    assert "'embeddings.word_embeddings.weight'" in str(info.value) and "'x.y'" in str(info.value)
    assert "\n" not in str(info.value)


def test_old_key_map_loads() -> None:
    km = KeyMap.model_validate({"base_prefix": "", "checkpoint_prefix": "bert."})
    assert km.absent == () and km.dtypes == {} and km.wrappers == ()


NAME = st.lists(st.from_regex(r"[a-z_]{1,6}|[0-9]{1,2}", fullmatch=True), min_size=1, max_size=4)


@given(
    st.lists(NAME, min_size=1, max_size=8, unique_by=lambda p: ".".join(p)),
    st.from_regex(r"[a-z]{1,8}", fullmatch=True),
)
def test_detects_added_prefix(parts: list[list[str]], prefix: str) -> None:
    assume(prefix != "module")  # a wrapper name: stripped, as it should be
    base = {".".join(p): F32 for p in parts}
    km = _rec(base, {f"{prefix}.{b}": F32 for b in base}).key_map
    assert all(f"{prefix}.{b}" == km.to_checkpoint(b) for b in base)
