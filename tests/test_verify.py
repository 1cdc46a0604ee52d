"""`olmoscope verify`: checksums name the damaged tensor; --against holds each tensor to its conversion's
promise (bit-exact, round to nearest even, half an int8 step) and reports the max error per tensor."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from olmoscope import convert as cv
from olmoscope import engine_format as ef
from olmoscope import verify as vf
from olmoscope.cli import main
from olmoscope.errors import EngineError
from olmoscope.quantize import quantize_int8_rows
from olmoscope.sources import resolve


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory: (snapshot, engine file) for a --dtype, from one GQA snapshot split across shards."""
    from olmoscope.tiny import make_tiny

    root = tmp_path_factory.mktemp("verify")
    snapshot = make_tiny(root / "snapshot", vocab_size=256, num_kv_heads=2)
    cache = {}

    def get(dtype: str = "bf16") -> tuple[Path, Path]:
        if dtype not in cache:
            cache[dtype] = root / f"{dtype}.engine"
            int4 = cv.Int4Options(group_size=32) if dtype == "int4" else cv.Int4Options()
            cv.convert(str(snapshot), cache[dtype], dtype=dtype, int4=int4)
        return snapshot, cache[dtype]

    return get


def damaged_copy(engine: Path, tmp_path: Path, tensor: str, part: str | None = None) -> Path:
    """A copy of the engine file with one bit flipped in the middle of a tensor (or its "scales" or "zeros")."""
    with ef.EngineFile.open(engine) as e:
        t = e.entry(tensor)
        offset, size = (t.part(part)["offset"], t.part(part)["size"]) if part else (t.offset, t.nbytes)
    data = bytearray(engine.read_bytes())
    data[offset + size // 2] ^= 0x01
    out = tmp_path / "damaged.engine"
    out.write_bytes(bytes(data))
    return out


def run(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_good_file_passes_with_every_checksum(converted):
    _, engine = converted("bf16")
    result = run(engine)
    assert result.exit_code == 0, result.output
    assert re.search(r"checksums: all 19 match", result.output)


@pytest.mark.parametrize("tensor", ["embedding", "layers.1.post_attention_norm", "lm_head"])
def test_flipped_bit_fails_verify_naming_the_tensor(converted, tmp_path, tensor):
    _, engine = converted("bf16")
    result = run(damaged_copy(engine, tmp_path, tensor))
    assert result.exit_code == 1
    assert f"checksums: 1 of 19 fail:\n  {tensor}\n" in result.output
    assert result.output.rstrip().splitlines()[-1].endswith(f"1 checksum failures ({tensor})")


def test_flipped_bit_in_int8_scales_is_named(converted, tmp_path):
    _, engine = converted("int8")
    result = run(damaged_copy(engine, tmp_path, "layers.0.gate_up", "scales"))
    assert result.exit_code == 1
    assert "  layers.0.gate_up.scales\n" in result.output


@pytest.mark.parametrize("part", ["scales", "zeros"])
def test_flipped_bit_in_int4_scales_or_zeros_is_named(converted, tmp_path, part):
    _, engine = converted("int4")
    result = run(damaged_copy(engine, tmp_path, "layers.1.down_proj", part))
    assert result.exit_code == 1
    assert f"checksums: 1 of 35 fail:\n  layers.1.down_proj.{part}\n" in result.output


def test_int4_from_our_quantization_against_its_source_is_within_half_a_step(converted):
    snapshot, engine = converted("int4")
    with ef.EngineFile.open(engine) as e:
        comparisons = {c.name: c for c in vf.compare_with_source(e, resolve(str(snapshot)))}
    assert all(c.ok for c in comparisons.values())
    qkv = comparisons["layers.0.qkv"]
    assert qkv.check == "int4 per-group" and 0.5 < qkv.worst <= 1.0, qkv  # rounding reaches near half a step
    assert comparisons["lm_head"].check == "round to nearest even"  # the head stays bf16 by default


@pytest.mark.parametrize("dtype,promise", [("bf16", "round to nearest even"), ("fp32", "bit-exact"),
                                           ("fp16", "round to nearest even"), ("int8", "int8 per-row"),
                                           ("int4", "int4 per-group")])
def test_against_source_reports_max_error_per_tensor_within_bound(converted, dtype, promise):
    snapshot, engine = converted(dtype)
    result = run(engine, "--against", snapshot)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith(("embedding", "layers.", "final", "lm_head"))}
    assert len(lines) == 19, result.output
    assert promise in lines["layers.0.qkv"] and lines["layers.0.qkv"].rstrip().endswith("ok")
    assert "bit-exact" in lines["layers.0.q_norm"]  # norms stay float32, copied
    with ef.EngineFile.open(engine) as e:
        comparisons = vf.compare_with_source(e, resolve(str(snapshot)))
    worst = max(c.worst for c in comparisons)
    assert all(c.ok for c in comparisons) and worst <= 1.0, f"worst err/bound {worst:.3f}"
    if dtype == "fp32":
        assert max(c.max_abs_err for c in comparisons) == 0.0


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_reported_max_error_is_the_true_max_error_per_tensor(converted, dtype):
    from safetensors.numpy import load_file

    snapshot, engine = converted(dtype)
    source = {}
    for shard in snapshot.glob("*.safetensors"):
        source.update(load_file(shard))
    result = run(engine, "--against", snapshot)
    assert result.exit_code == 0, result.output
    printed = {line.split()[0]: float(line.split()[-3]) for line in result.output.splitlines()
               if line.startswith(("embedding", "layers.", "final", "lm_head"))}
    with ef.EngineFile.open(engine) as e:
        for name, parts in [("layers.0.qkv", ["q_proj", "k_proj", "v_proj"]), ("lm_head", None)]:
            x = (np.concatenate([source[f"model.layers.0.self_attn.{p}.weight"] for p in parts]) if parts
                 else source["lm_head.weight"]).astype(np.float64)
            y = e.tensor(name).astype(np.float64)
            if e.entry(name).quantization is not None:
                y = y * e.scales(name).astype(np.float64)[:, None]
            truth = float(np.abs(y - x).max())
            assert truth > 0, f"{name}: a lossy {dtype} conversion shows no error at all"
            rel = abs(printed[name] - truth) / truth
            assert rel <= 5e-3, f"{name}: printed max |err| {printed[name]:.3g}, true {truth:.6g} (rel {rel:.2e})"


def test_against_a_different_checkpoint_fails_naming_tensors(converted, tmp_path):
    from olmoscope.tiny import make_tiny

    _, engine = converted("bf16")
    other = make_tiny(tmp_path / "other", vocab_size=256, num_kv_heads=2, seed=7)
    result = run(engine, "--against", other)
    assert result.exit_code == 1
    assert "FAIL" in result.output
    assert re.search(r"19 tensors differ from .*other beyond their bound \(embedding, layers\.0\.qkv", result.output)


def test_against_a_different_model_is_a_clear_error(converted, tmp_path):
    from olmoscope.tiny import make_tiny

    _, engine = converted("bf16")
    other = make_tiny(tmp_path / "other", vocab_size=256, num_kv_heads=4)
    result = run(engine, "--against", other)
    assert result.exit_code == 1
    assert "its tensors do not match --against" in result.output


@pytest.mark.parametrize("command", [["verify"], ["arch"], ["tensors"], ["generate", "-p", "hi"]])
def test_not_an_engine_file_is_the_same_one_line_everywhere(tmp_path, command):
    path = tmp_path / "x.engine"
    path.write_bytes(b"hello world, not an engine file")
    result = CliRunner().invoke(main, [*command[:1], str(path), *command[1:]])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"olmoscope: error: {path}: not an olmoscope engine file (it starts with b'hello wo'; "
        f"an engine file starts with b'OLMOSCPE')"]


