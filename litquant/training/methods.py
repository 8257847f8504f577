"""The two finetuning methods, each a function that `launch` runs on every rank: LoRA/QLoRA (`train_lora`: adapters
over a frozen, possibly quantized base) and full finetuning (`train_full`: every weight of a full-precision base).
Each pairs with a *Weights class that says what its checkpoints hold and what the run leaves in out_dir."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import WEIGHTS_FILE, copy_side_files, load_model, save_checkpoint
from litquant.config import Config
from litquant.errors import UserError
from litquant.io import save_safetensors
from litquant.lora import LORA_FILE, add_lora, mark_only_lora_as_trainable, save_lora
from litquant.training.loop import fit
from litquant.training.run import RunSpec
from litquant.utils import num_parameters, reset_peak_memory


def load_base(fabric, run: RunSpec):
    """(model, tokenizer) of run.checkpoint_dir, quantized as run.plugin says."""
    from litquant.tokenizer import Tokenizer

    tokenizer = Tokenizer(run.checkpoint_dir)
    reset_peak_memory(fabric.device)
    model = load_model(run.checkpoint_dir, run.plugin, fabric.device, progress=fabric.global_rank == 0)
    return model, tokenizer


# ---- LoRA / QLoRA ---------------------------------------------------------------------------------------------


def train_lora(fabric, run: RunSpec) -> dict:
    """One rank: load the base, add adapters, train."""
    model, tokenizer = load_base(fabric, run)
    fabric.seed_everything(run.seed, verbose=False)  # the same adapter init on every rank
    add_lora(model, run.lora, dtype=run.plugin.dtype)
    mark_only_lora_as_trainable(model)
    fabric.print(
        f"LoRA {run.lora}: {num_parameters(model, True):,} trainable of {num_parameters(model):,} "
        f"parameters; base: {run.plugin.describe()}"
    )
    return fit(fabric, run, model, tokenizer, LoRAWeights(run))


class LoRAWeights:
    """What LoRA saves and restores: the adapter tensors (+ metadata that makes the file self-describing)."""

    file = LORA_FILE

    def __init__(self, run: RunSpec) -> None:
        self.run = run

    def trainable_only(self) -> bool:
        return True

    def save(self, tensors: dict[str, torch.Tensor], directory: Path) -> None:
        save_lora(
            tensors,
            directory / self.file,
            self.run.lora,
            base_checkpoint_dir=self.run.checkpoint_dir.resolve(),
            base_quantize=self.run.quantize,
            base_precision=self.run.plugin.precision,
        )

    def finalize(self, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
        self.save(tensors, out_dir)
        return out_dir / self.file


# ---- full finetuning ------------------------------------------------------------------------------------------


def full_precision(precision: Optional[str], quantize: Optional[str], accelerator: str) -> str:
    """The precision of a full finetuning run: refuses a quantized base (a quantized weight has no gradient); by
    default fp32 master weights (bf16-mixed where bf16 is native, else 32-true): bf16 weights would round most
    small updates away."""
    if quantize not in (None, "", "none", "None"):
        raise UserError(
            "full finetuning trains every weight and cannot use a quantized base: "
            "use `litquant finetune lora --quantize ...` (QLoRA) instead"
        )
    if precision is not None:
        return precision
    from litquant.precision import native_precision, pick_accelerator

    device = "cuda" if pick_accelerator(accelerator) == "cuda" else "cpu"
    return "bf16-mixed" if native_precision(device) == "bf16-true" else "32-true"


def train_full(fabric, run: RunSpec) -> dict:
    """One rank: load the base, make every weight trainable, train."""
    model, tokenizer = load_base(fabric, run)
    for p in model.parameters():
        p.requires_grad = True
    fabric.print(f"Full finetuning: {num_parameters(model):,} trainable parameters ({run.plugin.describe()})")
    return fit(fabric, run, model, tokenizer, FullWeights(run, model.config))


class FullWeights:
    """What full finetuning saves: every parameter; the final one as a complete checkpoint directory."""

    file = WEIGHTS_FILE

    def __init__(self, run: RunSpec, config: Config) -> None:
        self.run = run
        self.config = config

    def trainable_only(self) -> bool:
        return False

    def save(self, tensors: dict[str, torch.Tensor], directory: Path) -> None:
        save_safetensors(tensors, directory / self.file, metadata={"format": "pt", "litquant": "1"})

    def finalize(self, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
        final = out_dir / "final"
        save_checkpoint(tensors, self.config, final)
        copy_side_files(self.run.checkpoint_dir, final)
        return final
