"""Hypothesis: random and mutated shards and indexes fed to Checkpoint.open.

Whatever the bytes, only CheckpointError may come out, nothing hangs (an alarm guards every example), and
nothing is allocated from a size read out of the file (tracemalloc's peak stays small). When a file is
accepted, its tensors tile the data section exactly and every one of them reads back.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from olmoscope.checkpoint import Checkpoint
from olmoscope.errors import CheckpointError

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PEAK_LIMIT = 4 << 20  # every input here is under a few KB; a size taken on trust would be far bigger
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "I64", "BOOL"]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F64": 8, "I64": 8, "BOOL": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def alarm(seconds: float):
    """Fail the example instead of hanging it."""

    def expire(*_):
        raise TimeoutError(f"Checkpoint.open took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def open_only_checkpoint_errors(directory: Path) -> None:
    """Open (and, if accepted, read everything); anything but CheckpointError fails the test."""
    tracemalloc.start()
    try:
        with alarm(10):
            open_and_read_all(directory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"peak {peak:,} bytes allocated"


def open_and_read_all(directory: Path) -> None:
    try:
        ckpt = Checkpoint.open(directory)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        event(f"refused: {_reason(str(exc))}")
        return
    event("accepted")
    for shard in ckpt.shards:
        size = (directory / shard).stat().st_size
        ends = [e.offset + e.nbytes for e in ckpt.entries if e.shard == shard]
        assert max(ends, default=size) == size, "accepted tensors must end exactly at the end of the file"
    for e in ckpt.entries:
        array = ckpt.read(e.name)
        assert array.shape == e.shape and array.nbytes == e.nbytes


def _reason(message: str) -> str:
    """The kind of refusal, for --hypothesis-show-statistics: the message without names and numbers."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|[\d,]+", "…", message.split(": ", 1)[-1])[:50]


def fresh_dir(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


def shard_bytes(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


# ── strategies ─────────────────────────────────────────────────────────────────

small_ints = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**31, 2**63, 2**64 + 1, -(2**63), 10**30]), st.booleans(), st.floats()
)
json_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), small_ints, st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12,
)
names = st.one_of(st.sampled_from(["a", "b", "model.norm.weight", "__metadata__", "w\x00", "\u202e", "x\ny"]),
                  st.text(max_size=6))


@st.composite
def valid_shards(draw) -> tuple[dict, bytes]:
    """A well-formed header (tensors tiling the data in random order) and its data."""
    count = draw(st.integers(0, 4))
    specs = [(draw(st.sampled_from(DTYPES)), draw(st.lists(st.integers(0, 4), max_size=3))) for _ in range(count)]
    order = draw(st.permutations(range(count)))
    header: dict = {}
    position = 0
    for i in order:
        dtype, shape = specs[i]
        nbytes = SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, draw(st.binary(min_size=position, max_size=position))


def mostly(likely, rare):
    """Draw from `likely` three times in four, so hostile values reach past the first check."""
    return st.integers(0, 3).flatmap(lambda i: likely if i else rare)


@st.composite
def random_headers(draw) -> tuple[bytes, bytes]:
    """Headers with plausible structure and hostile values."""
    tensor = st.fixed_dictionaries({
        "dtype": mostly(st.sampled_from(DTYPES), st.one_of(st.sampled_from(["F4", "", "f32"]), json_junk)),
        "shape": mostly(st.lists(st.integers(0, 6), max_size=3), st.one_of(st.lists(small_ints, max_size=4), json_junk)),
        "data_offsets": mostly(st.lists(st.integers(0, 48), min_size=2, max_size=2),
                               st.one_of(st.lists(small_ints, min_size=2, max_size=2), json_junk)),
    })
    entries = draw(st.dictionaries(names, mostly(tensor, json_junk), max_size=4))
    return json.dumps(entries).encode(), draw(st.binary(max_size=48))


# ── properties ─────────────────────────────────────────────────────────────────


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes_give_only_checkpoint_errors(workdir, data):
    directory = fresh_dir(workdir)
    (directory / "model.safetensors").write_bytes(data)
    open_only_checkpoint_errors(directory)


@FUZZ
@given(header_and_data=random_headers())
def test_random_headers_give_only_checkpoint_errors(workdir, header_and_data):
    directory = fresh_dir(workdir)
    (directory / "model.safetensors").write_bytes(shard_bytes(*header_and_data))
    open_only_checkpoint_errors(directory)


