"""What a request has produced so far: its tokens, its text (detokenized incrementally, multi-byte safe), stop
strings found across token boundaries, and its timings. One per request, shared by generate, batch and serve.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from olmoscope.runtime.sampler import TokenLogprob
from olmoscope.runtime.tokenizer import TextStream


class StopScanner:
    """Assembles streamed text, holding back what could still become a stop string.

    >>> s = StopScanner(["\\n\\n"]); s.add("Hi\\n"), s.add("\\nthere")
    ('Hi', '')
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""  # everything released or held, up to a stop string
        self.released = 0  # characters of text handed out so far
        self.stopped = False  # a stop string was found

    def add(self, piece: str) -> str:
        """Take the next piece; return what can be shown now."""
        before = len(self.text)
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop_length())

    def flush(self) -> str:
        """Everything still held back (the generation ended without a stop string)."""
        return self._release(len(self.text))

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of text that begins some stop string."""
        longest = max((len(s) for s in self.stop), default=1)
        for n in range(min(longest - 1, len(self.text) - self.released), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        piece, self.released = self.text[self.released : end], max(self.released, end)
        return piece


class RequestOutput:
    """A request's results as they arrive; `take()` the new text and tokens since the last look.

    Without a text stream (no tokenizer) only token ids are kept, and stop strings cannot apply.
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], seed: int, stream: TextStream | None = None,
                 stop: Sequence[str] = ()):
        self.request_id = request_id
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.seed = seed  # the sampler's seed: pass it again to repeat a sampled run
        self.token_ids: list[int] = []  # generated, the EOS or the token completing a stop string included
        self.finish_reason: str | None = None  # eos | stop | length | context | abort | error, once finished
        self.error: str | None = None  # what went wrong, for finish reason "error"
        self.logprobs: list[TokenLogprob] = []  # aligned with token_ids, when the request asked for logprobs
        self.prompt_logprobs: list[float] | None = None  # prompt scoring: prompt tokens score_from … on, once finished
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self._stream = stream
        self._scanner = StopScanner(stop)
        self._unread_text = ""
        self._unread_tokens = 0

    @property
    def text(self) -> str:
        """Generated text so far, up to (not including) a stop string."""
        return self._scanner.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped(self) -> bool:
        """A stop string was found in the text."""
        return self._scanner.stopped

    def add_token(self, token: int, visible: bool = True, logprob: TokenLogprob | None = None) -> bool:
        """Take one generated token (an EOS is not `visible`: it adds no text); True when it completes a stop string."""
        now = time.perf_counter()
        if logprob is not None:
            self.logprobs.append(logprob)
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.token_ids.append(int(token))
        self._unread_tokens += 1
        if self._stream is not None and visible:
            self._unread_text += self._scanner.add(self._stream.step(int(token)))
        return self._scanner.stopped

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finished:
            return
        self.finish_reason, self.error = reason, error
        self.finish_time = time.perf_counter()
        if reason != "stop":
            self._unread_text += self._scanner.flush()

    def take(self) -> tuple[str, list[int]]:
        """(text, token ids) added since the last take."""
        text, self._unread_text = self._unread_text, ""
        tokens = self.token_ids[len(self.token_ids) - self._unread_tokens:]
        self._unread_tokens = 0
        return text, tokens
