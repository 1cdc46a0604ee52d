"""The engine file format (docs/ENGINE_FORMAT.md): preamble, JSON header, 4 KiB-aligned tensor data.

    offset 0   preamble   magic b"OLMOSCPE" | u32 format version | u64 header length | 16-byte xxh3-128
                          of the version, the length, the header and its padding   (little-endian)
    offset 36  header     UTF-8 JSON, validated by schemas/engine-header.schema.json + semantic checks
    aligned    tensors    in engine_tensors(config) order; each at a 4 KiB boundary; a quantized matrix's
                          scales (and int4 zero points) follow it, also aligned; the file ends with the last one

Every byte is covered: the header (and the zeros after it) by the preamble's checksum, checked on every
open; each tensor by its own checksum in the table, checked by verify() and when the runtime reads it;
the zeros between tensors by verify(). The writer (EngineWriter) streams tensors in plan order and writes
the preamble and header last; the reader (EngineFile) maps the file read-only and checks everything
before it hands out a view.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
import xxhash

from olmoscope.config import ModelConfig
from olmoscope.display import display_name
from olmoscope.errors import ConfigError, EngineError
from olmoscope.readers import open_regular, parse_json
from olmoscope.spec import EngineTensorSpec, engine_tensors
from olmoscope.weight_formats import (ELEMENT_BITS, FORMATS, INT4_DEFAULT_GROUP, INT4_DEFAULT_SCHEME, NORM_DTYPE,
                                      WeightFormat, by_stored)

MAGIC = b"OLMOSCPE"  # 8 bytes at offset 0 of every engine file
# bumped on any change an older reader would misread (2: the header is checksummed; 3: int4, the
# weight-format table's quantization records, zero points)
FORMAT_VERSION = 3
VERSION_CHANGES = {1: "whose header is checksummed", 2: "which stores int4 and records each matrix's quantization"}
PREAMBLE = struct.Struct("<8sIQ16s")  # magic, format version, header length in bytes, header checksum
ALIGNMENT = 4096  # every tensor (and scale or zero-point array) starts at a multiple of this
MAX_HEADER_BYTES = 256 << 20  # a header is config + tokenizer (~3 MB) + table; anything larger is hostile
FORMAT_NAME = "olmoscope-engine"

# Stored element types, safetensors-style names; all little-endian. U4 is two 4-bit values per byte
# (weight_formats.py), viewed as uint8.
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U4": np.dtype("u1"),
}
WEIGHT_DTYPES = tuple(FORMATS)  # the --dtype choices
PARTS = ("scales", "zeros")  # a quantized matrix's own arrays besides its data, in file order
SCALES_SUFFIX = ".scales"  # how a matrix's scales are named in listings and verify reports
ZEROS_SUFFIX = ".zeros"  # and its int4 zero points
CHECKSUM_PLACEHOLDER = "0" * 32  # xxh3-128 hex is always 32 characters, so the header length is known early
# The header's limits, also spelled in the schema (a test checks they agree); convert checks them first.
MAX_EOS_IDS = 64
MAX_TOKEN_ID = (1 << 22) - 1


@dataclass(frozen=True)
class Quantization:
    """A file's quantization choices (the header's `quantization`): what every quantized matrix shares."""

    format: str  # "int8" or "int4" (weight_formats.FORMATS)
    scheme: str  # "sym" (int8 always; int4 zero 8) or "asym" (int4 with a zero point per group)
    group_size: int | None  # int4: inputs per scale (32, 64, 128); int8: None (one scale per row)
    lm_head: bool  # whether lm_head is quantized too (int8: always; int4: --int4-lm-head or an import's)
    source: str = "ours"  # "ours" (convert quantized it), "gptq" or "awq" (imported as found)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "scheme": self.scheme, "group_size": self.group_size,
                "lm_head": self.lm_head, "source": self.source}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Quantization | None:
        return None if raw is None else cls(raw["format"], raw["scheme"], raw["group_size"], raw["lm_head"],
                                            raw["source"])

    @property
    def symmetric(self) -> bool:
        return self.scheme == "sym"

    def describe(self) -> str:
        """e.g. 'int4 asym, group 128, lm_head bf16, quantized by olmoscope'."""
        group = "per row" if self.group_size is None else f"group {self.group_size}"
        head = "lm_head quantized" if self.lm_head else "lm_head bf16"
        by = {"ours": "quantized by olmoscope", "gptq": "imported from GPTQ", "awq": "imported from AWQ"}[self.source]
        return f"{self.format} {self.scheme}, {group}, {head}, {by}"


def default_quantization(weight_dtype: str) -> Quantization | None:
    """The quantization a --dtype implies with every option at its default (int8's are fixed)."""
    fmt = FORMATS[weight_dtype]
    if not fmt.quantized:
        return None
    if fmt.group == "row":
        return Quantization(fmt.name, "sym", None, fmt.quantized_head)
    return Quantization(fmt.name, INT4_DEFAULT_SCHEME, INT4_DEFAULT_GROUP, fmt.quantized_head)


# ── the tensor table ────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class EngineTensor:
    """One row of the engine file's tensor table."""

    name: str  # engine name, e.g. "layers.3.qkv"
    role: str  # qkv, gate_up, or a checkpoint role (spec.ROLE_DESCRIPTIONS)
    layer: int | None  # block index, None for model-level tensors
    dtype: str  # stored element type: F32, BF16, F16, I8 or U4 (two per byte)
    shape: tuple[int, ...]  # the matrix's logical shape, row-major; matrices are [out, in]
    offset: int  # absolute byte offset in the file, a multiple of ALIGNMENT
    nbytes: int  # = prod(shape) · bits(dtype) / 8
    checksum: str  # xxh3-128 of the stored bytes, 32 hex digits
    layout: str  # how the bytes are arranged, for humans and the runtime's authors
    # quantized matrices: format, scheme, group_size, source, and where its "scales" (and "zeros") live
    quantization: dict[str, Any] | None = None

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The stored array's shape: [N, K/2] bytes for U4, else `shape`."""
        return by_stored(self.dtype).data_shape(self.shape)

    def part(self, kind: str) -> dict[str, Any] | None:
        """The "scales" or "zeros" record ({dtype, shape, offset, size, checksum}), None when absent."""
        return None if self.quantization is None else self.quantization[kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "layer": self.layer,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "size": self.nbytes,
            "checksum": self.checksum,
            "layout": self.layout,
            "quantization": self.quantization,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> EngineTensor:
        return cls(
            row["name"], row["role"], row["layer"], row["dtype"], tuple(row["shape"]), row["offset"],
            row["size"], row["checksum"], row["layout"], row["quantization"],
        )

    def regions(self) -> list[tuple[int, int, str]]:
        """(offset, size, label) of every byte range this tensor owns: its data, then its scales and zeros."""
        out = [(self.offset, self.nbytes, self.name)]
        for kind in PARTS:
            part = self.part(kind)
            if part is not None:
                out.append((part["offset"], part["size"], f"{self.name}.{kind}"))
        return out

    def checksums(self) -> dict[str, str]:
        """Region label → expected xxh3-128, as regions() names them."""
        out = {self.name: self.checksum}
        for kind in PARTS:
            part = self.part(kind)
            if part is not None:
                out[f"{self.name}.{kind}"] = part["checksum"]
        return out


def tensor_format(spec: EngineTensorSpec, weight_dtype: str, quant: Quantization | None) -> WeightFormat | None:
    """The weight format a tensor is stored in (None for norms): the file's, except where it stays wide."""
    return FORMATS[weight_dtype].for_tensor(spec.kind, spec.role, quant is not None and quant.lm_head)


def stored_dtype(spec: EngineTensorSpec, weight_dtype: str, quant: Quantization | None = None) -> str:
    """The element type a tensor is stored in for a given --dtype.

    >>> stored_dtype(norm_spec, "int8")
    'F32'
    """
    fmt = tensor_format(spec, weight_dtype, quant or default_quantization(weight_dtype))
    return NORM_DTYPE if fmt is None else fmt.stored


def layout_text(spec: EngineTensorSpec, dtype: str = "BF16") -> str:
    """A one-line description of the bytes, e.g. 'row-major [Hd+Hkvd+Hkvd, D] = [out, in]; rows = [q_proj; k_proj; v_proj]'."""
    if len(spec.shape) == 1:
        return f"vector [{spec.sources[0].formula[0]}]"
    rows = "+".join(p.formula[0] for p in spec.sources)
    cols = spec.sources[0].formula[1]
    text = f"row-major [{rows}, {cols}]"
    text += " = [token, D]; row i embeds token i" if spec.role == "embedding" else " = [out, in]"
    if by_stored(dtype).layout:
        text += "; " + by_stored(dtype).layout
    if len(spec.sources) > 1:
        text += "; rows = [" + "; ".join(p.role for p in spec.sources) + "]"
    return text


def _part(dtype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "offset": 0,
            "size": int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize, "checksum": CHECKSUM_PLACEHOLDER}


def tensor_quantization(spec: EngineTensorSpec, fmt: WeightFormat, quant: Quantization) -> dict[str, Any]:
    """A quantized matrix's table record: the file's choices and its scales' (and zeros') places, unplaced."""
    if fmt.group == "group" and spec.shape[1] % quant.group_size:
        raise EngineError(f"tensor {spec.name}: its {spec.shape[1]} inputs are not a multiple of group size "
                          f"{quant.group_size}; choose a --group-size that divides {spec.shape[1]}")
    shape = fmt.scale_shape(spec.shape, quant.group_size)
    zeros = _part(fmt.zero_dtype, shape) if fmt.zero_dtype is not None and not quant.symmetric else None
    return {"format": fmt.name, "scheme": quant.scheme, "group_size": quant.group_size, "source": quant.source,
            "scales": _part(fmt.scale_dtype, shape), "zeros": zeros}


def plan_tensors(config: ModelConfig, weight_dtype: str, quant: Quantization | None = None) -> list[EngineTensor]:
    """The tensor table for a config, --dtype and quantization choices, offsets 0 and checksums placeholders.

    `quant` None means the --dtype's defaults (default_quantization).
    """
    if weight_dtype not in FORMATS:
        raise EngineError(f"unknown weight dtype {weight_dtype!r} (choose from {', '.join(FORMATS)})")
    quant = quant or default_quantization(weight_dtype)
    out = []
    for spec in engine_tensors(config):
        fmt = tensor_format(spec, weight_dtype, quant)
        dtype = NORM_DTYPE if fmt is None else fmt.stored
        record = tensor_quantization(spec, fmt, quant) if fmt is not None and fmt.quantized else None
        nbytes = spec.elements * ELEMENT_BITS[dtype] // 8
        out.append(EngineTensor(spec.name, spec.role, spec.layer, dtype, spec.shape, 0, nbytes,
                                CHECKSUM_PLACEHOLDER, layout_text(spec, dtype), record))
    return out


def align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def assign_offsets(tensors: list[EngineTensor], data_start: int) -> list[EngineTensor]:
    """Lay tensors out back to back from data_start, each (and each scale or zero array) on an ALIGNMENT boundary."""
    out, cursor = [], data_start
    for t in tensors:
        offset = align(cursor)
        cursor = offset + t.nbytes
        quant = t.quantization
        if quant is not None:
            quant = dict(quant)
            for kind in PARTS:
                if quant[kind] is not None:
                    place = align(cursor)
                    cursor = place + quant[kind]["size"]
                    quant[kind] = {**quant[kind], "offset": place}
        out.append(replace(t, offset=offset, quantization=quant))
    return out


def config_to_header(config: ModelConfig) -> dict[str, Any]:
    """The validated config as stored in the header: config.json's own field names, re-readable by from_dict."""
    return {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], **config.to_dict()}


def full_header(base_header: dict[str, Any], tensors: list[EngineTensor]) -> dict[str, Any]:
    """The header: base fields, the tensor table, and the tokenizer last (megabytes; `head -c` shows the rest)."""
    header = {k: v for k, v in base_header.items() if k != "tokenizer"}
    header["tensors"] = [t.to_json() for t in tensors]
    header["tokenizer"] = base_header.get("tokenizer")
    return header


def encode_header(header: dict[str, Any]) -> bytes:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def header_checksum(version: int, header_length: int, header_and_padding: bytes | memoryview) -> bytes:
    """The preamble's 16-byte xxh3-128: of the version and length fields, then the header and its zero padding."""
    hasher = xxhash.xxh3_128(struct.pack("<IQ", version, header_length))
    hasher.update(header_and_padding)
    return hasher.digest()


def sealed_header(body: bytes, data_start: int, version: int = FORMAT_VERSION) -> bytes:
    """The file's first data_start bytes: preamble (checksum included), header, zero padding.

    >>> len(sealed_header(encode_header(header), 4096))
    4096
    """
    covered = body + bytes(data_start - PREAMBLE.size - len(body))
    return PREAMBLE.pack(MAGIC, version, len(body), header_checksum(version, len(body), covered)) + covered


def layout_file(base_header: dict[str, Any], tensors: list[EngineTensor]) -> tuple[int, list[EngineTensor]]:
    """Where the data starts and every tensor's final offset.

    The header holds the offsets, whose digits change its length, which moves the data start: iterate to
    the fixed point (two or three rounds; offsets only ever grow). Checksums are fixed-width placeholders,
    so filling them in later leaves the length unchanged. The planned header must pass the reader's checks
    (schema, config, table, tokenizer digest): the writer never makes a file its reader refuses.
    """
    data_start = align(PREAMBLE.size + 2)
    for _ in range(16):
        placed = assign_offsets(tensors, data_start)
        header = full_header(base_header, placed)
        length = len(encode_header(header))
        needed = align(PREAMBLE.size + length)
        if needed <= data_start:
            check_header("engine header", header)  # the reader's rules, before a byte is written
            return data_start, placed
        data_start = needed
    raise AssertionError("engine header layout did not converge")  # offsets only grow: unreachable


# ── writing ─────────────────────────────────────────────────────────────────────
class EngineWriter:
    """Writes one engine file front to back: tensors in table order, then the header over the reserved space.

    >>> w = EngineWriter(f, base_header, plan_tensors(cfg, "bf16"))
    >>> w.begin("embedding"); w.write(rows); w.end(); ...; w.finish()
    """

    def __init__(self, file: BinaryIO, base_header: dict[str, Any], tensors: list[EngineTensor],
                 layout: tuple[int, list[EngineTensor]] | None = None):
        """`layout`: layout_file(base_header, tensors), when the caller has it already (it is checked there)."""
        self._file = file
        self._base = base_header
        self.data_start, self.tensors = layout or layout_file(base_header, tensors)
        self.total_bytes = self._end_of(self.tensors)
        self._index = 0  # the next tensor to begin
        self._current: EngineTensor | None = None
        self._hasher = xxhash.xxh3_128()
        self._written = 0
        self._done: list[EngineTensor] = []
        file.seek(0)
        file.truncate()
        self._pad_to(self.data_start)  # the header's space, filled in by finish()

    @staticmethod
    def _end_of(tensors: list[EngineTensor]) -> int:
        return max((off + size for t in tensors for off, size, _ in t.regions()), default=0)

    def begin(self, name: str) -> EngineTensor:
        """Start the next tensor; names must come in table order."""
        if self._current is not None:
            raise EngineError(f"engine writer: {self._current.name} is not finished")
        if self._index >= len(self.tensors) or self.tensors[self._index].name != name:
            expected = self.tensors[self._index].name if self._index < len(self.tensors) else "nothing"
            raise EngineError(f"engine writer: got {name}, expected {expected}")
        self._current = self.tensors[self._index]
        self._pad_to(self._current.offset)
        self._hasher.reset()
        self._written = 0
        return self._current

    def write(self, block: np.ndarray) -> None:
        """Append elements to the current tensor (C-contiguous, already in its stored dtype)."""
        t = self._current
        if t is None:
            raise EngineError("engine writer: write() before begin()")
        if block.dtype != DTYPES[t.dtype]:
            raise EngineError(f"engine writer: {t.name} is {t.dtype}, got a {block.dtype} block")
        raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        if self._written + raw.nbytes > t.nbytes:
            raise EngineError(f"engine writer: {t.name} overflows its {t.nbytes} bytes")
        self._file.write(raw)
        self._hasher.update(raw)
        self._written += raw.nbytes

    def end(self, scales: np.ndarray | None = None, zeros: np.ndarray | None = None) -> None:
        """Finish the current tensor; a quantized matrix passes its scales (and int4 asym its zeros) here."""
        t = self._current
        if t is None:
            raise EngineError("engine writer: end() before begin()")
        if self._written != t.nbytes:
            raise EngineError(f"engine writer: {t.name} got {self._written} of {t.nbytes} bytes")
        done = replace(t, checksum=self._hasher.hexdigest())
        if t.quantization is not None:
            quant = dict(t.quantization)
            for kind, array in (("scales", scales), ("zeros", zeros)):
                quant[kind] = self._write_part(t.name, kind, quant[kind], array)
            done = replace(done, quantization=quant)
        elif scales is not None or zeros is not None:
            raise EngineError(f"engine writer: {t.name} is not quantized; no scales expected")
        self._done.append(done)
        self._current = None
        self._index += 1

    def _write_part(self, name: str, kind: str, part: dict[str, Any] | None, array: np.ndarray | None):
        """Write one scales/zeros array where the layout puts it; returns its record with the checksum."""
        if part is None:
            if array is not None:
                raise EngineError(f"engine writer: {name} has no {kind}; none expected")
            return None
        if array is None or array.dtype != DTYPES[part["dtype"]] or list(array.shape) != part["shape"]:
            raise EngineError(f"engine writer: {name} needs {part['dtype']} {kind} of shape {part['shape']}")
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._pad_to(part["offset"])
        self._file.write(raw)
        return {**part, "checksum": xxhash.xxh3_128_hexdigest(raw)}

    def finish(self) -> dict[str, Any]:
        """Write the preamble and the header (with every checksum) into the reserved space; returns the header."""
        if self._current is not None or self._index != len(self.tensors):
            raise EngineError(f"engine writer: finished after {self._index} of {len(self.tensors)} tensors")
        header = full_header(self._base, self._done)
        body = encode_header(header)
        if PREAMBLE.size + len(body) > self.data_start:
            raise AssertionError("engine header grew after layout")  # fixed-width checksums: unreachable
        self._pad_to(self.total_bytes)
        self._file.seek(0)
        self._file.write(sealed_header(body, self.data_start))
        self._file.seek(0, os.SEEK_END)
        return header

    def _pad_to(self, offset: int) -> None:
        position = self._file.tell()
        if offset < position:
            raise AssertionError(f"engine writer moved backwards ({position} → {offset})")
        self._file.write(bytes(offset - position))


# ── reading ─────────────────────────────────────────────────────────────────────
@lru_cache(maxsize=1)
def header_schema() -> dict[str, Any]:
    """The JSON Schema of the header (schemas/engine-header.schema.json, shipped as package data)."""
    text = resources.files("olmoscope.schemas").joinpath("engine-header.schema.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator():
    """The schema's validator, with "integer" meaning a JSON integer: jsonschema would also take 4096.0."""
    import jsonschema

    schema = header_schema()
    base = jsonschema.validators.validator_for(schema)
    base.check_schema(schema)
    strict = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(base, type_checker=strict)(schema)


class EngineFile:
    """A memory-mapped engine file, validated before anything in it is trusted.

    >>> with EngineFile.open("olmo2-1b.engine") as engine:
    ...     engine.tensor("layers.0.qkv").shape
    (6144, 2048)
    """

    path: Path
    header: dict[str, Any]  # the validated JSON header
    config: ModelConfig  # from the header
    weight_dtype: str  # "bf16" | "fp16" | "fp32" | "int8" | "int4"
    quantization: Quantization | None  # the file's quantization choices, None for float formats
    tokenizer_json: str | None  # the embedded tokenizer.json text, None when the source had none
    generation: dict[str, Any]  # eos_token_ids, pad/bos_token_id, chat_template, tokenizer_vocab_size
    entries: list[EngineTensor]  # the tensor table, in storage order

    def __init__(self, path: Path, mapping: mmap.mmap, header: dict[str, Any], config: ModelConfig,
                 entries: list[EngineTensor]):
        self.path = path
        self._map = mapping
        self.header = header
        self.config = config
        self.weight_dtype = header["weight_dtype"]
        self.quantization = Quantization.from_json(header["quantization"])
        tokenizer = header["tokenizer"]
        self.tokenizer_json = tokenizer["json"] if tokenizer is not None else None
        self.generation = header["generation"]
        self.provenance = header["provenance"]
        self.entries = entries
        self._by_name = {t.name: t for t in entries}
        self._checked: set[str] = set()  # regions whose checksum checked_tensor/checked_scales have matched

    # ── opening ──────────────────────────────────────────────────────────────
    @classmethod
    def open(cls, path: str | Path) -> EngineFile:
        """Map and validate an engine file; every problem is an EngineError naming the file."""
        path = Path(path)
        fd, info = open_regular(path, str(path), EngineError)
        try:
            head = os.pread(fd, PREAMBLE.size, 0)
            _check_preamble(path, head, info.st_size)
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise EngineError(f"{path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)  # the map keeps its own reference
        try:
            header, config, entries = _validate(path, mapping, info.st_size)
        except BaseException:
            mapping.close()
            raise
        return cls(path, mapping, header, config, entries)

    # ── tensors ──────────────────────────────────────────────────────────────
    def entry(self, name: str) -> EngineTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise EngineError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of a tensor as stored (bf16 via ml_dtypes, int8 as int8, int4 as its
        packed uint8 [N, K/2] bytes)."""
        t = self.entry(name)
        return self._view(t.offset, DTYPES[t.dtype], t.data_shape)

    def scales(self, name: str) -> np.ndarray:
        """A quantized matrix's scales: float32 [rows] for int8, float16 [rows, K/G] for int4."""
        return self._part_view(name, "scales")

    def zeros(self, name: str) -> np.ndarray | None:
        """An asymmetric int4 matrix's zero points, uint8 [rows, K/G]; None when it has none (zero 8)."""
        if self._part(name, "scales") is not None and self._part(name, "zeros") is None:
            return None
        return self._part_view(name, "zeros")

    def checked_tensor(self, name: str) -> np.ndarray:
        """tensor(name), its checksum recomputed the first time it is asked for: a mismatch is an EngineError."""
        t = self.entry(name)
        self._check_region(t.offset, t.nbytes, t.checksum, name)
        return self.tensor(name)

    def checked_scales(self, name: str) -> np.ndarray:
        """scales(name), checked like checked_tensor."""
        return self._checked_part(name, "scales")

    def checked_zeros(self, name: str) -> np.ndarray | None:
        """zeros(name), checked like checked_tensor."""
        return self.zeros(name) if self._part(name, "zeros") is None else self._checked_part(name, "zeros")

    def _part(self, name: str, kind: str) -> dict[str, Any] | None:
        t = self.entry(name)
        if t.quantization is None:
            raise EngineError(f"{self.path}: {name} is {t.dtype}, not quantized; it has no {kind}")
        return t.part(kind)

    def _part_view(self, name: str, kind: str) -> np.ndarray:
        part = self._part(name, kind)
        if part is None:
            raise EngineError(f"{self.path}: {name} is symmetric; it has no {kind}")
        return self._view(part["offset"], DTYPES[part["dtype"]], tuple(part["shape"]))

    def _checked_part(self, name: str, kind: str) -> np.ndarray:
        view = self._part_view(name, kind)
        part = self._part(name, kind)
        self._check_region(part["offset"], part["size"], part["checksum"], f"{name}.{kind}")
        return view

    def _check_region(self, offset: int, size: int, checksum: str, label: str) -> None:
        if label in self._checked:
            return
        with self._whole() as whole:
            digest = _xxh3(whole, offset, size)
        if digest != checksum:
            raise EngineError(
                f"{self.path}: tensor {label} fails its checksum, so the file is corrupt "
                f"(`olmoscope verify {self.path}` checks every tensor; --no-verify skips this check)"
            )
        self._checked.add(label)

    def _view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if self._map is None:
            raise EngineError(f"{self.path}: engine file is closed")
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def _whole(self) -> memoryview:
        if self._map is None:
            raise EngineError(f"{self.path}: engine file is closed")
        return memoryview(self._map)

    def verify(self, progress: bool = False) -> list[str]:
        """Recompute every xxh3-128 checksum and check the padding between tensors is zeros.

        Returns the names of what fails: tensors, "NAME.scales" / "NAME.zeros", "padding after NAME".
        """
        from tqdm import tqdm

        expected = {label: digest for t in self.entries for label, digest in t.checksums().items()}
        regions = [r for t in self.entries for r in t.regions()]
        bad = []
        with self._whole() as whole, tqdm(
            total=sum(size for _, size, _ in regions), unit="B", unit_scale=True, desc="verify",
            disable=not progress, leave=False,
        ) as bar:
            for (offset, size, label), following in zip(regions, regions[1:] + [None]):
                if _xxh3(whole, offset, size, bar.update) != expected[label]:
                    bad.append(label)
                end = following[0] if following is not None else offset + size
                gap = bytes(whole[offset + size:end])  # alignment padding: at most 4095 bytes
                if gap.count(0) != len(gap):
                    bad.append(f"padding after {label}")
        return bad

    def close(self) -> None:
        """Unmap the file. Views still alive keep the mapping until they are garbage-collected."""
        mapping, self._map = self._map, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a caller still holds a view; the map is released with it

    def __enter__(self) -> EngineFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _xxh3(whole: memoryview, offset: int, size: int, on_bytes=None) -> str:
    """xxh3-128 hex of whole[offset:offset+size], in 64 MiB chunks (a progress bar can follow them)."""
    hasher = xxhash.xxh3_128()
    for start in range(offset, offset + size, 64 << 20):
        stop = min(start + (64 << 20), offset + size)
        hasher.update(whole[start:stop])
        if on_bytes is not None:
            on_bytes(stop - start)
    return hasher.hexdigest()


# ── validation: everything, before any offset or size is used ──────────────────
def not_an_engine(path: Path | str, head: bytes) -> str:
    """The one message for a file that is not an engine file, whichever command met it."""
    start = repr(head[:8]) if head else "nothing: the file is empty"
    return f"{path}: not an olmoscope engine file (it starts with {start}; an engine file starts with {MAGIC!r})"


def _check_preamble(path: Path, head: bytes, size: int) -> None:
    """Magic, then version, then that the preamble is whole: the version decides what the rest means."""
    if head[:len(MAGIC)] != MAGIC:
        raise EngineError(not_an_engine(path, head))
    if len(head) < 12:
        raise EngineError(f"{path}: {size} bytes is too short to be an engine file")
    (version,) = struct.unpack_from("<I", head, 8)
    if version > FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version} is newer than this olmoscope reads "
            f"(version {FORMAT_VERSION}); upgrade olmoscope or convert the model again"
        )
    if version == 0:
        raise EngineError(f"{path}: engine format version {version} is invalid")
    if version < FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version} is older than this olmoscope reads (version "
            f"{FORMAT_VERSION}, {VERSION_CHANGES[FORMAT_VERSION - 1]}); convert the model again with this olmoscope"
        )
    if size < PREAMBLE.size:
        raise EngineError(f"{path}: {size} bytes is too short to be an engine file")


