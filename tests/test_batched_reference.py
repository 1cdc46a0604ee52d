"""The batched NumPy reference equals the single-sequence reference bit for bit, over random schedules.

Hypothesis draws schedules over a tiny random model: sequences arriving with random prompts (some repeating
another's prefix, taken from the prefix cache), prompts prefilled in random chunks interleaved with other
sequences' decode steps, decode tokens fed on the device from the last sample (FED) or given by the host,
forks (copy-on-write of the shared partial block), truncations (roll back and regenerate) and frees. Every row
of every step is compared with the same sequence run alone (its whole history in one prefill) by np.array_equal:
a token's numbers must not depend on what else shares its step.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from olmoscope.config import ModelConfig
from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.engine import Engine
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.step import FED, Sample, Step, Work
from olmoscope.spec import engine_tensors
from olmoscope.tiny import tiny_config

VOCAB = 96
SLOTS = 8


def tiny_engine(seed: int = 0) -> Engine:
    raw = tiny_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=256)
    config = ModelConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    arrays = {spec.name: (rng.standard_normal(spec.shape) * (1 if spec.kind == "matrix" else 0.1)
                          + (0 if spec.kind == "matrix" else 1)).astype(np.float32) for spec in engine_tensors(config)}
    return Engine.from_arrays(config, arrays)


ENGINE = tiny_engine()
OPTIONS = RuntimeOptions(max_context=160, max_num_seqs=SLOTS, max_num_batched_tokens=512, kv_cache_gib=0.01)


class Live:
    """A sequence of the schedule: its table, its tokens, and whether its last work sampled (so FED may follow)."""

    def __init__(self, table: BlockTable, tokens: list[int], slot: int, pending: int = 0):
        self.table, self.tokens, self.slot = table, tokens, slot
        self.pending = pending  # tokens of `tokens` not yet computed
        self.sampled: int | None = None  # the last sample, known once its step ran


def alone(tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), V] of the sequence run alone, one prefill over its whole history."""
    with NumpyBackend(ENGINE, OPTIONS) as backend:
        table = BlockTable(BlockPool(backend.num_blocks))
        table.reserve(len(tokens))
        work = Work(0, 0, tokens, list(table.blocks), all_logits=True)
        return backend.run(Step([work], fresh_slots=[0]), return_logits=True).logits


@st.composite
def schedules(draw):
    actions = ["start", "repeat", "step", "step", "step", "fork", "step", "truncate", "free"]
    return draw(st.lists(st.tuples(st.sampled_from(actions), st.integers(0, 10**6)), min_size=4, max_size=20))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules(), seed=st.integers(0, 2**16))
def test_batched_steps_equal_each_sequence_alone(schedule, seed):
    rng = np.random.default_rng(seed)
    backend = NumpyBackend(ENGINE, OPTIONS)
    pool = BlockPool(backend.num_blocks)
    live: list[Live] = []
    free_slots = list(range(SLOTS))
    checked = 0

    def admit(tokens: list[int]) -> None:
        if not free_slots:
            return
        table = BlockTable(pool)
        adopted = table.adopt_prefix(tokens)
        live.append(Live(table, tokens, free_slots.pop(), pending=len(tokens) - adopted))

    for action, pick in schedule:
        if action == "start" or not live:
            admit(rng.integers(0, VOCAB, int(rng.integers(1, 40))).tolist())
        elif action == "repeat":  # another sequence's prefix, then something new: the prefix cache serves it
            source = live[pick % len(live)].tokens
            admit(source[: int(rng.integers(1, len(source) + 1))] + rng.integers(0, VOCAB, 3).tolist())
        elif action == "fork" and free_slots:
            ready = [s for s in live if s.pending == 0] or [None]
            parent = ready[pick % len(ready)]
            if parent is not None:  # the child writes next into the block it shares: copy-on-write
                live.append(Live(parent.table.fork(), list(parent.tokens), free_slots.pop()))
        elif action == "truncate":
            victim = live[pick % len(live)]
            if victim.pending == 0 and len(victim.tokens) > 1:
                count = int(rng.integers(1, len(victim.tokens)))
                victim.table.truncate(count)
                del victim.tokens[len(victim.tokens) - count:]
                victim.tokens.append(int(rng.integers(0, VOCAB)))  # regenerate from there with a new token
                victim.pending, victim.sampled = 1, None
        elif action == "free":
            gone = live.pop(pick % len(live))
            gone.table.free()
            free_slots.append(gone.slot)
        else:
            checked += run_step(backend, pool, live, rng)
    checked += run_step(backend, pool, live, rng, skip=0.0)  # a last step with every live sequence
    backend.close()
    assert checked or not live


def run_step(backend: NumpyBackend, pool: BlockPool, live: list[Live], rng, skip: float = 0.3) -> int:
    """One step over a random subset of the live sequences; every row checked against the sequence alone."""
    works, owners, copies = [], [], []
    for sequence in live:
        if rng.random() < skip:
            continue  # not scheduled this step
        if sequence.pending:
            count = int(rng.integers(1, sequence.pending + 1))  # a prefill chunk
            start = len(sequence.tokens) - sequence.pending
            tokens = sequence.tokens[start:start + count]
        elif sequence.sampled is not None and rng.random() < 0.5:
            sequence.tokens.append(sequence.sampled)  # fed on the device from its slot's last sample
            start, count, tokens = len(sequence.tokens) - 1, 1, [FED]
        else:
            sequence.tokens.append(int(rng.integers(0, VOCAB)))  # the host gives the next token
            start, count, tokens = len(sequence.tokens) - 1, 1, sequence.tokens[-1:]
        copies += sequence.table.reserve(start + count - sequence.table.num_tokens)
        sequence.pending = max(0, sequence.pending - count)
        works.append(Work(sequence.slot, start, tokens, list(sequence.table.blocks),
                          Sample(SamplingParams()) if sequence.pending == 0 else None, all_logits=True))
        owners.append(sequence)
    if not works:
        return 0
    step = Step.ordered(works, copies=copies)
    order = [owners[works.index(w)] for w in step.works]
    result = backend.run(step, return_logits=True)
    rows, samples = 0, iter(result.tokens)
    for work, sequence in zip(step.works, order):
        got = result.logits[rows:rows + work.count]
        rows += work.count
        want = alone(sequence.tokens[: work.context])[work.position:]
        assert np.array_equal(got, want), (
            f"sequence at slot {sequence.slot}, positions {work.position}…{work.context - 1}: batched logits differ "
            f"from the sequence alone (max |Δ| {np.abs(got - want).max():.3g})")
        sequence.table.register_full(sequence.tokens, work.context)
        sequence.sampled = None
        if work.sample:
            sequence.sampled = int(next(samples))
            assert sequence.sampled == int(np.argmax(got[-1])), "the greedy sample is not the argmax of its logits"
    return len(step.works)
