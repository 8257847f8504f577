"""What the training loop measures besides the training loss: the validation loss, greedy exact-match accuracy and a
sample answer. Work is split across ranks, except under FSDP, where every forward is a collective all ranks join."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from litquant.training.data import Data
from litquant.training.run import RunSpec


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross entropy over the answer tokens of a micro-batch, and how many there are."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
    )
    return loss, int((targets != -100).sum())


def split_eval(run: RunSpec, fabric) -> bool:
    """Whether evaluation work is split across ranks (not under FSDP: there every rank runs every forward)."""
    return fabric.world_size > 1 and run.strategy != "fsdp"


@torch.no_grad()
def validate(fabric, run: RunSpec, model, data: Data) -> float:
    """Token-weighted mean loss over the first eval.max_iters validation micro-batches."""
    from litquant.data.instructions import collate

    model.eval()
    m = run.train.micro_batch_size
    batches = [data.val[i : i + m] for i in range(0, len(data.val), m)]
    if run.eval.max_iters is not None:
        batches = batches[: run.eval.max_iters]
    split = split_eval(run, fabric)
    total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    for batch in batches[fabric.global_rank :: fabric.world_size] if split else batches:
        x, y = collate(batch, data.pad_id)
        x, y = x.to(fabric.device), y.to(fabric.device)
        loss, n = token_loss(model(x[:, :-1]), y)
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=fabric.device)
    if split:
        total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def exact_match_accuracy(fabric, run: RunSpec, model, tokenizer, data: Data) -> float:
    """Greedy exact match on the first eval.exact_match_examples validation examples."""
    from litquant.data.instructions import exact_match

    examples = data.val_examples[: run.eval.exact_match_examples]
    sharded = split_eval(run, fabric)
    mine = examples[fabric.global_rank :: fabric.world_size] if sharded else examples
    with run.plugin.forward_context():
        acc, _ = exact_match(model.module, tokenizer, data.style, mine)
    counts = torch.tensor([acc * len(mine), len(mine)], dtype=torch.float64, device=fabric.device)
    if sharded:
        counts = fabric.all_reduce(counts, reduce_op="sum")
    model.train()
    return float(counts[0] / counts[1].clamp(min=1))


def sample_answer(fabric, run: RunSpec, model, tokenizer, data: Data) -> None:
    """Print the greedy answer (up to eval.sample_max_new_tokens) to the first validation example."""
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


def evaluate_and_log(fabric, run: RunSpec, model, tokenizer, data: Data, step: int) -> dict:
    """Validation loss, and exact match when eval.exact_match_examples: logged at `step`, printed in one line."""
    log = {"val_loss": validate(fabric, run, model, data)}
    if run.eval.exact_match_examples:
        log["exact_match"] = exact_match_accuracy(fabric, run, model, tokenizer, data)
    fabric.log_dict(log, step=step)
    fabric.print(
        f"step {step}: val loss {log['val_loss']:.4f}"
        + (f", exact match {log['exact_match']:.3f}" if "exact_match" in log else "")
    )
    return log
