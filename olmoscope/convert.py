"""`olmoscope convert SOURCE -o FILE`: stream a safetensors checkpoint into one checksummed engine file.

Everything is checked before a byte is written (tensors against the config, output path, free space);
then tensors are read in row blocks, fused, cast or quantized, hashed and written one block at a time,
into a temporary file beside the output that is fsynced and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import click
import ml_dtypes
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from olmoscope import __version__
from olmoscope import engine_format as ef
from olmoscope import prequantized as pre
from olmoscope.atomic import OutputExists, atomic_output, output_path
from olmoscope.checkpoint import INDEX_NAME, Checkpoint, TensorEntry, check_against_config, numpy_dtype
from olmoscope.config import ModelConfig
from olmoscope.display import display_name, path_text, short_repr
from olmoscope.errors import CheckpointError, OlmoscopeError, SourceError, UsageError
from olmoscope.readers import decode_utf8, open_file, parse_json, read_capped, read_optional
from olmoscope.sources import Source, resolve
from olmoscope.spec import engine_tensors
from olmoscope.weight_formats import FORMATS, INT4_DEFAULT_GROUP, INT4_DEFAULT_SCHEME, INT4_GROUPS, INT4_SCHEMES

BLOCK_BYTES = 32 << 20  # source bytes per block: bounds memory whatever the tensor's size
SOURCE_DTYPES = ("F32", "BF16", "F16")  # what a checkpoint's floats may be stored in
MAX_TOKENIZER_BYTES = 64 << 20  # dolma2's tokenizer.json is 2.7 MB
MAX_SIDE_FILE_BYTES = 16 << 20  # generation_config.json, tokenizer_config.json, chat_template.jinja
LIST_LIMIT = 5  # names shown per kind when the checkpoint fails its check
# The range each narrowing target can hold; a finite source value beyond it would become ±inf.
RANGE_NAMES = {"F16": "float16", "BF16": "bfloat16"}


@dataclass
class ConvertReport:
    """What a conversion wrote, for the summary table."""

    output: Path
    weight_dtype: str
    tensors: int  # engine tensors (fused), not counting scales and zeros
    scale_vectors: int  # quantized files: one per quantized matrix
    zero_arrays: int  # asymmetric int4 files: one per quantized matrix
    bytes_by_dtype: dict[str, int]  # stored bytes per element type ("F32 scales", "U8 zeros" for quantized parts)
    file_bytes: int
    source_bytes: int  # checkpoint bytes read
    seconds: float
    notes: list[str] = field(default_factory=list)
    quantization: ef.Quantization | None = None  # the file's quantization choices

    def table(self) -> str:
        """The summary: tensors, bytes per dtype, time, throughput, output path."""
        gb = 1e9
        rows = [["output", str(self.output)], ["weight dtype", self.weight_dtype]]
        if self.quantization is not None:
            rows.append(["quantization", self.quantization.describe()])
        rows += [
                ["tensors", f"{self.tensors}" + self._parts()]]
        rows += [[f"{dtype} bytes", f"{n:,} ({n / gb:.3f} GB)"] for dtype, n in sorted(self.bytes_by_dtype.items())]
        rows += [
            ["file size", f"{self.file_bytes:,} ({self.file_bytes / gb:.3f} GB)"],
            ["time", f"{self.seconds:.2f} s"],
            ["throughput", f"read {_rate(self.source_bytes, self.seconds)}, written {_rate(self.file_bytes, self.seconds)}"],
        ]
        return tabulate(rows, tablefmt="plain")


    def _parts(self) -> str:
        if not self.scale_vectors:
            return ""
        zeros = f", {self.zero_arrays} zero-point arrays" if self.zero_arrays else ""
        return f" (+ {self.scale_vectors} scale arrays{zeros})"


def _rate(nbytes: int, seconds: float) -> str:
    per_second = nbytes / seconds
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f"{per_second / 1e6:.1f} MB/s"


# ── the conversion ──────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Int4Options:
    """convert's int4 options as given; None means "not given" (the default, or an import's own value)."""

    group_size: int | None = None
    scheme: str | None = None
    lm_head: bool = False  # --int4-lm-head


def convert(
    source: str | Source,
    output: str | Path,
    *,
    dtype: str = "bf16",
    int4: Int4Options = Int4Options(),
    force: bool = False,
    progress: bool = False,
) -> ConvertReport:
    """Convert a checkpoint to an engine file; all checks pass before anything is written.

    >>> convert("path/to/snapshot", "model.engine", dtype="int4", int4=Int4Options(group_size=64)).tensors
    29
    """
    started = time.perf_counter()
    if dtype not in FORMATS:
        raise UsageError(f"--dtype {dtype!r}: choose from {', '.join(FORMATS)}")
    src = resolve(source) if isinstance(source, str) else source
    checkpoint, imported = open_checkpoint(src)
    quant = choose_quantization(dtype, int4, imported, src.label)
    output = check_output(output, force)
    check_not_a_source_file(output, src, checkpoint)
    notes = list(src.notes)
    base = header_base(src, checkpoint, dtype, quant, notes)
    plan = ef.plan_tensors(src.config, dtype, quant)
    layout = ef.layout_file(base, plan)  # sizes are needed before writing; the writer takes this layout
    placed = layout[1]
    file_bytes = max(off + size for t in placed for off, size, _ in t.regions())
    check_free_space(output, file_bytes)

    try:
        with atomic_output(output, overwrite=force) as f:
            source_bytes = write_engine(f, base, plan, src.config, checkpoint, progress, layout, imported)
    except OutputExists:
        raise UsageError(f"-o {output}: a file appeared there while converting and was left alone "
                         f"(pass --force to replace it); nothing was written") from None
    except OSError as exc:
        raise OlmoscopeError(f"{output}: conversion stopped ({exc.strerror or exc}); nothing was written") from None
    by_dtype: dict[str, int] = {}
    for t in placed:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        for kind in ef.PARTS:
            part = t.part(kind)
            if part is not None:
                key = f"{part['dtype']} {kind}"
                by_dtype[key] = by_dtype.get(key, 0) + part["size"]
    return ConvertReport(
        output, dtype, len(placed), sum(t.part("scales") is not None for t in placed),
        sum(t.part("zeros") is not None for t in placed), by_dtype, file_bytes,
        source_bytes, max(time.perf_counter() - started, 1e-9), notes, quant,
    )


def choose_quantization(dtype: str, int4: Int4Options, imported: pre.Prequantized | None,
                        label: str) -> ef.Quantization | None:
    """The file's quantization: the --dtype's, the int4 options, or what an imported checkpoint holds."""
    given = int4 != Int4Options()
    if imported is not None:
        return _imported_quantization(dtype, int4, imported, label)
    if dtype != "int4":
        if given:
            raise UsageError("--group-size, --int4-scheme and --int4-lm-head apply to --dtype int4 only")
        return ef.default_quantization(dtype)
    return ef.Quantization("int4", int4.scheme or INT4_DEFAULT_SCHEME, int4.group_size or INT4_DEFAULT_GROUP,
                           int4.lm_head, "ours")


def _imported_quantization(dtype: str, int4: Int4Options, pq: pre.Prequantized, label: str) -> ef.Quantization:
    """A GPTQ/AWQ checkpoint converts to int4 as it is: options may restate its choices, never change them."""
    what = f"{label} is a {pq.method.upper()} int4 checkpoint (group {pq.group_size}, {pq.scheme})"
    if dtype != "int4":
        raise UsageError(f"{what}; convert it with --dtype int4 (imported exactly, nothing quantized again)")
    if int4.group_size not in (None, pq.group_size):
        raise UsageError(f"{what}; --group-size {int4.group_size} would quantize it again, which olmoscope does not do")
    if int4.scheme not in (None, pq.scheme):
        raise UsageError(f"{what}; --int4-scheme {int4.scheme} would quantize it again, which olmoscope does not do")
    if int4.lm_head and not pq.lm_head:
        raise UsageError(f"{what} whose lm_head is not quantized; --int4-lm-head would quantize it with olmoscope's "
                         f"own rules in an imported file, which olmoscope does not mix")
    return ef.Quantization("int4", pq.scheme, pq.group_size, pq.lm_head, pq.method)


def open_checkpoint(src: Source) -> tuple[Checkpoint, pre.Prequantized | None]:
    """The source's checkpoint (and, for GPTQ/AWQ, its checked quantization), refused unless every tensor
    the config implies is there, shaped right, in a type convert reads."""
    if src.kind == "engine":
        raise SourceError(f"{src.label}: is already an engine file; convert reads safetensors checkpoints")
    if src.directory is None:
        hint = f" (download it: hf download {src.repo_id}; then convert {src.repo_id})" if src.repo_id else ""
        raise SourceError(f"{src.label}: a {src.kind} has no tensors; convert needs a snapshot directory or a "
                          f"cached repo id{hint}")
    checkpoint = Checkpoint.open(src.directory)
    qc = pre.quantization_config(src.raw_config, src.label)
    if qc is not None:
        return checkpoint, _open_prequantized(src, checkpoint, qc)
    packed = next((e.name for e in checkpoint.entries if e.name.endswith(".qweight")), None)
    if packed is not None:
        raise CheckpointError(f"{src.directory}: holds packed quantized tensors ({packed}) but config.json has no "
                              f"quantization_config saying how they are packed; refused")
    result = check_against_config(checkpoint.entries, src.config)
    if not result.ok:
        raise CheckpointError(f"{src.directory}: the checkpoint does not match its config.json, so nothing was "
                              f"written: {_findings(result)}; every finding: olmoscope tensors {src.label} --check")
    for entry in checkpoint.entries:
        if entry.dtype not in SOURCE_DTYPES:
            raise CheckpointError(
                f"{src.directory}: tensor {entry.name} is {entry.dtype}; convert reads {', '.join(SOURCE_DTYPES)} checkpoints"
            )
    return checkpoint, None


def _open_prequantized(src: Source, checkpoint: Checkpoint, qc: dict[str, Any]) -> pre.Prequantized:
    """A GPTQ/AWQ checkpoint: its config checked, then every tensor the packing implies, by name, shape and type."""
    pq = pre.read_prequantized(qc, {e.name for e in checkpoint.entries}, src.label)
    result = pre.check_tensors(checkpoint.entries, src.config, pq, src.label)
    if not result.ok:
        raise CheckpointError(f"{src.directory}: the {pq.method} checkpoint does not hold the tensors its config "
                              f"implies, so nothing was written: {_findings(result)}")
    return pq


def _findings(result) -> str:
    def listed(kind: str, items: list[str]) -> str:
        more = f", … {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
        return f"{len(items)} {kind} ({', '.join(items[:LIST_LIMIT])}{more})"

    parts = []
    if result.missing:
        parts.append(listed("missing", result.missing))
    if result.unexpected:
        parts.append(listed("unexpected", result.unexpected))
    if result.wrong_shape:
        parts.append(listed("wrong shape", [f"{n} expected {list(e)} found {list(f)}" for n, e, f in result.wrong_shape]))
    return "; ".join(parts)


def check_output(output: str | Path, force: bool) -> Path:
    path = output_path(output, "-o")
    if not path.parent.is_dir():
        raise UsageError(f"-o {output}: directory {path.parent} does not exist")
    if os.path.lexists(path) and not force:
        raise UsageError(f"-o {output}: exists; pass --force to overwrite it")
    return path


def source_files(src: Source, checkpoint: Checkpoint) -> list[Path]:
    """Every file a conversion of `src` reads."""
    directory = checkpoint.directory
    side = [INDEX_NAME, "tokenizer.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"]
    files = [directory / shard for shard in checkpoint.shards] + [directory / name for name in side]
    return files + ([src.config_path] if src.config_path is not None else [])


def check_not_a_source_file(output: Path, src: Source, checkpoint: Checkpoint) -> None:
    """Refuse an output that is one of the files being read: --force would destroy the source."""
    try:
        target = os.stat(output)
    except OSError:
        return  # nothing there (yet): it cannot be a source file
    for path in source_files(src, checkpoint):
        try:
            info = os.stat(path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            raise UsageError(f"-o {output}: is the source's own {path.name}; refused (it would destroy the source)")


def check_free_space(output: Path, needed: int) -> None:
    """The whole file must fit beside the output (an existing output is replaced only at the end)."""
    free = shutil.disk_usage(output.parent).free
    if free < needed:
        raise OlmoscopeError(
            f"{output.parent}: {free / 1e9:.2f} GB free, the engine file needs {needed / 1e9:.2f} GB; nothing was written"
        )


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a container stopping) and SIGHUP (the terminal closed) unwind like Ctrl-C.

    The output has no name until it is complete (atomic.py), so nothing is left behind either way; this
    only makes the exit the usual one-line "interrupted" with status 130.
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def write_engine(f: BinaryIO, base: dict[str, Any], plan: list[ef.EngineTensor], config: ModelConfig,
                 checkpoint: Checkpoint, progress: bool, layout: tuple[int, list[ef.EngineTensor]] | None = None,
                 imported: pre.Prequantized | None = None) -> int:
    """Stream every engine tensor, block by block, through the writer; returns the source bytes read."""
    writer = ef.EngineWriter(f, base, plan, layout)
    specs = engine_tensors(config)
    read_bytes = 0
    with _Shards(checkpoint.directory) as shards, tqdm(
        total=sum(t.nbytes for t in writer.tensors), unit="B", unit_scale=True, desc="convert",
        disable=not progress, file=sys.stderr, leave=False,
    ) as bar:
        for count, (spec, target) in enumerate(zip(specs, writer.tensors), start=1):
            bar.set_postfix_str(f"tensor {count}/{len(specs)} {spec.name}", refresh=False)
            writer.begin(spec.name)
            scales, zeros = [], []
            for part in spec.sources:
                if imported is not None and pre.is_quantized(part.role, imported):
                    blocks = imported_blocks(checkpoint, imported, part)
                else:
                    blocks = encoded_blocks(shards, checkpoint.entry(part.name), target)
                for stored, block_scales, block_zeros, nbytes in blocks:
                    writer.write(stored)
                    scales += [] if block_scales is None else [block_scales]
                    zeros += [] if block_zeros is None else [block_zeros]
                    read_bytes += nbytes
                    bar.update(stored.nbytes)
            writer.end(np.concatenate(scales) if scales else None, np.concatenate(zeros) if zeros else None)
    writer.finish()
    return read_bytes


def encoded_blocks(shards: _Shards, entry: TensorEntry, target: ef.EngineTensor) -> Iterator[tuple]:
    """(stored block, its scales, its zeros, source bytes) for each row block of a float checkpoint tensor."""
    for block in shards.blocks(entry):
        yield *encode_block(block, target, entry.name), block.nbytes


def encode_block(block: np.ndarray, target: ef.EngineTensor, name: str) -> tuple[np.ndarray, np.ndarray | None,
                                                                                   np.ndarray | None]:
    """A block in the target's stored form, with its scales and zeros when the target is quantized.

    >>> encode_block(np.ones((2, 4), np.float32), bf16_target, "w")[0].dtype
    dtype(bfloat16)
    """
    quant = target.quantization
    if quant is None:
        return cast_block(block, ef.DTYPES[target.dtype], name), None, None
    return FORMATS[quant["format"]].encode(block, quant["group_size"], quant["scheme"] == "sym", name)


def imported_blocks(checkpoint: Checkpoint, pq: pre.Prequantized, part) -> Iterator[tuple]:
    """(packed int4 rows, their scales, their zeros or None, source bytes) of a GPTQ/AWQ matrix, exactly as stored."""
    from olmoscope.quantize import pack_nibbles

    rows, cols = part.shape
    step = max(pre.NIBBLES, BLOCK_BYTES // cols // pre.NIBBLES * pre.NIBBLES)  # rows of q per block: ~32 MiB
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        q, scales, zeros = pre.read_matrix_rows(checkpoint, pq, part.name, start, stop)
        yield pack_nibbles(q), scales, None if pq.symmetric else zeros, q.size // 2 + scales.nbytes + zeros.size // 2


class _Shards:
    """Open shard files, read in row blocks with readinto (no mmap: resident memory stays one block)."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._files: dict[str, BinaryIO] = {}

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()

    def blocks(self, entry: TensorEntry) -> Iterator[np.ndarray]:
        """[rows, cols] blocks of a matrix (a vector comes whole), each a fresh array in the source dtype."""
        f = self._files.get(entry.shard)
        if f is None:
            f = self._files[entry.shard] = open_file(self._directory / entry.shard, display_name(entry.shard),
                                                     CheckpointError)
        dtype = numpy_dtype(entry.dtype)
        rows = entry.shape[0] if len(entry.shape) == 2 else 1
        row_bytes = entry.nbytes // rows
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, rows, step):
            n = min(step, rows - start)
            raw = np.empty(n * row_bytes, np.uint8)
            f.seek(entry.offset + start * row_bytes)
            if f.readinto(raw) != raw.nbytes:
                raise CheckpointError(f"{entry.shard}: ends inside tensor {entry.name} (changed since it was opened?)")
            block = raw.view(dtype)
            yield block.reshape(n, -1) if len(entry.shape) == 2 else block


