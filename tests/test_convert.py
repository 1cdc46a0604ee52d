"""`olmoscope convert`: every tensor read back from the engine file equals its source (bit-exact for copies,
round-to-nearest-even for casts, half a step for int8), fused tensors split back into the originals, and a
conversion that fails or is interrupted leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from olmoscope import convert as cv
from olmoscope import engine_format as ef
from olmoscope.cli import main
from olmoscope.quantize import quantize_int8_rows
from olmoscope.errors import CheckpointError, OlmoscopeError, SourceError, UsageError
from olmoscope.sources import resolve
from olmoscope.spec import engine_tensors
from olmoscope.tiny import make_tiny

# Round to nearest even: |err| ≤ half an ulp ≤ 2^-p·|x| (p significand bits), plus half the smallest subnormal.
RNE_BOUND = {"BF16": (2.0**-8, 2.0**-134), "F16": (2.0**-11, 2.0**-25)}


# ── oracles, independent of the converter ──────────────────────────────────────
def source_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a snapshot, loaded by the safetensors library itself."""
    out = {}
    for shard in directory.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def bf16_rne_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits by integer arithmetic: add 0x7FFF plus the kept LSB, drop 16 bits; NaN → quiet NaN."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign and top payload, set quiet bit
    return rounded


def split_rows(stored: np.ndarray, spec) -> list[np.ndarray]:
    """A fused engine tensor cut back into its checkpoint tensors' rows."""
    if len(spec.shape) == 1:
        return [stored]
    bounds = np.cumsum([p.shape[0] for p in spec.sources])[:-1]
    return np.split(stored, bounds, axis=0)


def compare_to_source(engine: ef.EngineFile, originals: dict[str, np.ndarray]) -> dict[str, float]:
    """Assert every engine tensor matches its sources within its promise; returns the max |err| per part."""
    errors = {}
    for spec in engine_tensors(engine.config):
        entry = engine.entry(spec.name)
        stored = engine.tensor(spec.name)
        scales = split_rows(engine.scales(spec.name), spec) if entry.quantization else [None] * len(spec.sources)
        for part, piece, scale in zip(spec.sources, split_rows(stored, spec), scales):
            x = originals[part.name]
            assert piece.shape == x.shape, part.name
            x64 = x.astype(np.float64)
            if entry.dtype == "I8":
                err = np.abs(piece.astype(np.float64) * scale.astype(np.float64)[:, None] - x64)
                bound = scale.astype(np.float64)[:, None] * (0.5 + 1e-5)
                assert (err <= bound).all(), f"{part.name}: int8 err {err.max():.3e} beyond scale/2"
            elif x.dtype == piece.dtype:
                assert np.array_equal(piece.view(np.uint8), x.view(np.uint8)), f"{part.name}: copy is not bit-exact"
                err = np.zeros(1)
            elif entry.dtype == "F32":
                assert np.array_equal(piece, x.astype(np.float32)), f"{part.name}: widening cast is not exact"
                err = np.zeros(1)
            else:
                if entry.dtype == "BF16" and x.dtype == np.float32:
                    assert np.array_equal(piece.view(np.uint16), bf16_rne_bits(x)), f"{part.name}: not RNE"
                if entry.dtype == "F16" and x.dtype == np.float32:
                    assert np.array_equal(piece, x.astype(np.float16)), f"{part.name}: not numpy's RNE"
                rel, tiny = RNE_BOUND[entry.dtype]
                err = np.abs(piece.astype(np.float64) - x64)
                worst = float((err / (rel * np.abs(x64) + tiny)).max())
                assert worst <= 1.0, f"{part.name}: err {err.max():.3e} is {worst:.3f}× the RNE bound"
            errors[part.name] = float(err.max())
    return errors


@pytest.fixture(scope="module")
def tiny_snapshots(tmp_path_factory):
    """Factory for make_tiny snapshots (V=512, D=64, L=2), one per (dtype, kv heads), shared by the module."""
    cache = {}

    def get(dtype: str, kv_heads: int | None) -> Path:
        key = (dtype, kv_heads)
        if key not in cache:
            path = tmp_path_factory.mktemp("tiny") / f"{dtype}-{kv_heads}"
            cache[key] = make_tiny(path, vocab_size=512, num_kv_heads=kv_heads, dtype=dtype, seed=len(cache))
        return cache[key]

    return get


# ── round trips ─────────────────────────────────────────────────────────────────
ROUND_TRIPS = [
    ("float32", None, "bf16"), ("float32", 2, "bf16"), ("bfloat16", None, "bf16"), ("bfloat16", 2, "bf16"),
    ("float32", 2, "fp32"), ("bfloat16", 2, "fp32"), ("float32", 2, "fp16"), ("float32", None, "int8"),
    ("bfloat16", 2, "int8"),
]


