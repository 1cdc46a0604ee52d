"""The engine thread of `olmoscope serve`: the one thread that owns the engine loop (and so the backend), fed
through a thread-safe queue, answering each request's asyncio queue with `call_soon_threadsafe`.

The HTTP side only puts work in and reads deltas out; it never touches the loop, the backend or a RequestOutput,
so it never blocks on the device. A request that fails (a bad sample, a step the backend refuses) is that
request's error; the thread serves on. If the thread itself dies, `alive` turns False (/health answers 503) and
every waiting request gets the error.

    >>> engine = ServingEngine(backend, tokenizer); engine.start()
    >>> submission = engine.submit(prepared, asyncio.get_running_loop())
    >>> delta = await submission.queue.get()   # Delta(index=0, text='Hello', ...)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from olmoscope.openai_api import Prepared
from olmoscope.runtime.loop import EngineLoop
from olmoscope.runtime.output import RequestOutput
from olmoscope.runtime.tokenizer import Tokenizer

log = logging.getLogger("olmoscope.serve")


class QueueFull(Exception):
    """More requests wait than --max-queue allows (the HTTP side answers 429)."""


class EngineDead(Exception):
    """The engine thread has stopped (shut down, or died of an error): nothing more can run."""


@dataclass(frozen=True)
class Delta:
    """What one choice produced since its last delta; the last one has its finish reason (or error)."""

    index: int  # the choice
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] = ()  # TokenLogprob per token, when the request asked for logprobs
    finish_reason: str | None = None  # eos | stop | length | context | abort | error
    error: str | None = None  # what went wrong, when finish_reason is "error"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes around each step (read by /metrics and admission)."""

    running: int = 0  # sequences running (a request with n choices has n)
    waiting: int = 0  # sequences waiting to be scheduled (new, or preempted)
    waiting_requests: int = 0  # requests with a sequence waiting
    blocks_total: int = 0  # KV blocks sequences can hold
    blocks_used: int = 0
    blocks_free: int = 0  # free ones, unused cached prefix blocks included
    blocks_cached: int = 0  # full blocks findable by their prefix hash
    prefix_queries: int = 0  # prefix blocks looked up …
    prefix_hits: int = 0  # … and found
    prompt_tokens: int = 0  # prompt tokens of every request taken in
    generation_tokens: int = 0  # tokens generated for every request
    preemptions: int = 0
    steps: int = 0


class Observer:
    """What the engine thread reports as it goes (metrics.py implements it; this one ignores everything)."""

    def first_token(self, seconds: float) -> None: ...  # arrival → first token of a choice
    def token_gap(self, seconds: float) -> None: ...  # between two tokens of a choice
    def finished(self, seconds: float, reason: str) -> None: ...  # arrival → the request's end


@dataclass(eq=False)
class Submission:
    """One HTTP request inside the engine: its choices' deltas arrive on `queue`, in the asyncio loop's thread."""

    prepared: Prepared
    aloop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    # engine thread only, from here on
    outputs: list[RequestOutput] = field(default_factory=list)
    open_choices: int = 0
    last_token: dict[int, float] = field(default_factory=dict)  # choice → when its last token came

    def push(self, delta: Delta) -> None:
        deliver([(self, delta)])


