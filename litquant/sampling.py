"""Sampling the next token from logits (greedy, temperature, top-k, top-p), and the checks of those flags."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from litquant.errors import UserError


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling flags every generating job takes, checked before any model loads."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Union[None, torch.Generator, Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B, 1). temperature 0 = greedy. `generator`: one for
    all rows, or one per row (None: torch's global one), so a row's draws do not depend on the other rows."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # inverse transform: one uniform draw per row (its own generator's) against the row's cumulative distribution
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.size(0), generator=generator, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    return idx.clamp_(max=probs.size(-1) - 1)
