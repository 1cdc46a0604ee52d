"""Names and text from files or the command line, made safe to print on one line."""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any


def display_name(name: str) -> str:
    r"""A name safe to print: control, format and separator characters escaped, else unchanged.

    >>> print(display_name("bad\x07name"))
    bad\x07name
    """
    if not any(_needs_escape(c) for c in name):
        return name
    return "".join(_escape(c) for c in name)


def quoted(name: str) -> str:
    r"""display_name in single quotes, for messages: quoted("a\tb") → 'a\tb' (escaped, not a tab)."""
    return f"'{display_name(name)}'"


def one_line(text: str) -> str:
    r"""A message safe to print as one line: what display_name escapes, except backslashes (already-escaped
    names inside the message stay as they are).

    >>> one_line("a\nb \\x07")
    'a\\nb \\x07'
    """
    if not any(_needs_escape(c) for c in text):
        return text
    return "".join(c if c == "\\" else _escape(c) for c in text)


def path_text(path: str | os.PathLike) -> str:
    r"""A path as valid text: bytes that are not UTF-8 (lone surrogates from the OS) become \xNN escapes.

    Paths go into engine headers and reports, which must be UTF-8.

    >>> path_text(os.fsdecode(b"snap\xff"))
    'snap\\xff'
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no OS byte made (e.g. "\ud800" typed as JSON)
        raw = os.fspath(path).encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def short(value: Any, limit: int = 60) -> str:
    """A value from a file, shown in an error without flooding the line (JSON spelling, escaped, cut).

    >>> short("x" * 100, 8)
    '"xxxxxx…'
    """
    try:
        text = display_name(json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value))
    except (ValueError, TypeError, RecursionError):
        text = display_name(repr(value)[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), escaped and cut like `short`: for values a config file supplies.

    >>> short_repr("gelu")
    "'gelu'"
    """
    try:
        text = display_name(repr(value))
    except RecursionError:
        text = f"({type(value).__name__})"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _needs_escape(char: str) -> bool:
    # Cc controls, Cf (bidi overrides, zero-width), Zl/Zp line breaks, Cs lone surrogates from JSON or argv.
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if not _needs_escape(char):
        return char
    code = ord(char)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
