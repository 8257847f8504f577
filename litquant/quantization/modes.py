"""The `--quantize` modes as typed objects (as torchao's per-mode configs): one object per mode owns everything known
about it — its options, the bytes its Linears take, how a checkpoint loads under it, whether LoRA can train over
it, how to dequantize it. Nothing else parses a mode's name: `get_mode(name)` is the one way from a name to a mode.
The families (bnb.py, gptq_plugin.py) live beside their Linear classes (bnb_linear.py, gptq_linear.py) and register
their modes on import."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from litquant.errors import UserError

if TYPE_CHECKING:
    from litquant.precision import LitquantPrecision

NO_QUANTIZATION = (None, "", "none", "None")
_FAMILIES = ("litquant.quantization.bnb", "litquant.quantization.gptq_plugin")
_MODES: dict[str, "QuantMode"] = {}


@dataclass(frozen=True)
class LoadPlan:
    """What loading a checkpoint under a mode reads and changes, decided before anything is built or read."""

    weights_file: str  # the file of the checkpoint directory to stream in
    swap: Callable[[str], bool]  # which Linears (qualified names) become quantized layers
    note: Optional[str] = None  # one line to tell the user (e.g. why a pre-quantized file is not used)
    # what the mode read from the checkpoint (GPTQ: bits, group size)
    extra: dict = field(default_factory=dict)


class QuantMode:
    """One `--quantize` mode. Subclasses fill in the family's knowledge."""

    name: str = ""
    help: str = ""
    options: tuple[str, ...] = ()  # keyword options its plugin takes (resolve rejects any other)
    lora_trainable: bool = True  # LoRA adapters can train over a base loaded in this mode
    lora_options: dict = {}  # plugin options a base needs to be trained through or merged (GPTQ: keep qweight)
    stored_as_is: tuple[
        str, ...
    ] = ()  # tensor-name suffixes of its files kept in their dtype at any precision
    nominal_bits: int = 16  # bits per quantized weight before overheads (the simple params x bytes estimate)
    qlora: bool = False  # a 4-bit base as QLoRA trains over (bitsandbytes nf4/fp4)
    needs_file: Optional[str] = None  # a file the checkpoint must have for this mode (made ahead of time)

    def plugin(self, precision: str, device: torch.device, **options) -> "LitquantPrecision":
        raise NotImplementedError

    def preferred_precision(self, device: torch.device) -> Optional[str]:
        """The compute precision it runs fastest in on `device` when --precision is not given (None: the device's)."""
        return None

    def linear_bytes(
        self, in_features: int, out_features: int, group_size: int = 128, runtime: bool = True
    ) -> int:
        """Bytes one quantized Linear's weight storage takes in memory (runtime) or in its file (without bias)."""
        raise NotImplementedError

    def dequantize(self, module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight a quantized layer of this mode stands for."""
        return module.dequantize(dtype)

    def __repr__(self) -> str:
        return f"<quantize mode {self.name}>"


def register(mode: QuantMode) -> QuantMode:
    _MODES[mode.name] = mode
    return mode


def _import_families() -> None:
    for module in _FAMILIES:
        importlib.import_module(module)


def all_modes() -> dict[str, QuantMode]:
    _import_families()
    return dict(sorted(_MODES.items()))


def get_mode(name: Optional[str]) -> Optional[QuantMode]:
    """The mode called `name`; None for no quantization (None, "" or "none"); a UserError naming the closest
    known modes otherwise."""
    if name in NO_QUANTIZATION:
        return None
    modes = all_modes()
    if name not in modes:
        close = difflib.get_close_matches(str(name), modes, n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"unknown --quantize {name!r}; choose one of: {', '.join(modes)}{hint}")
    return modes[name]


def quantized_file_of(checkpoint_dir: Path) -> Optional[str]:
    """The GPTQ mode a checkpoint directory holds a file for (gptq.int4 for lit_model_gptq.4bit.safetensors), if any."""
    for name, mode in all_modes().items():
        if getattr(mode, "file", None) and (Path(checkpoint_dir) / mode.file).is_file():
            return name
    return None
