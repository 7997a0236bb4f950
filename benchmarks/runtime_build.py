"""Bundles for benchmarks/runtime.py: the GPT-2-shaped cost model, folded and pulled.

The model is the one of benchmarks/cost.py (``GPT2_SMALL``: 12 x 768, vocab 50257,
124.4M parameters; ``--quick``: its small QUICK shape), generated tensor by tensor with
the same recipe: a base with bare GPT-2 names and fine-tunes = base + N(0, 1e-3) noise
saved like ``GPT2ForSequenceClassification`` (``transformer.`` prefix, a ``score.weight``
head the base lacks), each with a real transformers ``config.json`` so that
``from_pretrained`` and ``BundleRuntime.model`` can build it. The fine-tunes are folded
one by one into one bundle through a real workspace (local store, SQLite), each
checkpoint deleted once folded, and the versions asked for (1, 8, ...) are pulled.
Everything is kept under ``root`` and reused by later runs of the same shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.cost_models import ModelSpec, hash_name, write_streaming

BUNDLE = "serve"


def gpt2_config(spec: ModelSpec, *, head: bool) -> dict[str, Any]:
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=spec.vocab,
        n_embd=spec.d,
        n_layer=spec.layers,
        n_head=12 if spec.d % 12 == 0 else 8,
        n_positions=spec.ctx,
        num_labels=spec.labels,  # type: ignore[call-arg]  # a PretrainedConfig kwarg
        pad_token_id=0,
        architectures=["GPT2ForSequenceClassification" if head else "GPT2Model"],
    )
    return cfg.to_dict()


def _base(spec: ModelSpec, path: Path) -> None:
    import torch

    shapes = spec.base_tensors()

    def make(name: str) -> torch.Tensor:
        if len(shapes[name]) == 1:
            return (
                torch.ones(shapes[name]) if name.endswith("weight") else torch.zeros(shapes[name])
            )
        g = torch.Generator().manual_seed(hash_name(name))
        return torch.randn(shapes[name], generator=g).mul_(0.02)

    write_streaming(path / "model.safetensors", shapes, make)
    (path / "config.json").write_text(json.dumps(gpt2_config(spec, head=False)))


def _task(spec: ModelSpec, base: Path, path: Path, k: int) -> None:
    import torch
    from safetensors import safe_open

    prefix = "transformer."
    shapes = {prefix + n: s for n, s in spec.base_tensors().items()}
    shapes["score.weight"] = (spec.labels, spec.d)
    g = torch.Generator().manual_seed(1000 + k)
    with safe_open(str(base / "model.safetensors"), framework="pt") as reader:

        def make(name: str) -> torch.Tensor:
            if name == "score.weight":
                return torch.randn((spec.labels, spec.d), generator=g).mul_(0.02)
            t = reader.get_tensor(name[len(prefix) :]).clone()
            return t.add_(torch.randn(t.shape, generator=g), alpha=1e-3)

        write_streaming(path / "model.safetensors", shapes, make)
    (path / "config.json").write_text(json.dumps(gpt2_config(spec, head=True)))


def build(spec: ModelSpec, root: Path, versions: list[int], log: Any) -> dict[int, Path]:
    """Pulled directories of versions ``versions`` (= task counts) of one bundle."""
    from randes.config import TransformConfig
    from storage.settings import Settings
    from storage.workspace import Workspace

    root.mkdir(parents=True, exist_ok=True)
    pulled = {n: root / f"pulled-{n}" for n in versions}
    if all((p / "bundle.json").exists() for p in pulled.values()):
        return pulled
    with Workspace(Settings(home=root / "home", torch_threads=1)) as ws:
        ws.init()
        base = root / "base"
        if "base" not in {b.name for b in ws.registry.list_bases()}:
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            _base(spec, base)
            ws.add_base("base", str(base))
            ws.create_bundle(BUNDLE, "base", TransformConfig())
        head = ws.registry.head(BUNDLE)
        done = head.version if head is not None else 0
        for k in range(done + 1, max(versions) + 1):
            task_dir = root / f"task{k}"
            shutil.rmtree(task_dir, ignore_errors=True)
            task_dir.mkdir()
            _task(spec, base, task_dir, k)
            ws.fold(BUNDLE, str(task_dir), f"t{k}")
            shutil.rmtree(task_dir)
            log(f"folded t{k}")
            if k - 1 not in versions:
                _drop_superposition(ws, k - 1)
            for n in versions:
                if n == k and not (pulled[n] / "bundle.json").exists():
                    ws.pull(BUNDLE, str(n), pulled[n])
                    log(f"pulled version {n}")
        for n, dest in pulled.items():
            if not (dest / "bundle.json").exists():
                shutil.rmtree(dest, ignore_errors=True)
                ws.pull(BUNDLE, str(n), dest)
                log(f"pulled version {n}")
    return pulled


def _drop_superposition(ws: Any, version: int) -> None:
    """Delete the superposition objects (master + serving copy) of an old version from this
    benchmark's private store and cache: only the head's are read by the next fold, and
    32 versions of a 124M model would otherwise take ~18 GB (that version becomes
    unreadable, which no measurement here needs)."""
    if version < 1:
        return
    _, manifest = ws.resolve(BUNDLE, str(version))
    refs = list(manifest.superposition) + (
        list(manifest.serving.shards) if manifest.serving else []
    )
    for ref in refs:
        ws.store.delete(ref.key)
        (ws.cache.root / f"{ref.sha256}.safetensors").unlink(missing_ok=True)
