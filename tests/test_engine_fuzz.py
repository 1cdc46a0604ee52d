"""Hostile engine files: whatever bytes, JSON values or offsets an attacker or a bad disk puts in a file,
EngineFile.open and verify raise only EngineError — and a flipped data byte is caught by verify, by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from olmoscope import engine_format as ef
from olmoscope.errors import EngineError
from test_engine_format import read_header, write_synthetic

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Original(tuple):
    """(file bytes, header, data start); a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<engine file of {len(self[0]):,} bytes>"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    """A small asymmetric int4 engine file: every region kind, scales and zero points included."""
    path = tmp_path_factory.mktemp("fuzz") / "original.engine"
    write_synthetic(path, "int4", tokenizer='{"model": {"vocab": {"a": 0}}}')
    header, data_start, data = read_header(path)
    return Original((data, header, data_start))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "mutated.engine"


def open_and_use(path: Path) -> list[str] | None:
    """Open, read every tensor and verify; None when the file is refused (with an EngineError)."""
    try:
        with ef.EngineFile.open(path) as engine:
            for t in engine.entries:
                view = engine.tensor(t.name)
                assert view.shape == t.data_shape
                if t.quantization is not None:
                    assert list(engine.scales(t.name).shape) == t.quantization["scales"]["shape"]
                    assert list(engine.zeros(t.name).shape) == t.quantization["zeros"]["shape"]
            return engine.verify()
    except EngineError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


def with_header(data: bytes, data_start: int, text: bytes) -> bytes:
    """The file with its header replaced by `text` and the checksum resealed, so that the mutation reaches the
    parser and the validators. A short text is padded with spaces (the data stays where it was); a long one
    spills over the data."""
    if ef.PREAMBLE.size + len(text) < data_start:
        text = text.ljust(data_start - ef.PREAMBLE.size - 1, b" ")
    start = ef.align(ef.PREAMBLE.size + len(text))
    return ef.sealed_header(text, start) + data[start:]


# ── strategies ─────────────────────────────────────────────────────────────────
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 4096, 2**63, 2**64]),
    st.integers(0, 1 << 24).map(float),  # integral floats: 4096.0 must not pass for an offset
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["F32", "BF16", "I8", "int8", "bf16", "olmo2", "0" * 32, "qkv", "layers.0.qkv"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def json_paths(value, prefix=()):
    """Every path to a value inside the header, except into the tokenizer's text (it is just a string)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):  # long lists: the first four items and the last two
        n = len(value)
        for i in sorted({*range(min(n, 4)), *range(max(n - 2, 0), n)}):
            yield from json_paths(value[i], prefix + (i,))


def set_path(header, path, value):
    if not path:
        return value
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return header


# ── the properties ─────────────────────────────────────────────────────────────
@FUZZ
@given(mutations=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=8))
def test_any_changed_byte_before_the_data_is_refused(original, scratch, mutations):
    """Preamble, header and padding are all covered: no change there is accepted (issue 10, item 2)."""
    data, _, data_start = original
    damaged = bytearray(data)
    for position, value in mutations:
        damaged[position % data_start] = value
    assume(bytes(damaged) != data)
    scratch.write_bytes(bytes(damaged))
    assert open_and_use(scratch) is None


@settings(max_examples=40, deadline=None)
@given(tail=st.binary(min_size=1, max_size=5000))
def test_bytes_after_the_last_tensor_are_refused(original, scratch, tail):
    data, _, _ = original
    scratch.write_bytes(data + tail)
    assert open_and_use(scratch) is None


@FUZZ
@given(choice=st.data(), value=json_values, strict_json=st.booleans())
def test_mutated_header_fields_give_only_engine_errors(original, scratch, choice, value, strict_json):
    data, header, data_start = original
    header = json.loads(json.dumps(header))
    paths = list(json_paths(header))
    path = choice.draw(st.sampled_from(paths))
    assume(not (value is None and path == ()))
    mutated = set_path(header, path, value)
    try:
        text = json.dumps(mutated, allow_nan=not strict_json).encode()
    except ValueError:
        return  # NaN refused by strict JSON: nothing to write
    scratch.write_bytes(with_header(data, data_start, text))
    open_and_use(scratch)


@FUZZ
@given(index=st.integers(0, 18),
       offset=st.one_of(st.integers(0, 1 << 40), st.integers(0, 64).map(lambda p: p * 4096),
                        st.integers(0, 64).map(lambda p: p * 4096.0)),
       field=st.sampled_from(["offset", "size", "scales.offset", "zeros.offset"]))
def test_moved_offsets_are_refused_or_caught_by_verify(original, scratch, index, offset, field):
    data, header, data_start = original
    header = json.loads(json.dumps(header))
    row = header["tensors"][index]
    kind, _, key = field.rpartition(".")
    target = row if not kind else row["quantization"] and row["quantization"][kind]
    assume(target is not None and not (target[key] == offset and type(target[key]) is type(offset)))
    target[key] = offset
    scratch.write_bytes(with_header(data, data_start, ef.encode_header(header)))
    bad = open_and_use(scratch)
    if bad is not None:  # accepted: the region is aligned, in the file, disjoint — so its bytes must differ
        label = row["name"] + (f".{kind}" if kind else "")
        assert label in bad, f"moving {label} to {offset} went unnoticed"


@settings(max_examples=60, deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(original, scratch, fraction):
    data, _, _ = original
    scratch.write_bytes(data[:int(len(data) * fraction)])
    assert open_and_use(scratch) is None


@FUZZ
@given(region=st.integers(0, 10**6), within=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_data_bit_is_caught_by_verify_and_named(original, scratch, region, within, bit):
    data, header, _ = original
    regions = [r for row in header["tensors"] for r in ef.EngineTensor.from_json(row).regions()]
    offset, size, label = regions[region % len(regions)]
    damaged = bytearray(data)
    damaged[offset + int(size * within)] ^= 1 << bit
    scratch.write_bytes(bytes(damaged))
    assert open_and_use(scratch) == [label]


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=4096), version=st.integers(0, 2**32 - 1), length=st.integers(0, 2**64 - 1),
       checksum=st.binary(min_size=16, max_size=16))
def test_random_bytes_after_the_magic_are_refused(scratch, blob, version, length, checksum):
    scratch.write_bytes(ef.PREAMBLE.pack(ef.MAGIC, version, length, checksum) + blob)
    assert open_and_use(scratch) is None


def test_fuzz_fixture_is_a_valid_file(original, scratch):
    data, _, _ = original
    scratch.write_bytes(data)
    assert open_and_use(scratch) == []
    assert np.frombuffer(data[:8], np.uint8).tobytes() == ef.MAGIC
