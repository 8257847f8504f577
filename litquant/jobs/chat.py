"""`litquant chat` / `python generate/chat.py`: one message per line from stdin (interactive or piped), formatted
with the model's prompt style (Llama-2-chat, Llama-3-instruct, Mistral-instruct, ...), the reply streamed back. An
empty line or EOF ends the session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR
from litquant.errors import UserError
from litquant.generation import GenerationResult, check_sampling, stream
from litquant.prompts import PromptStyle, model_name_to_prompt_style
from litquant.utils import memory_used_line


def main(
    *,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    prompt_style: Optional[str] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    multiturn: bool = True,
    seed: int = 1234,
) -> None:
    """Chat with the model in `checkpoint_dir`.

    Args:
        checkpoint_dir: a litquant checkpoint directory.
        prompt_style: a prompt style name (default: picked from the model name).
        system: a system prompt, for the styles that take one.
        max_new_tokens: the longest reply, in tokens.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only.
        top_p: nucleus sampling threshold.
        quantize: a quantization mode: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8, bnb.int8-training,
            gptq.int2, gptq.int3, gptq.int4 or gptq.int8 (default: none).
        precision: 32-true, 16-true or bf16-true (default: the fastest on this machine).
        accelerator: auto, cuda or cpu.
        multiturn: keep the conversation history in the prompt.
        seed: random seed.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if prompt_style:
        PromptStyle.from_name(prompt_style)  # an unknown style fails before the model loads
    llm = LLM.load(checkpoint_dir, quantize, precision, None, accelerator)
    model, tokenizer, plugin, device = llm.model, llm.tokenizer, llm.plugin, llm.device
    style = PromptStyle.from_name(prompt_style) if prompt_style else model_name_to_prompt_style(model.config.name)
    stop_sequences = [[i] for i in tokenizer.stop_ids] + style.stop_tokens(tokenizer)
    model.set_kv_cache(batch_size=1, device=device)
    torch.manual_seed(seed)
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">> Prompt: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        text = style.apply(line.rstrip("\n"), history=history if multiturn else (), system=system)
        encoded = tokenizer.encode(text, device=device)
        room = model.max_seq_length - encoded.numel()
        if room < 1:
            raise UserError(f"the conversation ({encoded.numel()} tokens) no longer fits the model's context "
                            f"of {model.max_seq_length} tokens; start again with --multiturn false")
        result = GenerationResult(encoded, encoded.numel())
        tokens = stream(model, encoded, min(max_new_tokens, room), result, temperature=temperature, top_k=top_k,
                        top_p=top_p, stop_sequences=stop_sequences)
        print(">> Reply: ", end="", flush=True)
        pieces = []
        with plugin.forward_context():
            for piece in tokenizer.decode_stream(tokens, context=encoded[-1:].tolist()):
                pieces.append(piece)
                print(piece, end="", flush=True)
        print()
        n = result.new_tokens.numel()
        print(f"Time for inference: {result.total_s:.02f} sec total, {n / result.total_s:.02f} tokens/sec, "
                     f"{n} tokens", file=sys.stderr)
        history.append((line.rstrip("\n"), "".join(pieces).strip()))
    print(memory_used_line(device), file=sys.stderr)