# ── element conversion ──────────────────────────────────────────────────────────
def cast_block(block: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Round to nearest even (ml_dtypes/numpy casts), NaN kept; a finite value that would become ±inf is an error."""
    if block.dtype == dtype:
        return block  # same type: the bytes are copied untouched
    with np.errstate(all="ignore"):  # NaN and overflow are handled below, not warned about
        out = block.astype(dtype)
        if dtype != np.float32 and _may_overflow(block, dtype):
            overflow = np.isinf(out) & np.isfinite(block)
            if overflow.any():
                raise OlmoscopeError(_range_error(block, overflow, dtype, name))
    return out


def _may_overflow(block: np.ndarray, dtype: np.dtype) -> bool:
    """False when every value is finite and below the target's max (two fast reductions, no temporaries)."""
    limit = float(ml_dtypes.finfo(dtype).max)
    low, high = float(block.min()), float(block.max())  # NaN or ±inf anywhere makes these non-finite
    return not (abs(low) < limit and abs(high) < limit)


def _range_error(block: np.ndarray, overflow: np.ndarray, dtype: np.dtype, name: str) -> str:
    index = np.unravel_index(int(np.argmax(overflow)), overflow.shape)
    value = float(block[index])
    limit = float(ml_dtypes.finfo(dtype).max)
    kind = RANGE_NAMES.get(next((k for k, v in ef.DTYPES.items() if v == dtype), ""), str(dtype))
    return (f"tensor {name}: value {value:.6g} is outside {kind}'s range (±{limit:.6g}); "
            f"convert with --dtype bf16 or fp32 instead; nothing was written")


# ── the header's metadata: tokenizer, generation defaults, provenance ──────────
def header_base(src: Source, checkpoint: Checkpoint, dtype: str, quant: ef.Quantization | None,
                notes: list[str]) -> dict[str, Any]:
    """Everything in the header but the tensor table."""
    directory = src.directory
    tokenizer, vocab = tokenizer_section(directory)
    return {
        "format": ef.FORMAT_NAME,
        "format_version": ef.FORMAT_VERSION,
        "weight_dtype": dtype,
        "quantization": None if quant is None else quant.to_json(),
        "alignment": ef.ALIGNMENT,
        "config": ef.config_to_header(src.config),
        "tokenizer": tokenizer,
        "generation": generation_section(directory, src, vocab, notes),
        "provenance": provenance(src, checkpoint),
    }


def _read_side_file(path: Path, limit: int) -> str | None:
    """A small text file of the snapshot, None when absent; an unreadable, absurd or non-regular one is an error."""
    shown = display_name(str(path))
    data = read_optional(path, limit, shown, SourceError)
    return None if data is None else decode_utf8(data, shown, SourceError)


def _read_side_json(path: Path, limit: int = MAX_SIDE_FILE_BYTES) -> Any:
    shown = display_name(str(path))
    data = read_optional(path, limit, shown, SourceError)
    return None if data is None else parse_json(data, shown, SourceError, nonfinite=True)


# Text the tokenizer must get through at convert time: letters, digits, accents, CJK, an emoji, specials.
TOKENIZER_PROBE = "Hello, world! 123 héllo wörld 日本語 🙂\n\t<|endoftext|> end"


def tokenizer_section(directory: Path) -> tuple[dict[str, Any] | None, int | None]:
    """({json, sha256} of tokenizer.json, its vocab size = max id + 1), or (None, None) when absent."""
    path = directory / "tokenizer.json"
    shown = display_name(str(path))
    data = read_optional(path, MAX_TOKENIZER_BYTES, shown, SourceError)
    if data is None:
        return None, None
    text = decode_utf8(data, shown, SourceError)
    vocab = ef.tokenizer_vocab_size(parse_json(data, shown, SourceError))
    if vocab is not None and vocab - 1 > ef.MAX_TOKEN_ID:
        raise SourceError(f"{shown}: token id {vocab - 1:,} is beyond the {ef.MAX_TOKEN_ID + 1:,} ids an engine "
                          f"file holds; refused")
    probe_tokenizer(text, shown)
    return {"json": text, "sha256": hashlib.sha256(data).hexdigest()}, vocab


def probe_tokenizer(text: str, shown: str) -> None:
    """Load the tokenizer as the runtime will, and run it over TOKENIZER_PROBE: a broken one is refused now.

    A Rust panic in the tokenizers library prints its own lines on stderr before Python sees it, so stderr
    is held for the probe and let through only when nothing failed.
    """
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    from olmoscope.runtime.tokenizer import guard_tokenizer

    def run() -> None:
        tokenizer = guard_tokenizer(lambda: Tokenizer.from_str(text), shown,
                                    "the tokenizers library cannot load it", SourceError)
        ids = guard_tokenizer(lambda: tokenizer.encode(TOKENIZER_PROBE).ids, shown, error=SourceError)
        guard_tokenizer(lambda: tokenizer.decode(ids, skip_special_tokens=False), shown, error=SourceError)
        stream = DecodeStream(skip_special_tokens=False)
        for i in ids:
            guard_tokenizer(lambda: stream.step(tokenizer, i), shown, error=SourceError)

    with held_stderr() as release:
        run()
        release()


@contextmanager
def held_stderr() -> Iterator[Callable[[], None]]:
    """fd 2 goes to a temporary file for the block; release() copies what it holds to the real stderr.

    For one-shot CLI work on the main thread only (fd 2 is the process's): libraries that write to fd 2
    themselves (Rust's panic hook) cannot otherwise be kept off the one line an error must be.
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)

        def release() -> None:
            held.seek(0)
            data = held.read()
            if data:
                os.write(saved, data)
            held.truncate(0)

        try:
            yield release
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generation_section(directory: Path, src: Source, tokenizer_vocab: int | None, notes: list[str]) -> dict[str, Any]:
    """EOS/pad/BOS (generation_config.json first, then config.json), the chat template and the tokenizer's vocab size."""
    generation = _read_side_json(directory / "generation_config.json") or {}
    if not isinstance(generation, dict):
        raise SourceError(f"{directory / 'generation_config.json'}: expected a JSON object")
    config = src.config

    def token_ids(key: str, fallback: int | None) -> list[int]:
        value = generation.get(key, fallback)
        values = value if isinstance(value, list) else [] if value is None else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= ef.MAX_TOKEN_ID:
                raise SourceError(f"{display_name(str(directory / 'generation_config.json'))}: {key} {short_repr(value)} "
                                  f"is not a token id (0 to {ef.MAX_TOKEN_ID:,})")
        for v in values:
            if v >= config.vocab_size:
                notes.append(f"{key} {v} is beyond the {config.vocab_size} embedding rows; it can never be generated")
        return values

    eos = list(dict.fromkeys(token_ids("eos_token_id", config.eos_token_id)))
    if len(eos) > ef.MAX_EOS_IDS:
        raise SourceError(f"{display_name(str(directory / 'generation_config.json'))}: eos_token_id lists {len(eos)} "
                          f"ids; an engine file holds at most {ef.MAX_EOS_IDS}")
    pad = token_ids("pad_token_id", config.pad_token_id)
    bos = token_ids("bos_token_id", config.bos_token_id)
    return {
        "eos_token_ids": eos,
        "pad_token_id": pad[0] if pad else None,
        "bos_token_id": bos[0] if bos else None,
        "chat_template": chat_template(directory, notes),
        "tokenizer_vocab_size": tokenizer_vocab,
    }


def chat_template(directory: Path, notes: list[str] | None = None) -> str | None:
    """chat_template.jinja (transformers ≥ 4.47 saves it alone) or tokenizer_config.json's chat_template.

    A template that does not compile is kept (base models never use theirs) with a note: `generate --chat`
    will say why it fails.
    """
    template = _read_side_file(directory / "chat_template.jinja", MAX_SIDE_FILE_BYTES)
    if template is None:
        config = _read_side_json(directory / "tokenizer_config.json")
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t["name"]: t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)}  # a list as a name is no name
            template = named.get("default")
    if not isinstance(template, str):
        return None
    from olmoscope.chat_template import TemplateError, compile_template

    try:
        compile_template(template)
    except TemplateError as exc:
        if notes is not None:
            notes.append(f"{exc} (kept; generate --chat will fail with this file)")
    return template