# ── the bounds themselves are tight ─────────────────────────────────────────────
def test_rne_bound_accepts_nearest_rejects_truncation():
    x = np.float32([1 + 0.75 * 2**-7])  # nearest bf16: 1 + 2^-7 (err 2^-9); truncated: 1 (err 1.5·2^-8)
    nearest = x.astype(ml_dtypes.bfloat16)
    truncated = np.array([1.0], ml_dtypes.bfloat16)
    err, worst, ok = vf.compare_block(x, nearest, "round to nearest even")
    assert ok and err == 2**-9, f"err {err:.3e}, worst {worst:.3f}"
    err, worst, ok = vf.compare_block(x, truncated, "round to nearest even")
    assert not ok and worst > 1.0, f"truncation passed with err/bound {worst:.3f}"


def test_nan_must_stay_nan_and_infinities_exact():
    x = np.float32([np.nan, np.inf, 1.0])
    assert vf.compare_block(x, x.astype(ml_dtypes.bfloat16), "round to nearest even")[2]
    assert not vf.compare_block(x, np.float32([0.0, np.inf, 1.0]).astype(ml_dtypes.bfloat16), "round to nearest even")[2]
    assert not vf.compare_block(x, np.float32([np.nan, 3e38, 1.0]).astype(ml_dtypes.bfloat16), "round to nearest even")[2]


