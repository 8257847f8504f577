"""`litquant pretrain` / `python pretrain/base.py`: train a small GPT from scratch on the bundled corpus (how the
bundled model is made). Seeded and reproducible for a given Python standard library: tokenizer training, document
split, batch sampling and initialisation all derive from `--seed`."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from litquant.checkpoint import save_checkpoint
from litquant.config import CONFIG_FILE, WEIGHTS_FILE, Config
from litquant.data.corpus import DOC_SEPARATOR, corpus_documents, write_heldout
from litquant.errors import UserError
from litquant.evaluation import perplexity
from litquant.io import atomic_write_text
from litquant.model import GPT
from litquant.precision import setup_fabric
from litquant.tokenizer import Tokenizer, train_bpe_tokenizer
from litquant.training.optim import warmup_cosine
from litquant.utils import memory_used_line, num_parameters


def tokenize_documents(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, bos=False).tolist()
        ids.append(tokenizer.eos_id)  # document boundary
    return torch.tensor(ids, dtype=torch.long)


def main(
    out_dir: Path = Path("out/pretrain/litquant-tiny"),
    model_name: str = "litquant-tiny",
    vocab_size: int = 4096,
    max_steps: int = 3000,
    micro_batch_size: int = 16,
    seq_len: int = 256,
    learning_rate: float = 3e-3,
    min_lr: float = 3e-4,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_interval: int = 500,
    precision: str = "bf16-mixed",
    accelerator: str = "auto",
    save_dtype: str = "bfloat16",
    write_heldout_split: bool = False,
    overwrite: bool = False,
    seed: int = 1337,
) -> dict:
    """Train the bundled model: BPE tokenizer + Llama-style GPT on the standard library and pydoc topics.

    Args:
        out_dir: the checkpoint directory to write (the bundled model is litquant/data/bundled/litquant-tiny).
        model_name: a named config (`litquant.config`); its vocab size is replaced by `vocab_size`.
        vocab_size: BPE vocabulary size.
        max_steps: optimizer steps.
        micro_batch_size: sequences per step.
        seq_len: tokens per sequence.
        learning_rate: peak learning rate (AdamW), cosine decay to `min_lr` after `warmup_steps`.
        min_lr: final learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay on matrices.
        grad_clip: gradient norm clipping.
        eval_interval: steps between held-out evaluations.
        precision: training precision (bf16-mixed, 32-true, ...).
        accelerator: auto, cuda or cpu.
        save_dtype: dtype of the saved weights (bfloat16 keeps the bundled file small).
        write_heldout_split: also (re)write litquant/data/bundled/heldout.txt from this Python's stdlib.
        overwrite: replace a checkpoint already in out_dir (without it, that is an error).
        seed: the seed everything derives from.
    """
    if max_steps < 1 or micro_batch_size < 1:
        raise UserError("--max_steps and --micro_batch_size must be positive")
    Config.from_name(model_name)  # fail fast on an unknown name, before any work
    out_dir = Path(out_dir)
    if not overwrite and any((out_dir / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        raise UserError(
            f"{out_dir} already holds a checkpoint: pass --overwrite true to replace it, or another --out_dir"
        )
    fabric, plugin = setup_fabric(precision, None, accelerator=accelerator)
    fabric.seed_everything(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_docs, heldout_docs = corpus_documents()
    if write_heldout_split:
        write_heldout(heldout_docs)
    t0 = time.perf_counter()
    tokenizer = train_bpe_tokenizer(train_docs, vocab_size, out_dir)
    train_ids = tokenize_documents(tokenizer, train_docs)
    val_ids = tokenizer.encode(DOC_SEPARATOR.join(heldout_docs), bos=False)
    fabric.print(
        f"Tokenizer trained in {time.perf_counter() - t0:.1f}s: {train_ids.numel():,} train tokens, "
        f"{val_ids.numel():,} held-out tokens"
    )

    config = Config.from_name(model_name, vocab_size=tokenizer.vocab_size, padded_vocab_size=None)
    if seq_len > config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the model's block_size {config.block_size}")
    model = GPT(config)
    model.init_weights()
    fabric.print(f"Model {config.name}: {num_parameters(model):,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
        fused=False,
    )
    model, optimizer = fabric.setup(model, optimizer)
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        model.eval()
        with fabric._precision.forward_context():
            ppl = perplexity(model, val_ids, window=seq_len, batch_size=micro_batch_size)["perplexity"]
        model.train()
        return ppl

    def lr_at(step: int) -> float:
        return warmup_cosine(step, max_steps, learning_rate, min_lr, warmup_steps)

    history = []
    t_start = time.perf_counter()
    model.train()
    for step in range(max_steps):
        starts = torch.randint(0, train_ids.numel() - seq_len - 1, (micro_batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + seq_len + 1] for s in starts]).to(fabric.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == max_steps - 1:
            elapsed = time.perf_counter() - t_start
            fabric.print(
                f"step {step:5d} | loss {loss.item():.4f} | lr {lr_at(step):.2e} | "
                f"{(step + 1) * micro_batch_size * seq_len / elapsed:,.0f} tokens/sec"
            )
        if (step + 1) % eval_interval == 0 and step + 1 < max_steps:
            ppl = evaluate()
            history.append({"step": step + 1, "heldout_perplexity": ppl})
            fabric.print(f"step {step + 1}: held-out perplexity {ppl:.2f}")

    ppl = evaluate()
    history.append({"step": max_steps, "heldout_perplexity": ppl})
    train_s = time.perf_counter() - t_start
    fabric.print(
        f"Training took {train_s:.1f}s; held-out perplexity {ppl:.2f} (a uniform guess: {config.vocab_size})"
    )
    state = {k: v.to(getattr(torch, save_dtype)) for k, v in model.state_dict().items()}
    save_checkpoint(state, config, out_dir)
    import json

    summary = {
        "model": config.name,
        "parameters": num_parameters(model),
        "max_steps": max_steps,
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "train_seconds": round(train_s, 1),
        "heldout_perplexity": round(ppl, 3),
        "eval_precision": precision,
        "history": history,
    }
    atomic_write_text(out_dir / "pretrain_summary.json", json.dumps(summary, indent=2))
    fabric.print(memory_used_line(fabric.device))
    return summary
