"""`olmoscope convert SOURCE -o FILE`: stream a safetensors checkpoint into one checksummed engine file.

Everything is checked before a byte is written (tensors against the config, output path, free space);
then tensors are read in row blocks, fused, cast or quantized, hashed and written one block at a time,
into a temporary file beside the output that is fsynced and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import click
import ml_dtypes
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from olmoscope import __version__
from olmoscope import engine_format as ef
from olmoscope.atomic import atomic_output
from olmoscope.checkpoint import INDEX_NAME, Checkpoint, TensorEntry, check_against_config, numpy_dtype
from olmoscope.config import ModelConfig
from olmoscope.errors import CheckpointError, OlmoscopeError, SourceError, UsageError
from olmoscope.sources import Source, resolve
from olmoscope.spec import engine_tensors

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
    tensors: int  # engine tensors (fused), not counting int8 scale vectors
    scale_vectors: int  # int8 files: one per quantized matrix
    bytes_by_dtype: dict[str, int]  # stored bytes per element type ("F32 scales" for int8 scales)
    file_bytes: int
    source_bytes: int  # checkpoint bytes read
    seconds: float
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The summary: tensors, bytes per dtype, time, throughput, output path."""
        gb = 1e9
        rows = [["output", str(self.output)], ["weight dtype", self.weight_dtype],
                ["tensors", f"{self.tensors}" + (f" (+ {self.scale_vectors} int8 scale vectors)" if self.scale_vectors else "")]]
        rows += [[f"{dtype} bytes", f"{n:,} ({n / gb:.3f} GB)"] for dtype, n in sorted(self.bytes_by_dtype.items())]
        rows += [
            ["file size", f"{self.file_bytes:,} ({self.file_bytes / gb:.3f} GB)"],
            ["time", f"{self.seconds:.2f} s"],
            ["throughput", f"read {_rate(self.source_bytes, self.seconds)}, written {_rate(self.file_bytes, self.seconds)}"],
        ]
        return tabulate(rows, tablefmt="plain")


def _rate(nbytes: int, seconds: float) -> str:
    per_second = nbytes / seconds
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f"{per_second / 1e6:.1f} MB/s"


# ── the conversion ──────────────────────────────────────────────────────────────
def convert(
    source: str | Source,
    output: str | Path,
    *,
    dtype: str = "bf16",
    force: bool = False,
    progress: bool = False,
) -> ConvertReport:
    """Convert a checkpoint to an engine file; all checks pass before anything is written.

    >>> convert("path/to/snapshot", "model.engine", dtype="bf16").tensors
    29
    """
    started = time.perf_counter()
    if dtype not in ef.WEIGHT_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose from {', '.join(ef.WEIGHT_DTYPES)}")
    src = resolve(source) if isinstance(source, str) else source
    checkpoint = open_checkpoint(src)
    output = check_output(Path(output), force)
    notes = list(src.notes)
    base = header_base(src, checkpoint, dtype, notes)
    plan = ef.plan_tensors(src.config, dtype)
    _, placed = ef.layout_file(base, plan)  # the writer lays out the same way; sizes are needed first
    file_bytes = max(off + size for t in placed for off, size, _ in t.regions())
    check_free_space(output, file_bytes)

    try:
        with atomic_output(output) as f:
            source_bytes = write_engine(f, base, plan, src.config, checkpoint, progress)
    except OSError as exc:
        raise OlmoscopeError(f"{output}: conversion stopped ({exc.strerror or exc}); nothing was written") from None
    by_dtype: dict[str, int] = {}
    for t in placed:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        if t.quantization is not None:
            by_dtype["F32 scales"] = by_dtype.get("F32 scales", 0) + t.quantization["scale_size"]
    return ConvertReport(
        output, dtype, len(placed), sum(t.quantization is not None for t in placed), by_dtype, file_bytes,
        source_bytes, max(time.perf_counter() - started, 1e-9), notes,
    )


