"""A failure inside the engine loop is the failing request's error, never the loop's end: a row the backend could
not sample fails only its own request; a step the backend raises on fails the requests of that step, frees their
blocks, and offers no block it should have written to the prefix cache (a later request with the same prompt
equals the same request run alone)."""

from __future__ import annotations

import numpy as np
import pytest

from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.loop import EngineLoop
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.step import SAMPLE_NAN
from test_batched_reference import ENGINE
from test_scheduler import alone, requests

MARK = 13  # top_k of a marked request: the wrapped backend misbehaves on its rows


class Misbehaving:
    """A NumPy backend whose steps go wrong for marked requests: "raise" fails the whole step, "nan" reports the
    marked rows as unsampleable (SAMPLE_NAN), as a backend does for NaN logits."""

    def __init__(self, backend: NumpyBackend, how: str):
        self._backend, self._how = backend, how

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, step, return_logits=False):
        marked = [w.sample is not None and w.sample.params.top_k == MARK for w in step.works if w.sample]
        if self._how == "raise" and any(marked):
            raise FloatingPointError("non-finite logits in a marked row")
        result = self._backend.run(step, return_logits)
        if self._how == "nan":
            result.tokens[np.array(marked, bool)] = SAMPLE_NAN
        return result


def loop_over(how: str, **options) -> EngineLoop:
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, **options))
    return EngineLoop(Misbehaving(backend, how))


MARKED = SamplingParams(temperature=0.5, top_k=MARK)


def test_a_row_that_cannot_be_sampled_fails_only_its_request():
    reqs = requests(6)
    reqs[2].params = MARKED
    loop = loop_over("nan", max_num_seqs=8)
    outputs = [loop.add(r) for r in reqs]
    loop.run()
    assert outputs[2].finish_reason == "error" and "NaN" in outputs[2].error
    assert outputs[2].token_ids == []  # the failed row gave the request no token
    for request, output in zip(reqs, outputs):
        if request is not reqs[2]:
            assert (output.token_ids, output.finish_reason) == alone(request), request.request_id
    assert loop.pool.num_used == 0


def test_a_step_the_backend_fails_ends_its_requests_and_the_loop_serves_on():
    first, later = requests(3), requests(3, seed=5)
    for request in later:
        request.request_id += "-later"
    first[1].params = MARKED
    loop = loop_over("raise", max_num_seqs=8)
    failed = [loop.add(r) for r in first]
    loop.run()  # all three share the failing first step
    assert [o.finish_reason for o in failed] == ["error"] * 3
    assert "FloatingPointError" in failed[0].error
    assert loop.pool.num_used == 0
    # the same prompts again, unmarked: nothing the failed step should have written was cached
    for request in first:
        request.params = SamplingParams()
    again = [loop.add(r) for r in first + later]
    loop.run()
    for request, output in zip(first + later, again):
        assert (output.token_ids, output.finish_reason) == alone(request), request.request_id
    assert loop.pool.num_used == 0


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_a_marked_request_alone_in_its_steps_leaves_earlier_requests_untouched(how):
    reqs = requests(4)
    loop = loop_over(how, max_num_seqs=8)
    outputs = [loop.add(r) for r in reqs]
    loop.run()
    bad = loop.add(requests(1, seed=9, params=MARKED)[0])
    loop.run()
    assert bad.finish_reason == "error"
    assert [(o.token_ids, o.finish_reason) for o in outputs] == [alone(r) for r in reqs]
