"""bitsandbytes quantization: 4-bit (nf4/fp4, optional double quantization) and LLM.int8 Linears + their plugins.

Modes (`--quantize`):
  bnb.nf4, bnb.fp4         4-bit blockwise (blocksize 64, one fp32 absmax per block), QLoRA's data types
  bnb.nf4-dq, bnb.fp4-dq   the same with double quantization: absmax stored as uint8 (blocks of 256, fp32
                           scale + one mean offset), ~0.37 bit/param less
  bnb.int8                 LLM.int8 inference: int8 weights (row-wise absmax); inputs quantized row-wise to int8,
                           input columns holding any |x| >= 6.0 multiply in full precision
  bnb.int8-training        the same int8 weights, for finetuning adapters on top: the weight is dequantized to the
                           compute dtype and multiplied (no input quantization), gradients flow to the input

All weights are frozen. The compute dtype is `--precision` (32-true, 16-true or bf16-true), on CUDA and on CPU:
unlike Lightning's BitsandbytesPrecision there is no CUDA-only check and no forced fp16 for int8.

Our modules are plain `nn.Module`s holding the bitsandbytes storage as buffers and calling the bitsandbytes ops
directly (not bnb's Linear4bit/Linear8bitLt: their Params4bit/Int8Params quantize inside `.to()`, keep the state
outside the state dict and, on CPU, rewrite the weight into a kernel layout behind the module's back).
Loading: the model is built on the meta device, `convert_module` swaps the Linears, and `load_weights` hands every
tensor to `load_litquant_tensor`, which quantizes a weight the moment it lands on the device: at most one layer's
full-precision weight exists at a time. A pre-quantized file (`quantize/bnb.py`) skips that step.

CPU speed: litquant's own kernels (cpu_kernels.c) read bitsandbytes' layout as it is: a fused 4-bit / LLM.int8
matmul for few input rows, tiles of dequantized weight + BLAS beyond, in any compute dtype (docs/ARCHITECTURE.md).
bitsandbytes' ops serve CUDA, and the CPU when the kernels cannot be built.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from litquant.config import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.io import safetensors_metadata
from litquant.precision import LitquantPrecision
from litquant.quantization import cpu_kernels
from litquant.quantization.modes import LoadPlan, QuantMode, register

BLOCKSIZE = 64  # bnb's default 4-bit block
NESTED_BLOCKSIZE = 256  # double quantization: blocks of absmax values (the only size bnb's fused kernels take)
QUANTIZE_CHUNK = 1 << 22  # weights are quantized this many elements at a time (bounds the temporaries)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold on input magnitudes
MIN_BNB_CPU = (0, 48)  # first bitsandbytes with CPU 4-bit and int8 ops
# litquant's CPU kernels (cpu_kernels.c): up to this many input rows the fused 4-bit / int8 matmul, beyond it a
# dequantized tile + BLAS. Every row the fused kernel computes gets the same arithmetic whatever the number of rows,
# so a batch of up to 16 decoding sequences gets the tokens each would get alone.
GEMV_MAX_ROWS_4BIT = 16
GEMV_MAX_ROWS_INT8 = 4

# bnb >= 0.48 tries to fetch a CPU GEMM from the Hugging Face Hub when imported and logs a warning when it cannot
# (always, offline); its own native CPU kernels are used instead, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# kind -> (quant_type, double quantization) of the 4-bit kinds
FOUR_BIT = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True)}
_HELP = {
    "nf4": "bitsandbytes 4-bit NormalFloat weights (QLoRA), blocksize 64",
    "nf4-dq": "bnb.nf4 with double quantization of the absmax constants (~0.37 bit/param less)",
    "fp4": "bitsandbytes 4-bit float weights, blocksize 64",
    "fp4-dq": "bnb.fp4 with double quantization of the absmax constants",
    "int8": "LLM.int8 inference: int8 weights, outlier input columns (|x| >= 6) in full precision",
    "int8-training": "frozen int8 weights for finetuning adapters (LoRA): dequantize + matmul, gradients to the input",
}


# ---- bitsandbytes, imported lazily (registering the modes must not need it) ------------------------------


@functools.cache
def _bnb():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


def bnb_version() -> tuple[int, ...]:
    parts = []
    for p in _bnb().__version__.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    # built in fp32 whatever the default dtype is when first asked: bnb makes it with torch.tensor, which under a
    # bf16 default (Fabric's forward context) would round the 16 levels to bf16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return _bnb().functional.get_4bit_type(quant_type, device=device).to(torch.float32)
    finally:
        torch.set_default_dtype(previous)


# ---- autograd: frozen quantized weight, gradient to the input -------------------------------------------


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W quantized and frozen. Nothing but the module is saved for backward, which dequantizes W
    again: keeping the dequantized W of every layer alive until backward would undo the memory savings."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "_QuantLinear") -> torch.Tensor:
        ctx.module = module
        ctx.x_shape = x.shape
        return module._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.module._input_grad(grad).reshape(ctx.x_shape), None


# ---- the quantized Linears ----------------------------------------------------------------------------------


class _QuantLinear(nn.Module):
    """What both quantized Linears share: bias, loading hook, dtype-safe moves, storage reporting.

    The quantization state lives in buffers named in `_quant_names` (so `state_dict()` is the pre-quantized
    checkpoint); a module cast (`.half()`, `.to(torch.bfloat16)`) moves them but never changes their dtype."""

    _quant_names: tuple[str, ...] = ()

    def __init__(
        self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.litquant_name = ""  # set by convert_module, for error messages
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None
        )

    # -- to be provided ----------------------------------------------------------------------------------------
    def _empty_state(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequant_rows(self, n0: int, n1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """Rows [n0, n1) of the dequantized weight into `out` with litquant's CPU kernels."""
        raise NotImplementedError

    def _cpu_fast(self, x: torch.Tensor) -> bool:
        """Whether litquant's CPU kernels serve this input (CPU tensor, kernels built, shape they take)."""
        return False

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W for the backward pass: tile by tile on CPU, else the whole dequantized weight."""
        if self._cpu_fast(grad):
            return cpu_kernels.tiled_linear(grad, self.out_features, self.in_features, self._dequant_rows, True)
        return grad @ self.dequantize(grad.dtype)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.tiled_linear(x.reshape(-1, self.in_features), self.out_features, self.in_features,
                                     self._dequant_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    # -- shared --------------------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.litquant_name or type(self).__name__}"

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._quant_names:
            self._buffers[name] = state[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenQuantMatmul.apply(x, self)
        else:
            y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(in_dtype)

    def load_litquant_tensor(self, attr: str, tensor: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]):
        """The loader's hook: a full-precision `weight` is quantized on `device` right away; the tensors of a
        pre-quantized file are checked against the expected shapes/dtypes and taken as they are."""
        if attr == "bias":
            if self.bias is None or tuple(tensor.shape) != (self.out_features,):
                raise UserError(f"{self._where()}: unexpected bias of shape {tuple(tensor.shape)} (config mismatch?)")
            self.bias = nn.Parameter(  # dtype None: as stored (a pre-quantized file keeps the source's dtypes)
                tensor.to(device=device, dtype=dtype), requires_grad=self.bias.requires_grad
            )
        elif attr == "weight" and tensor.is_floating_point():
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise UserError(
                    f"{self._where()}.weight has shape {tuple(tensor.shape)} but the config needs "
                    f"{(self.out_features, self.in_features)} (model_config.yaml does not match the weights)"
                )
            self.quantize_(tensor.to(device))
        elif attr in self._quant_names:
            expected = self._empty_state("meta")[attr]
            if tensor.dtype != expected.dtype or tensor.shape != expected.shape:
                raise UserError(
                    f"{self._where()}.{attr} is {str(tensor.dtype).replace('torch.', '')} {tuple(tensor.shape)} but a "
                    f"{self.mode_name} layer needs {str(expected.dtype).replace('torch.', '')} {tuple(expected.shape)} "
                    "(was the file quantized with another mode or config?)"
                )
            self._buffers[attr] = tensor.to(device)
        else:
            raise UserError(f"unexpected tensor {self._where()}.{attr} for a {self.mode_name} layer")

    def quantized_state(self) -> dict[str, torch.Tensor]:
        """The quantization buffers (what a pre-quantized file stores)."""
        return {name: self._buffers[name] for name in self._quant_names}

    def litquant_storage(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._quant_names:
            t = self._buffers.get(name)
            if t is not None:
                yield name, t

    def _apply(self, fn, recurse=True):
        # Moves must reach the quantization state, casts must not: apply `fn` and keep only its device.
        saved = {name: self._buffers.pop(name) for name in self._quant_names if name in self._buffers}
        super()._apply(fn, recurse)
        for name, t in saved.items():
            moved = fn(t)
            if moved.dtype != t.dtype:
                moved = t.to(moved.device)
            self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode_name}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        )


class Linear4bit(_QuantLinear):
    """bitsandbytes 4-bit Linear (nf4/fp4, blocksize 64, optional double quantization).

    Buffers (also the pre-quantized file's tensors, as `<layer>.<name>`):
      weight         uint8 (ceil(out*in/2), 1)  two 4-bit codes per byte, row-major over (out, in)
      absmax         fp32 (blocks,)             per-block scale; with double quant uint8 codes into nested_code
      nested_absmax  fp32 (ceil(blocks/256),)   double quant only: scale of each block of 256 absmax values
      nested_code    fp32 (256,)                double quant only: bnb's 8-bit dynamic map
      offset         fp32 ()                    double quant only: mean absmax, subtracted before quantizing
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = BLOCKSIZE
        self.mode_name = quant_type + ("-dq" if double_quant else "")
        self._quant_names = ("weight", "absmax") + (("nested_absmax", "nested_code", "offset") if double_quant else ())
        self._set_state(self._empty_state(device))

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.in_features * self.out_features / self.blocksize)

    def _empty_state(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        n = self.in_features * self.out_features
        state = {"weight": torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)}
        if self.double_quant:
            state["absmax"] = torch.empty(self.num_blocks, dtype=torch.uint8, device=device)
            state["nested_absmax"] = torch.empty(math.ceil(self.num_blocks / NESTED_BLOCKSIZE), device=device)
            state["nested_code"] = torch.empty(256, device=device)
            state["offset"] = torch.empty((), device=device)
        else:
            state["absmax"] = torch.empty(self.num_blocks, device=device)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight on its device (bnb's quantize_4bit: same bits as bnb)."""
        F = _bnb().functional
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        # In chunks of rows: bnb's CPU quantizer makes several fp32-sized temporaries of its input, which for a
        # large Linear would cost more than the whole layer's 4-bit result. Blocks never straddle chunks (each
        # chunk is a multiple of blocksize elements), and the double quantization below runs over all absmax at
        # once exactly as quantize_4bit(compress_statistics=True) does, so the bits are bnb's.
        flat = weight.contiguous().reshape(-1)
        step = max(QUANTIZE_CHUNK // self.blocksize, 1) * self.blocksize
        parts = [F.quantize_4bit(flat[i : i + step], blocksize=self.blocksize, quant_type=self.quant_type)
                 for i in range(0, flat.numel(), step)]
        packed = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
        absmax = torch.cat([qs.absmax for _, qs in parts]) if len(parts) > 1 else parts[0][1].absmax
        del parts, flat
        state = {"weight": packed, "absmax": absmax}
        if self.double_quant:
            offset = absmax.mean()
            qabsmax, nested = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            state.update(absmax=qabsmax, nested_absmax=nested.absmax, nested_code=nested.code,
                         offset=offset.float().reshape(()))
        self._set_state(state)

    def _absmax(self) -> torch.Tensor:
        """fp32 absmax per block (double quant undone)."""
        if not self.double_quant:
            return self.absmax
        return _bnb().functional.dequantize_blockwise(self.absmax, self.quant_state().state2) + self.offset

    def quant_state(self, dtype: Optional[torch.dtype] = None):
        """A bitsandbytes QuantState over this layer's buffers (portable layout)."""
        F = _bnb().functional
        state2 = None
        if self.double_quant:
            state2 = F.QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
        return F.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
            code=_code(self.quant_type, self.absmax.device), blocksize=self.blocksize, quant_type=self.quant_type,
            dtype=dtype or self.compute_dtype, offset=self.offset if self.double_quant else None, state2=state2,
        )

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight the quantized storage stands for, in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self._cpu_fast(self.absmax):  # the same fp32 products as bnb's dequantize_4bit, several times faster
            w = self._dequant_rows(0, self.out_features, torch.float32, None)
            return w if dtype == torch.float32 else w.to(dtype)
        qs = self.quant_state(dtype)
        return _bnb().functional.dequantize_4bit(self.weight, qs)

    def _dq(self) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        return (self.nested_code, self.nested_absmax, float(self.offset)) if self.double_quant else None

    def _dequant_rows(self, n0: int, n1: int, dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
        return cpu_kernels.bnb4_dequantize(
            self.weight, self.out_features, self.in_features, self.absmax, _code(self.quant_type, self.absmax.device),
            self._dq(), rows=(n0, n1), dtype=dtype, out=out,
        )

    def _cpu_fast(self, x: torch.Tensor) -> bool:
        return self.in_features % BLOCKSIZE == 0 and cpu_kernels.usable(x)

    # -- compute -----------------------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_fast(x):  # litquant's kernels: fused 4-bit matmul for few rows, else tiles + BLAS
            if x.numel() > GEMV_MAX_ROWS_4BIT * self.in_features:
                return self._tiled(x)
            y = cpu_kernels.bnb4_matmul(
                x.reshape(-1, self.in_features), self.weight, self.out_features, self.in_features, self.absmax,
                _code(self.quant_type, x.device), self._dq(),
            )
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = [self.out_features, self.in_features]
        if not self.double_quant:
            return torch.ops.bitsandbytes.gemm_4bit.default(x, self.weight, shape, self.absmax, self.blocksize,
                                                            self.quant_type)
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x, self.weight, shape, self.nested_absmax, self.blocksize, self.quant_type,
            absmax_8bit=self.absmax, absmax_code=self.nested_code, absmax_offset=self.offset,
        )


class Linear8bit(_QuantLinear):
    """Int8 Linear (LLM.int8 storage): weight int8 (out, in), absmax fp32 (out,); W = weight * absmax / 127.

    `training=False` (bnb.int8): LLM.int8 forward. Input columns with any |x| >= threshold (within one sequence)
    multiply in full precision with the dequantized weight; the rest of each input row is scaled by its absmax to int8, multiplied
    in int32 (bnb's int8 matmul: cuBLASLt on CUDA, torch._int_mm on AVX512 CPUs) and rescaled in fp32, so
    nothing passes through fp16 (no overflow for bf16/fp32 activations).
    `training=True` (bnb.int8-training): dequantize the weight to the compute dtype and multiply (bnb's own
    choice for finetuning on CPU; gradients to the input either way)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        training: bool = False,
        threshold: float = INT8_THRESHOLD,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self.int8_training = training
        self.threshold = threshold
        self.mode_name = "int8-training" if training else "int8"
        self._quant_names = ("weight", "absmax")
        self._set_state(self._empty_state(device))

    def _empty_state(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {
            "weight": torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device),
            "absmax": torch.empty(self.out_features, dtype=torch.float32, device=device),
        }

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        w = weight.float()
        absmax = w.abs().amax(dim=1)
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        q = (w * scale[:, None]).round_().to(torch.int8)  # one fp32 temporary besides the weight
        self._set_state({"weight": q, "absmax": absmax})

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return (self.weight * (self.absmax[:, None] / 127.0)).to(dtype or self.compute_dtype)  # fp32 product

    def _dequant_rows(self, n0: int, n1: int, dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
        return cpu_kernels.int8_dequantize(self.weight, self.absmax, rows=(n0, n1), dtype=dtype, out=out)

    def _cpu_fast(self, x: torch.Tensor) -> bool:
        return cpu_kernels.usable(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_training:
            if self._cpu_fast(x):
                return self._tiled(x)
            return torch.nn.functional.linear(x, self.dequantize(x.dtype))
        # litquant's fused LLM.int8 (the same arithmetic) for few rows, and for all rows on CPUs without int8 dot
        # instructions, where bitsandbytes' int8 matmul (torch._int_mm) is several times slower
        # Outlier columns are found per sequence (the rows of x's second-to-last dim: one sequence's tokens), so
        # a sequence's result does not depend on what else is in the batch.
        group = x.shape[-2] if x.dim() >= 3 else x.numel() // self.in_features
        if self._cpu_fast(x) and (x.numel() <= GEMV_MAX_ROWS_INT8 * self.in_features or not cpu_kernels.vnni()):
            y = cpu_kernels.int8_matmul(x.reshape(-1, self.in_features), self.weight, self.absmax, self.threshold,
                                        group)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = x.shape
        x = x.reshape(-1, group, self.in_features)
        outliers = (x.abs() >= self.threshold).any(dim=1, keepdim=True) if self.threshold > 0 else None  # (G, 1, K)
        cols = outliers.any(dim=0).squeeze(0).nonzero().squeeze(1) if outliers is not None else None
        has_outliers = cols is not None and cols.numel() > 0
        xr = (x.masked_fill(outliers, 0) if has_outliers else x).reshape(-1, self.in_features)
        x_absmax = xr.abs().amax(dim=1).float()
        x_scale = torch.where(x_absmax > 0, 127.0 / x_absmax, torch.zeros_like(x_absmax))
        xq = torch.round(xr.float() * x_scale[:, None]).to(torch.int8)
        acc = torch.ops.bitsandbytes.int8_linear_matmul.default(xq, self.weight)  # (M, N) int32
        y = acc.float() * (x_absmax[:, None] * self.absmax[None, :] / (127.0 * 127.0))
        if has_outliers:  # each sequence's own outlier columns (the others' are zero in its rows)
            w_cols = self.weight[:, cols].float() * (self.absmax[:, None] / 127.0)  # (N, n_outliers)
            x_out = (x[..., cols] * outliers[..., cols]).reshape(-1, cols.numel()).float()
            y = y + x_out @ w_cols.t()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


# ---- the modes and their plugin -----------------------------------------------------------------------------


class BnbMode(QuantMode):
    """`bnb.<kind>`: kind nf4, nf4-dq, fp4, fp4-dq (4-bit), int8 (LLM.int8) or int8-training."""

    options = ("quantize_lm_head",)
    stored_as_is = (".absmax", ".nested_absmax", ".nested_code", ".offset")  # bnb's statistics stay fp32

    def __init__(self, kind: str) -> None:
        self.kind, self.name, self.help = kind, f"bnb.{kind}", _HELP[kind]
        self.storage = "int8" if kind == "int8-training" else kind  # int8-training stores exactly what int8 stores
        self.four_bit = self.qlora = kind in FOUR_BIT
        self.nominal_bits = 4 if self.four_bit else 8
        self.prequantized = f"lit_model_bnb.{self.storage}.safetensors"  # what `litquant quantize bnb` writes

    def plugin(self, precision: str, device: torch.device, **options: Any) -> "BitsandbytesPrecision":
        try:
            _bnb()
        except ImportError:
            need = f"bitsandbytes>={MIN_BNB_CPU[0]}.{MIN_BNB_CPU[1]}"
            raise UserError(f"--quantize {self.name} needs bitsandbytes: pip install '{need}'") from None
        if device.type == "cpu" and bnb_version() < MIN_BNB_CPU:
            raise UserError(
                f"bitsandbytes {_bnb().__version__} has no CPU support for {self.name}: "
                f"pip install -U 'bitsandbytes>={MIN_BNB_CPU[0]}.{MIN_BNB_CPU[1]}', or run on CUDA (--accelerator cuda)"
            )
        return BitsandbytesPrecision(self, precision, quantize_lm_head=bool(options.get("quantize_lm_head", False)))

    def make_linear(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                    device: torch.device | str) -> "_QuantLinear":
        if self.four_bit:
            quant_type, dq = FOUR_BIT[self.kind]
            return Linear4bit(in_features, out_features, bias, quant_type, dq, dtype, device)
        return Linear8bit(in_features, out_features, bias, self.kind == "int8-training", INT8_THRESHOLD, dtype, device)

    def linear_bytes(self, in_features: int, out_features: int, group_size: int = 128, runtime: bool = True) -> int:
        n = in_features * out_features
        if not self.four_bit:
            return n + 4 * out_features  # int8 codes, fp32 absmax per row
        blocks = math.ceil(n / BLOCKSIZE)
        codes = (n + 1) // 2
        if FOUR_BIT[self.kind][1]:  # uint8 absmax per block, fp32 scale per 256 of them, the 256-entry code, offset
            return codes + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256 + 4
        return codes + 4 * blocks


class BitsandbytesPrecision(LitquantPrecision):
    """`--quantize bnb.<kind>`: swaps Linears for our bnb-backed modules; compute dtype from `--precision`."""

    def __init__(self, mode: BnbMode, precision: str = "32-true", quantize_lm_head: bool = False) -> None:
        super().__init__(precision)
        self.mode = mode
        self.quantize_lm_head = quantize_lm_head
        self.use_prequantized = True  # quantize/bnb.py turns this off to read the full-precision weights

    def _wanted(self, name: str) -> bool:
        return self.quantize_lm_head or "lm_head" not in name.split(".")

    def load_plan(self, checkpoint_dir: Optional[Path]) -> LoadPlan:
        """The pre-quantized file when it exists and matches this run, else the full-precision one."""
        name = self.mode.prequantized
        path = Path(checkpoint_dir or ".") / name
        if checkpoint_dir is None or not self.use_prequantized or not path.is_file():
            return LoadPlan(WEIGHTS_FILE, self._wanted)
        problem = prequantized_mismatch(path, self)
        if problem is None:
            return LoadPlan(name, self._wanted)
        if not (Path(checkpoint_dir) / WEIGHTS_FILE).is_file():
            raise UserError(
                f"{path} {problem}, and there is no {WEIGHTS_FILE} to quantize from: "
                f"run `litquant quantize bnb --mode {self.mode.storage}` with matching options"
            )
        return LoadPlan(WEIGHTS_FILE, self._wanted, note=f"Not using {name} ({problem}): quantizing {WEIGHTS_FILE} "
                        "while loading")

    def convert_module(self, module: nn.Module, plan: Optional[LoadPlan] = None) -> nn.Module:
        """Swap every nn.Linear the plan names (all but lm_head unless quantize_lm_head) in place. Meta Linears become
        empty quantized modules for the loader to fill; materialised ones are quantized now. Idempotent."""

        def make(name: str, linear: nn.Linear) -> _QuantLinear:
            new = self.mode.make_linear(linear.in_features, linear.out_features, linear.bias is not None, self.dtype,
                                        linear.weight.device)
            new.train(linear.training)
            if not linear.weight.is_meta:
                new.quantize_(linear.weight.detach())
                if linear.bias is not None:
                    bias = linear.bias.detach().to(self.dtype)
                    new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
            return new

        self.swap_linears(module, plan.swap if plan is not None else self._wanted, make)
        return super().convert_module(module)  # casts the remaining full-precision parameters

    def kernels(self, device: torch.device) -> str:
        if device.type == "cuda":
            return "bitsandbytes CUDA kernels" + (" (LLM.int8)" if self.mode.kind == "int8" else "")
        fallback = "bitsandbytes dequantize + torch matmul"
        if cpu_kernels.lib() is None:
            return f"{fallback} (litquant CPU kernels unavailable: {cpu_kernels.build_error})"
        ours = f"litquant {cpu_kernels.isa()} kernels"
        if self.mode.four_bit:
            return f"{ours}: fused 4-bit matmul (<= {GEMV_MAX_ROWS_4BIT} rows), tiled dequantize + matmul beyond"
        if self.mode.kind == "int8" and cpu_kernels.vnni():
            return f"{ours}: fused LLM.int8 (<= {GEMV_MAX_ROWS_INT8} rows), bitsandbytes int8 matmul beyond"
        if self.mode.kind == "int8":
            return f"{ours}: fused LLM.int8"
        return f"{ours}: tiled dequantize + matmul"

    def hints(self, device: torch.device) -> list[str]:
        out = super().hints(device)
        if device.type == "cpu" and cpu_kernels.lib() is None:
            out.append(f"litquant's CPU kernels are unavailable ({cpu_kernels.build_error}): {self.mode.name} runs a "
                       "much slower fallback")
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def prequantized_metadata(
    mode: BnbMode, quantize_lm_head: bool, dtype: Optional[torch.dtype], source: Path
) -> dict[str, str]:
    """What a pre-quantized file records (all strings: safetensors metadata)."""
    st = source.stat()
    meta = {
        "format": "pt",
        "litquant": "1",
        "litquant_bnb": "1",
        "quantize": f"bnb.{mode.storage}",
        "mode": mode.storage,
        "quantize_lm_head": str(bool(quantize_lm_head)).lower(),
        # dtype of the tensors kept in full precision; "source" = as in the source file (fits any --precision)
        "dtype": "source" if dtype is None else _dtype_name(dtype),
        "source_file": source.name,
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
    }
    if mode.four_bit:
        quant_type, dq = FOUR_BIT[mode.kind]
        meta.update(quant_type=quant_type, blocksize=str(BLOCKSIZE), double_quant=str(dq).lower())
        if dq:
            meta["nested_blocksize"] = str(NESTED_BLOCKSIZE)
    else:
        meta.update(quant_type="int8", blocksize="row", double_quant="false", threshold=str(INT8_THRESHOLD))
    return meta


def prequantized_mismatch(path: Path, plugin: BitsandbytesPrecision) -> Optional[str]:
    """None if the file at `path` fits `plugin` and is not older than its source, else why not."""
    meta = safetensors_metadata(path)
    storage = plugin.mode.storage
    if meta.get("litquant_bnb") != "1" or meta.get("mode") != storage:
        return f"is not a bnb.{storage} file written by `litquant quantize bnb`"
    if plugin.mode.four_bit and meta.get("blocksize") != str(BLOCKSIZE):
        return f"uses blocksize {meta.get('blocksize')}, not {BLOCKSIZE}"
    if meta.get("quantize_lm_head") != str(plugin.quantize_lm_head).lower():
        return f"was made with quantize_lm_head={meta.get('quantize_lm_head')}"
    if meta.get("dtype") not in ("source", _dtype_name(plugin.dtype)):
        return f"keeps full-precision tensors in {meta.get('dtype')}, this run computes in {_dtype_name(plugin.dtype)}"
    source = path.parent / meta.get("source_file", WEIGHTS_FILE)
    if source.is_file():
        st = source.stat()
        if str(st.st_size) != meta.get("source_size") or str(st.st_mtime_ns) != meta.get("source_mtime_ns"):
            return f"is stale: {source.name} changed after it was made"
    return None


for _kind in _HELP:
    register(BnbMode(_kind))
