"""The bitsandbytes kernels' wrappers (cpu_kernels.c, cpu_gemv.c): 4-bit nf4/fp4 (fp32 and int16-activation
matmuls, row dequantization) and LLM.int8, over bitsandbytes' own storage. Built and loaded by cpu_kernels.py; every
wrapper checks what the C side will read before handing a pointer over."""

from __future__ import annotations

from typing import Optional, Union

import torch

from litquant.quantization import cpu_kernels as ck
from litquant.quantization.cpu_kernels import _buffer, _f32, _need, _threads

# double quantization: (nested code, nested absmax, offset: a float, or an fp32 tensor of 1 or one per 256 blocks)
DQ = Optional[tuple[torch.Tensor, torch.Tensor, Union[float, torch.Tensor]]]


def _bnb4_args(w, n, k, absmax, lut, dq):
    """Check what the C side reads; returns dq with its offset as an fp32 tensor (a float: the layer's one offset)."""
    if k % 64:
        raise ValueError(f"cpu_kernels: bnb 4-bit needs in_features % 64 == 0, got {k}")
    _need(w, torch.uint8, n * k // 2, "the 4-bit weight")
    _need(lut, torch.float32, 16, "the 4-bit code")
    _need(absmax, torch.uint8 if dq else torch.float32, n * k // 64, "absmax")
    if not dq:
        return None
    nested = -(-n * k // 64 // 256)
    _need(dq[0], torch.float32, 256, "the nested code")
    _need(dq[1], torch.float32, nested, "the nested absmax")
    off = dq[2] if isinstance(dq[2], torch.Tensor) else torch.tensor(float(dq[2]))
    if off.dim() > 1 or off.numel() not in (1, nested):
        raise ValueError(f"cpu_kernels: offset needs 1 or {nested} values, got shape {tuple(off.shape)}")
    _need(off, torch.float32, None, "the offset")
    return dq[0], dq[1], off


def _bnb4_scales(absmax: torch.Tensor, dq) -> tuple:
    """The kernels' (absmax, qabsmax, nested code, nested absmax, offset, offset stride) arguments: fp32 absmax,
    or with double quantization its uint8 codes and what undoes them (one offset, or one per 256 blocks)."""
    if dq is None:
        return absmax.data_ptr(), None, None, None, None, 0
    ncode, nabs, off = dq
    return None, absmax.data_ptr(), ncode.data_ptr(), nabs.data_ptr(), off.data_ptr(), int(off.numel() > 1)


# ---- bitsandbytes 4-bit -------------------------------------------------------------------------------------


def bnb4_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    k: int,
    absmax: torch.Tensor,
    lut: torch.Tensor,
    dq: DQ = None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) fp32, W the (N, K) bnb 4-bit weight `w` with per-64 `absmax` (fp32, or uint8 codes
    with `dq`, see DQ)."""
    x = _f32(x)
    if x.shape[1] != k:
        raise ValueError(f"cpu_kernels: x has {x.shape[1]} features, the weight {k}")
    dq = _bnb4_args(w, n, k, absmax, lut, dq)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    work = torch.empty_like(x)
    # fmt: skip
    ck.lib().lq_bnb4_gemm(
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
    dq: DQ = None,
    rows: tuple[int, int] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    n0, n1 = rows or (0, n)
    dq = _bnb4_args(w, n, k, absmax, lut, dq)
    out = torch.empty(n1 - n0, k, dtype=dtype) if out is None else out
    _need(out, dtype, (n1 - n0) * k, "out")
    if not 0 <= n0 <= n1 <= n or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"cpu_kernels: rows {n0}..{n1} of {n}, dtype {dtype}")
    # fmt: skip
    ck.lib().lq_bnb4_dequant(
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


def bnb4_i16_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    k: int,
    absmax: torch.Tensor,
    lut: torch.Tensor,
    dq: DQ = None,
) -> torch.Tensor:
    """bnb4_matmul through int16 activations per 64-block and the code table at 13 bits (only where ck.i16())."""
    x = _f32(x)
    if x.shape[1] != k:
        raise ValueError(f"cpu_kernels: x has {x.shape[1]} features, the weight {k}")
    dq = _bnb4_args(w, n, k, absmax, lut, dq)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    work = _buffer(ck.lib().lq_bnb4_i16_work(m, k), torch.uint8)
    # fmt: skip
    ck.lib().lq_bnb4_i16_gemm(
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
    work = torch.empty(ck.lib().lq_int8_work(m, k, m // group), dtype=torch.uint8)
    ck.lib().lq_int8_gemm(
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
    ck.lib().lq_int8_dequant(
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
