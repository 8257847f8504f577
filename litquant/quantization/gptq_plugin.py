"""`--quantize gptq.int4` (and gptq.int2 / int3 / int8): run a checkpoint quantized by `litquant quantize gptq`.

A GPTQ checkpoint directory holds `lit_model_gptq.<bits>bit.safetensors` (the quantized Linears in the
AutoGPTQ layout, everything else as it was saved) and `quantize_config.json`. The plugin reads that file
instead of `lit_model.safetensors`, swaps the Linears it quantizes (the file says which: those with a
`qweight`) for `GPTQLinear` on the meta device, lets the loader stream the tensors in, and repacks 4-bit
layers for the int4 kernels (`GPTQLinear.prepare`). No full-precision weight is ever materialised.

Modes: gptq.int4 runs torch's int4 tinygemm kernels (CPU and CUDA); gptq.int2 / gptq.int3 / gptq.int8
dequantize the weight on every call and multiply (correct, not fast: no fused kernel for those widths).

Options (`resolve(..., keep_source=True)`): `keep_source` keeps the AutoGPTQ `qweight` after repacking,
which training through the layer (LoRA on a GPTQ base) and saving need; inference jobs leave it False so a
4-bit model runs at its file size. `quantize_lm_head=True` insists that the file has a quantized lm_head.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litquant.checkpoint import file_keys, safetensors_metadata
from litquant.errors import UserError, read_json
from litquant.precision import LitquantPrecision, register
from litquant.quantization.gptq_format import SUPPORTED_BITS
from litquant.quantization import cpu_kernels
from litquant.quantization.gptq_linear import GEMV_MAX_ROWS, GPTQLinear

QUANTIZE_CONFIG_FILE = "quantize_config.json"
_HELP = {
    2: "GPTQ 2-bit (AutoGPTQ layout): dequantize + matmul per call, no fused kernel",
    3: "GPTQ 3-bit (AutoGPTQ layout): dequantize + matmul per call, no fused kernel",
    4: "GPTQ 4-bit (AutoGPTQ layout), torch int4 tinygemm kernels on CPU and CUDA; make it with `litquant quantize gptq`",
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
        bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
        true_sequential=true_sequential, static_groups=static_groups, quant_method="gptq", checkpoint_format="gptq",
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
        raise UserError(f"{source}: checkpoint_format {fmt!r} is not supported (litquant reads 'gptq', AutoGPTQ's v1)")
    if qc.get("bits") not in SUPPORTED_BITS:
        raise UserError(f"{source}: GPTQ bits must be one of {SUPPORTED_BITS}, got {qc.get('bits')!r}")
    gs = qc.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs < 1):
        raise UserError(f"{source}: group_size must be a positive integer or -1, got {gs!r}")


def quantized_modules(path: Path) -> set[str]:
    """Names of the modules a GPTQ file quantizes (those with a `qweight`)."""
    return {k[: -len(".qweight")] for k in file_keys(path) if k.endswith(".qweight")}


class GPTQPrecision(LitquantPrecision):
    """`--quantize gptq.int<bits>`: loads the GPTQ file into GPTQLinear modules; compute dtype from --precision."""

    def __init__(
        self, bits: int, precision: str = "32-true", keep_source: bool = False, quantize_lm_head: bool = False
    ) -> None:
        super().__init__(precision)
        if bits not in SUPPORTED_BITS:
            raise UserError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.bits = bits
        self.quantize = f"gptq.int{bits}"
        self.keep_source = keep_source
        self.quantize_lm_head = quantize_lm_head
        self.group_size: Optional[int] = None  # from the file, in weights_file()
        self.modules: Optional[set[str]] = None  # which Linears the file quantizes

    def weights_file(self, checkpoint_dir: Path) -> str:
        name = gptq_file(self.bits)
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
            raise UserError(f"{path} was quantized with {qc['bits']} bits but --quantize {self.quantize} needs {self.bits}")
        self.group_size = qc["group_size"]
        self.modules = quantized_modules(path)
        if not self.modules:
            raise UserError(f"{path} holds no GPTQ layers (no *.qweight tensors)")
        if self.quantize_lm_head and "lm_head" not in self.modules:
            raise UserError(f"{path} has no quantized lm_head (GPTQ quantizes the blocks; run without --quantize_lm_head)")
        return name

    def _wanted(self, name: str) -> bool:
        if self.modules is not None:
            return name in self.modules
        return name.startswith("transformer.h.")  # no file seen yet: GPTQ's default, the blocks' Linears

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Swap the Linears the file quantizes for empty GPTQLinears (on meta, for the loader to fill).
        Idempotent: Fabric calls it again on the loaded model, which has no such nn.Linear left."""
        def make(name: str, linear: nn.Linear) -> GPTQLinear:
            if not linear.weight.is_meta:
                raise UserError(
                    f"--quantize {self.quantize} loads GPTQ weights made ahead of time (`litquant quantize gptq`);"
                    f" it cannot quantize the already-loaded layer {name}: load the model with litquant.checkpoint.load_model"
                )
            return GPTQLinear(
                linear.in_features, linear.out_features, bias=linear.bias is not None, bits=self.bits,
                group_size=self.group_size if self.group_size is not None else 128, device="meta", dtype=self.dtype,
            )

        self.swap_linears(module, self._wanted, make)
        return super().convert_module(module)

    def kernels(self, device: torch.device) -> str:
        if self.bits != 4 and (device.type == "cuda" or cpu_kernels.lib() is None or self.bits == 3):
            return "dequantize + torch matmul (no fused kernel for this width)"
        if device.type == "cuda" or (self.dtype == torch.bfloat16 and self.bits == 4):
            return "torch int4 tinygemm (int4pack)"
        if cpu_kernels.lib() is None:
            return f"torch int4 kernel / dequantize + matmul (litquant CPU kernels unavailable: {cpu_kernels.build_error})"
        return (f"litquant {cpu_kernels.isa()} kernels: fused GPTQ matmul on the AutoGPTQ layout (<= "
                f"{GEMV_MAX_ROWS} rows), tiled dequantize + matmul beyond")

    def hints(self, device: torch.device) -> list[str]:
        out = super().hints(device)
        if device.type == "cpu" and cpu_kernels.lib() is None and self.dtype != torch.bfloat16:
            out.append(f"litquant's CPU kernels are unavailable ({cpu_kernels.build_error}): with "
                       f"{self.precision} {self.quantize} runs a much slower path; --precision bf16-true is faster")
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


def _make_plugin(bits: int, precision: str, device: torch.device, **options: Any) -> GPTQPrecision:
    return GPTQPrecision(
        bits, precision, keep_source=bool(options.get("keep_source", False)),
        quantize_lm_head=bool(options.get("quantize_lm_head", False)),
    )


def _preferred_int4(device: torch.device) -> Optional[str]:
    """bf16 activations on AVX-512 CPUs, native bf16 or not: torch's int4 kernel with bf16 activations beats
    litquant's fp32 one there, and bf16 halves the unquantized embedding and head (1.1B, 2 cores: 37.6 vs 26.4
    tok/s with native bf16 masked off). On AVX2-only CPUs fp32 wins (20.4 vs 16.9): the device default."""
    from litquant.precision import cpu_has_avx512

    return "bf16-true" if device.type == "cpu" and cpu_has_avx512() else None


for _bits in SUPPORTED_BITS:
    register(f"gptq.int{_bits}", help=_HELP[_bits], options=("keep_source", "quantize_lm_head"),
             preferred=_preferred_int4 if _bits == 4 else None)(functools.partial(_make_plugin, _bits))
