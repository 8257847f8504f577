"""The option groups of the finetuning jobs (`--data.*`, `--train.*`, `--eval.*`) and the `--resume` type.

Each field's attribute docstring is its `--help` text (`run_job` has jsonargparse read them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from litquant.errors import UserError

# --resume: true (the latest checkpoint in out_dir, which must exist), false, auto (the latest one if there is one)
# or a checkpoint directory
Resume = Union[bool, Literal["auto"], Path]


@dataclass
class DataArgs:
    """Instruction data (Alpaca JSON/JSONL layout)."""

    path: Optional[Path] = None
    """a .json/.jsonl file or a directory of them (null: the bundled task)."""
    prompt_style: str = "alpaca"
    """the prompt template the examples are formatted with (alpaca, default, ...)."""
    max_seq_length: Optional[int] = None
    """tokens per example, longer ones are cut (null: the model's block size)."""
    val_split_fraction: float = 0.05
    """fraction of the examples held out for validation."""
    mask_prompt: bool = True
    """loss on the answer tokens only."""
    seed: int = 42
    """seed of the train/validation split and of the data order."""


@dataclass
class TrainArgs:
    """Optimization."""

    global_batch_size: int = 16
    """examples per optimizer step, over all devices."""
    micro_batch_size: int = 4
    """examples per forward/backward on one device."""
    max_steps: Optional[int] = None
    """optimizer steps (null: `epochs` passes over the data)."""
    epochs: int = 1
    """passes over the training data when max_steps is null."""
    learning_rate: float = 1e-3
    """peak learning rate, reached after the warmup."""
    min_lr: float = 0.0
    """learning rate the cosine decay reaches at the last step."""
    lr_warmup_steps: int = 10
    """steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    max_norm: Optional[float] = 1.0
    """gradient clipping norm (null: off)."""
    save_interval: Optional[int] = None
    """steps between checkpoints that --resume continues from (null: only the final weights)."""
    log_interval: int = 1
    """steps between logged training metrics."""


@dataclass
class EvalArgs:
    """Validation."""

    interval: int = 50
    """steps between validations."""
    max_iters: Optional[int] = 20
    """validation micro-batches (null: the whole validation set)."""
    initial_validation: bool = False
    """also validate before the first step."""
    sample_max_new_tokens: int = 40
    """tokens of a greedy sample for the first validation example at each validation (0: none)."""
    exact_match_examples: int = 0
    """greedy exact-match accuracy on this many validation examples, at the end (and at the start with
    initial_validation)."""


def coerce(value: Any, cls: type) -> Any:
    """An option group as its dataclass: it may arrive as one, as a dict (in-process callers) or as a jsonargparse
    Namespace."""
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


def job_hparams(local_vars: dict, exclude: tuple = ()) -> dict:
    """A job's arguments as plain YAML values (keys = flags, so the file is a valid --config)."""

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
