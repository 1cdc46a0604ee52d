"""The engine thread of `serve`, in process (the app over httpx's ASGI transport, no socket): when the thread dies
of a bug, /health says 503 with the reason, the requests it held get an error object, and new ones a 503."""

from __future__ import annotations

import asyncio

import httpx2 as httpx

from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.tokenizer import Tokenizer
from olmoscope.serve_app import Served, _coalesced, create_app
from olmoscope.serve_metrics import Metrics
from olmoscope.serving_engine import Delta, ServingEngine
from test_batched_reference import ENGINE, VOCAB


def test_a_dead_engine_thread_turns_health_to_503_and_fails_its_requests():
    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=4))
    engine = ServingEngine(backend, Tokenizer.bundled())
    metrics = Metrics(lambda: engine.stats)
    app = create_app(engine, metrics, Served("tiny", Tokenizer.bundled(), 128, VOCAB, frozenset()))

    def broken_step():
        raise RuntimeError("a scheduler bug")

    engine.loop.step = broken_step
    engine.start()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            assert (await client.get("/health")).status_code == 200
            held = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
            health = await client.get("/health")
            after = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
            return held, health, after

    held, health, after = asyncio.run(asyncio.wait_for(run(), 30))
    assert held.status_code == 500 and "a scheduler bug" in held.json()["error"]["message"]
    assert health.status_code == 503 and "engine loop stopped" in health.json()["error"]["message"]
    assert after.status_code == 503 and after.json()["error"]["type"] == "server_error"


def test_the_engine_thread_steps_the_backend_inside_its_thread_binding():
    """A GPU backend's context is current per thread (PyCUDA): every step of the serving engine must run inside
    backend.in_thread(), entered in the engine thread itself (tests/test_cuda_backend.py runs a real one)."""
    import contextlib
    import threading

    backend = NumpyBackend(ENGINE, RuntimeOptions(max_context=128, max_num_seqs=4))
    bound: set[int] = set()
    stepped: list[bool] = []

    @contextlib.contextmanager
    def in_thread():
        bound.add(threading.get_ident())
        try:
            yield
        finally:
            bound.discard(threading.get_ident())

    backend.in_thread = in_thread
    engine = ServingEngine(backend, Tokenizer.bundled())
    real_step = engine.loop.step

    def step():
        stepped.append(threading.get_ident() in bound and threading.get_ident() != threading.main_thread().ident)
        return real_step()

    engine.loop.step = step
    metrics = Metrics(lambda: engine.stats)
    app = create_app(engine, metrics, Served("tiny", Tokenizer.bundled(), 128, VOCAB, frozenset()))
    engine.start()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            return await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3})

    reply = asyncio.run(asyncio.wait_for(run(), 30))
    engine.stop(10)
    assert reply.status_code == 200, reply.text
    assert stepped and all(stepped), f"{stepped.count(False)} of {len(stepped)} steps ran outside the thread binding"


def test_a_stream_behind_the_engine_gets_the_missed_tokens_in_one_event():
    """serve_app._coalesced: adjacent plain deltas of a choice join; logprobs, finishes and failures keep their own."""
    plain = [Delta(0, "a", (1,)), Delta(0, "b", (2,)), Delta(1, "x", (9,)), Delta(1, "y", (8,), finish_reason="eos"),
             Delta(1, "z", (7,))]
    assert _coalesced(plain) == [Delta(0, "ab", (1, 2)), Delta(1, "xy", (9, 8), finish_reason="eos"),
                                 Delta(1, "z", (7,))]
    failing = [Delta(0, "a", (1,)), Delta(0, "", (), finish_reason="error", error="boom")]
    assert _coalesced(failing) == failing, "text before a failure must reach the client before the error"
    with_logprobs = [Delta(0, "a", (1,), ("lp",)), Delta(0, "b", (2,), ("lp",))]
    assert _coalesced(with_logprobs) == with_logprobs
    assert _coalesced([Delta(0, "a", (1,))]) == [Delta(0, "a", (1,))]
