"""GPTQLinear: a Linear whose weight is stored in the AutoGPTQ layout (see gptq_format.py).

On CPU litquant's kernel reads that layout as it is; 4-bit layers can run torch's int4 kernels after `prepare()`
(the repacked weight replaces `qweight` unless `keep_source=True`); anything else dequantizes, then multiplies.
The weight is frozen; gradients reach the input.
Paths, memory and backward: docs/ARCHITECTURE.md, "GPTQ (algorithm, file format, kernels)".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from litquant.errors import UserError
from litquant.quantization import cpu_kernels, gptq_format

_KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # the inner group sizes tinygemm supports, largest first
# Input rows up to which the CPU kernel beats dequantize + matmul (2 cores, 256x768 and 4096x4096 layers): with
# bf16 activations 0.03 vs 1.4 ms at 1 row, even at 256, 5x slower at 4080; with fp32 ones it runs at ~0.3 ms
# (256x768) / 26 ms (4096x4096) per row, a win only below ~3 rows.
CPU_KERNEL_MAX_ROWS_BF16 = 512
CPU_KERNEL_MAX_ROWS = 2
# litquant's own CPU kernel (cpu_kernels.c) reads the AutoGPTQ layout as it is (bits 2/4/8, fp32 math): up to this
# many input rows it multiplies directly, beyond it a tile of W is dequantized at a time and BLAS multiplies.
GEMV_MAX_ROWS = 8
I16_MAX_ROWS = 4  # AVX2 builds: up to this many rows, 4-bit groups in order take the int16-activation kernel
_RELEASED = (
    "GPTQLinear released its AutoGPTQ qweight in prepare(keep_source=False) and can only run the int4 kernel"
    " forward without gradients; call prepare(keep_source=True) to train through it"
)


@dataclass
class _Int4Kernel:
    device: torch.device
    weight: torch.Tensor  # the kernel's packed layout
    group_size: int  # kernel group size (32..256)
    scales_and_zeros: torch.Tensor  # fp32 [in / group_size, out, 2]: (s, z) with w = (q - 8) * s + z
    perm: torch.Tensor | None  # input channel order that makes groups contiguous (None: already in order)
    _sz_cache: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def sz(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._sz_cache:
            self._sz_cache[dtype] = self.scales_and_zeros.to(dtype)
        return self._sz_cache[dtype]


class GPTQLinear(nn.Module):
    """y = x W^T + b with W held as AutoGPTQ buffers qweight / qzeros / scales / g_idx (+ bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_dequantized: bool = False,
    ) -> None:
        """Buffers get their final shapes and dtypes (meta-friendly); fill them with
        `load_state_dict(..., assign=True)` or by assignment. `dtype` is the bias dtype."""
        super().__init__()
        shapes = gptq_format.packed_shapes(in_features, out_features, bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.cache_dequantized = cache_dequantized
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.float16, device=device))
        self.register_buffer("g_idx", gptq_format.default_g_idx(in_features, group_size, device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)
        self._prepared = False
        self._kernel: _Int4Kernel | None = None
        self._w_cache: torch.Tensor | None = None
        self._ordered: bool | None = None  # g_idx[k] == k // group_size (litquant CPU kernel's fast path)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, device: torch.device | str | None = None
    ) -> GPTQLinear:
        """An empty GPTQLinear shaped like `linear` (for swapping module classes before loading a GPTQ file)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            device=device if device is not None else linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @classmethod
    def from_quantized(cls, result: Any, bias: torch.Tensor | None = None) -> GPTQLinear:
        """From a `gptq.GPTQResult` (what GPTQ.quantize / rtn_quantize return) and the layer's bias."""
        out_features, in_features = result.intweight.shape
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            bits=result.bits,
            group_size=result.group_size,
            device=result.intweight.device,
            dtype=bias.dtype if bias is not None else None,
        )
        for name, t in result.pack().items():
            setattr(layer, name, t)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    # ------------------------------------------------------------------------------------------- runtime

    def prepare(self, keep_source: bool = False) -> bool:
        """Repack for the int4 kernel if it can serve this layer; returns whether it can.

        keep_source=False releases `qweight` (inference at file-size memory; no state_dict, no input grad).
        Call it after the weights are loaded and the module sits on its final device.
        """
        if not self._prepared and self.qzeros.device.type != "meta":  # on meta: nothing to repack yet
            self._kernel = self._build_kernel()
            self._prepared = True
        if self._kernel is not None and not keep_source:
            self.qweight = None
        return self._kernel is not None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in original channel order."""
        if self._w_cache is not None and self._w_cache.dtype == dtype:
            return self._w_cache
        if self.qweight is None:
            raise RuntimeError(_RELEASED)
        if self._c_kernel_ok(self.qzeros):  # the same fp32 products as gptq_format.dequantize, in C
            w = self._dequant_t(0, self.out_features, torch.float32, None).t()
            w = w if dtype == torch.float32 else w.to(dtype)
        else:
            w = gptq_format.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)
        if self.cache_dequantized:
            self._w_cache = w
        return w

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] (what every quantized layer offers for merging)."""
        return self.dequantized_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if not self._prepared and not self._c_kernel_ok(x2d):  # litquant's CPU kernel needs no repacking
            self.prepare(keep_source=not torch.is_inference_mode_enabled())
        if torch.is_grad_enabled() and x.requires_grad:
            if self.qweight is None:  # fail now, not in the middle of backward
                raise RuntimeError(_RELEASED)
            y = _GPTQMatmul.apply(x2d, self)
        else:
            y = self._matmul(x2d)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def uses_kernel(self, dtype: torch.dtype) -> bool:
        """Whether a forward with activations of `dtype` runs the int4 kernel (after prepare)."""
        k = self._kernel
        if k is None:
            return False
        if k.device.type == "cuda":
            return dtype == torch.bfloat16
        return _cpu_kernel_supports(dtype)

    def _c_kernel_ok(self, x: torch.Tensor) -> bool:
        """Whether litquant's CPU kernel serves this input: CPU, bits 2/4/8, qweight present, and not bf16
        activations unless torch's int4 kernel (faster with bf16) turned out unable to serve the layer."""
        if self.bits not in (2, 4, 8) or self.qweight is None or not cpu_kernels.usable(x):
            return False
        # bf16 activations go to torch's int4 kernel, unless it cannot serve the layer or litquant's int16
        # kernel is built (AVX2 builds, where it is the faster one)
        int4_serves = not (self._prepared and self._kernel is None)
        if x.dtype == torch.bfloat16 and int4_serves and not cpu_kernels.i16():
            return False
        return self.out_features % cpu_kernels.lanes() == 0

    def _dequant_t(self, n0: int, n1: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        return cpu_kernels.gptq_dequantize_t(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, cols=(n0, n1), dtype=dtype, out=out
        )

    def _tiled(self, x2d: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return cpu_kernels.tiled_linear(
            x2d,
            self.out_features,
            self.in_features,
            self._dequant_t,
            transpose,
            step=cpu_kernels.lanes(),
            kn=True,
        )

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        k = self._kernel
        if self._c_kernel_ok(x2d):
            if x2d.shape[0] > GEMV_MAX_ROWS:
                return self._tiled(x2d)
            if self._ordered is None:
                self._ordered = cpu_kernels.gptq_ordered(self.g_idx, self.group_size)
            if x2d.shape[0] <= I16_MAX_ROWS and cpu_kernels.gptq_i16_ok(
                self.bits, self.group_size, self.in_features, self.out_features, self._ordered
            ):
                y = cpu_kernels.gptq_i16_matmul(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
                return y.to(x2d.dtype)
            y = cpu_kernels.gptq_matmul(
                x2d,
                self.qweight,
                self.qzeros,
                self.scales,
                self.g_idx,
                self.bits,
                self.group_size,
                self._ordered,
            )
            return y.to(x2d.dtype)
        if (
            k is None
            or not self.uses_kernel(x2d.dtype)
            or x2d.device != k.device
            or not self._kernel_wins(x2d)
        ):
            return x2d @ self.dequantized_weight(x2d.dtype).t()
        if k.perm is not None:
            x2d = x2d.index_select(1, k.perm)
        x2d = x2d.contiguous()
        if k.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2d, k.weight, k.group_size, k.sz(x2d.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, k.weight, k.group_size, k.sz(x2d.dtype))

    def _kernel_wins(self, x2d: torch.Tensor) -> bool:
        """The CPU kernel is a decode kernel: its cost grows per input row. Past a few rows (prefill, evaluation)
        dequantize + matmul is faster, if qweight is still there to dequantize (else the kernel it is)."""
        if self.qweight is None or x2d.device.type != "cpu":
            return True
        limit = CPU_KERNEL_MAX_ROWS_BF16 if x2d.dtype == torch.bfloat16 else CPU_KERNEL_MAX_ROWS
        return x2d.shape[0] <= limit

    def _build_kernel(self) -> _Int4Kernel | None:
        """The int4 kernel's layout for this layer, or None when the kernel cannot serve it."""
        device = self.qzeros.device
        n, k = self.out_features, self.in_features
        if self.bits != 4 or self.qweight is None or device.type == "meta":
            return None
        if device.type == "cpu":
            if n % 16 or not _cpu_kernel_supports(torch.bfloat16):
                return None
        elif device.type == "cuda":
            if n % 8 or torch.cuda.get_device_capability(device) < (8, 0):
                return None
        else:
            return None

        # make groups contiguous: sort input channels by group; a kernel group must not mix two GPTQ groups
        g_idx = self.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        g_sorted = g_idx[perm]
        kernel_group = next(
            (
                kg
                for kg in _KERNEL_GROUP_SIZES
                if k % kg == 0 and bool((g_sorted.view(-1, kg) == g_sorted.view(-1, kg)[:, :1]).all())
            ),
            None,
        )
        if kernel_group is None:
            return None
        if bool((perm == torch.arange(k, device=device)).all()):
            perm = None

        intweight, zeros, scales, _ = gptq_format.unpack(
            self.qweight, self.qzeros, self.scales, self.g_idx, 4
        )
        q = intweight.to(torch.int32)
        if perm is not None:
            q = q[:, perm]
        group_of_chunk = g_sorted[::kernel_group]  # GPTQ group of each kernel group
        s = scales.to(torch.float32)[group_of_chunk]  # [k / kernel_group, n]
        z = (8 - zeros[group_of_chunk]).to(
            torch.float32
        ) * s  # (q - zero) * s == (q - 8) * s + (8 - zero) * s
        scales_and_zeros = torch.stack([s, z], dim=-1).contiguous()
        if device.type == "cuda":
            inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # two values per byte, the even one high
            weight = torch.ops.aten._convert_weight_to_int4pack(q_u8.contiguous(), inner_k_tiles)
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        return _Int4Kernel(device, weight, kernel_group, scales_and_zeros, perm)

    # ------------------------------------------------------------------------------------ module plumbing

    def _apply(self, fn: Any, recurse: bool = True) -> GPTQLinear:
        # scales stay fp16 as on disk: model.to(bf16) would round them (fp16 -> bf16 drops 3 mantissa bits)
        scales = self._buffers["scales"]
        self._buffers["scales"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = scales
        if scales is not None:
            moved = fn(scales)
            self._buffers["scales"] = moved if moved.dtype == scales.dtype else scales.to(moved.device)
        self._w_cache = None
        if self._kernel is None:
            self._prepared = False  # re-check on the next forward (e.g. moved from meta, or to a CUDA device)
        elif self._kernel.device != self.qzeros.device:
            if self.qweight is None:
                raise RuntimeError("a GPTQLinear prepared with keep_source=False cannot change device")
            self._kernel, self._prepared = None, False  # kernel layouts are device specific: rebuild lazily
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self.qweight is None:
            raise RuntimeError(
                f"{prefix or 'GPTQLinear'}: qweight was released by prepare(keep_source=False); the int4 kernel"
                " layout cannot be saved as AutoGPTQ tensors (use prepare(keep_source=True) if you need to save)"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:  # give the released buffer a slot again so the new qweight can land
            shape = gptq_format.packed_shapes(self.in_features, self.out_features, self.bits, self.group_size)
            self.qweight = torch.empty(shape["qweight"], dtype=torch.int32, device=self.qzeros.device)
        self._prepared, self._kernel, self._w_cache, self._ordered = False, None, None, None  # new weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_litquant_tensor(
        self, attr: str, tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None
    ) -> None:
        """The checkpoint loader's hook (litquant.checkpoint.load_weights): check one tensor of a GPTQ file
        and take it. The loader casts plain float tensors to the compute dtype; here only the bias follows it,
        scales stay fp16 as on disk."""
        where = getattr(self, "litquant_name", "") or "GPTQLinear"
        shapes = gptq_format.packed_shapes(self.in_features, self.out_features, self.bits, self.group_size)
        shapes["bias"] = (self.out_features,)
        if attr not in shapes or (attr == "bias" and self.bias is None):
            raise UserError(f"unexpected tensor {where}.{attr} for a {self.bits}-bit GPTQ layer")
        if tuple(tensor.shape) != shapes[attr]:
            raise UserError(
                f"{where}.{attr} has shape {tuple(tensor.shape)} but a {self.bits}-bit GPTQ layer with"
                f" in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
                f" needs {shapes[attr]} (was the file quantized with other settings?)"
            )
        if attr in ("qweight", "qzeros", "g_idx"):
            if tensor.dtype != torch.int32 and not (attr == "g_idx" and tensor.dtype == torch.int64):
                raise UserError(
                    f"{where}.{attr} must be int32, got {str(tensor.dtype).replace('torch.', '')}"
                )
            tensor = tensor.to(torch.int32)
        elif attr == "scales":
            tensor = tensor.to(torch.float16)
        elif dtype is not None:
            tensor = tensor.to(dtype)
        self._buffers[attr] = tensor.to(device)
        self._prepared, self._kernel, self._w_cache, self._ordered = False, None, None, None  # new weights

    def litquant_storage(self) -> Any:
        """The int4 kernel's tensors (not buffers), for weight accounting (litquant.utils.weights_line)."""
        if self._kernel is not None:
            yield "int4pack", self._kernel.weight
            yield "scales_and_zeros", self._kernel.scales_and_zeros

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
            f" bits={self.bits}, group_size={self.group_size}"
        )


class _GPTQMatmul(torch.autograd.Function):
    """x2d @ W^T with a frozen quantized W; backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x2d)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        if layer._c_kernel_ok(grad_out.float()):
            return layer._tiled(grad_out, transpose=True), None
        return grad_out @ layer.dequantized_weight(grad_out.dtype), None


@functools.cache
def _cpu_kernel_supports(dtype: torch.dtype) -> bool:
    """Whether this torch's CPU int4 kernel takes `dtype` activations (older builds: bf16 only or absent)."""
    try:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 32, dtype=torch.int32), 2)
        sz = torch.zeros(1, 16, 2, dtype=dtype)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 32, dtype=dtype), w, 32, sz)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
