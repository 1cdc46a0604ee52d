"""`olmoscope tensors SOURCE`: list a checkpoint's tensors, total them, check them against the config.

A listing is built from rows that have name, dtype, shape, shard, offset, nbytes and elements
(checkpoint.TensorRow); `tensor_source` is the one place that turns a SOURCE into rows, so another kind
of source (an engine file) plugs in there without touching the reports.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import click
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from olmoscope.checkpoint import Checkpoint, CheckResult, TensorRow, check_against_config, display_name
from olmoscope import prequantized
from olmoscope.atomic import write_text_atomically
from olmoscope.config import ModelConfig
from olmoscope.errors import OlmoscopeError, SourceError, UsageError
from olmoscope.sources import SOURCE_HELP, Source, resolve

STATS_CHUNK_ELEMENTS = 1 << 22  # 4 Mi elements: 32 MiB of float64 at a time, whatever the tensor's size
TEXT_LIST_LIMIT = 20  # check findings shown per kind in the text report (--json has them all)


class CheckFailed(OlmoscopeError):
    """--check found missing, unexpected or wrongly shaped tensors."""


# ── rows from a SOURCE ─────────────────────────────────────────────────────────


@dataclass
class TensorSource:
    """The tensors of a resolved SOURCE, and how to read one's data (for --stats)."""

    source: Source
    rows: list[TensorRow]  # natural order
    read: Callable[[str], np.ndarray]  # name → read-only array in the tensor's shape
    location: str  # where the rows came from, for headings
    check: Callable[[Sequence[TensorRow], ModelConfig], CheckResult] = check_against_config  # rows vs config


def tensor_source(source: Source) -> TensorSource:
    """Rows for a resolved SOURCE; a preset has a config but no tensors, so it is refused.

    >>> tensor_source(resolve("path/to/snapshot")).rows[0].name
    'model.embed_tokens.weight'
    """
    if source.kind == "preset":
        raise SourceError(
            f"{source.label}: a preset is a config without tensors; point tensors at a snapshot directory "
            f"or a cached repo id (e.g. {source.repo_id})"
        )
    if source.kind == "engine":
        return _engine_tensor_source(source)
    if source.directory is None:
        raise SourceError(f"{source.label}: no tensors to list")
    checkpoint = Checkpoint.open(source.directory)
    rows = list(checkpoint.entries)
    qc = prequantized.quantization_config(source.raw_config, source.label)
    if qc is None:
        return TensorSource(source, rows, checkpoint.read, str(source.directory))

    def check(found, config):  # a GPTQ/AWQ checkpoint is checked against its packing (listing needs no support)
        pq = prequantized.read_prequantized(qc, {r.name for r in found}, source.label)
        return prequantized.check_tensors(found, config, pq, source.label)

    return TensorSource(source, rows, checkpoint.read, str(source.directory), check)


def _engine_tensor_source(source: Source) -> TensorSource:
    """An engine file's rows: fused tensors in file order, a quantized matrix's scales and zeros as rows of their own."""
    from olmoscope import engine_format

    engine = engine_format.EngineFile.open(source.engine_path)  # stays mapped while the rows are in use
    return TensorSource(source, engine_format.engine_rows(engine), lambda name: engine_format.read_row(engine, name),
                        str(source.engine_path),
                        lambda rows, config: engine_format.check_engine_rows(rows, config, engine.weight_dtype,
                                                                             engine.quantization))


# ── statistics ─────────────────────────────────────────────────────────────────


