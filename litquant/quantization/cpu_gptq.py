"""The GPTQ kernels' wrappers (cpu_kernels.c, cpu_gemv.c): matmuls on the AutoGPTQ layout (fp32, and int16
activations for 4-bit groups in order), its transposed dequantization, and the algorithm's pieces (a lazy-update
block of columns, the Hessian from bf16 or fp32 activations). Built and loaded by cpu_kernels.py."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from litquant.quantization import cpu_kernels as ck
from litquant.quantization.cpu_kernels import _buffer, _f32, _need, _ptr, _threads


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
    """x (M, K) @ W^T -> (M, N) fp32 for an AutoGPTQ layer (bits 2/4/8, N a multiple of `ck.lib().lq_gptq_tile()`);
    `ordered` = gptq_ordered(g_idx, group_size)."""
    x = _f32(x)
    m, k = x.shape
    n, groups = scales.shape[1], scales.shape[0]
    _gptq_args(qweight, qzeros, scales, g_idx, bits)
    if g_idx.numel() != k or n % ck.lib().lq_gptq_tile():
        raise ValueError(
            f"cpu_kernels: x has {k} features (g_idx {g_idx.numel()}); out_features {n} must be a "
            f"multiple of {ck.lib().lq_gptq_tile()}"
        )
    y = torch.empty(m, n, dtype=torch.float32)
    work = torch.empty(ck.lib().lq_gptq_work(m, n, groups, int(ordered), _threads()), dtype=torch.float32)
    ck.lib().lq_gptq_gemm(
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
        ck.i16()
        and bits == 4
        and ordered
        and n % 8 == 0
        and gs % 8 == 0
        and k % gs == 0
        and ck.lib().lq_gptq_i16_block(gs) <= 4096
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
    block = ck.lib().lq_gptq_i16_block(gs)
    work = _buffer(ck.lib().lq_gptq_i16_work(m, k, n, block, _threads()), torch.uint8)
    # fmt: skip
    ck.lib().lq_gptq_i16_gemm(
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
        or n0 % ck.lanes()
        or (n1 - n0) % ck.lanes()
        or dtype not in (torch.float32, torch.bfloat16)
    ):
        raise ValueError(f"cpu_kernels: columns {n0}..{n1} of {n} (multiples of {ck.lanes()}), dtype {dtype}")
    out = torch.empty(k, n1 - n0, dtype=dtype) if out is None else out
    _need(out, dtype, k * (n1 - n0), "out")
    ck.lib().lq_gptq_dequant_t(
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
    ck.lib().lq_gptq_columns(
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
    return ck.lib() is not None and bool(ck.lib().lq_bf16_gram_ok())


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
            ck.lib().lq_bf16_gram(
                packed.data_ptr(), (rows + rpad) // 2, npad, n, H.data_ptr(), n, beta, alpha, _threads()
            )
        else:
            v, npad = ck.lanes(), -(-n // 48) * 48
            chunk = torch.nn.functional.pad(chunk, (0, npad - n)) if npad != n else chunk
            packed = chunk.contiguous().view(rows, npad // v, v).transpose(0, 1).contiguous()  # P[c][k][l]
            ck.lib().lq_f32_gram(packed.data_ptr(), rows, npad, n, H.data_ptr(), n, beta, alpha, _threads())
        beta = 1.0
