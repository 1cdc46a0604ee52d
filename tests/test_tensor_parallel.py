"""Tensor parallelism on the CPU (issue 13): the shard plan and N ranks' forward pass emulated in NumPy equal the
unsharded reference. The collectives are sums in rank order, so only float32 reassociation separates the two:
bounded by 1e-5 relative (the worst seen is printed)."""

from __future__ import annotations

import numpy as np
import pytest

from olmoscope.config import ModelConfig
from olmoscope.errors import UsageError
from olmoscope.runtime import reference
from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.engine import Engine
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.step import Step, Work
from olmoscope.runtime.tensor_parallel import ShardPlan, sharded_forward
from olmoscope.spec import engine_tensors
from olmoscope.tiny import tiny_config

TOLERANCE = 1e-5


def engine(num_heads: int, num_kv_heads: int, seed: int = 0) -> Engine:
    raw = tiny_config(hidden_size=64, num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=96,
                      max_position_embeddings=256, intermediate_size=128)
    config = ModelConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    arrays = {spec.name: (rng.standard_normal(spec.shape) * (0.3 if spec.kind == "matrix" else 0.1)
                          + (0 if spec.kind == "matrix" else 1)).astype(np.float32) for spec in engine_tensors(config)}
    return Engine.from_arrays(config, arrays)


def two_sequence_step(backend: NumpyBackend, rng) -> tuple:
    """A prefill of 21 tokens and one of 6, in one step, with every row's logits."""
    pool = BlockPool(backend.num_blocks)
    works = []
    for slot, length in enumerate((21, 6)):
        table = BlockTable(pool)
        table.reserve(length)
        works.append(Work(slot, 0, rng.integers(0, 96, length).tolist(), list(table.blocks), all_logits=True))
    step = Step(works, fresh_slots=[0, 1])
    arrays = backend.check_step(step)
    return arrays, np.concatenate([w.tokens for w in works]).astype(np.int64)


@pytest.mark.parametrize("heads,kv_heads,ranks", [(4, 4, 2), (4, 2, 2), (8, 4, 4), (4, 2, 1)])
def test_n_ranks_emulated_equal_the_unsharded_reference(heads, kv_heads, ranks):
    model = engine(heads, kv_heads, seed=ranks)
    with NumpyBackend(model, RuntimeOptions(max_context=128, max_num_seqs=4)) as backend:
        arrays, ids = two_sequence_step(backend, np.random.default_rng(heads + ranks))
        cfg = backend.config
        whole, _ = reference.forward(cfg, backend.weights, arrays, ids,
                                  reference.PagedKV(cfg.num_hidden_layers, backend.num_blocks, kv_heads, cfg.head_dim))
        plan = ShardPlan(cfg, ranks)
        shards = [plan.model(backend.weights, r) for r in range(ranks)]
        caches = [reference.PagedKV(cfg.num_hidden_layers, backend.num_blocks, kv_heads // ranks, cfg.head_dim)
                  for _ in range(ranks)]
        sharded = sharded_forward(plan, shards, arrays, ids, caches)
    err = float(np.max(np.abs(sharded - whole)) / np.max(np.abs(whole)))
    print(f"H {heads}, Hkv {kv_heads}, TP {ranks}: rel err {err:.2e} over {whole.shape[0]} rows")
    assert sharded.shape == whole.shape
    assert err <= TOLERANCE, f"sharded logits differ from the unsharded reference by {err:.2e}"


def test_a_rank_holds_its_heads_rows_of_each_part_and_the_matching_columns():
    cfg = engine(4, 2).config
    plan = ShardPlan(cfg, 2)
    d, q = cfg.head_dim, cfg.q_width
    rows = plan.qkv_rows(1)
    assert rows.tolist() == [*range(2 * d, 4 * d), *range(q + d, q + 2 * d), *range(q + cfg.kv_width + d,
                                                                                   q + cfg.kv_width + 2 * d)]
    I = cfg.intermediate_size
    assert plan.gate_up_rows(0).tolist() == [*range(0, I // 2), *range(I, I + I // 2)]
    every = np.concatenate([plan.qkv_rows(r) for r in range(2)])
    assert sorted(every.tolist()) == list(range(q + 2 * cfg.kv_width)), "the ranks' rows must cover qkv once"


def test_a_count_that_does_not_divide_the_heads_is_one_clear_error():
    cfg = engine(4, 2).config
    with pytest.raises(UsageError, match="does not divide the model's 2 key/value heads"):
        ShardPlan(cfg, 4)
