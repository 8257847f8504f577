"""The Python API: `LLM.load(...)` then `generate`, `stream` and `chat`. `LLM.load` is the one way a model is loaded
for inference: `litquant generate`, `chat`, `serve`, `evaluate` and `benchmark` all come through it, so every job
sees the same checkpoint checks, precision, quantization and adapters.

    from litquant import LLM
    llm = LLM.load("checkpoints/meta-llama/Llama-2-7b-chat-hf", quantize="bnb.nf4")
    llm.generate(["def fib(", "import os"], max_new_tokens=32, temperature=0)
    llm.chat([{"role": "user", "content": "Hi!"}])
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from litquant.chat_template import ChatTemplate, Messages, check_messages
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint, load_model
from litquant.errors import UserError
from litquant.generation import BatchDecoder, SamplingParams, Sequence, run
from litquant.precision import LitquantPrecision, pick_accelerator, resolve
from litquant.prompts import PromptStyle, model_name_to_prompt_style
from litquant.sampling import check_sampling
from litquant.utils import configure_cpu_threads, reset_peak_memory

Prompts = Union[str, list[str]]
Stop = Union[None, str, list[str]]


class LLM:
    """A loaded model: `model`, `tokenizer`, `checkpoint`, the precision `plugin`, the `device`, and how it formats
    a conversation (`chat_template` from the checkpoint, else the `prompt_style` its name implies).
    One thread at a time: the methods share the model's KV cache."""

    def __init__(
        self, model: torch.nn.Module, checkpoint: Checkpoint, plugin: LitquantPrecision, device: torch.device
    ) -> None:
        self.model, self.checkpoint, self.plugin, self.device = model, checkpoint, plugin, device
        self.tokenizer = checkpoint.tokenizer
        self.chat_template = ChatTemplate.from_checkpoint(checkpoint.path)
        self.prompt_style: PromptStyle = model_name_to_prompt_style(model.config.name)

    @classmethod
    def load(
        cls,
        checkpoint_dir: Union[str, Path, Checkpoint] = DEFAULT_CHECKPOINT_DIR,
        quantize: Optional[str] = None,
        precision: Optional[str] = None,
        lora_path: Optional[Union[str, Path]] = None,
        accelerator: str = "auto",
        quantize_lm_head: bool = False,
        progress: bool = True,
        configure_threads: bool = True,
    ) -> "LLM":
        """Load `checkpoint_dir` in `precision` (default: the fastest on this machine for the mode), quantized with
        `quantize` (a `--quantize` mode), with a LoRA adapter on top (`lora_path`: the file or a finetune out_dir)."""
        device = torch.device(pick_accelerator(accelerator))
        checkpoint = Checkpoint.open(checkpoint_dir)
        plugin = resolve(
            precision, quantize, device, **({"quantize_lm_head": True} if quantize_lm_head else {})
        )
        checkpoint.tokenizer  # a missing or broken tokenizer fails before a (possibly long, quantizing) load
        ChatTemplate.from_checkpoint(checkpoint.path)  # and so does a broken chat template
        if lora_path is not None:
            from litquant.lora import load_lora, read_lora_metadata

            read_lora_metadata(lora_path)  # and a bad adapter
        reset_peak_memory(device)
        model = load_model(checkpoint, plugin, device, progress=progress)
        if lora_path is not None:
            load_lora(model, lora_path, dtype=plugin.dtype)
            model.eval()
        if configure_threads:  # one thread for small models on a CPU unless OMP_NUM_THREADS says otherwise
            configure_cpu_threads(model, device)
        return cls(model, checkpoint, plugin, device)

    @property
    def config(self):
        return self.model.config

    # ---- text in, text out ------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompts,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stop: Stop = None,
        seed: Optional[int] = None,
        batch_size: int = 8,
    ) -> Union[str, list[str]]:
        """The completion of `prompt` (a string), or of each of `prompt` (a list: run `batch_size` at a time, a new
        one starting whenever one finishes). `stop`: strings that end a completion (left out of it). `seed`: prompt
        i samples with its own generator seeded `seed + i`, so results do not depend on the batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seqs = self.sequences(
            [self.encode(p) for p in prompts], max_new_tokens, temperature, top_k, top_p, stop, seed
        )
        self.run(seqs, batch_size)
        texts = [s.text for s in seqs]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stop: Stop = None,
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        """The completion of `prompt`, piece by piece as it is sampled."""
        seqs = self.sequences([self.encode(prompt)], max_new_tokens, temperature, top_k, top_p, stop, seed)
        yield from self._stream(seqs[0])

    def chat(
        self,
        messages: Union[str, Messages],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stop: Stop = None,
        seed: Optional[int] = None,
        stream: bool = False,
    ) -> Union[str, Iterator[str]]:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}, ...], or
        one user message as a string), formatted with the checkpoint's chat template (else its prompt style)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.encode_chat(messages)
        seqs = self.sequences(
            [ids],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop,
            seed,
            stop_sequences=self.prompt_style.stop_tokens(self.tokenizer),
        )
        if stream:
            return self._stream(seqs[0])
        self.run(seqs, 1)
        return seqs[0].text

    # ---- the pieces the jobs and the server use ---------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt).tolist() if prompt else []
        if not ids:
            raise UserError("the prompt is empty")
        return ids

    def format_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt string for a conversation: the chat template's, else the prompt style's."""
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        check_messages(messages)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if not turns or turns[-1]["role"] != "user":
            raise UserError("the conversation must end with a user message")
        history, user = [], None
        for m in turns[:-1]:
            if m["role"] == "user" and user is None:
                user = m["content"]
            elif m["role"] == "assistant" and user is not None:
                history.append((user, m["content"]))
                user = None
            else:
                raise UserError("roles must alternate user/assistant after an optional system message")
        if user is not None:
            raise UserError("roles must alternate user/assistant after an optional system message")
        return self.prompt_style.apply(turns[-1]["content"], history=history, system=system)

    def encode_chat(self, messages: Messages) -> list[int]:
        text = self.format_chat(messages)
        # a template writes BOS itself (as transformers tokenizes its output: no special tokens added)
        ids = self.tokenizer.encode(text, bos=False if self.chat_template is not None else None).tolist()
        if not ids:
            raise UserError("the conversation is empty after tokenization")
        return ids

    def sequences(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stop: Stop = None,
        seed: Optional[int] = None,
        stop_sequences: list[list[int]] = (),
    ) -> list[Sequence]:
        """One `Sequence` per prompt (token ids), checked against the context; text decoded as it is sampled."""
        check_sampling(max_new_tokens, temperature, top_p)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise UserError("stop must be a non-empty string or a list of them")
        context = self.config.block_size
        seqs = []
        for i, ids in enumerate(prompts):
            if len(ids) + max_new_tokens > context:
                raise UserError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"model's context of {context} tokens"
                )
            params = SamplingParams(
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                None if seed is None else seed + i,
                frozenset(self.tokenizer.stop_ids),
                tuple(tuple(s) for s in stop_sequences),
                stop,
            )
            seqs.append(Sequence(list(ids), params, decoder=self.tokenizer.stream_decoder(ids[-1:])))
        return seqs

    def decoder(self, max_batch_size: int, max_seq_length: Optional[int] = None) -> BatchDecoder:
        """A batch decoder over this model, its KV cache sized for `max_batch_size` sequences."""
        return BatchDecoder(self.model, max_batch_size, max_seq_length or self.config.block_size, self.device)

    def run(self, seqs: list[Sequence], batch_size: int = 8) -> list[Sequence]:
        """Generate every sequence, `batch_size` at a time (continuous batching)."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not seqs:
            return seqs
        longest = max(len(s.prompt) + s.params.max_new_tokens for s in seqs)
        decoder = self.decoder(min(batch_size, len(seqs)), longest)
        with self.plugin.forward_context():
            for _ in run(decoder, seqs):
                pass
        return seqs

    def _stream(self, seq: Sequence) -> Iterator[str]:
        decoder = self.decoder(1, len(seq.prompt) + seq.params.max_new_tokens)
        try:
            with self.plugin.forward_context():
                for s in run(decoder, [seq]):
                    if s.delta:
                        yield s.delta
        finally:  # the caller stopped early: free the row
            seq.cancelled = True
            decoder.cancel_all()

    def __repr__(self) -> str:
        return f"LLM({self.checkpoint.path}, {self.plugin.describe()}, {self.device})"
