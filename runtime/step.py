"""A step: the unit of work a backend runs in one forward pass (docs/RUNTIME.md, "The step").

A ragged batch of sequences, each with its new tokens at explicit positions, concatenated without padding:
single-token sequences (decode) first, then prefill chunks. `pack()` flattens it into the int32/float32 arrays
both backends and the kernels read.

    >>> step = Step([Work(slot=0, position=5, tokens=[42], blocks=[1], sample=Sample(SamplingParams()))])
    >>> step.pack().positions
    array([5], dtype=int32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from olmoscope.runtime.blocks import BLOCK_SIZE
from olmoscope.runtime.sampler import SamplingParams

FED = -1  # a token id the device fills in: the sequence's previous sample, not yet seen by the host
SCORE_ROWS = 256  # backends run lm_head over at most this many scored rows at once: [256, V] f32 (98 MiB, V = 100,352)


@dataclass(frozen=True)
class Sample:
    """Sample a token after a sequence's last new token: with these parameters, and this uniform draw."""

    params: SamplingParams
    u: float = 0.0  # in [0, 1): the run's one random number for this token (unused when greedy)
    logprobs: int | None = None  # also return the token's logprob and this many best alternatives (0 … 20)


@dataclass(frozen=True)
class Score:
    """Prompt scoring: the logprob of targets[i] (the next prompt token) under the logits of the work's row first + i."""

    first: int  # index among the work's new tokens of its first scored row
    targets: Sequence[int]  # one token id per scored row, consecutive rows

    @property
    def count(self) -> int:
        return len(self.targets)


@dataclass
class Work:
    """One sequence's share of a step."""

    slot: int  # the sequence's state slot (its seen-token set and last sample on the device)
    position: int  # the position of its first new token
    tokens: Sequence[int]  # new token ids; FED for a decode token the device supplies
    blocks: Sequence[int]  # its block table: blocks holding positions 0 … position + len(tokens) − 1
    sample: Sample | None = None  # sample after the last new token
    all_logits: bool = False  # return the logits of every new token (tests); else only the sampled one's
    score: Score | None = None  # score these rows against the next prompt tokens (only logprobs come back)

    @property
    def count(self) -> int:
        return len(self.tokens)

    @property
    def context(self) -> int:
        """Positions in the cache once this work is done."""
        return self.position + len(self.tokens)


@dataclass
class Step:
    """The works of one forward pass, plus cache and state upkeep to do first."""

    works: list[Work]  # decode (one token) works first, then prefill chunks: see ordered()
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks, copy-on-write
    fresh_slots: list[int] = field(default_factory=list)  # state slots starting a sequence: seen-set cleared
    seen: list[tuple[int, Sequence[int]]] = field(default_factory=list)  # (slot, ids) of history not computed here
    counted: list[tuple[int, Sequence[int]]] = field(default_factory=list)  # (slot, generated ids) returning as history
    window: int = 0  # attention window for every layer: 0 is full (OLMo 2); a per-layer list goes here later

    @classmethod
    def ordered(cls, works: Sequence[Work], **kwargs) -> Step:
        """A step with the single-token works first, keeping each group's order."""
        single = [w for w in works if w.count == 1]
        return cls(single + [w for w in works if w.count != 1], **kwargs)

    def pack(self, table_width: int | None = None) -> StepArrays:
        """The flat arrays of this step (block tables padded to `table_width` blocks, default the widest)."""
        return StepArrays.of(self, table_width)


