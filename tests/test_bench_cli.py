"""`olmoscope bench FILE`: figures as JSON where the CUDA backend runs, one clear error line where it cannot."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from olmoscope.cli import main
from olmoscope.convert import convert
from olmoscope.runtime.devices import cuda_availability
from olmoscope.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    snapshot = make_tiny(folder / "tiny", hidden_size=64, num_layers=1, num_heads=2, vocab_size=512, seed=1)
    engine = folder / "tiny.olmo"
    convert(str(snapshot), engine, dtype="bf16")
    return engine


def test_bench_without_a_gpu_is_one_clear_error(tiny_engine):
    usable, why = cuda_availability()
    if usable:
        pytest.skip("a CUDA backend is available here: the error path cannot be reached")
    result = CliRunner().invoke(main, ["bench", str(tiny_engine)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"olmoscope: error: --device cuda: {why}", result.output


def test_bench_rejects_a_malformed_length_list(tiny_engine):
    result = CliRunner().invoke(main, ["bench", str(tiny_engine), "--prompt-lengths", "12,x"])
    assert result.exit_code == 2 and "--prompt-lengths '12,x': expected comma-separated integers" in result.output


@pytest.mark.cuda
def test_bench_reports_every_figure_on_the_gpu(tiny_engine):
    if not cuda_availability()[0]:
        pytest.skip(f"CUDA backend unavailable: {cuda_availability()[1]}")
    args = ["bench", str(tiny_engine), "--prompt-lengths", "16", "--contexts", "16", "--max-context", "256", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prefill_tokens_per_s"]["16"] > 0 and report["decode_ms_per_token"]["16"] > 0, report
    assert report["bandwidth_bytes_per_s"] > 1e9, report
