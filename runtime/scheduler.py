"""The scheduler: which sequences run in the next step, and what each one computes (docs/RUNTIME.md, "The scheduler").

Continuous batching at iteration level, first come first served: every step takes one decode token of each
running sequence, then prompt chunks (running ones first, then waiting ones) up to a token budget and a cap on
sequences. Full blocks are found again by their prefix hash, so a repeated prompt prefix is not recomputed.
When the pool runs out, the newest running sequence is preempted: its blocks are freed and it is recomputed
later (its generated tokens kept). Plain Python: it runs the same over both backends.

Pipelining: the engine loop launches step n+1 before it has read step n's samples. A decode token is then "fed"
on the device (Work.tokens = [FED]): the host knows only that the sequence has one sample in flight. A sequence
that turns out to have finished at step n had one wasted row in step n+1; nothing else is lost.

    >>> scheduler = Scheduler(BlockPool(1024), Limits(max_context=2048))
    >>> scheduler.add(Sequence(Request("a", [1, 2, 3], SamplingParams(), max_new_tokens=4)))
    >>> [w.tokens for w in scheduler.schedule().step.works]
    [[1, 2, 3]]
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from olmoscope.runtime.blocks import BLOCK_SIZE, BlockPool, BlockTable, OutOfBlocks
from olmoscope.runtime.sampler import SamplingParams, TokenLogprob, make_rng
from olmoscope.runtime.step import FED, SAMPLE_NAN, SAMPLE_NO_MASS, Sample, Score, Step, StepResult, Work

FINISH_REASONS = ("eos", "stop", "length", "context", "abort", "error")
SAMPLING_ERRORS = {
    SAMPLE_NAN: "the model's logits hold NaN, so no token can be chosen (corrupt or overflowing weights? "
                "`olmoscope verify` checks the file)",
    SAMPLE_NO_MASS: "every token's logit is -inf, so no token can be chosen",
}


@dataclass(frozen=True)
class Limits:
    """What a scheduler may put in one step, and how long a sequence may grow."""

    max_context: int  # positions one sequence may hold (prompt + generated)
    max_num_seqs: int = 256  # sequences running at once (state slots)
    max_num_batched_tokens: int = 4096  # token rows in one step

    def __post_init__(self) -> None:
        for name in ("max_context", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def table_width(self) -> int:
        """Blocks a sequence's table can hold."""
        return -(-self.max_context // BLOCK_SIZE)


@dataclass
class Request:
    """What a client asks for: a prompt, how to sample, when to stop."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    seed: int | None = None  # None: a fresh one (reported, so the run can be repeated)
    eos_ids: frozenset[int] = frozenset()
    n: int = 1  # choices: n sequences from one prompt, its full blocks computed once (the prefix cache)
    logprobs: int | None = None  # return each token's logprob and this many best alternatives (0 … 20)
    score_from: int | None = None  # prompt scoring: the logprob of each prompt token from this position (≥ 1) on


class Sequence:
    """One choice of a request being generated: its tokens, its blocks, and where it stands.

    Choice i > 0 of a seeded request draws from the seed sequence [seed, i] (choice 0 from the seed itself, so
    n = 1 repeats what `generate --seed` gives); it waits to be admitted until the first choice's prompt blocks
    are in the prefix cache, so that the prompt is computed once.

    Prompt scoring (request.score_from = s): prompt_logprobs[p] for p ≥ s is log P(prompt[p] | prompt[:p]), from the
    logits of row p − 1, filled as the steps that compute those rows complete (a recomputation after preemption
    writes the same values again). A request of max_new_tokens 0 finishes ("length") once its prompt is computed.
    """

    def __init__(self, request: Request, choice: int = 0, first: Sequence | None = None):
        self.request = request
        self.choice = choice  # index among the request's n choices
        self.first = first  # choice 0, whose prompt blocks this one shares
        if choice and request.seed is not None:
            self.rng, self.seed = np.random.default_rng([request.seed, choice]), request.seed
        else:
            self.rng, self.seed = make_rng(request.seed)
        self.tokens: list[int] = [int(t) for t in request.prompt_ids]  # prompt then generated, as known on the host
        self.prompt_len = len(self.tokens)
        self.in_flight = 0  # samples launched but not yet read
        self.computed = 0  # positions whose K/V a launched step writes
        self.table: BlockTable | None = None
        self.slot: int | None = None  # state slot while running
        self.status = "waiting"  # waiting | running | finished
        self.finish_reason: str | None = None
        self.error: str | None = None  # why, when finish_reason is "error"
        self.logprob = None  # the last token's TokenLogprob, when the request asked for logprobs
        scoring = request.score_from is not None
        self.prompt_logprobs = np.full(self.prompt_len, np.nan, np.float32) if scoring else None  # [prompt_len]
        self.preemptions = 0
        self.arrival = time.perf_counter()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        """Generated tokens, those in flight included."""
        return len(self.tokens) - self.prompt_len + self.in_flight

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.status == "finished"


@dataclass
class Scheduled:
    """A step and, for each of its sampled works in order, the sequence the sample belongs to."""

    step: Step
    sampled: list[Sequence]  # one per Work with a sample, in step order
    sequences: list[Sequence]  # one per Work


class Scheduler:
    """Waiting and running sequences over one block pool; `schedule()` makes steps, `complete()` takes their samples."""

    def __init__(self, pool: BlockPool, limits: Limits):
        self.pool = pool
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self._free_slots = list(range(limits.max_num_seqs - 1, -1, -1))  # a stack, low slots first
        self.preemptions = 0

    # ── requests ───────────────────────────────────────────────────────────────────────────────────────
    def add(self, sequence: Sequence) -> None:
        """Queue a sequence (its prompt must fit the context, with room for at least one token)."""
        if not 1 <= sequence.prompt_len <= self.limits.max_context:
            raise ValueError(f"prompt of {sequence.prompt_len} tokens for a context of {self.limits.max_context}")
        score_from = sequence.request.score_from
        if score_from is not None and not 1 <= score_from < sequence.prompt_len:
            raise ValueError(f"score_from {score_from}: a prompt of {sequence.prompt_len} tokens scores positions "
                             f"1 … {sequence.prompt_len - 1}")
        self.waiting.append(sequence)

    def abort(self, sequence: Sequence, reason: str = "abort") -> None:
        """Finish a sequence now (client gone, stop string seen): its blocks and slot are free for the next step."""
        if not sequence.finished:
            self._finish(sequence, reason)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ── making a step ────────────────────────────────────────────────────────────────────────────────
    def schedule(self) -> Scheduled | None:
        """The next step, or None when nothing can run now."""
        plan = _Plan(self.limits.max_num_batched_tokens)
        for sequence in list(self.running):
            if sequence.status == "running" and sequence.computed >= len(sequence.tokens):
                self._plan_decode(sequence, plan)
        for sequence in list(self.running):
            if sequence.status == "running" and sequence.computed < len(sequence.tokens) and plan.budget:
                self._plan_chunk(sequence, plan)
        self._admit(plan)
        return plan.scheduled() if plan.works else None

    def _plan_decode(self, sequence: Sequence, plan: _Plan) -> None:
        """One fed token: the sample in flight, at the next position; nothing when that sample is the last."""
        if sequence.in_flight == 0 or not self._may_continue(sequence) or not plan.budget:
            return
        if not self._reserve(sequence, 1, plan):
            return
        plan.add(sequence, Work(sequence.slot, sequence.computed, [FED], list(sequence.table.blocks),
                                self._sample(sequence)))
        sequence.computed += 1
        sequence.in_flight += 1

    def _plan_chunk(self, sequence: Sequence, plan: _Plan, may_preempt: bool = True) -> bool:
        """The next chunk of known tokens (a prompt, or history being recomputed); False when it does not fit."""
        count = min(len(sequence.tokens) - sequence.computed, plan.budget)
        if not self._reserve(sequence, count, plan, may_preempt):
            return False
        start = sequence.computed
        sample = start + count == len(sequence.tokens) and sequence.request.max_new_tokens > 0
        plan.add(sequence, Work(sequence.slot, start, sequence.tokens[start:start + count],
                                list(sequence.table.blocks), self._sample(sequence) if sample else None,
                                score=self._score(sequence, start, count)))
        sequence.computed += count
        if sample:
            sequence.in_flight += 1
        return True

    @staticmethod
    def _score(sequence: Sequence, start: int, count: int) -> Score | None:
        """The rows of a chunk that a scoring request wants scored: prompt rows s − 1 … P − 2, each against the next
        prompt token (for a chunk's last row, the first of the next chunk)."""
        score_from = sequence.request.score_from
        if score_from is None:
            return None
        first, end = max(start, score_from - 1), min(start + count, sequence.prompt_len - 1)
        return Score(first - start, sequence.tokens[first + 1:end + 1]) if first < end else None

    def _admit(self, plan: _Plan) -> None:
        """Waiting sequences, oldest first, while budget, slots and free blocks last (they never preempt)."""
        while self.waiting and plan.budget and self._free_slots:
            sequence = self.waiting[0]
            if sequence.in_flight or self._awaits_first(sequence):  # a sample still in flight, or a shared prompt
                return
            sequence.table = BlockTable(self.pool)
            adopted = sequence.computed = sequence.table.adopt_prefix(self._adoptable(sequence))
            sequence.slot = self._free_slots.pop()
            sequence.status = "running"
            self.running.append(sequence)
            if not self._plan_chunk(sequence, plan, may_preempt=False):
                self._evict(sequence)
                return
            self.waiting.popleft()
            plan.fresh_slots.append(sequence.slot)
            if adopted:  # history taken from the prefix cache, never fed: mark it seen all the same
                plan.seen.append((sequence.slot, sequence.tokens[:adopted]))
            if sequence.generated:  # recomputed after preemption: its generated tokens count again
                plan.counted.append((sequence.slot, sequence.generated))

    @staticmethod
    def _adoptable(sequence: Sequence) -> list[int]:
        """The tokens whose cached blocks a sequence may adopt: not its last (its logits are needed), and for prompt
        scoring nothing from row score_from − 1 on (those rows' logits are needed too)."""
        score_from = sequence.request.score_from
        return sequence.tokens if score_from is None else sequence.tokens[:score_from]

    def _awaits_first(self, sequence: Sequence) -> bool:
        """A later choice waits while the first is running and its prompt's full blocks are not yet cached."""
        first = sequence.first
        if first is None or first.status != "running" or not self.pool.prefix_caching:
            return False
        return first.table.registered < (first.prompt_len - 1) // self.pool.block_size

    def _reserve(self, sequence: Sequence, count: int, plan: _Plan, may_preempt: bool = True) -> bool:
        """Blocks for `count` more positions. When the pool is dry, running sequences newer than this one are
        preempted, newest first; when there are none, this one is (it starts over once others have finished)."""
        while True:
            try:
                plan.copies.extend(sequence.table.reserve(count))
                return True
            except OutOfBlocks:
                if not may_preempt:
                    return False
                newer = self.running[self.running.index(sequence) + 1:]
                victim = next((s for s in reversed(newer) if s not in plan.sequences), None)
                if victim is None:
                    self._preempt(sequence)
                    return False
                self._preempt(victim)

    def _preempt(self, sequence: Sequence) -> None:
        """Free a running sequence's blocks and queue it first among the waiting: it is recomputed from its tokens."""
        self._evict(sequence)
        sequence.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(sequence)

    def _evict(self, sequence: Sequence) -> None:
        """Back to waiting with nothing held (blocks, slot)."""
        self.running.remove(sequence)
        sequence.table.free()
        sequence.table = None
        self._free_slots.append(sequence.slot)
        sequence.slot = None
        sequence.computed = 0
        sequence.status = "waiting"

    def _may_continue(self, sequence: Sequence) -> bool:
        """Another token may be sampled: under max_new_tokens, and the fed one fits the context."""
        return (sequence.num_generated < sequence.request.max_new_tokens
                and sequence.computed < self.limits.max_context)

    @staticmethod
    def _sample(sequence: Sequence) -> Sample:
        params = sequence.request.params
        return Sample(params, 0.0 if params.greedy else float(sequence.rng.random()), sequence.request.logprobs)

    # ── taking a step's samples ──────────────────────────────────────────────────────────────────────
    def complete(self, scheduled: Scheduled, result: StepResult) -> list[tuple[Sequence, int | None]]:
        """Append each sample to its sequence (unless it finished meanwhile): (sequence, the token it took), or
        (sequence, None) for one that ends without a token — a row that could not be sampled ends its sequence with
        finish reason "error" (sequence.error says why)."""
        updated: list[tuple[Sequence, int | None]] = self._take_scores(scheduled, result)
        for i, (sequence, token) in enumerate(zip(scheduled.sampled, result.tokens.tolist())):
            sequence.in_flight -= 1
            if sequence.finished:
                continue  # a wasted row: the sequence ended at the step before
            if token < 0:
                sequence.error = SAMPLING_ERRORS.get(token, f"sampling failed ({token})")
                self._finish(sequence, "error")
                updated.append((sequence, None))
                continue
            sequence.tokens.append(token)
            sequence.logprob = token_logprob(result, i, token, sequence.request.logprobs)
            updated.append((sequence, token))
            reason = self._finish_reason(sequence, token)
            if reason:
                self._finish(sequence, reason)
        for sequence in scheduled.sequences:
            if sequence.table is not None:
                sequence.table.register_full(sequence.tokens, sequence.computed)
        return updated

    def _take_scores(self, scheduled: Scheduled, result: StepResult) -> list[tuple[Sequence, None]]:
        """Each scored work's logprobs into its sequence; finish the requests of no new tokens whose prompt this step
        ended: (sequence, None) for each of those. Every earlier chunk's step has completed by then (steps complete in
        launch order), so their prompt_logprobs are whole."""
        ended, offset = [], 0
        for sequence, work in zip(scheduled.sequences, scheduled.step.works):
            if work.score is not None:
                first, count = work.position + work.score.first + 1, work.score.count  # targets' positions, how many
                if not sequence.finished:
                    sequence.prompt_logprobs[first:first + count] = result.scores[offset:offset + count]
                offset += count
            if (sequence.request.max_new_tokens == 0 and work.context == sequence.prompt_len
                    and not sequence.finished):
                self._finish(sequence, "length")
                ended.append((sequence, None))
        return ended

    def _finish_reason(self, sequence: Sequence, token: int) -> str | None:
        if token in sequence.request.eos_ids:
            return "eos"
        if len(sequence.tokens) - sequence.prompt_len >= sequence.request.max_new_tokens:
            return "length"
        if len(sequence.tokens) > self.limits.max_context:  # the new token has no position left
            return "context"
        return None

    def _finish(self, sequence: Sequence, reason: str) -> None:
        if sequence in self.waiting:  # preempted, or never started
            self.waiting.remove(sequence)
        if sequence.status == "running":
            self.running.remove(sequence)
            sequence.table.register_full(sequence.tokens, sequence.computed)
            sequence.table.free()
            self._free_slots.append(sequence.slot)
        sequence.table, sequence.slot = None, None
        sequence.status, sequence.finish_reason = "finished", reason


class _Plan:
    """A step being assembled."""

    def __init__(self, budget: int):
        self.budget = budget  # token rows left
        self.works: list[Work] = []
        self.sequences: list[Sequence] = []
        self.copies: list[tuple[int, int]] = []
        self.fresh_slots: list[int] = []
        self.seen: list[tuple[int, list[int]]] = []
        self.counted: list[tuple[int, list[int]]] = []

    def add(self, sequence: Sequence, work: Work) -> None:
        self.works.append(work)
        self.sequences.append(sequence)
        self.budget -= work.count

    def scheduled(self) -> Scheduled:
        single = [i for i, w in enumerate(self.works) if w.count == 1]
        order = single + [i for i, w in enumerate(self.works) if w.count != 1]
        works = [self.works[i] for i in order]
        sequences = [self.sequences[i] for i in order]
        step = Step(works, copies=self.copies, fresh_slots=self.fresh_slots, seen=self.seen, counted=self.counted)
        return Scheduled(step, [s for s, w in zip(sequences, works) if w.sample], sequences)



def token_logprob(result: StepResult, row: int, token: int, alternatives: int | None) -> TokenLogprob | None:
    """Row `row`'s TokenLogprob with its best `alternatives` (None when the request asked for no logprobs)."""
    if alternatives is None or result.logprobs is None:
        return None
    pairs = zip(result.top_ids[row, :alternatives], result.top_logprobs[row, :alternatives])
    return TokenLogprob(token, float(result.logprobs[row]), [(int(t), float(lp)) for t, lp in pairs if t >= 0])