@dataclass
class StepArrays:
    """A step as arrays: T token rows, B sequences, R logits rows (S of them sampled), P scored rows."""

    token_ids: np.ndarray  # int32 [T]: FED where the device supplies the id
    positions: np.ndarray  # int32 [T]
    slots: np.ndarray  # int32 [T]: cache slot (block·BLOCK_SIZE + offset) each token's K/V goes to
    token_state: np.ndarray  # int32 [T]: the state slot of each token's sequence
    first_row: np.ndarray  # int32 [B]: each sequence's first token row
    rows: np.ndarray  # int32 [B]: its number of new tokens
    context: np.ndarray  # int32 [B]: its positions in the cache after this step
    block_tables: np.ndarray  # int32 [B, W]
    num_decode: int  # the first num_decode sequences have one row each
    logit_rows: np.ndarray  # int32 [R]: token rows whose logits are computed
    sample_rows: np.ndarray  # int32 [S]: indices into logit_rows of the rows that are sampled
    temperature: np.ndarray  # float64 [S] (a subnormal one must not round to 0 before the device sees it)
    top_k: np.ndarray  # int32 [S]
    top_p: np.ndarray  # float32 [S]
    repetition_penalty: np.ndarray  # float32 [S]
    presence_penalty: np.ndarray  # float32 [S]
    frequency_penalty: np.ndarray  # float32 [S]
    logprobs: np.ndarray  # int32 [S]: alternatives each sampled row asks for, −1 for no logprobs at all
    score_rows: np.ndarray  # int32 [P]: token rows scored against a target (works' Score rows, in step order)
    score_targets: np.ndarray  # int32 [P]: each scored row's target token id
    u: np.ndarray  # float64 [S]: the uniform draws (the GPU takes them as float32)
    sample_state: np.ndarray  # int32 [S]: the state slot of each sampled row
    params: list[SamplingParams]  # [S], for the NumPy sampler

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, step: Step, table_width: int | None = None) -> StepArrays:
        works = step.works
        counts = np.array([w.count for w in works], np.int32)
        num_decode = 0
        while num_decode < len(works) and counts[num_decode] == 1:
            num_decode += 1
        if np.any(counts[num_decode:] == 1) or np.any(counts < 1):
            raise ValueError("a step lists its single-token works first, and every work has a token")
        first_row = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        positions = np.concatenate([np.arange(w.position, w.context) for w in works]).astype(np.int32)
        width = table_width or max(len(w.blocks) for w in works)
        tables = np.zeros((len(works), width), np.int32)
        for i, w in enumerate(works):
            if len(w.blocks) * BLOCK_SIZE < w.context or len(w.blocks) > width:
                raise ValueError(f"work {i}: {len(w.blocks)} blocks for {w.context} positions (table width {width})")
            tables[i, : len(w.blocks)] = w.blocks
        seq_of_row = np.repeat(np.arange(len(works)), counts)
        slots = tables[seq_of_row, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        score_rows, score_targets = [], []
        for i, w in enumerate(works):
            if w.score is not None:
                if w.score.first < 0 or w.score.first + w.score.count > w.count:
                    raise ValueError(f"work {i}: scored rows {w.score.first}…{w.score.first + w.score.count - 1} "
                                     f"outside its {w.count} tokens")
                start = int(first_row[i]) + w.score.first
                score_rows.extend(range(start, start + w.score.count))
                score_targets.extend(w.score.targets)
        logit_rows, sampled = [], []
        for i, w in enumerate(works):
            last = int(first_row[i] + counts[i] - 1)
            logit_rows.extend(range(int(first_row[i]), last + 1) if w.all_logits else [last] if w.sample else [])
            if w.sample:
                sampled.append((len(logit_rows) - 1, w))
        params = [w.sample.params for _, w in sampled]
        return cls(
            token_ids=np.concatenate([np.asarray(w.tokens, np.int64) for w in works]).astype(np.int32),
            positions=positions, slots=slots.astype(np.int32),
            token_state=np.repeat([w.slot for w in works], counts).astype(np.int32),
            first_row=first_row, rows=counts, context=np.array([w.context for w in works], np.int32),
            block_tables=tables, num_decode=num_decode,
            logit_rows=np.array(logit_rows, np.int32), sample_rows=np.array([r for r, _ in sampled], np.int32),
            temperature=np.array([p.temperature for p in params], np.float64),
            top_k=np.array([p.top_k for p in params], np.int32),
            top_p=np.array([p.top_p for p in params], np.float32),
            repetition_penalty=np.array([p.repetition_penalty for p in params], np.float32),
            presence_penalty=np.array([p.presence_penalty for p in params], np.float32),
            frequency_penalty=np.array([p.frequency_penalty for p in params], np.float32),
            logprobs=np.array([-1 if w.sample.logprobs is None else w.sample.logprobs for _, w in sampled], np.int32),
            score_rows=np.array(score_rows, np.int32),
            score_targets=np.array(score_targets, np.int64).astype(np.int32),
            u=np.array([w.sample.u for _, w in sampled], np.float64),
            sample_state=np.array([w.slot for _, w in sampled], np.int32),
            params=params,
        )


@dataclass
class StepResult:
    """What a step gives back: the sampled ids, one per sampled work in step order, and logits when asked.

    A token below 0 marks a row that could not be sampled (its logits hold NaN, or nothing above −inf): the loop
    ends that request with an error. Logprobs come for the rows that asked (Sample.logprobs), else None; scores for
    a step with scored rows (Work.score), in StepArrays.score_rows order, else None.
    """

    tokens: np.ndarray  # int32 [S]
    logits: np.ndarray | None = None  # float32 [R, V]: rows in logit_rows order (raw: before any penalty)
    logprobs: np.ndarray | None = None  # float32 [S]: each sampled token's logprob (raw logits' log-softmax)
    top_ids: np.ndarray | None = None  # int32 [S, K]: the K best alternatives (K = the step's largest request)
    top_logprobs: np.ndarray | None = None  # float32 [S, K]
    scores: np.ndarray | None = None  # float32 [P]: each score target's logprob (log-softmax over all V columns)


SAMPLE_NAN, SAMPLE_NO_MASS = -1, -2  # a row's token when its logits hold NaN / nothing above −inf
