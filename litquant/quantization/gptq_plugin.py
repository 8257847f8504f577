"""`--quantize gptq.int4` (and gptq.int2 / int3 / int8): run a checkpoint quantized by `litquant quantize gptq`.

`resolve(precision, "gptq.int4", device)` gives the `GPTQPrecision` that loads `lit_model_gptq.<bits>bit.safetensors`
into `GPTQLinear`s (options: `keep_source`, `quantize_lm_head`). File, loading, kernels and options:
docs/ARCHITECTURE.md, "GPTQ (algorithm, file format, kernels)".
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litquant.errors import UserError, read_json
from litquant.io import file_keys, safetensors_metadata
from litquant.precision import LitquantPrecision
from litquant.quantization import cpu_kernels, gptq_format
from litquant.quantization.gptq_format import SUPPORTED_BITS
from litquant.quantization.gptq_linear import GEMV_MAX_ROWS, I16_MAX_ROWS, GPTQLinear
from litquant.quantization.modes import LoadPlan, QuantMode, register
from litquant.utils import best_time

QUANTIZE_CONFIG_FILE = "quantize_config.json"
# fp32 activations double the unquantized head's and embedding's bytes: litquant's fp32 kernel has to beat torch's
# int4 kernel by this factor per layer before fp32 is the faster model
INT4_KERNEL_LAG = 1.5
_HELP = {
    2: "GPTQ 2-bit (AutoGPTQ layout): dequantize + matmul per call, no fused kernel",
    3: "GPTQ 3-bit (AutoGPTQ layout): dequantize + matmul per call, no fused kernel",
    4: "GPTQ 4-bit (AutoGPTQ layout), torch int4 tinygemm kernels on CPU and CUDA; "
    "make it with `litquant quantize gptq`",
    8: "GPTQ 8-bit (AutoGPTQ layout): dequantize + matmul per call, no fused kernel",
}


def gptq_file(bits: int) -> str:
    return f"lit_model_gptq.{bits}bit.safetensors"


def quantize_config(
    bits: int,
    group_size: int,
    desc_act: bool = False,
    sym: bool = False,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    static_groups: bool = False,
) -> dict[str, Any]:
    """The AutoGPTQ `quantize_config.json` fields (also HF's config.json `quantization_config`)."""
    return dict(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        damp_percent=damp_percent,
        true_sequential=true_sequential,
        static_groups=static_groups,
        quant_method="gptq",
        checkpoint_format="gptq",
    )


def read_quantize_config(path: Path) -> dict[str, Any]:
    """The quantize config of a GPTQ weights file: the copy in its safetensors header (written by our job and
    importer, so each file knows its own settings), else `quantize_config.json` beside it."""
    meta = safetensors_metadata(path)
    if "quantize_config" in meta:
        try:
            qc = json.loads(meta["quantize_config"])
        except json.JSONDecodeError:
            raise UserError(f"{path}: the quantize_config in its header is not valid JSON") from None
    else:
        cfg = path.parent / QUANTIZE_CONFIG_FILE
        if not cfg.is_file():
            raise UserError(f"{path.parent} has no {QUANTIZE_CONFIG_FILE} (needed to read {path.name})")
        qc = read_json(cfg)
    check_quantize_config(qc, str(path))
    return qc


def check_quantize_config(qc: Any, source: str) -> None:
    if not isinstance(qc, dict):
        raise UserError(f"{source}: the GPTQ quantize config must be a JSON object")
    if qc.get("quant_method", "gptq") != "gptq":
        raise UserError(f"{source}: quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UserError(
            f"{source}: checkpoint_format {fmt!r} is not supported (litquant reads 'gptq', AutoGPTQ's v1)"
        )
    if qc.get("bits") not in SUPPORTED_BITS:
        raise UserError(f"{source}: GPTQ bits must be one of {SUPPORTED_BITS}, got {qc.get('bits')!r}")
    gs = qc.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs < 1):
        raise UserError(f"{source}: group_size must be a positive integer or -1, got {gs!r}")


def quantized_modules(path: Path) -> set[str]:
    """Names of the modules a GPTQ file quantizes (those with a `qweight`)."""
    return {k[: -len(".qweight")] for k in file_keys(path) if k.endswith(".qweight")}


