"""int4 quantized by convert: the math (half a step, the edge cases), the engine's nibble layout, the NumPy
reference against transformers on the dequantized weights (both schemes), and the CUDA refusal.

Expected values here come from the definitions (docs/ENGINE_FORMAT.md), computed in the test: the nibble
layout byte by byte, (q − z)·s in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olmoscope import engine_format as ef
from olmoscope.convert import Int4Options, convert
from olmoscope.errors import OlmoscopeError, UsageError
from olmoscope.quantize import QuantizeError, quantize_int4_groups
from olmoscope.runtime.engine import open_engine
from olmoscope.spec import engine_tensors


def dequantize_by_definition(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int) -> np.ndarray:
    z = np.full(scales.shape, 8.0) if zeros is None else zeros.astype(np.float64)
    return (q.astype(np.float64) - np.repeat(z, group, axis=1)) * np.repeat(scales.astype(np.float64), group, axis=1)


def unpack_by_definition(packed: np.ndarray) -> np.ndarray:
    """Element k of a row is byte k//2's low nibble for even k, its high nibble for odd k."""
    n, half = packed.shape
    out = np.zeros((n, 2 * half), np.uint8)
    for k in range(2 * half):
        byte = packed[:, k // 2]
        out[:, k] = byte & 0xF if k % 2 == 0 else byte >> 4
    return out


# ── the quantization math ───────────────────────────────────────────────────────
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_element_is_within_half_a_step_of_its_source(symmetric, group):
    rng = np.random.default_rng(group)
    w = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, (16, 1)) + rng.uniform(-1, 1, (16, 1))).astype(np.float32)
    q, scales, zeros = quantize_int4_groups(w, group, symmetric, "w")
    assert q.dtype == np.uint8 and q.max() <= 15 and scales.dtype == np.float16 and scales.shape == (16, 256 // group)
    assert (zeros is None) == symmetric
    err = np.abs(dequantize_by_definition(q, scales, zeros, group) - w)
    step = np.repeat(scales.astype(np.float64), group, axis=1)
    ratio = err / step
    print(f"int4 {'sym' if symmetric else 'asym'} g{group}: worst err/step {ratio.max():.4f}, "
          f"rel RMS {np.sqrt((err ** 2).mean() / (w.astype(np.float64) ** 2).mean()):.4f}")
    assert ratio.max() <= 0.5 + 1e-5 and ratio.max() > 0.45  # the bound holds, and is nearly reached


def test_symmetric_uses_zero_8_and_the_full_range():
    w = np.float32([[-1.0, 1.0, 0.0, 0.5]])
    q, scales, zeros = quantize_int4_groups(w, 4, True, "w")
    assert zeros is None and scales[0, 0] >= np.float16(2 / 15)  # 2·max|w|/15, rounded up to fp16
    assert q.tolist() == [[1, 15, 8, 12]]  # −1/s = −7.49 → −7; +1/s → +7; 0 → the zero, 8


def test_asymmetric_fits_the_groups_range_with_zero_inside():
    w = np.float32([[0.0, 1.5, 3.0, 0.75]])  # all ≥ 0: the range is widened to 0, so z = 0
    q, scales, zeros = quantize_int4_groups(w, 4, False, "w")
    assert zeros.tolist() == [[0]] and q.tolist() == [[0, 7, 15, 4]]  # 1.5/0.2 = 7.5 → 7 (half to even)
    assert abs(float(scales[0, 0]) - 0.2) < 1e-3


def test_an_all_zero_group_dequantizes_to_exact_zeros():
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = 1.0  # one group with data
    for symmetric in (True, False):
        q, scales, zeros = quantize_int4_groups(w, 32, symmetric, "w")
        assert scales[0].tolist() == [0.0, 0.0] and scales[1, 0] == 0.0
        out = dequantize_by_definition(q, scales, zeros, 32)
        assert np.array_equal(out[:, :32], np.zeros((2, 32))) and np.array_equal(out[0], np.zeros(64))


def test_subnormal_and_tiny_groups_keep_the_bound():
    w = np.float32([[1e-9, -3e-9, 2e-9, 0.0]])  # below fp16's smallest subnormal step (6e-8)
    q, scales, zeros = quantize_int4_groups(w, 4, True, "w")
    assert scales[0, 0] > 0  # rounded up to a subnormal, not to zero
    assert np.abs(dequantize_by_definition(q, scales, zeros, 4) - w).max() <= float(scales[0, 0]) / 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_error_naming_the_tensor(bad):
    w = np.ones((2, 32), np.float32)
    w[1, 3] = bad
    with pytest.raises(QuantizeError, match="tensor layers.0.qkv: holds NaN or Inf, which int4 cannot represent"):
        quantize_int4_groups(w, 32, False, "layers.0.qkv")


def test_a_group_too_wide_for_an_fp16_scale_is_an_error():
    w = np.float32([[-3e38, 3e38, 0, 0]])
    with pytest.raises(QuantizeError, match="tensor w: a group spans .* beyond what an fp16 int4 scale holds"):
        quantize_int4_groups(w, 4, True, "w")


# ── convert → engine → runtime ──────────────────────────────────────────────────
def test_engine_bytes_follow_the_documented_nibble_layout(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    convert(str(snapshot), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=32))
    ours = {}
    with ef.EngineFile.open(tmp_path / "m.olmo") as engine:
        for spec in engine_tensors(engine.config):
            if engine.entry(spec.name).dtype == "U4":
                ours[spec.name] = (unpack_by_definition(engine.tensor(spec.name)), engine.scales(spec.name).copy(),
                                   engine.zeros(spec.name).copy())
    assert set(ours) == {f"layers.{l}.{r}" for l in range(2) for r in ("qkv", "o_proj", "gate_up", "down_proj")}
    from safetensors.numpy import load_file

    source = load_file(snapshot / "model.safetensors")
    fused = np.concatenate([source[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    q, scales, zeros = ours["layers.0.gate_up"]
    assert np.array_equal(q, quantize_int4_groups(fused, 32, False, "x")[0])  # rows [gate; up], groups per row
    err = np.abs(dequantize_by_definition(q, scales, zeros, 32) - fused) / np.repeat(scales.astype(np.float64), 32, 1)
    assert err.max() <= 0.5 + 1e-5


def test_lm_head_is_bf16_unless_asked(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    convert(str(snapshot), tmp_path / "a.olmo", dtype="int4", int4=Int4Options(group_size=64))
    convert(str(snapshot), tmp_path / "b.olmo", dtype="int4", int4=Int4Options(group_size=64, scheme="sym", lm_head=True))
    with ef.EngineFile.open(tmp_path / "a.olmo") as a, ef.EngineFile.open(tmp_path / "b.olmo") as b:
        assert (a.entry("lm_head").dtype, a.entry("embedding").dtype) == ("BF16", "BF16")
        assert (b.entry("lm_head").dtype, b.entry("embedding").dtype) == ("U4", "BF16")
        assert b.quantization == ef.Quantization("int4", "sym", 64, True, "ours")
        assert b.zeros("lm_head") is None


def test_non_finite_weights_stop_the_conversion_and_leave_nothing(make_snapshot, tmp_path):
    bad = np.ones((64, 64), np.float32)
    bad[5, 5] = np.nan
    snapshot = make_snapshot(extra={"model.layers.1.self_attn.o_proj.weight": bad})
    with pytest.raises(OlmoscopeError, match="tensor model.layers.1.self_attn.o_proj.weight: holds NaN or Inf"):
        convert(str(snapshot), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=32))
    assert list(tmp_path.glob("m.olmo*")) == []


def _random_model(seed: int = 0):
    from test_reference_vs_transformers import random_model

    return random_model("gqa2-d64-odd-vocab", seed=seed, bf16=True)  # D=256, I=384, Hd=256: groups of 128 fit


@pytest.mark.slow
@pytest.mark.parametrize("scheme,lm_head", [("asym", False), ("sym", True)])
def test_int4_engine_matches_transformers_on_the_dequantized_weights(tmp_path, scheme, lm_head):
    """The runtime must be exact on (q − z)·s: only quantization itself errs (relative logits error ≤ 1e-5)."""
    from test_reference_vs_transformers import check_against_transformers

    model = _random_model()
    model.save_pretrained(tmp_path / "snapshot")
    convert(str(tmp_path / "snapshot"), tmp_path / "m.olmo", dtype="int4",
            int4=Int4Options(group_size=128, scheme=scheme, lm_head=lm_head))
    with open_engine(tmp_path / "m.olmo") as engine:
        state = model.state_dict()
        group = engine.weights.quantization.group_size
        with torch.no_grad():  # transformers gets the weights the int4 file actually holds, dequantized here
            for spec in engine_tensors(engine.config):
                if not engine.weights.is_quantized(spec.name):
                    continue
                m = engine.weights.matrix(spec.name)
                values = dequantize_by_definition(unpack_by_definition(m.data), m.scales, m.zeros, group)
                rows = np.cumsum([0] + [part.shape[0] for part in spec.sources])
                for part, begin, end in zip(spec.sources, rows[:-1], rows[1:]):
                    state[part.name].copy_(torch.from_numpy(values[begin:end].astype(np.float32)))
        check_against_transformers(model, engine, f"int4 {scheme} lm_head={lm_head}")


def test_numpy_backend_keeps_int4_matrices_packed(make_snapshot, tmp_path):
    from olmoscope.runtime.numpy_backend import LazyFloat32, NumpyBackend

    convert(str(make_snapshot()), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=32))
    with open_engine(tmp_path / "m.olmo") as engine:
        backend = NumpyBackend(engine)
        assert isinstance(backend.weights.layers[0].qkv, LazyFloat32)  # dequantized at each use, layer by layer
        assert isinstance(backend.weights.lm_head, LazyFloat32)  # bf16 in this file: upcast at each use too
        assert isinstance(backend.weights.final_norm, np.ndarray)  # norms are float32 already
        backend.close()


def test_a_build_without_a_formats_kernels_refuses_it_in_one_line(make_snapshot, tmp_path, monkeypatch):
    """The one refusal (devices.check_cuda_kernels), shown on int4 as a build without its kernels would see it."""
    from olmoscope.runtime import devices

    monkeypatch.setattr(devices, "cuda_availability", lambda: (True, "pretend"))
    monkeypatch.setattr(devices, "CUDA_KERNEL_VARIANTS", ("bf16", "int8"))
    convert(str(make_snapshot()), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=32))
    with open_engine(tmp_path / "m.olmo") as engine, pytest.raises(UsageError) as caught:
        devices.open_backend(engine, "auto")
    assert "int4 engines need the int4 kernels, not in this build; run it with --device cpu" in str(caught.value)


# ── reports ─────────────────────────────────────────────────────────────────────
def test_tensors_lists_each_matrix_with_its_scales_and_zeros_and_the_check_passes(make_snapshot, tmp_path):
    from click.testing import CliRunner

    from olmoscope.cli import main

    convert(str(make_snapshot()), tmp_path / "m.olmo", dtype="int4", int4=Int4Options(group_size=32))
    result = CliRunner().invoke(main, ["tensors", str(tmp_path / "m.olmo"), "--check"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.startswith("layers.0.")}
    assert rows["layers.0.gate_up"][1:3] == ["[256,", "64]"] and rows["layers.0.gate_up"][3] == "U4"
    assert rows["layers.0.gate_up.scales"][1:4] == ["[256,", "2]", "F16"]
    assert rows["layers.0.gate_up.zeros"][1:4] == ["[256,", "2]", "U8"]
    assert "Check against config (35 tensors implied): ok" in result.output  # 19 tensors + 8 × (scales, zeros)


def test_arch_of_an_int4_engine_shows_format_group_scheme_and_source(make_snapshot, tmp_path):
    from olmoscope.arch import arch_report, render_text
    from olmoscope.sources import resolve

    convert(str(make_snapshot()), tmp_path / "m.olmo", dtype="int4",
            int4=Int4Options(group_size=64, scheme="sym", lm_head=True))
    report = arch_report(resolve(str(tmp_path / "m.olmo")))
    assert report["engine"]["quantization"] == {"format": "int4", "scheme": "sym", "group_size": 64,
                                                "lm_head": True, "source": "ours"}
    assert "int4 sym, group 64, lm_head quantized, quantized by olmoscope" in render_text(report)


def test_arch_of_an_imported_engine_names_its_source(tmp_path):
    from int4_checkpoints import write_prequantized
    from olmoscope.arch import arch_report
    from olmoscope.sources import resolve

    known = write_prequantized(tmp_path / "snapshot", "awq")
    convert(str(known.directory), tmp_path / "m.olmo", dtype="int4")
    quant = arch_report(resolve(str(tmp_path / "m.olmo")))["engine"]["quantization"]
    assert (quant["source"], quant["scheme"], quant["group_size"]) == ("awq", "asym", 128)
