"""`olmoscope serve ENGINE`: an OpenAI-compatible HTTP server over one engine loop (continuous batching, prefix
cache, streaming, metrics).

This module is the process: load the engine and the backend (errors are one line, before anything listens), bind
the socket, start the engine thread, run uvicorn until SIGTERM or SIGINT, then stop. On a signal it stops
accepting, lets running requests finish for up to --shutdown-timeout seconds, aborts the rest and exits 0.
The HTTP layer is serve_app.py; the engine thread is serving_engine.py.

    $ olmoscope serve tiny.olmo --port 8000
    olmoscope: serving tiny on http://127.0.0.1:8000 (numpy on cpu; 64 sequences, KV cache 4,096 blocks)
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from olmoscope.engine_options import engine_options
from olmoscope.errors import UsageError

API_KEY_ENV = "OLMOSCOPE_API_KEY"
HANDLER_GRACE_S = 2.0  # after the engine aborts the last requests, time for their handlers to answer


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: one the system picks); a one-line UsageError when that address is not to be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def check_options(port: int, max_queue: int | None, shutdown_timeout: float, max_body_bytes: int) -> None:
    """What can be refused before the weights are loaded."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be in 0 … 65535")
    if max_queue is not None and max_queue < 0:
        raise UsageError(f"--max-queue {max_queue}: must be ≥ 0")
    if not 0 <= shutdown_timeout < float("inf"):
        raise UsageError(f"--shutdown-timeout {shutdown_timeout}: must be a number of seconds ≥ 0")
    if max_body_bytes < 1:
        raise UsageError(f"--max-body-bytes {max_body_bytes}: must be at least 1")


def run_server(engine_path: Path, device: str, options, host: str, port: int, api_key: str | None,
               max_queue: int | None, shutdown_timeout: float, max_body_bytes: int, access_log: bool,
               verify: bool = True) -> None:
    """Serve until a signal; everything a user can get wrong is refused before the socket listens."""
    import uvicorn

    from olmoscope.runtime.devices import open_backend, resolve_device
    from olmoscope.runtime.engine import open_engine
    from olmoscope.runtime.generator import engine_tokenizer
    from olmoscope.serve_app import Served, create_app
    from olmoscope.serve_metrics import Metrics
    from olmoscope.serving_engine import ServingEngine

    check_options(port, max_queue, shutdown_timeout, max_body_bytes)
    resolve_device(device)
    with open_engine(engine_path, verify=verify) as engine:
        tokenizer = engine_tokenizer(engine)
        with open_backend(engine, device, options) as backend:
            sock = listen(host, port)
            for note in backend.notes:
                click.echo(f"olmoscope: {note}", err=True)
            serving = ServingEngine(backend, tokenizer, max_queue)
            metrics = Metrics(lambda: serving.stats)
            serving.observer = metrics
            served = Served(engine_path.stem, tokenizer, backend.max_context, engine.config.vocab_size,
                            frozenset(engine.generation.eos_token_ids), api_key, max_body_bytes)
            app = create_app(serving, metrics, served)
            # uvicorn's own limit comes later: by then the engine has aborted what was left (GracefulServer), and
            # every handler has answered its client with an error object rather than being cancelled
            config = uvicorn.Config(app, log_level="warning", access_log=access_log,
                                    timeout_graceful_shutdown=shutdown_timeout + HANDLER_GRACE_S, timeout_keep_alive=5)
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            click.echo(f"olmoscope: serving {served.name} on http://{shown}:{bound_port} ({backend.name} on "
                       f"{backend.device}; {backend.max_seqs} sequences, context {backend.max_context}, KV cache "
                       f"{backend.num_blocks - 1:,} blocks)", err=True)
            GracefulServer = _graceful_server_class()
            serving.start()
            try:
                _serve(GracefulServer(config, serving, shutdown_timeout), sock)
            finally:
                click.echo("olmoscope: stopping", err=True)
                serving.stop(timeout=max(shutdown_timeout, 1.0) + 5.0)
    click.echo("olmoscope: stopped", err=True)


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, and at the first signal a timer: past --shutdown-timeout the engine aborts whatever
        still runs."""

        def __init__(self, config, serving, shutdown_timeout: float):
            super().__init__(config)
            self._timer = threading.Timer(shutdown_timeout, serving.abort_all)
            self._timer.daemon = True
            self._first_signal = threading.Lock()

        def handle_exit(self, sig, frame) -> None:
            # A second signal can run this handler inside the first one's (Python runs handlers between bytecodes):
            # a check of the timer there let both start it, and the second thread's start died with a traceback.
            # The lock's non-blocking acquire is one step, so only the first signal starts the timer.
            if self._first_signal.acquire(blocking=False):
                click.echo(f"olmoscope: {signal.Signals(sig).name}: finishing running requests", err=True)
                self._timer.start()
            super().handle_exit(sig, frame)

    return GracefulServer


def _serve(server, sock: socket.socket) -> None:
    """uvicorn until SIGTERM or SIGINT. uvicorn re-raises the signal it caught once it has shut down; with this
    module's handlers in place that re-raise is a no-op, so the process ends with exit 0 instead of dying of it."""
    previous = {s: signal.signal(s, _noted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        sock.close()


def _noted(signum, frame) -> None:
    """A signal after uvicorn has let go of it: nothing left to do but finish stopping."""


@click.command("serve")
@click.argument("engine_file", metavar="ENGINE", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 or :: opens it to the network).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True,
              help="Require \"Authorization: Bearer KEY\" on /v1, /tokenize and /detokenize.")
@click.option("--max-queue", type=int, default=1024, show_default=True,
              help="Requests that may wait to be scheduled; past it a request gets 429 with Retry-After.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds running requests get to finish before they are aborted.")
@click.option("--max-body-bytes", type=int, default=16 << 20, show_default=True,
              help="Largest request body; a larger one gets 413.")
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@engine_options
def serve_command(engine_file: Path, host: str, port: int, api_key: str | None, max_queue: int,
                  shutdown_timeout: float, max_body_bytes: int, access_log: bool, device: str, options,
                  verify: bool) -> None:
    """Serve an engine file over OpenAI's HTTP API.

    Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (stream: true for server-sent
    events), GET /health, GET /metrics (Prometheus), POST /tokenize and /detokenize. The model's id is the
    engine file's stem.
    """
    logging.basicConfig(format="olmoscope: %(message)s", stream=sys.stderr)
    run_server(engine_file, device, options, host, port, api_key or None, max_queue, shutdown_timeout,
               max_body_bytes, access_log, verify=verify)