def _validate(path: Path, mapping: mmap.mmap, size: int) -> tuple[dict, ModelConfig, list[EngineTensor]]:
    _, version, header_length, checksum = PREAMBLE.unpack_from(mapping, 0)
    if header_length > MAX_HEADER_BYTES or PREAMBLE.size + header_length > size:
        raise EngineError(
            f"{path}: header length {header_length:,} bytes does not fit the file ({size:,} bytes) "
            f"or the {MAX_HEADER_BYTES >> 20} MiB limit; the file is truncated or corrupt"
        )
    data_start = align(PREAMBLE.size + header_length)
    if data_start > size:
        raise EngineError(f"{path}: the file ends inside the header's padding; the file is truncated")
    with memoryview(mapping) as whole:
        if header_checksum(version, header_length, whole[PREAMBLE.size:data_start]) != checksum:
            raise EngineError(f"{path}: the header fails its checksum, so the file is corrupt (config, "
                              f"tokenizer, chat template or tensor table changed since convert wrote it)")
    header = parse_json(mapping[PREAMBLE.size:PREAMBLE.size + header_length], f"{path}: header", EngineError)
    if not isinstance(header, dict):
        raise EngineError(f"{path}: header is not a JSON object")
    config, entries = check_header(str(path), header)
    if header["format_version"] != version:
        raise EngineError(f"{path}: header says format version {header['format_version']}, preamble {version}")
    _check_regions(path, entries, data_start=data_start, size=size)
    return header, config, entries


