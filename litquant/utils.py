"""Small shared helpers: memory reporting, weight accounting, seeding."""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.nn as nn


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size since the last reset
    (Linux: VmHWM, which starts afresh at exec, unlike ru_maxrss, which a child inherits from a big parent)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak: CUDA's allocator stats, or on Linux the resident-set high-water mark (clear_refs 5)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from process start
        pass


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's malloc_trim). Streaming a checkpoint through quantization
    frees a full-precision buffer per layer; glibc keeps such holes in its heap, and over a whole model they add up to
    a large share of the quantized size. A no-op where there is no glibc."""
    if _glibc():
        _libc.malloc_trim(0)


def memory_used_line(device: torch.device | str) -> str:
    return f"Memory used: {peak_memory_bytes(device) / 1e9:.02f} GB"


def _storage_tensors(model: nn.Module):
    # bnb keeps the quant state (absmax, code, nested state) outside parameters: modules may expose it.
    seen = set()
    for module in model.modules():
        extra = getattr(module, "litquant_storage", None)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if callable(extra):
            tensors += list(extra())
        for name, t in tensors:
            if t is None or id(t) in seen or t.is_meta:
                continue
            seen.add(id(t))
            yield name, t


def weight_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's weights (and quantization constants), grouped by storage dtype."""
    out: dict[str, int] = defaultdict(int)
    for _, t in _storage_tensors(model):
        out[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
    return dict(out)


def weight_bytes(model: nn.Module) -> int:
    return sum(weight_bytes_by_dtype(model).values())


def weights_line(model: nn.Module) -> str:
    by = weight_bytes_by_dtype(model)
    parts = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
    return f"Weights: {sum(by.values()) / 1e9:.03f} GB ({parts})"


def num_parameters(model: nn.Module, requires_grad: Optional[bool] = None) -> int:
    return sum(
        p.numel() for p in model.parameters() if requires_grad is None or p.requires_grad == requires_grad
    )


def configure_cpu_threads(model: nn.Module, device: torch.device | str) -> int:
    """Use one intra-op thread on CPU for small models unless the user chose (OMP_NUM_THREADS).

    The matmuls of a model of a few million parameters are too small to split across cores, and when
    any other process shares the cores, the threads' barriers make each step ~10x slower (measured on the
    bundled model: 26 vs 290 tokens/sec with one busy neighbour). Large models keep torch's default."""
    import os

    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    if num_parameters(model) < 50_000_000:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def best_time(fn: Callable[[], object], repeats: int = 2) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one warm-up call (the runtime choices that time two
    paths on this machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)