@pytest.mark.parametrize("source_dtype,kv_heads,dtype", ROUND_TRIPS,
                         ids=[f"{s}-{'gqa' if k else 'mha'}-to-{d}" for s, k, d in ROUND_TRIPS])
def test_every_tensor_reads_back_equal_to_its_source(tiny_snapshots, tmp_path, source_dtype, kv_heads, dtype):
    snapshot = tiny_snapshots(source_dtype, kv_heads)
    shards_of_layer0 = {s for n, s in json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].items()
                        if n.startswith("model.layers.0.")}
    assert len(shards_of_layer0) == 2, "the fixture must split a layer across shards"
    out = tmp_path / "m.engine"
    report = cv.convert(str(snapshot), out, dtype=dtype)
    with ef.EngineFile.open(out) as engine:
        assert engine.verify() == []
        errors = compare_to_source(engine, source_tensors(snapshot))
        assert engine.config.num_key_value_heads == (kv_heads or 4)
    assert report.tensors == len(engine.entries)
    print(f"{source_dtype}->{dtype}: max |err| {max(errors.values()):.3e} over {len(errors)} tensors")


def test_fused_tensors_concatenate_rows_in_spec_order(tiny_snapshots, tmp_path):
    snapshot = tiny_snapshots("bfloat16", 2)
    out = tmp_path / "m.engine"
    cv.convert(str(snapshot), out, dtype="bf16")
    src = source_tensors(snapshot)
    with ef.EngineFile.open(out) as engine:
        qkv = engine.tensor("layers.1.qkv")
        assert qkv.shape == (64 + 32 + 32, 64)  # [Hd + 2·Hkvd, D] with H=4, Hkv=2, d=16
        q, k, v = qkv[:64], qkv[64:96], qkv[96:]
        for piece, role in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
            assert np.array_equal(piece, src[f"model.layers.1.self_attn.{role}.weight"]), role
        gate_up = engine.tensor("layers.0.gate_up")
        gate, up = np.split(gate_up, 2)
        assert np.array_equal(gate, src["model.layers.0.mlp.gate_proj.weight"])
        assert np.array_equal(up, src["model.layers.0.mlp.up_proj.weight"])


def test_f16_source_widens_exactly_and_narrows_by_rounding(make_snapshot, tmp_path):
    snapshot = make_snapshot(shards=2, dtype="F16")
    for dtype in ("fp32", "bf16", "fp16"):
        out = tmp_path / f"{dtype}.engine"
        cv.convert(str(snapshot), out, dtype=dtype)
        with ef.EngineFile.open(out) as engine:
            compare_to_source(engine, source_tensors(snapshot))


def test_tied_embeddings_convert_without_lm_head(make_snapshot, tiny_config, tmp_path):
    snapshot = make_snapshot(config={**tiny_config, "tie_word_embeddings": True})
    out = tmp_path / "m.engine"
    cv.convert(str(snapshot), out)
    with ef.EngineFile.open(out) as engine:
        assert "lm_head" not in [t.name for t in engine.entries]
        compare_to_source(engine, source_tensors(snapshot))


def test_block_size_does_not_change_a_single_byte_of_tensor_data(tiny_snapshots, tmp_path, monkeypatch):
    snapshot = tiny_snapshots("float32", 2)
    cv.convert(str(snapshot), tmp_path / "a.engine", dtype="int8")
    monkeypatch.setattr(cv, "BLOCK_BYTES", 1000)  # a few rows per block, blocks straddling fused parts
    cv.convert(str(snapshot), tmp_path / "b.engine", dtype="int8")
    with ef.EngineFile.open(tmp_path / "a.engine") as a, ef.EngineFile.open(tmp_path / "b.engine") as b:
        assert a.entries == b.entries  # same offsets, sizes and checksums, scales included


# ── rounding of special values ──────────────────────────────────────────────────
SPECIAL = np.array([
    1 + 2.0**-8,  # a tie between 1 and 1+2^-7: to the even one, 1
    1 + 3 * 2.0**-8,  # a tie between 1+2^-7 and 1+2^-6: to the even one, 1+2^-6
    1 + 2.0**-8 + 2.0**-20,  # just above the tie: up
    -0.0, np.inf, -np.inf, 3.0e-39, 2.0**-133,  # signed zero, infinities, a float32 subnormal, a bf16 half-subnormal
], dtype=np.float32)
SIGNALING_NAN = np.array([0x7F800001, 0xFF800001, 0x7FC00000], dtype=np.uint32).view(np.float32)  # truncation makes ±inf


def _special_snapshot(make_snapshot, values: np.ndarray, name="lm_head.weight", shape=(128, 64), dtype="F32"):
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.02
    array.reshape(-1)[: values.size] = values
    return make_snapshot(dtype=dtype, drop=(name,), extra={name: array})


