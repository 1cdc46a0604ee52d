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
        self._outputs: dict[str, tuple[Sequence, RequestOutput]] = {}
        self._in_flight: tuple[Scheduled, PendingStep] | None = None
        self.steps = 0  # forward passes run
        self.generated_tokens = 0  # tokens handed to outputs

    # ── requests ──────────────────────────────────────────────────────────────────────────────────────
    def add(self, request: Request, stop: Seq[str] = ()) -> RequestOutput:
        """Queue a request; its output fills in as steps run."""
        if request.request_id in self._outputs:
            raise ValueError(f"request id {request.request_id!r} is already running")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to see text")
        sequence = Sequence(request)
        self.scheduler.add(sequence)
        stream = self.tokenizer.stream() if self.tokenizer else None
        output = RequestOutput(request.request_id, request.prompt_ids, sequence.seed, stream, stop)
        self._outputs[request.request_id] = (sequence, output)
        return output

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); its blocks are free for the next step."""
        held = self._outputs.pop(request_id, None)
        if held:
            sequence, output = held
            self.scheduler.abort(sequence)
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

        A step the backend fails finishes its requests with "error" (the others go on); see `_fail`.
        """
        if not self.pipelined:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return self._stalled()
            self.steps += 1
            try:
                tokens = self.backend.run(scheduled.step).tokens
            except Exception as exc:
                return self._fail([scheduled], exc)
            return self._take(scheduled, tokens)
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
            tokens = previous[1].result().tokens
        except Exception as exc:
            return self._fail([s for s in (previous[0], self._take_in_flight()) if s], exc)
        return self._take(previous[0], tokens)

    def _take_in_flight(self) -> Scheduled | None:
        scheduled = self._in_flight[0] if self._in_flight else None
        self._in_flight = None
        return scheduled

    def _fail(self, steps: list[Scheduled], exc: Exception) -> list[RequestOutput]:
        """Finish every request of failed steps with "error"; their cache positions from those steps are disowned
        first, so that no block the steps should have written is offered to the prefix cache."""
        message = f"the backend failed a step holding this request ({type(exc).__name__}: {exc})"
        for scheduled in steps:
            for sequence, work in zip(scheduled.sequences, scheduled.step.works):
                sequence.computed = min(sequence.computed, work.position)
        return [self._drop(sequence, message) for scheduled in steps for sequence in scheduled.sequences
                if sequence.request_id in self._outputs]

    def _drop(self, sequence: Sequence, message: str) -> RequestOutput:
        """End one request with an error; its blocks are free for the next step."""
        _, output = self._outputs.pop(sequence.request_id)
        self.scheduler.abort(sequence, "error")
        output.finish("error", message)
        return output

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work:
            self.step()

    def _stalled(self) -> list[RequestOutput]:
        if self.scheduler.has_work:  # the pool holds a whole max-context sequence, so this cannot happen
            raise RuntimeError("the scheduler has work but scheduled nothing (the KV pool is too small?)")
        return []

    def _take(self, scheduled: Scheduled, tokens) -> list[RequestOutput]:
        """Hand a step's samples to their outputs; finish those that stopped, and those given an impossible id."""
        changed = []
        limit = self.backend.vocab_limit
        for sequence, token in zip(scheduled.sampled, tokens):
            if not 0 <= int(token) < limit and sequence.request_id in self._outputs and not sequence.finished:
                # a sampler fed non-finite scores (an edge-value temperature or penalty) can answer past the
                # vocabulary: that request fails alone, before the id reaches its tokens or the device
                changed.append(self._drop(sequence, f"the sampler chose token id {int(token)}, outside the "
                                                    f"vocabulary of {limit} (non-finite scores?)"))
        for sequence in self.scheduler.complete(scheduled, tokens):
            held = self._outputs.get(sequence.request_id)
            if held is None:
                continue
            output = held[1]
            changed.append(output)
            self.generated_tokens += 1
            visible = sequence.finish_reason != "eos"
            if output.add_token(sequence.tokens[-1], visible) and not sequence.finished:
                self.scheduler.abort(sequence, "stop")
            if sequence.finished:
                output.finish("stop" if output.stopped else sequence.finish_reason)
                del self._outputs[sequence.request_id]
        return changed
