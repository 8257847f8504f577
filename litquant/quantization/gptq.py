"""GPTQ (Frantar et al. 2022): quantize one Linear from its calibration inputs, with inverse-Hessian error feedback.

    gptq = GPTQ(linear.in_features, device); handle = linear.register_forward_hook(gptq.hook)
    ...  # run calibration batches through the block, then handle.remove()
    result = gptq.quantize(linear.weight, bits=4, group_size=128, act_order=True)  # result.pack(): AutoGPTQ tensors

Algorithm, quantizer and numerical choices: docs/ARCHITECTURE.md, "GPTQ (algorithm, file format, kernels)".
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from litquant.errors import UserError
from litquant.quantization import cpu_kernels, gptq_format
from litquant.utils import best_time

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest fp16 subnormal: a scale below it would round to 0


@dataclass
class GPTQResult:
    """A quantized weight in original channel order. `weight` (Ŵ) == gptq_format.dequantize(**self.pack())."""

    intweight: torch.Tensor  # uint8 [out, in], values in [0, 2**bits)
    zeros: torch.Tensor  # int32 [groups, out], values in [1, 2**bits - 1]
    scales: torch.Tensor  # fp32 [groups, out], every value exactly representable in fp16
    g_idx: torch.Tensor  # int32 [in]
    weight: torch.Tensor  # fp32 [out, in] dequantized Ŵ = scales[g_idx].T * (intweight - zeros[g_idx].T)
    loss: float | None  # GPTQ's proxy error sum_q (w_q - ŵ_q)^2 / [H^-1]_qq / 2 (None for RTN)
    bits: int
    group_size: int

    def pack(self) -> dict[str, torch.Tensor]:
        """-> the AutoGPTQ tensors {qweight, qzeros, scales, g_idx} (add the layer's bias yourself)."""
        return gptq_format.pack(self.intweight, self.zeros, self.scales, self.g_idx, self.bits)


# ----------------------------------------------------------------------------------------------- quantizer


def quant_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of w [rows, k] -> (scale [rows] fp16-representable, zero [rows] integral float)."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)  # the grid always contains 0 (exact zeros stay zero)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid works, pick [-1, 1] as the reference does
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(w.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [rows, k] (or [rows]), scale/zero [rows] -> integer q (same float dtype) in [0, 2**bits - 1]."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> GPTQResult:
    """Round-to-nearest with the same quantizer and groups as GPTQ: the baseline GPTQ has to beat."""
    _check_args(weight, bits, group_size)
    W = weight.to(_math_dtype(weight)).clone()
    out_features, in_features = W.shape
    gs = in_features if group_size == -1 else group_size
    groups = gptq_format.num_groups(in_features, group_size)
    scales = torch.empty(groups, out_features, dtype=W.dtype, device=W.device)
    zeros = torch.empty_like(scales)
    Q = torch.empty_like(W)
    for g in range(groups):
        cols = slice(g * gs, (g + 1) * gs)
        scales[g], zeros[g] = quant_params(W[:, cols], bits, sym)
        Q[:, cols] = quantize_to_grid(W[:, cols], scales[g], zeros[g], bits)
    g_idx = gptq_format.default_g_idx(in_features, group_size, W.device)
    return _result(Q, scales, zeros, g_idx, None, bits, group_size)


# ----------------------------------------------------------------------------------------------- GPTQ


def _onednn_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in fp32 through oneDNN. On CPUs where MKL's sgemm takes its AVX2 path (AMD), oneDNN's AVX-512 GEMM
    is about twice as fast; the Hessian accumulation is the largest GEMM of GPTQ."""
    return torch._C._nn.mkldnn_linear(a.to_mkldnn(), b.to_mkldnn(), None).to_dense()


@functools.cache
def _onednn_gram_ok() -> bool:
    """Whether oneDNN's fp32 linear exists here and agrees with torch's matmul (else the Hessian uses addmm)."""
    try:
        x = torch.randn(16, 24)
        a, b = x.t()[:8], x.t()[4:]  # strided views, as add_batch passes them
        return bool(torch.allclose(_onednn_gram(a, b), a @ b.t(), rtol=1e-4, atol=1e-4))
    except (AttributeError, RuntimeError):
        return False


# Narrow fp32 inputs take one GEMM for H (measured 2x faster than strips at 1024 wide); wider ones accumulate the
# upper part in this many row strips (1.4x faster than one GEMM at 2816 and 4096)
STRIPS, STRIPS_ABOVE = 4, 1536


def _path(x: torch.Tensor) -> str:
    """How to accumulate x^T x: "bf16" (litquant's AVX512-BF16 kernel: exact bf16 products, fp32 sums, ~4x the
    fp32 rate), "f32" (litquant's fp32 kernel, where it measured faster than the GEMMs) or "gemm"."""
    if x.device.type != "cpu":
        return "gemm"
    if x.dtype == torch.bfloat16 and cpu_kernels.bf16_gram_ok():
        return "bf16"
    return "f32" if _f32_gram_wins(x.shape[1]) else "gemm"


def _accumulate(upper: torch.Tensor, x: torch.Tensor, beta: float, alpha: float, path: str) -> None:
    """upper = beta * upper + alpha * x^T x on (at least) the upper triangle of `upper` (fp32 [n, n])."""
    if path == "bf16":
        return cpu_kernels.bf16_gram(x, upper, beta, alpha)
    x = x.to(torch.float32)
    if path == "f32":
        return cpu_kernels.f32_gram(x, upper, beta, alpha)
    n = x.shape[1]
    step = -(-n // (STRIPS if n > STRIPS_ABOVE else 1))
    xt = x.t() if x.device.type == "cpu" and _onednn_gram_ok() else None  # oneDNN takes the strided view
    for i in range(0, n, step):
        out = upper[i : i + step, i:]
        if xt is not None:
            out.mul_(beta).add_(_onednn_gram(xt[i : i + step], xt[i:]), alpha=alpha)
        else:
            out.addmm_(x[:, i : i + step].t(), x[:, i:], beta=beta, alpha=alpha)


@functools.cache
def _f32_gram_wins(n: int) -> bool:
    """Whether litquant's fp32 kernel (upper tiles only) beats the GEMMs for n-wide inputs on this CPU. That
    depends on the BLAS: 1.1-2x faster where MKL takes its AVX2 path (AMD), while a BLAS near the AVX-512 peak
    can win with its strips. So it is timed, once per width and process, on 512 random rows (widths above 4096 as
    4096: the timing's own n^2 buffer stays at 64 MB)."""
    if cpu_kernels.lib() is None:
        return False
    if n > 4096:
        return _f32_gram_wins(4096)
    x, upper = torch.randn(512, n), torch.zeros(n, n)
    return best_time(lambda: _accumulate(upper, x, 0.5, 0.5, "f32")) < best_time(
        lambda: _accumulate(upper, x, 0.5, 0.5, "gemm")
    )


class GPTQ:
    """Collects the Hessian of one Linear's inputs, then quantizes its weight with GPTQ."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor:
        """H = 2/n * sum x x^T, whole (the accumulated upper part mirrored)."""
        return torch.triu(self._upper) + torch.triu(self._upper, 1).t()

    def add_batch(self, inp: torch.Tensor) -> None:
        """inp [..., in_features]: every row is one sample; keeps H = 2/n * sum x x^T as a running mean in fp32."""
        if inp.shape[-1] != self.in_features:
            raise ValueError(
                f"expected inputs with {self.in_features} features, got shape {tuple(inp.shape)}"
            )
        x = inp.detach().reshape(-1, self.in_features).to(device=self._upper.device)
        n = x.shape[0]
        if n == 0:
            return
        # running mean: rescale what we have so far, add the new rows with weight 2 / n_total
        total = self.nsamples + n
        _accumulate(self._upper, x, self.nsamples / total, 2.0 / total, _path(x))
        self.nsamples = total

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """A forward hook: `linear.register_forward_hook(gptq.hook)` feeds every call's input to add_batch."""
        self.add_batch(args[0])

    def quantize(self, weight: torch.Tensor, bits: int, release: bool = False, **options: Any) -> GPTQResult:
        """GPTQ of `weight` with the collected Hessian; `options` are gptq_quantize's (group_size, sym, act_order,
        damp_percent, block_size, static_groups). release=True drops the accumulator first (the last layer it
        serves), so that only GPTQ's own working copies are alive."""
        if self.nsamples == 0:
            raise UserError(
                "GPTQ: no calibration inputs were collected for this layer (did the forward reach it?)"
            )
        if release:  # the accumulator becomes H in place: no second in_features^2 matrix
            H, self._upper = self._upper.triu_(), torch.empty(0)
            H.add_(H.triu(1).mT)
        else:
            H = self.H
        return gptq_quantize(weight, H, bits, **options, _consume_h=True)

    def free(self) -> None:
        """Drop the Hessian (in_features^2 floats) once the layer is done."""
        self._upper = torch.empty(0)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    _consume_h: bool = False,
) -> GPTQResult:
    """GPTQ on weight [out, in] given the Hessian H [in, in] of its inputs. Neither argument is modified (unless
    _consume_h: the caller hands H over, saving a copy of it).

    Group parameters are computed when a group's first column is reached, from the weights as they are at
    that moment (error feedback included), as in sequential OBQ. With `static_groups` they are computed up
    front from the original weights and original channel order, so act-order does not change the groups.
    """
    _check_args(weight, bits, group_size)
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    out_features, in_features = weight.shape
    if tuple(H.shape) != (in_features, in_features):
        raise UserError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match in_features={in_features}")
    dtype = torch.float64 if torch.float64 in (weight.dtype, H.dtype) else torch.float32
    W = weight.to(dtype).clone()
    H = H.to(device=W.device, dtype=dtype)
    if not _consume_h:
        H = H.clone()
    if not torch.isfinite(H).all():
        raise UserError(
            "GPTQ: the calibration Hessian has NaN/Inf values (non-finite activations in calibration)"
        )

    # dead inputs (always zero in calibration): their weights cannot matter, zero them; H_ii = 1 keeps H invertible
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    gs = in_features if group_size == -1 else group_size
    groups = gptq_format.num_groups(in_features, group_size)
    scales = torch.empty(groups, out_features, dtype=dtype, device=W.device)
    zeros = torch.empty_like(scales)
    if static_groups:
        for g in range(groups):
            scales[g], zeros[g] = quant_params(W[:, g * gs : (g + 1) * gs], bits, sym)

    if act_order:  # most salient inputs (largest H_ii) first, while the most columns are left to absorb error
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm]  # in two steps, so at most two copies of H are alive
        H = H[:, perm]
        orig = perm  # position j in the processing order -> original input channel
    else:
        perm = None
        orig = torch.arange(in_features, device=W.device)
    orig_list = orig.tolist()

    Hinv = _inverse_hessian_upper_cholesky(H, damp_percent)
    del H
    Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)  # the codes (0..2**bits-1)
    step = _c_block(W, gs, block_size, in_features)
    if step:  # the C loop works on W^T: transposed here, so that one working copy of the weight is alive
        Wt = W.t().contiguous()
        del W
        losses = _columns_c(
            Wt, Hinv, Q, scales, zeros, gs, step, bits, sym, orig_list if static_groups else None
        )
    else:
        losses = _columns_torch(
            W, Hinv, Q, scales, zeros, gs, block_size, bits, sym, orig_list, static_groups
        )

    if static_groups:
        g_idx = gptq_format.default_g_idx(in_features, group_size, Q.device)
    else:  # groups follow the processing order: channel orig[j] is in group j // gs
        g_idx = torch.empty(in_features, dtype=torch.int32, device=Q.device)
        g_idx[orig] = (torch.arange(in_features, device=Q.device) // gs).to(torch.int32)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return _result(Q, scales, zeros, g_idx, losses / 2, bits, group_size)


def _c_block(W: torch.Tensor, gs: int, block_size: int, in_features: int) -> int:
    """The lazy-update block for litquant's C column loop (CPU, fp32), aligned so that every group starts inside
    a block at a multiple of its size (or at a block's first column); 0 when the C loop cannot take this layer."""
    if W.dtype != torch.float32 or not cpu_kernels.usable(W):
        return 0
    if gs <= block_size:
        return gs * (block_size // gs)
    return block_size if gs % block_size == 0 or gs >= in_features else 0


def _columns_c(Wt, Hinv, Q, scales, zeros, gs: int, step: int, bits: int, sym: bool, static_orig) -> float:
    """GPTQ's column loop with each lazy-update block in C (cpu_kernels.gptq_columns); the block's accumulated
    error reaches the later columns with one matmul, as in the torch loop. It works on Wt = W^T (in, out), whose
    rows are the weight's columns: a block's columns are contiguous rows the kernel updates in place."""
    in_features, out_features = Wt.shape
    Hinv = Hinv.contiguous()  # the C loop reads rows
    Qt = torch.empty(in_features, out_features, dtype=torch.uint8)
    scale, zero = torch.empty(out_features), torch.empty(out_features)
    table = (scales.contiguous(), zeros.contiguous()) if static_orig is not None else None
    losses = 0.0
    for i1 in range(0, in_features, step):
        i2 = min(i1 + step, in_features)
        W1 = Wt[i1:i2]
        col_group, gs_c = None, 0
        if static_orig is not None:
            col_group = torch.tensor([static_orig[j] // gs for j in range(i1, i2)], dtype=torch.int64)
        elif gs <= step:
            gs_c = gs
        # a group wider than the block starts here: its grid from all its columns as they are
        elif i1 % gs == 0:
            scale, zero = (t.contiguous() for t in quant_params(Wt[i1 : i1 + gs].t(), bits, sym))
            scales[i1 // gs], zeros[i1 // gs] = scale, zero
        Q1, Err1, new_s, new_z, loss = cpu_kernels.gptq_columns(
            W1, Hinv[i1:i2, i1:i2], scale, zero, bits, sym, gs_c, col_group, table
        )
        if gs_c:
            g0 = i1 // gs
            scales[g0 : g0 + new_s.shape[0]], zeros[g0 : g0 + new_z.shape[0]] = new_s, new_z
        Qt[i1:i2] = Q1
        losses += loss
        # lazy batch update of everything after the block
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    Q.copy_(Qt.t())
    return losses


def _columns_torch(
    W, Hinv, Q, scales, zeros, gs: int, block_size: int, bits: int, sym: bool, orig_list, static_groups: bool
) -> float:
    """GPTQ's column loop in torch ops (CUDA, fp64, and wherever the C loop is not available)."""
    in_features = W.shape[1]
    losses = 0.0
    scale = zero = None
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            if static_groups:
                g = orig_list[j] // gs
                scale, zero = scales[g], zeros[g]
            elif j % gs == 0:  # a new group starts here: its grid comes from its columns as they are now
                end = min(j + gs, in_features)
                cols = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the group runs past this block: those columns still owe this block's update
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:j, i2:end]
                    cols = torch.cat([cols, rest], dim=1)
                scale, zero = quant_params(cols, bits, sym)
                scales[j // gs], zeros[j // gs] = scale, zero
            w = W1[:, i]
            q = quantize_to_grid(w, scale, zero, bits)
            Q[:, j] = q
            err = Err1[:, i]
            torch.div(w - scale * (q - zero), Hinv1[i, i], out=err)
            W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1)  # OBS update of this block's later columns
        losses += float((Err1**2).sum())  # (w - ŵ)² / d² summed: the errors themselves, squared
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of everything after the block
    return losses


def _inverse_hessian_upper_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), raising the damping if H is not PD enough.

    With J the reversal permutation and J H J = L L^T, U = J L^-1 J: one Cholesky and one triangular inverse
    (2/3 n^3 flops) instead of Cholesky, inverse from it and a second Cholesky (5/3 n^3). Both by blocks of
    _NB columns whose products skip the zero triangles (docs/ARCHITECTURE.md has the timings)."""
    mean_diag = torch.diagonal(H).mean()
    damp = damp_percent
    while True:
        Hd = H.flip(0, 1)
        torch.diagonal(Hd).add_(damp * mean_diag)
        L, info = _cholesky(Hd)
        del Hd
        if int(info) == 0:
            Linv = _lower_triangular_inverse(L)
            del L
            U = Linv.flip(0, 1)
            del Linv
            if torch.isfinite(U).all():
                return U
        next_damp = damp * 10 if damp > 0 else 0.01
        if next_damp > 1.0:
            raise UserError(
                f"GPTQ: the Hessian is not positive definite even with damp_percent={damp:g}"
                " (too few or degenerate calibration samples? use more calibration data)"
            )
        warnings.warn(f"GPTQ: Cholesky failed with damp_percent={damp:g}, retrying with {next_damp:g}")
        damp = next_damp


_NB = 128  # block size of the Cholesky and the triangular inverse (2 cores: 128-256 best)


def _cholesky(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor of A -> (L, info), info != 0 when A is not positive definite. On CPU left-looking by
    block columns: one GEMM per block column updates just the lower panel, so it does the n^3/3 flops through
    the GEMM (1.2-1.6x faster than LAPACK's potrf from torch's MKL on 2 cores)."""
    if A.device.type != "cpu":
        L, info = torch.linalg.cholesky_ex(A)
        return L, int(info)
    n = A.shape[0]
    L = torch.zeros_like(A)
    for j in range(0, n, _NB):
        e = min(j + _NB, n)
        panel = A[j:, j:e].clone()
        if j:
            panel.addmm_(L[j:, :j], L[j:e, :j].t(), alpha=-1)
        D, info = torch.linalg.cholesky_ex(panel[: e - j])
        if int(info):
            return L, j + int(info)
        L[j:e, j:e] = D
        if e < n:  # the panel below the diagonal block: X D^T = panel
            L[e:, j:e] = torch.linalg.solve_triangular(D.t(), panel[e - j :], upper=True, left=False)
    return L, 0


def _lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 for lower-triangular L, by block columns from the last: with M = L^-1 known below and right of block
    j, M[e:, j:e] = -M[e:, e:] L[e:, j:e] M[j:e, j:e], one GEMM per row block over the nonzero part of M[e:, e:]
    (n^3/3 flops, half of what whole-matrix products of the triangles cost)."""
    n = L.shape[0]
    M = torch.zeros_like(L)
    for j in reversed(range(0, n, _NB)):
        e = min(j + _NB, n)
        D = torch.linalg.solve_triangular(
            L[j:e, j:e], torch.eye(e - j, dtype=L.dtype, device=L.device), upper=False
        )
        M[j:e, j:e] = D
        if e < n:
            P = L[e:, j:e] @ D
            for r0 in range(e, n, _NB):
                r1 = min(r0 + _NB, n)
                M[r0:r1, j:e].addmm_(M[r0:r1, e:r1], P[: r1 - e], beta=0, alpha=-1)
    return M


def _result(
    Q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    loss: float | None,
    bits: int,
    group_size: int,
) -> GPTQResult:
    out_features, in_features = Q.shape
    groups = zeros.shape[0]
    if in_features % groups == 0 and torch.equal(
        g_idx, gptq_format.default_g_idx(in_features, in_features // groups, g_idx.device)
    ):
        # contiguous groups: broadcast each group's grid over its columns (no [out, in] gathers)
        w_hat = ((Q.view(out_features, groups, -1) - zeros.t()[:, :, None]) * scales.t()[:, :, None]).view_as(
            Q
        )
    else:
        g = g_idx.long()
        w_hat = (Q - zeros.t()[:, g]) * scales.t()[:, g]
    return GPTQResult(
        intweight=Q.to(torch.uint8),
        zeros=zeros.to(torch.int32),
        scales=scales.to(torch.float32),
        g_idx=g_idx,
        weight=w_hat.to(torch.float32),
        loss=loss,
        bits=bits,
        group_size=group_size,
    )


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_args(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in gptq_format.SUPPORTED_BITS:
        raise UserError(f"GPTQ bits must be one of {gptq_format.SUPPORTED_BITS}, got {bits}")
    if weight.dim() != 2:
        raise UserError(f"GPTQ quantizes 2-D Linear weights, got shape {tuple(weight.shape)}")
    gptq_format.num_groups(weight.shape[1], group_size)  # validates group_size