def test_int8_bound_is_half_a_step():
    x = np.float32([[0.5, -1.0, 0.25]])
    q, scale = quantize_int8_rows(x, "w")
    steps = scale.astype(np.float64)[:, None]
    err, worst, ok = vf.compare_block(x, q * scale[:, None], "int8 per-row", steps)
    assert ok and err <= scale[0] / 2, f"err {err:.3e} vs scale/2 {scale[0] / 2:.3e}"
    off_by_one = q.astype(np.float32)
    off_by_one[0, 0] += 1
    assert not vf.compare_block(x, off_by_one * scale[:, None], "int8 per-row", steps)[2]


def test_bit_exact_means_bits():
    x = np.float32([0.0, 1.0])
    assert vf.compare_block(x, x.copy(), "bit-exact")[2]
    assert not vf.compare_block(x, np.float32([-0.0, 1.0]), "bit-exact")[2], "-0.0 is not a copy of 0.0"


def test_verify_of_missing_file_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError):
        ef.EngineFile.open(tmp_path / "none.engine")
    result = run(tmp_path / "none.engine")
    assert result.exit_code == 1 and "none.engine: no such file" in result.output


# ── the header is covered too (issue 10, item 2) ─────────────────────────────────
def _edited_copy(engine: Path, tmp_path: Path, edit, reseal: bool) -> Path:
    """A copy whose header JSON is changed by edit(text) in place, its checksum resealed or left stale."""
    data = bytearray(engine.read_bytes())
    _, _, length, _ = ef.PREAMBLE.unpack_from(data, 0)
    start = ef.PREAMBLE.size
    body = edit(bytes(data[start:start + length]))
    assert len(body) == length, "edit must keep the header's length"
    data_start = ef.align(start + length)
    head = ef.sealed_header(body, data_start) if reseal else bytes(data[:start]) + body + bytes(data[start + length:data_start])
    out = tmp_path / "edited.engine"
    out.write_bytes(head + bytes(data[data_start:]))
    return out


def test_one_changed_digit_of_rms_norm_eps_fails_verify(converted, tmp_path):
    from cli_checks import assert_one_line_error

    _, engine = converted("bf16")
    edited = _edited_copy(engine, tmp_path, lambda b: b.replace(b'"rms_norm_eps":1e-06', b'"rms_norm_eps":2e-06'), reseal=False)
    assert_one_line_error(run(edited), "the header fails its checksum", exit_code=1)


def test_against_compares_the_config_with_the_source(converted, tmp_path):
    """A header whose checksum is right but whose config is not the source's: the tensors match, the config does not."""
    from cli_checks import assert_one_line_error

    snapshot, engine = converted("bf16")
    edited = _edited_copy(engine, tmp_path, lambda b: b.replace(b'"rms_norm_eps":1e-06', b'"rms_norm_eps":2e-06'), reseal=True)
    result = run(edited, "--against", snapshot)
    assert "config: 1 fields differ" in result.stdout and "rms_norm_eps 2e-06 ≠ 1e-06" in result.stdout
    assert_one_line_error(result, "the config differs from", "rms_norm_eps", exit_code=1)
    good = run(engine, "--against", snapshot)
    assert good.exit_code == 0 and f"config: every field matches {snapshot}" in good.stdout


def test_verify_of_a_fifo_is_refused_without_hanging(tmp_path):
    import os

    from cli_checks import assert_one_line_error

    os.mkfifo(tmp_path / "fifo")
    assert_one_line_error(run(tmp_path / "fifo"), "not a regular file (a FIFO)", exit_code=1)
