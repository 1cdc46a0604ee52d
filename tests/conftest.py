"""Shared fixtures: tiny OLMo 2 snapshots written with safetensors, and malformed ones written by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from olmoscope.config import ModelConfig
from olmoscope.spec import checkpoint_tensors

# A small GQA model: D=64, H=4, Hkv=2 (d=16), I=128, L=2, V=128.
TINY_CONFIG = {
    "model_type": "olmo2",
    "architectures": ["Olmo2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rope_theta": 500000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def raw_shard(header: dict | bytes, data: bytes | int = b"") -> bytes:
    """A safetensors file by hand: 8-byte little-endian length, header, data (bytes, or that many zeros)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = bytes(data) if isinstance(data, int) else data
    return len(text).to_bytes(8, "little") + text + body


@pytest.fixture
def tiny_config() -> dict:
    """TINY_CONFIG, a fresh copy the test may change."""
    return json.loads(json.dumps(TINY_CONFIG))


@pytest.fixture
def make_snapshot(tmp_path):
    """Factory: make_snapshot(shards=1, dtype="F32", config=None, drop=(), extra=None) -> snapshot dir.

    One shard is `model.safetensors`; more get HF-style names and an index, split by tensor count (so a
    layer is split across two shards). `drop` leaves tensors out, `extra` adds {name: array}.
    """
    counter = iter(range(10**6))

    def make(shards=1, dtype="F32", config=None, drop=(), extra=None, seed=0) -> Path:
        directory = tmp_path / f"snapshot{next(counter)}"
        directory.mkdir()
        raw = config or TINY_CONFIG
        (directory / "config.json").write_text(json.dumps(raw))
        rng = np.random.default_rng(seed)
        tensors = {
            t.name: rng.standard_normal(t.shape).astype(NUMPY_DTYPES[dtype])
            for t in checkpoint_tensors(ModelConfig.from_dict(raw))
            if t.name not in drop
        }
        tensors.update(extra or {})
        names = list(tensors)
        if shards == 1:
            save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
            return directory
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({names[j]: tensors[names[j]] for j in part}, directory / shard)
            weight_map.update({names[j]: shard for j in part})
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        return directory

    return make


# ── malformed snapshots: (id, files to write, fragments the one-line error must contain) ──────────────

_F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
_BAD = "model.safetensors"


