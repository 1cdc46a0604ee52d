"""Safetensors checkpoints: shard discovery, header parsing and validation, memory-mapped tensor reads.

The header is parsed here rather than by the safetensors library because every malformed input must
become one CheckpointError line naming the shard and the tensor. Nothing is sized from a number read
from a file before that number has been checked against the file's real size.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Protocol

import ml_dtypes
import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.display import display_name, quoted  # noqa: F401  (re-exported: listings print names with them)
from olmoscope.display import short as _short
from olmoscope.errors import CheckpointError
from olmoscope.readers import open_regular, parse_json, read_json
from olmoscope.spec import checkpoint_tensors, natural_key

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MAX_INDEX_BYTES = 64 << 20  # a 32B index is ~30 KB; this only stops absurd files
MAX_RANK = 32  # numpy 1.x's limit; OLMo 2 tensors are at most 2-D
MAX_TENSORS = 1 << 16  # per checkpoint; OLMo 2 32B has 707. Each costs a few µs and ~2 KB to validate.

# safetensors dtype string → (bytes per element, numpy dtype that views them; little-endian, as stored)
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (1, np.dtype(np.bool_)),
    "U8": (1, np.dtype("<u1")),
    "I8": (1, np.dtype("<i1")),
    "F8_E5M2": (1, np.dtype(ml_dtypes.float8_e5m2)),
    "F8_E4M3": (1, np.dtype(ml_dtypes.float8_e4m3fn)),
    "F8_E8M0": (1, np.dtype(ml_dtypes.float8_e8m0fnu)),
    "I16": (2, np.dtype("<i2")),
    "U16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype(ml_dtypes.bfloat16)),
    "I32": (4, np.dtype("<i4")),
    "U32": (4, np.dtype("<u4")),
    "F32": (4, np.dtype("<f4")),
    "I64": (8, np.dtype("<i8")),
    "U64": (8, np.dtype("<u8")),
    "F64": (8, np.dtype("<f8")),
}


def dtype_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string.

    >>> dtype_size("BF16")
    2
    """
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {quoted(str(dtype))}")
    return _DTYPES[dtype][0]


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that views a safetensors dtype's bytes (bf16 and fp8 through ml_dtypes)."""
    dtype_size(dtype)
    return _DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard header describes it; validated against the shard's real size."""

    name: str  # as stored (print with display_name: it may hold control characters)
    dtype: str  # safetensors dtype string: "F32", "BF16", "F16", "I8", ...
    shape: tuple[int, ...]  # in elements, row-major
    shard: str  # shard file name, relative to the snapshot directory
    offset: int  # absolute byte offset of the data in the shard file (8 + header_len + begin)
    nbytes: int  # size of the data in bytes

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


class TensorRow(Protocol):
    """What listings and checks need of a tensor; TensorEntry has it, and so can an engine's rows."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    offset: int
    nbytes: int

    @property
    def elements(self) -> int: ...


@dataclass(frozen=True)
class CheckResult:
    """How a checkpoint's tensors compare with the tensors its config implies."""

    missing: list[str]  # implied by the config, absent from the checkpoint
    unexpected: list[str]  # in the checkpoint, not implied by the config
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, expected, found)
    expected: int = 0  # how many tensors the config implies

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)


def check_against_config(entries: Iterable[TensorRow], config: ModelConfig) -> CheckResult:
    """Compare stored tensors with spec.checkpoint_tensors(config), all lists in natural order.

    >>> check_against_config(Checkpoint.open(path).entries, config).ok
    True
    """
    found = {e.name: tuple(e.shape) for e in entries}
    implied = {t.name: t.shape for t in checkpoint_tensors(config)}
    missing = [n for n in implied if n not in found]
    unexpected = sorted((n for n in found if n not in implied), key=natural_key)
    wrong = [(n, implied[n], found[n]) for n in implied if n in found and found[n] != implied[n]]
    return CheckResult(missing, unexpected, wrong, expected=len(implied))


