"""The engine file format: writer and reader agree, the layout is what ENGINE_FORMAT.md says, and the reader
refuses every inconsistency it is documented to check, with one EngineError naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jsonschema
import ml_dtypes
import numpy as np
import pytest

from olmoscope import engine_format as ef
from olmoscope.config import ModelConfig
from olmoscope.errors import EngineError
from olmoscope.spec import engine_tensors

# D=64, H=4, Hkv=2 (d=16), I=96, L=2, V=256: small, GQA, every tensor kind.
CONFIG = {
    "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "eos_token_id": 255, "pad_token_id": 254,
}


# int4 synthetic files: group 32 divides every width of CONFIG (I = 96)
INT4 = ef.Quantization("int4", "asym", 32, False)


def quantization_of(weight_dtype: str, quant: ef.Quantization | None = None) -> ef.Quantization | None:
    return quant or (INT4 if weight_dtype == "int4" else ef.default_quantization(weight_dtype))


def base_header(config: ModelConfig, weight_dtype: str, tokenizer: str | None = None,
                quant: ef.Quantization | None = None) -> dict:
    """A header without its tensor table, as convert would build it."""
    import hashlib

    quant = quantization_of(weight_dtype, quant)
    return {
        "format": ef.FORMAT_NAME, "format_version": ef.FORMAT_VERSION, "weight_dtype": weight_dtype,
        "quantization": None if quant is None else quant.to_json(),
        "alignment": ef.ALIGNMENT, "config": ef.config_to_header(config),
        "tokenizer": None if tokenizer is None else {"json": tokenizer, "sha256": hashlib.sha256(tokenizer.encode()).hexdigest()},
        "generation": {"eos_token_ids": [255], "pad_token_id": 254, "bos_token_id": None, "chat_template": None,
                       "tokenizer_vocab_size": None},
        "provenance": {"source": "synthetic", "source_kind": "snapshot", "source_path": None, "repo_id": None,
                       "revision": None, "commit": None, "config_sha256": "0" * 64, "index_sha256": None,
                       "source_dtypes": ["F32"], "olmoscope_version": "test", "created_utc": "2025-01-01T00:00:00Z"},
    }


def write_synthetic(path: Path, weight_dtype: str = "bf16", raw_config: dict | None = None, seed: int = 0,
                    tokenizer: str | None = None, quant: ef.Quantization | None = None) -> dict[str, np.ndarray]:
    """Write an engine file of random tensors straight through EngineWriter; returns what was stored by name
    (a quantized matrix's scales and zeros as "NAME.scales", "NAME.zeros")."""
    config = ModelConfig.from_dict(raw_config or CONFIG)
    quant = quantization_of(weight_dtype, quant)
    rng = np.random.default_rng(seed)
    stored = {}
    with open(path, "wb") as f:
        writer = ef.EngineWriter(f, base_header(config, weight_dtype, tokenizer, quant),
                                 ef.plan_tensors(config, weight_dtype, quant))
        for t in writer.tensors:
            parts = {}
            if t.dtype == "I8":
                values = rng.integers(-127, 128, t.shape, dtype=np.int8)
            elif t.dtype == "U4":
                values = rng.integers(0, 256, t.data_shape, dtype=np.uint8)
            else:
                values = rng.standard_normal(t.shape, dtype=np.float32).astype(ef.DTYPES[t.dtype])
            for kind in ef.PARTS:
                part = t.part(kind)
                if part is not None:
                    dtype = ef.DTYPES[part["dtype"]]
                    parts[kind] = (rng.integers(0, 16, part["shape"]).astype(dtype) if kind == "zeros"
                                   else rng.random(part["shape"], dtype=np.float32).astype(dtype))
                    stored[f"{t.name}.{kind}"] = parts[kind]
            writer.begin(t.name)
            half = t.shape[0] // 2 if len(t.shape) == 2 else t.shape[0]
            writer.write(values[:half])  # in two blocks, as convert streams them
            writer.write(values[half:])
            writer.end(parts.get("scales"), parts.get("zeros"))
            stored[t.name] = values
        writer.finish()
    return stored


def read_header(path: Path) -> tuple[dict, int, bytes]:
    """(header, data start, the file's bytes)."""
    data = path.read_bytes()
    _, _, length, _ = ef.PREAMBLE.unpack_from(data, 0)
    start = ef.PREAMBLE.size
    return json.loads(data[start:start + length]), ef.align(start + length), data


def rewrite_header(path: Path, mutate) -> None:
    """Apply mutate(header) and write the header back in place, checksum resealed (it must still fit)."""
    header, data_start, data = read_header(path)
    mutate(header)
    body = ef.encode_header(header)
    assert ef.PREAMBLE.size + len(body) <= data_start, "test mutation made the header too long to fit"
    path.write_bytes(ef.sealed_header(body, data_start) + data[data_start:])


@pytest.fixture
def engine_path(tmp_path) -> Path:
    path = tmp_path / "model.engine"
    write_synthetic(path)
    return path


# ── round trip and layout ───────────────────────────────────────────────────────
@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16", "fp32", "int8", "int4"])
def test_reader_returns_exactly_what_writer_stored(tmp_path, weight_dtype):
    path = tmp_path / "m.engine"
    stored = write_synthetic(path, weight_dtype)
    with ef.EngineFile.open(path) as engine:
        assert engine.weight_dtype == weight_dtype
        assert [t.name for t in engine.entries] == [s.name for s in engine_tensors(engine.config)]
        for t in engine.entries:
            view = engine.tensor(t.name)
            packed = (t.shape[0], t.shape[1] // 2) if t.dtype == "U4" else t.shape
            assert view.dtype == ef.DTYPES[t.dtype] and view.shape == packed
            assert np.array_equal(view.view(np.uint8), stored[t.name].view(np.uint8)), t.name
            if t.quantization is not None:
                assert np.array_equal(engine.scales(t.name), stored[t.name + ef.SCALES_SUFFIX]), t.name
                zeros = engine.zeros(t.name)
                assert (zeros is None) == (t.name + ef.ZEROS_SUFFIX not in stored), t.name
                if zeros is not None:
                    assert np.array_equal(zeros, stored[t.name + ef.ZEROS_SUFFIX]), t.name
        assert engine.verify() == []


def test_int4_files_record_format_group_scheme_and_the_shapes_of_scales_and_zeros(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int4")
    with ef.EngineFile.open(path) as engine:
        assert engine.quantization == INT4
        qkv = engine.entry("layers.0.qkv")  # [Hd + 2·Hkvd, D] = [128, 64], groups of 32 inputs
        assert (qkv.dtype, qkv.shape, qkv.nbytes) == ("U4", (128, 64), 128 * 32)
        q = qkv.quantization
        assert (q["format"], q["scheme"], q["group_size"], q["source"]) == ("int4", "asym", 32, "ours")
        assert (q["scales"]["dtype"], q["scales"]["shape"], q["scales"]["size"]) == ("F16", [128, 2], 512)
        assert (q["zeros"]["dtype"], q["zeros"]["shape"], q["zeros"]["size"]) == ("U8", [128, 2], 256)
        down = engine.entry("layers.0.down_proj")  # [D, I] = [64, 96]: three groups per row
        assert down.quantization["scales"]["shape"] == [64, 3]
        assert engine.entry("lm_head").dtype == "BF16" and engine.entry("lm_head").quantization is None
        assert engine.entry("embedding").dtype == "BF16"


def test_symmetric_int4_with_a_quantized_head_stores_no_zeros(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int4", quant=ef.Quantization("int4", "sym", 32, True))
    with ef.EngineFile.open(path) as engine:
        head = engine.entry("lm_head")
        assert head.dtype == "U4" and head.quantization["zeros"] is None
        assert engine.zeros("lm_head") is None
        assert [label for _, _, label in head.regions()] == ["lm_head", "lm_head.scales"]


def test_int4_zero_regions_are_checksummed_and_named_by_verify(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int4")
    header, _, data = read_header(path)
    zeros = header["tensors"][1]["quantization"]["zeros"]
    damaged = bytearray(data)
    damaged[zeros["offset"]] ^= 0x01
    path.write_bytes(bytes(damaged))
    with ef.EngineFile.open(path) as engine:
        assert engine.verify() == ["layers.0.qkv.zeros"]
        with pytest.raises(EngineError, match="tensor layers.0.qkv.zeros fails its checksum"):
            engine.checked_zeros("layers.0.qkv")


def test_a_group_that_does_not_divide_k_is_an_error_naming_the_tensor():
    with pytest.raises(EngineError, match=r"tensor layers.0.qkv: its 64 inputs are not a multiple of group size 128"):
        ef.plan_tensors(ModelConfig.from_dict(CONFIG), "int4", ef.Quantization("int4", "asym", 128, False))


def test_dtype_rules_norms_float32_int8_keeps_embedding_bf16(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int8")
    with ef.EngineFile.open(path) as engine:
        kinds = {s.name: s.kind for s in engine_tensors(engine.config)}
        for t in engine.entries:
            if kinds[t.name] == "norm":
                assert t.dtype == "F32" and t.quantization is None, t.name
            elif t.role == "embedding":
                assert t.dtype == "BF16" and t.quantization is None
            else:
                q = t.quantization
                assert t.dtype == "I8" and (q["format"], q["scheme"], q["group_size"]) == ("int8", "sym", None), t.name
                assert q["scales"]["dtype"] == "F32" and q["scales"]["shape"] == [t.shape[0]] and q["zeros"] is None
        assert engine.tensor("embedding").dtype == np.dtype(ml_dtypes.bfloat16)


def test_preamble_is_magic_version_length_and_header_checksum_little_endian(engine_path):
    import xxhash

    data = engine_path.read_bytes()
    assert data[:8] == b"OLMOSCPE"
    assert struct.unpack_from("<I", data, 8)[0] == ef.FORMAT_VERSION == 3
    length = struct.unpack_from("<Q", data, 12)[0]
    header = json.loads(data[36:36 + length].decode("utf-8"))
    assert header["format"] == "olmoscope-engine"
    data_start = ef.align(36 + length)
    assert set(data[36 + length:data_start]) <= {0}, "padding after the header is zeros"
    # The checksum covers the version and length fields, the header and its padding (ENGINE_FORMAT.md).
    assert data[20:36] == xxhash.xxh3_128(data[8:20] + data[36:data_start]).digest()


def test_header_validates_against_the_shipped_schema(engine_path):
    header, _, _ = read_header(engine_path)
    schema = json.loads((Path(__file__).parents[1] / "schemas" / "engine-header.schema.json").read_text())
    jsonschema.validate(header, schema)
    assert schema == ef.header_schema(), "the packaged schema is the repository's"


def test_every_region_is_aligned_in_storage_order_and_disjoint(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int8")
    header, data_start, data = read_header(path)
    regions = [r for row in header["tensors"] for r in ef.EngineTensor.from_json(row).regions()]
    assert regions[0][0] == data_start
    for (offset, size, name), (next_offset, _, _) in zip(regions, regions[1:] + [(len(data) + 1, 0, "")]):
        assert offset % 4096 == 0, name
        assert offset + size <= next_offset, f"{name} overlaps the next region"
    assert regions[-1][0] + regions[-1][1] == len(data), "the file ends with the last tensor"


def test_checksums_are_xxh3_128_of_the_stored_bytes(engine_path):
    import xxhash

    header, _, data = read_header(engine_path)
    for row in header["tensors"]:
        assert row["checksum"] == xxhash.xxh3_128_hexdigest(data[row["offset"]:row["offset"] + row["size"]])


def test_layout_text_names_the_fused_parts_in_row_order(engine_path):
    with ef.EngineFile.open(engine_path) as engine:
        layouts = {t.role: t.layout for t in engine.entries}
    assert layouts["qkv"] == "row-major [Hd+Hkvd+Hkvd, D] = [out, in]; rows = [q_proj; k_proj; v_proj]"
    assert layouts["gate_up"] == "row-major [I+I, D] = [out, in]; rows = [gate_proj; up_proj]"
    assert layouts["final_norm"] == "vector [D]"


def test_views_are_zero_copy_and_read_only(engine_path):
    with ef.EngineFile.open(engine_path) as engine:
        t = engine.entry("layers.1.gate_up")
        view = engine.tensor(t.name)
        assert not view.flags.writeable
        assert not view.flags.owndata
        with pytest.raises(ValueError):
            view[0, 0] = 0


def test_close_with_live_views_keeps_them_valid_and_refuses_new_ones(engine_path):
    engine = ef.EngineFile.open(engine_path)
    view = engine.tensor("embedding")
    expected = np.array(view)
    engine.close()
    assert np.array_equal(view, expected)
    with pytest.raises(EngineError, match="closed"):
        engine.tensor("embedding")
    engine.close()  # twice is harmless


def test_header_fields_come_back(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, tokenizer='{"model": {"vocab": {"a": 0, "b": 7}}}')
    with ef.EngineFile.open(path) as engine:
        assert engine.config == ModelConfig.from_dict(CONFIG)
        assert engine.tokenizer_json == '{"model": {"vocab": {"a": 0, "b": 7}}}'
        assert engine.generation["eos_token_ids"] == [255]
        assert engine.provenance["source"] == "synthetic"


def test_unknown_tensor_and_scales_of_unquantized_are_engine_errors(engine_path):
    with ef.EngineFile.open(engine_path) as engine:
        with pytest.raises(EngineError, match="no tensor named 'nope'"):
            engine.tensor("nope")
        with pytest.raises(EngineError, match="not quantized"):
            engine.scales("layers.0.qkv")


def test_tied_embeddings_have_no_lm_head(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, raw_config={**CONFIG, "tie_word_embeddings": True})
    with ef.EngineFile.open(path) as engine:
        assert "lm_head" not in [t.name for t in engine.entries]


def test_looks_like_engine_reads_the_magic(engine_path, tmp_path):
    other = tmp_path / "config.json"
    other.write_text("{}")
    assert ef.looks_like_engine(engine_path)
    assert not ef.looks_like_engine(other)
    assert not ef.looks_like_engine(tmp_path / "missing")


def test_engine_rows_list_tensors_and_scale_vectors_in_file_order(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int8")
    with ef.EngineFile.open(path) as engine:
        rows = ef.engine_rows(engine)
    assert [r.name for r in rows[:3]] == ["embedding", "layers.0.qkv", "layers.0.qkv.scales"]
    assert [r.offset for r in rows] == sorted(r.offset for r in rows)
    assert all(r.shard == "m.engine" and r.nbytes == r.elements * ef.DTYPES[r.dtype].itemsize for r in rows)


def test_tokenizer_vocab_size_is_max_id_plus_one_of_dolma2():
    from importlib import resources

    text = resources.files("olmoscope").joinpath("data", "dolma2-tokenizer.json").read_text("utf-8")
    assert ef.tokenizer_vocab_size(json.loads(text)) == 100278  # OLMO2.md: ids 0–100277
    assert ef.tokenizer_vocab_size({"model": {"vocab": {"a": 3}}, "added_tokens": [{"id": 9}]}) == 10
    assert ef.tokenizer_vocab_size({}) is None


# ── the writer refuses misuse ───────────────────────────────────────────────────
def _writer(tmp_path):
    config = ModelConfig.from_dict(CONFIG)
    f = open(tmp_path / "w.engine", "wb")
    return f, ef.EngineWriter(f, base_header(config, "bf16"), ef.plan_tensors(config, "bf16"))


def test_writer_refuses_out_of_order_overflow_and_short_tensors(tmp_path):
    f, writer = _writer(tmp_path)
    with f:
        with pytest.raises(EngineError, match="got layers.0.qkv, expected embedding"):
            writer.begin("layers.0.qkv")
        t = writer.begin("embedding")
        with pytest.raises(EngineError, match="is BF16, got a float32 block"):
            writer.write(np.zeros(t.shape, np.float32))
        with pytest.raises(EngineError, match="overflows"):
            writer.write(np.zeros((t.shape[0] + 1, t.shape[1]), ml_dtypes.bfloat16))
        writer.write(np.zeros((1, t.shape[1]), ml_dtypes.bfloat16))
        with pytest.raises(EngineError, match="got 128 of"):
            writer.end()
        with pytest.raises(EngineError, match="finished after 0 of"):
            writer.finish()


# ── the reader refuses every documented inconsistency ──────────────────────────
def _set_version(version: int):
    def patch(path: Path):
        data = bytearray(path.read_bytes())
        struct.pack_into("<I", data, 8, version)
        path.write_bytes(bytes(data))
    return patch


def _tensor_field(index: int, key: str, value):
    def mutate(header):
        header["tensors"][index][key] = value
    return lambda path: rewrite_header(path, mutate)


def _header(fn):
    return lambda path: rewrite_header(path, fn)


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-100])


def _header_length(value: int):
    def patch(path: Path):
        data = bytearray(path.read_bytes())
        struct.pack_into("<Q", data, 12, value)
        path.write_bytes(bytes(data))
    return patch


def _reseal(path: Path, body: bytes):
    """Replace the header by `body`, with a valid checksum: what the parser sees past the checksum."""
    _, data_start, data = read_header(path)
    body = body.ljust(data_start - ef.PREAMBLE.size - 1, b" ")  # trailing spaces keep the data where it was
    path.write_bytes(ef.sealed_header(body, data_start) + data[data_start:])


def _moved_last_tensor(path: Path):
    """The last tensor one page later, the file grown to hold it: aligned, disjoint, in the file, yet not the layout."""
    def move(header):
        header["tensors"][-1]["offset"] += 4096
    rewrite_header(path, move)
    path.write_bytes(path.read_bytes() + bytes(4096))


def _second_offset(header):
    return header["tensors"][1]["offset"]


HOSTILE = [
    ("bad_magic", lambda p: p.write_bytes(b"NOTANENG" + p.read_bytes()[8:]),
     "not an olmoscope engine file (it starts with b'NOTANENG'; an engine file starts with b'OLMOSCPE')"),
    ("too_short", lambda p: p.write_bytes(b"OLMOSCPE\x01"), "too short"),
    ("version_zero", _set_version(0), "version 0 is invalid"),
    ("header_length_beyond_file", _header_length(1 << 40), "does not fit the file"),
    ("header_length_past_limit", _header_length(ef.MAX_HEADER_BYTES + 1), "256 MiB limit"),
    ("header_length_changed", _header_length(3), "the header fails its checksum"),
    ("header_not_json", lambda p: _reseal(p, b'{"format": '), "header: invalid JSON"),
    ("header_not_object", lambda p: _reseal(p, b"[1, 2]"), "header is not a JSON object"),
    ("header_duplicate_key", lambda p: _reseal(p, b'{"format": 1, "format": 2}'), "duplicate key 'format'"),
    ("header_lone_surrogate", lambda p: _reseal(p, json.dumps({**read_header(p)[0], "format": "\ud800"}).encode()),
     "lone surrogate (\\ud800)"),
    ("header_nested_deeply", lambda p: _reseal(p, b"[" * 1000 + b"]" * 1000), "nested deeper than 64"),
    ("tokenizer_lone_surrogate", lambda p: _reseal(p, json.dumps({**read_header(p)[0], "tokenizer": {
        "json": "{\"model\": \"\ud800\"}", "sha256": "0" * 64}}).encode()), "lone surrogate (\\ud800)"),
    ("header_fails_schema", _header(lambda h: h.pop("generation")), "fails the engine schema"),
    ("versions_disagree", _header(lambda h: h.update(format_version=1)), "fails the engine schema"),
    ("config_invalid", _header(lambda h: h["config"].update(num_attention_heads=3)), "not divisible"),
    ("tensor_misaligned", _tensor_field(1, "offset", 4096 * 3 + 8), "not 4096-byte aligned"),
    ("tensor_beyond_file", _tensor_field(-1, "offset", 4096 * 10_000), "beyond the end of the file"),
    ("tensor_inside_header", _tensor_field(0, "offset", 0), "overlaps the header"),
    ("tensors_overlap", _header(lambda h: h["tensors"][2].update(offset=_second_offset(h))), "overlaps layers.0."),
    ("size_not_shape_times_dtype", _tensor_field(1, "size", 12), "shape × dtype"),
    ("shape_disagrees_with_config", _tensor_field(1, "shape", [96, 64]), "shape"),
    ("dtype_disagrees_with_weight_dtype", _tensor_field(1, "dtype", "F16"), "dtype 'F16', expected 'BF16'"),
    ("norm_not_float32", _tensor_field(2, "dtype", "BF16"), "expected 'F32'"),
    ("tensor_renamed", _tensor_field(1, "name", "layers.0.qkv_"), "name"),
    ("tensors_reordered", _header(lambda h: h["tensors"].insert(1, h["tensors"].pop(2))), "expected"),
    ("tensor_missing", _header(lambda h: h["tensors"].pop()), "the config implies"),
    ("quantization_on_bf16", _tensor_field(1, "quantization", {
        "format": "int8", "scheme": "sym", "group_size": None, "source": "ours", "zeros": None,
        "scales": {"dtype": "F32", "shape": [128], "offset": 0, "size": 512, "checksum": "0" * 32}}),
     "quantization {'format': 'int8'"),
    ("quantization_on_a_bf16_file", _header(lambda h: h.update(quantization=INT4.to_json())),
     "does not fit weight_dtype 'bf16'"),
    ("checksum_not_hex", _tensor_field(1, "checksum", "xyz"), "fails the engine schema"),
    ("offset_a_float", _tensor_field(1, "offset", 4096.0 * 3), "fails the engine schema"),
    ("eos_id_a_float", _header(lambda h: h["generation"].update(eos_token_ids=[5.0])), "fails the engine schema"),
    ("truncated_data", _truncate, "beyond the end of the file"),
    ("bytes_after_the_last_tensor", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10), "10 bytes follow the last tensor"),
    ("tensor_moved_one_page_on", _moved_last_tensor, "where the layout puts it"),
]


@pytest.mark.parametrize("damage,message", [(d, m) for _, d, m in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_reader_refuses_inconsistent_files_with_one_engine_error(engine_path, damage, message):
    damage(engine_path)
    with pytest.raises(EngineError) as caught:
        ef.EngineFile.open(engine_path)
    text = str(caught.value)
    assert message in text, text
    assert str(engine_path) in text and "\n" not in text


def test_newer_version_is_a_clear_error_saying_upgrade(engine_path):
    _set_version(ef.FORMAT_VERSION + 1)(engine_path)
    with pytest.raises(EngineError, match=r"engine format version 4 is newer than this olmoscope reads \(version 3\); upgrade"):
        ef.EngineFile.open(engine_path)


def test_version_1_file_is_a_clear_error_naming_both_versions(tmp_path):
    """A version-1 file (20-byte preamble, header not checksummed) as convert wrote it before version 2."""
    path = tmp_path / "old.engine"
    body = json.dumps({"format": "olmoscope-engine", "format_version": 1}).encode()
    path.write_bytes(struct.pack("<8sIQ", b"OLMOSCPE", 1, len(body)) + body + bytes(8192))
    with pytest.raises(EngineError, match=r"engine format version 1 is older than this olmoscope reads \(version 3, "
                                          r"which stores int4 and records each matrix's quantization\); "
                                          r"convert the model again"):
        ef.EngineFile.open(path)


def test_version_2_file_is_a_clear_error_telling_to_convert_again(engine_path):
    """A version-2 file (int8 at most, no quantization records) as convert wrote it before int4."""
    header, data_start, data = read_header(engine_path)
    header["format_version"] = 2
    body = ef.encode_header(header)
    engine_path.write_bytes(ef.sealed_header(body, data_start, version=2) + data[data_start:])
    with pytest.raises(EngineError, match=r"engine format version 2 is older than this olmoscope reads \(version 3, "
                                          r".*\); convert the model again with this olmoscope"):
        ef.EngineFile.open(engine_path)


@pytest.mark.parametrize("edit", [
    lambda h: h["config"].update(rms_norm_eps=2e-6),  # the example: one digit
    lambda h: h["generation"].update(chat_template="{{ 'x' }}"),
    lambda h: h["generation"].update(eos_token_ids=[254]),
    lambda h: h["tensors"][1].update(layout="row-major, trust me"),
    lambda h: h["provenance"].update(source="elsewhere"),
])
def test_any_change_to_the_header_fails_its_checksum(engine_path, edit):
    header, data_start, data = read_header(engine_path)
    edit(header)
    body = ef.encode_header(header)
    sealed = ef.sealed_header(body, data_start)
    engine_path.write_bytes(data[:ef.PREAMBLE.size] + sealed[ef.PREAMBLE.size:] + data[data_start:])  # old checksum
    with pytest.raises(EngineError, match="the header fails its checksum"):
        ef.EngineFile.open(engine_path)


def test_a_byte_in_the_header_padding_fails_the_checksum(engine_path):
    _, data_start, data = read_header(engine_path)
    damaged = bytearray(data)
    damaged[data_start - 1] = 1
    engine_path.write_bytes(bytes(damaged))
    with pytest.raises(EngineError, match="the header fails its checksum"):
        ef.EngineFile.open(engine_path)


def test_nonzero_padding_between_tensors_is_named_by_verify(engine_path):
    header, _, data = read_header(engine_path)
    rows = header["tensors"]
    row, nxt = next((a, b) for a, b in zip(rows, rows[1:]) if b["offset"] > a["offset"] + a["size"])
    damaged = bytearray(data)
    damaged[nxt["offset"] - 1] = 0x5A
    engine_path.write_bytes(bytes(damaged))
    with ef.EngineFile.open(engine_path) as engine:
        assert engine.verify() == [f"padding after {row['name']}"]


def test_checked_tensor_names_a_corrupt_tensor_and_passes_good_ones(engine_path):
    header, _, data = read_header(engine_path)
    row = header["tensors"][3]
    damaged = bytearray(data)
    damaged[row["offset"]] ^= 0x01
    engine_path.write_bytes(bytes(damaged))
    with ef.EngineFile.open(engine_path) as engine:
        assert engine.checked_tensor("embedding").shape == (256, 64)
        with pytest.raises(EngineError, match=f"tensor {row['name']} fails its checksum.*--no-verify skips"):
            engine.checked_tensor(row["name"])
        assert np.array_equal(engine.tensor(row["name"]).view(np.uint8).reshape(-1)[:1],
                              np.frombuffer(bytes(damaged[row["offset"]:row["offset"] + 1]), np.uint8))


def test_header_limits_are_the_schemas():
    schema = ef.header_schema()
    generation = schema["properties"]["generation"]["properties"]
    assert generation["eos_token_ids"]["maxItems"] == ef.MAX_EOS_IDS
    assert schema["$defs"]["token_id"]["maximum"] == ef.MAX_TOKEN_ID
    assert generation["tokenizer_vocab_size"]["oneOf"][1]["maximum"] == ef.MAX_TOKEN_ID + 1


def test_writer_refuses_a_header_its_reader_would_refuse(tmp_path):
    config = ModelConfig.from_dict(CONFIG)
    base = base_header(config, "bf16")
    base["generation"]["eos_token_ids"] = list(range(100))
    with open(tmp_path / "w.engine", "wb") as f, pytest.raises(EngineError, match="eos_token_ids"):
        ef.EngineWriter(f, base, ef.plan_tensors(config, "bf16"))
    assert (tmp_path / "w.engine").stat().st_size == 0, "nothing was written"


def test_int8_scale_regions_are_checked_too(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, "int8")

    def misplace(h):
        h["tensors"][1]["quantization"]["scales"]["offset"] = h["tensors"][1]["offset"]

    rewrite_header(path, misplace)
    with pytest.raises(EngineError, match=r"layers.0.qkv.scales at offset .* overlaps layers.0.qkv|layers.0.qkv at offset .* overlaps"):
        ef.EngineFile.open(path)


def test_corrupt_embedded_tokenizer_is_refused(tmp_path):
    path = tmp_path / "m.engine"
    write_synthetic(path, tokenizer='{"model": {}}')
    rewrite_header(path, lambda h: h["tokenizer"].update(json='{"model": []}'))
    with pytest.raises(EngineError, match="tokenizer.json fails its sha256"):
        ef.EngineFile.open(path)


def test_missing_file_directory_and_fifo_are_engine_errors(tmp_path):
    import os

    with pytest.raises(EngineError, match="no such file"):
        ef.EngineFile.open(tmp_path / "missing.engine")
    with pytest.raises(EngineError, match="is a directory"):
        ef.EngineFile.open(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # opened without blocking, then refused
    with pytest.raises(EngineError, match=r"not a regular file \(a FIFO\)"):
        ef.EngineFile.open(tmp_path / "fifo")


def test_flipped_data_byte_is_named_by_verify(engine_path):
    header, _, data = read_header(engine_path)
    row = header["tensors"][4]
    damaged = bytearray(data)
    damaged[row["offset"] + row["size"] // 2] ^= 0x40
    engine_path.write_bytes(bytes(damaged))
    with ef.EngineFile.open(engine_path) as engine:
        assert engine.verify() == [row["name"]]
