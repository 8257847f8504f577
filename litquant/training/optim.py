"""The optimizer (`--optimizer`: torch AdamW or a bitsandbytes one) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from litquant.training.args import TrainArgs

if TYPE_CHECKING:
    from litquant.training.run import RunSpec

OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit")


def make_optimizer(fabric, run: RunSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """run.optimizer over `params`; a paged one becomes its unpaged variant on CPU, an unavailable bitsandbytes one
    becomes torch AdamW (each said in one printed line)."""
    t = run.train
    name = run.optimizer
    kwargs = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, **kwargs)
    if fabric.device.type != "cuda" and name.startswith("Paged"):
        fallback = name[len("Paged") :]
        fabric.print(
            f"--optimizer {name}: paged optimizers page to CPU memory from a GPU; on CPU using {fallback}"
        )
        name = fallback
    try:
        import bitsandbytes as bnb

        from litquant.quantization.bnb import MIN_BNB_CPU
        from litquant.quantization.bnb_linear import bnb_version

        if fabric.device.type == "cpu" and bnb_version() < MIN_BNB_CPU:
            raise ImportError(f"bitsandbytes {bnb.__version__} has no CPU optimizers")
        return getattr(bnb.optim, name)(params, **kwargs)
    except ImportError as e:
        fabric.print(f"--optimizer {run.optimizer} is not available here ({e}); falling back to torch AdamW")
        return torch.optim.AdamW(params, **kwargs)


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer actually in use (--optimizer may fall back to another one), e.g. torch.optim.adamw.AdamW."""
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def lr_at(step: int, total: int, t: TrainArgs) -> float:
    return warmup_cosine(step, total, t.learning_rate, t.min_lr, t.lr_warmup_steps)


def warmup_cosine(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr at the last step (step is 0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
