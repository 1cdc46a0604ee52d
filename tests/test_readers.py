"""olmoscope/readers.py: the one opener, the one size-capped reader and the one JSON loader every file goes through."""

from __future__ import annotations

import json
import os
import time

import pytest

from olmoscope import readers
from olmoscope.errors import ConfigError


def test_a_regular_file_reads_whole(tmp_path):
    (tmp_path / "a.json").write_bytes(b'{"a": [1, 2.5, "x"]}')
    assert readers.read_json(tmp_path / "a.json", 100, "a.json", ConfigError) == {"a": [1, 2.5, "x"]}


@pytest.mark.parametrize("make, fragment", [
    (lambda p: os.mkfifo(p), "not a regular file (a FIFO); refused"),
    (lambda p: p.mkdir(), "is a directory, not a file"),
    (lambda p: p.symlink_to(p.parent / "gone"), "no such file (a dangling symbolic link)"),
    (lambda p: None, "no such file"),
    (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device); refused"),
])
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path, make, fragment):
    path = tmp_path / "thing"
    make(path)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        readers.read_capped(path, 100, "thing", ConfigError)
    assert str(caught.value) == f"thing: {fragment}" and time.monotonic() - started < 1


def test_read_optional_tells_absence_from_a_dangling_link(tmp_path):
    assert readers.read_optional(tmp_path / "absent", 10, "absent", ConfigError) is None
    (tmp_path / "link").symlink_to(tmp_path / "absent")
    with pytest.raises(ConfigError, match="dangling"):
        readers.read_optional(tmp_path / "link", 10, "link", ConfigError)


def test_size_cap_is_checked_before_reading_and_on_streams(tmp_path):
    import io

    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(ConfigError, match="101 bytes is over the 100-byte limit"):
        readers.read_capped(tmp_path / "big", 100, "big", ConfigError)
    assert readers.read_stream(io.BytesIO(b"x" * 100), 100, "stdin", ConfigError) == b"x" * 100
    with pytest.raises(ConfigError, match="stdin: more than 100 bytes"):
        readers.read_stream(io.BytesIO(b"x" * 10**6), 100, "stdin", ConfigError)


@pytest.mark.parametrize("text, fragment", [
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),  # at any depth
    (b'{"a": ' + b"9" * 5000 + b"}", "an integer of 5,000 digits (at most 40)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
    (b'{"a": "\\ud800"}', "a string holds a lone surrogate (\\ud800), which is not text"),
    (b'{"\\udfff": 1}', "lone surrogate (\\udfff)"),  # keys too
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": 1', "invalid JSON (Expecting ',' delimiter"),
    (b'{"a": "\xff"}', "not UTF-8 text (bad byte at offset 7)"),
])
def test_json_rules(text, fragment):
    with pytest.raises(ConfigError) as caught:
        readers.parse_json(text, "f.json", ConfigError)
    message = str(caught.value)
    assert message.startswith("f.json: ") and fragment in message and "\n" not in message, message


def test_json_that_is_fine_passes_unchanged():
    text = json.dumps({"emoji": "\U0001f642", "escaped": "\\ud83d\\ude42", "deep": [[[[1]]]] * 3,
                       "big": 10**39, "float": 1e308}, ensure_ascii=True).encode()
    assert readers.parse_json(text, "f", ConfigError) == json.loads(text)
    assert readers.parse_json(b"[" * 64 + b"]" * 64, "f", ConfigError) is not None
    assert readers.parse_json(b'{"x": Infinity}', "f", ConfigError, nonfinite=True) == {"x": float("inf")}