@dataclass(eq=False)
class Checkpoint:
    """A validated set of safetensors shards; only headers are read until `read` is called.

    >>> Checkpoint.open(Path("snapshot")).entry("model.norm.weight").shape
    (2048,)
    """

    directory: Path  # the snapshot directory the shard names are relative to
    shards: list[str]  # shard file names, sorted
    entries: list[TensorEntry]  # every tensor, in natural order (spec.natural_key)
    _by_name: dict[str, TensorEntry] = field(default_factory=dict, repr=False)
    _sizes: dict[str, int] = field(default_factory=dict, repr=False)  # shard → size when validated
    _maps: dict[str, mmap.mmap] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        """Discover the shards of `directory`, parse and validate every header; reads no tensor data."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: not a directory")
        weight_map = _read_index(directory)
        if weight_map is not None:
            shards = sorted(set(weight_map.values()))
            _check_index_shards_exist(directory, weight_map, shards)
        elif (directory / SINGLE_NAME).is_file():
            shards = [SINGLE_NAME]
        else:
            shards = sorted(p.name for p in directory.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{directory}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
        sizes: dict[str, int] = {}
        per_shard: dict[str, list[TensorEntry]] = {}
        for shard in shards:
            sizes[shard], per_shard[shard] = read_shard_header(directory, shard)
        entries = _merge_shards(per_shard, weight_map)
        by_name = {e.name: e for e in entries}
        return cls(directory, shards, entries, by_name, sizes)

    def entry(self, name: str) -> TensorEntry:
        """The entry for `name`; CheckpointError when the checkpoint has no such tensor."""
        try:
            return self._by_name[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor {quoted(name)}") from None

    def read(self, name: str) -> np.ndarray:
        """A read-only, memory-mapped view of the tensor's data in its shape (no copy).

        >>> ckpt.read("model.norm.weight").dtype
        dtype(float32)
        """
        e = self.entry(name)
        dtype = numpy_dtype(e.dtype)
        if e.elements == 0:
            empty = np.empty(e.shape, dtype)
            empty.flags.writeable = False
            return empty
        data = np.frombuffer(self._map(e.shard), dtype=dtype, count=e.elements, offset=e.offset)
        return data.reshape(e.shape)

    def _map(self, shard: str) -> mmap.mmap:
        if shard not in self._maps:
            shown = display_name(shard)
            fd, info = open_regular(self.directory / shard, shown, CheckpointError)
            try:
                # A shard that changed since it was validated could fault on access: refuse it.
                if info.st_size != self._sizes[shard]:
                    raise CheckpointError(f"{shown}: changed since it was opened ({info.st_size:,} bytes, "
                                          f"was {self._sizes[shard]:,})")
                self._maps[shard] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)  # the map keeps its own reference to the file
        return self._maps[shard]


# ── index ──────────────────────────────────────────────────────────────────────


def _read_index(directory: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor → shard), validated; None when the snapshot has no index."""
    path = directory / INDEX_NAME
    if not os.path.lexists(path):  # a dangling symbolic link is a broken index, not a missing one
        return None
    raw = read_json(path, MAX_INDEX_BYTES, INDEX_NAME, CheckpointError, nonfinite=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{INDEX_NAME}: expected a JSON object, found {_json_type(raw)}")
    if "metadata" in raw and not isinstance(raw["metadata"], (dict, type(None))):
        raise CheckpointError(f"{INDEX_NAME}: metadata must be an object, found {_json_type(raw['metadata'])}")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{INDEX_NAME}: weight_map must be an object, found {_json_type(weight_map)}")
    if not weight_map:
        raise CheckpointError(f"{INDEX_NAME}: weight_map is empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{INDEX_NAME}: tensor {quoted(name)}: shard must be a string, found {_json_type(shard)}"
            )
        check_shard_name(shard, f"{INDEX_NAME}: tensor {quoted(name)}")
    return weight_map


def _check_index_shards_exist(directory: Path, weight_map: dict[str, str], shards: list[str]) -> None:
    for shard in shards:
        if not os.path.lexists(directory / shard):
            tensor = next(n for n, s in weight_map.items() if s == shard)
            raise CheckpointError(
                f"{INDEX_NAME}: tensor {quoted(tensor)} is mapped to shard {quoted(shard)}, "
                f"which is missing from {directory}"
            )


def check_shard_name(shard: str, where: str) -> None:
    """Refuse a shard name that could reach outside the snapshot (never opened, one-line error)."""
    shown = quoted(shard)
    if not shard or "\x00" in shard:
        raise CheckpointError(f"{where}: shard name {shown} is empty or holds a NUL byte")
    path = PurePosixPath(shard)
    drive = len(shard) > 2 and shard[0].isalpha() and shard[1] == ":" and shard[2] in "/\\"
    if path.is_absolute() or shard.startswith("\\") or drive:
        raise CheckpointError(f"{where}: shard name {shown} is an absolute path; refused")
    if ".." in path.parts or ".." in shard.split("\\"):
        raise CheckpointError(f"{where}: shard name {shown} leads outside the snapshot ('..'); refused")
    if path.name in ("", "."):
        raise CheckpointError(f"{where}: shard name {shown} is not a file name")


# ── shard headers ──────────────────────────────────────────────────────────────


def read_shard_header(directory: Path, shard: str) -> tuple[int, list[TensorEntry]]:
    """(file size, entries in file order) of one shard, every header rule checked.

    >>> read_shard_header(Path("snap"), "model.safetensors")[1][0].dtype
    'F32'
    """
    check_shard_name(shard, str(directory))
    path = directory / shard
    shown = display_name(shard)
    if not os.path.lexists(path):
        raise CheckpointError(f"{shown}: shard is missing from {directory}")
    fd, info = open_regular(path, shown, CheckpointError)
    try:
        size = info.st_size
        if size < 8:
            raise CheckpointError(f"{shown}: {size} bytes is shorter than the 8-byte header length")
        header_len = int.from_bytes(_pread(fd, 8, 0, shown), "little")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{shown}: header length {header_len:,} is over the {MAX_HEADER_BYTES:,}-byte limit")
        if 8 + header_len > size:
            raise CheckpointError(f"{shown}: header length {header_len:,} runs beyond the file ({size:,} bytes)")
        text = _pread(fd, header_len, 8, shown)
    finally:
        os.close(fd)
    # Every tensor entry spells this key: counting it bounds the work before a large header is parsed.
    if text.count(b'"data_offsets"') > MAX_TENSORS:
        raise CheckpointError(f"{shown}: header lists more than {MAX_TENSORS:,} tensors; refused")
    header = parse_json(text, f"{shown}: header", CheckpointError)
    return size, _entries_of(header, shard, header_len, size)


def _pread(fd: int, n: int, offset: int, shown: str) -> bytes:
    try:
        data = os.pread(fd, n, offset)
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot read ({exc.strerror})") from None
    if len(data) != n:
        raise CheckpointError(f"{shown}: file shrank while being read")
    return data


def _entries_of(header: Any, shard: str, header_len: int, size: int) -> list[TensorEntry]:
    shown = display_name(shard)
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown}: header must be a JSON object, found {_json_type(header)}")
    if len(header) > MAX_TENSORS + 1:  # the key count above can be dodged with \u escapes; this cannot
        raise CheckpointError(f"{shown}: header lists more than {MAX_TENSORS:,} tensors; refused")
    _check_metadata(header.get("__metadata__"), shown)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{shown}: tensor {quoted(name)}"
        dtype, shape, begin, end = _tensor_fields(info, where)
        if end > data_size:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] run beyond the file ({data_size:,} data bytes)"
            )
        nbytes = end - begin
        expected = _byte_size(shape, dtype, limit=data_size)
        if expected != nbytes:
            shown_size = f"{expected:,}" if expected <= data_size else f"more than {data_size:,}"
            raise CheckpointError(
                f"{where}: shape {list(shape)} × {dtype} is {shown_size} bytes but data_offsets span {nbytes:,}"
            )
        spans.append((begin, end, name))
        entries.append(TensorEntry(name, dtype, shape, shard, data_start + begin, nbytes))
    _check_layout(spans, data_size, shown)
    return entries


