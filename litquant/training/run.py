"""A finetuning run: its spec (`RunSpec`), the checks made before any process starts, the strategy (single device,
DDP or FSDP2) and the Fabric launch of a function on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from litquant.checkpoint import Checkpoint
from litquant.errors import UserError
from litquant.lora import LoRAConfig, base_options
from litquant.training.args import DataArgs, EvalArgs, Resume, TrainArgs, coerce
from litquant.training.loggers import LOGGERS, make_loggers
from litquant.training.optim import OPTIMIZERS

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class RunSpec:
    """Everything a rank needs to know about the run; built by a job from its arguments."""

    kind: str  # "lora" or "full": what trains and what a checkpoint holds (see checkpoints.RUN_WEIGHTS)
    checkpoint_dir: Path
    out_dir: Path
    precision: Optional[str]
    quantize: Optional[str]
    devices: int
    num_nodes: int
    strategy: str
    accelerator: str
    data: DataArgs
    train: TrainArgs
    eval: EvalArgs
    optimizer: str
    logger: str
    resume: Resume
    seed: int
    hparams: dict  # the job's arguments, written to out_dir/hyperparameters.yaml
    lora: Optional[LoRAConfig] = None
    plugin: Any = None  # set by launch()
    resume_dir: Optional[Path] = None  # set by launch()

    def __post_init__(self) -> None:
        self.checkpoint_dir, self.out_dir = Path(self.checkpoint_dir), Path(self.out_dir)
        self.data, self.train = coerce(self.data, DataArgs), coerce(self.train, TrainArgs)
        self.eval = coerce(self.eval, EvalArgs)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def validate_args(run: RunSpec) -> None:
    t, d, e = run.train, run.data, run.eval
    if run.devices < 1 or run.num_nodes < 1:
        raise UserError("--devices and --num_nodes must be at least 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise UserError("--train.micro_batch_size and --train.global_batch_size must be at least 1")
    per_step = t.micro_batch_size * run.world_size
    if t.global_batch_size % per_step:
        raise UserError(
            f"--train.global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x "
            f"devices x num_nodes = {per_step}"
        )
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError("--train.max_steps must be at least 1")
    if t.epochs < 1:
        raise UserError("--train.epochs must be at least 1")
    if t.learning_rate <= 0 or t.min_lr < 0 or t.min_lr > t.learning_rate:
        raise UserError("need 0 <= --train.min_lr <= --train.learning_rate and a positive learning rate")
    if t.lr_warmup_steps < 0:
        raise UserError(f"--train.lr_warmup_steps must be at least 0, got {t.lr_warmup_steps}")
    if not (0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0):
        raise UserError(f"--train.beta1 and --train.beta2 must be in [0, 1), got {t.beta1} and {t.beta2}")
    if t.weight_decay < 0:
        raise UserError(f"--train.weight_decay must be at least 0, got {t.weight_decay}")
    if t.max_norm is not None and not t.max_norm > 0:
        raise UserError(
            f"--train.max_norm must be positive (or null for no gradient clipping), got {t.max_norm}"
        )
    if t.save_interval is not None and t.save_interval < 1:
        raise UserError("--train.save_interval must be at least 1 (or null for no intermediate checkpoints)")
    if t.log_interval < 1 or e.interval < 1:
        raise UserError("--train.log_interval and --eval.interval must be at least 1")
    if e.max_iters is not None and e.max_iters < 1:
        raise UserError(
            f"--eval.max_iters must be at least 1 (or null: the whole validation set), got {e.max_iters}"
        )
    if e.exact_match_examples < 0 or e.sample_max_new_tokens < 0:
        raise UserError("--eval.exact_match_examples and --eval.sample_max_new_tokens must be at least 0")
    if d.max_seq_length is not None and d.max_seq_length < 2:
        raise UserError("--data.max_seq_length must be at least 2")
    if run.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {run.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if run.logger not in LOGGERS:
        raise UserError(f"unknown --logger {run.logger!r}; choose tensorboard, csv or both")
    if run.strategy not in STRATEGIES:
        raise UserError(f"unknown --strategy {run.strategy!r}; choose auto, ddp or fsdp")
    if run.strategy == "fsdp" and run.optimizer != "AdamW":
        raise UserError("--strategy fsdp shards the optimizer state itself: use --optimizer AdamW")
    from litquant.prompts import PromptStyle

    PromptStyle.from_name(d.prompt_style)
    if d.path is not None and not Path(d.path).exists():
        raise UserError(f"data path {str(d.path)!r} does not exist")
    Checkpoint.open(run.checkpoint_dir)


def launch(run: RunSpec, fn: Callable) -> dict:
    """Check everything that can be checked before any process starts, build Fabric, run `fn(fabric, run)` on every
    rank."""
    from lightning.fabric import Fabric

    from litquant.precision import fabric_plugin, pick_accelerator, resolve
    from litquant.training.checkpoints import check_resume_dir, find_resume_dir

    validate_args(run)
    accelerator = pick_accelerator(run.accelerator)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    run.plugin = resolve(run.precision, run.quantize, device, training=True, **base_options(run.quantize))
    run.resume_dir = find_resume_dir(run)
    if run.resume_dir is not None:
        check_resume_dir(run, run.resume_dir)
    strategy = build_strategy(run.strategy, run.world_size, accelerator)
    loggers = make_loggers(run.out_dir, run.logger)
    fabric = Fabric(
        accelerator=accelerator,
        devices=run.devices,
        num_nodes=run.num_nodes,
        strategy=strategy,
        plugins=fabric_plugin(run.plugin),
        loggers=loggers,
    )
    return fabric.launch(fn, run)


def build_strategy(name: str, world_size: int, accelerator: str) -> Any:
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    backend = "gloo" if accelerator == "cpu" else None
    if name == "auto":
        name = "ddp" if world_size > 1 else "single"
    if name == "single":
        return "auto"
    if name == "ddp":
        # quantized weights are buffers that never change: do not broadcast them before every forward
        import inspect

        ddp_params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
        key = "forward_sync_buffers" if "forward_sync_buffers" in ddp_params else "broadcast_buffers"
        no_sync = {key: False}
        return DDPStrategy(process_group_backend=backend, **no_sync)
    # FSDP2: shard each transformer block's parameters (Fabric's FSDP1 strategy refuses CPUs; this one works there)
    return ModelParallelStrategy(
        parallelize_fn=fully_shard_blocks,
        data_parallel_size=world_size,
        tensor_parallel_size=1,
        process_group_backend=backend,
    )


def fully_shard_blocks(model: nn.Module, device_mesh: Any) -> nn.Module:
    """FSDP2 `fully_shard` on each transformer block, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
