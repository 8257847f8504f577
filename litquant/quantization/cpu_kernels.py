"""litquant's CPU kernels (cpu_kernels.c): built on first use with the system C compiler, called through ctypes.

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
    "lq_bnb4_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _F32, _P, _P, _P, _INT], None),
    "lq_bnb4_dequant": ([_P, _I64, _I64, _P, _P, _P, _P, _F32, _P, _I64, _I64, _P, _INT, _INT], None),
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
    "lq_bnb4_i16_gemm": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _F32, _P, _P, _P, _INT], None),
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
    """Output columns the GPTQ kernel handles per vector (out_features must be a multiple)."""
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


def _bnb4_args(w, n, k, absmax, lut, dq) -> None:
    if k % 64:
        raise ValueError(f"cpu_kernels: bnb 4-bit needs in_features % 64 == 0, got {k}")
    _need(w, torch.uint8, n * k // 2, "the 4-bit weight")
    _need(lut, torch.float32, 16, "the 4-bit code")
    _need(absmax, torch.uint8 if dq else torch.float32, n * k // 64, "absmax")
    if dq:
        _need(dq[0], torch.float32, 256, "the nested code")
        _need(dq[1], torch.float32, -(-n * k // 64 // 256), "the nested absmax")


def _bnb4_scales(absmax: torch.Tensor, dq) -> tuple:
    """The kernels' (absmax, qabsmax, nested code, nested absmax, offset) arguments: fp32 absmax, or with double
    quantization its uint8 codes and what undoes them."""
    if dq is None:
        return absmax.data_ptr(), None, None, None, 0.0
    ncode, nabs, off = dq
    return None, absmax.data_ptr(), ncode.data_ptr(), nabs.data_ptr(), off


def _gptq_args(qweight, qzeros, scales, g_idx, bits) -> None:
    groups, n = scales.shape
    k = g_idx.numel()
    if bits not in (2, 4, 8):
        raise ValueError(f"cpu_kernels: GPTQ bits must be 2, 4 or 8, got {bits}")
    _need(qweight, torch.int32, k * bits // 32 * n, "qweight")
    _need(qzeros, torch.int32, groups * n * bits // 32, "qzeros")
    _need(scales, torch.float16, groups * n, "scales")
    _need(g_idx, torch.int32, k, "g_idx")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError("cpu_kernels: g_idx out of range")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


# ---- bitsandbytes 4-bit -------------------------------------------------------------------------------------


def bnb4_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    k: int,
    absmax: torch.Tensor,
    lut: torch.Tensor,
    dq: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) fp32, W the (N, K) bnb 4-bit weight `w` with per-64 `absmax` (fp32, or uint8 codes
    with dq = (nested_code, nested_absmax, offset))."""
    x = _f32(x)
    if x.shape[1] != k:
        raise ValueError(f"cpu_kernels: x has {x.shape[1]} features, the weight {k}")
    _bnb4_args(w, n, k, absmax, lut, dq)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    work = torch.empty_like(x)
    # fmt: skip
    lib().lq_bnb4_gemm(
        x.data_ptr(),
        x.shape[0],
        k,
        w.data_ptr(),
        n,
        *_bnb4_scales(absmax, dq),
        lut.data_ptr(),
        y.data_ptr(),
        work.data_ptr(),
        _threads(),
    )
    return y


def bnb4_dequantize(
    w: torch.Tensor,
    n: int,
    k: int,
    absmax: torch.Tensor,
    lut: torch.Tensor,
    dq: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
    rows: tuple[int, int] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    n0, n1 = rows or (0, n)
    _bnb4_args(w, n, k, absmax, lut, dq)
    out = torch.empty(n1 - n0, k, dtype=dtype) if out is None else out
    _need(out, dtype, (n1 - n0) * k, "out")
    if not 0 <= n0 <= n1 <= n or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"cpu_kernels: rows {n0}..{n1} of {n}, dtype {dtype}")
    # fmt: skip
    lib().lq_bnb4_dequant(
        w.data_ptr(),
        n,
        k,
        *_bnb4_scales(absmax, dq),
        lut.data_ptr(),
        n0,
        n1,
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        _threads(),
    )
    return out


