"""The scheduler and the engine loop over the NumPy backend: many requests at once give, token for token, what
each gives alone — with chunked prefill, a small pool that forces preemption, the prefix cache, pipelined steps
(decode tokens fed on the device), sampling with seeds and the repetition penalty. And nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest

from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BLOCK_SIZE
from olmoscope.runtime.generator import run_generation
from olmoscope.runtime.loop import EngineLoop
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.scheduler import Request
from test_batched_reference import ENGINE, VOCAB

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                         frequency_penalty=0.3)


def requests(count: int, seed: int = 0, params: SamplingParams = GREEDY, max_new: int = 12) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(f"r{i}", rng.integers(0, VOCAB, int(rng.integers(1, 60))).tolist(), params,
                    int(rng.integers(1, max_new + 1)), seed=i, eos_ids=frozenset({7}))
            for i in range(count)]


def alone(request: Request) -> tuple[list[int], str]:
    with NumpyBackend(ENGINE, RuntimeOptions(max_context=128)) as backend:
        result = run_generation(backend, request.prompt_ids, request.params, request.max_new_tokens, request.seed,
                                tuple(request.eos_ids))
    return result.token_ids, result.finish_reason


def together(reqs: list[Request], **options) -> tuple[dict[str, tuple[list[int], str]], EngineLoop]:
    pipelined = options.pop("pipelined", False)
    options.setdefault("max_context", 128)
    backend = NumpyBackend(ENGINE, RuntimeOptions(**options))
    loop = EngineLoop(backend, pipelined=pipelined)
    outputs = [loop.add(r) for r in reqs]
    loop.run()
    return {o.request_id: (o.token_ids, o.finish_reason) for o in outputs}, loop


@pytest.fixture(scope="module")
def expected():
    cases = {"greedy": requests(16), "sampled": requests(16, seed=1, params=SAMPLED)}
    return {name: (reqs, {r.request_id: alone(r) for r in reqs}) for name, reqs in cases.items()}


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
@pytest.mark.parametrize("options", [
    dict(max_num_seqs=16),
    dict(max_num_seqs=16, pipelined=True),
    dict(max_num_seqs=5, max_num_batched_tokens=24),
    dict(max_num_seqs=16, kv_cache_gib=12 * 8192 / 2**30, pipelined=True),
], ids=["all-at-once", "pipelined", "chunked-5-seqs", "small-pool-preempts"])
def test_sixteen_requests_together_equal_each_alone(expected, kind, options):
    reqs, want = expected[kind]
    got, loop = together(reqs, **options)
    assert got == want
    pool = loop.pool
    assert pool.num_used == 0 and not loop.scheduler.running and not loop.scheduler.waiting, "blocks or sequences leaked"
    if "kv_cache_gib" in options:
        assert loop.scheduler.preemptions > 0, "the small pool was meant to force preemption"


def test_a_repeated_prompt_is_served_from_the_prefix_cache():
    prompt = np.random.default_rng(3).integers(0, VOCAB, 3 * BLOCK_SIZE + 5).tolist()
    first, second = Request("a", prompt, max_new_tokens=6), Request("b", prompt + [1, 2], max_new_tokens=6)
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=4))
    loop = EngineLoop(backend)
    out_a = loop.add(first)
    loop.run()
    hits_before = loop.pool.hits
    out_b = loop.add(second)
    loop.run()
    assert loop.pool.hits - hits_before == 3, "the three full blocks of the shared prompt should be found again"
    assert (out_a.token_ids, out_b.token_ids) == (alone(first)[0], alone(second)[0])


def test_an_aborted_request_frees_its_blocks_and_the_rest_finish():
    reqs = requests(6, seed=4, max_new=30)
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=6))
    loop = EngineLoop(backend, pipelined=True)
    outputs = [loop.add(r) for r in reqs]
    for _ in range(3):
        loop.step()
    loop.abort("r2")
    loop.run()
    assert outputs[2].finish_reason == "abort"
    assert all(o.finished for o in outputs) and loop.pool.num_used == 0


def test_finish_reasons_cover_eos_length_and_context():
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=20, max_num_seqs=3))
    loop = EngineLoop(backend)
    prompt = [3, 1, 4, 1, 5]
    plain = run_generation(NumpyBackend(ENGINE, RuntimeOptions(max_context=20)), prompt, GREEDY, 4).token_ids
    outs = [loop.add(Request("eos", prompt, max_new_tokens=10, eos_ids=frozenset({plain[1]}))),
            loop.add(Request("length", prompt, max_new_tokens=4)),
            loop.add(Request("context", prompt, max_new_tokens=100))]
    loop.run()
    assert [o.finish_reason for o in outs] == ["eos", "length", "context"]
    assert outs[0].token_ids == plain[:2] and len(outs[2].token_ids) == 20 - len(prompt) + 1


def test_a_request_id_may_not_run_twice():
    loop = EngineLoop(NumpyBackend(ENGINE, RuntimeOptions(max_context=64, max_num_seqs=2)))
    loop.add(Request("x", [1, 2]))
    with pytest.raises(ValueError, match="already running"):
        loop.add(Request("x", [3]))


def test_choices_share_the_prompt_and_the_first_repeats_the_seeded_run():
    prompt = np.random.default_rng(8).integers(0, VOCAB, 3 * BLOCK_SIZE + 2).tolist()
    request = Request("n", prompt, SAMPLED, max_new_tokens=10, seed=42, n=4)
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=4))
    loop = EngineLoop(backend)
    outputs = loop.add_choices(request)
    loop.run()
    assert [len(o.token_ids) for o in outputs] == [10] * 4
    assert outputs[0].token_ids == alone(Request("one", prompt, SAMPLED, 10, seed=42))[0]
    assert len({tuple(o.token_ids) for o in outputs}) > 1, "four sampled choices came out identical"
    assert loop.pool.hits == 3 * 3, "each later choice should find the prompt's three full blocks cached"
    again = EngineLoop(NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=4))).add_choices(request)
    assert again, "a request id may run again once it has finished"


def test_logprobs_are_the_log_softmax_of_the_raw_logits_at_each_position():
    from stepping import teacher_forced_logits

    from olmoscope.runtime.sampler import token_logprobs

    prompt = [5, 9, 2, 77, 31]
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=64, max_num_seqs=2))
    loop = EngineLoop(backend)
    output = loop.add(Request("lp", prompt, SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0),
                              max_new_tokens=6, logprobs=3))
    loop.run()
    logits = teacher_forced_logits(backend, prompt + output.token_ids, len(prompt))
    rows = [logits[0][-1]] + logits[1:-1]  # the logits each generated token was drawn from
    assert [lp.token_id for lp in output.logprobs] == output.token_ids
    for row, got in zip(rows, output.logprobs):  # float32 in the step's result: 1e-6 relative
        want = token_logprobs(row, got.token_id, 3, VOCAB)
        assert [t for t, _ in got.top] == [t for t, _ in want.top], f"{got} != {want}"
        assert np.allclose([got.logprob] + [lp for _, lp in got.top], [want.logprob] + [lp for _, lp in want.top],
                           rtol=1e-6, atol=1e-7), f"{got} != {want}"
        assert len(got.top) == 3 and got.top[0][1] >= got.top[1][1] >= got.top[2][1]


def test_frequency_and_presence_penalties_keep_generated_tokens_out():
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = alone(Request("p", prompt, GREEDY, 40))[0]
    strict = alone(Request("q", prompt, SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), 40))[0]
    assert len(set(strict)) > len(set(plain)), "the penalties made generated tokens no rarer"


def test_a_preempted_sequence_keeps_its_penalty_history():
    """Recomputed after preemption, a sequence's generated tokens still count for the frequency and presence
    penalties (they come back as history, not as samples)."""
    params = SamplingParams(frequency_penalty=2.0, presence_penalty=1.0, repetition_penalty=1.3)
    reqs = [Request(f"p{i}", [7 + i, 3, 11, 2, 9], params, max_new_tokens=40) for i in range(2)]
    got, loop = together(reqs, max_num_seqs=2, kv_cache_gib=4 * 8192 / 2**30, max_context=64)
    assert loop.scheduler.preemptions > 0, "the 4-block pool was meant to force a preemption"
    assert got == {r.request_id: alone(r) for r in reqs}
