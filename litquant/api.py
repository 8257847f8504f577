"""`LLM.load`: the one way a model is loaded for inference. `litquant generate`, `chat`, `evaluate`, `benchmark` and
`serve` all come through it, so every job sees the same checkpoint checks, precision, quantization and adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint, load_model
from litquant.precision import LitquantPrecision, pick_accelerator, resolve
from litquant.utils import configure_cpu_threads, reset_peak_memory


class LLM:
    """A loaded model: `model`, `tokenizer`, `checkpoint`, the precision `plugin` and the `device`."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint, plugin: LitquantPrecision,
                 device: torch.device) -> None:
        self.model, self.checkpoint, self.plugin, self.device = model, checkpoint, plugin, device
        self.tokenizer = checkpoint.tokenizer

    @classmethod
    def load(
        cls,
        checkpoint_dir: Union[str, Path, Checkpoint] = DEFAULT_CHECKPOINT_DIR,
        quantize: Optional[str] = None,
        precision: Optional[str] = None,
        lora_path: Optional[Union[str, Path]] = None,
        accelerator: str = "auto",
        quantize_lm_head: bool = False,
        progress: bool = True,
        configure_threads: bool = True,
    ) -> "LLM":
        """Load `checkpoint_dir` in `precision` (default: the fastest on this machine for the mode), quantized with
        `quantize` (a `--quantize` mode), with a LoRA adapter on top (`lora_path`: the file or a finetune out_dir)."""
        device = torch.device(pick_accelerator(accelerator))
        checkpoint = Checkpoint.open(checkpoint_dir)
        plugin = resolve(precision, quantize, device, **({"quantize_lm_head": True} if quantize_lm_head else {}))
        checkpoint.tokenizer  # a missing or broken tokenizer fails before a (possibly long, quantizing) load
        if lora_path is not None:
            from litquant.lora import load_lora, read_lora_metadata

            read_lora_metadata(lora_path)  # and so does a bad adapter
        reset_peak_memory(device)
        model = load_model(checkpoint, plugin, device, progress=progress)
        if lora_path is not None:
            load_lora(model, lora_path, dtype=plugin.dtype)
            model.eval()
        if configure_threads:  # one thread for small models on a CPU unless OMP_NUM_THREADS says otherwise
            configure_cpu_threads(model, device)
        return cls(model, checkpoint, plugin, device)

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        return f"LLM({self.checkpoint.path}, {self.plugin.describe()}, {self.device})"
