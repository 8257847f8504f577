"""The training loop (`fit`): gradient accumulation, warmup + cosine LR, clipping, periodic logging, validation and
step checkpoints, then the final validation, weights and out_dir/metrics.json. Dropout's RNG is re-seeded from
(seed, step, rank) at every step, so a resumed run continues bit for bit (docs/ARCHITECTURE.md, "Training")."""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn as nn

from litquant.data.instructions import collate
from litquant.io import atomic_write_text
from litquant.training.checkpoints import resume_counters, save_checkpoint_dir
from litquant.training.data import Data, prepare_data, total_steps, train_batch_indices
from litquant.training.evaluation import evaluate_and_log, sample_answer, token_loss, validate
from litquant.training.optim import lr_at, make_optimizer, optimizer_class
from litquant.training.run import RunSpec
from litquant.training.state import gather_params
from litquant.utils import peak_memory_bytes

HPARAMS_FILE = "hyperparameters.yaml"
METRICS_FILE = "metrics.json"


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def train_step(
    fabric, run: RunSpec, model, optimizer, data: Data, step: int, total: int, window_loss: torch.Tensor
) -> tuple[float, int]:
    """Optimizer step `step` (0-based): (its learning rate, the real input tokens of the whole global batch).
    Adds the step's loss (mean over its micro-batches) to window_loss[0] without a host sync."""
    t, rank, world = run.train, fabric.global_rank, fabric.world_size
    accum = t.global_batch_size // (t.micro_batch_size * world)
    torch.manual_seed(step_seed(run.seed, step, rank))  # dropout: a function of the step, not of history
    lr = lr_at(step, total, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # real (unpadded) input tokens of the whole global batch: every rank knows every rank's batches
    step_tokens = sum(
        data.train[i].input_ids.numel() - 1
        for r in range(world)
        for b in train_batch_indices(len(data.train), step, run, r)
        for i in b
    )
    for a, idx in enumerate(train_batch_indices(len(data.train), step, run, rank)):
        x, y = collate([data.train[i] for i in idx], data.pad_id)
        x, y = x.to(fabric.device), y.to(fabric.device)
        with fabric.no_backward_sync(model, enabled=a < accum - 1):
            loss, _ = token_loss(model(x[:, :-1]), y)
            fabric.backward(loss / accum)
        window_loss[0] += loss.detach().double() / accum  # no .item(): no host sync per micro-batch
    if t.max_norm is not None:
        fabric.clip_gradients(model, optimizer, max_norm=t.max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, step_tokens


def fit(fabric, run: RunSpec, model: nn.Module, tokenizer, weights) -> dict:
    """Train the parameters of `model` that require grad; `weights` (training.methods) says what is saved.
    Returns the metrics that rank 0 also writes to out_dir/metrics.json."""
    t = run.train
    rank, world = fabric.global_rank, fabric.world_size
    data = prepare_data(fabric, run, tokenizer, model.config.block_size)
    model.max_seq_length = data.max_seq_length
    total = total_steps(len(data.train), run)

    model = fabric.setup_module(model, move_to_device=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(make_optimizer(fabric, run, params))

    if rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run.out_dir / HPARAMS_FILE, yaml.safe_dump(run.hparams, sort_keys=False))
    counters = resume_counters(fabric, run, weights, model, optimizer, len(data.train))
    step, tokens_seen = counters["step"], counters["tokens"]
    if step >= total:
        fabric.print(f"Nothing to do: the checkpoint is at step {step} of {total}")

    metrics: dict[str, Any] = {"total_steps": total, "start_step": step}
    if run.eval.initial_validation and step == 0:
        before = evaluate_and_log(fabric, run, model, tokenizer, data, step=0)
        metrics.update({f"{k}_before": v for k, v in before.items()})

    model.train()
    losses: list[tuple[int, float]] = []
    window_loss = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # (sum of step losses, steps)
    window_tokens, window_t0 = 0, time.perf_counter()
    train_t0, train_tokens, start_step = time.perf_counter(), 0, step
    while step < total:
        lr, step_tokens = train_step(fabric, run, model, optimizer, data, step, total, window_loss)
        step += 1
        window_loss[1] += 1
        window_tokens += step_tokens
        train_tokens += step_tokens
        tokens_seen += step_tokens

        if step % t.log_interval == 0 or step == total:
            stats = fabric.all_reduce(window_loss, reduce_op="sum") if world > 1 else window_loss
            dt = time.perf_counter() - window_t0
            mean_loss = float(stats[0] / stats[1])  # mean over steps and ranks
            entry = {
                "loss": mean_loss,
                "lr": lr,
                "tokens_per_sec": window_tokens / dt,
                "memory_gb": peak_memory_bytes(fabric.device) / 1e9,
                "tokens": tokens_seen,
            }
            fabric.log_dict(entry, step=step)
            losses.append((step, mean_loss))
            fabric.print(
                f"step {step:5d}/{total} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                f"{entry['tokens_per_sec']:,.0f} tokens/sec | {entry['memory_gb']:.2f} GB"
            )
            window_loss.zero_()
            window_tokens, window_t0 = 0, time.perf_counter()

        t_pause = time.perf_counter()
        if step % run.eval.interval == 0 and step < total:
            val = validate(fabric, run, model, data)
            fabric.log_dict({"val_loss": val}, step=step)
            fabric.print(f"step {step}: val loss {val:.4f}")
            sample_answer(fabric, run, model, tokenizer, data)
        if t.save_interval is not None and step % t.save_interval == 0 and step < total:
            c = {
                "step": step,
                "tokens": tokens_seen,
                "num_train_examples": len(data.train),
                "global_batch_size": t.global_batch_size,
                "micro_batch_size": t.micro_batch_size,
                "world_size": world,
                "seed": run.seed,
                "optimizer": run.optimizer,
                "optimizer_class": optimizer_class(optimizer.optimizer),
            }
            path = save_checkpoint_dir(fabric, run, weights, model, optimizer, c)
            fabric.print(f"Saved checkpoint {path}")
        paused = time.perf_counter() - t_pause  # validation and saving are not training throughput
        window_t0 += paused
        train_t0 += paused
    train_s = time.perf_counter() - train_t0

    # the end: validation, accuracy, final weights
    metrics.update(evaluate_and_log(fabric, run, model, tokenizer, data, step=step))
    sample_answer(fabric, run, model, tokenizer, data)

    params = gather_params(model.module, weights.trainable_only())
    metrics["max_rank_divergence"] = rank_divergence(fabric, params) if run.strategy != "fsdp" else None
    metrics.update(
        steps=step,
        train_seconds=train_s,
        tokens_per_sec=train_tokens / train_s if step > start_step and train_s > 0 else None,
        peak_memory_gb=peak_memory_bytes(fabric.device) / 1e9,
        train_losses=losses,
        trainable_parameters=sum(p.numel() for p in params.values()),
        world_size=world,
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