def test_fp32_to_bf16_rounds_to_nearest_even_and_keeps_nan(make_snapshot, tmp_path):
    values = np.concatenate([SPECIAL, SIGNALING_NAN])
    snapshot = _special_snapshot(make_snapshot, values)
    cv.convert(str(snapshot), tmp_path / "m.engine", dtype="bf16")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        got = engine.tensor("lm_head").reshape(-1)[: values.size]
    bits = got.view(np.uint16)
    assert [hex(b) for b in bits[:3]] == ["0x3f80", "0x3f82", "0x3f81"]
    assert bits[3] == 0x8000 and np.isposinf(got[4]) and np.isneginf(got[5])
    assert np.array_equal(bits[: SPECIAL.size], bf16_rne_bits(SPECIAL))
    assert np.isnan(got[SPECIAL.size:].astype(np.float32)).all(), f"NaN lost: {bits[SPECIAL.size:]}"
    assert list(np.signbit(got[SPECIAL.size:].astype(np.float32))) == [False, True, False]


def test_fp32_to_fp16_keeps_nan_whatever_its_payload(make_snapshot, tmp_path):
    snapshot = _special_snapshot(make_snapshot, SIGNALING_NAN)
    cv.convert(str(snapshot), tmp_path / "m.engine", dtype="fp16")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        got = engine.tensor("lm_head").reshape(-1)[: SIGNALING_NAN.size]
    assert np.isnan(got).all(), f"NaN lost: {got.view(np.uint16)}"


def test_fp16_allows_values_that_round_to_its_max(make_snapshot, tmp_path):
    snapshot = _special_snapshot(make_snapshot, np.float32([65519.0, -65519.0]))
    cv.convert(str(snapshot), tmp_path / "m.engine", dtype="fp16")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        assert engine.tensor("lm_head").reshape(-1)[:2].tolist() == [65504.0, -65504.0]


@pytest.mark.parametrize("value", [65520.0, -1e6, 3.0e38])
def test_fp16_refuses_values_outside_its_range_naming_the_tensor(make_snapshot, tmp_path, value):
    snapshot = _special_snapshot(make_snapshot, np.float32([value]), name="model.layers.1.mlp.up_proj.weight",
                                 shape=(128, 64))
    with pytest.raises(OlmoscopeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: value .* outside float16's range"):
        cv.convert(str(snapshot), tmp_path / "m.engine", dtype="fp16")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("snapshot")) == []


def test_bf16_refuses_float32_values_that_would_round_to_infinity(make_snapshot, tmp_path):
    snapshot = _special_snapshot(make_snapshot, np.float32([3.4e38]))
    with pytest.raises(OlmoscopeError, match=r"lm_head\.weight: value 3\.4e\+38 is outside bfloat16's range"):
        cv.convert(str(snapshot), tmp_path / "m.engine", dtype="bf16")
    assert _leftovers(tmp_path) == []


def test_int8_refuses_non_finite_values(make_snapshot, tmp_path):
    snapshot = _special_snapshot(make_snapshot, np.float32([np.nan]))
    with pytest.raises(OlmoscopeError, match=r"lm_head\.weight: holds NaN or Inf"):
        cv.convert(str(snapshot), tmp_path / "m.engine", dtype="int8")
    assert _leftovers(tmp_path) == []


def test_int8_quantizes_each_row_to_absmax_over_127():
    rows = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]], np.float32)
    q, scale = quantize_int8_rows(rows, "w")
    assert scale.dtype == np.float32 and q.dtype == np.int8
    assert np.allclose(scale, [1 / 127, 0.0, 3 / 127], rtol=1e-7)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 42, -85]]
    err = np.abs(q * scale[:, None].astype(np.float64) - rows)
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all(), f"max err {err.max():.3e}"


def test_int8_of_a_subnormal_row_keeps_its_bound_and_verifies(make_snapshot, tmp_path):
    """Issue 10, item 10: a row whose largest value is 1e-45 once got scale 0 (absmax / 127 underflows)."""
    from olmoscope.verify import compare_with_source

    rows = np.zeros((128, 64), np.float32)
    rows[0, :3] = [1e-45, -1e-45, 0]  # the smallest subnormal, both signs
    rows[1, :2] = [190 * 2.0**-149, 3 * 2.0**-149]  # scale rounds down a whole unit without the fix
    rows[2:] = np.random.default_rng(2).standard_normal((126, 64)) * np.float32(1e-39)
    snapshot = make_snapshot(drop=("lm_head.weight",), extra={"lm_head.weight": rows})
    cv.convert(str(snapshot), tmp_path / "m.engine", dtype="int8")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        assert engine.scales("lm_head")[0] > 0
        lm_head = next(c for c in compare_with_source(engine, resolve(str(snapshot))) if c.name == "lm_head")
    assert lm_head.ok and lm_head.worst <= 1.0, lm_head