class GPTQMode(QuantMode):
    """`gptq.int<bits>`: a checkpoint quantized ahead of time by `litquant quantize gptq` (or imported)."""

    options = ("keep_source", "quantize_lm_head")
    lora_options = {"keep_source": True}  # training through the layer and merging need the AutoGPTQ qweight
    stored_as_is = (".scales",)  # fp16 scales stay fp16 at any precision

    def __init__(self, bits: int) -> None:
        self.bits, self.name, self.help = bits, f"gptq.int{bits}", _HELP[bits]
        self.nominal_bits = bits
        self.file = gptq_file(bits)
        self.needs_file = self.file  # only a checkpoint that has this file loads in this mode

    def plugin(self, precision: str, device: torch.device, **options: Any) -> "GPTQPrecision":
        return GPTQPrecision(
            self,
            precision,
            keep_source=bool(options.get("keep_source", False)),
            quantize_lm_head=bool(options.get("quantize_lm_head", False)),
        )

    def preferred_precision(self, device: torch.device) -> Optional[str]:
        """4-bit: bf16 activations on AVX-512 CPUs, native bf16 or not: torch's int4 kernel with bf16 activations beats
        litquant's fp32 one there, and bf16 halves the unquantized embedding and head (1.1B, 2 cores: 37.6 vs 26.4
        tok/s with native bf16 masked off). Without native bf16, bf16's speed depends on the CPU (one ran a 1.1B
        model at 5 GB/s of weights), so there the choice is timed (int4_kernel_keeps_up). On AVX2-only CPUs fp32 wins
        (20.4 vs 16.9): the device default."""
        from litquant.precision import cpu_has_avx512, cpu_has_native_bf16

        if self.bits != 4 or device.type != "cpu" or not cpu_has_avx512():
            return None
        return "bf16-true" if cpu_has_native_bf16() or int4_kernel_keeps_up() else None

    def linear_bytes(
        self, in_features: int, out_features: int, group_size: int = 128, runtime: bool = True
    ) -> int:
        """The AutoGPTQ tensors (int32 qweight, qzeros, g_idx; fp16 scales), or at runtime with the int4 kernel its
        repacked weight (n/2 bytes, replacing qweight) and fp32 (scale, zero) per kernel group and row."""
        shapes = gptq_format.packed_shapes(in_features, out_features, self.bits, group_size)
        qweight = 4 * math.prod(shapes["qweight"])
        rest = (
            4 * math.prod(shapes["qzeros"]) + 2 * math.prod(shapes["scales"]) + 4 * math.prod(shapes["g_idx"])
        )
        kernel_group = self.kernel_group(in_features, out_features, group_size) if runtime else None
        if kernel_group is None:
            return qweight + rest
        return in_features * out_features // 2 + 8 * (in_features // kernel_group) * out_features + rest

    def kernel_group(self, in_features: int, out_features: int, group_size: int) -> Optional[int]:
        """The group size GPTQLinear's int4 kernel runs a layer with (None: no such kernel): the largest of
        256/128/64/32 that divides in_features and never spans two GPTQ groups."""
        if self.bits != 4 or out_features % 16:
            return None
        return next(
            (
                kg
                for kg in (256, 128, 64, 32)
                if in_features % kg == 0 and (group_size == -1 or group_size % kg == 0)
            ),
            None,
        )


