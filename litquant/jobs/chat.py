"""`litquant chat` / `python generate/chat.py`: one message per line from stdin (interactive or piped), formatted
with the checkpoint's chat template (else the prompt style its name implies: Llama-2-chat, Llama-3-instruct, ...),
the reply streamed back. An empty line or EOF ends the session."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR
from litquant.errors import UserError
from litquant.prompts import PromptStyle
from litquant.sampling import check_sampling
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
        prompt_style: a prompt style name, used instead of the checkpoint's chat template (default: the template,
            else the style the model name implies).
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
    if prompt_style:  # the flag wins over the checkpoint's chat template
        llm.chat_template, llm.prompt_style = None, PromptStyle.from_name(prompt_style)
    print(
        f"Chat format: {'the checkpoint chat template' if llm.chat_template else type(llm.prompt_style).__name__}",
        file=sys.stderr,
    )
    torch.manual_seed(seed)
    messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">> Prompt: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        turn = messages + [{"role": "user", "content": line.rstrip("\n")}]
        room = llm.config.block_size - len(llm.encode_chat(turn))
        if room < 1:
            raise UserError(
                f"the conversation no longer fits the model's context of {llm.config.block_size} "
                "tokens; start again with --multiturn false"
            )
        print(">> Reply: ", end="", flush=True)
        t0, pieces = time.perf_counter(), []
        for piece in llm.chat(turn, min(max_new_tokens, room), temperature, top_k, top_p, stream=True):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        took = time.perf_counter() - t0
        n = len(llm.tokenizer.encode("".join(pieces), bos=False))
        print(
            f"Time for inference: {took:.02f} sec total, {n / took:.02f} tokens/sec, {n} tokens",
            file=sys.stderr,
        )
        if multiturn:
            messages = turn + [{"role": "assistant", "content": "".join(pieces).strip()}]
    print(memory_used_line(llm.device), file=sys.stderr)
