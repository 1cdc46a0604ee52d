"""The safetensors reader: discovery, validation of every header rule, memory-mapped reads, the config check."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from olmoscope.checkpoint import Checkpoint, check_against_config, display_name, dtype_size
from olmoscope.config import ModelConfig
from olmoscope.errors import CheckpointError
from olmoscope.spec import checkpoint_tensors



def raw_shard(header: dict, data_bytes: int) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(data_bytes)


def test_single_shard_entries_match_spec_in_natural_order(make_snapshot, tiny_config):
    ckpt = Checkpoint.open(make_snapshot())
    expected = checkpoint_tensors(ModelConfig.from_dict(tiny_config))
    assert [e.name for e in ckpt.entries] == [t.name for t in expected]
    assert [e.shape for e in ckpt.entries] == [t.shape for t in expected]
    assert ckpt.shards == ["model.safetensors"]


def test_sharded_index_lists_sorted_shards_and_keeps_natural_order(make_snapshot):
    ckpt = Checkpoint.open(make_snapshot(shards=3))
    assert ckpt.shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [e.name for e in ckpt.entries][0] == "model.embed_tokens.weight"
    assert [e.name for e in ckpt.entries][-2:] == ["model.norm.weight", "lm_head.weight"]
    layer0 = {e.shard for e in ckpt.entries if e.name.startswith("model.layers.0.")}
    assert len(layer0) == 2, "the fixture splits layer 0 across two shards"


def test_offsets_point_at_the_bytes_safetensors_reads(make_snapshot):
    directory = make_snapshot(shards=2)
    ckpt = Checkpoint.open(directory)
    for e in ckpt.entries:
        with open(directory / e.shard, "rb") as f:
            f.seek(e.offset)
            stored = f.read(e.nbytes)
        reference = load_file(directory / e.shard)[e.name]
        assert stored == reference.tobytes(), e.name
        assert e.nbytes == e.elements * dtype_size(e.dtype)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_read_is_a_read_only_memory_map_equal_to_safetensors(make_snapshot, dtype):
    directory = make_snapshot(dtype=dtype)
    ckpt = Checkpoint.open(directory)
    reference = load_file(directory / "model.safetensors")
    for e in ckpt.entries:
        array = ckpt.read(e.name)
        assert array.shape == e.shape and array.dtype == reference[e.name].dtype
        assert not array.flags.writeable and not array.flags.owndata  # a view of the map, not a copy
        assert np.array_equal(array.view(np.uint8), reference[e.name].view(np.uint8)), e.name


def test_bf16_reads_as_ml_dtypes_bfloat16(make_snapshot):
    ckpt = Checkpoint.open(make_snapshot(dtype="BF16"))
    assert ckpt.read("model.norm.weight").dtype == np.dtype(ml_dtypes.bfloat16)


def test_zero_element_tensor_reads_as_empty_array(tmp_path):
    save_file({"empty": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.read("empty").shape == (0, 3)
    assert ckpt.entry("empty").nbytes == 0


def test_without_index_every_safetensors_file_is_a_shard(tmp_path):
    save_file({"b": np.ones(2, np.float32)}, tmp_path / "part-b.safetensors")
    save_file({"a": np.ones(3, np.float16)}, tmp_path / "part-a.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.shards == ["part-a.safetensors", "part-b.safetensors"]
    assert {e.name: e.shard for e in ckpt.entries} == {"a": "part-a.safetensors", "b": "part-b.safetensors"}


def test_index_shard_in_a_subdirectory_is_allowed(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"a": np.ones(3, np.float32)}, tmp_path / "sub" / "x.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "sub/x.safetensors"}}))
    assert Checkpoint.open(tmp_path).entry("a").shard == "sub/x.safetensors"


def test_entry_of_absent_tensor_is_a_checkpoint_error(make_snapshot):
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        Checkpoint.open(make_snapshot()).entry("nope")


def test_read_refuses_a_shard_that_changed_since_open(make_snapshot):
    directory = make_snapshot()
    ckpt = Checkpoint.open(directory)
    with open(directory / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        ckpt.read("model.norm.weight")


def test_every_malformed_input_is_one_checkpoint_error_naming_shard_and_tensor(malformed_snapshot):
    directory, fragments = malformed_snapshot
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(directory)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_header_length_is_checked_before_anything_is_allocated(tmp_path):
    # 2**63 bytes would be a MemoryError, not a CheckpointError, if read before the check.
    (tmp_path / "model.safetensors").write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="over the 100,000,000-byte limit"):
        Checkpoint.open(tmp_path)


def test_hostile_shape_is_refused_without_multiplying_it_out(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**62] * 30, "data_offsets": [0, 4]}}
    (tmp_path / "model.safetensors").write_bytes(raw_shard(header, 4))
    with pytest.raises(CheckpointError, match="more than 4 bytes but data_offsets span 4"):
        Checkpoint.open(tmp_path)


def test_control_character_names_are_allowed_and_displayed_escaped(tmp_path):
    name = "weird\nname\x1b[31m\u202e"
    save_file({name: np.ones(1, np.float32)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.entries[0].name == name  # stored as is
    assert display_name(name) == "weird\\nname\\x1b[31m\\u202e"
    assert display_name("plain.name") == "plain.name"
    assert display_name("back\\slash\x00") == "back\\\\slash\\x00"  # unambiguous once escaping


def test_dtype_size_knows_the_dtypes_and_refuses_others():
    assert [dtype_size(d) for d in ("F32", "BF16", "F16", "I8", "F64")] == [4, 2, 2, 1, 8]
    with pytest.raises(CheckpointError, match="unknown dtype 'Q4'"):
        dtype_size("Q4")


def test_check_against_config_passes_a_complete_checkpoint(make_snapshot, tiny_config):
    ckpt = Checkpoint.open(make_snapshot(shards=2))
    result = check_against_config(ckpt.entries, ModelConfig.from_dict(tiny_config))
    assert result.ok and not (result.missing or result.unexpected or result.wrong_shape)
    assert result.expected == len(ckpt.entries)


def test_check_against_config_finds_missing_unexpected_and_wrong_shape(make_snapshot, tiny_config):
    directory = make_snapshot(
        drop=("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
        extra={"model.norm.weight": np.ones(65, np.float32), "model.layers.0.input_layernorm.weight": np.ones(64, np.float32)},
    )
    result = check_against_config(Checkpoint.open(directory).entries, ModelConfig.from_dict(tiny_config))
    assert not result.ok
    assert result.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert result.unexpected == ["model.layers.0.input_layernorm.weight"]
    assert result.wrong_shape == [("model.norm.weight", (64,), (65,))]


def test_check_against_config_of_tied_config_expects_no_lm_head(make_snapshot, tiny_config):
    tied = {**tiny_config, "tie_word_embeddings": True}
    directory = make_snapshot(config=tied)
    result = check_against_config(Checkpoint.open(directory).entries, ModelConfig.from_dict(tiny_config))
    assert result.missing == ["lm_head.weight"] and result.unexpected == []
    assert check_against_config(Checkpoint.open(directory).entries, ModelConfig.from_dict(tied)).ok


# ── issue 10 ───────────────────────────────────────────────────────────────────
def test_a_dangling_index_symlink_is_an_error_not_a_missing_index(make_snapshot, tmp_path):
    snapshot = make_snapshot()
    (snapshot / "model.safetensors.index.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: no such file \(a dangling symbolic link\)"):
        Checkpoint.open(snapshot)


def test_a_shard_listing_too_many_tensors_is_refused_before_parsing(tmp_path):
    import time

    from conftest import raw_shard

    from olmoscope.checkpoint import MAX_TENSORS

    entries = b",".join(b'"t%d": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}' % i
                        for i in range(MAX_TENSORS + 1))
    (tmp_path / "model.safetensors").write_bytes(raw_shard(b"{" + entries + b"}"))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"header lists more than {MAX_TENSORS:,} tensors"):
        Checkpoint.open(tmp_path)
    assert time.perf_counter() - started < 1.0  # 10^6 tensors once took 143 s and 2 GB


def test_shards_together_are_bounded_too(tmp_path, monkeypatch):
    from conftest import raw_shard

    from olmoscope import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)
    for name in ("a", "b"):
        header = {f"{name}{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(2)}
        (tmp_path / f"{name}.safetensors").write_bytes(raw_shard(header))
    with pytest.raises(CheckpointError, match="4 tensors across 2 shards is more than the 3 supported"):
        Checkpoint.open(tmp_path)
