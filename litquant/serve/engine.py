"""The serving loop: one thread owns the model and runs continuous batching; request handlers (any thread) submit
sequences and are called back as they advance. Waiting sequences join the running batch between decode steps."""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional

from litquant.api import LLM
from litquant.generation import Sequence


class Overloaded(Exception):
    """The waiting queue is full."""


class Engine:
    def __init__(
        self, llm: LLM, max_batch_size: int = 16, max_seq_length: Optional[int] = None, max_queue: int = 1024
    ) -> None:
        self.llm, self.max_queue = llm, max_queue
        self.decoder = llm.decoder(max_batch_size, max_seq_length)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="litquant-engine", daemon=True)
        self.counts = collections.Counter()  # finished sequences by finish reason, "error", "tokens"
        self.busy_s = 0.0  # time spent in forward passes

    @property
    def max_batch_size(self) -> int:
        return self.decoder.max_batch_size

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (their `on_update` is called from the engine thread after every step they take)."""
        with self._cond:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (--max_queue {self.max_queue})")
            now = time.perf_counter()
            for s in seqs:
                s.t_added = now
            self._waiting.extend(seqs)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            waiting = len(self._waiting)
        return dict(
            active=len(self.decoder.active),
            waiting=waiting,
            max_batch_size=self.max_batch_size,
            finished=dict(self.counts),
            busy_s=round(self.busy_s, 3),
            alive=self._thread.is_alive(),
        )

    def _loop(self) -> None:
        decoder = self.decoder
        with self.llm.plugin.forward_context():
            while True:
                with self._cond:
                    while not self._stopped and not self._waiting and not decoder.active:
                        self._cond.wait()
                    if self._stopped:
                        break
                    new = []
                    while self._waiting and len(new) < decoder.free:
                        s = self._waiting.popleft()
                        if s.cancelled:  # gone before it started
                            self._done(s, "cancelled")
                        else:
                            new.append(s)
                t0 = time.perf_counter()
                try:
                    advanced = decoder.add(new) if new else decoder.step()
                except Exception as e:  # a bug or out of memory: fail what is running, keep serving
                    failed = list(decoder.active) + [s for s in new if s not in decoder.active]
                    for s in failed:
                        s.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        if not s.finished:
                            s._finish("error")
                    decoder.cancel_all()
                    for s in failed:
                        self._done(s, "error")
                    continue
                self.busy_s += time.perf_counter() - t0
                for s in advanced:
                    if s.finished:
                        self.counts[s.finish_reason] += 1
                        self.counts["tokens"] += len(s.tokens)
            for s in list(decoder.active) + list(self._waiting):  # shutting down
                s.cancelled = True
                self._done(s, "cancelled")
            decoder.cancel_all()

    def _done(self, seq: Sequence, reason: str) -> None:
        if not seq.finished:
            seq.finish_reason = reason
            seq.t_done = time.perf_counter()
        self.counts[reason] += 1
        if seq.on_update is not None:
            seq.on_update(seq)