def open_checkpoint(src: Source) -> Checkpoint:
    """The source's checkpoint, refused unless every tensor the config implies is there, shaped right, in a float type."""
    if src.kind == "engine":
        raise SourceError(f"{src.label}: is already an engine file; convert reads safetensors checkpoints")
    if src.directory is None:
        hint = f" (download it: hf download {src.repo_id}; then convert {src.repo_id})" if src.repo_id else ""
        raise SourceError(f"{src.label}: a {src.kind} has no tensors; convert needs a snapshot directory or a "
                          f"cached repo id{hint}")
    checkpoint = Checkpoint.open(src.directory)
    result = check_against_config(checkpoint.entries, src.config)
    if not result.ok:
        raise CheckpointError(f"{src.directory}: the checkpoint does not match its config.json, so nothing was "
                              f"written: {_findings(result)}; every finding: olmoscope tensors {src.label} --check")
    for entry in checkpoint.entries:
        if entry.dtype not in SOURCE_DTYPES:
            raise CheckpointError(
                f"{src.directory}: tensor {entry.name} is {entry.dtype}; convert reads {', '.join(SOURCE_DTYPES)} checkpoints"
            )
    return checkpoint


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


def check_output(output: Path, force: bool) -> Path:
    if output.is_dir():
        raise UsageError(f"-o {output}: is a directory; give a file name")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: directory {output.parent} does not exist")
    if output.exists() and not force:
        raise UsageError(f"-o {output}: exists; pass --force to overwrite it")
    return output


