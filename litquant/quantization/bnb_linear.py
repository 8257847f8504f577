"""The bitsandbytes-backed Linears: `Linear4bit` (nf4/fp4, optional double quantization) and `Linear8bit` (LLM.int8).

Plain `nn.Module`s holding bitsandbytes' storage as buffers (their `state_dict()` is the pre-quantized file):
`quantize_(weight)` fills them, `dequantize()` gives W back, and forward runs in the compute dtype on litquant's CPU
kernels or bitsandbytes' ops. The `bnb.*` modes that build them live in bnb.py.
Details: docs/ARCHITECTURE.md, "Quantization modes: bitsandbytes".
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn

from litquant.errors import UserError
from litquant.quantization import bnb_format, cpu_kernels

BLOCKSIZE = 64  # bnb's default 4-bit block
NESTED_BLOCKSIZE = (
    256  # double quantization: blocks of absmax values (the only size bnb's fused kernels take)
)
QUANTIZE_CHUNK = 1 << 22  # weights are quantized this many elements at a time (bounds the temporaries)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold on input magnitudes
# litquant's CPU kernels (cpu_kernels.c): up to this many input rows the fused 4-bit / int8 matmul, beyond it a
# dequantized tile + BLAS. Every row the fused kernel computes gets the same arithmetic whatever the number of rows,
# so a batch of up to 16 decoding sequences gets the tokens each would get alone.
GEMV_MAX_ROWS_4BIT = 16
GEMV_MAX_ROWS_INT8 = 4
# AVX2 builds: up to this many rows the int16-activation 4-bit kernel (cpu_gemv.c), which streams the weights at the
# bandwidth where the fp32 one is compute-bound; its cost grows faster per row, so more rows take the fp32 kernel
I16_MAX_ROWS = 4

# bnb >= 0.48 tries to fetch a CPU GEMM from the Hugging Face Hub when imported and logs a warning when it cannot
# (always, offline); its own native CPU kernels are used instead, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ---- bitsandbytes, imported lazily (registering the bnb.* modes imports this module, and must not need it) ----


@functools.cache
def _bnb():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


def bnb_version() -> tuple[int, ...]:
    """The installed bitsandbytes' (major, minor), read from its metadata: importing it costs seconds."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("bitsandbytes")
    except PackageNotFoundError:
        raise ImportError("bitsandbytes is not installed") from None
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    return bnb_format.code(quant_type, torch.device(device))


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
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str,
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
            return cpu_kernels.tiled_linear(
                grad, self.out_features, self.in_features, self._dequant_rows, True
            )
        return grad @ self.dequantize(grad.dtype)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.tiled_linear(
            x.reshape(-1, self.in_features), self.out_features, self.in_features, self._dequant_rows
        )
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

    def load_litquant_tensor(
        self, attr: str, tensor: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]
    ):
        """The loader's hook: a full-precision `weight` is quantized on `device` right away; the tensors of a
        pre-quantized file are checked against the expected shapes/dtypes and taken as they are."""
        if attr == "bias":
            if self.bias is None or tuple(tensor.shape) != (self.out_features,):
                raise UserError(
                    f"{self._where()}: unexpected bias of shape {tuple(tensor.shape)} (config mismatch?)"
                )
            self.bias = (
                nn.Parameter(  # dtype None: as stored (a pre-quantized file keeps the source's dtypes)
                    tensor.to(device=device, dtype=dtype), requires_grad=self.bias.requires_grad
                )
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
      offset         fp32 () or (ceil(blocks/256),)  double quant only: mean absmax, subtracted before quantizing;
                     one per 256 blocks when the layer joins separately quantized layers (HF q/k/v fused on import)
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
        self._quant_names = ("weight", "absmax") + (
            ("nested_absmax", "nested_code", "offset") if double_quant else ()
        )
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
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        # In chunks of rows: bnb's CPU quantizer makes several fp32-sized temporaries of its input, which for a
        # large Linear would cost more than the whole layer's 4-bit result. Blocks never straddle chunks (each
        # chunk is a multiple of blocksize elements), and the double quantization below runs over all absmax at
        # once exactly as quantize_4bit(compress_statistics=True) does, so the bits are bnb's.
        flat = weight.contiguous().reshape(-1)
        step = max(QUANTIZE_CHUNK // self.blocksize, 1) * self.blocksize
        parts = [self._quantize_4bit(flat[i : i + step]) for i in range(0, flat.numel(), step)]
        packed = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
        absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
        del parts, flat
        state = {"weight": packed, "absmax": absmax}
        if self.double_quant:
            offset = absmax.mean()
            qabsmax, nested = _bnb().functional.quantize_blockwise(
                absmax - offset, blocksize=NESTED_BLOCKSIZE
            )
            state.update(
                absmax=qabsmax,
                nested_absmax=nested.absmax,
                nested_code=nested.code,
                offset=offset.float().reshape(()),
            )
        self._set_state(state)

    def _quantize_4bit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed codes, fp32 absmax) of a flat chunk: on CPU litquant's copy of bnb's quantizer (the same bits,
        without importing bitsandbytes), elsewhere bnb's own."""
        if w.device.type == "cpu":
            return bnb_format.quantize_4bit(w, self.blocksize, self.quant_type)
        packed, qs = _bnb().functional.quantize_4bit(w, blocksize=self.blocksize, quant_type=self.quant_type)
        return packed, qs.absmax

    def load_litquant_tensor(
        self, attr: str, tensor: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]
    ):
        """As for any quantized Linear; a double-quantized layer's offset may also be one per 256 blocks."""
        nested = math.ceil(self.num_blocks / NESTED_BLOCKSIZE)
        if (
            attr == "offset"
            and self.double_quant
            and tensor.dtype == torch.float32
            and tensor.shape == (nested,)
        ):
            self._buffers[attr] = tensor.to(device)
            return
        super().load_litquant_tensor(attr, tensor, device, dtype)

    def _block_offsets(self) -> torch.Tensor:
        """The double-quantization offset, broadcastable over the blocks' absmax."""
        if self.offset.dim() == 0:
            return self.offset
        return self.offset.repeat_interleave(NESTED_BLOCKSIZE)[: self.num_blocks]

    def _absmax(self) -> torch.Tensor:
        """fp32 absmax per block (double quant undone, as bnb does: code value * nested absmax, + offset)."""
        if not self.double_quant:
            return self.absmax
        nested = _bnb().functional.QuantState(
            absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        return _bnb().functional.dequantize_blockwise(self.absmax, nested) + self._block_offsets()

    def quant_state(self, dtype: Optional[torch.dtype] = None):
        """A bitsandbytes QuantState over this layer's buffers (portable layout). bnb takes one offset per layer:
        with one per 256 blocks the state holds the fp32 absmax, double quantization undone (the same values)."""
        F = _bnb().functional
        state2 = None
        if self.double_quant and self.offset.dim() > 0:
            return F.QuantState(
                absmax=self._absmax(),
                shape=torch.Size((self.out_features, self.in_features)),
                code=_code(self.quant_type, self.absmax.device),
                blocksize=self.blocksize,
                quant_type=self.quant_type,
                dtype=dtype or self.compute_dtype,
            )
        if self.double_quant:
            state2 = F.QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        return F.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=_code(self.quant_type, self.absmax.device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype or self.compute_dtype,
            offset=self.offset if self.double_quant else None,
            state2=state2,
        )

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight the quantized storage stands for, in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        # the same fp32 products as bnb's dequantize_4bit, several times faster
        if self._cpu_fast(self.absmax):
            w = self._dequant_rows(0, self.out_features, torch.float32, None)
            return w if dtype == torch.float32 else w.to(dtype)
        qs = self.quant_state(dtype)
        return _bnb().functional.dequantize_4bit(self.weight, qs)

    def _dq(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self.nested_code, self.nested_absmax, self.offset) if self.double_quant else None

    def _dequant_rows(
        self, n0: int, n1: int, dtype: torch.dtype, out: Optional[torch.Tensor]
    ) -> torch.Tensor:
        return cpu_kernels.bnb4_dequantize(
            self.weight,
            self.out_features,
            self.in_features,
            self.absmax,
            _code(self.quant_type, self.absmax.device),
            self._dq(),
            rows=(n0, n1),
            dtype=dtype,
            out=out,
        )

    def _cpu_fast(self, x: torch.Tensor) -> bool:
        return self.in_features % BLOCKSIZE == 0 and cpu_kernels.usable(x)

    # -- compute -----------------------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_fast(x):  # litquant's kernels: fused 4-bit matmul for few rows, else tiles + BLAS
            if x.numel() > GEMV_MAX_ROWS_4BIT * self.in_features:
                return self._tiled(x)
            kernel = cpu_kernels.bnb4_matmul
            if x.numel() <= I16_MAX_ROWS * self.in_features and cpu_kernels.i16():
                kernel = cpu_kernels.bnb4_i16_matmul
            y = kernel(
                x.reshape(-1, self.in_features),
                self.weight,
                self.out_features,
                self.in_features,
                self.absmax,
                _code(self.quant_type, x.device),
                self._dq(),
            )
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = [self.out_features, self.in_features]
        _bnb()  # registers torch.ops.bitsandbytes
        if not self.double_quant or self.offset.dim() > 0:  # bnb's op takes one offset: undo dq first
            return torch.ops.bitsandbytes.gemm_4bit.default(
                x, self.weight, shape, self._absmax(), self.blocksize, self.quant_type
            )
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x,
            self.weight,
            shape,
            self.nested_absmax,
            self.blocksize,
            self.quant_type,
            absmax_8bit=self.absmax,
            absmax_code=self.nested_code,
            absmax_offset=self.offset,
        )