# ── what the snapshot's side files may hold ─────────────────────────────────────
def _snapshot_with(make_snapshot, **files) -> Path:
    snapshot = make_snapshot()
    for name, content in files.items():
        path = snapshot / name.replace("__", ".")
        if content == "fifo":
            os.mkfifo(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    return snapshot


def _broken_tokenizer() -> str:
    """The dolma2 tokenizer with a normalizer whose empty regex makes tokenizers panic on any text."""
    from importlib import resources

    tokenizer = json.loads(resources.files("olmoscope").joinpath("data", "dolma2-tokenizer.json").read_text("utf-8"))
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"Regex": ""}, "content": "x"}
    return json.dumps(tokenizer)


@pytest.mark.parametrize("files,fragments", [
    ({"generation_config__json": {"eos_token_id": list(range(100))}},
     ["eos_token_id lists 100 ids; an engine file holds at most 64"]),
    ({"tokenizer__json": {"model": {"vocab": {"a": 0, "b": 5_000_000}}}},
     ["token id 5,000,000 is beyond the 4,194,304 ids an engine file holds"]),
    ({"tokenizer_config__json": {"chat_template": [{"name": ["default"], "template": "x"}]}}, None),  # no name: none
    ({"tokenizer_config__json": '{"chat_template": "a", "chat_template": "b"}'}, ["duplicate key 'chat_template'"]),
    ({"generation_config__json": '{"eos_token_id": ' + "9" * 5000 + "}"}, ["an integer of 5,000 digits"]),
    ({"tokenizer__json": "fifo"}, ["tokenizer.json", "not a regular file (a FIFO)"]),
    ({"generation_config__json": "fifo"}, ["generation_config.json", "not a regular file (a FIFO)"]),
    ({"tokenizer_config__json": "fifo"}, ["tokenizer_config.json", "not a regular file (a FIFO)"]),
    ({"chat_template__jinja": "fifo"}, ["chat_template.jinja", "not a regular file (a FIFO)"]),
    ({"tokenizer__json": '{"model": {"vocab": {"\\ud800": 0}}}'}, ["tokenizer.json", "lone surrogate (\\ud800)"]),
])
def test_side_files_are_refused_before_writing_or_read_as_documented(make_snapshot, tmp_path, files, fragments):
    snapshot = _snapshot_with(make_snapshot, **files)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if fragments is None:
        report = cv.convert(str(snapshot), out_dir / "m.engine")
        with ef.EngineFile.open(report.output) as engine:
            assert engine.generation["chat_template"] is None
        return
    result = CliRunner().invoke(main, ["convert", str(snapshot), "-o", str(out_dir / "m.engine")])
    from cli_checks import assert_one_line_error

    assert_one_line_error(result, *fragments)
    assert _leftovers(out_dir) == []


def test_a_tokenizer_that_panics_is_refused_in_one_line(make_snapshot, tmp_path, capfd):
    from cli_checks import assert_one_line_error

    snapshot = _snapshot_with(make_snapshot, tokenizer__json=_broken_tokenizer())
    result = CliRunner().invoke(main, ["convert", str(snapshot), "-o", str(tmp_path / "m.engine")])
    assert_one_line_error(result, "tokenizer.json: the tokenizer panicked (index out of bounds")
    assert "panicked at" not in capfd.readouterr().err, "Rust's own panic lines are held back"
    assert _leftovers(tmp_path) == []


