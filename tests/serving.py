"""`olmoscope serve` in a subprocess for tests: on 127.0.0.1, a port the system picks, its log in a file (a pipe
nobody reads would fill up and stall the server), stopped by SIGTERM at the end."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

START_TIMEOUT_S = 60
LAUNCH = "from olmoscope.cli import main; main()"


class ServerProcess:
    """A running server; `url` is its root (http://127.0.0.1:PORT)."""

    def __init__(self, engine: Path, log: Path, *options: str, env: dict[str, str] | None = None):
        self.log = log
        command = [sys.executable, "-c", LAUNCH, "serve", str(engine), "--host", "127.0.0.1", "--port", "0",
                   "--device", "cpu", *options]
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"serving \S+ on (http://\S+)", self.text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.text()}")
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code (killed and reported as -9 past `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def metric(self, name: str) -> float:
        """One unlabelled sample of /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))

    def wait_for_metric(self, name: str, predicate, timeout: float = 30) -> float:
        """Poll a metric until predicate(value) holds; the value (AssertionError past the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name)
            if predicate(value) or time.monotonic() > deadline:
                assert predicate(value), f"{name} = {value} after {timeout} s"
                return value
            time.sleep(0.05)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
