"""Serving runtime: correctness, task-switch time, resident memory, mixed-task batches.

Questions (issue 13, "Must show"):

1. Correctness. ``rt.state_dict(t)`` equals the ``materialize`` output bit for bit for
   every task of a tiny BERT bundle and a tiny GPT-2 bundle (models made and saved by
   transformers, as in tests/runtime) and of the 124M GPT-2-shaped bundle; a switched
   module equals a freshly built one; mixed-batch logits equal the per-task models'
   within 1e-5 relative (max abs difference / max abs logit).
2. Task switch on the 124M GPT-2-shaped cost model (benchmarks/runtime_build.py), CPU,
   one process, methods interleaved repeat by repeat, medians: ``rt.switch`` vs a warm
   reload of an already materialized directory (``safetensors.torch.load_file`` +
   ``load_state_dict``, the file hot in the page cache) vs ``from_pretrained`` of that
   directory vs materialize (to a new directory, fsynced) + load_file + load_state_dict.
   On a GPU: ``rt.switch`` on the device vs a device-to-device copy of the same bytes.
3. Memory: peak RSS (VmHWM, fresh process each) of a runtime serving N tasks (open, build
   the working model, switch through every task twice: first switches, which draw the
   sign streams, then later ones; one forward pass) vs one ``from_pretrained`` (+ one
   forward pass), for N = 1, 8 (and more with ``--versions``).
4. Mixed batches: one batch of 8 requests from 8 tasks through the mixed model vs 8
   per-task passes with a switch before each vs one plain model on the same batch (the
   floor: no task differences at all); and the same with 8 requests per task.

Every timed method runs in the same process with 1 torch thread (the project's default,
`Settings.torch_threads`; on this shared 2-core machine extra threads stall), after one
warm-up. The machine is shared with other sessions: medians and ratios measured side by
side are what to read.

    .venv/bin/python -m benchmarks.runtime                 # ~15 min on 2 busy cores
    .venv/bin/python -m benchmarks.runtime --quick         # small shapes, ~2 min
    .venv/bin/python -m benchmarks.runtime --parts memory --versions 1,8,16

Same as ``python -m benchmarks run runtime ...``: the result goes to
``benchmarks/results/runtime.json`` and the page is printed. Code: bundles
``benchmarks.runtime_build``, measurements ``benchmarks.runtime_measure``, tables
``benchmarks.runtime_report``, the suite and its extension point (``PARTS``)
``benchmarks.runtime_suite``.
"""

from __future__ import annotations

from benchmarks.runner import entry


def main() -> int:
    return entry("runtime")


if __name__ == "__main__":
    raise SystemExit(main())