def test_a_dangling_side_file_symlink_is_an_error_not_absence(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(SourceError, match=r"tokenizer.json: no such file \(a dangling symbolic link\)"):
        cv.convert(str(snapshot), tmp_path / "m.engine")


def test_a_template_that_does_not_compile_is_kept_with_a_note(make_snapshot, tmp_path):
    snapshot = _snapshot_with(make_snapshot, chat_template__jinja="{% include 'other.jinja' %}")
    report = cv.convert(str(snapshot), tmp_path / "m.engine")
    assert any("{% include %} is not allowed" in note for note in report.notes), report.notes


def test_a_snapshot_folder_whose_name_is_not_utf8_converts(make_snapshot, tmp_path):
    """Issue 10, item 5: the folder name went into the header and failed to encode."""
    snapshot = make_snapshot()
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/snap\xff"))
    snapshot.rename(odd)
    report = cv.convert(str(odd), tmp_path / "m.engine")
    with ef.EngineFile.open(report.output) as engine:
        assert engine.provenance["source_path"].endswith("snap\\xff")
    result = CliRunner().invoke(main, ["arch", str(odd)])
    assert result.exit_code == 0 and "snap" in result.output


# ── header contents ─────────────────────────────────────────────────────────────
def test_header_carries_tokenizer_generation_defaults_and_provenance(tiny_snapshots, tmp_path):
    snapshot = tiny_snapshots("float32", 2)
    cv.convert(str(snapshot), tmp_path / "m.engine")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        assert engine.tokenizer_json == (snapshot / "tokenizer.json").read_text("utf-8")
        g = engine.generation
        assert g["eos_token_ids"] == [511] and g["pad_token_id"] == 510 and g["bos_token_id"] is None
        assert g["chat_template"] == json.loads((snapshot / "tokenizer_config.json").read_text())["chat_template"]
        assert g["tokenizer_vocab_size"] == 100278
        p = engine.provenance
        assert p["source"] == str(snapshot) and p["source_kind"] == "snapshot"
        assert p["source_path"] == str(snapshot.resolve())
        assert p["config_sha256"] == hashlib.sha256((snapshot / "config.json").read_bytes()).hexdigest()
        assert p["index_sha256"] == hashlib.sha256((snapshot / "model.safetensors.index.json").read_bytes()).hexdigest()
        assert p["source_dtypes"] == ["F32"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["created_utc"])


def test_generation_config_and_chat_template_jinja_take_precedence(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    (snapshot / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7, 3], "bos_token_id": 1}))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    (snapshot / "chat_template.jinja").write_text("from jinja")
    cv.convert(str(snapshot), tmp_path / "m.engine")
    with ef.EngineFile.open(tmp_path / "m.engine") as engine:
        assert engine.generation["eos_token_ids"] == [3, 7]
        assert engine.generation["bos_token_id"] == 1
        assert engine.generation["chat_template"] == "from jinja"
        assert engine.tokenizer_json is None and engine.generation["tokenizer_vocab_size"] is None


