"""THE registry: (`--precision`, `--quantize`) -> one precision plugin, used by every job.

`resolve(precision, quantize, device)` is the one place the two flags are interpreted. A plugin knows its compute
dtype, its load plan (which weights file, which Linears become quantized layers), how to swap those Linears on the
meta device, and the contexts forward passes run in. Inference needs nothing else; training jobs hand it to
Lightning Fabric through `fabric_plugin` (Lightning is imported only then).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.nn import Module

from litquant.config import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.quantization import bf16_linear
from litquant.quantization.modes import LoadPlan, QuantMode, all_modes, get_mode

PRECISIONS: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}
# Training jobs also take mixed precision: fp32 weights, forward under autocast.
MIXED: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_ALIASES = {"32": "32-true", "16": "16-true", "bf16": "bf16-true", "fp32": "32-true", "fp16": "16-true"}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class LitquantPrecision:
    """Full precision (`--quantize` not given); the quantized modes' plugins subclass it."""

    mode: Optional[QuantMode] = None
    precision_given = True  # resolve() sets False when --precision was left to the default
    device = torch.device("cpu")  # where the model runs (resolve() sets it)

    def __init__(self, precision: str = "32-true") -> None:
        self.precision = precision
        self.dtype = PRECISIONS[precision]

    @property
    def quantize(self) -> Optional[str]:
        return self.mode.name if self.mode is not None else None

    # -- loading ------------------------------------------------------------------------------------------------
    def load_plan(self, checkpoint_dir: Optional[Path]) -> LoadPlan:
        """Which file of the checkpoint to read and which Linears to swap (reads at most file headers); None: no
        checkpoint (a model with random weights), the mode's default layers."""
        return LoadPlan(WEIGHTS_FILE, swap=lambda name: False)

    def convert_module(self, module: Module, plan: Optional[LoadPlan] = None) -> Module:
        """Swap the Linears `plan` names for quantized layers (none here) and cast floating parameters to the compute
        dtype. Idempotent: Fabric calls it again on the loaded model."""
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != self.dtype and not p.is_meta:
                p.data = p.data.to(self.dtype)
        if bf16_linear.wanted(self.device, self.dtype):
            bf16_linear.convert(module)
        return module

    def after_load(self, model: Module) -> Module:
        return model

    @staticmethod
    def swap_linears(
        module: Module, wanted: Callable[[str], bool], make: Callable[[str, torch.nn.Linear], Module]
    ) -> None:
        """Replace, in place, each plain nn.Linear of `module` whose qualified name `wanted` accepts by
        `make(name, linear)`. LoRA adapter Linears are never swapped: they stay trainable full-precision layers.
        Already swapped layers are not nn.Linear any more, so a second call changes nothing."""
        if isinstance(module, torch.nn.Linear):
            raise UserError("convert_module needs a model containing Linear layers, not a bare nn.Linear")
        todo = [
            (n, m)
            for n, m in module.named_modules()
            if type(m) is torch.nn.Linear
            and not any(p.startswith("lora") for p in n.split("."))
            and wanted(n)
        ]
        for name, linear in todo:
            new = make(name, linear)
            new.litquant_name = name
            module.set_submodule(name, new)

    # -- running ------------------------------------------------------------------------------------------------
    def tensor_init_context(self):
        return default_dtype(self.dtype)

    def module_init_context(self):
        return self.tensor_init_context()

    def forward_context(self):
        return self.tensor_init_context()

    def convert_input(self, data: Any) -> Any:
        return _cast_floats(data, self.dtype)

    def convert_output(self, data: Any) -> Any:
        return data

    # -- telling the user ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        return self.precision if self.mode is None else f"{self.mode.name} (compute {self.precision})"

    def kernels(self, device: torch.device) -> str:
        """What computes this mode's Linear layers on `device` (the job's `Kernels:` line)."""
        if bf16_linear.wanted(device, self.dtype):
            return f"litquant bf16 GEMV, fp32 sums (<= {bf16_linear.GEMV_MAX_ROWS} rows), torch matmul beyond"
        return f"torch matmul ({_dtype_name(self.dtype)})"

    def hints(self, device: torch.device) -> list[str]:
        """One line for each way the chosen flags are slower than they could be on this machine."""
        if not self.precision_given:
            return []
        preferred = self.mode.preferred_precision(device) if self.mode is not None else None
        if preferred is not None and preferred != self.precision:
            return [
                f"{self.mode.name} runs faster on this {device.type.upper()} with --precision {preferred} (its "
                "default here)"
            ]
        if (
            device.type == "cpu"
            and self.dtype == torch.float32
            and preferred is None
            and bf16_linear.wanted(device, torch.bfloat16)
        ):
            return [
                "on this CPU litquant's bf16 kernels read half fp32's bytes per token: --precision bf16-true (the "
                "default here) is faster"
            ]
        if (
            device.type == "cpu"
            and self.dtype == torch.bfloat16
            and preferred is None
            and default_precision(device) == "32-true"
        ):
            return [
                "this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is computed in software: "
                "--precision 32-true (the default here) is faster"
            ]
        return []


