"""THE registry: (`--precision`, `--quantize`) -> one Lightning Fabric precision plugin.

Every job calls `resolve(precision, quantize, device)` and nothing else parses those flags. A plugin
knows its compute dtype, which weights file of the checkpoint directory it reads, how to swap the
model's Linear classes (on the meta device, before loading) and how to cast inputs.

Quantization modes register themselves with `@register("bnb.nf4", ...)` from
`litquant/quantization/*`; they are imported lazily the first time a mode is resolved.
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import Precision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module

from litquant.checkpoint import WEIGHTS_FILE
from litquant.errors import UserError

PRECISIONS: dict[str, torch.dtype] = {"32-true": torch.float32, "16-true": torch.float16, "bf16-true": torch.bfloat16}
# Training jobs also take mixed precision: fp32 weights, forward under autocast.
MIXED: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_ALIASES = {"32": "32-true", "16": "16-true", "bf16": "bf16-true", "fp32": "32-true", "fp16": "16-true"}

# name -> factory(precision: str, device: torch.device, **options) -> LitquantPrecision
QUANTIZE_MODES: dict[str, Callable[..., "LitquantPrecision"]] = {}
QUANTIZE_HELP: dict[str, str] = {}
QUANTIZE_OPTIONS: dict[str, tuple[str, ...]] = {}
# name -> preferred(device) -> a precision, or None for the device's default (`--precision` not given)
QUANTIZE_PREFERRED: dict[str, Callable[[torch.device], Optional[str]]] = {}


class LitquantPrecision(Precision):
    """Full-precision plugin (`--quantize` not given); quantized modes subclass it."""

    quantize: Optional[str] = None
    precision_given = True  # resolve() sets False when --precision was left to the default

    def __init__(self, precision: str = "32-true") -> None:
        self.precision = precision
        self.dtype = PRECISIONS[precision]

    def kernels(self, device: torch.device) -> str:
        """What computes this mode's Linear layers on `device` (the job's `Kernels:` line)."""
        return f"torch matmul ({_dtype_name(self.dtype)})"

    def hints(self, device: torch.device) -> list[str]:
        """One line for each way the chosen flags are slower than they could be on this machine."""
        if not self.precision_given:
            return []
        preferred = QUANTIZE_PREFERRED.get(self.quantize or "", lambda d: None)(device)
        if preferred is not None and preferred != self.precision:
            return [f"{self.quantize} runs faster on this {device.type.upper()} with --precision {preferred} (its default "
                    "here)"]
        if device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_has_native_bf16() and preferred is None:
            return ["this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is computed in software: "
                    "--precision 32-true (the default here) is faster"]
        return []

    # -- what the loader asks ------------------------------------------------------------------
    def weights_file(self, checkpoint_dir: Path) -> str:
        return WEIGHTS_FILE

    def after_load(self, model: Module) -> Module:
        return model

    # -- Fabric's hooks -------------------------------------------------------------------------
    def convert_module(self, module: Module) -> Module:
        # Parameters already arrive in self.dtype from the loader; this only matters for models built
        # outside load_model (e.g. pretraining from scratch).
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != self.dtype and not p.is_meta:
                p.data = p.data.to(self.dtype)
        return module

    @staticmethod
    def swap_linears(module: Module, wanted: Callable[[str], bool], make: Callable[[str, torch.nn.Linear], Module]) -> None:
        """Replace, in place, each plain nn.Linear of `module` whose qualified name `wanted` accepts by
        `make(name, linear)`. LoRA adapter Linears are never swapped: they stay trainable full-precision layers.
        Already swapped layers are not nn.Linear any more, so a second call (Fabric makes one) changes nothing."""
        if isinstance(module, torch.nn.Linear):
            raise UserError("convert_module needs a model containing Linear layers, not a bare nn.Linear")
        todo = [(n, m) for n, m in module.named_modules()
                if type(m) is torch.nn.Linear and not any(p.startswith("lora") for p in n.split(".")) and wanted(n)]
        for name, linear in todo:
            new = make(name, linear)
            new.litquant_name = name
            module.set_submodule(name, new)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def forward_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    def convert_output(self, data: Any) -> Any:
        return data

    def describe(self) -> str:
        return self.precision if self.quantize is None else f"{self.quantize} (compute {self.precision})"


class MixedPrecisionPlugin(LitquantPrecision):
    """fp32 weights and optimizer state; matmuls under autocast (training jobs only)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.dtype = torch.float32
        self.autocast_dtype = MIXED[precision]
        self.device_type = device.type

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def convert_input(self, data: Any) -> Any:
        return data


