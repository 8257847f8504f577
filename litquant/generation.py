"""The token loop: prefill, then decode one token at a time, for many sequences at once.

Each sequence decodes at its own position and may join or leave between any two decode steps (continuous
batching). `LLM.generate`, `litquant generate`, `serve`, `chat`, `benchmark` and finetuning's samples all run
it; `generate` below is the batch of one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional
from typing import Sequence as Seq

import torch

from litquant.sampling import sample

if TYPE_CHECKING:
    from litquant.model import GPT
    from litquant.tokenizer import StreamDecoder


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None  # its own generator: the same tokens whatever else is in the batch
    stop_ids: frozenset = frozenset()  # token ids that end it (eos, <|eot_id|>): never part of the text
    stop_sequences: tuple = ()  # token id sequences that end it (held back until they cannot be one)
    stop: tuple = ()  # strings that end it (held back until they cannot be one; not part of the text)

    def key(self) -> tuple:
        return (self.temperature, self.top_k, self.top_p)


@dataclass(eq=False)
class Sequence:
    """One request's state: its prompt, tokens so far, text so far and why it finished."""

    prompt: list[int]
    params: SamplingParams
    decoder: Optional["StreamDecoder"] = None  # text out (and `stop` strings) need one
    on_update: Optional[Callable[["Sequence"], None]] = None  # called after every step that changed it
    tokens: list[int] = field(default_factory=list)  # generated ids, stop id included
    text: str = ""  # released text
    delta: str = ""  # text released by the last step
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None
    cancelled: bool = False  # set from any thread: the engine drops it before the next step
    generator: Optional[torch.Generator] = (
        None  # default: one seeded with params.seed, else torch's global one
    )
    t_added: float = 0.0
    t_first: float = 0.0  # when its first token was sampled
    t_done: float = 0.0
    _held_ids: list[int] = field(default_factory=list)
    _held_text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """The position of the next token to feed (its last sampled token's)."""
        return len(self.prompt) + len(self.tokens) - 1

    def _push(self, token: int, max_seq_length: int) -> None:
        """Take a sampled token."""
        self.tokens.append(token)
        self.delta = ""
        p = self.params
        if token in p.stop_ids:
            return self._finish("stop")
        self._held_ids.append(token)
        if any(self.tokens[-len(s) :] == list(s) for s in p.stop_sequences):
            self._held_ids = []
            return self._finish("stop")
        if not any(_partial(self._held_ids, s) for s in p.stop_sequences):
            self._release_ids()
            if self.finished:
                return
        if len(self.tokens) >= p.max_new_tokens or self.position >= max_seq_length:
            self._finish("length")

    def _release_ids(self) -> None:
        ids, self._held_ids = self._held_ids, []
        if self.decoder is None:
            return
        held = self._held_text + "".join(self.decoder.step(i) for i in ids)
        for s in self.params.stop:
            at = held.find(s)
            if at >= 0:
                self._emit(held[:at])
                self._held_text = ""
                return self._finish("stop")
        keep = max(
            (
                k
                for s in self.params.stop
                for k in range(1, min(len(s), len(held) + 1))
                if held.endswith(s[:k])
            ),
            default=0,
        )
        self._emit(held[: len(held) - keep])
        self._held_text = held[len(held) - keep :]

    def _emit(self, text: str) -> None:
        self.text += text
        self.delta += text

    def _finish(self, reason: str) -> None:
        if reason != "stop":
            if self._held_ids:  # ids held for a stop sequence that never completed
                self._release_ids()
            if self.decoder is not None:
                self._emit(self._held_text + self.decoder.flush())
                self._held_text = ""
        self.finish_reason = reason
        self.t_done = time.perf_counter()


def _partial(held: list[int], seq: Seq[int]) -> bool:
    """Does some suffix of `held` start `seq` (so it may still complete into it)?"""
    return any(held[-k:] == list(seq[:k]) for k in range(1, min(len(held), len(seq) - 1) + 1))


