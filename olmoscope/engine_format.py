"""The engine file format (docs/ENGINE_FORMAT.md): preamble, JSON header, 4 KiB-aligned tensor data."""

from __future__ import annotations

from pathlib import Path

MAGIC = b"OLMOSCPE"  # 8 bytes at offset 0 of every engine file


def looks_like_engine(path: Path) -> bool:
    """True when the file starts with the engine magic (cheap: reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
