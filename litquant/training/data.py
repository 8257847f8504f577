"""The instruction data of a run: loaded, split and encoded once (`prepare_data`), then batched so that the examples of
any optimizer step on any rank are a function of the step alone (`train_batch_indices`): resuming needs no data state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from litquant.errors import UserError
from litquant.training.run import RunSpec


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
        fabric.print(
            f"Dropped {dropped_t} train and {dropped_v} validation examples whose prompt fills all "
            f"{max_seq_length} tokens (raise --data.max_seq_length)"
        )
    if not train:
        raise UserError(f"no training example fits in --data.max_seq_length {max_seq_length}")
    if not val:
        raise UserError("the validation split is empty after encoding: raise --data.val_split_fraction")
    if len(train) < run.train.global_batch_size:
        raise UserError(
            f"{len(train)} training examples are fewer than one global batch "
            f"({run.train.global_batch_size}): lower --train.global_batch_size"
        )
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    lengths = [e.input_ids.numel() for e in train]
    fabric.print(
        f"Data: {len(train)} train / {len(val)} validation examples, {sum(lengths) / len(lengths):.1f} "
        f"tokens on average, longest {max(lengths)} (max_seq_length {max_seq_length})"
    )
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
        out.append(order[start : start + m])
    return out


def total_steps(n_train: int, run: RunSpec) -> int:
    return run.train.max_steps or run.train.epochs * (n_train // run.train.global_batch_size)