def i16() -> bool:
    """Whether the int16-activation decode kernels are built (AVX2 builds: cpu_gemv.c). LITQUANT_EXACT_KERNELS=1
    keeps the fp32 kernels, whose only rounding is fp32's."""
    return bool(lib().lq_i16_ok()) and os.environ.get("LITQUANT_EXACT_KERNELS", "0") in ("0", "")


def bnb4_i16_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    k: int,
    absmax: torch.Tensor,
    lut: torch.Tensor,
    dq: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
) -> torch.Tensor:
    """bnb4_matmul through int16 activations per 64-block and the code table at 13 bits (only where i16())."""
    x = _f32(x)
    if x.shape[1] != k:
        raise ValueError(f"cpu_kernels: x has {x.shape[1]} features, the weight {k}")
    _bnb4_args(w, n, k, absmax, lut, dq)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    work = _buffer(lib().lq_bnb4_i16_work(m, k), torch.uint8)
    # fmt: skip
    lib().lq_bnb4_i16_gemm(
        x.data_ptr(),
        m,
        k,
        w.data_ptr(),
        n,
        *_bnb4_scales(absmax, dq),
        lut.data_ptr(),
        y.data_ptr(),
        work.data_ptr(),
        _threads(),
    )
    return y


# ---- int8 ---------------------------------------------------------------------------------------------------