class Linear8bit(_QuantLinear):
    """Int8 Linear (LLM.int8 storage): weight int8 (out, in), absmax fp32 (out,); W = weight * absmax / 127.

    `training=False` (bnb.int8): LLM.int8 forward. Input columns with any |x| >= threshold (within one sequence)
    multiply in full precision with the dequantized weight; the rest of each input row is scaled by its absmax to int8,
    multiplied in int32 (bnb's int8 matmul: cuBLASLt on CUDA, torch._int_mm on AVX512 CPUs) and rescaled in fp32, so
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

    def _dequant_rows(
        self, n0: int, n1: int, dtype: torch.dtype, out: Optional[torch.Tensor]
    ) -> torch.Tensor:
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
        if self._cpu_fast(x) and (
            x.numel() <= GEMV_MAX_ROWS_INT8 * self.in_features or not cpu_kernels.vnni()
        ):
            y = cpu_kernels.int8_matmul(
                x.reshape(-1, self.in_features), self.weight, self.absmax, self.threshold, group
            )
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = x.shape
        x = x.reshape(-1, group, self.in_features)
        # (G, 1, K)
        outliers = (x.abs() >= self.threshold).any(dim=1, keepdim=True) if self.threshold > 0 else None
        cols = outliers.any(dim=0).squeeze(0).nonzero().squeeze(1) if outliers is not None else None
        has_outliers = cols is not None and cols.numel() > 0
        xr = (x.masked_fill(outliers, 0) if has_outliers else x).reshape(-1, self.in_features)
        x_absmax = xr.abs().amax(dim=1).float()
        x_scale = torch.where(x_absmax > 0, 127.0 / x_absmax, torch.zeros_like(x_absmax))
        xq = torch.round(xr.float() * x_scale[:, None]).to(torch.int8)
        _bnb()  # registers torch.ops.bitsandbytes
        acc = torch.ops.bitsandbytes.int8_linear_matmul.default(xq, self.weight)  # (M, N) int32
        y = acc.float() * (x_absmax[:, None] * self.absmax[None, :] / (127.0 * 127.0))
        if has_outliers:  # each sequence's own outlier columns (the others' are zero in its rows)
            w_cols = self.weight[:, cols].float() * (self.absmax[:, None] / 127.0)  # (N, n_outliers)
            x_out = (x[..., cols] * outliers[..., cols]).reshape(-1, cols.numel()).float()
            y = y + x_out @ w_cols.t()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
