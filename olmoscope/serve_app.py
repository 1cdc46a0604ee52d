"""The HTTP side of `olmoscope serve`: a FastAPI app with OpenAI's endpoints, /health, /metrics, /tokenize and
/detokenize. It only validates, tokenizes and queues: the engine thread (serving_engine.py) does the rest.

Every error is OpenAI's error object: a malformed body is a 400 (never FastAPI's 422), a body over the limit a 413,
an unknown model a 404, a wrong key a 401, a full queue a 429 with Retry-After.

    >>> app = create_app(engine, metrics, Served("tiny", tokenizer, 4096, 100352, frozenset({100257})))
    >>> uvicorn.run(app)   # then: curl localhost:8000/v1/completions -d '{"prompt": "Hi", "max_tokens": 4}'
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError
from starlette.exceptions import HTTPException

from olmoscope.openai_api import (ApiError, ChatBody, ChatMessage, CompletionBody, StrictModel, prepare, prompt_ids,
                                  validate_body, validation_error)
from olmoscope.openai_shapes import LogprobShaper, chunk, response, response_id, usage_chunk
from olmoscope.runtime.tokenizer import Tokenizer
from olmoscope.serve_metrics import Metrics
from olmoscope.serving_engine import Delta, EngineDead, QueueFull, ServingEngine, Submission

log = logging.getLogger("olmoscope.serve")

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is a 413
RETRY_AFTER_S = 1  # what a 429 suggests: a queue drains in about a second at serving rates
DISCONNECTED = object()  # put in a request's queue when its client goes away


@dataclass(frozen=True)
class Served:
    """The model behind the server, as the HTTP side needs it."""

    name: str  # the model id clients send (the engine file's stem)
    tokenizer: Tokenizer
    max_context: int  # positions one sequence may hold
    vocab_size: int  # ids below this are accepted in prompts
    eos_ids: frozenset[int]
    api_key: str | None = None  # when set, /v1, /tokenize and /detokenize need "Authorization: Bearer KEY"
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: ServingEngine, metrics: Metrics, served: Served) -> FastAPI:
    """The app; the engine thread must be started by the caller (and stopped after the server ends)."""
    app = FastAPI(title="olmoscope", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app, metrics)
    guarded = [Depends(_key_check(served.api_key))]
    handlers = _Handlers(engine, metrics, served)
    app.get("/health")(handlers.health)
    app.get("/metrics")(handlers.metrics)
    app.get("/v1/models", dependencies=guarded)(handlers.models)
    app.get("/v1/models/{model_id:path}", dependencies=guarded)(handlers.model)
    app.post("/v1/completions", dependencies=guarded)(handlers.completions)
    app.post("/v1/chat/completions", dependencies=guarded)(handlers.chat_completions)
    app.post("/tokenize", dependencies=guarded)(handlers.tokenize)
    app.post("/detokenize", dependencies=guarded)(handlers.detokenize)
    return app


# ── errors and the key ─────────────────────────────────────────────────────────────────────────────────
def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.rejected.labels(str(exc.status)).inc()
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint {request.url.path!r}",
                   405: f"{request.method} is not allowed on {request.url.path!r}"}.get(exc.status_code, exc.detail)
        return _error_response(ApiError(exc.status_code, str(message), headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:  # 400, never FastAPI's 422
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"]) or None
        return _error_response(ApiError(400, f"invalid request: {first['msg']}", param))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: logged, never a traceback out
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


def _key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send \"Authorization: Bearer KEY\"", kind="invalid_request_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (counted as it streams in, whatever Content-Length says), 400 when
    it is not JSON (NaN and Infinity included: JSON has no such numbers)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared):,} bytes, more than the {limit:,} this server takes")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the body is more than the {limit:,} bytes this server takes")
    try:
        return json.loads(bytes(data), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ── tokenize / detokenize bodies (vLLM's shapes) ────────────────────────────────────────────────────────
class TokenizeBody(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt only; default true (a chat template places its own)


class DetokenizeBody(StrictModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _validate(kind, raw: Any):
    if not isinstance(raw, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ── the endpoints ────────────────────────────────────────────────────────────────────────────────────
class _Handlers:
    def __init__(self, engine: ServingEngine, metrics: Metrics, served: Served):
        self.engine, self._metrics, self.served = engine, metrics, served

    async def health(self) -> Response:
        if self.engine.alive:
            return JSONResponse({"status": "ok"})
        return _error_response(ApiError(503, self.engine.failure or "the server is shutting down",
                                        kind="server_error"))

    async def metrics(self) -> Response:
        body, content_type = self._metrics.render()
        return Response(body, media_type=content_type)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "olmoscope",
                "max_model_len": self.served.max_context}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served.name:
            raise ApiError(404, f"the model {model!r} does not exist (this server has {self.served.name!r})", "model",
                           code="model_not_found")

    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = _validate(TokenizeBody, await read_json(request, self.served.max_body_bytes))
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            tokens = prompt_ids(ChatBody(messages=body.messages), self.served.tokenizer)
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = self.served.tokenizer.encode(body.prompt, add_special_tokens=add)
        return {"count": len(tokens), "max_model_len": self.served.max_context, "tokens": tokens}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = _validate(DetokenizeBody, await read_json(request, self.served.max_body_bytes))
        self._check_model(body.model)
        beyond = [t for t in body.tokens if t >= self.served.vocab_size]
        if beyond:
            raise ApiError(400, f"token id {beyond[0]} is beyond the model's {self.served.vocab_size} rows", "tokens")
        return {"prompt": self.served.tokenizer.decode(body.tokens)}

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionBody)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatBody)

    async def _generate(self, request: Request, kind) -> Response:
        raw = await read_json(request, self.served.max_body_bytes)
        if not isinstance(raw, dict):
            raise ApiError(400, "the body must be a JSON object", "body")
        served = self.served
        prepared = prepare(validate_body(kind, raw), served.tokenizer, served.name, served.max_context,
                           served.vocab_size, served.eos_ids, uuid.uuid4().hex)
        try:
            submission = self.engine.submit(prepared, asyncio.get_running_loop())
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry in a moment", kind="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDead as exc:
            raise ApiError(503, str(exc), kind="server_error") from None
        if prepared.stream:
            return StreamingResponse(self._events(submission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, submission)

    # ── a whole response ────────────────────────────────────────────────────────────────────────────
    async def _whole(self, request: Request, submission: Submission) -> Response:
        """Gather every choice, aborting the request if its client goes away first."""
        prepared = submission.prepared
        choices = [_Gathered() for _ in range(prepared.n)]
        watcher = asyncio.create_task(_watch_disconnect(request, submission))
        try:
            left = prepared.n
            while left:
                delta = await submission.queue.get()
                if delta is DISCONNECTED:
                    self.engine.abort(submission)
                    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                left -= choices[delta.index].add(delta)
        except BaseException:
            self.engine.abort(submission)  # cancelled (shutdown past its timeout): free the blocks
            raise
        finally:
            watcher.cancel()
        _raise_failure(choices)
        return JSONResponse(response(choices, prepared, self.served.name, self.served.tokenizer))

    # ── a stream ────────────────────────────────────────────────────────────────────────────────────
    async def _events(self, submission: Submission) -> AsyncIterator[str]:
        """Server-sent events: each choice's chunks as they come, the usage when asked, then [DONE]. Starlette
        cancels this generator when the client goes away; `finally` aborts the request then."""
        prepared, model = submission.prepared, self.served.name
        rid, created = response_id(prepared.chat), int(time.time())
        shapers = [LogprobShaper(self.served.tokenizer, prepared) for _ in range(prepared.n)]
        left, generated = prepared.n, 0
        try:
            for index in range(prepared.n):
                if prepared.chat:
                    yield _sse(chunk(prepared, rid, created, model, index, None))
                elif prepared.echo:
                    yield _sse(chunk(prepared, rid, created, model, index, prepared.echo))
            while left:
                events, failed = [], False
                for delta in _coalesced(await _arrived(submission.queue)):
                    generated += len(delta.token_ids)
                    if delta.finish_reason in ("error", "abort"):
                        events.append(_sse(_failure(delta).body()))
                        failed = True
                        break
                    logprobs = shapers[delta.index].shape(delta.logprobs) if prepared.logprobs is not None \
                        and delta.token_ids else None
                    if delta.text or logprobs:
                        events.append(_sse(chunk(prepared, rid, created, model, delta.index, delta.text, logprobs)))
                    if delta.finish_reason:
                        left -= 1
                        events.append(_sse(chunk(prepared, rid, created, model, delta.index, "", None,
                                                 delta.finish_reason)))
                if events:
                    yield "".join(events)
                if failed:
                    break
            else:
                if prepared.include_usage:
                    yield _sse(usage_chunk(prepared, rid, created, model, generated))
            yield "data: [DONE]\n\n"
        finally:
            if left:
                self.engine.abort(submission)


async def _arrived(queue: asyncio.Queue) -> list[Delta]:
    """The next delta and every one queued behind it."""
    deltas = [await queue.get()]
    while not queue.empty():
        deltas.append(queue.get_nowait())
    return deltas


def _coalesced(deltas: list[Delta]) -> list[Delta]:
    """Adjacent plain deltas of one choice as one: when the stream falls behind the engine (a fast model, many
    clients), a client gets one event with the tokens it missed instead of one event per token, which would cost
    the server the most exactly when it is busiest. Deltas with logprobs stay as they are, and nothing merges past a
    finish or into an error."""
    merged: list[Delta] = []
    for delta in deltas:
        if merged and _joins(merged[-1], delta):
            last = merged[-1]
            merged[-1] = Delta(delta.index, last.text + delta.text, last.token_ids + delta.token_ids, (),
                               delta.finish_reason, delta.error)
        else:
            merged.append(delta)
    return merged


def _joins(last: Delta, delta: Delta) -> bool:
    return (last.index == delta.index and not (last.finish_reason or last.logprobs or delta.logprobs)
            and delta.finish_reason not in ("error", "abort"))


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request, submission: Submission) -> None:
    """Wait for the client to hang up (the body is read by now, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    submission.queue.put_nowait(DISCONNECTED)


class _Gathered:
    """One choice of a whole response, gathered from its deltas (what openai_shapes.response reads)."""

    def __init__(self):
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[Any] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, delta: Delta) -> int:
        """Take a delta; 1 when it ends the choice."""
        self.pieces.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason, self.error = delta.finish_reason, delta.error
        return int(delta.finish_reason is not None)


def _failure(delta) -> ApiError:
    if delta.finish_reason == "abort":
        return ApiError(503, "the server is shutting down: the request was stopped", kind="server_error")
    return ApiError(500, f"the request failed in the engine: {delta.error}", kind="server_error")


def _raise_failure(choices: list[_Gathered]) -> None:
    failed = next((c for c in choices if c.finish_reason == "error"), None) or \
        next((c for c in choices if c.finish_reason == "abort"), None)
    if failed is not None:
        raise _failure(failed)