class GPTQPrecision(LitquantPrecision):
    """`--quantize gptq.int<bits>`: loads the GPTQ file into GPTQLinear modules; compute dtype from --precision."""

    def __init__(
        self,
        mode: GPTQMode,
        precision: str = "32-true",
        keep_source: bool = False,
        quantize_lm_head: bool = False,
    ) -> None:
        super().__init__(precision)
        self.mode = mode
        self.bits = mode.bits
        self.keep_source = keep_source
        self.quantize_lm_head = quantize_lm_head

    def load_plan(self, checkpoint_dir: Optional[Path]) -> LoadPlan:
        """The GPTQ file, its group size and the Linears it quantizes (those with a qweight), read from its header.
        Without a checkpoint (random weights): what GPTQ quantizes by default, the blocks' Linears, groups of 128."""
        name = self.mode.file
        if checkpoint_dir is None:
            return LoadPlan(name, swap=lambda n: n.startswith("transformer.h."), extra={"group_size": 128})
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            others = sorted(p.name for p in Path(checkpoint_dir).glob("lit_model_gptq.*bit.safetensors"))
            found = f" (found: {', '.join(others)})" if others else ""
            raise UserError(
                f"{checkpoint_dir} has no {name}{found}: make it with `litquant quantize gptq --checkpoint_dir "
                f"{checkpoint_dir} --bits {self.bits}` (or import a GPTQ model with `litquant convert_hf_checkpoint`)"
            )
        qc = read_quantize_config(path)
        if qc["bits"] != self.bits:
            raise UserError(
                f"{path} was quantized with {qc['bits']} bits but --quantize {self.mode.name} needs {self.bits}"
            )
        modules = quantized_modules(path)
        if not modules:
            raise UserError(f"{path} holds no GPTQ layers (no *.qweight tensors)")
        if self.quantize_lm_head and "lm_head" not in modules:
            raise UserError(
                f"{path} has no quantized lm_head (GPTQ quantizes the blocks; run without --quantize_lm_head)"
            )
        return LoadPlan(name, swap=modules.__contains__, extra={"group_size": qc["group_size"]})

    def convert_module(self, module: nn.Module, plan: Optional[LoadPlan] = None) -> nn.Module:
        """Swap the Linears the plan names for empty GPTQLinears (on meta, for the loader to fill). Without a plan
        (Fabric's call on the loaded model) there is nothing left to swap."""
        if plan is not None:

            def make(name: str, linear: nn.Linear) -> GPTQLinear:
                if not linear.weight.is_meta:
                    raise UserError(
                        f"--quantize {self.mode.name} loads GPTQ weights made ahead of time (`litquant quantize gptq`);"
                        f" it cannot quantize the already-loaded layer {name}:"
                        " load the model with litquant.checkpoint.load_model"
                    )
                return GPTQLinear(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    bits=self.bits,
                    group_size=plan.extra["group_size"],
                    device="meta",
                    dtype=self.dtype,
                )

            self.swap_linears(module, plan.swap, make)
        return super().convert_module(module)

    def kernels(self, device: torch.device) -> str:
        if self.bits != 4 and (device.type == "cuda" or cpu_kernels.lib() is None or self.bits == 3):
            return "dequantize + torch matmul (no fused kernel for this width)"
        i16 = device.type == "cpu" and cpu_kernels.lib() is not None and cpu_kernels.i16()
        if device.type == "cuda" or (self.dtype == torch.bfloat16 and self.bits == 4 and not i16):
            return "torch int4 tinygemm (int4pack)"
        if cpu_kernels.lib() is None:
            return (
                "torch int4 kernel / dequantize + matmul "
                f"(litquant CPU kernels unavailable: {cpu_kernels.build_error})"
            )
        small = f"fused GPTQ matmul (<= {GEMV_MAX_ROWS} rows)"
        if i16:
            small = (
                f"int16-activation GPTQ matmul (<= {I16_MAX_ROWS} rows, 4-bit groups in order), fp32 one "
                f"(<= {GEMV_MAX_ROWS} rows)"
            )
        return f"litquant {cpu_kernels.isa()} kernels: {small} on the AutoGPTQ layout, tiled dequantize + matmul beyond"

    def hints(self, device: torch.device) -> list[str]:
        out = super().hints(device)
        if device.type == "cpu" and cpu_kernels.lib() is None and self.dtype != torch.bfloat16:
            out.append(
                f"litquant's CPU kernels are unavailable ({cpu_kernels.build_error}): with "
                f"{self.precision} {self.mode.name} runs a much slower path; --precision bf16-true is faster"
            )
        return out

    def after_load(self, model: nn.Module) -> nn.Module:
        """Make each layer ready for its kernel now that it sits on its device. On CPU with fp32/fp16 activations
        litquant's kernel reads the AutoGPTQ layout as it is: nothing to repack. Otherwise 4-bit layers are
        repacked for torch's int4 kernel and the AutoGPTQ qweight released (4-bit memory) unless asked to keep it,
        or unless that kernel would serve only decoding (fp32/fp16 on CPU without litquant's kernels)."""
        probe = torch.empty(0, dtype=self.dtype)
        for m in model.modules():
            if isinstance(m, GPTQLinear):
                on_cpu = m.qzeros.device.type == "cpu"
                if on_cpu and m._c_kernel_ok(probe):
                    continue
                cpu_decode_only = on_cpu and self.dtype != torch.bfloat16
                m.prepare(keep_source=self.keep_source or cpu_decode_only)
        return model


for _bits in SUPPORTED_BITS:
    register(GPTQMode(_bits))


@functools.cache
def int4_kernel_keeps_up() -> bool:
    """Whether torch's CPU int4 kernel, bf16 activations, runs a decode row within INT4_KERNEL_LAG x the time of
    litquant's fp32 kernel on the AutoGPTQ layout: timed once per process on a 2048 x 5632 layer (a few ms)."""
    if cpu_kernels.lib() is None:
        return True
    g = torch.Generator().manual_seed(0)
    layer = GPTQLinear(5632, 2048, bias=False)
    layer.qweight = torch.randint(-(2**31), 2**31 - 1, layer.qweight.shape, dtype=torch.int32, generator=g)
    layer.qzeros = torch.randint(-(2**31), 2**31 - 1, layer.qzeros.shape, dtype=torch.int32, generator=g)
    layer.scales = (torch.rand(layer.scales.shape, generator=g) * 0.01).half()
    int4 = GPTQLinear(5632, 2048, bias=False)
    int4.load_state_dict(layer.state_dict())
    if not int4.prepare():
        return True
    x = torch.randn(1, 5632, generator=g)
    with torch.inference_mode():
        t_int4 = best_time(lambda: int4(x.bfloat16()), 5)
        t_fp32 = best_time(lambda: layer(x), 5)
    return t_int4 <= INT4_KERNEL_LAG * t_fp32