class MixedPrecisionPlugin(LitquantPrecision):
    """fp32 weights and optimizer state; matmuls under autocast (training jobs only)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.dtype = torch.float32
        self.autocast_dtype = MIXED[precision]
        self.device_type = device.type

    def forward_context(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def convert_input(self, data: Any) -> Any:
        return data


def _cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in (nested lists, tuples and dicts of) `data` cast to `dtype`."""
    if isinstance(data, torch.Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, (list, tuple)):
        return type(data)(_cast_floats(d, dtype) for d in data)
    if isinstance(data, dict):
        return {k: _cast_floats(v, dtype) for k, v in data.items()}
    return data


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- choosing the precision ----------------------------------------------------------------------------------


def default_precision(device: torch.device | str) -> str:
    """What inference runs in without --precision: bf16 on Ampere+ GPUs, fp16 on older ones; on CPUs bf16 where
    the hardware computes in it natively (AVX512-BF16/AMX) or where litquant's bf16 GEMV carries the Linears faster
    than fp32 (timed once: bf16_linear.gemv_beats_torch; bf16 weights read at half fp32's bytes, multiplied in fp32),
    else fp32. A quantized mode may prefer another (QuantMode.preferred_precision)."""
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_native_bf16():
        return "bf16-true" if bf16_linear.wanted(device, torch.bfloat16) else "32-true"
    return native_precision(device)


def native_precision(device: torch.device | str) -> str:
    """The precision the hardware computes fastest in natively (training's default: bf16 where native, fp16 on
    older GPUs, fp32 on other CPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "bf16-true" if cpu_has_native_bf16() else "32-true"


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


def quantize_modes() -> list[str]:
    """The `--quantize` names (for help texts and checks)."""
    return list(all_modes())


def resolve(
    precision: Optional[str],
    quantize: Optional[str] = None,
    device: torch.device | str = "cpu",
    training: bool = False,
    **options: Any,
) -> LitquantPrecision:
    """The one place `--precision` and `--quantize` are interpreted. `training`: the default precision is the
    hardware's native one (litquant's bf16 GEMV serves inference only)."""
    device = torch.device(device)
    default = native_precision if training else default_precision
    mode = get_mode(quantize)
    if mode is None:
        if options:
            raise UserError(f"options {sorted(options)} only apply with --quantize")
        p = default(device) if precision is None else parse_precision(precision, device, allow_mixed=True)
        plugin = MixedPrecisionPlugin(p, device) if p in MIXED else LitquantPrecision(p)
    else:
        unknown = sorted(set(options) - set(mode.options))
        if unknown:
            valid = ", ".join(mode.options) or "none"
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for --quantize {mode.name}; valid: {valid}"
            )
        if device.type not in ("cpu", "cuda"):
            raise UserError(
                f"--quantize {mode.name} runs on CUDA or CPU, not {device.type}: use --accelerator cpu"
            )
        p = (
            (mode.preferred_precision(device) or default(device))
            if precision is None
            else parse_precision(precision, device)
        )
        plugin = mode.plugin(p, device, **options)
    plugin.precision_given = precision is not None
    plugin.device = device
    return plugin


def pick_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError(
                "--accelerator cuda was asked for but no CUDA device is available: use --accelerator cpu"
            )
        return "cuda"
    if accelerator != "cpu":
        raise UserError(f"unknown --accelerator {accelerator!r}; choose auto, cuda or cpu")
    return "cpu"


# ---- Lightning Fabric (training jobs) ------------------------------------------------------------------------


def fabric_plugin(plugin: LitquantPrecision):
    """The plugin as a Lightning Fabric precision plugin (imports Lightning, which inference never needs)."""
    from lightning.fabric.plugins import Precision

    class FabricPrecision(Precision):
        def __init__(self, inner: LitquantPrecision) -> None:
            self.litquant = inner
            self.precision = inner.precision

        def convert_module(self, module: Module) -> Module:
            return self.litquant.convert_module(module)

        def tensor_init_context(self):
            return self.litquant.tensor_init_context()

        def module_init_context(self):
            return self.litquant.module_init_context()

        def forward_context(self):
            return self.litquant.forward_context()

        def convert_input(self, data: Any) -> Any:
            return self.litquant.convert_input(data)

        def convert_output(self, data: Any) -> Any:
            return self.litquant.convert_output(data)

    return FabricPrecision(plugin)


def setup_fabric(
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    **options: Any,
):
    """A Fabric whose precision plugin comes from the registry (training jobs): -> (fabric, plugin)."""
    from lightning.fabric import Fabric

    accelerator = pick_accelerator(accelerator)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    plugin = resolve(precision, quantize, device, training=True, **options)
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        plugins=fabric_plugin(plugin),
    )
    return fabric, plugin
