"""S3 throughput of the artifact store against boto3's own transfer manager.

Question answered: what does our S3Store (create-if-absent multipart uploads with
sha256 checked on the way up, ranged parallel downloads hashed in order on the way
down) cost compared with the plain ``upload_file`` /
``download_file`` of boto3, on the same bytes, the same server, in the same run?

A bundle-like set of files (a few large safetensors-sized shards plus small
manifest-like files, >= 500 MB by default) is uploaded and downloaded ``--repeats``
times by each method, alternating, to fresh keys each time; medians are reported
as MB/s (10^6 bytes/s) with the ratio ours / boto3. "boto3 + sha256" adds the
separate hashing pass a caller of plain boto3 would need to verify what it
downloaded, which our store does while streaming.

The script starts and stops its own SeaweedFS (``weed mini`` on loopback, free
ports) through ``tests.services.seaweed.SeaweedServer``:

    .venv/bin/python benchmarks/s3_throughput.py [--size-mb 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boto3.s3.transfer import TransferConfig  # noqa: E402

from storage.store import S3Store  # noqa: E402
from tests.services.seaweed import SeaweedServer  # noqa: E402

MiB = 1024 * 1024


def make_bundle(root: Path, total_mb: int, shards: int) -> list[tuple[str, Path, str]]:
    """Shards of random bytes (incompressible, like fp32 tensors) plus small files."""
    root.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Path, str]] = []
    shard_size = total_mb * MiB // shards
    for i in range(shards):
        path = root / f"shard-{i:03d}.safetensors"
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            left = shard_size + i * 4099  # uneven sizes: last parts are short
            while left:
                chunk = os.urandom(min(left, 8 * MiB))
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        files.append((f"objects/{digest.hexdigest()}", path, digest.hexdigest()))
    for i in range(4):
        data = (f'{{"manifest": {i}, "pad": "' + "x" * (2000 * (i + 1)) + '"}').encode()
        path = root / f"manifest-{i}.json"
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        files.append((f"manifests/{sha}.json", path, sha))
    return files


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512, help="total bundle size (MiB)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="s3bench-", dir=args.workdir))
    server = SeaweedServer(work / "seaweed", volume_size_limit_mb=1024)
    try:
        os.environ.update(server.env())
        server.start()
        files = make_bundle(work / "bundle", args.size_mb, args.shards)
        total = sum(path.stat().st_size for _, path, _ in files)
        client = server.client(max_pool_connections=32)
        bucket = server.new_bucket("bench")
        store = S3Store(bucket, endpoint_url=server.endpoint_url, region=server.region)
        transfer = TransferConfig()  # boto3 defaults: 8 MiB parts, 10 threads
        results: dict[str, dict[str, list[float]]] = {
            name: {"up": [], "down": []} for name in ("ours", "boto3", "boto3 + sha256")
        }

        Bundle = list[tuple[str, Path, str]]

        def ours_up(prefix: str, files: Bundle) -> None:
            for key, path, sha in files:
                assert store.put_file(f"{prefix}/{key}", path, sha256=sha)

        def ours_down(prefix: str, files: Bundle, out: Path) -> None:
            for key, _, sha in files:
                store.get_file(f"{prefix}/{key}", out / key, sha256=sha)

        def boto_up(prefix: str, files: Bundle) -> None:
            for key, path, _ in files:
                client.upload_file(str(path), bucket, f"{prefix}/{key}", Config=transfer)

        def boto_down(prefix: str, files: Bundle, out: Path, verify: bool = False) -> None:
            for key, _, sha in files:
                dest = out / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, f"{prefix}/{key}", str(dest), Config=transfer)
                if verify:
                    assert file_sha256(dest) == sha

        for rep in range(args.repeats):
            # Alternate which method goes first, so neither always meets a cold server.
            for name in ("ours", "boto3") if rep % 2 == 0 else ("boto3", "ours"):
                prefix = f"r{rep}-{name}"
                out = work / f"out-{prefix}"
                if name == "ours":
                    results[name]["up"].append(timed(ours_up, prefix, files))
                    results[name]["down"].append(timed(ours_down, prefix, files, out))
                else:
                    results[name]["up"].append(timed(boto_up, prefix, files))
                    results[name]["down"].append(timed(boto_down, prefix, files, out))
                    shutil.rmtree(out)
                    results["boto3 + sha256"]["up"].append(results[name]["up"][-1])
                    results["boto3 + sha256"]["down"].append(
                        timed(boto_down, prefix, files, out, verify=True)
                    )
                shutil.rmtree(out)
                for key, _, _ in files:
                    store.delete(f"{prefix}/{key}")

        def rate(seconds: list[float]) -> float:
            return total / statistics.median(seconds) / 1e6

        print(
            f"\nS3 throughput, {total / 1e6:.0f} MB in {len(files)} files "
            f"({args.shards} shards), median of {args.repeats}, SeaweedFS on loopback, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n"
        )
        print("| method | upload MB/s | download MB/s | upload ratio | download ratio |")
        print("|---|---:|---:|---:|---:|")
        base_up, base_down = rate(results["boto3"]["up"]), rate(results["boto3"]["down"])
        for name, times in results.items():
            up_rate, down_rate = rate(times["up"]), rate(times["down"])
            print(
                f"| {name} | {up_rate:.0f} | {down_rate:.0f} | "
                f"{up_rate / base_up:.2f} | {down_rate / base_down:.2f} |"
            )
        print(
            "\nratio = method / plain boto3. ours: sha256 checked while uploading and "
            "downloading, create-if-absent; plain boto3: neither."
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
