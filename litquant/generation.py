"""Sampling and the token loop shared by generate, chat, finetune's sample output and benchmark.

Prefill runs the prompt through the model once and fills the KV cache; each decode step then feeds a
single token at its position. `generate` returns the tokens and the time split between the two, so
`benchmark` can report prefill and decode speed separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from litquant.errors import UserError

from litquant.model import GPT


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling flags every generating job takes, checked before any model loads."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B, 1). temperature 0 = greedy."""
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
    return torch.multinomial(probs, num_samples=1, generator=generator)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (T_prompt + T_new,) prompt followed by the generated tokens
    prompt_len: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes after prefill
    stopped: bool = False  # hit a stop token

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[self.prompt_len:]

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    stop_sequences: Sequence[Sequence[int]] = (),
    decode_step: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (1-D); see `stream` for the arguments."""
    result = GenerationResult(prompt, prompt.size(0))
    for _ in stream(model, prompt, max_new_tokens, result, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_ids=stop_ids, stop_sequences=stop_sequences, decode_step=decode_step, generator=generator):
        pass
    return result


def stream(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    result: GenerationResult,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    stop_sequences: Sequence[Sequence[int]] = (),
    decode_step: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield new token ids as they are sampled, filling `result` (tokens, timings) as it goes.

    The caller sets up the KV cache (`model.set_kv_cache(1, max_seq_length)` with room for prompt + new
    tokens). A token in `stop_ids` or a completed `stop_sequences` entry ends generation; tokens that may
    be the start of a stop sequence are held back until it is clear they are not, so a caller printing
    the stream never shows a stop marker. `decode_step(x, input_pos)` may replace the plain single-token
    forward (e.g. a compiled one)."""
    device = prompt.device
    T = prompt.size(0)
    if T + max_new_tokens > model.max_seq_length:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) > max_seq_length {model.max_seq_length}")
    stop = set(int(i) for i in stop_ids) | {int(s[0]) for s in stop_sequences if len(s) == 1}
    sequences = [list(map(int, s)) for s in stop_sequences if len(s) > 1]
    out = torch.empty(T + max_new_tokens, dtype=prompt.dtype, device=device)
    out[:T] = prompt
    result.tokens, result.prompt_len = out[:T], T

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(prompt.view(1, -1), torch.arange(T, device=device), T)[:, -1]
        token = sample(logits, temperature, top_k, top_p, generator)
        _sync(device)
        t1 = time.perf_counter()
    result.prefill_s = t1 - t0

    step = decode_step or (lambda x, pos: model(x, pos, int(pos[-1]) + 1)[:, -1])
    input_pos = torch.tensor([T], device=device)
    generated: list[int] = []
    pending: list[int] = []  # held back: might be the start of a stop sequence
    while True:
        out[T + len(generated)] = token.view(())
        tok = int(token)  # one host sync per token: needed to stop at EOS and to stream
        generated.append(tok)
        result.tokens = out[: T + len(generated)]
        if tok in stop:
            result.stopped = True
            break
        pending.append(tok)
        if any(generated[-len(s):] == s for s in sequences):
            result.stopped = True
            break
        if not any(_is_partial_match(pending, s) for s in sequences):
            yield from pending
            pending = []
        if len(generated) >= max_new_tokens:
            break
        with torch.inference_mode():
            logits = step(token.view(1, 1), input_pos)
            token = sample(logits, temperature, top_k, top_p, generator)
        input_pos = input_pos + 1
        result.decode_steps += 1
    if not result.stopped:
        yield from pending
    _sync(device)
    result.decode_s = time.perf_counter() - t1


def _is_partial_match(pending: list[int], seq: list[int]) -> bool:
    """Does some suffix of `pending` start `seq` (so it may complete into a stop sequence)?"""
    return any(pending[-k:] == seq[:k] for k in range(1, min(len(pending), len(seq) - 1) + 1))


def compiled_decode_step(model: GPT) -> Callable:
    """A torch.compile'd single-token step over the full static KV cache (CUDA)."""

    def step(x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return model(x, input_pos)[:, -1]

    return torch.compile(step, mode="reduce-overhead", fullgraph=True)
