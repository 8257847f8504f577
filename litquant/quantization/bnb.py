"""bitsandbytes quantization modes (`--quantize bnb.nf4|nf4-dq|fp4|fp4-dq|int8|int8-training`) and their plugin.

`resolve(precision, "bnb.nf4", device)` (litquant.precision) gives the `BitsandbytesPrecision` that swaps a model's
Linears for the layers of bnb_linear.py and quantizes the weights while loading them, or reads the pre-quantized
file that `litquant quantize bnb` writes (`prequantized_metadata`, checked by `prequantized_mismatch`).
Modes, compute dtypes, loading and CPU speed: docs/ARCHITECTURE.md, "Quantization modes: bitsandbytes".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litquant.config import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.io import file_keys, safetensors_metadata
from litquant.precision import LitquantPrecision
from litquant.quantization import bf16_linear, cpu_kernels
from litquant.quantization.bnb_linear import (
    BLOCKSIZE,
    GEMV_MAX_ROWS_4BIT,
    GEMV_MAX_ROWS_INT8,
    I16_MAX_ROWS,
    INT8_THRESHOLD,
    NESTED_BLOCKSIZE,
    Linear4bit,
    Linear8bit,
    _QuantLinear,
    bnb_version,
)
from litquant.quantization.modes import LoadPlan, QuantMode, register

MIN_BNB_CPU = (0, 48)  # first bitsandbytes with CPU 4-bit and int8 ops

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


# ---- the modes and their plugin -----------------------------------------------------------------------------


class BnbMode(QuantMode):
    """`bnb.<kind>`: kind nf4, nf4-dq, fp4, fp4-dq (4-bit), int8 (LLM.int8) or int8-training."""

    options = ("quantize_lm_head",)
    stored_as_is = (".absmax", ".nested_absmax", ".nested_code", ".offset")  # bnb's statistics stay fp32

    def __init__(self, kind: str) -> None:
        self.kind, self.name, self.help = kind, f"bnb.{kind}", _HELP[kind]
        # int8-training stores exactly what int8 stores
        self.storage = "int8" if kind == "int8-training" else kind
        self.four_bit = self.qlora = kind in FOUR_BIT
        self.nominal_bits = 4 if self.four_bit else 8
        self.prequantized = f"lit_model_bnb.{self.storage}.safetensors"  # what `litquant quantize bnb` writes

    def plugin(self, precision: str, device: torch.device, **options: Any) -> "BitsandbytesPrecision":
        try:
            installed = bnb_version()  # from its metadata: imported only where its ops run (not CPU nf4/fp4)
        except ImportError:
            need = f"bitsandbytes>={MIN_BNB_CPU[0]}.{MIN_BNB_CPU[1]}"
            raise UserError(f"--quantize {self.name} needs bitsandbytes: pip install '{need}'") from None
        if device.type == "cpu" and installed < MIN_BNB_CPU:
            raise UserError(
                f"bitsandbytes {'.'.join(map(str, installed))} has no CPU support for {self.name}: "
                f"pip install -U 'bitsandbytes>={MIN_BNB_CPU[0]}.{MIN_BNB_CPU[1]}', or run on CUDA (--accelerator cuda)"
            )
        return BitsandbytesPrecision(
            self, precision, quantize_lm_head=bool(options.get("quantize_lm_head", False))
        )

    def make_linear(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> "_QuantLinear":
        if self.four_bit:
            quant_type, dq = FOUR_BIT[self.kind]
            return Linear4bit(in_features, out_features, bias, quant_type, dq, dtype, device)
        return Linear8bit(
            in_features, out_features, bias, self.kind == "int8-training", INT8_THRESHOLD, dtype, device
        )

    def linear_bytes(
        self, in_features: int, out_features: int, group_size: int = 128, runtime: bool = True
    ) -> int:
        n = in_features * out_features
        if not self.four_bit:
            return n + 4 * out_features  # int8 codes, fp32 absmax per row
        blocks = math.ceil(n / BLOCKSIZE)
        codes = (n + 1) // 2
        if FOUR_BIT[self.kind][
            1
        ]:  # uint8 absmax per block, fp32 scale per 256 of them, the 256-entry code, offset
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
        """The pre-quantized file when it exists and matches this run (its quantized layers: those it stores an
        absmax for), else the full-precision one."""
        name = self.mode.prequantized
        path = Path(checkpoint_dir or ".") / name
        if checkpoint_dir is None or not self.use_prequantized or not path.is_file():
            if checkpoint_dir is not None and not (Path(checkpoint_dir) / WEIGHTS_FILE).is_file():
                _refuse_other_mode(Path(checkpoint_dir), self.mode)
            return LoadPlan(WEIGHTS_FILE, self._wanted)
        problem = prequantized_mismatch(path, self)
        if problem is None:
            return LoadPlan(name, prequantized_modules(path).__contains__)
        if not (Path(checkpoint_dir) / WEIGHTS_FILE).is_file():
            raise UserError(
                f"{path} {problem}, and there is no {WEIGHTS_FILE} to quantize from: "
                f"run `litquant quantize bnb --mode {self.mode.storage}` with matching options"
            )
        return LoadPlan(
            WEIGHTS_FILE,
            self._wanted,
            note=f"Not using {name} ({problem}): quantizing {WEIGHTS_FILE} while loading",
        )

    def convert_module(self, module: nn.Module, plan: Optional[LoadPlan] = None) -> nn.Module:
        """Swap every nn.Linear the plan names (all but lm_head unless quantize_lm_head) in place. Meta Linears become
        empty quantized modules for the loader to fill; materialised ones are quantized now. Idempotent."""

        def make(name: str, linear: nn.Linear) -> _QuantLinear:
            new = self.mode.make_linear(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                self.dtype,
                linear.weight.device,
            )
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
        head = (
            f"; head: {bf16_linear.BF16Linear.__name__} GEMV"
            if not self.quantize_lm_head and bf16_linear.wanted(device, self.dtype)
            else ""
        )
        if self.mode.four_bit:
            small = f"fused 4-bit matmul (<= {GEMV_MAX_ROWS_4BIT} rows"
            if cpu_kernels.i16():
                small = (
                    f"int16-activation 4-bit matmul (<= {I16_MAX_ROWS} rows), fp32 one "
                    f"(<= {GEMV_MAX_ROWS_4BIT} rows"
                )
            return f"{ours}: {small}), tiled dequantize + matmul beyond{head}"
        if self.mode.kind == "int8" and cpu_kernels.vnni():
            return f"{ours}: fused LLM.int8 (<= {GEMV_MAX_ROWS_INT8} rows), bitsandbytes int8 matmul beyond{head}"
        if self.mode.kind == "int8":
            return f"{ours}: fused LLM.int8{head}"
        return f"{ours}: tiled dequantize + matmul"

    def hints(self, device: torch.device) -> list[str]:
        out = super().hints(device)
        if device.type == "cpu" and cpu_kernels.lib() is None:
            out.append(
                f"litquant's CPU kernels are unavailable ({cpu_kernels.build_error}): {self.mode.name} runs a "
                "much slower fallback"
            )
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


def prequantized_modules(path: Path) -> set[str]:
    """The layers a pre-quantized file stores quantized (those with an absmax; the others, such as the modules an
    imported Hugging Face model skipped, are plain Linears in it)."""
    return {k.removesuffix(".absmax") for k in file_keys(path) if k.endswith(".absmax")}


def held_bnb_modes(checkpoint_dir: Path) -> list[str]:
    """The bnb modes whose pre-quantized files a checkpoint directory holds (bnb.nf4 for lit_model_bnb.nf4...)."""
    found = {p.name for p in Path(checkpoint_dir).glob("lit_model_bnb.*.safetensors")}
    return [f"bnb.{k}" for k in _HELP if k != "int8-training" and f"lit_model_bnb.{k}.safetensors" in found]


def _refuse_other_mode(checkpoint_dir: Path, mode: BnbMode) -> None:
    """A checkpoint with pre-quantized weights of other modes only (an imported bnb model): say which it holds."""
    held = held_bnb_modes(checkpoint_dir)
    if held:
        raise UserError(
            f"{checkpoint_dir} holds {' and '.join(held)} weights, not {mode.name}, and no {WEIGHTS_FILE} to "
            f"quantize from: run with --quantize {held[0]}"
        )


for _kind in _HELP:
    register(BnbMode(_kind))
