"""OpenAI's completion and chat-completion shapes: request bodies validated by pydantic, turned into engine
requests, and the response objects built from a finished request. Shared by `batch` and `serve`.

A parameter the body gives that olmoscope does not support is refused by name (a 400), never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.output import RequestOutput
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.scheduler import Request
from olmoscope.runtime.tokenizer import Tokenizer

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "abort": "abort"}
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    """Fields every generation request shares; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: what the context leaves
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default; 0 is greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: off (an extension, as vLLM's)
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0  # an extension, as vLLM's
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, none of them empty")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


class CompletionBody(_Body):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


ENDPOINTS = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}


def parse_body(url: str, body: Any) -> CompletionBody | ChatBody:
    """The validated body for an endpoint; ApiError(400) naming the offending parameter otherwise."""
    kind = ENDPOINTS.get(url)
    if kind is None:
        raise ApiError(404, f"unknown endpoint {url!r}: supported are {', '.join(ENDPOINTS)}", "url")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI-style 400."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported parameter {param!r}", param)
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param)
    return ApiError(400, f"invalid value for {param!r}: {first['msg']}", param)


@dataclass
class Prepared:
    """A body made ready for the engine loop."""

    request: Request
    stop: list[str]
    chat: bool


def prepare(body: CompletionBody | ChatBody, tokenizer: Tokenizer, model: str, max_context: int, vocab: int,
            eos_ids: frozenset[int], request_id: str) -> Prepared:
    """Tokenize the prompt (chat: through the chat template) and check it against the model and the context."""
    if body.model is not None and body.model != model:
        raise ApiError(404, f"the model {body.model!r} does not exist (this server has {model!r})", "model",
                       code="model_not_found")
    chat = isinstance(body, ChatBody)
    try:
        if chat:
            text = tokenizer.render_chat([m.model_dump() for m in body.messages])
            prompt = tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = list(body.prompt)
    except OlmoscopeError as exc:  # a chat template that fails to render
        raise ApiError(400, str(exc), "messages") from None
    if not prompt:
        raise ApiError(400, "the prompt is empty: at least one token is needed", "prompt")
    if max(prompt) >= vocab:
        raise ApiError(400, f"token id {max(prompt)} is beyond the model's {vocab} rows", "prompt")
    room = max_context - len(prompt)  # tokens the context leaves for the completion
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, leaving nothing of the context of {max_context} "
                            "tokens", "prompt")
    if body.max_tokens is not None and body.max_tokens > room:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {body.max_tokens}: "
                            f"{len(prompt) + body.max_tokens} tokens, beyond the context of {max_context}", "max_tokens")
    max_tokens = body.max_tokens if body.max_tokens is not None else room
    request = Request(request_id, prompt, body.sampling(), max_tokens, body.seed, eos_ids)
    return Prepared(request, body.stop_strings, chat)


def response(output: RequestOutput, model: str, chat: bool, created: int | None = None) -> dict[str, Any]:
    """The completion (or chat.completion) object of a finished request."""
    created = created or int(time.time())
    reason = FINISH_REASONS[output.finish_reason]
    usage = {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(output.token_ids),
             "total_tokens": len(output.prompt_token_ids) + len(output.token_ids)}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": output.text}, "logprobs": None,
                  "finish_reason": reason}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": output.text, "logprobs": None, "finish_reason": reason}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}
