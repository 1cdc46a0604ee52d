"""Whole files or nothing: every output file is written beside its target, fsynced, then renamed onto it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from olmoscope.errors import UsageError


@contextmanager
def atomic_output(path: Path, text: bool = False) -> Iterator[IO]:
    """A temporary file beside `path`, fsynced and renamed onto it on success, removed on any failure.

    >>> with atomic_output(Path("report.csv"), text=True) as f: f.write("a,b\\n")
    """
    folder = path.parent if str(path.parent) else Path(".")
    mode = dict(mode="w", encoding="utf-8", newline="") if text else dict(mode="wb")
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".partial", delete=False, **mode)
    try:
        yield tmp.file
        tmp.file.flush()
        os.fsync(tmp.file.fileno())
        tmp.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # NamedTemporaryFile makes 0600; publish with the usual mode
        os.replace(tmp.name, path)
    except BaseException:  # disk full, a directory in the way, Ctrl-C: leave nothing behind
        try:
            tmp.close()  # may itself fail flushing onto a full disk
        except OSError:
            pass
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(folder)


def write_text_atomically(path: str | Path, text: str, option: str) -> None:
    """Write a whole text file or nothing; a failure is one UsageError naming `option` and the path."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    try:
        with atomic_output(target, text=True) as f:
            f.write(text)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the rename durable
    except OSError:
        pass
    finally:
        os.close(fd)
