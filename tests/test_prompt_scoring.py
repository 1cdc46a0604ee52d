"""Prompt scoring through the scheduler and the engine loop on the NumPy backend (Request.score_from).

Each scored prompt token's logprob equals the log-softmax (float64, over all V columns) of the logits the same
prompt gets in one all-logits prefill (tests/stepping.py, a different path: logit rows, not scored rows), within
2e-6; run beside other requests, in small chunks, with a pool small enough to preempt, it equals the same request
run alone bit for bit, and the generation requests it runs beside give the tokens they give alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BLOCK_SIZE, BlockPool
from olmoscope.runtime.loop import EngineLoop
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.scheduler import Limits, Request, Scheduler, Sequence
from olmoscope.runtime.step import Score, Step, StepResult, Work
from stepping import prompt_logits
from test_batched_reference import ENGINE, VOCAB
from test_scheduler import alone as generated_alone
from test_scheduler import requests as generation_requests

TOLERANCE = 2e-6  # |Δ logprob|: float32 logits through two row layouts, each log-softmax summed in float64


def scoring_requests(count: int, seed: int = 7) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(0, VOCAB, int(rng.integers(2, 90))).tolist()
        out.append(Request(f"s{i}", prompt, max_new_tokens=0, score_from=int(rng.integers(1, len(prompt)))))
    return out


def run(reqs: list[Request], **options) -> tuple[dict, EngineLoop]:
    pipelined = options.pop("pipelined", False)
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, **options))
    loop = EngineLoop(backend, pipelined=pipelined)
    outputs = [loop.add(r) for r in reqs]
    loop.run()
    return {o.request_id: o for o in outputs}, loop


def log_softmax_targets(logits: np.ndarray, tokens: list[int], score_from: int) -> np.ndarray:
    """log P(tokens[p] | tokens[:p]) for p ≥ score_from, from logits [len, V] of every prompt position."""
    rows = logits[score_from - 1:len(tokens) - 1].astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
    return rows[np.arange(len(rows)), tokens[score_from:]] - log_z


@pytest.fixture(scope="module")
def scored_alone():
    reqs = scoring_requests(10)
    return reqs, {r.request_id: run([r])[0][r.request_id].prompt_logprobs for r in reqs}


def test_scores_are_the_log_softmax_of_each_prompt_position(scored_alone):
    reqs, alone = scored_alone
    with NumpyBackend(ENGINE, RuntimeOptions(max_context=128)) as backend:
        for request in reqs:
            want = log_softmax_targets(prompt_logits(backend, request.prompt_ids), request.prompt_ids,
                                       request.score_from)
            got = np.array(alone[request.request_id])
            assert got.shape == want.shape, request.request_id
            err = np.abs(got - want).max()
            print(f"{request.request_id}: {len(got)} scores, max |Δ| {err:.1e}")
            assert err <= TOLERANCE, f"{request.request_id}: max |Δ logprob| {err:.2e}"


@pytest.mark.parametrize("options", [
    dict(max_num_seqs=16),
    dict(max_num_seqs=16, pipelined=True),
    dict(max_num_seqs=5, max_num_batched_tokens=24),
    dict(max_num_seqs=16, max_num_batched_tokens=40, kv_cache_gib=12 * 8192 / 2**30, pipelined=True),
], ids=["all-at-once", "pipelined", "chunked-5-seqs", "small-pool-preempts"])
def test_scores_and_generations_beside_each_other_equal_each_alone(scored_alone, options):
    scoring, alone = scored_alone
    generating = generation_requests(8)
    mixed = [r for pair in zip(scoring, generating) for r in pair] + scoring[len(generating):]
    outputs, loop = run(mixed, **options)
    for request in scoring:
        output = outputs[request.request_id]
        assert output.finish_reason == "length" and output.token_ids == []
        assert output.prompt_logprobs == alone[request.request_id], f"{request.request_id}: scores changed"
    for request in generating:
        output = outputs[request.request_id]
        assert (output.token_ids, output.finish_reason) == generated_alone(request), request.request_id
    if "kv_cache_gib" in options:
        assert loop.scheduler.preemptions > 0, "the small pool was meant to preempt"
    assert loop.pool.num_used == 0 and not loop.scheduler.running and not loop.scheduler.waiting, "leaked"


@pytest.mark.parametrize("score_from,adopted", [(1, 0), (16, 0), (17, 16), (33, 32), (47, 32)])
def test_a_scoring_request_adopts_cached_blocks_only_before_its_first_scored_row(score_from, adopted):
    pool = BlockPool(64)
    scheduler = Scheduler(pool, Limits(max_context=128))
    prompt = list(range(1, 60))
    scheduler.add(Sequence(Request("cached", prompt, max_new_tokens=1)))
    first = scheduler.schedule()
    scheduler.complete(first, StepResult(np.array([5], np.int32)))
    assert pool.num_cached >= 3
    scheduler.add(Sequence(Request("scored", prompt, max_new_tokens=0, score_from=score_from)))
    work = scheduler.schedule().step.works[-1]
    assert work.position == adopted, f"score_from {score_from}: computed from {work.position}, not {adopted}"
    assert work.score.first + work.position == score_from - 1 and work.score.count == len(prompt) - score_from


def test_a_chunk_boundary_row_is_scored_against_the_next_chunk():
    scheduler = Scheduler(BlockPool(64), Limits(max_context=128, max_num_batched_tokens=BLOCK_SIZE))
    prompt = list(range(100, 140))
    scheduler.add(Sequence(Request("s", prompt, max_new_tokens=0, score_from=1)))
    work = scheduler.schedule().step.works[0]
    assert (work.position, work.count, work.score.first) == (0, BLOCK_SIZE, 0)
    assert list(work.score.targets) == prompt[1:BLOCK_SIZE + 1]


@pytest.mark.parametrize("score_from", [0, 5])
def test_score_from_must_leave_a_scored_token_after_the_first(score_from):
    scheduler = Scheduler(BlockPool(64), Limits(max_context=128))
    with pytest.raises(ValueError, match="score_from"):
        scheduler.add(Sequence(Request("s", [1, 2, 3, 4, 5], max_new_tokens=0, score_from=score_from)))


@pytest.mark.parametrize("score,message", [
    (Score(3, [1, 2]), "scored rows 3…4 outside its 4 tokens"),
    (Score(0, [VOCAB]), "token id out of range"),
    (Score(0, [-1]), "token id out of range"),
], ids=["rows-past-the-work", "target-past-the-vocabulary", "negative-target"])
def test_a_step_with_impossible_scores_is_refused_before_any_work(score, message):
    with NumpyBackend(ENGINE, RuntimeOptions(max_context=128)) as backend:
        work = Work(0, 0, [1, 2, 3, 4], [1], score=score)
        with pytest.raises(ValueError, match=message):
            backend.run(Step([work], fresh_slots=[0]))
