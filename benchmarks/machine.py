"""Facts about the machine, the installed packages and the checkout a result came from.

Recorded in every result file at run time, never typed by hand, so a page cannot claim
a date or a machine it was not measured on.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = (
    "randes-pipeline",
    "torch",
    "numpy",
    "safetensors",
    "transformers",
    "tokenizers",
    "sentence-transformers",
    "scikit-learn",
    "boto3",
    "prefect",
    "psutil",
    "matplotlib",
)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def machine_facts() -> dict[str, Any]:
    """CPU, memory, OS and accelerator, from platform, os and psutil (and torch if present)."""
    import psutil

    facts: dict[str, Any] = {
        "system": platform.system(),
        "release": platform.release(),
        "arch": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return facts


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state(root: Path = ROOT) -> tuple[str, bool]:
    """(commit, dirty) of the checkout, or ("unknown", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def describe(facts: dict[str, Any], vers: dict[str, str]) -> str:
    """One line for a page header: '2-core x86_64 CPU, 24 GiB RAM, Linux 6.8, torch 2.13.0'."""
    mem = facts.get("memory_bytes", 0) / 2**30
    gpu = f", GPU {facts['gpu']}" if facts.get("gpu") else ""
    torch_v = f", torch {vers['torch']}" if "torch" in vers else ""
    return (
        f"{facts.get('cpus')}-core {facts.get('processor')} CPU, {mem:.0f} GiB RAM{gpu}, "
        f"{facts.get('system')} {facts.get('release')}, Python {facts.get('python')}{torch_v}"
    )