@dataclass
class TensorStats:
    """Streaming statistics over the finite values of one or more tensors (float64 accumulation).

    Chunks merge with Chan et al.'s pairwise update, so the std stays accurate when |mean| ≫ std.
    """

    finite: int = 0  # finite values seen
    nan: int = 0
    inf: int = 0  # +inf and -inf
    mean: float = 0.0
    m2: float = 0.0  # Σ (x - mean)² over finite values
    min: float = math.inf
    max: float = -math.inf

    @property
    def std(self) -> float | None:
        """Population standard deviation (ddof 0), like numpy's default."""
        return math.sqrt(self.m2 / self.finite) if self.finite else None

    @property
    def abs_max(self) -> float | None:
        return max(abs(self.min), abs(self.max)) if self.finite else None

    def merge(self, other: TensorStats) -> None:
        n = self.finite + other.finite
        if other.finite:
            delta = other.mean - self.mean
            self.mean += delta * other.finite / n
            self.m2 += other.m2 + delta * delta * self.finite * other.finite / n
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.finite, self.nan, self.inf = n, self.nan + other.nan, self.inf + other.inf

    @classmethod
    def of_chunk(cls, values: np.ndarray) -> TensorStats:
        """Statistics of one float64 chunk, shape (n,)."""
        nan = int(np.isnan(values).sum())
        finite_mask = np.isfinite(values)
        finite = values[finite_mask] if not finite_mask.all() else values
        inf = values.size - finite.size - nan
        if finite.size == 0:
            return cls(nan=nan, inf=inf)
        mean = float(finite.mean())
        m2 = float(np.square(finite - mean).sum())
        return cls(finite.size, nan, inf, mean, m2, float(finite.min()), float(finite.max()))

    def to_dict(self) -> dict[str, Any]:
        present = self.finite > 0
        return {
            "min": _finite_or_none(self.min) if present else None,
            "max": _finite_or_none(self.max) if present else None,
            "mean": _finite_or_none(self.mean) if present else None,
            "std": _finite_or_none(self.std),
            "abs_max": _finite_or_none(self.abs_max),
            "nan": self.nan,
            "inf": self.inf,
        }


def tensor_stats(array: np.ndarray, on_bytes: Callable[[int], None] | None = None) -> TensorStats:
    """Statistics of a (memory-mapped) array, read in chunks so memory stays bounded.

    >>> tensor_stats(np.array([1.0, 3.0, np.nan])).to_dict()["mean"]
    2.0
    """
    flat = array.reshape(-1)  # a contiguous mmap view: no copy
    stats = TensorStats()
    with np.errstate(all="ignore"):  # huge F64 values may overflow the sums; reported as null
        for start in range(0, flat.size, STATS_CHUNK_ELEMENTS):
            part = flat[start : start + STATS_CHUNK_ELEMENTS]
            stats.merge(TensorStats.of_chunk(part.astype(np.float64)))  # bf16/fp8 widen via ml_dtypes
            if on_bytes:
                on_bytes(part.nbytes)
    return stats


def compute_stats(rows: Sequence[TensorRow], read: Callable[[str], np.ndarray]) -> dict[str, TensorStats]:
    """Statistics per tensor, with a progress bar over bytes on stderr when it is a terminal."""
    total = sum(r.nbytes for r in rows)
    with tqdm(total=total, unit="B", unit_scale=True, desc="stats", file=sys.stderr,
              disable=not sys.stderr.isatty(), leave=False) as bar:
        return {r.name: tensor_stats(read(r.name), bar.update) for r in rows}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ── grouping (--group) ─────────────────────────────────────────────────────────

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass
class TensorGroup:
    """Tensors that differ only in their layer index, with the same shape and dtype."""

    pattern: str  # the name with the layer index folded: model.layers.{0-15}.mlp.up_proj.weight
    dtype: str
    shape: tuple[int, ...]  # of each tensor
    layers: list[int] = field(default_factory=list)  # empty for model-level tensors
    names: list[str] = field(default_factory=list)
    elements: int = 0  # total
    nbytes: int = 0  # total

    @property
    def count(self) -> int:
        return len(self.names)


def group_rows(rows: Iterable[TensorRow]) -> list[TensorGroup]:
    """Fold the layer index: one group per (name with the index removed, dtype, shape), in first-seen order.

    >>> group_rows(checkpoint.entries)[1].pattern
    'model.layers.{0-15}.self_attn.q_proj.weight'
    """
    groups: dict[tuple, TensorGroup] = {}
    for r in rows:
        m = _LAYER.search(r.name)
        template = r.name[: m.start(2)] + "{}" + r.name[m.end(2) :] if m else r.name
        key = (template, r.dtype, tuple(r.shape), m is not None)
        group = groups.setdefault(key, TensorGroup(template, r.dtype, tuple(r.shape)))
        if m:
            group.layers.append(int(m[2]))
        group.names.append(r.name)
        group.elements += r.elements
        group.nbytes += r.nbytes
    for g in groups.values():
        if g.layers:
            g.pattern = g.pattern.replace("{}", "{" + layer_ranges(g.layers) + "}", 1)
    return list(groups.values())


