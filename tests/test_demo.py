"""`olmoscope demo`: the whole path on the bundled tiny model, each step's output shown, in well under a minute."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from olmoscope.cli import main

SANITY_BOUND_S = 60  # "well under a minute" on 2 CPU cores: a guard against a hang, not a benchmark

# (step heading, a line of that step's own output)
STEPS = [
    ("[1/6] make-tiny", "model.safetensors.index.json"),
    ("[2/6] arch", "26,429,312 parameters"),
    ("[3/6] tensors", "check against config: ok"),
    ("[4/6] convert", "weight dtype  bf16"),
    ("[5/6] verify", "checksums: 35 of 35 tensors match"),
    ("[6/6] generate", "Language modeling is "),
]


def assert_every_step_shown(stdout: str, stderr: str) -> None:
    position = 0
    for heading, output in STEPS:
        position = stdout.find(heading, position)
        assert position >= 0, f"step {heading!r} missing or out of order:\n{stdout}"
        assert output in stdout[position:], f"output of {heading!r} missing: {output!r}"
    assert "against the source: 35 of 35 tensors within their rounding bound" in stdout
    generated = stdout.split("[6/6] generate", 1)[1].splitlines()[1]
    assert len(generated) > len("Language modeling is "), f"no text generated: {generated!r}"
    assert "prompt 4 tokens, generated 24 (length)" in stderr and "numpy on cpu" in stderr, stderr
    assert "demo finished in" in stdout


def test_demo_runs_every_step_in_well_under_a_minute():
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["demo"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert_every_step_shown(result.stdout, result.stderr)
    assert elapsed < SANITY_BOUND_S, f"demo took {elapsed:.1f} s"
    snapshot = Path(result.stdout.split("[1/6] make-tiny ", 1)[1].split()[0])
    assert not snapshot.parent.exists(), f"the temporary folder {snapshot.parent} was left behind"


def test_demo_as_a_process_keeps_its_files_in_workdir(tmp_path):
    workdir = tmp_path / "demo"
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-c", "from olmoscope.cli import main; main()", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, encoding="utf-8", timeout=SANITY_BOUND_S * 2,
    )
    elapsed = time.perf_counter() - started
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    assert_every_step_shown(process.stdout, process.stderr)
    assert f"the snapshot and engine file are in {workdir}" in process.stdout
    assert (workdir / "tiny-olmo2" / "config.json").is_file() and (workdir / "tiny-olmo2.bf16.olmo").is_file()
    assert elapsed < SANITY_BOUND_S, f"demo took {elapsed:.1f} s"


def test_demo_refuses_a_bad_token_count():
    result = CliRunner().invoke(main, ["demo", "--max-new-tokens", "0"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.output, result.output