def check_free_space(output: Path, needed: int) -> None:
    """The whole file must fit beside the output (an existing output is replaced only at the end)."""
    free = shutil.disk_usage(output.parent).free
    if free < needed:
        raise OlmoscopeError(
            f"{output.parent}: {free / 1e9:.2f} GB free, the engine file needs {needed / 1e9:.2f} GB; nothing was written"
        )


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a container stopping) unwinds like Ctrl-C, so the temporary file is removed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_engine(f: BinaryIO, base: dict[str, Any], plan: list[ef.EngineTensor], config: ModelConfig,
                 checkpoint: Checkpoint, progress: bool) -> int:
    """Stream every engine tensor, block by block, through the writer; returns the source bytes read."""
    writer = ef.EngineWriter(f, base, plan)
    specs = engine_tensors(config)
    read_bytes = 0
    with _Shards(checkpoint.directory) as shards, tqdm(
        total=sum(t.nbytes for t in writer.tensors), unit="B", unit_scale=True, desc="convert",
        disable=not progress, file=sys.stderr, leave=False,
    ) as bar:
        for count, (spec, target) in enumerate(zip(specs, writer.tensors), start=1):
            bar.set_postfix_str(f"tensor {count}/{len(specs)} {spec.name}", refresh=False)
            writer.begin(spec.name)
            scales = []
            for part in spec.sources:
                entry = checkpoint.entry(part.name)
                for block in shards.blocks(entry):
                    stored, block_scales = encode_block(block, target.dtype, entry.name)
                    writer.write(stored)
                    if block_scales is not None:
                        scales.append(block_scales)
                    read_bytes += block.nbytes
                    bar.update(stored.nbytes)
            writer.end(np.concatenate(scales) if scales else None)
    writer.finish()
    return read_bytes


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
            f = self._files[entry.shard] = open(self._directory / entry.shard, "rb")
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
def encode_block(block: np.ndarray, target: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A block in the stored dtype, and its per-row scales when the target is int8.

    >>> encode_block(np.ones((2, 4), np.float32), "BF16", "w")[0].dtype
    dtype(bfloat16)
    """
    if target == "I8":
        return quantize_rows(block, name)
    return cast_block(block, ef.DTYPES[target], name), None


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


def quantize_rows(block: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: scale = max|w[r, :]| / 127, q = round(w / scale) — |w − q·scale| ≤ scale/2.

    >>> q, s = quantize_rows(np.array([[0.5, -1.0]], np.float32), "w"); q.tolist(), s.tolist()
    ([[64, -127]], [0.007874015718698502])
    """
    w = block.astype(np.float32, copy=False)  # [rows, cols]
    absmax = np.maximum(w.max(axis=1), -w.min(axis=1))  # [rows]; two reductions, no |w| temporary
    if not np.isfinite(absmax).all():  # a NaN or ±inf anywhere in a row makes its max non-finite
        raise OlmoscopeError(f"tensor {name}: holds NaN or Inf, which int8 cannot represent; "
                             f"convert with --dtype bf16 instead; nothing was written")
    scale = absmax / np.float32(127)  # [rows]
    safe = np.where(scale > 0, scale, np.float32(1))  # an all-zero row: q = 0, scale 0
    q = np.divide(w, safe[:, None])  # [rows, cols], |q| ≤ 127 up to float32 rounding
    np.rint(q, out=q)  # round half to even
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale.astype(np.float32)


# ── the header's metadata: tokenizer, generation defaults, provenance ──────────
def header_base(src: Source, checkpoint: Checkpoint, dtype: str, notes: list[str]) -> dict[str, Any]:
    """Everything in the header but the tensor table."""
    directory = src.directory
    tokenizer, vocab = tokenizer_section(directory)
    return {
        "format": ef.FORMAT_NAME,
        "format_version": ef.FORMAT_VERSION,
        "weight_dtype": dtype,
        "alignment": ef.ALIGNMENT,
        "config": ef.config_to_header(src.config),
        "tokenizer": tokenizer,
        "generation": generation_section(directory, src, vocab, notes),
        "provenance": provenance(src, checkpoint),
    }


def _read_side_file(path: Path, limit: int) -> str | None:
    """A small text file of the snapshot, None when absent; an unreadable or absurd one is an error."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        raise SourceError(f"{path}: larger than {limit:,} bytes; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8") from None


def _read_side_json(path: Path, limit: int = MAX_SIDE_FILE_BYTES) -> Any:
    text = _read_side_file(path, limit)
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path}: invalid JSON ({str(exc)[:120]})") from None


def tokenizer_section(directory: Path) -> tuple[dict[str, Any] | None, int | None]:
    """({json, sha256} of tokenizer.json, its vocab size = max id + 1), or (None, None) when absent."""
    path = directory / "tokenizer.json"
    text = _read_side_file(path, MAX_TOKENIZER_BYTES)
    if text is None:
        return None, None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)  # the runtime will load it this way: refuse a broken one now
    except Exception as exc:  # tokenizers raises a bare Exception subclass for every parse failure
        raise SourceError(f"{path}: the tokenizers library cannot load it ({str(exc)[:160]})") from None
    vocab = ef.tokenizer_vocab_size(json.loads(text))
    return {"json": text, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}, vocab


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
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 22:
                raise SourceError(f"{directory / 'generation_config.json'}: {key} {value!r} is not a token id")
        for v in values:
            if v >= config.vocab_size:
                notes.append(f"{key} {v} is beyond the {config.vocab_size} embedding rows; it can never be generated")
        return values

    eos = token_ids("eos_token_id", config.eos_token_id)
    pad = token_ids("pad_token_id", config.pad_token_id)
    bos = token_ids("bos_token_id", config.bos_token_id)
    return {
        "eos_token_ids": list(dict.fromkeys(eos)),
        "pad_token_id": pad[0] if pad else None,
        "bos_token_id": bos[0] if bos else None,
        "chat_template": chat_template(directory),
        "tokenizer_vocab_size": tokenizer_vocab,
    }


def chat_template(directory: Path) -> str | None:
    """chat_template.jinja (transformers ≥ 4.47 saves it alone) or tokenizer_config.json's chat_template."""
    jinja = _read_side_file(directory / "chat_template.jinja", MAX_SIDE_FILE_BYTES)
    if jinja is not None:
        return jinja
    config = _read_side_json(directory / "tokenizer_config.json")
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def provenance(src: Source, checkpoint: Checkpoint) -> dict[str, Any]:
    directory = src.directory.resolve()
    index = directory / INDEX_NAME
    commit = directory.name if directory.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return {
        "source": src.label,
        "source_kind": src.kind,
        "source_path": str(directory),
        "repo_id": src.repo_id,
        "revision": src.revision,
        "commit": commit,
        "config_sha256": _sha256(src.config_path),
        "index_sha256": _sha256(index) if index.is_file() else None,
        "source_dtypes": sorted({e.dtype for e in checkpoint.entries}),
        "olmoscope_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from None


# ── the command ─────────────────────────────────────────────────────────────────
@click.command("convert", help="Repack the checkpoint of SOURCE into one engine file (fused, cast, checksummed) "
               "that `generate` runs from.\n\nSOURCE is a snapshot directory, a config.json beside its shards, "
               "or a Hugging Face repo id (org/name[@revision]) found in the local cache.")
@click.argument("source")
@click.option("-o", "--output", required=True, metavar="FILE", help="The engine file to write.")
@click.option("--dtype", type=click.Choice(list(ef.WEIGHT_DTYPES)), default="bf16", show_default=True,
              help="Matrix dtype: bf16/fp16/fp32 (round to nearest even), or int8 (per-row symmetric; "
                   "embedding stays bf16). Norms are always fp32.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def convert_command(source: str, output: str, dtype: str, force: bool) -> None:
    with terminate_as_interrupt():
        report = convert(source, output, dtype=dtype, force=force, progress=sys.stderr.isatty())
    for note in report.notes:
        click.echo(f"olmoscope: note: {note}", err=True)
    click.echo(report.table())