def provenance(src: Source, checkpoint: Checkpoint) -> dict[str, Any]:
    directory = src.directory.resolve()
    index = directory / INDEX_NAME
    commit = directory.name if directory.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return {
        "source": path_text(src.label),  # the header is UTF-8: bytes that are not become \xNN escapes
        "source_kind": src.kind,
        "source_path": path_text(directory),
        "repo_id": src.repo_id,
        "revision": src.revision,
        "commit": commit,
        "config_sha256": _sha256(src.config_path),
        "index_sha256": _sha256(index) if os.path.lexists(index) else None,
        "source_dtypes": sorted({e.dtype for e in checkpoint.entries}),
        "olmoscope_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(read_capped(path, MAX_SIDE_FILE_BYTES, display_name(str(path)), SourceError)).hexdigest()


# ── the command ─────────────────────────────────────────────────────────────────
@click.command("convert", help="Repack the checkpoint of SOURCE into one engine file (fused, cast, checksummed) "
               "that `generate` runs from.\n\nSOURCE is a snapshot directory, a config.json beside its shards, "
               "or a Hugging Face repo id (org/name[@revision]) found in the local cache.")
@click.argument("source")
@click.option("-o", "--output", required=True, metavar="FILE", help="The engine file to write.")
@click.option("--dtype", type=click.Choice(list(FORMATS)), default="bf16", show_default=True,
              help="Matrix dtype: bf16/fp16/fp32 (round to nearest even); int8 (per-row symmetric, lm_head "
                   "included); int4 (per-group, see below; lm_head bf16 unless --int4-lm-head). The embedding "
                   "stays bf16 in int8/int4 files; norms are always fp32. A GPTQ or AWQ int4 checkpoint needs "
                   "--dtype int4 and is imported exactly as stored, nothing quantized again.")
@click.option("--group-size", type=click.Choice([str(g) for g in INT4_GROUPS]), default=None,
              help=f"int4: inputs of a row that share one fp16 scale [default: {INT4_DEFAULT_GROUP}, or the "
                   f"imported checkpoint's]. Every matrix's input width must be a multiple of it.")
@click.option("--int4-scheme", type=click.Choice(list(INT4_SCHEMES)), default=None,
              help=f"int4: asym (a 4-bit zero point per group: the group's own min..max, finer steps for "
                   f"groups not centred on 0; 1 byte per group more) or sym (zero 8, steps of 2·max|w|/15) "
                   f"[default: {INT4_DEFAULT_SCHEME}, or the imported checkpoint's].")
@click.option("--int4-lm-head", is_flag=True,
              help="int4: quantize lm_head too (by default it stays bf16, as in GPTQ and AWQ releases: its "
                   "output is the logits themselves, with no later layer to average its rounding away).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def convert_command(source: str, output: str, dtype: str, group_size: str | None, int4_scheme: str | None,
                    int4_lm_head: bool, force: bool) -> None:
    int4 = Int4Options(int(group_size) if group_size else None, int4_scheme, int4_lm_head)
    with terminate_as_interrupt():
        report = convert(source, output, dtype=dtype, int4=int4, force=force, progress=sys.stderr.isatty())
    for note in report.notes:
        click.echo(f"olmoscope: note: {note}", err=True)
    click.echo(report.table())