def layer_ranges(layers: Iterable[int]) -> str:
    """Compact layer list: [0, 1, 2, 5, 7, 8] → '0-2,5,7-8'."""
    ordered = sorted(set(layers))
    spans: list[str] = []
    start = prev = ordered[0]
    for n in ordered[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(f"{start}-{prev}" if prev != start else f"{start}")
        if n is not None:
            start = prev = n
    return ",".join(spans)


# ── the report ─────────────────────────────────────────────────────────────────


def totals(rows: Iterable[TensorRow]) -> dict[str, Any]:
    """Tensors, elements and bytes per dtype, per shard and overall."""
    by_dtype: dict[str, dict[str, int]] = {}
    by_shard: dict[str, dict[str, int]] = {}
    overall = {"tensors": 0, "elements": 0, "bytes": 0}
    for r in rows:
        for bucket in (by_dtype.setdefault(r.dtype, _zero()), by_shard.setdefault(r.shard, _zero()), overall):
            bucket["tensors"] += 1
            bucket["elements"] += r.elements
            bucket["bytes"] += r.nbytes
    return {
        **overall,
        "by_dtype": [{"dtype": k, **v} for k, v in sorted(by_dtype.items())],
        "by_shard": [{"shard": k, **v} for k, v in sorted(by_shard.items())],
    }


def _zero() -> dict[str, int]:
    return {"tensors": 0, "elements": 0, "bytes": 0}


def filter_rows(rows: Sequence[TensorRow], pattern: str | None) -> list[TensorRow]:
    """Rows whose name matches the regular expression (re.search); all rows when pattern is None."""
    if pattern is None:
        return list(rows)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--filter: bad regular expression {pattern!r}: {exc}") from None
    return [r for r in rows if regex.search(r.name)]


def report_dict(
    tensors: TensorSource,
    shown: Sequence[TensorRow],
    check: CheckResult,
    pattern: str | None,
    stats: dict[str, TensorStats] | None,
    groups: list[TensorGroup] | None,
) -> dict[str, Any]:
    """The whole report as plain data (schemas/tensors-report.schema.json); names exactly as stored."""
    report: dict[str, Any] = {
        "source": tensors.source.label,
        "kind": tensors.source.kind,
        "location": tensors.location,
        "filter": pattern,
        "tensors": [_row_dict(r, stats) for r in shown],
        "totals": totals(shown),
        "check": {
            "ok": check.ok,
            "expected": check.expected,
            "missing": check.missing,
            "unexpected": check.unexpected,
            "wrong_shape": [{"name": n, "expected": list(e), "found": list(f)} for n, e, f in check.wrong_shape],
        },
    }
    if groups is not None:
        report["groups"] = [_group_dict(g, stats) for g in groups]
    return report


def _row_dict(r: TensorRow, stats: dict[str, TensorStats] | None) -> dict[str, Any]:
    row = {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "elements": r.elements,
           "bytes": r.nbytes, "shard": r.shard, "offset": r.offset}
    row.update({column: getattr(r, column) for column in ENGINE_COLUMNS if hasattr(r, column)})
    if stats is not None:
        row["stats"] = stats[r.name].to_dict()
    return row


def _group_dict(g: TensorGroup, stats: dict[str, TensorStats] | None) -> dict[str, Any]:
    out = {"pattern": g.pattern, "count": g.count, "layers": g.layers, "shape": list(g.shape),
           "dtype": g.dtype, "elements": g.elements, "bytes": g.nbytes}
    if stats is not None:
        out["stats"] = _group_stats(g, stats).to_dict()
    return out


def _group_stats(g: TensorGroup, stats: dict[str, TensorStats]) -> TensorStats:
    merged = TensorStats()
    for name in g.names:
        merged.merge(stats[name])
    return merged


# ── text, CSV ──────────────────────────────────────────────────────────────────

ENGINE_COLUMNS = ("role", "layout")  # what engine rows add: what each stored tensor is for, how its bytes lie
STATS_COLUMNS = ("min", "max", "mean", "std", "abs_max", "nan", "inf")


def human_bytes(n: int) -> str:
    """Binary units: 1536 → '1.50 KiB'."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _stat_cells(s: TensorStats) -> list[Any]:
    d = s.to_dict()
    return [("" if d[k] is None else f"{d[k]:.6g}") for k in STATS_COLUMNS[:5]] + [d["nan"], d["inf"]]


def table_rows(shown: Sequence[TensorRow], stats: dict[str, TensorStats] | None) -> tuple[list[str], list[list]]:
    """(headers, rows) of the per-tensor listing; names escaped for printing."""
    headers = ["name", "shape", "dtype", "elements", "bytes", "shard", "offset"]
    body = [
        [display_name(r.name), _shape_text(r.shape), r.dtype, r.elements, r.nbytes, display_name(r.shard), r.offset]
        for r in shown
    ]
    if shown and all(hasattr(r, column) for r in shown for column in ENGINE_COLUMNS):
        headers += list(ENGINE_COLUMNS)
        for cells, r in zip(body, shown):
            cells += [getattr(r, column) for column in ENGINE_COLUMNS]
    if stats is not None:
        headers += list(STATS_COLUMNS)
        for cells, r in zip(body, shown):
            cells += _stat_cells(stats[r.name])
    return headers, body


def group_table_rows(
    groups: Sequence[TensorGroup], stats: dict[str, TensorStats] | None, plain: bool = False
) -> tuple[list[str], list[list]]:
    """(headers, rows) of the --group view: shape and dtype per tensor, elements and bytes in total.

    plain: the count as a bare integer (for CSV) rather than "×16".
    """
    headers = ["tensor", "count", "shape", "dtype", "elements", "bytes"]
    body = [
        [display_name(g.pattern), g.count if plain else f"×{g.count}", _shape_text(g.shape), g.dtype, g.elements,
         g.nbytes]
        for g in groups
    ]
    if stats is not None:
        headers += list(STATS_COLUMNS)
        for cells, g in zip(body, groups):
            cells += _stat_cells(_group_stats(g, stats))
    return headers, body


def csv_text(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(body)
    return buffer.getvalue()


def text_report(report: dict[str, Any], headers: list[str], body: list[list]) -> str:
    """The listing, the totals and the check as text tables."""
    out = [f"Tensors of {report['source']}"]
    if report["location"] != report["source"]:
        out[0] += f" ({display_name(report['location'])})"
    if report["filter"] is not None:
        out[0] += f", matching --filter {report['filter']!r}"
    out += ["", tabulate(body, headers, intfmt=",") if body else "(no tensors)", ""]
    t = report["totals"]
    scope = "Totals" if report["filter"] is None else "Totals of the tensors shown"
    for key in ("dtype", "shard"):
        out += [f"{scope} by {key}", _totals_table(t[f"by_{key}"], key), ""]
    size = f"{t['bytes']:,} bytes ({human_bytes(t['bytes'])})"
    out += [f"{scope}: {t['tensors']:,} tensors, {t['elements']:,} elements, {size}", ""]
    out += check_lines(report["check"])
    return "\n".join(out)


def _totals_table(buckets: list[dict[str, Any]], key: str) -> str:
    rows = [[display_name(b[key]), b["tensors"], b["elements"], b["bytes"], human_bytes(b["bytes"])] for b in buckets]
    return tabulate(rows, [key, "tensors", "elements", "bytes", "size"], intfmt=",")


def check_lines(check: dict[str, Any]) -> list[str]:
    """The check against the config as text: one heading line, then up to TEXT_LIST_LIMIT findings per kind."""
    head = f"Check against config ({check['expected']:,} tensors implied): "
    if check["ok"]:
        return [head + "ok"]
    lines = [head + _check_counts(check)]
    findings = [
        ("missing", [display_name(n) for n in check["missing"]]),
        ("unexpected", [display_name(n) for n in check["unexpected"]]),
        ("wrong shape", [
            f"{display_name(w['name'])}: expected {_shape_text(w['expected'])}, found {_shape_text(w['found'])}"
            for w in check["wrong_shape"]
        ]),
    ]
    for kind, items in findings:
        lines += [f"  {kind:<11} {item}" for item in items[:TEXT_LIST_LIMIT]]
        if len(items) > TEXT_LIST_LIMIT:
            lines.append(f"  {kind:<11} … and {len(items) - TEXT_LIST_LIMIT} more (see --json)")
    return lines


def _check_counts(check: dict[str, Any]) -> str:
    missing, unexpected, wrong = (len(check[k]) for k in ("missing", "unexpected", "wrong_shape"))
    return f"{missing} missing, {unexpected} unexpected, {wrong} wrong shape"


def summary_lines(source: Source | str) -> list[str]:
    """A short summary for other commands (e.g. `demo`): shards, tensors, bytes, dtypes, and the check.

    Reads headers only. Raises the same errors as `olmoscope tensors`.

    >>> summary_lines("path/to/snapshot")
    ['2 shards, 36 tensors, 127,712 elements, 510,848 bytes (498.88 KiB); dtypes: F32 ×36',
     'check against config: ok']
    """
    tensors = tensor_source(resolve(source) if isinstance(source, str) else source)
    t = totals(tensors.rows)
    check = tensors.check(tensors.rows, tensors.source.config)
    dtypes = ", ".join(f"{d['dtype']} ×{d['tensors']}" for d in t["by_dtype"])
    shards = len(t["by_shard"])
    first = (f"{shards} shard{'s' if shards != 1 else ''}, {t['tensors']:,} tensors, {t['elements']:,} elements, "
             f"{t['bytes']:,} bytes ({human_bytes(t['bytes'])}); dtypes: {dtypes}")
    second = "check against config: ok" if check.ok else "check against config: " + _check_counts(
        {"missing": check.missing, "unexpected": check.unexpected, "wrong_shape": check.wrong_shape})
    return [first, second]


# ── the command ────────────────────────────────────────────────────────────────


TENSORS_HELP = (
    "List the tensors of SOURCE from its safetensors headers (name, shape, dtype, elements, bytes, shard, "
    "offset), total them per dtype and per shard, and check them against the tensors its config implies.\n\n"
    + SOURCE_HELP
)


@click.command("tensors", help=TENSORS_HELP)
@click.argument("source")
@click.option("--check", "strict", is_flag=True,
              help="Exit with status 1 when a tensor is missing, unexpected or wrongly shaped.")
@click.option("--csv", "csv_path", metavar="FILE",
              help="Write the listing as CSV to FILE ('-': to stdout, instead of the text).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole report as JSON (schemas/tensors-report.schema.json).")
@click.option("--filter", "pattern", metavar="REGEX",
              help="Only tensors whose name matches REGEX; the totals follow, the check does not.")
@click.option("--group", is_flag=True,
              help="Fold the layer index: one row per kind, e.g. model.layers.{0-15}.mlp.up_proj.weight ×16.")
@click.option("--stats", is_flag=True,
              help="Read the data: min, max, mean, std, abs max over finite values; NaN and Inf counts.")
def tensors_command(
    source: str, strict: bool, csv_path: str | None, as_json: bool, pattern: str | None, group: bool, stats: bool
) -> None:
    if as_json and csv_path == "-":
        raise UsageError("--json and --csv - both write to stdout; give --csv a FILE")
    resolved = resolve(source)
    for note in resolved.notes:
        click.echo(f"olmoscope: note: {note}", err=True)
    tensors = tensor_source(resolved)
    shown = filter_rows(tensors.rows, pattern)
    check = tensors.check(tensors.rows, resolved.config)
    per_tensor = compute_stats(shown, tensors.read) if stats else None
    groups = group_rows(shown) if group else None
    report = report_dict(tensors, shown, check, pattern, per_tensor, groups)
    headers, body = group_table_rows(groups, per_tensor) if groups is not None else table_rows(shown, per_tensor)
    csv_table = csv_text(*group_table_rows(groups, per_tensor, plain=True)) if groups is not None else csv_text(
        headers, body)

    # Everything is computed before anything is written, so an error leaves no partial output.
    if csv_path is not None and csv_path != "-":
        write_text_atomically(csv_path, csv_table, "--csv")
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
    elif csv_path == "-":
        click.echo(csv_table, nl=False)
    else:
        click.echo(text_report(report, headers, body))
    if strict and not check.ok:
        raise CheckFailed(f"{source}: check against config failed: {_check_counts(report['check'])}")