def _check_metadata(metadata: Any, shown: str) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{shown}: __metadata__ must be an object of strings, found {_json_type(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"{shown}: __metadata__ {quoted(key)} must be a string, found {_json_type(value)}"
            )


def _tensor_fields(info: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape, data_offsets; found {_json_type(info)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CheckpointError(f"{where}: {key} is missing")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, found {_short(shape)}")
    if len(shape) > MAX_RANK:
        raise CheckpointError(f"{where}: shape has {len(shape)} dimensions, over the {MAX_RANK} supported")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], found {_short(offsets)}")
    begin, end = offsets
    if begin < 0 or end < 0:
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} are negative")
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} end before they begin")
    return dtype, tuple(shape), begin, end


def _byte_size(shape: tuple[int, ...], dtype: str, limit: int) -> int:
    """Bytes the shape holds; stops multiplying once past `limit` so a hostile shape costs nothing."""
    if 0 in shape:
        return 0
    n = _DTYPES[dtype][0]
    for s in shape:
        n *= s
        if n > limit:
            return limit + 1
    return n


def _check_layout(spans: list[tuple[int, int, str]], data_size: int, shown: str) -> None:
    """Tensors must tile the data section exactly: from 0, no gap, no overlap, nothing left over."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        where = f"{shown}: tensor {quoted(name)}"
        if begin > position:
            after = f"after {quoted(previous)}" if previous is not None else "at the start of the data"
            raise CheckpointError(f"{where}: gap of {begin - position:,} bytes {after} (begins at {begin:,})")
        if begin < position:
            raise CheckpointError(
                f"{where}: data_offsets overlap {quoted(previous)} (begins at {begin:,}, before {position:,})"
            )
        position, previous = end, name
    if position != data_size:
        last = f"after tensor {quoted(previous)}" if previous is not None else "and no tensors"
        raise CheckpointError(f"{shown}: {data_size - position:,} bytes left over {last}")


# ── shards together ────────────────────────────────────────────────────────────


def _merge_shards(per_shard: dict[str, list[TensorEntry]], weight_map: dict[str, str] | None) -> list[TensorEntry]:
    """All entries in natural order; a name in two shards or a weight_map that disagrees is refused."""
    total = sum(len(entries) for entries in per_shard.values())
    if total > MAX_TENSORS:
        raise CheckpointError(f"{total:,} tensors across {len(per_shard)} shards is more than the {MAX_TENSORS:,} supported")
    owner: dict[str, TensorEntry] = {}
    for shard, entries in per_shard.items():
        for e in entries:
            if e.name in owner:
                raise CheckpointError(
                    f"tensor {quoted(e.name)} is in two shards: {quoted(owner[e.name].shard)} "
                    f"and {quoted(shard)}"
                )
            owner[e.name] = e
    if weight_map is not None:
        _check_weight_map(weight_map, owner)
    return sorted(owner.values(), key=lambda e: natural_key(e.name))


def _check_weight_map(weight_map: dict[str, str], owner: dict[str, TensorEntry]) -> None:
    for name, shard in weight_map.items():
        if name not in owner:
            raise CheckpointError(
                f"{INDEX_NAME}: tensor {quoted(name)} is mapped to {quoted(shard)} but no shard holds it"
            )
        if owner[name].shard != shard:
            raise CheckpointError(
                f"{INDEX_NAME}: tensor {quoted(name)} is mapped to {quoted(shard)} "
                f"but stored in {quoted(owner[name].shard)}"
            )
    for name, e in owner.items():
        if name not in weight_map:
            raise CheckpointError(
                f"{display_name(e.shard)}: tensor {quoted(name)} is not in {INDEX_NAME}'s weight_map"
            )


# ── small helpers ──────────────────────────────────────────────────────────────


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
