"""GPTQ and AWQ int4 checkpoints import exactly: checkpoints packed in each format from known integers
(tests/int4_checkpoints.py, written from the formats' definitions, not from the importer) convert to
engines whose stored bytes are the known nibbles and whose dequantized matrices equal (q − z)·s exactly;
the NumPy reference on them matches transformers on those same weights; what cannot be imported exactly
is one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from int4_checkpoints import AWQ_NIBBLE_COLUMNS, pack_outputs, write_prequantized
from olmoscope import engine_format as ef
from olmoscope.cli import main
from olmoscope.convert import Int4Options, convert
from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.engine import open_engine
from olmoscope.spec import engine_tensors

KINDS = {  # id → (method, symmetric, checkpoint_format)
    "gptq-v1-sym": ("gptq", True, "gptq"),
    "gptq-v1-asym": ("gptq", False, "gptq"),
    "gptq-v2-asym": ("gptq", False, "gptq_v2"),
    "awq-gemm": ("awq", False, "gptq"),
}


@pytest.fixture(scope="module", params=list(KINDS))
def imported(request, tmp_path_factory):
    method, symmetric, fmt = KINDS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    known = write_prequantized(root / "snapshot", method, symmetric=symmetric, checkpoint_format=fmt)
    convert(str(known.directory), root / "model.olmo", dtype="int4")
    return request.param, known, root / "model.olmo"


def engine_nibbles(q: np.ndarray) -> np.ndarray:
    """The engine's bytes for integers q [N, K], from its definition: byte k//2, even k in the low nibble."""
    out = np.zeros((q.shape[0], q.shape[1] // 2), np.uint8)
    for k in range(q.shape[1]):
        out[:, k // 2] += q[:, k] << (4 * (k % 2))
    return out


def fused(known, spec, what: str) -> np.ndarray:
    """The known matrices of an engine tensor's parts, rows concatenated in the engine's order."""
    return np.concatenate([getattr(known.matrices[p.name.removesuffix(".weight")], what) for p in spec.sources])


def test_awq_packing_helper_puts_column_order_where_the_format_says():
    values = np.arange(8, dtype=np.uint8)[None] + 0  # columns 0..7 hold their own index
    word = int(pack_outputs(values, AWQ_NIBBLE_COLUMNS).view(np.uint32)[0, 0])
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_engine_holds_exactly_the_known_integers_scales_and_zeros(imported):
    kind, known, path = imported
    method, symmetric, _ = KINDS[kind]
    with open_engine(path) as engine:
        q = engine.weights.quantization
        assert (q.format, q.scheme, q.group_size, q.lm_head, q.source) == (
            "int4", "sym" if symmetric else "asym", 128, False, method)
        checked = 0
        for spec in engine_tensors(engine.config):
            if spec.role not in ("qkv", "o_proj", "gate_up", "down_proj"):
                assert not engine.weights.is_quantized(spec.name), spec.name
                continue
            matrix = engine.weights.matrix(spec.name)
            assert np.array_equal(matrix.data, engine_nibbles(fused(known, spec, "q"))), spec.name
            assert np.array_equal(matrix.scales.view(np.uint16), fused(known, spec, "scales").view(np.uint16))
            if symmetric:
                assert matrix.zeros is None
            else:
                assert np.array_equal(matrix.zeros, fused(known, spec, "zeros")), spec.name
            dequantized = engine.weights.float32(spec.name)
            assert np.array_equal(dequantized, fused(known, spec, "dequantized")), spec.name
            checked += 1
        assert checked == 8


def test_verify_against_the_checkpoint_says_imported_exactly(imported):
    _, known, path = imported
    result = CliRunner().invoke(main, ["verify", str(path), "--against", str(known.directory)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("layers.")}
    assert "imported exactly" in lines["layers.0.gate_up"] and lines["layers.0.gate_up"].rstrip().endswith("ok")


@pytest.mark.slow
def test_numpy_reference_matches_transformers_on_the_imported_weights(imported):
    from test_reference_vs_transformers import check_against_transformers

    kind, known, path = imported
    with open_engine(path) as engine:
        check_against_transformers(known.model, engine, f"imported {kind}")


# ── what is refused, in one line ────────────────────────────────────────────────
def _config_edit(directory, **changes):
    raw = json.loads((directory / "config.json").read_text())
    raw["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(raw))


REFUSALS = [
    ("bits_8", "gptq", {"bits": 8}, "8 bits; olmoscope imports 4-bit checkpoints only"),
    ("desc_act", "gptq", {"desc_act": True}, "desc_act True: act-order"),
    ("group_minus_one", "gptq", {"group_size": -1}, "group_size -1"),
    ("gptq_marlin", "gptq", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ("awq_gemv", "awq", {"version": "gemv"}, "AWQ version 'gemv' is not supported (olmoscope reads GEMM packing)"),
    ("awq_no_zero_point", "awq", {"zero_point": False}, "AWQ without zero points"),
    ("other_method", "awq", {"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
]


@pytest.mark.parametrize("method,changes,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_unsupported_quantization_configs_are_one_line_and_write_nothing(tmp_path, method, changes, message):
    known = write_prequantized(tmp_path / "snapshot", method)
    _config_edit(known.directory, **changes)
    result = CliRunner().invoke(main, ["convert", str(known.directory), "-o", str(tmp_path / "m.olmo"), "--dtype", "int4"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "m.olmo").exists()


def test_a_permuted_g_idx_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    known = write_prequantized(tmp_path / "snapshot", "gptq")
    tensors = load_file(known.directory / "model.safetensors")
    g_idx = tensors["model.layers.1.mlp.down_proj.g_idx"]
    tensors["model.layers.1.mlp.down_proj.g_idx"] = g_idx[::-1].copy()
    save_file(tensors, known.directory / "model.safetensors")
    with pytest.raises(OlmoscopeError, match=r"model.layers.1.mlp.down_proj.g_idx is not k // 128: act-order"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4")
    assert not (tmp_path / "m.olmo").exists()


def test_a_missing_tensor_is_named(tmp_path):
    known = write_prequantized(tmp_path / "snapshot", "awq", drop=("model.layers.0.self_attn.k_proj.qzeros",))
    with pytest.raises(OlmoscopeError, match=r"1 missing \(model.layers.0.self_attn.k_proj.qzeros\)"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4")


def test_options_that_would_quantize_again_are_refused(tmp_path):
    known = write_prequantized(tmp_path / "snapshot", "awq")
    with pytest.raises(OlmoscopeError, match=r"convert it with --dtype int4 \(imported exactly"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="bf16")
    with pytest.raises(OlmoscopeError, match=r"--group-size 64 would quantize it again"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=64))
    with pytest.raises(OlmoscopeError, match=r"--int4-scheme sym would quantize it again"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(scheme="sym"))
    convert(str(known.directory), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=128, scheme="asym"))


def test_sym_gptq_whose_zeros_are_not_8_contradicts_itself(tmp_path):
    known = write_prequantized(tmp_path / "snapshot", "gptq", symmetric=False)
    _config_edit(known.directory, sym=True)
    with pytest.raises(OlmoscopeError, match="sym is true but a zero point is not 8"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4")


def test_packed_tensors_without_a_quantization_config_are_refused(tmp_path):
    known = write_prequantized(tmp_path / "snapshot", "gptq")
    raw = json.loads((known.directory / "config.json").read_text())
    del raw["quantization_config"]
    (known.directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(OlmoscopeError, match=r"packed quantized tensors .* no quantization_config"):
        convert(str(known.directory), tmp_path / "m.olmo", dtype="int4")


def test_header_records_the_import(imported):
    kind, _, path = imported
    with ef.EngineFile.open(path) as engine:
        assert engine.header["quantization"]["source"] == KINDS[kind][0]
        assert "I32" in engine.provenance["source_dtypes"]


def test_tensors_checks_a_gptq_snapshot_against_its_packing_and_arch_notes_it(tmp_path):
    known = write_prequantized(tmp_path / "snapshot", "gptq", symmetric=True)
    result = CliRunner().invoke(main, ["tensors", str(known.directory), "--check"])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.down_proj.qweight" in result.output and "I32" in result.output
    # per layer 7 Linears × (qweight, qzeros, scales, g_idx) + 4 norms; embedding, final norm, lm_head
    assert "Check against config (67 tensors implied): ok" in result.output, result.output[-400:]
    arch = CliRunner().invoke(main, ["arch", str(known.directory)])
    assert arch.exit_code == 0
    assert "a pre-quantized checkpoint (quant_method 'gptq', bits 4, group_size 128, sym True" in arch.output