def test_broken_tokenizer_is_refused_before_writing(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    (snapshot / "tokenizer.json").write_text('{"model": "nonsense"}')
    with pytest.raises(SourceError, match="tokenizer.json: the tokenizers library cannot load it"):
        cv.convert(str(snapshot), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_engine_file_is_a_source_for_arch(tiny_snapshots, tmp_path):
    snapshot = tiny_snapshots("float32", 2)
    out = tmp_path / "m.engine"
    cv.convert(str(snapshot), out)
    source = resolve(str(out))
    assert source.kind == "engine" and source.engine_path == out
    assert source.config == resolve(str(snapshot)).config
    result = CliRunner().invoke(main, ["arch", str(out)])
    assert result.exit_code == 0, result.output
    assert "num_key_value_heads" in result.output


def test_arch_of_engine_file_reports_the_stored_layout(tiny_snapshots, tmp_path):
    from importlib import resources

    import jsonschema

    out = tmp_path / "m.engine"
    cv.convert(str(tiny_snapshots("float32", 2)), out, dtype="int8")
    result = CliRunner().invoke(main, ["arch", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    schema = json.loads(resources.files("olmoscope.schemas").joinpath("arch-report.schema.json").read_text())
    jsonschema.validate(report, schema)
    layout = report["engine"]
    assert layout["weight_dtype"] == "int8" and layout["file_bytes"] == out.stat().st_size
    with ef.EngineFile.open(out) as engine:
        rows = {r.name: r for r in ef.engine_rows(engine)}
    assert [t["name"] for t in layout["tensors"]] == list(rows)  # fused names, file order, scales included
    for t in layout["tensors"]:
        r = rows[t["name"]]
        assert (t["dtype"], tuple(t["shape"]), t["offset"], t["bytes"]) == (r.dtype, r.shape, r.offset, r.nbytes)
    qkv = next(t for t in layout["tensors"] if t["name"] == "layers.0.qkv")
    assert qkv["shape"] == [64 + 2 * 32, 64] and qkv["dtype"] == "I8"  # Hd + 2·Hkv·d rows: GQA widths
    text = CliRunner().invoke(main, ["arch", str(out)])
    assert text.exit_code == 0, text.output
    assert "Engine file layout" in text.stdout and "layers.0.gate_up" in text.stdout
    assert "layers.1.qkv" not in text.stdout  # one layer shown, like the tensor table
    stored = next(line for line in text.stdout.splitlines() if line.startswith("stored dtype"))
    assert stored.split()[2] == "int8" and "the source was float32" in stored, stored  # not config's torch_dtype
    snapshot_report = json.loads(CliRunner().invoke(main, ["arch", str(tiny_snapshots("float32", 2)), "--json"]).stdout)
    assert "engine" not in snapshot_report


# ── refusals before any byte is written ─────────────────────────────────────────
def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_checkpoint_not_matching_config_is_refused_with_the_list(make_snapshot, tiny_config, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    snapshot = make_snapshot(drop=("model.layers.1.mlp.down_proj.weight", "model.norm.weight"),
                             extra={"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(CheckpointError) as caught:
        cv.convert(str(snapshot), out_dir / "m.engine")
    text = str(caught.value)
    assert "2 missing (model.layers.1.mlp.down_proj.weight, model.norm.weight)" in text
    assert "1 wrong shape (model.layers.0.self_attn.k_proj.weight expected [32, 64] found [64, 64])" in text
    assert text.endswith(f"every finding: olmoscope tensors {snapshot} --check")
    assert _leftovers(out_dir) == []


def test_refuses_to_overwrite_without_force(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists; pass --force"):
        cv.convert(str(tiny_snapshots("float32", 2)), out)
    assert out.read_bytes() == b"precious"
    cv.convert(str(tiny_snapshots("float32", 2)), out, force=True)
    assert ef.looks_like_engine(out)
    assert _leftovers(tmp_path) == ["m.engine"]


def test_refuses_when_free_space_is_short(tiny_snapshots, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OlmoscopeError, match=r"0\.00 GB free, the engine file needs 0\.0\d GB; nothing was written"):
        cv.convert(str(tiny_snapshots("float32", 2)), tmp_path / "m.engine")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("label", ["olmo2-1b", "nonexistent-dir/"])
def test_sources_without_tensors_are_refused(tmp_path, label):
    with pytest.raises(SourceError):
        cv.convert(label, tmp_path / "m.engine")


def test_engine_file_as_source_is_refused(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    cv.convert(str(tiny_snapshots("float32", 2)), out)
    with pytest.raises(SourceError, match="already an engine file"):
        cv.convert(str(out), tmp_path / "again.engine")


# ── crash safety ────────────────────────────────────────────────────────────────
def _fail_on_third_write(monkeypatch, error: BaseException):
    real = ef.EngineWriter.write
    calls = {"n": 0}

    def write(self, block):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return real(self, block)

    monkeypatch.setattr(ef.EngineWriter, "write", write)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "exception"])
def test_interrupted_conversion_leaves_neither_output_nor_temp_file(tiny_snapshots, tmp_path, monkeypatch, error):
    snapshot = tiny_snapshots("float32", 2)
    _fail_on_third_write(monkeypatch, error)
    with pytest.raises(type(error)):
        cv.convert(str(snapshot), tmp_path / "m.engine")
    assert _leftovers(tmp_path) == []


def test_interrupted_forced_conversion_keeps_the_old_file(tiny_snapshots, tmp_path, monkeypatch):
    out = tmp_path / "m.engine"
    out.write_bytes(b"old engine")
    _fail_on_third_write(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        cv.convert(str(tiny_snapshots("float32", 2)), out, force=True)
    assert out.read_bytes() == b"old engine"
    assert _leftovers(tmp_path) == ["m.engine"]


def _slow_convert(snapshot: Path, out_dir: Path, marker: Path, force_named_partial: bool = False):
    """A real `olmoscope convert` process, slowed down so that a signal lands while it writes; it touches
    `marker` when the first block is being encoded."""
    import signal
    import subprocess
    import sys

    script = ("import time, pathlib, olmoscope.convert as cv, olmoscope.atomic as at\n"
              "real = cv.encode_block\n"
              f"marker = pathlib.Path({str(marker)!r})\n"
              "cv.encode_block = lambda *a, **k: (marker.touch(), time.sleep(0.2), real(*a, **k))[2]\n"
              + ("at._Nameless.create = classmethod(lambda cls, folder: None)\n" if force_named_partial else "")
              + "from olmoscope.cli import main\n"
              f"main(['convert', {str(snapshot)!r}, '-o', 'm.engine'])\n")
    # SIGINT at its default in the child: a suite started in the background inherits it ignored, and olmoscope rightly
    # keeps a parent's "ignore" (nohup, `&`), which would make the Ctrl-C cases finish instead
    return subprocess.Popen([sys.executable, "-c", script], cwd=out_dir, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(marker: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the conversion never started writing"


@pytest.mark.parametrize("signals,code", [
    (["SIGINT"], 130), (["SIGTERM"], 130), (["SIGHUP"], 130),
    (["SIGINT", "SIGINT"], 130),  # two Ctrl-C 20 ms apart: the second lands during the unwinding
    (["SIGUSR1"], -10), (["SIGKILL"], -9),  # no handler at all: only a nameless file survives these
])
def test_killed_cli_conversion_leaves_neither_output_nor_temp_file(tiny_snapshots, tmp_path, signals, code):
    import signal
    import time

    out_dir, marker = tmp_path / "out", tmp_path / "started"
    out_dir.mkdir()
    process = _slow_convert(tiny_snapshots("float32", 2), out_dir, marker)
    _wait_for(marker)
    for number, name in enumerate(signals):
        if number:
            time.sleep(0.02)
        process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    if code == 130:
        assert stderr.strip().splitlines()[-1] == "olmoscope: interrupted"
    assert list(out_dir.iterdir()) == [], "no output, no partial, no hidden file"


def test_without_o_tmpfile_the_next_convert_removes_a_killed_writers_partial(tiny_snapshots, tmp_path):
    import fcntl
    import signal

    from olmoscope import atomic

    out_dir, marker = tmp_path / "out", tmp_path / "started"
    out_dir.mkdir()
    process = _slow_convert(tiny_snapshots("float32", 2), out_dir, marker, force_named_partial=True)
    _wait_for(marker)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    left = [p.name for p in out_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.engine.") and left[0].endswith(atomic.PARTIAL_SUFFIX)
    # A partial whose writer is alive (it holds the lock) is left alone.
    alive = out_dir / f".other.engine.1234{atomic.PARTIAL_SUFFIX}"
    with open(alive, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        cv.convert(str(tiny_snapshots("float32", 2)), out_dir / "m.engine")
        assert sorted(p.name for p in out_dir.iterdir()) == [alive.name, "m.engine"]


def test_a_file_that_appears_at_the_output_while_converting_is_not_replaced(tiny_snapshots, tmp_path, monkeypatch):
    out = tmp_path / "m.engine"
    real = ef.EngineWriter.finish

    def finish(self):
        out.write_bytes(b"made by someone else meanwhile")
        return real(self)

    monkeypatch.setattr(ef.EngineWriter, "finish", finish)
    with pytest.raises(UsageError, match="a file appeared there while converting and was left alone"):
        cv.convert(str(tiny_snapshots("float32", 2)), out)
    assert out.read_bytes() == b"made by someone else meanwhile"
    assert _leftovers(tmp_path) == ["m.engine"]


def test_two_converts_to_one_output_do_not_both_succeed(tiny_snapshots, tmp_path, monkeypatch):
    """The second conversion runs while the first is inside finish(): only the first one's file remains."""
    out = tmp_path / "m.engine"
    snapshot = str(tiny_snapshots("float32", 2))
    real, outcomes = ef.EngineWriter.finish, []

    def finish(self):
        if not outcomes:
            outcomes.append("inner")
            monkeypatch.setattr(ef.EngineWriter, "finish", real)
            cv.convert(snapshot, out)  # the other convert completes first
        return real(self)

    monkeypatch.setattr(ef.EngineWriter, "finish", finish)
    with pytest.raises(UsageError, match="appeared there while converting"):
        cv.convert(snapshot, out)
    with ef.EngineFile.open(out) as engine:
        assert engine.verify() == []


def test_output_that_is_a_source_file_is_refused_even_with_force(tiny_snapshots, tmp_path):
    snapshot = tiny_snapshots("float32", 2)
    shard = sorted(snapshot.glob("*.safetensors"))[0]
    before = shard.read_bytes()
    for target in (shard, snapshot / "config.json", snapshot / "tokenizer.json"):
        with pytest.raises(UsageError, match=f"is the source's own {target.name}; refused"):
            cv.convert(str(snapshot), target, force=True)
    link = tmp_path / "alias.safetensors"
    os.link(shard, link)  # a hard link is the same file under another name
    with pytest.raises(UsageError, match="is the source's own"):
        cv.convert(str(snapshot), link, force=True)
    assert shard.read_bytes() == before


@pytest.mark.parametrize("name", ["out/", "existing_dir", "."])
def test_output_naming_a_directory_is_refused(tiny_snapshots, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing_dir").mkdir()
    with pytest.raises(UsageError, match="directory"):
        cv.convert(str(tiny_snapshots("float32", 2)), name)
    assert not (tmp_path / "out").exists(), "-o out/ must not write a file named out"


def test_full_disk_is_one_error_and_leaves_nothing(tiny_snapshots, tmp_path, monkeypatch):
    _fail_on_third_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OlmoscopeError, match=r"m\.engine: conversion stopped \(No space left on device\); nothing was written"):
        cv.convert(str(tiny_snapshots("float32", 2)), tmp_path / "m.engine")
    assert _leftovers(tmp_path) == []


def test_output_gets_the_usual_file_mode(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    cv.convert(str(tiny_snapshots("float32", 2)), out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ── memory stays one block, not one model ──────────────────────────────────────
def test_peak_python_memory_is_far_below_one_tensor(make_snapshot, tiny_config, tmp_path, monkeypatch):
    import tracemalloc

    config = {**tiny_config, "vocab_size": 8192}  # embedding and lm_head: 2 MiB each in float32
    snapshot = make_snapshot(config=config)
    monkeypatch.setattr(cv, "BLOCK_BYTES", 64 << 10)
    real, peaks = cv.write_engine, []

    def measured(*args, **kwargs):
        tracemalloc.start()
        try:
            return real(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(cv, "write_engine", measured)
    cv.convert(str(snapshot), tmp_path / "m.engine", dtype="int8")
    largest = 8192 * 64 * 4
    assert peaks[0] < largest / 4, f"peak {peaks[0]:,} bytes while streaming; the largest tensor is {largest:,}"


# ── the command line ────────────────────────────────────────────────────────────
def test_cli_prints_a_summary_table(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    result = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(out), "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    for pattern in (rf"output\s+{re.escape(str(out))}", r"tensors\s+19 \(\+ 9 scale arrays\)", r"I8 bytes\s+131,072",
                    r"BF16 bytes\s+65,536", r"F32 scales bytes", r"time\s+[\d.]+ s", r"throughput\s+read [\d.]+ [MG]B/s"):
        assert re.search(pattern, result.output), (pattern, result.output)


def test_cli_int4_summary_names_the_quantization_and_its_parts(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    result = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(out), "--dtype", "int4",
                                       "--group-size", "32"])
    assert result.exit_code == 0, result.output
    # 8 int4 matrices (qkv, o_proj, gate_up, down_proj × 2 layers); the embedding and lm_head stay bf16
    for pattern in (r"quantization\s+int4 asym, group 32, lm_head bf16, quantized by olmoscope",
                    r"tensors\s+19 \(\+ 8 scale arrays, 8 zero-point arrays\)", r"U4 bytes", r"F16 scales bytes",
                    r"U8 zeros bytes"):
        assert re.search(pattern, result.output), (pattern, result.output)


def test_cli_int4_group_that_does_not_divide_a_width_is_one_line_and_writes_nothing(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    result = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(out), "--dtype", "int4"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "olmoscope: error: tensor layers.0.qkv: its 64 inputs are not a multiple of group size 128; choose a "
        "--group-size that divides 64"]
    assert list(tmp_path.iterdir()) == []


def test_int4_options_without_int4_are_refused(tiny_snapshots, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(tmp_path / "m.engine"),
                                       "--group-size", "32"])
    assert result.exit_code == 2
    assert "apply to --dtype int4 only" in result.output and "Traceback" not in result.output


def test_cli_errors_are_one_line_without_traceback(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    out.write_bytes(b"x")
    result = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"olmoscope: error: -o {out}: exists; pass --force to overwrite it"]
    bad = CliRunner().invoke(main, ["convert", str(tiny_snapshots("float32", 2)), "-o", str(out), "--dtype", "q4"])
    assert bad.exit_code == 2 and "Invalid value for '--dtype'" in bad.output


# ── engine files in `olmoscope tensors` ─────────────────────────────────────────
def test_tensors_lists_engine_rows_with_role_layout_and_a_passing_check(tiny_snapshots, tmp_path):
    import jsonschema
    from importlib import resources

    out = tmp_path / "m.engine"
    cv.convert(str(tiny_snapshots("float32", 2)), out, dtype="int8")
    text = CliRunner().invoke(main, ["tensors", str(out), "--check"])
    assert text.exit_code == 0, text.output
    assert re.search(r"layers\.0\.qkv\s+\[128, 64\]\s+I8\s+8,192\s+8,192\s+m\.engine\s+[\d,]+\s+qkv\s+"
                     r"row-major \[Hd\+Hkvd\+Hkvd, D\] = \[out, in\]; rows = \[q_proj; k_proj; v_proj\]", text.output)
    assert "layers.0.qkv.scales" in text.output and "Check against config (28 tensors implied): ok" in text.output
    report = json.loads(CliRunner().invoke(main, ["tensors", str(out), "--json"]).output)
    schema = json.loads(resources.files("olmoscope.schemas").joinpath("tensors-report.schema.json").read_text())
    jsonschema.validate(report, schema)
    with ef.EngineFile.open(out) as engine:
        by_name = {t.name: t for t in engine.entries}
        for row in report["tensors"]:
            if row["name"] in by_name:
                t = by_name[row["name"]]
                assert (row["offset"], row["bytes"], row["role"], row["layout"]) == (t.offset, t.nbytes, t.role, t.layout)
    assert report["kind"] == "engine" and report["check"]["ok"]


def test_tensors_stats_read_engine_data(tiny_snapshots, tmp_path):
    out = tmp_path / "m.engine"
    cv.convert(str(tiny_snapshots("float32", 2)), out, dtype="fp32")
    report = json.loads(CliRunner().invoke(main, ["tensors", str(out), "--json", "--stats", "--filter", "final_norm"]).output)
    with ef.EngineFile.open(out) as engine:
        expected = float(engine.tensor("final_norm").astype(np.float64).mean())
    assert abs(report["tensors"][0]["stats"]["mean"] - expected) <= 1e-12, report["tensors"][0]["stats"]
