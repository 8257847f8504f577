"""Full finetuning of a small model: `python finetune/full.py ...` == `litquant finetune full ...`.

Every weight trains, so the base must be full precision (`--quantize` is refused: a quantized weight has no
gradient; use `finetune lora --quantize ...` for QLoRA). The loop, data, logging, checkpoints and `--resume` are
the LoRA job's (`finetune/lora.py`). The result is a complete checkpoint directory `out_dir/final/`
(lit_model.safetensors, model_config.yaml, tokenizer files) that every job takes as `--checkpoint_dir`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.lora import DataArgs, EvalArgs, RunSpec, TrainArgs, _as, _hparams, fit, launch, load_base
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, WEIGHTS_FILE, copy_side_files, save_checkpoint
from litquant.io import save_safetensors
from litquant.config import Config
from litquant.errors import UserError, run_job
from litquant.utils import num_parameters


def setup(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    out_dir: Path = Path("out/finetune/full"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "auto",
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(learning_rate=1e-4, weight_decay=0.01),
    eval: EvalArgs = EvalArgs(),
    optimizer: str = "AdamW",
    logger: str = "both",
    resume: Union[bool, Path] = False,
    seed: int = 1337,
    quantize: Optional[str] = None,
) -> dict:
    """Finetune every weight of a full-precision model on instruction data.

    Args:
        checkpoint_dir: the model to finetune (default: the bundled model).
        out_dir: where the final checkpoint (out_dir/final), step checkpoints, logs and hyperparameters go.
        precision: 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true (default: bf16-mixed where bf16 is native,
            i.e. most GPUs and recent CPUs, else 32-true).
        devices: devices (processes) per node; >1 runs data parallel.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (FSDP2 `fully_shard` per transformer block: shards weights and optimizer state).
        accelerator: auto, cuda or cpu.
        data: instruction data options.
        train: optimization options.
        eval: validation options.
        optimizer: AdamW, or bitsandbytes' AdamW8bit, PagedAdamW, PagedAdamW8bit (paged ones need CUDA).
        logger: tensorboard, csv or both.
        resume: continue from a checkpoint: true = the latest in out_dir, or a checkpoint directory.
        seed: the run's seed (the data order comes from data.seed).
        quantize: not supported here (full finetuning needs full-precision weights); use `finetune lora`.
    """
    hparams = _hparams(locals(), exclude=("quantize",))  # first: only the arguments are local yet
    if quantize not in (None, "", "none", "None"):
        raise UserError("full finetuning trains every weight and cannot use a quantized base: "
                        "use `litquant finetune lora --quantize ...` (QLoRA) instead")
    if precision is None:
        # every weight trains: keep fp32 master weights (bf16 weights would round most small updates away)
        from litquant.precision import default_precision, pick_accelerator

        device = "cuda" if pick_accelerator(accelerator) == "cuda" else "cpu"
        precision = "bf16-mixed" if default_precision(device) == "bf16-true" else "32-true"
    run = RunSpec(kind="full", checkpoint_dir=Path(checkpoint_dir), out_dir=Path(out_dir), precision=precision,
                  quantize=None, devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator,
                  data=_as(data, DataArgs), train=_as(train, TrainArgs), eval=_as(eval, EvalArgs), optimizer=optimizer,
                  logger=logger, resume=resume, seed=seed, hparams=hparams)
    return launch(run, main)


def main(fabric, run: RunSpec) -> dict:
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


if __name__ == "__main__":
    run_job(setup)