def check_header(origin: str, header: dict[str, Any]) -> tuple[ModelConfig, list[EngineTensor]]:
    """Everything about a header that does not need the file: schema, config, tensor table, tokenizer digest.

    The reader runs it on every open and the writer on the header it plans, with the same limits.
    """
    _check_schema(origin, header)
    try:
        config = ModelConfig.from_dict(header["config"], origin=f"{origin}: header config")
    except ConfigError as exc:
        raise EngineError(str(exc)) from None
    entries = [EngineTensor.from_json(row) for row in header["tensors"]]
    quant = _check_quantization(origin, header["weight_dtype"], header["quantization"])
    _check_table(origin, config, header["weight_dtype"], quant, entries)
    _check_tokenizer(origin, header["tokenizer"])
    return config, entries


def _check_schema(origin: str, header: dict[str, Any]) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(header))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EngineError(f"{origin}: header fails the engine schema at {display_name(where)[:120]}: "
                          f"{display_name(error.message)[:200]}")


def _check_quantization(origin: str, weight_dtype: str, raw: dict[str, Any] | None) -> Quantization | None:
    """The header's quantization choices agree with its weight_dtype (the schema has checked their types)."""
    fmt = FORMATS[weight_dtype]
    quant = Quantization.from_json(raw)
    if (quant is None) == fmt.quantized or (quant is not None and quant.format != weight_dtype):
        raise EngineError(f"{origin}: header quantization {raw!r} does not fit weight_dtype {weight_dtype!r}")
    if quant is not None and fmt.group == "row" and quant != default_quantization(weight_dtype):
        raise EngineError(f"{origin}: int8 files are symmetric per row with lm_head quantized; the header "
                          f"says {quant.describe()}")
    if quant is not None and fmt.group == "group" and quant.group_size is None:
        raise EngineError(f"{origin}: an {weight_dtype} header needs a group size")
    return quant


