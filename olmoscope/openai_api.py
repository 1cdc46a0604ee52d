"""OpenAI's completion and chat-completion request bodies: validated by pydantic, checked against the model and
its context, and turned into engine requests. Shared by `batch` and `serve` (the responses: openai_shapes.py).

A parameter the body gives that olmoscope does not support is refused by name (a 400), never ignored.

    >>> parse_body("/v1/completions", {"prompt": "Hi", "n": 2, "logprobs": 3}).top_logprobs_wanted
    3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.output import RequestOutput
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.scheduler import Request
from olmoscope.runtime.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}  # HTTP headers to send with it (Retry-After)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


MAX_CHOICES = 64  # n: choices share the prompt's blocks, each decodes on its own
MAX_LOGPROBS = 20  # alternatives per token, the runtime's limit (OpenAI's chat limit too)
Probability = Annotated[float, Field(ge=-2, le=2)]


class StrictModel(BaseModel):
    """Unknown fields refused by name, no type coercion, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool | None = None  # a last chunk with the usage, and "usage": null in every other


class _Body(StrictModel):
    """Fields every generation request shares; anything else is refused by name. null means the default."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: what the context leaves
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # OpenAI's default 1; 0 is greedy
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # 0: off (an extension, as vLLM's)
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # an extension, as vLLM's
    presence_penalty: Probability | None = None
    frequency_penalty: Probability | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     mode="before")
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

    def check(self) -> None:
        """What one field alone cannot say: ApiError(400) naming the parameter."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per generated token to report (0: the chosen token's own logprob only); None: no logprobs."""
        return None

    def sampling(self) -> SamplingParams:
        return SamplingParams(_default(self.temperature, 1.0), _default(self.top_k, 0), _default(self.top_p, 1.0),
                              _default(self.repetition_penalty, 1.0), _default(self.presence_penalty, 0.0),
                              _default(self.frequency_penalty, 0.0))


def _default(value, default):
    return default if value is None else value


class CompletionBody(_Body):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    echo: bool | None = None  # the prompt's text before the completion's
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # alternatives per token

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs would need the prompt's logprobs, which olmoscope does not "
                                "compute: ask for one of them", "echo")

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree", "max_completion_tokens")

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


ENDPOINTS = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}


def parse_body(url: str, body: Any) -> CompletionBody | ChatBody:
    """The validated body for an endpoint; ApiError(400) naming the offending parameter otherwise."""
    kind = ENDPOINTS.get(url)
    if kind is None:
        raise ApiError(404, f"unknown endpoint {url!r}: supported are {', '.join(ENDPOINTS)}", "url")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    return validate_body(kind, body)


def validate_body(kind: type[CompletionBody] | type[ChatBody], body: dict[str, Any]) -> CompletionBody | ChatBody:
    """pydantic's checks, then the cross-field ones; ApiError(400) naming the offending parameter."""
    try:
        validated = kind.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    validated.check()
    return validated


def validation_error(exc: ValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI-style 400."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported parameter {param!r}", param)
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param)
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"invalid value for {param!r}: {message}" if param else message, param)


@dataclass
class Prepared:
    """A body made ready for the engine loop."""

    request: Request
    stop: list[str]
    chat: bool
    n: int = 1  # choices
    logprobs: int | None = None  # alternatives per token to report; None: no logprobs
    echo: str | None = None  # the prompt's text, to put before each completion (completions' echo)
    stream: bool = False
    include_usage: bool = False

    def submit(self, loop) -> list[RequestOutput]:
        """Queue the request on an engine loop: one output per choice (the prompt's blocks shared by all)."""
        if self.n == 1:
            return [loop.add(self.request, self.stop)]
        return loop.add_choices(self.request, self.stop)


def prepare(body: CompletionBody | ChatBody, tokenizer: Tokenizer, model: str, max_context: int, vocab: int,
            eos_ids: frozenset[int], request_id: str) -> Prepared:
    """Tokenize the prompt (chat: through the chat template) and check it against the model and the context."""
    if body.model is not None and body.model != model:
        raise ApiError(404, f"the model {body.model!r} does not exist (this server has {model!r})", "model",
                       code="model_not_found")
    chat = isinstance(body, ChatBody)
    prompt = prompt_ids(body, tokenizer)
    if not prompt:
        raise ApiError(400, "the prompt is empty: at least one token is needed", "prompt")
    if max(prompt) >= vocab:
        raise ApiError(400, f"token id {max(prompt)} is beyond the model's {vocab} rows", "prompt")
    room = max_context - len(prompt)  # tokens the context leaves for the completion
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, leaving nothing of the context of {max_context} "
                            "tokens", "messages" if chat else "prompt")
    limit = body.completion_limit
    if limit is not None and limit > room:
        param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        raise ApiError(400, f"the prompt has {len(prompt)} tokens and {param} is {limit}: "
                            f"{len(prompt) + limit} tokens, beyond the context of {max_context}", param)
    n, logprobs = body.n or 1, body.top_logprobs_wanted
    request = Request(request_id, prompt, body.sampling(), limit if limit is not None else room, body.seed, eos_ids,
                      n, logprobs)
    echo = None
    if not chat and body.echo:
        echo = body.prompt if isinstance(body.prompt, str) else tokenizer.decode(prompt)
    return Prepared(request, body.stop_strings, chat, n, logprobs, echo, bool(body.stream), body.include_usage)


def prompt_ids(body: CompletionBody | ChatBody, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: a chat through the model's own template, text through the tokenizer."""
    if isinstance(body, ChatBody):
        if not tokenizer.has_chat_template:
            raise ApiError(400, "this model has no chat template, so it cannot take messages: send a prompt to "
                                "/v1/completions instead", "messages")
        try:
            text = tokenizer.render_chat([m.as_template_input() for m in body.messages])
        except OlmoscopeError as exc:  # a chat template that fails to render
            raise ApiError(400, str(exc), "messages") from None
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(body.prompt, str):
        return tokenizer.encode(body.prompt)
    return list(body.prompt)
