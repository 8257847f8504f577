"""litquant's CPU kernels (cpu_kernels.c, cpu_gemv.c): built on first use with the system C compiler, called through
ctypes. This file builds and loads the library and holds what every wrapper shares (argument checks, scratch, the
tiled dequantize + BLAS path, the bf16 GEMV); the wrappers by family live in cpu_bnb.py and cpu_gptq.py and are
re-exported here, so callers use `cpu_kernels.<name>`.

Why a C file and not torch.compile or a torch kernel: docs/ARCHITECTURE.md ("CPU kernels") has the measurements.
The build is `cc -O3 -march=native -fopenmp -shared`, cached under ~/.cache/litquant/kernels keyed by the source,
the compiler and the CPU; without a compiler (or with LITQUANT_CPU_KERNELS=0) `lib()` is None and the callers keep
their torch paths. Every function takes contiguous CPU tensors; activations and outputs are fp32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("cpu_gemv.c"))  # compiled into one library
HEADER = SOURCE.with_name("cpu_simd.h")  # included by both
TILE_ELEMENTS = 1 << 22  # wide inputs: dequantize this many weights at a time, then matmul (bounded scratch)
_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lq_version": ([], _INT),
    "lq_lanes": ([], _INT),
    "lq_vnni": ([], _INT),
    "lq_gptq_tile": ([], _INT),
    "lq_bnb4_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _INT], None),
    "lq_bnb4_dequant": ([_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _P, _INT, _INT], None),
    "lq_int8_gemm": ([_P, _I64, _I64, _P, _P, _I64, _F32, _I64, _P, _P, _INT], None),
    "lq_int8_work": ([_I64, _I64, _I64], _I64),
    "lq_int8_dequant": ([_P, _I64, _I64, _P, _I64, _I64, _P, _INT, _INT], None),
    "lq_gptq_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _INT, _I64, _I64, _INT, _P, _P, _INT], None),
    "lq_gptq_work": ([_I64, _I64, _I64, _INT, _INT], _I64),
    "lq_gptq_columns": (
        [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _INT, _INT, _P, _INT],
        None,
    ),
    "lq_gptq_dequant_t": ([_P, _I64, _I64, _P, _P, _P, _INT, _I64, _I64, _P, _INT, _INT], None),
    "lq_bf16_gram_ok": ([], _INT),
    "lq_bf16_gram": ([_P, _I64, _I64, _I64, _P, _I64, _F32, _F32, _INT], None),
    "lq_f32_gram": ([_P, _I64, _I64, _I64, _P, _I64, _F32, _F32, _INT], None),
    "lq_i16_ok": ([], _INT),
    "lq_bnb4_i16_work": ([_I64, _I64], _I64),
    "lq_bnb4_i16_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _INT], None),
    "lq_gptq_i16_block": ([_I64], _I64),
    "lq_gptq_i16_work": ([_I64, _I64, _I64, _I64, _INT], _I64),
    "lq_gptq_i16_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _I64, _P, _P, _INT], None),
    "lq_bf16_gemm": ([_P, _I64, _I64, _P, _I64, _P, _INT], None),
}
build_error: Optional[str] = None  # why lib() is None, for the one-line notice


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> Optional[str]:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _extra_flags() -> tuple[str, ...]:
    """LITQUANT_KERNEL_CFLAGS, e.g. "-mno-avx512f" to build the AVX2 kernels on an AVX-512 machine (benchmarks of
    what other CPUs run)."""
    return tuple(os.environ.get("LITQUANT_KERNEL_CFLAGS", "").split())


def _cache_dir() -> Path:
    root = os.environ.get("LITQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "litquant"
    )
    return Path(root).expanduser() / "kernels"


def _command(cc: str, flags: tuple[str, ...]) -> list[str]:
    # -ffp-contract=off: a*b+c stays two roundings where bitsandbytes has two (the kernels' FMAs are intrinsics)
    return [
        cc,
        "-O3",
        "-march=native",
        *flags,
        "-fopenmp",
        "-fPIC",
        "-shared",
        "-ffp-contract=off",
        "-fno-math-errno",
        "-fno-trapping-math",
        *map(str, SOURCES),
    ]


def _build(cmd: list[str], so: Path) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=so.stem, suffix=".so", dir=so.parent)
    os.close(fd)
    cmd = [*cmd, "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise OSError(f"{' '.join(cmd[:3])} failed: {(r.stderr.strip().splitlines() or ['?'])[0]}")
        os.replace(tmp, so)  # atomic: a concurrent build of the same key writes the same bytes
    except subprocess.SubprocessError as e:
        raise OSError(f"{cmd[0]} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def lib() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (not Linux, no compiler, LITQUANT_CPU_KERNELS=0, or the build failed)."""
    global build_error
    if os.environ.get("LITQUANT_CPU_KERNELS", "1") == "0":
        build_error = "disabled by LITQUANT_CPU_KERNELS=0"
        return None
    try:
        return load(_extra_flags())
    except OSError as e:
        build_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None