def _placeless(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A tensor's quantization record without what placement and hashing fill in (offsets, checksums)."""
    if record is None:
        return None
    strip = lambda part: None if part is None else {k: v for k, v in part.items() if k not in ("offset", "checksum")}
    return {k: strip(v) if k in PARTS else v for k, v in record.items()}


def _check_table(path: str, config: ModelConfig, weight_dtype: str, quant: Quantization | None,
                 entries: list[EngineTensor]) -> None:
    """The table is exactly the tensors the config implies, in order, with the dtypes and quantization the
    header's weight_dtype and quantization imply."""
    expected = plan_tensors(config, weight_dtype, quant)
    if len(entries) != len(expected):
        raise EngineError(f"{path}: tensor table has {len(entries)} tensors; the config implies {len(expected)}")
    for got, want in zip(entries, expected):
        for what in ("name", "role", "layer", "shape", "dtype"):
            if getattr(got, what) != getattr(want, what):
                raise EngineError(
                    f"{path}: tensor {display_name(got.name)!r}: {what} {getattr(got, what)!r}, expected "
                    f"{getattr(want, what)!r} ({want.name})"
                )
        if got.nbytes != want.nbytes:
            raise EngineError(f"{path}: tensor {got.name}: size {got.nbytes:,} bytes ≠ shape × dtype = {want.nbytes:,}")
        if _placeless(got.quantization) != _placeless(want.quantization):
            raise EngineError(f"{path}: tensor {got.name}: quantization {_placeless(got.quantization)!r}, expected "
                              f"{_placeless(want.quantization)!r}")


def _check_regions(path: Path, entries: list[EngineTensor], data_start: int, size: int) -> None:
    """Every byte range is aligned, after the header, inside the file, overlaps no other, and lies where the
    writer puts it; the file ends with the last one (nothing hides after it)."""
    regions = sorted(r for t in entries for r in t.regions())
    previous_end, previous = data_start, "the header"
    for offset, length, label in regions:
        if offset % ALIGNMENT:
            raise EngineError(f"{path}: {label} at offset {offset:,} is not {ALIGNMENT}-byte aligned")
        if offset + length > size:
            raise EngineError(
                f"{path}: {label} spans bytes {offset:,}..{offset + length:,}, beyond the end of the file "
                f"({size:,} bytes); the file is truncated or corrupt"
            )
        if offset < previous_end:
            raise EngineError(f"{path}: {label} at offset {offset:,} overlaps {previous}")
        previous_end, previous = offset + length, label
    canonical = [r for t in assign_offsets(entries, data_start) for r in t.regions()]
    for (offset, _, label), (want, _, _) in zip([r for t in entries for r in t.regions()], canonical):
        if offset != want:
            raise EngineError(f"{path}: {label} at offset {offset:,}, not at {want:,} where the layout puts it")
    if previous_end != size:
        raise EngineError(f"{path}: {size - previous_end:,} bytes follow the last tensor ({previous}); "
                          f"an engine file ends with its last tensor")


def _check_tokenizer(path: str, tokenizer: dict[str, Any] | None) -> None:
    if tokenizer is None:
        return
    digest = hashlib.sha256(tokenizer["json"].encode("utf-8")).hexdigest()
    if digest != tokenizer["sha256"]:
        raise EngineError(f"{path}: the embedded tokenizer.json fails its sha256 (corrupt header)")


# ── engine files as sources and in reports ──────────────────────────────────────
def file_start(path: Path, length: int = 16) -> bytes:
    """The first bytes of a regular file (b"" when it cannot be read); never blocks on a FIFO."""
    try:
        fd, _ = open_regular(path, str(path), EngineError)
    except EngineError:
        return b""
    try:
        return os.pread(fd, length, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def looks_like_engine(path: Path) -> bool:
    """True when the file starts with the engine magic (cheap: reads 16 bytes)."""
    return file_start(path).startswith(MAGIC)


def source_from_engine(path: Path, label: str):
    """An engine file as a SOURCE: its header's config (the tensors stay in the file).

    >>> source_from_engine(Path("m.engine"), "m.engine").kind
    'engine'
    """
    from olmoscope.sources import Source

    with EngineFile.open(path) as engine:
        return Source("engine", label, engine.config, dict(engine.header["config"]), engine_path=Path(path))


@dataclass(frozen=True)
class EngineRow:
    """One stored byte range of an engine file (a tensor, or a matrix's scales or zeros), shaped like a
    checkpoint.TensorRow so that listings take either."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str  # the engine file's name: everything lives in one file
    offset: int  # absolute, a multiple of ALIGNMENT
    nbytes: int
    role: str
    layer: int | None
    layout: str
    checksum: str

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def engine_rows(engine: EngineFile) -> list[EngineRow]:
    """The engine's stored regions in file order: tensors, and a quantized matrix's scales ("NAME.scales")
    and zero points ("NAME.zeros") as rows of their own.

    >>> [r.name for r in engine_rows(engine)][:2]
    ['embedding', 'layers.0.qkv']
    """
    shard = engine.path.name
    rows = []
    for t in engine.entries:
        rows.append(EngineRow(t.name, t.dtype, t.shape, shard, t.offset, t.nbytes, t.role, t.layer, t.layout, t.checksum))
        for kind in PARTS:
            part = t.part(kind)
            if part is not None:
                layout = dict(by_stored(t.dtype).part_layouts)[kind].format(name=t.name,
                                                                            group=t.quantization["group_size"])
                rows.append(EngineRow(f"{t.name}.{kind}", part["dtype"], tuple(part["shape"]), shard, part["offset"],
                                      part["size"], f"{t.role} {kind}", t.layer, layout, part["checksum"]))
    return rows


def read_row(engine: EngineFile, name: str) -> np.ndarray:
    """The data of an engine_rows row: a tensor (int4: its values 0..15, unpacked), or a part ("NAME.scales")."""
    base, _, kind = name.rpartition(".")
    if kind in PARTS and name not in engine._by_name:
        return engine.scales(base) if kind == "scales" else engine.zeros(base)
    return by_stored(engine.entry(name).dtype).values(engine.tensor(name))


def region_shapes(tensors: list[EngineTensor]) -> dict[str, tuple[int, ...]]:
    """Every region's label and shape, as engine_rows names them."""
    out = {}
    for t in tensors:
        out[t.name] = t.shape
        for kind in PARTS:
            if t.part(kind) is not None:
                out[f"{t.name}.{kind}"] = tuple(t.part(kind)["shape"])
    return out


def check_engine_rows(rows, config: ModelConfig, weight_dtype: str = "bf16", quant: Quantization | None = None):
    """Engine rows against the regions the config, --dtype and quantization imply (fused shapes, scales, zeros).

    The reader has already refused any file where these differ; this gives `tensors --check` the same report.
    """
    from olmoscope.checkpoint import CheckResult

    found = {r.name: tuple(r.shape) for r in rows}
    implied = region_shapes(plan_tensors(config, weight_dtype, quant))
    missing = [n for n in implied if n not in found]
    unexpected = [n for n in found if n not in implied]
    wrong = [(n, implied[n], found[n]) for n in implied if n in found and found[n] != implied[n]]
    return CheckResult(missing, unexpected, wrong, expected=len(implied))


def tokenizer_vocab_size(tokenizer: dict[str, Any]) -> int | None:
    """max id + 1 over a tokenizer.json's model vocab and added tokens (ids beyond are embedding padding)."""
    if not isinstance(tokenizer, dict):
        return None
    ids: list[int] = []
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids.extend(v for v in vocab.values() if isinstance(v, int))
    elif isinstance(vocab, list):  # Unigram: a list of [piece, score]; ids are positions
        ids.append(len(vocab) - 1)
    added_tokens = tokenizer.get("added_tokens")
    for added in added_tokens if isinstance(added_tokens, list) else []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            ids.append(added["id"])
    return max(ids) + 1 if ids else None

