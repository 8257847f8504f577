"""`BF16Linear`: an nn.Linear whose bf16 weight multiplies on CPU through litquant's GEMV (cpu_gemv.c) for a few rows.

On a CPU without native bf16 (no AVX512-BF16/AMX), torch computes a bf16 matmul in software, and fp32 weights read
twice the bytes; even with native bf16, torch's one-row bf16 matmul streams below the bandwidth. The GEMV reads bf16
weights and multiplies in fp32 (bf16 -> fp32 is a shift, so the products are those of the stored weights). The
full-precision plugin turns a model's Linears into this class in place (`__class__`; parameters and state_dict
unchanged) when it runs bf16 on a CPU where a one-off timing says the GEMV wins (`gemv_beats_torch`), and so do the
quantized plugins for the Linears they leave in full precision (the head). Prefill rows multiply fp32 tiles of the
weight in torch's fp32 GEMM (a few MB at a time: no fp32 copy of the model); training and other devices take
nn.Linear's own forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from litquant.quantization import cpu_kernels
from litquant.utils import best_time

# beyond this many input rows, torch's GEMM (without native bf16: on fp32 tiles of the weight)
GEMV_MAX_ROWS = 16


class BF16Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.dtype != torch.bfloat16
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or self.in_features % cpu_kernels.lanes()
        ):
            return F.linear(x, w, self.bias)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = cpu_kernels.bf16_matmul(x2, w)
        elif _native_bf16():  # prefill: torch's native bf16 GEMM
            return F.linear(x, w, self.bias)
        else:  # prefill without native bf16: fp32 tiles of W into torch's fp32 GEMM (3x its bf16 one there)
            y = cpu_kernels.tiled_linear(x2.float(), self.out_features, self.in_features, self._rows)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _rows(self, n0: int, n1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # the reused tile buffer may have been made under inference mode
            return out.copy_(self.weight[n0:n1])


def _native_bf16() -> bool:
    from litquant.precision import cpu_has_native_bf16

    return cpu_has_native_bf16()


def wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Linears computing in `dtype` on `device` should become BF16Linear."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and cpu_kernels.lib() is not None
        and gemv_beats_torch()
    )


@functools.cache
def gemv_beats_torch() -> bool:
    """Whether a decode row through litquant's bf16 GEMV is faster than what torch would run instead: its bf16
    matmul where bf16 is native, else fp32 weights (twice the bytes) and its fp32 matmul. Timed once per process on
    a 1024 x 2048 layer (a few ms): with native bf16 both read the same bytes; without, the fp32 weights fit in a
    cache there, so the GEMV must win on arithmetic alone and reads half the bytes on top from memory."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g)
    wb, x = w.bfloat16(), torch.randn(1, 2048, generator=g)
    xb, native = x.bfloat16(), _native_bf16()
    ours = best_time(lambda: cpu_kernels.bf16_matmul(x, wb), 5)
    theirs = best_time(lambda: F.linear(xb, wb) if native else F.linear(x, w), 5)
    return prefer_gemv(ours, theirs)


def prefer_gemv(t_gemv: float, t_fp32: float) -> bool:
    """The decision on the timings: the GEMV only where it is faster."""
    return t_gemv < t_fp32


def convert(module: nn.Module) -> None:
    """Every plain nn.Linear of `module` (LoRA adapters' own Linears too: they train in F.linear) becomes BF16Linear."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = BF16Linear
