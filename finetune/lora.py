"""LoRA / QLoRA finetuning: `python finetune/lora.py ...` == `litquant finetune lora ...`.

    litquant finetune lora --config config_hub/finetune/litquant-tiny/qlora.yaml
    litquant finetune lora --quantize bnb.nf4 --data.path data/alpaca.json --train.max_steps 500
    litquant finetune lora --devices 2 --strategy ddp          # 2 GPUs (or 2 CPU processes with gloo)

`setup()` resolves the precision plugin (any `--quantize` mode: bnb.* makes it QLoRA, gptq.int4 trains adapters
over a GPTQ base) and the strategy, then launches `main()` on every rank: load the (quantized) base, wrap the
enabled Linears in LoRA adapters, freeze the rest, and `fit()`.

This file also holds the machinery `finetune/full.py` reuses: data loading and batching, the training loop with
gradient accumulation, warmup + cosine LR, clipping, validation (loss, a sample generation, exact-match accuracy),
TensorBoard/CSV logging and checkpoints that `--resume` continues bit for bit:
  - the data order is a function of (data seed, epoch) and the global sample position of (step), so a checkpoint
    only records the step; dropout's RNG is re-seeded from (seed, step, rank) at every step, so nothing random
    depends on what ran before the checkpoint;
  - a checkpoint `out_dir/step-000100/` holds the trainable weights and `train_state.safetensors` (optimizer
    state as tensors + counters as JSON metadata; safetensors only, nothing is unpickled on resume). It is written
    to a temporary directory first and renamed into place, so a killed run never leaves a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # `python finetune/lora.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, WEIGHTS_FILE, check_checkpoint_dir, load_model
from litquant.io import atomic_write_text
from litquant.errors import UserError, run_job
from litquant.lora import LORA_FILE, LoRAConfig, add_lora, base_options, mark_only_lora_as_trainable, save_lora
from litquant.utils import num_parameters, peak_memory_bytes, reset_peak_memory

TRAIN_STATE_FILE = "train_state.safetensors"
HPARAMS_FILE = "hyperparameters.yaml"
METRICS_FILE = "metrics.json"
OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit")
# the weights file a step checkpoint of each kind of run (RunSpec.kind) holds, and how errors name that kind
RUN_WEIGHTS = {"lora": LORA_FILE, "full": WEIGHTS_FILE}
_RUN_NAMES = {"lora": "a LoRA run (`finetune lora`)", "full": "a full finetuning run (`finetune full`)"}


@dataclass
class DataArgs:
    """Instruction data (Alpaca JSON/JSONL layout)."""

    path: Optional[Path] = None  # a .json/.jsonl file or a directory of them (None: the bundled task)
    prompt_style: str = "alpaca"
    max_seq_length: Optional[int] = None  # tokens per example, longer ones are cut (None: the model's block size)
    val_split_fraction: float = 0.05
    mask_prompt: bool = True  # loss on the answer tokens only
    seed: int = 42  # train/val split and data order


@dataclass
class TrainArgs:
    """Optimization."""

    global_batch_size: int = 16  # examples per optimizer step, over all devices
    micro_batch_size: int = 4  # examples per forward/backward on one device
    max_steps: Optional[int] = None  # optimizer steps (None: `epochs` passes over the data)
    epochs: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 0.0  # cosine decay reaches this at the last step
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    max_norm: Optional[float] = 1.0  # gradient clipping (None: off)
    save_interval: Optional[int] = None  # steps between checkpoints (None: only the final weights)
    log_interval: int = 1  # steps between logged training metrics


@dataclass
class EvalArgs:
    """Validation."""

    interval: int = 50  # steps between validations
    max_iters: Optional[int] = 20  # validation micro-batches (None: the whole validation set)
    initial_validation: bool = False  # also validate before the first step
    sample_max_new_tokens: int = 40  # greedy sample for the first validation example at each validation (0: none)
    exact_match_examples: int = 0  # at the end (and at the start with initial_validation): greedy exact-match
    # accuracy on this many validation examples


# ---- entry point --------------------------------------------------------------------------------------------


def setup(
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
    resume: Union[bool, Path] = False,
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
        resume: continue from a checkpoint: true = the latest in out_dir, or a checkpoint directory.
        seed: seed for adapter init and dropout.
    """
    hparams = _hparams(locals())  # first: only the arguments are local yet
    lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                      value=lora_value, projection=lora_projection, mlp=lora_mlp, head=lora_head)
    run = RunSpec(kind="lora", checkpoint_dir=Path(checkpoint_dir), out_dir=Path(out_dir), precision=precision,
                  quantize=quantize, devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator,
                  data=_as(data, DataArgs), train=_as(train, TrainArgs), eval=_as(eval, EvalArgs), optimizer=optimizer,
                  logger=logger, resume=resume, seed=seed, hparams=hparams, lora=lora)
    return launch(run, main)


