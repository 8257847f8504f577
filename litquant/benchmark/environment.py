"""The machine a benchmark runs on: versions, CPU or GPU name, commit, memory bandwidth, available memory."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
# CPU workers: glibc serves allocations from 1 MiB up with mmap and returns them to the OS when freed. Its default
# threshold grows with the sizes freed, after which freed per-layer temporaries (loading, quantizing) stay in the
# heap and the peak resident set of the same run varies by hundreds of MB: this keeps "peak memory" what a mode
# needs, not allocator luck. (Decode-time tensors are far below 1 MiB: speed is unaffected.)
CPU_MMAP_THRESHOLD = "1048576"

# peak memory bandwidth (bytes/s) by device-name fragment, most specific first
BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("T4", 0.32e12),
]


def pick_device(accelerator: str) -> torch.device:
    """'auto', 'cuda' or 'cpu' -> the device the benchmark runs on."""
    from litquant.precision import pick_accelerator

    return torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> Optional[str]:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": version("bitsandbytes"),
        "lightning": version("lightning"),
        "python": platform.python_version(),
        "malloc_mmap_threshold": (
            os.environ.get("MALLOC_MMAP_THRESHOLD_", CPU_MMAP_THRESHOLD) if device.type == "cpu" else None
        ),
        "commit": git_commit(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """HEAD of the repository litquant runs from, '+dirty' when it has uncommitted changes (None: not a repo)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def peak_bandwidth(device_name: str) -> Optional[float]:
    return next((bw for frag, bw in BANDWIDTH if frag in device_name), None)


def available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measured_cpu_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Memory bandwidth (bytes/s) of this machine's CPU with all of torch's threads, best of `repeats`, over arrays of
    `mb` MB (far beyond the caches): "triad" a = b + s * c (3 arrays' bytes per pass, as STREAM counts them) and
    "read" a reduction over one array, the access decode makes: tok/s <= read bandwidth / bytes read per token."""
    import time

    n = mb * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    torch.add(b, c, alpha=0.5, out=a)  # page the output in

    def best(fn) -> float:
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    triad = 3 * n * 4 / best(lambda: torch.add(b, c, alpha=0.5, out=a))
    return {"triad": triad, "read": n * 4 / best(lambda: b.sum())}