@FUZZ
@given(shard=valid_shards())
def test_valid_shards_open_and_read_back(workdir, shard):
    header, data = shard
    directory = fresh_dir(workdir)
    (directory / "model.safetensors").write_bytes(shard_bytes(json.dumps(header).encode(), data))
    ckpt = Checkpoint.open(directory)
    assert {e.name for e in ckpt.entries} == set(header) - {"__metadata__"}
    for e in ckpt.entries:
        begin, end = header[e.name]["data_offsets"]
        assert ckpt.read(e.name).tobytes() == data[begin:end]


@FUZZ
@given(
    shard=valid_shards(),
    mutations=st.lists(
        st.tuples(st.sampled_from(["flip", "truncate", "insert", "length"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_valid_shards_give_only_checkpoint_errors(workdir, shard, mutations):
    header, data = shard
    blob = bytearray(shard_bytes(json.dumps(header).encode(), data))
    for kind, where, payload in mutations:
        at = where % (len(blob) + 1)
        if kind == "flip" and blob:
            blob[at % len(blob)] ^= payload[0] or 0x01
        elif kind == "truncate":
            del blob[at:]
        elif kind == "insert":
            blob[at:at] = payload
        elif kind == "length":  # a claimed header length out of thin air
            blob[:8] = (int.from_bytes(payload, "little") * 7919 % 2**64).to_bytes(8, "little")
    directory = fresh_dir(workdir)
    (directory / "model.safetensors").write_bytes(bytes(blob))
    open_only_checkpoint_errors(directory)


shard_names = mostly(
    st.sampled_from(["a.safetensors", "b.safetensors"]),
    st.one_of(
        st.sampled_from(["../a.safetensors", "/etc/passwd", "", ".", "sub/", "a\x00.safetensors",
                         "sub/../a.safetensors", "C:/x", "\\\\host\\share", "missing.safetensors"]),
        st.text(max_size=6),
    ),
)


@FUZZ
@given(
    weight_map=mostly(
        st.dictionaries(mostly(st.sampled_from(["a", "b", "c"]), names), mostly(shard_names, json_junk), max_size=4),
        json_junk,
    ),
    wrap=st.booleans(),
)
def test_random_indexes_give_only_checkpoint_errors(workdir, weight_map, wrap):
    directory = fresh_dir(workdir)
    for shard, tensor in (("a.safetensors", "a"), ("b.safetensors", "b")):
        header = json.dumps({tensor: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        (directory / shard).write_bytes(shard_bytes(header, b"\0" * 4))
    index = {"weight_map": weight_map} if wrap else weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    open_only_checkpoint_errors(directory)


# ── the one JSON loader and the config behind every SOURCE (issue 10, items 5 and 11) ──────────
from olmoscope.config import ModelConfig  # noqa: E402
from olmoscope.errors import ConfigError  # noqa: E402
from olmoscope.readers import parse_json  # noqa: E402

json_pieces = st.one_of(
    st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"a"', b'"\\ud800"', b'"\\ud83d\\ude42"', b"NaN", b"1e999",
                     b"9" * 60, b"-0", b"true", b"null", b"\xff", b" "]),
    st.binary(max_size=4),
)


@FUZZ
@given(pieces=st.lists(json_pieces, max_size=40), nest=st.integers(0, 200))
def test_the_json_loader_gives_only_its_error_class(pieces, nest):
    text = b"[" * nest + b"".join(pieces) + b"]" * nest
    try:
        value = parse_json(text, "f.json", ConfigError)
    except ConfigError as exc:
        assert str(exc).startswith("f.json: ") and "\n" not in str(exc)
        event(f"refused: {_reason(str(exc))}")
        return
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # what it accepts is text, shallow enough to print


TINY = {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 256, "rope_theta": 500000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
config_keys = st.sampled_from(sorted(TINY) + ["head_dim", "attention_bias", "rope_scaling", "rope_parameters",
                                              "hidden_act", "eos_token_id", "torch_dtype"])


@FUZZ
@given(changes=st.dictionaries(config_keys, json_junk | st.sampled_from(["false", "true", 0, 16, 2**40]), max_size=3))
def test_any_config_values_give_only_config_errors(changes):
    raw = {**TINY, **changes}
    try:
        config = ModelConfig.from_dict(raw, origin="config.json")
    except ConfigError as exc:
        assert str(exc).startswith("config.json: ") and "\n" not in str(exc) and len(str(exc)) < 500
        return
    assert isinstance(config.tie_word_embeddings, bool) and config.hidden_size % config.num_attention_heads == 0
    assert raw.get("head_dim") in (None, config.head_dim)