def main(fabric, run: "RunSpec") -> dict:
    """One rank: load the base, add adapters, train."""
    model, tokenizer = load_base(fabric, run)
    fabric.seed_everything(run.seed, verbose=False)  # the same adapter init on every rank
    add_lora(model, run.lora, dtype=run.plugin.dtype)
    mark_only_lora_as_trainable(model)
    fabric.print(f"LoRA {run.lora}: {num_parameters(model, True):,} trainable of {num_parameters(model):,} "
                 f"parameters; base: {run.plugin.describe()}")
    return fit(fabric, run, model, tokenizer, LoRAWeights(run))


class LoRAWeights:
    """What LoRA saves and restores: the adapter tensors (+ metadata that makes the file self-describing)."""

    file = LORA_FILE

    def __init__(self, run: "RunSpec") -> None:
        self.run = run

    def trainable_only(self) -> bool:
        return True

    def save(self, tensors: dict[str, torch.Tensor], directory: Path) -> None:
        save_lora(tensors, directory / self.file, self.run.lora, base_checkpoint_dir=self.run.checkpoint_dir.resolve(),
                  base_quantize=self.run.quantize, base_precision=self.run.plugin.precision)

    def finalize(self, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
        self.save(tensors, out_dir)
        return out_dir / self.file


# ---- the run --------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    kind: str
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
    resume: Union[bool, Path]
    seed: int
    hparams: dict
    lora: Optional[LoRAConfig] = None
    plugin: Any = None  # set by launch()
    resume_dir: Optional[Path] = None  # set by launch()

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _as(value: Any, cls: type) -> Any:
    """Dataclass args may arrive as dicts (in-process callers) or jsonargparse Namespaces."""
    if isinstance(value, cls):
        return value
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        return cls(**value)
    raise UserError(f"expected {cls.__name__} options, got {value!r}")


def _hparams(local_vars: dict, exclude: tuple = ()) -> dict:
    """The call's arguments as plain YAML values (keys = flags, so the file is a valid --config)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if hasattr(v, "__dataclass_fields__"):
            return {k: plain(x) for k, x in asdict(v).items()}
        if hasattr(v, "as_dict"):
            return plain(v.as_dict())
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in local_vars.items() if k not in exclude and not k.startswith("_")}


def validate_args(run: RunSpec) -> None:
    t, d, e = run.train, run.data, run.eval
    if run.devices < 1 or run.num_nodes < 1:
        raise UserError("--devices and --num_nodes must be at least 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise UserError("--train.micro_batch_size and --train.global_batch_size must be at least 1")
    per_step = t.micro_batch_size * run.world_size
    if t.global_batch_size % per_step:
        raise UserError(f"--train.global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x "
                        f"devices x num_nodes = {per_step}")
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
        raise UserError(f"--train.max_norm must be positive (or null for no gradient clipping), got {t.max_norm}")
    if t.save_interval is not None and t.save_interval < 1:
        raise UserError("--train.save_interval must be at least 1 (or null for no intermediate checkpoints)")
    if t.log_interval < 1 or e.interval < 1:
        raise UserError("--train.log_interval and --eval.interval must be at least 1")
    if e.max_iters is not None and e.max_iters < 1:
        raise UserError(f"--eval.max_iters must be at least 1 (or null: the whole validation set), got {e.max_iters}")
    if e.exact_match_examples < 0 or e.sample_max_new_tokens < 0:
        raise UserError("--eval.exact_match_examples and --eval.sample_max_new_tokens must be at least 0")
    if d.max_seq_length is not None and d.max_seq_length < 2:
        raise UserError("--data.max_seq_length must be at least 2")
    if run.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {run.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if run.logger not in ("tensorboard", "csv", "both"):
        raise UserError(f"unknown --logger {run.logger!r}; choose tensorboard, csv or both")
    if run.strategy not in ("auto", "ddp", "fsdp"):
        raise UserError(f"unknown --strategy {run.strategy!r}; choose auto, ddp or fsdp")
    if run.strategy == "fsdp" and run.optimizer != "AdamW":
        raise UserError("--strategy fsdp shards the optimizer state itself: use --optimizer AdamW")
    from litquant.prompts import PromptStyle

    PromptStyle.from_name(d.prompt_style)
    if d.path is not None and not Path(d.path).exists():
        raise UserError(f"data path {str(d.path)!r} does not exist")
    check_checkpoint_dir(run.checkpoint_dir, None)


def launch(run: RunSpec, fn: Callable) -> dict:
    """Check everything that can be checked before any process starts, build Fabric, run `fn` on every rank."""
    import lightning as L

    from litquant.precision import pick_accelerator, resolve

    validate_args(run)
    accelerator = pick_accelerator(run.accelerator)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    run.plugin = resolve(run.precision, run.quantize, device, **base_options(run.quantize))
    run.resume_dir = find_resume_dir(run)
    if run.resume_dir is not None:
        check_resume_dir(run, run.resume_dir)
    strategy = build_strategy(run.strategy, run.world_size, accelerator)
    loggers = make_loggers(run.out_dir, run.logger)
    fabric = L.Fabric(accelerator=accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=strategy,
                      plugins=run.plugin, loggers=loggers)
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
    return ModelParallelStrategy(parallelize_fn=_fully_shard_blocks, data_parallel_size=world_size,
                                 tensor_parallel_size=1, process_group_backend=backend)


def _fully_shard_blocks(model: nn.Module, device_mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_loggers(out_dir: Path, which: str) -> list:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    root = Path(out_dir) / "logs"
    loggers = []
    if which in ("tensorboard", "both"):
        loggers.append(TensorBoardLogger(root_dir=root, name="tensorboard"))
    if which in ("csv", "both"):
        loggers.append(CSVLogger(root_dir=root, name="csv", flush_logs_every_n_steps=10))
    return loggers


# ---- model and data -------------------------------------------------------------------------------------------


def load_base(fabric, run: RunSpec):
    from litquant.tokenizer import Tokenizer

    tokenizer = Tokenizer(run.checkpoint_dir)
    reset_peak_memory(fabric.device)
    model = load_model(run.checkpoint_dir, run.plugin, fabric.device, progress=fabric.global_rank == 0)
    if any(hasattr(m, "qweight") and m.qweight is None for m in model.modules()):
        raise UserError("the GPTQ base was loaded for inference only (qweight released): cannot train through it")
    return model, tokenizer


@dataclass
class Data:
    train: list  # EncodedExample
    val: list
    val_examples: list  # raw dicts (for exact match and samples)
    style: Any
    max_seq_length: int
    pad_id: int


def prepare_data(fabric, run: RunSpec, tokenizer, block_size: int) -> Data:
    from litquant.data.instructions import encode_dataset, load_splits
    from litquant.prompts import PromptStyle

    d = run.data
    style = PromptStyle.from_name(d.prompt_style)
    max_seq_length = min(d.max_seq_length or block_size, block_size)
    train_ex, val_ex = load_splits(d.path, d.val_split_fraction, d.seed)
    train, _ = encode_dataset(tokenizer, style, train_ex, max_seq_length, d.mask_prompt)
    val, kept_val = encode_dataset(tokenizer, style, val_ex, max_seq_length, d.mask_prompt)
    dropped_t, dropped_v = len(train_ex) - len(train), len(val_ex) - len(val)
    val_ex = kept_val
    if dropped_t or dropped_v:
        fabric.print(f"Dropped {dropped_t} train and {dropped_v} validation examples whose prompt fills all "
                     f"{max_seq_length} tokens (raise --data.max_seq_length)")
    if not train:
        raise UserError(f"no training example fits in --data.max_seq_length {max_seq_length}")
    if not val:
        raise UserError("the validation split is empty after encoding: raise --data.val_split_fraction")
    if len(train) < run.train.global_batch_size:
        raise UserError(f"{len(train)} training examples are fewer than one global batch "
                        f"({run.train.global_batch_size}): lower --train.global_batch_size")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    lengths = [e.input_ids.numel() for e in train]
    fabric.print(f"Data: {len(train)} train / {len(val)} validation examples, {sum(lengths) / len(lengths):.1f} "
                 f"tokens on average, longest {max(lengths)} (max_seq_length {max_seq_length})")
    return Data(train, val, val_ex, style, max_seq_length, pad_id)


def train_batch_indices(n: int, step: int, run: RunSpec, rank: int) -> list[list[int]]:
    """The micro-batches (example indices) this rank processes at optimizer step `step` (0-based).

    Epoch e visits the examples in a permutation seeded by (data seed, e); step s of an epoch covers positions
    [s*G, (s+1)*G) of it, G the global batch. Rank r takes the micro-batches r*accum ... (r+1)*accum-1 of those,
    so 1 device with accumulation k and k devices without accumulation see the same global batch."""
    t = run.train
    G, m = t.global_batch_size, t.micro_batch_size
    steps_per_epoch = n // G
    epoch, s = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run.data.seed * 1000 + epoch)).tolist()
    accum = G // (m * run.world_size)
    out = []
    for a in range(accum):
        start = s * G + (rank * accum + a) * m
        out.append(order[start:start + m])
    return out


def total_steps(n_train: int, run: RunSpec) -> int:
    return run.train.max_steps or run.train.epochs * (n_train // run.train.global_batch_size)


def lr_at(step: int, total: int, t: TrainArgs) -> float:
    """Linear warmup over lr_warmup_steps, then cosine decay to min_lr at the last step (step is 0-based)."""
    if step < t.lr_warmup_steps:
        return t.learning_rate * (step + 1) / t.lr_warmup_steps
    progress = (step - t.lr_warmup_steps) / max(1, total - t.lr_warmup_steps)
    return t.min_lr + 0.5 * (t.learning_rate - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


# ---- optimizer ------------------------------------------------------------------------------------------------


def make_optimizer(fabric, run: RunSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = run.train
    name = run.optimizer
    kwargs = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, **kwargs)
    if fabric.device.type != "cuda" and name.startswith("Paged"):
        fallback = name[len("Paged"):]
        fabric.print(f"--optimizer {name}: paged optimizers page to CPU memory from a GPU; on CPU using {fallback}")
        name = fallback
    try:
        import bitsandbytes as bnb

        from litquant.quantization.bnb import MIN_BNB_CPU, _bnb_version

        if fabric.device.type == "cpu" and _bnb_version() < MIN_BNB_CPU:
            raise ImportError(f"bitsandbytes {bnb.__version__} has no CPU optimizers")
        return getattr(bnb.optim, name)(params, **kwargs)
    except ImportError as e:
        fabric.print(f"--optimizer {run.optimizer} is not available here ({e}); falling back to torch AdamW")
        return torch.optim.AdamW(params, **kwargs)


# ---- state: gather, save, load --------------------------------------------------------------------------------


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def gather_params(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the parameters; a collective under FSDP, so every rank must call it."""
    out = {}
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach()
        if _is_dtensor(t):
            t = t.full_tensor()
        out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_params(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(module.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise UserError(f"{source}: unexpected tensor {name!r} (checkpoint of another model or LoRA config?)")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
        if _is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None)
            p.to_local().copy_(local.to_local())
        else:
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def _dcp_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state keyed by parameter name (full even under FSDP) as (tensors, JSON skeleton): every tensor,
    however deeply nested (bnb keeps its 8-bit state in a dict), is replaced by {"__tensor__": its key}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer, options=_dcp_options(cpu_offload=True))
    tensors: dict[str, torch.Tensor] = {}

    def strip(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.full_tensor() if _is_dtensor(obj) else obj
            tensors[path] = t.detach().cpu().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {str(k): strip(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v, f"{path}/{i}") for i, v in enumerate(obj)]
        return obj

    # under FSDP only rank 0 receives the full state; the others return an empty dict (and do not write)
    skeleton = strip({"state": osd.get("state", {}), "param_groups": osd.get("param_groups", [])}, "optimizer")
    return tensors, skeleton


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, skeleton: dict, source: str = "checkpoint"
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                if obj["__tensor__"] not in tensors:
                    raise UserError(f"{source} lacks the optimizer tensor {obj['__tensor__']!r} (corrupt file?)")
                return tensors[obj["__tensor__"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    state = fill(skeleton)
    try:
        set_optimizer_state_dict(module, optimizer, state, options=_dcp_options())
    except (KeyError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: its optimizer state does not fit this run's optimizer and model ({why})") from None


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete step checkpoints in out_dir, oldest first (an interrupted save leaves only a .tmp directory)."""
    if not out_dir.is_dir():
        return []
    dirs = [p for p in out_dir.glob("step-*")
            if p.is_dir() and p.name[5:].isdigit() and (p / TRAIN_STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def find_resume_dir(run: RunSpec) -> Optional[Path]:
    existing = checkpoint_dirs(run.out_dir)
    if run.resume is False or run.resume is None:
        if existing:
            raise UserError(f"{run.out_dir} already holds checkpoints of an earlier run ({existing[-1].name}): "
                            "pass --resume true to continue it, or choose another --out_dir")
        return None
    if run.resume is True:
        if not existing:
            print(f"--resume: no checkpoint in {run.out_dir} yet, starting from the beginning", file=sys.stderr)
            return None
        return existing[-1]
    path = Path(run.resume)
    if path.is_file():
        path = path.parent
    if not (path / TRAIN_STATE_FILE).is_file():
        raise UserError(f"--resume {str(run.resume)!r} is not a checkpoint directory (no {TRAIN_STATE_FILE})")
    return path


def check_resume_dir(run: RunSpec, directory: Path) -> None:
    """Before any process starts: the checkpoint `directory` is one this run can continue."""
    from litquant.io import open_safetensors

    with open_safetensors(resume_weights_path(directory, RUN_WEIGHTS[run.kind])):
        pass  # its header is valid and its tensors lie within the file
    read_train_state(directory, run)


def resume_weights_path(directory: Path, weights_file: str) -> Path:
    """directory/weights_file, or a one-line error saying what kind of run the directory belongs to instead."""
    path = directory / weights_file
    if path.is_file():
        return path
    mine = next((k for k, f in RUN_WEIGHTS.items() if f == weights_file), None)
    other = next((k for k, f in RUN_WEIGHTS.items() if f != weights_file and (directory / f).is_file()), None)
    if other is not None and mine is not None:
        raise UserError(f"{directory} is a checkpoint of {_RUN_NAMES[other]}, not of {_RUN_NAMES[mine]} "
                        f"(it holds {RUN_WEIGHTS[other]}, not {weights_file})")
    raise UserError(f"{directory} is not a complete checkpoint: {weights_file} is missing")


def read_train_state(directory: Path, run: RunSpec) -> tuple[dict, dict]:
    """(counters, optimizer skeleton) of a checkpoint's train_state.safetensors, checked against this run."""
    from litquant.io import safetensors_metadata

    state_path = directory / TRAIN_STATE_FILE
    meta = safetensors_metadata(state_path)  # a missing, truncated or corrupt file is a UserError here
    if meta.get("litquant_train_state") != "1":
        raise UserError(f"{state_path} is not a litquant training state file")
    try:
        counters, skeleton = json.loads(meta["counters"]), json.loads(meta["optimizer"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"{state_path}: its metadata lacks valid 'counters' and 'optimizer' entries "
                        "(not written by `litquant finetune`, or corrupt)") from None
    if (not isinstance(counters, dict) or not isinstance(skeleton, dict)
            or not all(isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("step", "tokens"))):
        raise UserError(f"{state_path}: its 'counters' / 'optimizer' metadata is malformed (corrupt file?)")
    if counters.get("global_batch_size") != run.train.global_batch_size:
        raise UserError(f"{directory} was trained with --train.global_batch_size {counters.get('global_batch_size')}: "
                        "resume with the same global batch size (the data position depends on it)")
    return counters, skeleton


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer actually in use (--optimizer may fall back to another one), e.g. torch.optim.adamw.AdamW."""
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def save_checkpoint_dir(fabric, run: RunSpec, weights, model, optimizer, counters: dict) -> Path:
    """out_dir/step-XXXXXX/{weights, train_state.safetensors}, written to a temp dir then renamed (atomic)."""
    from litquant.io import save_safetensors

    params = gather_params(model.module, weights.trainable_only())
    opt_tensors, opt_rest = optimizer_state(model.module, optimizer.optimizer)
    final = run.out_dir / f"step-{counters['step']:06d}"
    if fabric.global_rank == 0:
        tmp = run.out_dir / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights.save(params, tmp)
        meta = {"format": "pt", "litquant_train_state": "1", "counters": json.dumps(counters),
                "optimizer": json.dumps(opt_rest)}
        save_safetensors(opt_tensors or {"_empty": torch.zeros(0)}, tmp / TRAIN_STATE_FILE, metadata=meta)
        if final.exists():  # a resumed run passing an older run's step again
            shutil.rmtree(final)
        os.replace(tmp, final)
    fabric.barrier()
    return final


def load_checkpoint_dir(fabric, run: RunSpec, weights, model, optimizer, directory: Path) -> dict:
    from litquant.io import open_safetensors

    weights_path = resume_weights_path(directory, weights.file)
    counters, skeleton = read_train_state(directory, run)
    saved_class, this_class = counters.get("optimizer_class"), optimizer_class(optimizer.optimizer)
    if saved_class is not None and saved_class != this_class:  # (older checkpoints do not record it)
        raise UserError(f"{directory} holds the state of a {saved_class} optimizer, this run uses {this_class}: "
                        f"resume with the same --optimizer ({counters.get('optimizer')})")
    with open_safetensors(weights_path) as f:
        params = {k: f.get_tensor(k) for k in f.keys()}
    saved = {n for n, p in model.module.named_parameters() if p.requires_grad or not weights.trainable_only()}
    missing = sorted(saved - set(params))
    if missing:
        raise UserError(f"{weights_path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                        "(checkpoint of another model or LoRA config?)")
    load_params(model.module, params, weights_path)
    state_path = directory / TRAIN_STATE_FILE
    with open_safetensors(state_path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("optimizer/")}
    load_optimizer_state(model.module, optimizer.optimizer, tensors, skeleton, str(state_path))
    return counters


# ---- the loop -------------------------------------------------------------------------------------------------


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross entropy over the answer tokens of a micro-batch, and how many there are."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    return loss, int((targets != -100).sum())


@torch.no_grad()
def validate(fabric, run: RunSpec, model, data: Data) -> float:
    """Token-weighted mean loss over the first eval.max_iters validation micro-batches (split across ranks, except
    under FSDP, where every forward is a collective that all ranks must join)."""
    from litquant.data.instructions import collate

    model.eval()
    m = run.train.micro_batch_size
    batches = [data.val[i:i + m] for i in range(0, len(data.val), m)]
    if run.eval.max_iters is not None:
        batches = batches[: run.eval.max_iters]
    split = _split_eval(run, fabric)
    total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    for batch in batches[fabric.global_rank::fabric.world_size] if split else batches:
        x, y = collate(batch, data.pad_id)
        x, y = x.to(fabric.device), y.to(fabric.device)
        loss, n = _loss(model(x[:, :-1]), y)
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=fabric.device)
    if split:
        total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _split_eval(run: RunSpec, fabric) -> bool:
    """Whether evaluation work is split across ranks (not under FSDP: there every rank runs every forward)."""
    return fabric.world_size > 1 and run.strategy != "fsdp"


def exact_match_accuracy(fabric, run: RunSpec, model, tokenizer, data: Data) -> float:
    """Greedy exact match on the first eval.exact_match_examples validation examples (split across ranks; under
    FSDP every rank must run every forward, so there each rank scores all of them)."""
    from litquant.data.instructions import exact_match

    examples = data.val_examples[: run.eval.exact_match_examples]
    sharded = _split_eval(run, fabric)
    mine = examples[fabric.global_rank::fabric.world_size] if sharded else examples
    with run.plugin.forward_context():
        acc, _ = exact_match(model.module, tokenizer, data.style, mine)
    counts = torch.tensor([acc * len(mine), len(mine)], dtype=torch.float64, device=fabric.device)
    if sharded:
        counts = fabric.all_reduce(counts, reduce_op="sum")
    model.train()
    return float(counts[0] / counts[1].clamp(min=1))


def sample_answer(fabric, run: RunSpec, model, tokenizer, data: Data) -> None:
    from litquant.data.instructions import format_prompt
    from litquant.generation import generate

    n = run.eval.sample_max_new_tokens
    if n < 1:
        return
    ex = data.val_examples[0]
    gpt = model.module
    prompt = tokenizer.encode(format_prompt(data.style, ex), device=fabric.device)
    n = min(n, gpt.config.block_size - prompt.numel())
    if n < 1:
        return
    max_seq = gpt.max_seq_length
    try:
        gpt.eval()
        gpt.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + n, device=fabric.device)
        with run.plugin.forward_context():
            result = generate(gpt, prompt, n, temperature=0.0, stop_ids=tokenizer.stop_ids)
    finally:
        gpt.clear_kv_cache()
        gpt.max_seq_length = max_seq
        gpt.train()
    fabric.print(f"Sample for {ex['instruction']!r} {ex['input']!r}:\n{tokenizer.decode(result.new_tokens)}")


def fit(fabric, run: RunSpec, model: nn.Module, tokenizer, weights) -> dict:
    from litquant.data.instructions import collate

    t = run.train
    rank, world = fabric.global_rank, fabric.world_size
    data = prepare_data(fabric, run, tokenizer, model.config.block_size)
    model.max_seq_length = data.max_seq_length
    total = total_steps(len(data.train), run)
    accum = t.global_batch_size // (t.micro_batch_size * world)

    model = fabric.setup_module(model, move_to_device=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(make_optimizer(fabric, run, params))

    if rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run.out_dir / HPARAMS_FILE, yaml.safe_dump(run.hparams, sort_keys=False))
    counters = {"step": 0, "tokens": 0}
    if run.resume_dir is not None:
        counters = load_checkpoint_dir(fabric, run, weights, model, optimizer, run.resume_dir)
        if counters.get("num_train_examples") != len(data.train):
            raise UserError(f"{run.resume_dir} was trained on {counters.get('num_train_examples')} examples, this run "
                            f"has {len(data.train)}: the data or its options changed")
        fabric.print(f"Resuming from {run.resume_dir} at step {counters['step']}")
    step, tokens_seen = counters["step"], counters["tokens"]
    if step >= total:
        fabric.print(f"Nothing to do: the checkpoint is at step {step} of {total}")

    metrics: dict[str, Any] = {"total_steps": total, "start_step": step}
    if run.eval.initial_validation and step == 0:
        metrics["val_loss_before"] = validate(fabric, run, model, data)
        log = {"val_loss": metrics["val_loss_before"]}
        if run.eval.exact_match_examples:
            acc = exact_match_accuracy(fabric, run, model, tokenizer, data)
            metrics["exact_match_before"] = log["exact_match"] = acc
        fabric.log_dict(log, step=0)
        fabric.print(f"step 0: val loss {metrics['val_loss_before']:.4f}"
                     + (f", exact match {log['exact_match']:.3f}" if "exact_match" in log else ""))

    model.train()
    losses: list[tuple[int, float]] = []
    window_loss = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # (sum of step losses, steps)
    window_tokens, window_t0 = 0, time.perf_counter()
    train_t0, train_tokens, start_step = time.perf_counter(), 0, step
    while step < total:
        torch.manual_seed(step_seed(run.seed, step, rank))  # dropout: a function of the step, not of history
        lr = lr_at(step, total, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # real (unpadded) input tokens of the whole global batch: every rank knows every rank's batches
        step_tokens = sum(data.train[i].input_ids.numel() - 1 for r in range(world)
                          for b in train_batch_indices(len(data.train), step, run, r) for i in b)
        for a, idx in enumerate(train_batch_indices(len(data.train), step, run, rank)):
            x, y = collate([data.train[i] for i in idx], data.pad_id)
            x, y = x.to(fabric.device), y.to(fabric.device)
            with fabric.no_backward_sync(model, enabled=a < accum - 1):
                loss, _ = _loss(model(x[:, :-1]), y)
                fabric.backward(loss / accum)
            window_loss[0] += loss.detach().double() / accum  # no .item(): no host sync per micro-batch
        if t.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=t.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss[1] += 1
        window_tokens += step_tokens
        train_tokens += step_tokens
        tokens_seen += step_tokens

        if step % t.log_interval == 0 or step == total:
            stats = fabric.all_reduce(window_loss, reduce_op="sum") if world > 1 else window_loss
            dt = time.perf_counter() - window_t0
            mean_loss = float(stats[0] / stats[1])  # mean over steps and ranks
            entry = {"loss": mean_loss, "lr": lr, "tokens_per_sec": window_tokens / dt,
                     "memory_gb": peak_memory_bytes(fabric.device) / 1e9, "tokens": tokens_seen}
            fabric.log_dict(entry, step=step)
            losses.append((step, mean_loss))
            fabric.print(f"step {step:5d}/{total} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                         f"{entry['tokens_per_sec']:,.0f} tokens/sec | {entry['memory_gb']:.2f} GB")
            window_loss.zero_()
            window_tokens, window_t0 = 0, time.perf_counter()

        t_pause = time.perf_counter()
        if step % run.eval.interval == 0 and step < total:
            val = validate(fabric, run, model, data)
            fabric.log_dict({"val_loss": val}, step=step)
            fabric.print(f"step {step}: val loss {val:.4f}")
            sample_answer(fabric, run, model, tokenizer, data)
        if t.save_interval is not None and step % t.save_interval == 0 and step < total:
            c = {"step": step, "tokens": tokens_seen, "num_train_examples": len(data.train),
                 "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
                 "world_size": world, "seed": run.seed, "optimizer": run.optimizer,
                 "optimizer_class": optimizer_class(optimizer.optimizer)}
            path = save_checkpoint_dir(fabric, run, weights, model, optimizer, c)
            fabric.print(f"Saved checkpoint {path}")
        paused = time.perf_counter() - t_pause  # validation and saving are not training throughput
        window_t0 += paused
        train_t0 += paused
    train_s = time.perf_counter() - train_t0

    # the end: validation, accuracy, final weights
    metrics["val_loss"] = validate(fabric, run, model, data)
    log = {"val_loss": metrics["val_loss"]}
    if run.eval.exact_match_examples:
        metrics["exact_match"] = log["exact_match"] = exact_match_accuracy(fabric, run, model, tokenizer, data)
    fabric.log_dict(log, step=step)
    fabric.print(f"step {step}: val loss {metrics['val_loss']:.4f}"
                 + (f", exact match {log['exact_match']:.3f}" if "exact_match" in log else ""))
    sample_answer(fabric, run, model, tokenizer, data)

    params = gather_params(model.module, weights.trainable_only())
    metrics["max_rank_divergence"] = rank_divergence(fabric, params) if run.strategy != "fsdp" else None
    metrics.update(
        steps=step, train_seconds=train_s,
        tokens_per_sec=train_tokens / train_s if step > start_step and train_s > 0 else None,
        peak_memory_gb=peak_memory_bytes(fabric.device) / 1e9, train_losses=losses,
        trainable_parameters=sum(p.numel() for p in params.values()), world_size=world,
    )
    if rank == 0:
        metrics["weights_path"] = str(weights.finalize(params, run.out_dir))
        atomic_write_text(run.out_dir / METRICS_FILE, json.dumps(metrics, indent=1))
        fabric.print(f"Saved {metrics['weights_path']} and {run.out_dir / HPARAMS_FILE}")
    fabric.barrier()
    for lg in fabric.loggers:
        lg.finalize("success")
    return metrics


def rank_divergence(fabric, params: dict[str, torch.Tensor]) -> float:
    """Largest difference of a trainable weight between any two ranks (0.0 when they are in sync)."""
    if fabric.world_size == 1 or not params:
        return 0.0
    flat = torch.cat([p.float().reshape(-1) for p in params.values()]).to(fabric.device)
    gathered = fabric.all_gather(flat)  # (world, n)
    return float((gathered - gathered[0:1]).abs().max())


if __name__ == "__main__":
    run_job(setup)