def deliver(deltas: list[tuple[Submission, Delta]]) -> None:
    """Each delta into its request's queue, from the engine thread: one hand-over per event loop for the whole list
    (a step's news for every request), since each call_soon_threadsafe wakes the loop through a pipe write."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
    for submission, delta in deltas:
        by_loop.setdefault(submission.aloop, []).append((submission.queue, delta))
    for aloop, items in by_loop.items():
        try:
            aloop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the server's event loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for destination, delta in items:
        destination.put_nowait(delta)


class ServingEngine:
    """An EngineLoop behind a queue, stepped by a thread of its own."""

    def __init__(self, backend, tokenizer: Tokenizer, max_queue: int | None = None, observer: Observer | None = None):
        self.loop = EngineLoop(backend, tokenizer)
        self.max_queue = max_queue  # requests that may wait to be scheduled; None: no limit
        self.observer = observer or Observer()
        self.stats = EngineStats(blocks_total=self.loop.pool.capacity, blocks_free=self.loop.pool.num_free)
        self.failure: str | None = None  # why the thread died
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet taken in by the thread
        self._stopping = False
        self._owner: dict[int, tuple[Submission, int]] = {}  # id(output) → (submission, choice); choices share ids
        self._submissions: set[Submission] = set()
        self._prompt_tokens = 0
        self._thread = threading.Thread(target=self._run, name="olmoscope-engine", daemon=True)

    # ── the HTTP side (the asyncio thread) ─────────────────────────────────────────────────────────────
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def waiting_requests(self) -> int:
        """Requests not yet scheduled: those still in the inbox and those the scheduler holds waiting."""
        return self._pending + self.stats.waiting_requests

    def submit(self, prepared: Prepared, aloop: asyncio.AbstractEventLoop) -> Submission:
        """Queue a request; QueueFull past --max-queue, EngineDead once the thread has stopped."""
        if not self.alive:
            raise EngineDead(self.failure or "the server is shutting down")
        with self._lock:
            if self.max_queue is not None and self.waiting_requests >= self.max_queue:
                raise QueueFull(f"{self.waiting_requests} requests are waiting, the most --max-queue allows")
            self._pending += 1
        submission = Submission(prepared, aloop)
        self._inbox.put(("add", submission))
        return submission

    def abort(self, submission: Submission) -> None:
        """The client went away: its sequences are aborted, their blocks free at the next step."""
        self._inbox.put(("abort", submission))

    def abort_all(self) -> None:
        """Abort every request held now (a shutdown past its timeout): each one's handler answers its client."""
        self._inbox.put(("abort_all", None))

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever still runs and end the thread (waiting at most `timeout` seconds for it)."""
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # ── the engine thread ────────────────────────────────────────────────────────────────────────────
    def _run(self) -> None:
        try:
            with self.loop.backend.in_thread():
                while self._take_messages(block=not self.loop.has_work):
                    self._publish()
                    if self.loop.has_work:
                        self._forward(self.loop.step())
                        self._publish()
        except BaseException as exc:  # a bug in the loop: say so on /health, to everyone waiting, and in the log
            self.failure = f"the engine loop stopped: {type(exc).__name__}: {exc}"
            log.exception(self.failure)
            self._fail_all(self.failure)
        finally:
            self._stopping = True

    def _take_messages(self, block: bool) -> bool:
        """Take in what the HTTP side sent (waiting for something when idle); False when told to stop."""
        while True:
            try:
                kind, submission = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self._fail_all(None)
                return False
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self._add(submission)
            elif kind == "abort":
                self._abort(submission)
            elif kind == "abort_all":
                self._fail_all(None)

    def _add(self, submission: Submission) -> None:
        prepared = submission.prepared
        try:
            submission.outputs = prepared.submit(self.loop)
        except Exception as exc:  # the loop refused it (it was checked on the way in, so this is a bug)
            submission.push(Delta(0, "", (), finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            return
        submission.open_choices = len(submission.outputs)
        self._submissions.add(submission)
        self._prompt_tokens += len(prepared.request.prompt_ids)
        for index, output in enumerate(submission.outputs):
            self._owner[id(output)] = (submission, index)

    def _abort(self, submission: Submission) -> None:
        if any(not output.finished for output in submission.outputs):
            self.loop.abort(submission.prepared.request.request_id)  # every choice at once
        self._forward([o for o in submission.outputs if id(o) in self._owner])

    def _forward(self, changed: list[RequestOutput]) -> None:
        """Each changed output's news as a delta to its request's queue."""
        now, news = time.perf_counter(), []
        for output in changed:
            owner = self._owner.get(id(output))
            if owner is None:
                continue
            submission, index = owner
            text, tokens = output.take()
            if tokens:
                self._observe_tokens(submission, index, now)
            if not (text or tokens or output.finished):
                continue
            logprobs = ()
            if submission.prepared.logprobs is not None and tokens:
                logprobs = tuple(output.logprobs[len(output.token_ids) - len(tokens):])
            news.append((submission, Delta(index, text, tuple(tokens), logprobs, output.finish_reason, output.error)))
            if output.finished:
                self._close_choice(submission, output, now)
        deliver(news)

    def _observe_tokens(self, submission: Submission, index: int, now: float) -> None:
        last = submission.last_token.get(index)
        if last is None:
            self.observer.first_token(now - submission.arrival)
        else:
            self.observer.token_gap(now - last)
        submission.last_token[index] = now

    def _close_choice(self, submission: Submission, output: RequestOutput, now: float) -> None:
        del self._owner[id(output)]
        submission.open_choices -= 1
        if submission.open_choices == 0:
            self._submissions.discard(submission)
            reasons = {o.finish_reason for o in submission.outputs}
            reason = next((r for r in ("error", "abort") if r in reasons), submission.outputs[0].finish_reason)
            self.observer.finished(now - submission.arrival, reason)

    def _fail_all(self, error: str | None) -> None:
        """End every request still held: aborted (shutting down) or failed (the thread died)."""
        for submission in list(self._submissions):
            try:
                self.loop.abort(submission.prepared.request.request_id)
            except Exception:  # the loop is broken: tell the client all the same
                pass
            for index, output in enumerate(submission.outputs):
                if id(output) in self._owner:
                    submission.push(Delta(index, "", (), finish_reason="error" if error else "abort", error=error))
        self._submissions.clear()
        self._owner.clear()
        while True:  # requests that never reached the loop
            try:
                kind, submission = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                submission.push(Delta(0, "", (), finish_reason="error" if error else "abort", error=error))

    def _publish(self) -> None:
        scheduler, pool = self.loop.scheduler, self.loop.pool
        waiting_requests = len({s.request_id for s in scheduler.waiting})  # choices of one request share its id
        self.stats = EngineStats(
            running=len(scheduler.running), waiting=len(scheduler.waiting), waiting_requests=waiting_requests,
            blocks_total=pool.capacity, blocks_used=pool.num_used, blocks_free=pool.num_free,
            blocks_cached=pool.num_cached, prefix_queries=pool.queries, prefix_hits=pool.hits,
            prompt_tokens=self._prompt_tokens, generation_tokens=self.loop.generated_tokens,
            preemptions=scheduler.preemptions, steps=self.loop.steps)

