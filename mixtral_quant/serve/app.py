"""The OpenAI-compatible API over the batching engine: /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests and responses follow the OpenAI schema, so the official client parses them unchanged; streams are
server-sent events (sse-starlette) ending with `data: [DONE]`. Errors are OpenAI-style JSON
(`{"error": {"message", "type", "param", "code"}}`); a bad request never stops the server. vLLM's `ignore_eos`
extension is accepted. One log line per request (logger `mixtral_quant.serve`, the record's `request` dict).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from .engine import Chunk, Engine, GenRequest, QueueFull

log = logging.getLogger("mixtral_quant.serve")

DEFAULT_MAX_BODY = 2 << 20  # bytes; a full 32k-token conversation is a few hundred kB of JSON


# ---- request schemas (strict types: "10" is not a number; unknown fields are ignored, as vLLM does) ----


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Params(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's range and default
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever the model says

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Params):
    prompt: str
    logprobs: int | None = None
    echo: bool = False


# ---- errors ----


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Guard:
    """ASGI middleware in front of every route: the API key (401) and the body size (413), before anything is
    parsed. /health stays open, as in vLLM, for load balancers."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                _log_rejected(scope, 401, "missing or wrong API key")
                return await error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                            code="invalid_api_key")(scope, receive, send)  # fmt: skip
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            _log_rejected(scope, 400, "invalid Content-Length")
            return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        if int(length) > self.max_body:
            _log_rejected(scope, 413, f"body of {length.decode()} bytes")
            return await error_response(413, f"request body larger than {self.max_body} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive():  # a chunked body has no Content-Length: count as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"request body larger than {self.max_body} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def _log_rejected(scope, status: int, why: str) -> None:
    request = {"id": None, "path": scope.get("path"), "status": status, "error": why}
    log.info("%s %s %d: %s", scope.get("method"), scope.get("path"), status, why, extra={"request": request})


# ---- the app ----


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY):
    """The FastAPI app serving `engine` (started and stopped with the app) under the name `model_name`."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.started:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="mixtral-quant", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    tok = engine.model.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        _log_rejected(request.scope, e.status, e.message)
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            message, param = f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {err['msg']}" if param else err["msg"]
        _log_rejected(request.scope, 400, message)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        _log_rejected(request.scope, e.status_code, str(e.detail))
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                              "server_error")  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "mixtral-quant",
                "max_model_len": engine.context}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.apply_chat_template(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _serve(request, body, ids, max_tokens, f"chatcmpl-{uuid.uuid4().hex}", chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.logprobs or body.echo:
            raise APIError(400, "logprobs and echo are not supported", param="logprobs" if body.logprobs else "echo")
        ids = tok.encode(body.prompt)
        return await _serve(request, body, ids, body.max_tokens, f"cmpl-{uuid.uuid4().hex}", chat=False)

    async def _serve(request: Request, body: _Params, ids: list[int], max_tokens: int | None, rid: str, chat: bool):
        n, context = len(ids), engine.context
        if n >= context or (max_tokens is not None and n + max_tokens > context):
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n + (max_tokens or 0)} tokens ({n} in the prompt, {max_tokens or 0} for the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()  # a stream: every chunk crosses to the event loop
        text: list[str] = []  # a whole answer: the engine's thread collects the text, the loop wakes up once
        done: asyncio.Future[Chunk] = loop.create_future()

        def emit(chunk: Chunk) -> None:  # called by the engine's thread
            if body.stream:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                return
            text.append(chunk.text)
            if chunk.finish_reason is not None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(chunk))

        req = GenRequest(ids, max_tokens or context - n, emit, body.temperature, body.top_p, body.seed, body.stops(),
                         body.ignore_eos, strip_leading_space=chat, id=rid)  # fmt: skip
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}", type="server_error", code="overloaded") from None
        meta = dict(id=rid, created=int(time.time()), model=model_name)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(_events(req, chunks, meta, chat, usage), ping=15)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=0.1)
                if not done.done() and await request.is_disconnected():
                    _log_done(req, None, "client disconnected")
                    return JSONResponse({}, status_code=499)
        finally:
            req.cancel()  # a no-op once finished; stops the row when the client left or this task was cancelled
        last = done.result()
        if last.finish_reason == "error":
            _log_done(req, last, last.error)
            raise APIError(500, f"generation failed: {last.error}", type="server_error")
        _log_done(req, last)
        text = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": last.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason})  # fmt: skip
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(last)}  # fmt: skip

    async def _events(req: GenRequest, chunks: asyncio.Queue, meta: dict, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: str | None, finish=None, role=False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return json.dumps({**meta, "object": obj, "choices": [choice]})

        last = None
        try:
            if chat:
                yield event(None, role=True)
            while True:
                chunk = await chunks.get()
                if chunk.finish_reason == "error":
                    last = chunk
                    yield json.dumps({"error": {"message": f"generation failed: {chunk.error}", "type": "server_error",
                                                "param": None, "code": None}})  # fmt: skip
                    break
                if chunk.text:
                    yield event(chunk.text)
                if chunk.finish_reason is not None:
                    last = chunk
                    yield event(None, chunk.finish_reason)
                    if include_usage:
                        yield json.dumps({**meta, "object": obj, "choices": [], "usage": _usage(chunk)})
                    break
            yield "[DONE]"
        finally:
            req.cancel()  # the client went away mid-stream (this generator was cancelled): stop its row
            _log_done(req, last, None if last is not None else "client disconnected")

    return app


def _usage(c: Chunk) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}  # fmt: skip


def _log_done(req: GenRequest, last: Chunk | None, error: str | None = None) -> None:
    end = req.t_end or time.perf_counter()
    n_out = last.completion_tokens if last is not None else None
    dt = end - req.t_start if req.t_start else 0.0
    request = {"id": req.id, "status": 200 if error is None else (499 if last is None else 500),
               "prompt_tokens": len(req.prompt_ids), "completion_tokens": n_out,
               "tokens_per_s": round(n_out / dt, 1) if n_out and dt > 0 else None,
               "queue_wait_s": round(req.t_start - req.t_arrival, 4) if req.t_start else None,
               "finish_reason": last.finish_reason if last is not None else None, "error": error}  # fmt: skip
    log.info("%s in=%d out=%s tok/s=%s queue_wait=%ss finish=%s%s", req.id, request["prompt_tokens"], n_out,
             request["tokens_per_s"], request["queue_wait_s"], request["finish_reason"],
             f" error={error}" if error else "", extra={"request": request})  # fmt: skip
