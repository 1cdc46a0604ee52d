"""Whole files or nothing: every output file is written without a name, then linked into place when complete.

On Linux the data goes into an O_TMPFILE file in the target directory: it has no name until it is whole
and fsynced, so whatever stops the writer (an exception, a full disk, any signal, SIGKILL, two Ctrl-C in
a row) leaves nothing behind. Publishing links it at the target, which fails if a file appeared there
meanwhile (no silent replacement); replacing an existing file (`overwrite`) links it under a temporary
name and renames that over the target, so readers see the old file or the new one, never a mix.

Where O_TMPFILE is missing (other systems, some filesystems) the data goes into a hidden
`.NAME.XXXX.olmoscope-partial` file held under an exclusive flock; every atomic_output into that folder
first removes the partials whose lock is free, i.e. whose writer is gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from olmoscope.errors import UsageError

PARTIAL_SUFFIX = ".olmoscope-partial"  # only files ending so are ever swept: the name is ours alone


class OutputExists(FileExistsError):
    """The target appeared while the output was being written, and overwriting was not asked for."""


def output_path(text: str | os.PathLike, option: str) -> Path:
    """An output path as typed, refused when it names a directory (`dir/`, an existing directory).

    >>> output_path("runs/", "-o")
    Traceback (most recent call last):
    UsageError: -o runs/: names a directory (trailing slash); give a file name
    """
    raw = os.fspath(text)
    if not raw:
        raise UsageError(f"{option}: the path is empty")
    path = Path(raw)
    if path.is_dir():
        raise UsageError(f"{option} {raw}: is a directory; give a file name")
    if raw.endswith((os.sep, "/")) or path.name in ("", ".", ".."):
        raise UsageError(f"{option} {raw}: names a directory (trailing slash); give a file name")
    return path


@contextmanager
def atomic_output(path: Path, text: bool = False, overwrite: bool = True) -> Iterator[IO]:
    """A nameless file in `path`'s folder, linked at `path` once the block completes; nothing on any failure.

    Without `overwrite`, a file that exists at `path` when the block completes is left alone and
    OutputExists is raised (the caller checked before starting; this catches one created meanwhile).

    >>> with atomic_output(Path("report.csv"), text=True) as f: f.write("a,b\\n")
    """
    folder = path.parent if str(path.parent) else Path(".")
    sweep_partials(folder)
    output = _Nameless.create(folder) or _Partial.create(folder, path.name)
    try:
        stream = _stream(output.fd, text)
    except BaseException:
        output.discard()
        raise
    try:
        yield stream
        stream.flush()
        os.fsync(output.fd)
        output.publish(path, overwrite)
    except BaseException:  # disk full, a directory in the way, Ctrl-C: leave nothing behind
        output.discard()
        raise
    finally:
        try:
            stream.close()  # also closes the fd; may itself fail flushing onto a full disk
        except OSError:
            pass
    _fsync_directory(folder)


def write_text_atomically(path: str | Path, text: str, option: str) -> None:
    """Write a whole text file or nothing; a failure is one UsageError naming `option` and the path."""
    target = output_path(path, option)
    try:
        with atomic_output(target, text=True) as f:
            f.write(text)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def sweep_partials(folder: Path) -> list[Path]:
    """Remove the partial files in `folder` whose writer is gone (their flock is free); returns them."""
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX)]
    except OSError:
        return removed
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
            os.unlink(candidate)
            removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _stream(fd: int, text: bool) -> IO:
    if text:
        return open(fd, "w", encoding="utf-8", newline="", closefd=True)
    return open(fd, "wb", closefd=True)


def _publish_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_name(folder: Path, name: str) -> Path:
    return folder / f".{name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


class _Nameless:
    """An O_TMPFILE file: linked into the folder only by publish()."""

    def __init__(self, fd: int, folder: Path):
        self.fd = fd
        self.folder = folder

    @classmethod
    def create(cls, folder: Path) -> _Nameless | None:
        flag = getattr(os, "O_TMPFILE", None)
        if flag is None:
            return None
        try:
            fd = os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, 0o666)  # the umask applies, as for open()
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                return None  # no O_TMPFILE on this filesystem (ENOENT: a kernel without it)
            raise
        if not os.path.exists(f"/proc/self/fd/{fd}"):  # linkat needs /proc to name the file
            os.close(fd)
            return None
        return cls(fd, folder)

    def publish(self, path: Path, overwrite: bool) -> None:
        if not overwrite:
            try:
                self._link(path)  # EEXIST rather than replace a file that appeared meanwhile
            except FileExistsError:
                raise OutputExists(errno.EEXIST, "appeared while it was being written", str(path)) from None
            return
        staged = _temporary_name(self.folder, path.name)
        self._link(staged)
        try:
            os.replace(staged, path)
        except BaseException:
            _unlink_quietly(staged)
            raise

    def _link(self, path: Path) -> None:
        """linkat(/proc/self/fd/N, path, AT_SYMLINK_FOLLOW): Python's os.link only passes the flag (rather than
        calling link(2), which would link the /proc symlink itself) when a dir_fd is given."""
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{self.fd}", path, src_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(folder)

    def discard(self) -> None:
        pass  # closing the fd (the stream does) frees the data: it never had a name


class _Partial:
    """A named hidden file under an exclusive flock, for filesystems without O_TMPFILE."""

    def __init__(self, fd: int, name: Path):
        self.fd = fd
        self.name = name

    @classmethod
    def create(cls, folder: Path, target_name: str) -> _Partial:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{target_name}.", suffix=PARTIAL_SUFFIX)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when this process dies
            os.fchmod(fd, _publish_mode())  # mkstemp makes 0600; publish with the usual mode
        except BaseException:
            os.close(fd)
            _unlink_quietly(Path(name))
            raise
        return cls(fd, Path(name))

    def publish(self, path: Path, overwrite: bool) -> None:
        if overwrite:
            os.replace(self.name, path)
            return
        try:
            os.link(self.name, path)  # fails rather than replace a file that appeared meanwhile
        except FileExistsError:
            raise OutputExists(errno.EEXIST, "appeared while it was being written", str(path)) from None
        _unlink_quietly(self.name)

    def discard(self) -> None:
        _unlink_quietly(self.name)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the link or rename durable
    except OSError:
        pass
    finally:
        os.close(fd)
