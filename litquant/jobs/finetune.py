"""`litquant finetune lora|full`: the finetuning jobs. Their signatures and docstrings are the CLI (jsonargparse);
each builds the run spec and hands it to the trainer in litquant/training/.

    litquant finetune lora --config config_hub/finetune/litquant-tiny/qlora.yaml
    litquant finetune lora --quantize bnb.nf4 --data.path data/alpaca.json --train.max_steps 500
    litquant finetune lora --devices 2 --strategy ddp          # 2 GPUs (or 2 CPU processes with gloo)
    litquant finetune full --config config_hub/finetune/litquant-tiny/full.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR
from litquant.lora import LoRAConfig
from litquant.training.args import DataArgs, EvalArgs, Resume, TrainArgs, job_hparams
from litquant.training.methods import full_precision, train_full, train_lora
from litquant.training.run import RunSpec, launch


def lora(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    out_dir: Path = Path("out/finetune/lora"),
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "auto",
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    optimizer: str = "AdamW",
    logger: str = "both",
    resume: Resume = False,
    seed: int = 1337,
) -> dict:
    """Finetune LoRA adapters on a (possibly quantized) base model.

    Args:
        checkpoint_dir: the base model (a litquant checkpoint directory; default: the bundled model).
        out_dir: where the adapter, checkpoints, logs (TensorBoard/CSV in out_dir/logs) and hyperparameters go.
        precision: compute precision: 32-true, 16-true, bf16-true, or bf16-mixed/16-mixed without --quantize
            (default: bf16-true on CUDA, 32-true on CPU).
        quantize: quantize the frozen base: any bnb mode (QLoRA; bnb.int8-training for an int8 base) or gptq.int4.
        devices: devices (processes) per node; >1 runs data parallel.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (FSDP2 `fully_shard` per transformer block).
        accelerator: auto, cuda or cpu.
        lora_r: adapter rank.
        lora_alpha: adapter scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapter input.
        lora_query: adapt the query rows of the fused qkv projection.
        lora_key: adapt the key rows.
        lora_value: adapt the value rows.
        lora_projection: adapt the attention output projection.
        lora_mlp: adapt the MLP Linears.
        lora_head: adapt the output layer.
        data: instruction data options.
        train: optimization options.
        eval: validation options.
        optimizer: AdamW, or bitsandbytes' AdamW8bit, PagedAdamW, PagedAdamW8bit (paged ones need CUDA).
        logger: tensorboard, csv or both.
        resume: continue from a checkpoint: true = the latest in out_dir (an error if there is none), auto = the
            latest in out_dir if there is one (else start from scratch), false, or a checkpoint directory.
        seed: seed for adapter init and dropout.
    """
    hparams = job_hparams(locals())  # first: only the arguments are local yet
    adapters = LoRAConfig(
        r=lora_r,
        alpha=lora_alpha,
        dropout=lora_dropout,
        query=lora_query,
        key=lora_key,
        value=lora_value,
        projection=lora_projection,
        mlp=lora_mlp,
        head=lora_head,
    )
    run = RunSpec(
        kind="lora",
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        precision=precision,
        quantize=quantize,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        accelerator=accelerator,
        data=data,
        train=train,
        eval=eval,
        optimizer=optimizer,
        logger=logger,
        resume=resume,
        seed=seed,
        hparams=hparams,
        lora=adapters,
    )
    return launch(run, train_lora)


def full(
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
    resume: Resume = False,
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
        resume: continue from a checkpoint: true = the latest in out_dir (an error if there is none), auto = the
            latest in out_dir if there is one (else start from scratch), false, or a checkpoint directory.
        seed: the run's seed (the data order comes from data.seed).
        quantize: not supported here (full finetuning needs full-precision weights); use `finetune lora`.
    """
    hparams = job_hparams(locals(), exclude=("quantize",))  # first: only the arguments are local yet
    run = RunSpec(
        kind="full",
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        precision=full_precision(precision, quantize, accelerator),
        quantize=None,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        accelerator=accelerator,
        data=data,
        train=train,
        eval=eval,
        optimizer=optimizer,
        logger=logger,
        resume=resume,
        seed=seed,
        hparams=hparams,
    )
    return launch(run, train_full)
