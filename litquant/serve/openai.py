"""OpenAI-compatible requests and responses: what a /v1/completions or /v1/chat/completions body may hold, checked
into sampling settings with OpenAI-style errors, and the response and stream-chunk objects."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

MAX_STOP = 4
MAX_N = 16


class RequestError(Exception):
    """A bad request: HTTP `status` with an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Settings:
    """The sampling part of a request."""

    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: Optional[int]
    n: int
    stop: tuple[str, ...]
    seed: Optional[int]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {type(v).__name__}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _integer(
    body: dict, key: str, default: Optional[int], lo: int, hi: Optional[int] = None
) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        raise RequestError(
            f"'{key}' must be {'at least ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, got {v}", key
        )
    return v


def boolean(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"'{key}' must be a boolean, got {type(v).__name__}", key)
    return v


def settings(
    body: dict, max_tokens_key: str = "max_tokens", default_max_tokens: Optional[int] = 16
) -> Settings:
    """Check the sampling fields every endpoint shares (unknown fields are ignored, as OpenAI's API does for
    forward compatibility; ones that would change the output and that litquant does not do are refused)."""
    for key in ("logprobs", "top_logprobs", "logit_bias", "suffix", "tools", "functions"):
        if body.get(key) not in (None, False, {}, [], ""):
            raise RequestError(f"'{key}' is not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(f"'{key}' is not supported by this server (only 0)", key)
    best_of = _integer(body, "best_of", None, 1)
    if best_of not in (None, 1):
        raise RequestError("'best_of' is not supported by this server (only 1)", "best_of")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise RequestError("'response_format' is not supported by this server (only text)", "response_format")
    max_tokens = _integer(body, max_tokens_key, None, 1)
    if max_tokens is None and max_tokens_key == "max_completion_tokens":
        max_tokens = _integer(body, "max_tokens", None, 1)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise RequestError(f"'stop' takes up to {MAX_STOP} non-empty strings", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    top_k = _integer(body, "top_k", None, -1)
    return Settings(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=None if top_k in (None, -1, 0) else top_k,
        n=_integer(body, "n", 1, 1, MAX_N),
        stop=stop,
        seed=_integer(body, "seed", None, -(2**63)),
        stream=boolean(body, "stream"),
        include_usage=bool((options or {}).get("include_usage", False)),
    )


def prompts(body: dict) -> list[Any]:
    """/v1/completions' `prompt`: a string, a list of strings, a list of token ids, or a list of those."""
    p = body.get("prompt")
    if p is None:
        raise RequestError("'prompt' is required", "prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise RequestError("'prompt' must be a string, a list of strings or a list of token ids", "prompt")
    for item in p:
        ok = isinstance(item, str) or (
            isinstance(item, list)
            and item
            and all(isinstance(i, int) and not isinstance(i, bool) for i in item)
        )
        if not ok:
            raise RequestError(
                "'prompt' must be a string, a list of strings or a list of token ids", "prompt"
            )
    if len(p) > MAX_N:
        raise RequestError(f"at most {MAX_N} prompts per request", "prompt")
    return p


def messages(body: dict) -> list[dict]:
    """/v1/chat/completions' `messages`, with list-of-parts contents joined into their text."""
    ms = body.get("messages")
    if not isinstance(ms, list) or not ms:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(ms):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}]: role {m['role']!r} is not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                for c in content
            ):
                raise RequestError(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}] must have a string 'content'", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# ---- responses ----------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ],
        "usage": use,
    }


def chat_completion(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ],
        "usage": use,
    }


def completion_chunk(rid: str, model: str, index: int, text: str, reason: Optional[str]) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict, reason: Optional[str]) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
