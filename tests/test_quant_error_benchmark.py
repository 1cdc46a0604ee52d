"""benchmarks/quant_error.py runs on a tiny model: per-tensor weight errors and whole-model logit errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from olmoscope.convert import Int4Options, convert
from olmoscope.tiny import make_tiny

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_error.py"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_error")
    snapshot = make_tiny(root / "snapshot", hidden_size=64, num_layers=1, num_heads=2, vocab_size=512, seed=3)
    paths = {}
    for dtype, options in (("bf16", Int4Options()), ("int8", Int4Options()), ("int4", Int4Options(group_size=32))):
        paths[dtype] = root / f"{dtype}.olmo"
        convert(str(snapshot), paths[dtype], dtype=dtype, int4=options)
    return paths


def run(capsys, *args) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("quant_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_int4_errs_more_than_int8_and_bf16_not_at_all(engines, capsys):
    results = {}
    for dtype in ("bf16", "int8", "int4"):
        code, out = run(capsys, engines["bf16"], engines[dtype], "--prompts", "2", "--tokens", "8", "--json")
        assert code == 0, out.err
        results[dtype] = json.loads(out.out)
    same = results["bf16"]
    assert all(t["relative_error"] == 0 for t in same["tensors"])
    assert same["logits"]["max_abs"] == 0 and same["logits"]["top1_agreement"] == 1.0 and same["logits"]["kl_mean"] == 0
    qkv = {dtype: next(t for t in r["tensors"] if t["tensor"] == "layers.0.qkv") for dtype, r in results.items()}
    assert qkv["int4"]["stored"] == "int4" and qkv["int8"]["stored"] == "int8"
    assert 0 < qkv["int8"]["relative_error"] < qkv["int4"]["relative_error"] < 0.2
    assert 0 < results["int8"]["logits"]["rms"] < results["int4"]["logits"]["rms"]
    assert results["int4"]["quantization"]["group_size"] == 32


def test_a_reference_that_is_not_bf16_is_one_error_line(engines, capsys):
    code, out = run(capsys, engines["int8"], engines["int4"])
    assert code == 1 and out.err.count("\n") == 1 and "the reference must be a bf16 engine" in out.err
