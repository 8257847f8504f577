"""`litquant generate` / `python generate/base.py`: sample text from a prompt."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint
from litquant.errors import UserError
from litquant.generation import check_sampling, compiled_decode_step, generate
from litquant.precision import pick_accelerator
from litquant.utils import memory_used_line, weights_line


def main(
    prompt: str = "def fib(",
    *,
    num_samples: int = 1,
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
    """Generate text samples with the model in `checkpoint_dir`.

    Args:
        prompt: the text to continue.
        num_samples: how many samples to draw.
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
        compile: torch.compile the decode step (CUDA).
        quantize_lm_head: quantize the output layer too (bnb modes).
        lora_path: a LoRA adapter from `finetune lora` (the adapter file or the run's out_dir), applied on top of
            the base model in any --precision/--quantize.
        seed: random seed.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    if compile and pick_accelerator(accelerator) != "cuda":
        raise UserError("--compile is for CUDA; on CPU run without it")
    # everything the prompt needs is checked before the (possibly long, quantizing) model load
    checkpoint = Checkpoint.open(checkpoint_dir)
    encoded = checkpoint.tokenizer.encode(prompt)
    if encoded.numel() == 0:
        raise UserError("the prompt is empty after tokenization")
    max_seq = encoded.numel() + max_new_tokens
    if max_seq > checkpoint.config.block_size:
        raise UserError(
            f"prompt ({encoded.numel()} tokens) + --max_new_tokens {max_new_tokens} exceeds the model's context "
            f"of {checkpoint.config.block_size} tokens"
        )
    llm = LLM.load(checkpoint, quantize, precision, lora_path, accelerator, quantize_lm_head)
    model, tokenizer = llm.model, llm.tokenizer
    weights = weights_line(model)  # as loaded (kernels may add a repacked layout on first use)
    encoded = encoded.to(llm.device)
    model.set_kv_cache(batch_size=1, max_seq_length=max_seq, device=llm.device)
    step = compiled_decode_step(model) if compile else None
    torch.manual_seed(seed)

    samples = []
    for i in range(1, num_samples + 1):
        with llm.plugin.forward_context():
            result = generate(
                model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                stop_ids=tokenizer.stop_ids, decode_step=step,
            )
        text = tokenizer.decode(result.tokens)
        samples.append(text)
        print(text, flush=True)
        n = result.new_tokens.numel()
        print(f"Time for inference {i}: {result.total_s:.02f} sec total, {n / result.total_s:.02f} tokens/sec",
              file=sys.stderr, flush=True)
    print(weights, file=sys.stderr)
    print(memory_used_line(llm.device), file=sys.stderr)
    return samples
