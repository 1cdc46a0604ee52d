"""The engine loop: requests in, steps through a backend, tokens and text out (docs/RUNTIME.md, "The loop").

generate (one request), batch (a file of them) and serve (HTTP) all drive this loop. It owns the scheduler and
the block pool over a backend; each `step()` runs one forward pass. Over an asynchronous backend (CUDA) it is
pipelined: step n+1 is launched before step n's samples are read, so the device never waits for the host.

    >>> loop = EngineLoop(backend, tokenizer)
    >>> out = loop.add(Request("a", tokenizer.encode("Hello"), max_new_tokens=8))
    >>> while loop.has_work: loop.step()
    >>> out.finish_reason
    'length'
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq

from olmoscope.runtime.backend import Backend, PendingStep
from olmoscope.runtime.blocks import BlockPool
from olmoscope.runtime.output import RequestOutput
from olmoscope.runtime.scheduler import Request, Scheduled, Scheduler, Sequence
from olmoscope.runtime.step import StepResult
from olmoscope.runtime.tokenizer import Tokenizer


class EngineLoop:
    """A scheduler over one backend's cache, and the outputs of the requests it holds."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None, pipelined: bool | None = None,
                 prefix_caching: bool = True):
        self.backend = backend
        self.tokenizer = tokenizer
        self.pool = BlockPool(backend.num_blocks, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.pool, backend.limits)
        self.pipelined = getattr(backend, "asynchronous", False) if pipelined is None else pipelined
        self._outputs: dict[Sequence, RequestOutput] = {}  # every running choice
        self._requests: dict[str, list[Sequence]] = {}  # request id → its choices
        self._in_flight: tuple[Scheduled, PendingStep] | None = None
        self.steps = 0  # forward passes run
        self.generated_tokens = 0  # tokens handed to outputs

    # ── requests ──────────────────────────────────────────────────────────────────────────────────────
    def add(self, request: Request, stop: Seq[str] = ()) -> RequestOutput:
        """Queue a request of one choice; its output fills in as steps run."""
        if request.n != 1:
            raise ValueError("a request of several choices goes through add_choices")
        return self.add_choices(request, stop)[0]

    def add_choices(self, request: Request, stop: Seq[str] = ()) -> list[RequestOutput]:
        """Queue a request's n choices (its prompt's full blocks computed once and shared); their outputs."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to see text")
        if request.n < 1:
            raise ValueError(f"n = {request.n}: a request has at least one choice")
        if request.score_from is not None and request.n != 1:
            raise ValueError("a request that scores its prompt has one choice")
        first = Sequence(request)
        choices = [first] + [Sequence(request, i, first) for i in range(1, request.n)]
        outputs = []
        for sequence in choices:
            self.scheduler.add(sequence)
            stream = self.tokenizer.stream() if self.tokenizer else None
            outputs.append(RequestOutput(request.request_id, request.prompt_ids, sequence.seed, stream, stop))
            self._outputs[sequence] = outputs[-1]
        self._requests[request.request_id] = choices
        return outputs

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); its blocks are free for the next step."""
        for sequence in self._requests.pop(request_id, []):
            self.scheduler.abort(sequence)
            output = self._outputs.pop(sequence, None)
            if output is not None:
                output.finish("abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    @staticmethod
    def request_id() -> str:
        return uuid.uuid4().hex

    # ── running ───────────────────────────────────────────────────────────────────────────────────────
    def step(self) -> list[RequestOutput]:
        """One forward pass (pipelined: launch the next, then read the previous); the outputs that changed.

        A step the backend fails (raises on) finishes its requests with "error" and the others go on; see `_fail`.
        """
        if not self.pipelined:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return self._stalled()
            self.steps += 1
            try:
                result = self.backend.run(scheduled.step)
            except Exception as exc:
                return self._fail([scheduled], exc)
            return self._take(scheduled, result)
        scheduled = self.scheduler.schedule()
        try:
            launched = (scheduled, self.backend.launch(scheduled.step)) if scheduled else None
        except Exception as exc:
            return self._fail([s for s in (scheduled, self._take_in_flight()) if s], exc)
        self.steps += launched is not None
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return [] if launched else self._stalled()
        try:
            result = previous[1].result()
        except Exception as exc:
            return self._fail([s for s in (previous[0], self._take_in_flight()) if s], exc)
        return self._take(previous[0], result)

    def _take_in_flight(self) -> Scheduled | None:
        scheduled = self._in_flight[0] if self._in_flight else None
        self._in_flight = None
        return scheduled

    def _fail(self, steps: list[Scheduled], exc: Exception) -> list[RequestOutput]:
        """Finish every request of failed steps with "error". Their positions from those steps are disowned first,
        so that no block the steps should have written is offered to the prefix cache."""
        message = f"the backend failed a step holding this request ({type(exc).__name__}: {exc})"
        for scheduled in steps:
            for sequence, work in zip(scheduled.sequences, scheduled.step.works):
                sequence.computed = min(sequence.computed, work.position)
        failed = []
        for sequence in dict.fromkeys(s for scheduled in steps for s in scheduled.sequences):
            for choice in self._requests.pop(sequence.request_id, []):  # a request's choices fail together
                self.scheduler.abort(choice, "error")
                output = self._outputs.pop(choice, None)
                if output is not None:
                    output.finish("error", message)
                    failed.append(output)
        return failed

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work:
            self.step()

    def _stalled(self) -> list[RequestOutput]:
        if self.scheduler.has_work:  # the pool holds a whole max-context sequence, so this cannot happen
            raise RuntimeError("the scheduler has work but scheduled nothing (the KV pool is too small?)")
        return []

    def _take(self, scheduled: Scheduled, result: StepResult) -> list[RequestOutput]:
        """Hand a step's samples to their outputs; finish those that stopped."""
        changed = []
        for sequence, token in self.scheduler.complete(scheduled, result):
            output = self._outputs.get(sequence)
            if output is None:
                continue
            changed.append(output)
            if token is not None:
                self.generated_tokens += 1
                visible = sequence.finish_reason != "eos"
                if output.add_token(token, visible, sequence.logprob) and not sequence.finished:
                    self.scheduler.abort(sequence, "stop")
            if sequence.finished:
                if sequence.prompt_logprobs is not None and sequence.finish_reason != "error":
                    output.prompt_logprobs = sequence.prompt_logprobs[sequence.request.score_from:].tolist()
                output.finish("stop" if output.stopped else sequence.finish_reason, sequence.error)
                self._release(sequence)
        return changed

    def _release(self, sequence: Sequence) -> None:
        """Forget a finished choice; its request once every choice has finished."""
        del self._outputs[sequence]
        choices = self._requests.get(sequence.request_id, [])
        if all(choice.finished for choice in choices):
            self._requests.pop(sequence.request_id, None)