@functools.cache
def load(flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (once per source, compiler, CPU and flags) and load the kernels; OSError when that is not possible.
    `flags` are extra compiler flags, e.g. ("-mno-avx512f",) for the AVX2 build."""
    if sys.platform != "linux":
        raise OSError(f"not built on {sys.platform}")
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (install gcc, or set CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"{cc} --version failed: {e}") from None
    cmd = _command(cc, flags)
    key_src = (
        b"".join(s.read_bytes() for s in SOURCES)
        + HEADER.read_bytes()
        + version.encode()
        + _cpu_id().encode()
        + " ".join(cmd).encode()
    )
    so = _cache_dir() / f"litquant_cpu_{hashlib.sha256(key_src).hexdigest()[:16]}.so"
    if not so.is_file():
        _build(cmd, so)
    torch.get_num_threads()  # torch (and its libgomp) is loaded first, so the kernels share its OpenMP runtime
    handle = ctypes.CDLL(str(so))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = args, res
    return handle


def isa() -> str:
    """What the kernels were compiled for: avx512, avx2 or scalar ('' when unavailable)."""
    k = lib()
    return "" if k is None else {16: "avx512", 8: "avx2"}.get(k.lq_lanes(), "scalar")


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can take this input: a CPU tensor, and the library built."""
    return x.device.type == "cpu" and lib() is not None


def vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI / AVX-VNNI) the kernels were built with."""
    return bool(lib().lq_vnni())


def lanes() -> int:
    """The vector width in floats: the GPTQ kernel's output columns per vector (out_features a multiple) and the
    bf16 GEMV's input step (in_features a multiple)."""
    return lib().lq_gptq_tile()


_scratch: dict[torch.dtype, torch.Tensor] = {}


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused scratch buffer (allocating 16 MB per call would page-fault it in every time)."""
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def tiled_linear(
    x: torch.Tensor, n: int, k: int, dequant, transpose: bool = False, step: int = 1, kn: bool = False
) -> torch.Tensor:
    """x @ W^T (or x @ W with transpose=True, for the input gradient) in x's dtype, with the (n, k) weight
    dequantized by `dequant(n0, n1, dtype, out)` at most TILE_ELEMENTS at a time into a reused buffer: memory
    stays at the quantized size plus one tile, and the matmul is torch's (BLAS). `dequant` fills rows n0..n1 of W
    as an (n1 - n0, k) tile, or with kn=True columns of W^T as a (k, n1 - n0) tile; tiles are multiples of `step`.
    The matmul runs in bf16 for bf16 inputs on CPUs with native bf16, else in fp32."""
    from litquant.precision import cpu_has_native_bf16

    # bf16 tiles only where bf16 matmuls are native: without, torch's bf16 GEMM runs at ~1/3 of its fp32 one
    dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32
    x2 = x.reshape(-1, n if transpose else k).to(dtype)
    rows = min(n, max(step, TILE_ELEMENTS // k // step * step))
    out = torch.zeros(x2.shape[0], k, dtype=dtype) if transpose else None
    parts = []
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        buf = _buffer((n1 - n0) * k, dtype)
        w = dequant(n0, n1, dtype, buf.view(k, n1 - n0) if kn else buf.view(n1 - n0, k))
        w = w.t() if kn else w  # (n1 - n0, k) either way
        if transpose:
            out.addmm_(x2[:, n0:n1], w)
        elif rows >= n:
            return (x2 @ w.t()).to(x.dtype)
        else:
            parts.append(x2 @ w.t())
    return (out if transpose else torch.cat(parts, dim=1)).to(x.dtype)


def _need(t: torch.Tensor, dtype: torch.dtype, numel: Optional[int] = None, what: str = "tensor") -> None:
    """The C side trusts pointers: check what it will read (dtype, layout, size) before handing one over."""
    if (
        t.dtype != dtype
        or t.device.type != "cpu"
        or not t.is_contiguous()
        or (numel is not None and t.numel() < numel)
    ):
        raise ValueError(
            f"cpu_kernels: {what} must be a contiguous CPU {dtype} of >= {numel} elements, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})"
        )


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def i16() -> bool:
    """Whether the int16-activation decode kernels are built (AVX2 builds: cpu_gemv.c). LITQUANT_EXACT_KERNELS=1
    keeps the fp32 kernels, whose only rounding is fp32's."""
    return bool(lib().lq_i16_ok()) and os.environ.get("LITQUANT_EXACT_KERNELS", "0") in ("0", "false", "")


# ---- bf16 weights ------------------------------------------------------------------------------------------------


def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) fp32 for a bf16 weight (N, K): fp32 products of the stored weights, fp32 sums.
    K must be a multiple of lanes()."""
    x = _f32(x)
    m, k = x.shape
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != k or k % lanes():
        raise ValueError(
            f"cpu_kernels: x has {k} features, the weight {tuple(w.shape)} (a multiple of {lanes()})"
        )
    _need(w, torch.bfloat16, n * k, "the bf16 weight")
    y = torch.empty(m, n, dtype=torch.float32)
    lib().lq_bf16_gemm(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(), _threads())
    return y


# The wrappers by family (re-exported here: callers and tests use `cpu_kernels.<name>`)
from litquant.quantization.cpu_bnb import (  # noqa: E402
    bnb4_dequantize,
    bnb4_i16_matmul,
    bnb4_matmul,
    int8_dequantize,
    int8_matmul,
)
from litquant.quantization.cpu_gptq import (  # noqa: E402
    GRAM_ROWS,
    bf16_gram,
    bf16_gram_ok,
    f32_gram,
    gptq_columns,
    gptq_dequantize_t,
    gptq_i16_matmul,
    gptq_i16_ok,
    gptq_matmul,
    gptq_ordered,
)

__all__ = [
    "lib", "load", "isa", "usable", "vnni", "lanes", "i16", "tiled_linear", "bf16_matmul", "bnb4_matmul",
    "bnb4_i16_matmul", "bnb4_dequantize", "int8_matmul", "int8_dequantize", "gptq_ordered", "gptq_matmul",
    "gptq_i16_ok", "gptq_i16_matmul", "gptq_dequantize_t", "gptq_columns", "bf16_gram_ok", "bf16_gram", "f32_gram",
    "GRAM_ROWS",
]  # fmt: skip