def int8_matmul(
    x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor, threshold: float, group: Optional[int] = None
) -> torch.Tensor:
    """LLM.int8: x (M, K) @ W^T -> (M, N) fp32, W = w (N, K) int8 * absmax / 127; outlier columns (any |x| >=
    threshold within a group of `group` consecutive rows, one sequence's tokens; default: all M rows) in fp32,
    the rest quantized per row of x and multiplied exactly in int32."""
    x = _f32(x)
    m, k = x.shape
    n = w.shape[0]
    group = group or m
    _need(w, torch.int8, n * k, "the int8 weight")
    _need(absmax, torch.float32, n, "absmax")
    if w.shape[1] != k:
        raise ValueError(f"cpu_kernels: x has {k} features, the weight {w.shape[1]}")
    if m % group:
        raise ValueError(f"cpu_kernels: {m} rows do not split into outlier groups of {group}")
    y = torch.empty(m, n, dtype=torch.float32)
    work = torch.empty(lib().lq_int8_work(m, k, m // group), dtype=torch.uint8)
    lib().lq_int8_gemm(
        x.data_ptr(),
        m,
        k,
        w.data_ptr(),
        absmax.data_ptr(),
        n,
        threshold,
        group,
        y.data_ptr(),
        work.data_ptr(),
        _threads(),
    )
    return y


def int8_dequantize(
    w: torch.Tensor,
    absmax: torch.Tensor,
    rows: tuple[int, int] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    n, k = w.shape
    n0, n1 = rows or (0, n)
    _need(w, torch.int8, n * k, "the int8 weight")
    _need(absmax, torch.float32, n, "absmax")
    out = torch.empty(n1 - n0, k, dtype=dtype) if out is None else out
    _need(out, dtype, (n1 - n0) * k, "out")
    if not 0 <= n0 <= n1 <= n or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"cpu_kernels: rows {n0}..{n1} of {n}, dtype {dtype}")
    lib().lq_int8_dequant(
        w.data_ptr(),
        n,
        k,
        absmax.data_ptr(),
        n0,
        n1,
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        _threads(),
    )
    return out


# ---- GPTQ ---------------------------------------------------------------------------------------------------


def gptq_ordered(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether g_idx[k] == k // group_size (no act-order): the kernel's faster path."""
    k = g_idx.numel()
    gs = group_size if group_size > 0 else k
    return bool(torch.equal(g_idx, torch.arange(k, dtype=g_idx.dtype) // gs))


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    ordered: bool,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) fp32 for an AutoGPTQ layer (bits 2/4/8, N a multiple of `lib().lq_gptq_tile()`);
    `ordered` = gptq_ordered(g_idx, group_size)."""
    x = _f32(x)
    m, k = x.shape
    n, groups = scales.shape[1], scales.shape[0]
    _gptq_args(qweight, qzeros, scales, g_idx, bits)
    if g_idx.numel() != k or n % lib().lq_gptq_tile():
        raise ValueError(
            f"cpu_kernels: x has {k} features (g_idx {g_idx.numel()}); out_features {n} must be a "
            f"multiple of {lib().lq_gptq_tile()}"
        )
    y = torch.empty(m, n, dtype=torch.float32)
    work = torch.empty(lib().lq_gptq_work(m, n, groups, int(ordered), _threads()), dtype=torch.float32)
    lib().lq_gptq_gemm(
        x.data_ptr(),
        m,
        k,
        qweight.data_ptr(),
        n,
        qzeros.data_ptr(),
        scales.data_ptr(),
        g_idx.data_ptr(),
        int(ordered),
        group_size if group_size > 0 else k,
        groups,
        bits,
        y.data_ptr(),
        work.data_ptr(),
        _threads(),
    )
    return y


def gptq_i16_ok(bits: int, group_size: int, k: int, n: int, ordered: bool) -> bool:
    """Whether gptq_i16_matmul serves a layer: 4 bits, groups in order, whole groups of a multiple of 8 inputs."""
    gs = group_size if group_size > 0 else k
    return (
        i16()
        and bits == 4
        and ordered
        and n % 8 == 0
        and gs % 8 == 0
        and k % gs == 0
        and lib().lq_gptq_i16_block(gs) <= 4096
    )


def gptq_i16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x (M, K) @ W^T for a 4-bit AutoGPTQ layer with groups in order, through int16 activations (exact integer
    products of the codes; only where gptq_i16_ok)."""
    x = _f32(x)
    m, k = x.shape
    groups, n = scales.shape
    gs = group_size if group_size > 0 else k
    _need(qweight, torch.int32, k // 8 * n, "qweight")
    _need(qzeros, torch.int32, groups * n // 8, "qzeros")
    _need(scales, torch.float16, groups * n, "scales")
    if groups != k // gs or qweight.shape != (k // 8, n):
        raise ValueError(f"cpu_kernels: GPTQ layer of {k} inputs in groups of {gs} has {groups} scale rows")
    y = torch.empty(m, n, dtype=torch.float32)
    block = lib().lq_gptq_i16_block(gs)
    work = _buffer(lib().lq_gptq_i16_work(m, k, n, block, _threads()), torch.uint8)
    # fmt: skip
    lib().lq_gptq_i16_gemm(
        x.data_ptr(),
        m,
        k,
        qweight.data_ptr(),
        n,
        qzeros.data_ptr(),
        scales.data_ptr(),
        gs,
        y.data_ptr(),
        work.data_ptr(),
        _threads(),
    )
    return y


def gptq_dequantize_t(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    cols: tuple[int, int] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Columns [n0, n1) of W^T (K, n1 - n0): the dequantized GPTQ weight, transposed (qweight's own direction)."""
    n, k = scales.shape[1], g_idx.shape[0]
    n0, n1 = cols or (0, n)
    _gptq_args(qweight, qzeros, scales, g_idx, bits)
    if (
        not 0 <= n0 <= n1 <= n
        or n0 % lanes()
        or (n1 - n0) % lanes()
        or dtype not in (torch.float32, torch.bfloat16)
    ):
        raise ValueError(f"cpu_kernels: columns {n0}..{n1} of {n} (multiples of {lanes()}), dtype {dtype}")
    out = torch.empty(k, n1 - n0, dtype=dtype) if out is None else out
    _need(out, dtype, k * (n1 - n0), "out")
    lib().lq_gptq_dequant_t(
        qweight.data_ptr(),
        n,
        k,
        qzeros.data_ptr(),
        scales.data_ptr(),
        g_idx.data_ptr(),
        bits,
        n0,
        n1,
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        _threads(),
    )
    return out


# ---- GPTQ, the algorithm --------------------------------------------------------------------------------------


def gptq_columns(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    sym: bool,
    gs: int = 0,
    col_group: Optional[torch.Tensor] = None,
    table: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """One lazy-update block of GPTQ on W1 (count, rows): each row of W1 is a column of the weight, in processing
    order, updated in place. scale/zero (rows,) hold the current group's grid (updated when a group starts: every
    `gs` columns, or per column from `table` with static groups). -> (Q, Err, new grids (n, rows) x 2, sum err^2)."""
    count, rows = W1.shape
    _need(W1, torch.float32, count * rows, "W1")
    _need(scale, torch.float32, rows, "scale")
    _need(zero, torch.float32, rows, "zero")
    if Hinv1.dtype != torch.float32 or Hinv1.stride(1) != 1 or Hinv1.shape != (count, count):
        raise ValueError("cpu_kernels: Hinv1 must be a row-major fp32 (count, count) block")
    if col_group is not None:
        _need(col_group, torch.int64, count, "col_group")
        _need(table[0], torch.float32, (int(col_group.max()) + 1) * rows, "the group scales")
        _need(table[1], torch.float32, (int(col_group.max()) + 1) * rows, "the group zeros")
    Q, Err = torch.empty_like(W1), torch.empty_like(W1)
    n_new = (count + gs - 1) // gs if gs > 0 else 0
    new_s, new_z = (
        torch.empty(n_new, rows, dtype=torch.float32),
        torch.empty(n_new, rows, dtype=torch.float32),
    )
    loss = ctypes.c_double(0.0)
    ts, tz = table if table is not None else (None, None)
    lib().lq_gptq_columns(
        W1.data_ptr(),
        rows,
        rows,
        count,
        Hinv1.data_ptr(),
        Hinv1.stride(0),
        Q.data_ptr(),
        Err.data_ptr(),
        scale.data_ptr(),
        zero.data_ptr(),
        new_s.data_ptr(),
        new_z.data_ptr(),
        gs,
        _ptr(col_group),
        _ptr(ts),
        _ptr(tz),
        bits,
        int(sym),
        ctypes.addressof(loss),
        _threads(),
    )
    return Q, Err, new_s, new_z, loss.value


def bf16_gram_ok() -> bool:
    """Whether the kernels were built with AVX512-BF16 (bf16_gram is available)."""
    return lib() is not None and bool(lib().lq_bf16_gram_ok())


GRAM_ROWS = 2048  # rows of x packed at a time: the packed copy stays a few MB wide of x's width


def bf16_gram(x: torch.Tensor, H: torch.Tensor, beta: float, alpha: float) -> None:
    """H = beta * H + alpha * x^T x on the upper triangle of H (fp32 [n, n], contiguous), x bf16 [k, n]: exact bf16
    products summed in fp32. Only where bf16_gram_ok()."""
    _gram(x, H, beta, alpha, torch.bfloat16)


def f32_gram(x: torch.Tensor, H: torch.Tensor, beta: float, alpha: float) -> None:
    """H = beta * H + alpha * x^T x on the upper triangle of H (fp32 [n, n], contiguous), x fp32 [k, n]."""
    _gram(x, H, beta, alpha, torch.float32)


def _gram(x: torch.Tensor, H: torch.Tensor, beta: float, alpha: float, dtype: torch.dtype) -> None:
    k, n = x.shape
    _need(H, torch.float32, n * n, "H")
    if x.dtype != dtype or H.shape != (n, n):
        raise ValueError(f"cpu_kernels: the Hessian kernels take x [k, n] in {dtype} and fp32 H [n, n]")
    for r0 in range(0, k, GRAM_ROWS):  # later chunks add to what the first one rescaled
        chunk = x[r0 : r0 + GRAM_ROWS]
        rows = chunk.shape[0]
        if dtype == torch.bfloat16:
            npad, rpad = -(-n // 32) * 32, rows % 2
            chunk = (
                torch.nn.functional.pad(chunk, (0, npad - n, 0, rpad)) if (npad, rpad) != (n, 0) else chunk
            )
            # panels of 16 columns, row pairs interleaved: P[c][p][l][2] = x[2p + t, 16c + l]
            packed = chunk.contiguous().view(-1, 2, npad // 16, 16).permute(2, 0, 3, 1).contiguous()
            lib().lq_bf16_gram(
                packed.data_ptr(), (rows + rpad) // 2, npad, n, H.data_ptr(), n, beta, alpha, _threads()
            )
        else:
            v, npad = lanes(), -(-n // 48) * 48
            chunk = torch.nn.functional.pad(chunk, (0, npad - n)) if npad != n else chunk
            packed = chunk.contiguous().view(rows, npad // v, v).transpose(0, 1).contiguous()  # P[c][k][l]
            lib().lq_f32_gram(packed.data_ptr(), rows, npad, n, H.data_ptr(), n, beta, alpha, _threads())
        beta = 1.0


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
