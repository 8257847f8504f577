"""`litquant serve`: serve a checkpoint over HTTP with the OpenAI API (completions, chat, streaming)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

from litquant.api import LLM
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint
from litquant.errors import UserError


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    lora_path: Optional[Path] = None,
    accelerator: str = "auto",
    quantize_lm_head: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_seq_length: Optional[int] = None,
    max_queue: int = 1024,
    model_name: Optional[str] = None,
) -> None:
    """Serve the model in `checkpoint_dir` with an OpenAI-compatible API: GET /v1/models, POST /v1/completions,
    POST /v1/chat/completions (`stream: true` for server-sent events) and GET /health.

    Args:
        checkpoint_dir: a litquant checkpoint directory (default: the bundled model).
        quantize: a quantization mode: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8, gptq.int2, gptq.int3,
            gptq.int4 or gptq.int8 (default: none).
        precision: 32-true, 16-true or bf16-true (default: the fastest on this machine for the mode).
        lora_path: a LoRA adapter from `finetune lora`, applied on top of the base model.
        accelerator: auto, cuda or cpu.
        quantize_lm_head: quantize the output layer too (bnb modes).
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: the TCP port to listen on.
        max_batch_size: sequences decoded at once; requests beyond it wait and join as rows free up.
        max_seq_length: the longest prompt + completion, in tokens (default: the model's context); the KV cache
            holds max_batch_size x max_seq_length positions.
        max_queue: requests allowed to wait for a row; more get HTTP 503.
        model_name: the model id clients send and /v1/models lists (default: the checkpoint directory's name).
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("litquant serve needs FastAPI and uvicorn: pip install 'litquant[serve]'") from None
    if max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, got {max_queue}")
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    checkpoint = Checkpoint.open(checkpoint_dir)
    context = checkpoint.config.block_size
    if max_seq_length is not None and not 1 < max_seq_length <= context:
        raise UserError(
            f"--max_seq_length must be in 2..{context} (the model's context), got {max_seq_length}"
        )
    _check_port(host, port)  # before the (possibly long) load
    llm = LLM.load(checkpoint, quantize, precision, lora_path, accelerator, quantize_lm_head)
    from litquant.serve.app import serve

    serve(llm, host, port, max_batch_size, max_seq_length, max_queue, model_name)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
