"""Cost of fold and materialize: peak memory and wall time against a plain safetensors copy.

Question answered (issue requirement): on a GPT-2-shaped model of at least 40M
parameters with 8 tasks, does one fold stay under 1.2 GB peak RSS, without that peak
growing with the number of tasks or (beyond the largest tensor) with the model size,
and what do fold and materialize cost as a ratio to a plain safetensors read + write
of the same bytes, measured side by side in one run? Does fold time grow with the
number of tasks already folded?

Method:

- Two GPT-2-shaped fp32 models are generated on disk under a temp dir, tensor by
  tensor (never a whole model in memory): ``small`` (6 layers, d=768, vocab 8192,
  ~50M parameters) and ``large`` (12 layers, same widths, ~92M parameters). Both have
  the same largest tensor (``wte.weight``, 25 MB), so a streaming fold should show the
  same peak for both. Each has a base (bare GPT-2 names, as in the hub's ``gpt2``) and
  8 fine-tunes = base + small noise, saved like ``GPT2ForSequenceClassification``
  (``transformer.`` prefix, plus a ``score.weight`` head the base lacks).
- Tasks 1..8 are folded sequentially, each on the previous superposition, with the
  default TransformConfig, 3 times each with torch's default intra-op threads and 3
  times with one thread (all runs of a fold must give the same sha256). Every run is
  a FRESH process: a child forked from a server that imported torch and randes once
  (saves a 3-5 s import per run; the child's address space and high-water mark are
  its own). Peak RSS is the kernel's exact high-water mark ``VmHWM`` of that process
  (``ru_maxrss`` is not used: Linux carries the parent's high-water mark across
  fork/exec into it); anonymous memory (``RssAnon``, the process's own heap) is
  sampled every 2 ms. The reader uses ``readinto`` rather than mmap, so input file
  pages are counted in neither; the file-backed part of RSS is the interpreter's and
  torch's shared libraries. The fixed cost of the interpreter + torch + randes,
  measured in the same process just before the fold, is reported as ``idle``;
  ``own`` = peak - idle.
- Baseline, interleaved with every fold and materialize run, in its own fresh
  process: ``safetensors.torch.load_file(backend="pread")`` (every byte really read;
  the default mmap backend would skip bytes never touched) of every file the fold reads (base,
  checkpoint, parent superposition) and ``save_file`` of the same tensors' bytes the
  fold writes (superposition + private). Fold fsyncs what it writes (durability is a
  requirement); plain ``save_file`` does not, so the baseline is reported both
  ``plain`` and ``+fsync`` (its files fsynced after writing, timed separately). The
  parent calls ``os.sync()`` before every timed run so no run pays for the previous
  one's dirty pages. All inputs are hot in the page cache for both (24 GB RAM).
- Materialize of task 1 from the 8-task superposition, same protocol, against a
  baseline reading base + superposition + private and writing the model's bytes.
- One more fold (task 2, on the 1-task superposition) per size runs under cProfile
  to split its time into reading, hashing, writing + fsync, RNG and tensor math.

    .venv/bin/python -m benchmarks.cost                # full run (~5 min on 2 cores)
    .venv/bin/python -m benchmarks.cost --gpt2-small   # + real GPT-2 small (~10 min)
    .venv/bin/python -m benchmarks.cost --quick        # smaller models, 3 tasks (~1.5 min)

Same as ``python -m benchmarks run cost ...``: the result goes to
``benchmarks/results/cost.json`` (``--quick``: ``benchmarks/results/quick/``), the page is
printed; ``python -m benchmarks report`` renders it into docs/benchmarks/generated/.
The code: models ``benchmarks.cost_models``, fork server ``benchmarks.cost_worker``,
measurement ``benchmarks.cost_measure``, tables ``benchmarks.cost_report``, the suite
and its extension point (``PARTS``) ``benchmarks.cost_suite``.
"""

from __future__ import annotations

from benchmarks.runner import entry


def main() -> int:
    return entry("cost")


if __name__ == "__main__":
    raise SystemExit(main())
