"""Perplexity of a checkpoint: `litquant evaluate --checkpoint_dir ... [--quantize bnb.nf4] [--data_path file]`.

The text is one token stream (documents joined by a blank line), scored with a fixed `--window` and
`--stride` (litquant.evaluation.perplexity), so figures are comparable across precisions and quantization
modes. Default data: the bundled held-out split (standard-library modules the bundled model never saw).
`litquant benchmark` computes its perplexity column with `heldout_tokens` and `perplexity` from here, with
the same defaults, so `litquant evaluate --max_tokens N` reproduces it exactly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, check_checkpoint_dir
from litquant.config import Config
from litquant.errors import UserError

DEFAULT_WINDOW = 512  # capped by the model's block_size
DEFAULT_BATCH_SIZE = 4
JSON_SUFFIXES = (".json", ".jsonl")


def default_window(block_size: int) -> int:
    return min(DEFAULT_WINDOW, block_size)


def load_text(data_path: Optional[Path], text_key: str = "text") -> tuple[str, str]:
    """(text, a name for the source). JSON/JSONL through `datasets` (a list of records, JSON lines or a list of
    strings): the `text_key` field of every record, joined by blank lines. Any other file is read as UTF-8 text."""
    from litquant.data.corpus import DOC_SEPARATOR, HELDOUT_FILE, heldout_text

    if data_path is None:
        return heldout_text(), f"bundled held-out split ({HELDOUT_FILE.name})"
    path = Path(data_path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"dataset {path} is empty")
    if path.suffix.lower() not in JSON_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text (use a .txt, .json or .jsonl file)") from None
    else:
        docs = _json_documents(path, text_key)
        text = DOC_SEPARATOR.join(docs)
    if not text.strip():
        raise UserError(f"dataset {path} is empty (no text)")
    return text, str(path)


def _json_documents(path: Path, text_key: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # datasets wraps pyarrow's parse errors in several types; all mean "bad file"
        cause = e.__cause__ or e
        raise UserError(f"{path}: cannot read it as JSON or JSON lines ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else 'no records'})") from None
    if len(ds) == 0:
        raise UserError(f"dataset {path} is empty (no records)")
    if text_key not in ds.column_names:
        raise UserError(f"{path} has no field {text_key!r} (fields: {', '.join(ds.column_names)}); pass --text_key")
    docs = ds[text_key]
    bad = next((d for d in docs if d is not None and not isinstance(d, str)), None)
    if bad is not None:
        raise UserError(f"{path}: field {text_key!r} must hold strings, found {type(bad).__name__}")
    return [d for d in docs if d]


def text_tokens(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    tokens = tokenizer.encode(text)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise UserError(f"the text is {tokens.numel()} token(s) long: perplexity needs at least 2")
    return tokens


def heldout_tokens(tokenizer, max_tokens: Optional[int] = None) -> torch.Tensor:
    """The first `max_tokens` tokens of the bundled held-out split (what benchmark scores)."""
    text, _ = load_text(None)
    return text_tokens(tokenizer, text, max_tokens)


def check_window(window: Optional[int], stride: Optional[int], block_size: int) -> tuple[int, int]:
    window = window or default_window(block_size)
    if window < 2:
        raise UserError(f"--window must be at least 2, got {window}")
    if window > block_size:
        raise UserError(f"--window {window} exceeds the model's context of {block_size} tokens")
    stride = stride or window
    if not 0 < stride <= window:
        raise UserError(f"--stride must be between 1 and --window ({window}), got {stride}")
    return window, stride


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
        quantize: a quantization mode, e.g. bnb.nf4, bnb.int8, gptq.int4.
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
    from generate.base import setup_model
    from litquant.evaluation import perplexity
    from litquant.tokenizer import Tokenizer
    from litquant.utils import peak_memory_bytes, weight_bytes

    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if max_tokens is not None and max_tokens < 2:
        raise UserError("--max_tokens must be at least 2")
    # bad data, windows or tokenizer fail before the (possibly long, quantizing) model load
    text, source = load_text(data_path, text_key)
    check_checkpoint_dir(checkpoint_dir, None)
    window, stride = check_window(window, stride, Config.from_checkpoint(checkpoint_dir).block_size)
    tokens = text_tokens(Tokenizer(checkpoint_dir), text, max_tokens)
    fabric, plugin, model = setup_model(Path(checkpoint_dir), precision, quantize, accelerator, quantize_lm_head,
                                        lora_path)
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
        "device": str(fabric.device),
        "weight_bytes": n_weight_bytes,
        "peak_memory_bytes": peak_memory_bytes(fabric.device),
    }
    fabric.print(
        f"Perplexity: {res['perplexity']:.4f} (mean NLL {res['nll']:.4f} nats over {res['tokens']} tokens; "
        f"window {window}, stride {stride}; {plugin.describe()}; {source})"
    )
    fabric.print(f"Time: {seconds:.02f} sec, {res['tokens'] / seconds:.01f} tokens/sec", file=sys.stderr)
    if out_file is not None:
        from litquant.checkpoint import atomic_write_text

        atomic_write_text(out_file, json.dumps(result, indent=2))
        fabric.print(f"Wrote {out_file}", file=sys.stderr)
    return result


if __name__ == "__main__":
    from litquant.errors import run_job

    run_job(main)
