"""Generate text from a prompt: `python generate/base.py --prompt ...` == `litquant generate --prompt ...`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


if __package__ in (None, ""):  # `python generate/base.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, check_checkpoint_dir, load_model
from litquant.config import Config
from litquant.errors import UserError, run_job
from litquant.generation import check_sampling, compiled_decode_step, generate
from litquant.precision import pick_accelerator, setup_fabric
from litquant.tokenizer import Tokenizer
from litquant.utils import configure_cpu_threads, memory_used_line, reset_peak_memory, weights_line


def setup_model(
    checkpoint_dir: Path,
    precision: Optional[str],
    quantize: Optional[str],
    accelerator: str = "auto",
    quantize_lm_head: bool = False,
    lora_path: Optional[Path] = None,
):
    """Fabric + precision plugin + model loaded on the device (shared by generate, chat, evaluate).
    `lora_path`: a LoRA adapter (file or finetune out_dir) to apply on top of the base, whatever its precision."""
    options = {"quantize_lm_head": True} if quantize_lm_head else {}
    fabric, plugin = setup_fabric(precision, quantize, accelerator=accelerator, **options)
    reset_peak_memory(fabric.device)
    if lora_path is not None:  # a bad adapter path or file fails before the base model loads
        from litquant.lora import read_lora_metadata

        read_lora_metadata(lora_path)
    model = load_model(checkpoint_dir, plugin, fabric.device)
    if lora_path is not None:
        from litquant.lora import load_lora

        load_lora(model, lora_path, dtype=plugin.dtype)
        model.eval()
    configure_cpu_threads(model, fabric.device)
    model = fabric.setup_module(model, move_to_device=False)
    return fabric, plugin, model


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
        quantize: a quantization mode (see `litquant quantize_modes`), e.g. bnb.nf4, bnb.int8, gptq.int4.
        precision: 32-true, 16-true or bf16-true (default: bf16-true where the GPU or CPU computes in bf16 natively, else 16-true on GPUs and 32-true on CPUs).
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
    check_checkpoint_dir(checkpoint_dir, None)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    tokenizer = Tokenizer(checkpoint_dir)
    encoded = tokenizer.encode(prompt)
    if encoded.numel() == 0:
        raise UserError("the prompt is empty after tokenization")
    max_seq = encoded.numel() + max_new_tokens
    if max_seq > block_size:
        raise UserError(
            f"prompt ({encoded.numel()} tokens) + --max_new_tokens {max_new_tokens} exceeds the model's context "
            f"of {block_size} tokens"
        )
    fabric, plugin, model = setup_model(checkpoint_dir, precision, quantize, accelerator, quantize_lm_head, lora_path)
    weights = weights_line(model)  # as loaded (kernels may add a repacked layout on first use)
    encoded = encoded.to(fabric.device)
    model.set_kv_cache(batch_size=1, max_seq_length=max_seq, device=fabric.device)
    step = compiled_decode_step(model) if compile else None
    fabric.seed_everything(seed, verbose=False)

    samples = []
    for i in range(1, num_samples + 1):
        with plugin.forward_context():
            result = generate(
                model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                stop_ids=tokenizer.stop_ids, decode_step=step,
            )
        text = tokenizer.decode(result.tokens)
        samples.append(text)
        fabric.print(text)
        n = result.new_tokens.numel()
        fabric.print(
            f"Time for inference {i}: {result.total_s:.02f} sec total, {n / result.total_s:.02f} tokens/sec",
            file=sys.stderr,
        )
    fabric.print(weights, file=sys.stderr)
    fabric.print(memory_used_line(fabric.device), file=sys.stderr)
    return samples


if __name__ == "__main__":
    run_job(main)
