"""Perplexity with a fixed window and stride, so numbers are comparable across precisions and modes, and the texts
it is measured on (the bundled held-out split by default). Each window of `window` tokens starts `stride` tokens after
the previous one; only the tokens no earlier window scored count (the first window scores all but its first token)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

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
        raise UserError(
            f"{path}: cannot read it as JSON or JSON lines ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else 'no records'})"
        ) from None
    if len(ds) == 0:
        raise UserError(f"dataset {path} is empty (no records)")
    if text_key not in ds.column_names:
        raise UserError(
            f"{path} has no field {text_key!r} (fields: {', '.join(ds.column_names)}); pass --text_key"
        )
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


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    window: int,
    stride: Optional[int] = None,
    batch_size: int = 8,
    progress: bool = False,
    max_windows: Optional[int] = None,
) -> dict:
    """tokens: 1-D. Returns {"perplexity", "nll", "tokens"} (mean negative log-likelihood in nats)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError("need 0 < stride <= window")
    n = tokens.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window if n > window else 0)
    if max_windows:
        starts = starts[:max_windows]
    total_nll, total_count, scored_until = 0.0, 0, 0
    device = next(model.parameters()).device
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch in tqdm(batches, desc="Perplexity", disable=not progress, leave=False):
        w = min(window, n)
        x = torch.stack([tokens[s : s + w] for s in batch]).to(device)
        logits = model(x[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, w-1)
        for row, s in enumerate(batch):
            # target position p (absolute) = s + 1 + j; count only targets not scored before
            first = max(scored_until - (s + 1), 0)
            total_nll += nll[row, first:].sum().item()
            total_count += nll.size(1) - first
            scored_until = max(scored_until, s + w)
    mean = total_nll / max(total_count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_count}
