"""The batched NumPy reference equals the single-sequence reference bit for bit, over random schedules.

Hypothesis draws schedules (tests/schedules.py) over a tiny random model: sequences arriving with random prompts
(some repeating another's prefix, taken from the prefix cache), prompts prefilled in random chunks interleaved
with other sequences' decode steps, decode tokens fed on the device from the last sample (FED) or given by the
host, forks (copy-on-write of the shared partial block), truncations (roll back and regenerate) and frees. Every
row of every step is compared with the same sequence run alone (its whole history in one prefill) by
np.array_equal: a token's numbers must not depend on what else shares its step.
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
from olmoscope.runtime.step import Step, Work
from olmoscope.spec import engine_tensors
from olmoscope.tiny import tiny_config
from schedules import ACTIONS, Schedule

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


def alone(tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), V] of the sequence run alone, one prefill over its whole history."""
    with NumpyBackend(ENGINE, OPTIONS) as backend:
        table = BlockTable(BlockPool(backend.num_blocks))
        table.reserve(len(tokens))
        work = Work(0, 0, tokens, list(table.blocks), all_logits=True)
        return backend.run(Step([work], fresh_slots=[0]), return_logits=True).logits


def check_against_alone(schedule: Schedule, step: Step, result) -> None:
    rows = 0
    for work, sequence in zip(step.works, schedule.owners):
        got = result.logits[rows:rows + work.count]
        rows += work.count
        want = alone(sequence.tokens[: work.context])[work.position:]
        assert np.array_equal(got, want), (
            f"sequence at slot {sequence.slot}, positions {work.position}…{work.context - 1}: batched logits differ "
            f"from the sequence alone (max |Δ| {np.abs(got - want).max():.3g})")
    greedy = [int(np.argmax(result.logits[w_end - 1])) for w_end, w in zip(np.cumsum([w.count for w in step.works]),
                                                                            step.works) if w.sample]
    assert result.tokens.tolist() == greedy, "a greedy sample is not the argmax of its logits"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 10**6)), min_size=4, max_size=20),
       seed=st.integers(0, 2**16))
def test_batched_steps_equal_each_sequence_alone(actions, seed):
    backend = NumpyBackend(ENGINE, OPTIONS)
    schedule = Schedule(np.random.default_rng(seed), backend.num_blocks, VOCAB, SLOTS, fed=True)
    ran = 0
    for action, pick in actions + [("last", 0)]:
        step = schedule.act(action, pick) if action != "last" else schedule.next_step(skip=0.0)
        if step is not None:
            result = backend.run(step, return_logits=True)
            check_against_alone(schedule, step, result)
            schedule.took(step, result.tokens)
            ran += 1
    backend.close()
    assert ran or not schedule.live, "the schedule ran no step"
