"""Provenance: what produced a result (params hash, code version, packages, machine, timings)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import resource
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

PACKAGES = ("torch", "sae-lens", "transformer-lens", "transformers", "tokenizers", "papermill", "numpy", "pandas",
            "scipy")
REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@lru_cache(maxsize=1)
def git_state() -> dict:
    """Commit and dirty flag of the checkout this code runs from (``unknown`` outside a git repo)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", None
    return {"git_commit": commit, "git_dirty": dirty}


@lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": threads, "gpu": gpu}


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def record(params_hash: str, **extra) -> dict:
    """A provenance block for a result file."""
    return {"params_hash": params_hash, **git_state(), "versions": versions(), "machine": machine(), **extra}