def _tensor(begin: int, end: int, shape=None, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


def _index(weight_map: dict) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


_GOOD_A = raw_shard({"a": _F32x4}, 16)
_GOOD_B = raw_shard({"b": _F32x4}, 16)

MALFORMED = [
    ("shard_shorter_than_8_bytes", {_BAD: b"\x05\x00\x00"}, [_BAD, "shorter than the 8-byte"]),
    ("header_length_beyond_file", {_BAD: (1000).to_bytes(8, "little") + b"{}"}, [_BAD, "runs beyond the file"]),
    ("header_length_over_100MB", {_BAD: (200_000_000).to_bytes(8, "little") + b"{}"}, [_BAD, "over the 100,000,000"]),
    ("header_not_utf8", {_BAD: raw_shard(b'{"a\xff": 1}')}, [_BAD, "not UTF-8"]),
    ("header_not_json", {_BAD: raw_shard(b'{"a": ')}, [_BAD, "invalid JSON"]),
    ("header_not_object", {_BAD: raw_shard(b"[1, 2]")}, [_BAD, "must be a JSON object"]),
    ("duplicate_key", {_BAD: raw_shard(b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                       b'"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4)},
     [_BAD, "duplicate key 't'"]),
    ("unknown_dtype", {_BAD: raw_shard({"w": {**_F32x4, "dtype": "F33"}}, 16)}, [_BAD, "'w'", "unknown dtype"]),
    ("negative_shape", {_BAD: raw_shard({"w": {**_F32x4, "shape": [-4]}}, 16)}, [_BAD, "'w'", "non-negative integers"]),
    ("shape_not_a_list", {_BAD: raw_shard({"w": {**_F32x4, "shape": "4"}}, 16)}, [_BAD, "'w'", "non-negative integers"]),
    ("shape_of_floats", {_BAD: raw_shard({"w": {**_F32x4, "shape": [4.0]}}, 16)}, [_BAD, "'w'", "non-negative integers"]),
    ("negative_offsets", {_BAD: raw_shard({"w": _tensor(-4, 12, [4])}, 16)}, [_BAD, "'w'", "negative"]),
    ("offsets_end_before_begin", {_BAD: raw_shard({"w": _tensor(8, 4, [1])}, 16)}, [_BAD, "'w'", "end before"]),
    ("offsets_not_integers", {_BAD: raw_shard({"w": {**_F32x4, "data_offsets": [0, "16"]}}, 16)}, [_BAD, "'w'", "two integers"]),
    ("overlapping_offsets", {_BAD: raw_shard({"a": _tensor(0, 8), "b": _tensor(4, 12)}, 12)}, [_BAD, "'b'", "overlap 'a'"]),
    ("gapped_offsets", {_BAD: raw_shard({"a": _tensor(0, 8), "b": _tensor(12, 20)}, 20)}, [_BAD, "'b'", "gap of 4 bytes"]),
    ("gap_at_start", {_BAD: raw_shard({"a": _tensor(4, 12)}, 12)}, [_BAD, "'a'", "gap of 4 bytes"]),
    ("offsets_out_of_file", {_BAD: raw_shard({"w": _tensor(0, 1000)}, 16)}, [_BAD, "'w'", "beyond the file"]),
    ("shape_times_dtype_not_byte_range", {_BAD: raw_shard({"w": _tensor(0, 16, [3])}, 16)}, [_BAD, "'w'", "12 bytes", "span 16"]),
    ("bytes_left_over", {_BAD: raw_shard({"w": _F32x4}, 20)}, [_BAD, "4 bytes left over", "'w'"]),
    ("metadata_not_str_to_str", {_BAD: raw_shard({"__metadata__": {"format": 1}, "w": _F32x4}, 16)}, [_BAD, "__metadata__", "'format'"]),
    ("metadata_not_object", {_BAD: raw_shard({"__metadata__": ["x"], "w": _F32x4}, 16)}, [_BAD, "__metadata__"]),
    ("tensor_info_not_object", {_BAD: raw_shard({"w": [0, 16]})}, [_BAD, "'w'", "expected an object"]),
    ("control_chars_in_bad_tensor_name", {_BAD: raw_shard({"bad\x07\u202ename": {**_F32x4, "dtype": "X"}}, 16)},
     [_BAD, "'bad\\x07\\u202ename'", "unknown dtype"]),
    ("index_not_json", {"model.safetensors.index.json": b"{", "a.safetensors": _GOOD_A},
     ["model.safetensors.index.json", "invalid JSON"]),
    ("index_names_missing_shard", {"model.safetensors.index.json": _index({"a": "a.safetensors", "b": "gone.safetensors"}),
                                   "a.safetensors": _GOOD_A}, ["'gone.safetensors'", "'b'", "which is missing"]),
    ("index_shard_with_dotdot", {"model.safetensors.index.json": _index({"a": "../outside.safetensors"})},
     ["'../outside.safetensors'", "'a'", "refused"]),
    ("index_shard_dotdot_after_dir", {"model.safetensors.index.json": _index({"a": "sub/../../outside.safetensors"})},
     ["'sub/../../outside.safetensors'", "'a'", "refused"]),
    ("index_shard_absolute", {"model.safetensors.index.json": _index({"a": "/OUTSIDE/outside.safetensors"})},
     ["'/OUTSIDE/outside.safetensors'", "'a'", "absolute path; refused"]),
    ("index_maps_tensor_no_shard_holds", {"model.safetensors.index.json": _index({"a": "a.safetensors", "zz": "a.safetensors"}),
                                          "a.safetensors": _GOOD_A}, ["'zz'", "'a.safetensors'", "no shard holds it"]),
    ("index_maps_tensor_elsewhere", {"model.safetensors.index.json": _index({"a": "b.safetensors", "b": "a.safetensors"}),
                                     "a.safetensors": _GOOD_A, "b.safetensors": _GOOD_B},
     ["'a'", "mapped to 'b.safetensors' but stored in 'a.safetensors'"]),
    ("index_lacks_tensor_in_shard", {"model.safetensors.index.json": _index({"a": "a.safetensors"}),
                                     "a.safetensors": raw_shard({"a": _tensor(0, 16), "extra": _tensor(16, 32)}, 32)},
     ["a.safetensors", "'extra'", "not in model.safetensors.index.json"]),
    ("same_tensor_in_two_shards", {"a.safetensors": _GOOD_A, "b.safetensors": _GOOD_A},
     ["'a'", "two shards", "'a.safetensors'", "'b.safetensors'"]),
    ("no_shards_at_all", {}, ["no model.safetensors.index.json"]),
    ("shard_is_a_fifo", {_BAD: "fifo"}, [_BAD, "not a regular file"]),
]


@pytest.fixture(params=MALFORMED, ids=[case[0] for case in MALFORMED])
def malformed_snapshot(request, tmp_path) -> tuple[Path, list[str]]:
    """(snapshot dir with a valid config.json and one malformed shard or index, fragments of the error)."""
    _, files, fragments = request.param
    directory = tmp_path / "snapshot"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_CONFIG))
    # A valid shard just outside the snapshot: refused names must never reach it.
    (tmp_path / "outside.safetensors").write_bytes(_GOOD_A)
    for name, content in files.items():
        if content == "fifo":
            os.mkfifo(directory / name)
        else:
            (directory / name).write_bytes(content)
    return directory, fragments


@pytest.fixture(scope="session")
def tiny_engine_file(tmp_path_factory) -> Path:
    """A tiny random OLMo 2 engine file (D=64, 2 layers, the real dolma2 tokenizer and 100,352 rows), bf16."""
    from olmoscope.convert import convert
    from olmoscope.tiny import make_tiny

    directory = tmp_path_factory.mktemp("tiny")
    make_tiny(directory / "snapshot", seed=0)
    convert(str(directory / "snapshot"), directory / "tiny.olmo", dtype="bf16")
    return directory / "tiny.olmo"


@pytest.fixture
def cpu_only(monkeypatch):
    """--device auto resolves to the NumPy backend even where a GPU is present."""
    from olmoscope.runtime import devices

    monkeypatch.setattr(devices, "cuda_availability", lambda: (False, "no GPU in this test"))
