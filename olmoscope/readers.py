"""Reading what users and downloads put on disk: one opener, one size-capped reader, one strict JSON loader.

Every file olmoscope reads goes through `open_regular`, so a FIFO, a device or a directory is refused
without blocking on it; `read_capped` refuses a file over its caller's limit before reading a byte, and
stops reading there if the file grows; `parse_json` is the only JSON parser. Each takes the error class
to raise, so that a config.json fails as a ConfigError and a shard header as a CheckpointError.

The JSON rules (they hold for config.json, indexes, shard headers, side files and engine headers alike):
UTF-8 only; no duplicate keys at any depth; no integer longer than MAX_INT_DIGITS digits (Python's own
int() is quadratic in the digits); no nesting deeper than MAX_DEPTH (so no validator or printer that
recurses over a value can overflow on it); no NaN/Infinity literals unless the caller reads files that
Python's json module wrote; no lone surrogate escapes ("\\ud800"
parses in Python but is not text, and fails later wherever it is encoded or printed).
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import IO, Any

from olmoscope.display import display_name
from olmoscope.errors import OlmoscopeError

MAX_DEPTH = 64  # tokenizer.json, the deepest file read, nests about 6 levels
MAX_INT_DIGITS = 40  # 2^128 has 39; tokenizer_config.json's model_max_length sentinel has 31

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def open_regular(path: str | os.PathLike, shown: str | None = None,
                 error: type[OlmoscopeError] = OlmoscopeError) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened for reading; anything else is refused without blocking.

    >>> fd, info = open_regular("config.json", error=ConfigError); os.close(fd)
    """
    shown = shown if shown is not None else display_name(os.fspath(path))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is irrelevant for regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise error(f"{shown}: no such file" + (" (a dangling symbolic link)" if dangling else "")) from None
    except IsADirectoryError:
        raise error(f"{shown}: is a directory, not a file") from None
    except OSError as exc:
        raise error(f"{shown}: cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise error(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise error(f"{shown}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
        raise error(f"{shown}: not a regular file ({kind}); refused")
    return fd, info


def open_file(path: str | os.PathLike, shown: str | None = None,
              error: type[OlmoscopeError] = OlmoscopeError) -> IO[bytes]:
    """open_regular as a binary file object (unbuffered reads are the caller's choice: it is buffered)."""
    fd, _ = open_regular(path, shown, error)
    return os.fdopen(fd, "rb")


def read_capped(path: str | os.PathLike, limit: int, shown: str | None = None,
                error: type[OlmoscopeError] = OlmoscopeError) -> bytes:
    """A whole regular file of at most `limit` bytes; a larger one is refused before (or while) reading.

    >>> read_capped("config.json", 1 << 20, error=ConfigError)[:1]
    b'{'
    """
    shown = shown if shown is not None else display_name(os.fspath(path))
    fd, info = open_regular(path, shown, error)
    try:
        if info.st_size > limit:
            raise error(f"{shown}: {info.st_size:,} bytes is over the {limit:,}-byte limit; refused")
        return _read_up_to(fd, limit, info.st_size, shown, error)
    finally:
        os.close(fd)


def read_optional(path: str | os.PathLike, limit: int, shown: str | None = None,
                  error: type[OlmoscopeError] = OlmoscopeError) -> bytes | None:
    """read_capped, or None when nothing is at `path` (a dangling symbolic link is an error, not absence)."""
    if not os.path.lexists(path):
        return None
    return read_capped(path, limit, shown, error)


def read_stream(stream: IO[bytes], limit: int, shown: str, error: type[OlmoscopeError] = OlmoscopeError) -> bytes:
    """At most `limit` bytes from an open stream (stdin, a pipe); more is refused, never read to the end."""
    try:
        data = stream.read(limit + 1)
    except OSError as exc:
        raise error(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{shown}: more than {limit:,} bytes; refused")
    return data


def _read_up_to(fd: int, limit: int, expected: int, shown: str, error: type[OlmoscopeError]) -> bytes:
    """Until end of file, `expected` bytes in one read (os.read allocates what it is asked for), then small ones."""
    chunks, total, want = [], 0, expected + 1
    while True:
        try:
            chunk = os.read(fd, min(limit + 1 - total, want))
            want = 1 << 16
        except OSError as exc:
            raise error(f"{shown}: cannot read ({exc.strerror or exc})") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise error(f"{shown}: grew past the {limit:,}-byte limit while being read; refused")


def decode_utf8(data: bytes, shown: str, error: type[OlmoscopeError] = OlmoscopeError) -> str:
    """Strict UTF-8, or one error naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{shown}: not UTF-8 text (bad byte at offset {exc.start:,})") from None


# ── JSON ────────────────────────────────────────────────────────────────────────
class _Refused(Exception):
    """Raised inside json.loads by the hooks below; becomes the caller's error."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C; only a size mismatch needs the slow search for the culprit
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key '{display_name(key)[:80]}'")
            seen.add(key)
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can get into decoded JSON
_LONG_DIGITS = re.compile(r"\d{%d}" % (MAX_INT_DIGITS + 1))  # only then is the (slow) int hook needed


def parse_json(data: bytes, shown: str, error: type[OlmoscopeError] = OlmoscopeError,
               nonfinite: bool = False) -> Any:
    """JSON by the module's rules; every refusal is one `error` naming `shown`.

    `nonfinite` accepts NaN/Infinity, which Python's json (so transformers) writes for non-finite floats:
    the value's own check then names the field instead.

    >>> parse_json(b'{"a": 1, "a": 2}', "x.json", ConfigError)
    Traceback (most recent call last):
    ConfigError: x.json: invalid JSON (duplicate key 'a')
    """
    text = decode_utf8(data, shown, error)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_int=_bounded_int if _LONG_DIGITS.search(text) else None,
                           parse_constant=float if nonfinite else _no_constant)
    except _Refused as exc:
        raise error(f"{shown}: invalid JSON ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{shown}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # the parser's own guard, far beyond MAX_DEPTH
        raise error(f"{shown}: invalid JSON (nested deeper than {MAX_DEPTH} levels)") from None
    _check_structure(value, shown, error, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _check_structure(value: Any, shown: str, error: type[OlmoscopeError], strings: bool) -> None:
    """Depth at most MAX_DEPTH, and (when `strings`) every string and key valid text; iterative, no stack."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    if strings and isinstance(value, str):
        _check_string(value, shown, error)
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{shown}: invalid JSON (nested deeper than {MAX_DEPTH} levels)")
        children = item.values() if isinstance(item, dict) else item
        if strings and isinstance(item, dict):
            for key in item:
                _check_string(key, shown, error)
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif strings and isinstance(child, str):
                _check_string(child, shown, error)


def _check_string(text: str, shown: str, error: type[OlmoscopeError]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise error(f"{shown}: a string holds a lone surrogate (\\u{code:04x}), which is not text") from None


def read_json(path: str | os.PathLike, limit: int, shown: str | None = None,
              error: type[OlmoscopeError] = OlmoscopeError, nonfinite: bool = False) -> Any:
    """read_capped then parse_json.

    >>> read_json("config.json", 1 << 20, error=ConfigError)["model_type"]
    'olmo2'
    """
    shown = shown if shown is not None else display_name(os.fspath(path))
    return parse_json(read_capped(path, limit, shown, error), shown, error, nonfinite)

