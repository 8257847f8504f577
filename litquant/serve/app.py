"""The HTTP server (FastAPI on uvicorn): OpenAI-compatible `/v1/completions`, `/v1/chat/completions` (both with SSE
streaming), `/v1/models`, and `/health`. Requests become sequences in the engine's continuous batch; a client that
disconnects cancels its sequences, which free their rows at the next step."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from litquant.api import LLM
from litquant.errors import UserError
from litquant.generation import Sequence
from litquant.serve import openai as oa
from litquant.serve.engine import Engine, Overloaded

DISCONNECT_POLL_S = 0.25


def create_app(llm: LLM, engine: Engine, model_id: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine._thread.is_alive():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="litquant", lifespan=lifespan, docs_url=None, redoc_url=None)
    context = engine.decoder.max_seq_length

    def error(e: oa.RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(oa.RequestError)
    async def _request_error(request, e: oa.RequestError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error(oa.RequestError(f"invalid request: {e.errors()[0].get('msg', e)}"))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(oa.RequestError(str(e.detail), status=e.status_code, type=kind))

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise oa.RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise oa.RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in (model_id, str(llm.checkpoint.path)):
            raise oa.RequestError(
                f"the model {model!r} does not exist; this server serves {model_id!r}",
                "model",
                status=404,
                type="not_found_error",
                code="model_not_found",
            )
        return body

    def check_length(n_prompt: int, max_tokens: int, param: str) -> None:
        if n_prompt < 1:
            raise oa.RequestError(f"'{param}' is empty", param)
        if n_prompt + max_tokens > context:
            raise oa.RequestError(
                f"this model's context is {context} tokens; the request has {n_prompt} prompt tokens and asks for "
                f"{max_tokens} more",
                param if n_prompt >= context else "max_tokens",
                code="context_length_exceeded",
            )

    def make_sequences(
        ids: list[list[int]], st: oa.Settings, max_tokens: list[int], stop_sequences=()
    ) -> list:
        seqs = []
        for k, prompt in enumerate(ids):
            for j in range(st.n):
                seed = None if st.seed is None else st.seed + k * st.n + j
                try:
                    seqs += llm.sequences(
                        [prompt],
                        max_tokens[k],
                        st.temperature,
                        st.top_k,
                        st.top_p,
                        st.stop,
                        seed,
                        stop_sequences,
                    )
                except UserError as e:
                    raise oa.RequestError(str(e)) from None
        return seqs

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return JSONResponse(
            {"status": "ok" if stats["alive"] else "engine stopped", "model": model_id, **stats},
            status_code=200 if stats["alive"] else 503,
        )

    def model_card() -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": "litquant",
            "max_model_len": context,
            "quantization": llm.plugin.describe(),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise oa.RequestError(
                f"the model {name!r} does not exist",
                status=404,
                type="not_found_error",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        st = oa.settings(body)
        echo = oa.boolean(body, "echo")
        ids = []
        for p in oa.prompts(body):
            if isinstance(p, str):
                ids.append(llm.tokenizer.encode(p).tolist() if p else [])
            else:
                if any(i < 0 or i >= llm.config.vocab_size for i in p):
                    raise oa.RequestError(f"token ids must be in [0, {llm.config.vocab_size})", "prompt")
                ids.append(list(p))
            check_length(len(ids[-1]), st.max_tokens, "prompt")
        seqs = make_sequences(ids, st, [st.max_tokens] * len(ids))
        prefix = [llm.tokenizer.decode(s.prompt) if echo else "" for s in seqs]
        return await respond(request, seqs, st, "completion", prefix)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        st = oa.settings(body, "max_completion_tokens", default_max_tokens=None)
        try:
            prompt = llm.encode_chat(oa.messages(body))
        except UserError as e:
            raise oa.RequestError(str(e), "messages") from None
        max_tokens = st.max_tokens if st.max_tokens is not None else context - len(prompt)
        check_length(len(prompt), max(max_tokens, 1), "messages")
        st.max_tokens = max_tokens
        seqs = make_sequences([prompt], st, [max_tokens], llm.prompt_style.stop_tokens(llm.tokenizer))
        return await respond(request, seqs, st, "chat", [""] * len(seqs))

    async def respond(request, seqs: list[Sequence], st: oa.Settings, kind: str, prefix: list[str]):
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        for i, s in enumerate(seqs):
            s.on_update = lambda s, i=i: loop.call_soon_threadsafe(
                updates.put_nowait, (i, s.delta, s.finish_reason, s.error)
            )
        try:
            engine.submit(seqs)
        except Overloaded as e:
            raise oa.RequestError(
                f"the server is overloaded: {e}; retry later", status=503, type="server_overloaded"
            ) from None
        rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        n_prompt = sum(len(s.prompt) for s in seqs[:: st.n])

        def use() -> dict:
            return oa.usage(n_prompt, sum(len(s.tokens) for s in seqs))

        if st.stream:
            return StreamingResponse(
                stream(updates, seqs, st, kind, rid, prefix, use),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, reasons, pending = list(prefix), [None] * len(seqs), len(seqs)
        try:
            while pending:
                try:
                    i, delta, reason, err = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if err or reason == "cancelled":
                    return JSONResponse(
                        {
                            "error": {
                                "message": f"generation failed: {err or 'server shutting down'}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        },
                        status_code=500,
                    )
                texts[i] += delta
                if reason:
                    reasons[i], pending = reason, pending - 1
        finally:
            cancel(seqs)
        build = oa.chat_completion if kind == "chat" else oa.completion
        return build(rid, model_id, texts, reasons, use())

    async def stream(updates, seqs, st, kind, rid, prefix, use) -> AsyncIterator[str]:
        pending = len(seqs)
        try:
            for i in range(len(seqs)):
                if kind == "chat":
                    yield sse(oa.chat_chunk(rid, model_id, i, {"role": "assistant", "content": ""}, None))
                elif prefix[i]:
                    yield sse(oa.completion_chunk(rid, model_id, i, prefix[i], None))
            while pending:
                items = [await updates.get()]
                while not updates.empty():  # coalesce what piled up while we were sending
                    items.append(updates.get_nowait())
                out = []
                for i, delta, reason, err in merge(items):
                    if err or reason == "cancelled":
                        yield sse(
                            {
                                "error": {
                                    "message": f"generation failed: {err or 'server shutting down'}",
                                    "type": "server_error",
                                    "param": None,
                                    "code": None,
                                }
                            }
                        )
                        return
                    if reason:
                        pending -= 1
                    if kind == "chat":
                        delta_obj = {"content": delta} if delta else {}
                        out.append(sse(oa.chat_chunk(rid, model_id, i, delta_obj, reason)))
                    else:
                        out.append(sse(oa.completion_chunk(rid, model_id, i, delta, reason)))
                yield "".join(out)
            if st.include_usage:
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield sse(oa.usage_chunk(rid, model_id, obj, use()))
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: the engine drops its sequences at the next step
            cancel(seqs)

    return app


def merge(items: list[tuple]) -> list[tuple]:
    """Consecutive updates of one choice as one (text joined, the last finish reason)."""
    out: list[list[Any]] = []
    for i, delta, reason, err in items:
        if out and out[-1][0] == i and out[-1][2] is None and out[-1][3] is None:
            out[-1][1] += delta
            out[-1][2], out[-1][3] = reason, err
        else:
            out.append([i, delta, reason, err])
    return [tuple(o) for o in out if o[1] or o[2] or o[3]]


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def cancel(seqs: list[Sequence]) -> None:
    for s in seqs:
        if not s.finished:
            s.cancelled = True


def serve(
    llm: LLM,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_seq_length: Optional[int] = None,
    max_queue: int = 1024,
    model_id: Optional[str] = None,
) -> None:
    import uvicorn

    engine = Engine(llm, max_batch_size, max_seq_length, max_queue)
    model_id = model_id or llm.checkpoint.path.name
    app = create_app(llm, engine, model_id)
    print(
        f"Serving {model_id} ({llm.plugin.describe()}) on http://{host}:{port}/v1 with up to {max_batch_size} "
        f"sequences at once; context {engine.decoder.max_seq_length} tokens",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