class BatchDecoder:
    """Runs up to `max_batch_size` sequences through `model` with one KV cache row each.

    `add` prefills new sequences (together) and samples their first token; `step` decodes one token for every
    active sequence. Active sequences own cache rows 0..n-1: a sequence that finishes hands its row to the last
    one, so finished sequences cost nothing. Not thread-safe: one thread drives it (set `cancelled` from others).
    """

    def __init__(
        self,
        model: "GPT",
        max_batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        decode_step: Optional[Callable] = None,
    ) -> None:
        self.model, self.max_batch_size = model, max_batch_size
        self.device = device or model.lm_head.weight.device
        max_seq_length = max_seq_length or model.config.block_size
        cache = model.transformer.h[0].attn.kv_cache
        if (
            cache is None
            or cache.k.shape[0] < max_batch_size
            or model.max_seq_length != max_seq_length
            or cache.k.device != self.device
        ):
            model.set_kv_cache(max_batch_size, max_seq_length, self.device)
        self.max_seq_length = model.max_seq_length
        self.decode_step = decode_step  # replaces the single-sequence decode forward (e.g. a compiled one)
        self.active: list[Sequence] = []
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0

    @property
    def free(self) -> int:
        return self.max_batch_size - len(self.active)

    def check(self, prompt_len: int, max_new_tokens: int) -> Optional[str]:
        """Why a sequence cannot run here (None: it can)."""
        if prompt_len < 1:
            return "the prompt is empty"
        if prompt_len + max_new_tokens > self.max_seq_length:
            return (
                f"prompt ({prompt_len} tokens) + max new tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_seq_length} tokens"
            )
        return None

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill `seqs` (at most `free`) in one forward and sample their first tokens; returns them."""
        if not seqs:
            return []
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences but only {self.free} free rows")
        t0 = time.perf_counter()
        for s in seqs:
            reason = self.check(len(s.prompt), s.params.max_new_tokens)
            if reason:
                raise ValueError(reason)
            s.t_added = s.t_added or t0
            if s.generator is None and s.params.seed is not None:
                s.generator = torch.Generator(self.device).manual_seed(s.params.seed)
        # one forward per prompt length: no padding, so no layer ever sees another row's padding (LLM.int8 finds
        # its outlier columns over a sequence's tokens)
        by_length: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_length.setdefault(len(s.prompt), []).append(s)
        for length, group in by_length.items():
            first, n = len(self.active), len(group)
            idx = torch.tensor([s.prompt for s in group], device=self.device)
            pos = torch.arange(length, device=self.device)
            logits = self.model(idx, pos, length, rows=slice(first, first + n))[:, -1]
            self.active += group
            self._sample_and_push(logits, group)
        self.prefill_s += time.perf_counter() - t0
        for s in seqs:
            s.t_first = time.perf_counter()
        self._retire()
        return seqs

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One decode step for every active sequence; returns the sequences it advanced or dropped (cancelled)."""
        dropped = self._retire()
        seqs = list(self.active)
        if not seqs:
            return dropped
        t0 = time.perf_counter()
        x = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        positions = [s.position for s in seqs]
        maxp1 = max(positions) + 1
        if len(seqs) == 1:
            pos = torch.tensor(positions, device=self.device)
            logits = self.decode_step(x, pos) if self.decode_step else self.model(x, pos, maxp1)[:, -1]
        else:
            pos = torch.tensor(positions, device=self.device).unsqueeze(1)
            logits = self.model(x, pos, maxp1)[:, -1]
        self._sample_and_push(logits, seqs)
        self.decode_s += time.perf_counter() - t0
        self.decode_steps += 1
        self._retire()
        return dropped + seqs

    def _sample_and_push(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        groups: dict[tuple, list[int]] = {}  # rows with the same settings sample together
        for i, s in enumerate(seqs):
            groups.setdefault(s.params.key(), []).append(i)
        tokens = [0] * len(seqs)
        for (temperature, top_k, top_p), rows in groups.items():
            gens = [seqs[i].generator for i in rows]
            rows_logits = logits if len(rows) == len(seqs) else logits[rows]
            out = sample(
                rows_logits, temperature, top_k, top_p, gens if any(g is not None for g in gens) else None
            )
            for i, t in zip(rows, out.view(-1).tolist()):
                tokens[i] = t
        for s, t in zip(seqs, tokens):
            if not s.finished:
                s._push(t, self.max_seq_length)
            if s.on_update is not None:
                s.on_update(s)

    def _retire(self) -> list[Sequence]:
        """Drop finished and cancelled sequences (returns the cancelled ones); the last active row moves into each
        freed row."""
        i, cancelled = 0, []
        while i < len(self.active):
            s = self.active[i]
            if s.cancelled and not s.finished:
                s._finish("cancelled")
                cancelled.append(s)
                if s.on_update is not None:
                    s.on_update(s)
            if not s.finished:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                moved = self.active[last]
                self.model.move_kv_rows(last, i, moved.position + 1)
                self.active[i] = moved
            self.active.pop()
        return cancelled

    def cancel_all(self) -> None:
        for s in self.active:
            s.cancelled = True
        self._retire()


def run(decoder: BatchDecoder, seqs: Iterable[Sequence]) -> Iterator[Sequence]:
    """Drive `decoder` over `seqs`: new ones join as rows free up; yields every sequence each time it advances
    (read `delta`, `finished`). Sequences finish in any order."""
    waiting = list(seqs)[::-1]
    while waiting or decoder.active:
        if waiting and decoder.free:
            batch = [waiting.pop() for _ in range(min(decoder.free, len(waiting)))]
            yield from decoder.add(batch)
            continue
        yield from decoder.step()


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (T_prompt + T_new,) prompt followed by the generated tokens
    prompt_len: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes after prefill
    stopped: bool = False  # hit a stop token or sequence

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[self.prompt_len :]

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def generate(
    model: "GPT",
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    stop_sequences: Seq[Seq[int]] = (),
    decode_step: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> GenerationResult:
    """Up to `max_new_tokens` after `prompt` (1-D ids), one sequence, with prefill and decode timed apart. The KV
    cache is the model's if it has one of the right length (`model.set_kv_cache`), else one for the prompt and
    the new tokens. `decode_step(x, input_pos)` may replace the decode forward (e.g. a compiled one)."""
    cache = model.transformer.h[0].attn.kv_cache
    max_seq = model.max_seq_length if cache is not None else prompt.numel() + max_new_tokens
    decoder = BatchDecoder(model, 1, max_seq, prompt.device, decode_step)
    seq = Sequence(
        prompt.tolist(),
        SamplingParams(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop_ids=frozenset(int(i) for i in stop_ids),
            stop_sequences=tuple(tuple(map(int, s)) for s in stop_sequences),
        ),
        generator=generator,
    )
    if decoder.check(len(seq.prompt), max_new_tokens):
        raise ValueError(decoder.check(len(seq.prompt), max_new_tokens))
    for _ in run(decoder, [seq]):
        pass
    _sync(prompt.device)
    tokens = torch.tensor(seq.prompt + seq.tokens, dtype=prompt.dtype, device=prompt.device)
    return GenerationResult(
        tokens,
        len(seq.prompt),
        decoder.prefill_s,
        decoder.decode_s,
        decoder.decode_steps,
        seq.finish_reason == "stop",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_decode_step(model: "GPT") -> Callable:
    """A torch.compile'd single-sequence decode step over the full static KV cache (CUDA)."""

    def step(x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return model(x, input_pos)[:, -1]

    return torch.compile(step, mode="reduce-overhead", fullgraph=True)
