"""Perplexity with a fixed window and stride, so numbers are comparable across precisions and modes.

Each window of `window` tokens starts `stride` tokens after the previous one; only the tokens not
already scored by an earlier window count (the first window scores all but its first token). With
stride == window the windows do not overlap.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, tokens: torch.Tensor, window: int, stride: Optional[int] = None,
    batch_size: int = 8, progress: bool = False, max_windows: Optional[int] = None,
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
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch in tqdm(batches, desc="Perplexity", disable=not progress, leave=False):
        w = min(window, n)
        x = torch.stack([tokens[s:s + w] for s in batch]).to(device)
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
