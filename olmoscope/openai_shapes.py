"""OpenAI's response objects, exactly: completions and chat completions, whole or as stream chunks, with usage and
both logprobs shapes. Built from anything that looks like a finished choice (`text`, `token_ids`,
`finish_reason`, `logprobs`): a RequestOutput in `batch`, what the HTTP side gathered in `serve`.

    >>> response([output], prepared, "tiny", tokenizer)["choices"][0]["text"]
    'Hello world'
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from olmoscope.openai_api import Prepared
from olmoscope.runtime.tokenizer import Tokenizer

# the engine's finish reasons in OpenAI's words (errors never get here: they are error objects)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "abort": "abort"}


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(choices: Sequence[Any], prepared: Prepared, model: str, tokenizer: Tokenizer,
             created: int | None = None, rid: str | None = None) -> dict[str, Any]:
    """The completion (or chat.completion) object of a finished request, one entry per choice."""
    created = created or int(time.time())
    shaped = []
    for index, choice in enumerate(choices):
        logprobs = None
        if prepared.logprobs is not None:
            logprobs = LogprobShaper(tokenizer, prepared).shape(choice.logprobs)
        reason = FINISH_REASONS[choice.finish_reason]
        if prepared.chat:
            shaped.append({"index": index, "message": {"role": "assistant", "content": choice.text},
                           "logprobs": logprobs, "finish_reason": reason})
        else:
            shaped.append({"index": index, "text": (prepared.echo or "") + choice.text, "logprobs": logprobs,
                           "finish_reason": reason})
    total = usage(len(prepared.request.prompt_ids), sum(len(c.token_ids) for c in choices))
    return {"id": rid or response_id(prepared.chat), "object": "chat.completion" if prepared.chat else
            "text_completion", "created": created, "model": model, "choices": shaped, "usage": total}


def chunk(prepared: Prepared, rid: str, created: int, model: str, index: int, text: str | None,
          logprobs: dict[str, Any] | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    """One stream event of one choice. Chat: text None is the opening delta (the role), "" with a finish reason the
    closing one."""
    reason = FINISH_REASONS[finish_reason] if finish_reason else None
    if prepared.chat:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if prepared.include_usage:
        body["usage"] = None  # OpenAI: null in every chunk but the last
    return body


def usage_chunk(prepared: Prepared, rid: str, created: int, model: str, completion_tokens: int) -> dict[str, Any]:
    """The stream's last event with include_usage: no choices, the usage of all of them."""
    return {"id": rid, "object": "chat.completion.chunk" if prepared.chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(len(prepared.request.prompt_ids), completion_tokens)}


class LogprobShaper:
    """Token logprobs of one choice in the request's shape, a piece at a time (a stream shapes each chunk's).

    Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, each top dict holding the chosen
    token and `logprobs` alternatives, offsets counted in the choice's text (after an echoed prompt). Chat:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
    """

    def __init__(self, tokenizer: Tokenizer, prepared: Prepared):
        self.tokenizer = tokenizer
        self.chat = prepared.chat
        self.top = prepared.logprobs or 0
        self._stream = tokenizer.stream()
        self._offset = len(prepared.echo or "")

    def shape(self, entries: Sequence[Any]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(self._text(entry.token_id))
            offsets.append(self._offset)
            self._offset += len(self._stream.step(entry.token_id))
        tops = [{self._text(entry.token_id): entry.logprob, **{self._text(t): lp for t, lp in entry.top[:self.top]}}
                for entry in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, entry) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            raw = self.tokenizer.token_bytes(token_id)
            return {"token": self._text(token_id), "logprob": logprob, "bytes": list(raw)}

        return {**one(entry.token_id, entry.logprob),
                "top_logprobs": [one(t, lp) for t, lp in entry.top[:self.top]]}

    def _text(self, token_id: int) -> str:
        """A token as text; part of a character is written as its bytes, as OpenAI does ("bytes:\\xe6")."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
