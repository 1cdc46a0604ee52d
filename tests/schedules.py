"""Random schedules of steps over one block pool, for tests that run the same steps on several backends.

Sequences arrive with random prompts (some repeating another's prefix, served by the prefix cache), prompts are
prefilled in random chunks interleaved with other sequences' decode tokens, and sequences fork (copy-on-write of
the shared partial block), roll back (truncate and regenerate) and leave. A decode token is given by the host,
or, with `fed`, taken on the device from the sequence's last sample.
"""

from __future__ import annotations

import numpy as np

from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.step import FED, Sample, Step, Work

ACTIONS = ("start", "repeat", "step", "step", "step", "fork", "step", "truncate", "free")


class Live:
    """A sequence of the schedule: its table, its tokens, and its last sample (so that a FED token may follow)."""

    def __init__(self, table: BlockTable, tokens: list[int], slot: int, pending: int = 0):
        self.table, self.tokens, self.slot = table, tokens, slot
        self.pending = pending  # tokens at the end of `tokens` not yet computed
        self.sampled: int | None = None  # the last sample, known once its step ran


class Schedule:
    """Steps drawn from `rng`: call next_step() for a step, then took(step, sampled ids) once it has run."""

    def __init__(self, rng: np.random.Generator, num_blocks: int, vocab: int, slots: int, fed: bool = False,
                 max_prompt: int = 40):
        self.rng, self.vocab, self.fed, self.max_prompt = rng, vocab, fed, max_prompt
        self.pool = BlockPool(num_blocks)
        self.live: list[Live] = []
        self.free_slots = list(range(slots))
        self.owners: list[Live] = []  # the sequence of each work of the last step

    def act(self, action: str, pick: int) -> Step | None:
        """Apply one action; a step when the action is "step" (or makes one to have something to run)."""
        rng, live = self.rng, self.live
        if action == "start" or not live:
            self._admit(rng.integers(0, self.vocab, int(rng.integers(1, self.max_prompt))).tolist())
        elif action == "repeat":  # another sequence's prefix, then something new
            source = live[pick % len(live)].tokens
            self._admit(source[: int(rng.integers(1, len(source) + 1))] + rng.integers(0, self.vocab, 3).tolist())
        elif action == "fork" and self.free_slots:
            ready = [s for s in live if s.pending == 0]
            if ready:  # the child writes next into the block it shares: copy-on-write
                parent = ready[pick % len(ready)]
                live.append(Live(parent.table.fork(), list(parent.tokens), self.free_slots.pop()))
        elif action == "truncate":
            victim = live[pick % len(live)]
            if victim.pending == 0 and len(victim.tokens) > 1:
                count = int(rng.integers(1, len(victim.tokens)))
                victim.table.truncate(count)
                del victim.tokens[len(victim.tokens) - count:]
                victim.tokens.append(int(rng.integers(0, self.vocab)))  # regenerate from there
                victim.pending, victim.sampled = 1, None
        elif action == "free":
            gone = live.pop(pick % len(live))
            gone.table.free()
            self.free_slots.append(gone.slot)
        elif action == "step":
            return self.next_step()
        return None

    def _admit(self, tokens: list[int]) -> None:
        if self.free_slots:
            table = BlockTable(self.pool)
            adopted = table.adopt_prefix(tokens)
            self.live.append(Live(table, tokens, self.free_slots.pop(), pending=len(tokens) - adopted))

    def next_step(self, skip: float = 0.3) -> Step | None:
        """A step over a random subset of the live sequences (each skipped with probability `skip`)."""
        works, owners, copies = [], [], []
        for sequence in self.live:
            if self.rng.random() < skip:
                continue
            if sequence.pending:
                count = int(self.rng.integers(1, sequence.pending + 1))  # a prefill chunk
                start = len(sequence.tokens) - sequence.pending
                tokens = sequence.tokens[start:start + count]
            elif self.fed and sequence.sampled is not None and self.rng.random() < 0.5:
                sequence.tokens.append(sequence.sampled)  # the device feeds its slot's last sample
                start, count, tokens = len(sequence.tokens) - 1, 1, [FED]
            else:
                sequence.tokens.append(int(self.rng.integers(0, self.vocab)))  # the host gives the next token
                start, count, tokens = len(sequence.tokens) - 1, 1, sequence.tokens[-1:]
            copies += sequence.table.reserve(start + count - sequence.table.num_tokens)
            sequence.pending = max(0, sequence.pending - count)
            works.append(Work(sequence.slot, start, tokens, list(sequence.table.blocks),
                              Sample(SamplingParams()) if sequence.pending == 0 else None, all_logits=True))
            owners.append(sequence)
        if not works:
            return None
        step = Step.ordered(works, copies=copies)
        self.owners = [owners[works.index(w)] for w in step.works]
        return step

    def took(self, step: Step, sampled) -> None:
        """The step ran: register what it computed, and remember each sequence's sample."""
        samples = iter(sampled)
        for work, sequence in zip(step.works, self.owners):
            sequence.table.register_full(sequence.tokens, work.context)
            sequence.sampled = int(next(samples)) if work.sample else None
