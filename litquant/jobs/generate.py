"""`litquant generate` / `python generate/base.py`: complete one prompt or many (`--prompt` repeated,
`--prompts_file`), `--batch_size` at a time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Union

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint
from litquant.errors import UserError
from litquant.generation import compiled_decode_step, run
from litquant.precision import pick_accelerator
from litquant.sampling import check_sampling
from litquant.utils import memory_used_line, weights_line


def main(
    prompt: Union[str, list[str]] = "def fib(",
    *,
    prompts_file: Optional[Path] = None,
    num_samples: int = 1,
    batch_size: int = 8,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    compile: bool = False,
    quantize_lm_head: bool = False,
    lora_path: Optional[Path] = None,
    seed: int = 1234,
) -> list[str]:
    """Generate text with the model in `checkpoint_dir`: prints each prompt followed by its completion.

    Args:
        prompt: the text to continue; repeat the flag for several prompts (`--prompt a --prompt b`).
        prompts_file: prompts to complete instead, one per line (a .jsonl file: one JSON string or {"prompt": ...}
            per line, for prompts with newlines).
        num_samples: samples per prompt.
        batch_size: sequences generated at once (a new one starts whenever one finishes); greedy results do not
            depend on it.
        max_new_tokens: how many tokens to generate at most (stops early at an end-of-sequence token).
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only (None: all).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p.
        checkpoint_dir: a litquant checkpoint directory (default: the bundled model).
        quantize: a quantization mode: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8, bnb.int8-training,
            gptq.int2, gptq.int3, gptq.int4 or gptq.int8 (default: none).
        precision: 32-true, 16-true or bf16-true (default: the fastest on this machine: bf16-true where the GPU or
            CPU computes in bf16 natively, else 16-true on GPUs and 32-true on CPUs; gptq.int4 prefers bf16 on
            AVX-512 CPUs).
        accelerator: auto, cuda or cpu.
        compile: torch.compile the decode step (CUDA, one sequence at a time: --batch_size 1).
        quantize_lm_head: quantize the output layer too (bnb modes).
        lora_path: a LoRA adapter from `finetune lora` (the adapter file or the run's out_dir), applied on top of
            the base model in any --precision/--quantize.
        seed: random seed (sample i of the run draws from its own generator seeded seed + i).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if compile and pick_accelerator(accelerator) != "cuda":
        raise UserError("--compile is for CUDA; on CPU run without it")
    if compile and batch_size != 1:
        raise UserError("--compile runs one sequence at a time: add --batch_size 1")
    prompts = (
        read_prompts(prompts_file)
        if prompts_file is not None
        else ([prompt] if isinstance(prompt, str) else list(prompt))
    )
    if not prompts:
        raise UserError("no prompts given")
    # everything the prompts need is checked before the (possibly long, quantizing) model load
    checkpoint = Checkpoint.open(checkpoint_dir)
    encoded = []
    for i, p in enumerate(prompts):
        ids = checkpoint.tokenizer.encode(p).tolist()
        if not ids:
            raise UserError(f"prompt {i + 1} is empty after tokenization")
        if len(ids) + max_new_tokens > checkpoint.config.block_size:
            raise UserError(
                f"prompt {i + 1} ({len(ids)} tokens) + --max_new_tokens {max_new_tokens} exceeds the "
                f"model's context of {checkpoint.config.block_size} tokens"
            )
        encoded += [ids] * num_samples
    llm = LLM.load(checkpoint, quantize, precision, lora_path, accelerator, quantize_lm_head)
    weights = weights_line(llm.model)  # as loaded (kernels may add a repacked layout on first use)
    seqs = llm.sequences(encoded, max_new_tokens, temperature, top_k, top_p, seed=seed)
    decoder = llm.decoder(min(batch_size, len(seqs)), max(len(ids) for ids in encoded) + max_new_tokens)
    if compile:
        decoder.decode_step = compiled_decode_step(llm.model)

    t0 = time.perf_counter()
    with llm.plugin.forward_context():
        for _ in run(decoder, seqs):
            pass
    elapsed = time.perf_counter() - t0
    texts = []
    for i, s in enumerate(seqs, 1):
        text = llm.tokenizer.decode(s.prompt + s.tokens)
        texts.append(text)
        print(text, flush=True)
        took = s.t_done - s.t_added
        print(
            f"Time for inference {i}: {took:.02f} sec total, {len(s.tokens) / took:.02f} tokens/sec",
            file=sys.stderr,
            flush=True,
        )
    if len(seqs) > 1:
        n = sum(len(s.tokens) for s in seqs)
        print(
            f"All {len(seqs)} sequences, {min(batch_size, len(seqs))} at a time: {elapsed:.02f} sec total, "
            f"{n / elapsed:.02f} tokens/sec",
            file=sys.stderr,
        )
    print(weights, file=sys.stderr)
    print(memory_used_line(llm.device), file=sys.stderr)
    return texts


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; a .jsonl file holds one JSON string or {"prompt": ...} object per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts_file {str(path)!r} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
        item = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(item, str):
            raise UserError(f'{path}:{n}: expected a JSON string or an object with a "prompt" string')
        prompts.append(item)
    return prompts
