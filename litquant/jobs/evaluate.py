"""`litquant evaluate`: perplexity of a checkpoint on a text or JSON dataset (default: the bundled held-out split),
with a fixed window and stride so figures compare across precisions and modes; `litquant benchmark` scores its
perplexity column the same way, so `litquant evaluate --max_tokens N` reproduces it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint
from litquant.errors import UserError
from litquant.evaluation import DEFAULT_BATCH_SIZE, check_window, load_text, perplexity, text_tokens


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    data_path: Optional[Path] = None,
    text_key: str = "text",
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    quantize_lm_head: bool = False,
    lora_path: Optional[Path] = None,
    accelerator: str = "auto",
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    out_file: Optional[Path] = None,
) -> dict:
    """Perplexity of the model on a text or JSON dataset, with a fixed window and stride.

    Args:
        checkpoint_dir: a litquant checkpoint directory (default: the bundled model).
        data_path: a plain text file, or a .json/.jsonl file of records (default: the bundled held-out split).
        text_key: the field of each JSON record that holds its text.
        precision: 32-true, 16-true or bf16-true (default: bf16-true where bf16 is native, i.e. most GPUs and
            recent CPUs, else 16-true on GPUs and 32-true on CPUs).
        quantize: a quantization mode: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8, bnb.int8-training,
            gptq.int2, gptq.int3, gptq.int4 or gptq.int8 (default: none).
        quantize_lm_head: quantize the output layer too (bnb modes).
        lora_path: LoRA adapter weights to apply on top (a finetune run's output).
        accelerator: auto, cuda or cpu.
        window: tokens per scored window (default: min(512, the model's block_size)).
        stride: tokens between window starts (default: window, i.e. no overlap); overlapping windows score only
            the tokens a previous window did not.
        batch_size: windows per forward pass.
        max_tokens: score only the first N tokens of the dataset.
        out_file: also write the result as JSON here.
    """
    from litquant.utils import peak_memory_bytes, weight_bytes

    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if max_tokens is not None and max_tokens < 2:
        raise UserError("--max_tokens must be at least 2")
    # bad data, windows or tokenizer fail before the (possibly long, quantizing) model load
    text, source = load_text(data_path, text_key)
    checkpoint = Checkpoint.open(checkpoint_dir)
    window, stride = check_window(window, stride, checkpoint.config.block_size)
    tokens = text_tokens(checkpoint.tokenizer, text, max_tokens)
    llm = LLM.load(checkpoint, quantize, precision, lora_path, accelerator, quantize_lm_head)
    model, plugin = llm.model, llm.plugin
    n_weight_bytes = weight_bytes(model)  # before a forward: CPU kernels may add layouts of their own
    t0 = time.perf_counter()
    with plugin.forward_context():
        res = perplexity(model, tokens, window, stride, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - t0
    result = {
        "checkpoint_dir": str(checkpoint_dir),
        "model": model.config.name,
        "precision": plugin.precision,
        "quantize": plugin.quantize,
        "lora_path": str(lora_path) if lora_path else None,
        "dataset": source,
        "window": window,
        "stride": stride,
        "dataset_tokens": int(tokens.numel()),
        "tokens_scored": res["tokens"],
        "nll": res["nll"],
        "perplexity": res["perplexity"],
        "seconds": seconds,
        "device": str(llm.device),
        "weight_bytes": n_weight_bytes,
        "peak_memory_bytes": peak_memory_bytes(llm.device),
    }
    print(
        f"Perplexity: {res['perplexity']:.4f} (mean NLL {res['nll']:.4f} nats over {res['tokens']} tokens; "
        f"window {window}, stride {stride}; {plugin.describe()}; {source})"
    )
    print(f"Time: {seconds:.02f} sec, {res['tokens'] / seconds:.01f} tokens/sec", file=sys.stderr)
    if out_file is not None:
        from litquant.io import atomic_write_text

        atomic_write_text(out_file, json.dumps(result, indent=2))
        print(f"Wrote {out_file}", file=sys.stderr)
    return result
