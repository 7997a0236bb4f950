"""S3 throughput of the artifact store against boto3's own transfer manager.

Question answered: what does a `randes pull` (every object of a version, sha256
verified while it streams) and the store's upload path (what `fold` and `base add`
use: ``S3Store.put_file``, create-if-absent, sha256 checked on the way up) cost
compared with plain boto3 ``download_file`` (+ the separate sha256 pass a caller of
plain boto3 needs to verify what it got) and ``upload_file``, on the same objects,
the same server, in the same run?

A version of >= 500 MB is built for real (``base add`` of a large safetensors base,
one ``fold``), then pulled ``--repeats`` times by `Workspace.pull` (what ``randes
pull`` runs, timed in-process: CLI start-up excluded) and fetched by boto3, alternating
which goes first; the pulled objects are then uploaded under fresh prefixes by
``put_file`` and by ``upload_file``. Medians as MB/s (10^6 bytes/s) and ratios.

The script starts and stops its own SeaweedFS (``weed mini`` on loopback, free
ports) through ``tests.services.seaweed.SeaweedServer``:

    .venv/bin/python -m benchmarks.s3_throughput [--size-mb 464] [--repeats 3]

Same as ``python -m benchmarks run s3_throughput``: writes
benchmarks/results/s3_throughput.json and prints the page.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from benchmarks.runner import entry
from benchmarks.suite import BaseSuite, Context, Page, Result
from randes.config import TransformConfig
from tests.services.seaweed import SeaweedServer

MiB = 1024 * 1024


def make_models(root: Path, base_mb: int) -> tuple[Path, Path]:
    """A GPT-2-shaped base padded with large tensors to ``base_mb``, and a fine-tune."""
    import torch

    from tests.factories import gpt2_state, write_model

    state = gpt2_state(0, n_layer=2, d=64)
    per = 16 * MiB // 4  # 16 MiB fp32 tensors
    gen = torch.Generator().manual_seed(1)
    for i in range(max(1, base_mb // 16)):
        state[f"extra.{i}.weight"] = torch.randn(per, generator=gen)
    config = {"model_type": "gpt2", "n_layer": 2}
    base = write_model(root / "base", state, config)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    return base, write_model(root / "task", tuned, config)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


PAIRS = (("pull", "boto3"), ("pull", "boto3 + sha256"), ("put_file", "upload_file"))


class S3ThroughputSuite(BaseSuite):
    name = "s3_throughput"
    title = "S3 throughput"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--size-mb", type=int, default=464, help="base size (MiB)")
        ap.add_argument("--repeats", type=int, default=3)

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        if quick:
            return {"size_mb": min(args.size_mb, 48), "repeats": min(args.repeats, 2)}
        return {"size_mb": args.size_mb, "repeats": args.repeats}

    def run(self, ctx: Context) -> dict[str, Any]:
        return measure(ctx.work, int(ctx.params["size_mb"]), int(ctx.params["repeats"]), ctx.log)

    def render(self, result: Result) -> Page:
        d = result.data
        total, times = d["bytes"], d["seconds"]

        def rate(name: str) -> float:
            return float(total / statistics.median(times[name]) / 1e6)

        lines = [
            f"{total / 1e6:.0f} MB in {d['objects']} objects (a pulled version: base + "
            f"superposition + task shards), median of {result.params['repeats']}, SeaweedFS "
            "on loopback. MB/s = 10^6 bytes/s.",
            "",
            "| path | ours MB/s | boto3 MB/s | ratio |",
            "|---|---:|---:|---:|",
            *(
                f"| {ours} vs {theirs} | {rate(ours):.0f} | {rate(theirs):.0f} | "
                f"**{rate(ours) / rate(theirs):.2f}** |"
                for ours, theirs in PAIRS
            ),
            "",
            f"Opening the workspace (`randes pull` does it once, outside the timings): "
            f"median {statistics.median(d['open_s']):.2f} s.",
        ]
        return Page(self.title, "\n".join(lines))


def measure(work: Path, size_mb: int, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Build the version, then time pull / boto3 download and both uploads, interleaved."""
    from storage.settings import Settings
    from storage.workspace import Workspace

    server = SeaweedServer(work / "seaweed", volume_size_limit_mb=1024)
    stack = contextlib.ExitStack()
    saved_env = dict(os.environ)
    try:
        os.environ.update(server.env())
        server.start()
        bucket = server.new_bucket("bench")
        settings = Settings(
            home=work / "home",
            store_url=f"s3://{bucket}/randes",
            s3_endpoint_url=server.endpoint_url,
            cache_dir=work / "cache",
        )
        base, task = make_models(work / "models", size_mb)
        with Workspace(settings) as ws:
            ws.init()
            ws.add_base("base", str(base))
            ws.create_bundle("bench", "base", TransformConfig())
            ws.fold("bench", str(task), "t0")
        client = server.client(max_pool_connections=32)
        transfer = TransferConfig()  # boto3 defaults: 8 MiB parts, 10 threads
        first = work / "pull-0"
        with Workspace(settings) as ws:
            ws.pull("bench", None, first)
        objects = [
            (p.relative_to(first).as_posix(), p) for p in sorted(first.rglob("*")) if p.is_file()
        ]
        objects = [(k, p) for k, p in objects if k != "bundle.json"]
        total = sum(p.stat().st_size for _, p in objects)
        shas = {k: file_sha256(p) for k, p in objects}
        times: dict[str, list[float]] = {
            name: [] for name in ("pull", "boto3", "boto3 + sha256", "put_file", "upload_file")
        }

        def open_close() -> None:
            with Workspace(settings):
                pass

        opened = [timed(open_close) for _ in range(3)]
        ws = stack.enter_context(Workspace(settings))  # opened once, its cost reported apart

        def pull(out: Path) -> None:
            ws.pull("bench", None, out)

        def boto_down(out: Path, verify: bool) -> None:
            for key, _ in objects:
                dest = out / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, f"randes/{key}", str(dest), Config=transfer)
                if verify:
                    assert file_sha256(dest) == shas[key]

        def ours_up(prefix: str) -> None:
            for key, path in objects:
                assert ws.store.put_file(f"{prefix}/{key}", path, sha256=shas[key])

        def boto_up(prefix: str) -> None:
            for key, path in objects:
                client.upload_file(str(path), bucket, f"randes/{prefix}/{key}", Config=transfer)

        for rep in range(repeats):
            # Alternate which method goes first, so neither always meets a cold server.
            order = ("ours", "boto3") if rep % 2 == 0 else ("boto3", "ours")
            for name in order:
                out = work / f"out-{rep}-{name}"
                if name == "ours":
                    times["pull"].append(timed(pull, out))
                    times["put_file"].append(timed(ours_up, f"up-{rep}-ours"))
                else:
                    times["boto3"].append(timed(boto_down, out, False))
                    shutil.rmtree(out)
                    times["boto3 + sha256"].append(timed(boto_down, out, True))
                    times["upload_file"].append(timed(boto_up, f"up-{rep}-boto"))
                shutil.rmtree(out)
            log(
                f"repeat {rep + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
            )
        return {"bytes": total, "objects": len(objects), "seconds": times, "open_s": opened}
    finally:
        stack.close()
        server.stop()
        os.environ.clear()
        os.environ.update(saved_env)


def main() -> int:
    return entry("s3_throughput")


if __name__ == "__main__":
    raise SystemExit(main())