def register(
    name: str, help: str = "", options: tuple[str, ...] = (), preferred: Optional[Callable] = None
) -> Callable:
    """Register a `--quantize` mode: factory(precision, device, **options) -> plugin; `options` are the keyword
    options it takes (resolve rejects any other, and devices other than CPU and CUDA, before calling it);
    `preferred(device)` the compute precision it runs fastest in there when `--precision` is not given."""
    def deco(factory: Callable) -> Callable:
        QUANTIZE_MODES[name] = factory
        QUANTIZE_HELP[name] = help
        QUANTIZE_OPTIONS[name] = options
        if preferred is not None:
            QUANTIZE_PREFERRED[name] = preferred
        return factory

    return deco


def _import_modes() -> None:
    # Each module registers its modes on import; importing here keeps `import litquant` light.
    import importlib

    for mod in ("litquant.quantization.bnb", "litquant.quantization.gptq_plugin"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def quantize_modes() -> list[str]:
    _import_modes()
    return sorted(QUANTIZE_MODES)


def default_precision(device: torch.device | str) -> str:
    """bf16 where the hardware computes in it natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp16 on
    older GPUs and fp32 on other CPUs (bf16 emulated in software is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "bf16-true" if cpu_has_native_bf16() else "32-true"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_has_avx512() -> bool:
    """What torch's CPU kernels were dispatched to (ATEN_CPU_CAPABILITY=avx2 lowers it, as for benchmarks)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX. LITQUANT_NATIVE_BF16=0 makes litquant behave as on a CPU without them (benchmarks
    measure that way what such CPUs run)."""
    forced = os.environ.get("LITQUANT_NATIVE_BF16")
    if forced is not None:
        return forced not in ("0", "false", "")
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def parse_precision(precision: Optional[str], device: torch.device | str, allow_mixed: bool = False) -> str:
    if precision is None:
        return default_precision(device)
    p = _ALIASES.get(str(precision), str(precision))
    valid = [*PRECISIONS, *MIXED] if allow_mixed else list(PRECISIONS)
    if p not in valid:
        raise UserError(f"unknown --precision {precision!r}; choose one of: {', '.join(valid)}")
    if p == "bf16-true" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bfloat16: use --precision 16-true")
    return p


def resolve(
    precision: Optional[str], quantize: Optional[str] = None, device: torch.device | str = "cpu", **options: Any
) -> LitquantPrecision:
    """The one place `--precision` and `--quantize` are interpreted."""
    no_quant = quantize is None or quantize in ("", "none", "None")
    if precision is None and not no_quant and quantize in quantize_modes() and quantize in QUANTIZE_PREFERRED:
        p = QUANTIZE_PREFERRED[quantize](torch.device(device)) or default_precision(device)
    else:
        p = parse_precision(precision, device, allow_mixed=no_quant)
    if no_quant:
        if options:
            raise UserError(f"options {sorted(options)} only apply with --quantize")
        plugin = MixedPrecisionPlugin(p, torch.device(device)) if p in MIXED else LitquantPrecision(p)
        plugin.precision_given = precision is not None
        return plugin
    modes = quantize_modes()
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"unknown --quantize {quantize!r}; choose one of: {', '.join(modes)}")
    unknown = sorted(set(options) - set(QUANTIZE_OPTIONS[quantize]))
    if unknown:
        valid = ", ".join(QUANTIZE_OPTIONS[quantize]) or "none"
        raise UserError(f"unknown option(s) {', '.join(unknown)} for --quantize {quantize}; valid: {valid}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--quantize {quantize} runs on CUDA or CPU, not {device.type}: use --accelerator cpu")
    plugin = QUANTIZE_MODES[quantize](p, device, **options)
    plugin.precision_given = precision is not None
    return plugin


def setup_fabric(
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    **options: Any,
):
    """A Fabric whose precision plugin comes from the registry (shared by every job)."""
    import lightning as L

    accelerator = pick_accelerator(accelerator)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    plugin = resolve(precision, quantize, device, **options)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes, plugins=plugin)
    return fabric, plugin


def pick_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError("--accelerator cuda was asked for but no CUDA device is available: use --accelerator cpu")
        return "cuda"
    if accelerator != "cpu":
        raise UserError(f"unknown --accelerator {accelerator!r}; choose auto, cuda or cpu")
    return "cpu"
