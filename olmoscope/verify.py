"""`olmoscope verify FILE [--against SOURCE]`: recompute every checksum, and compare with the source checkpoint.

Each engine tensor is compared with the checkpoint tensors it was made from, within the bound its
conversion promises: bit-exact for a copy or a widening cast, half an ulp (round to nearest even) for a
narrowing cast, half a scale step for int8 and int4 quantized by convert, and bit-exact integers, scales
and zero points for an int4 file imported from a GPTQ or AWQ checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import ml_dtypes
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from olmoscope import engine_format as ef
from olmoscope import prequantized as pre
from olmoscope.checkpoint import Checkpoint, check_against_config
from olmoscope.errors import EngineError, SourceError
from olmoscope.sources import Source, resolve
from olmoscope.spec import engine_tensors
from olmoscope.weight_formats import FORMATS, by_stored

BLOCK_ELEMENTS = 1 << 22  # compared at a time, in float64: 32 MiB per array
# A narrowing cast rounds to nearest even: |y − x| ≤ half an ulp ≤ 2^−p·|x| for p significand bits,
# plus half the smallest subnormal where x is tiny.
RELATIVE_BOUND = {"BF16": 2.0**-8, "F16": 2.0**-11}
# int8/int4: |w − dequantized| ≤ step/2, plus float32 rounding in w/step and q·step (≤ 127·2^−24 steps).
QUANTIZED_BOUND = 0.5 + 1e-5


@dataclass
class Comparison:
    """How one engine tensor compares with the checkpoint tensors it was made from."""

    name: str
    stored: str  # engine dtype
    source: str  # checkpoint dtype(s)
    check: str  # "bit-exact", "round to nearest even", "int8 per-row", "int4 per-group", "imported exactly"
    max_abs_err: float  # over all elements
    worst: float  # max over elements of |err| / bound (≤ 1 passes; 0 for exact matches)
    ok: bool


def check_kind(source_dtype: str, stored: str) -> str:
    """What a conversion from source_dtype to stored promises.

    >>> check_kind("F32", "BF16")
    'round to nearest even'
    """
    fmt = by_stored(stored)
    if fmt.quantized:
        return f"{fmt.name} per-{fmt.group}"  # "int8 per-row", "int4 per-group"
    if source_dtype == stored or stored == "F32":  # a copy, or a widening cast (exact)
        return "bit-exact"
    return "round to nearest even"


def compare_with_source(engine: ef.EngineFile, source: Source, progress: bool = False) -> list[Comparison]:
    """Compare every engine tensor with its source tensors, block by block.

    >>> [c.ok for c in compare_with_source(engine, resolve("snapshot"))]
    [True, True, ...]
    """
    checkpoint, imported = _checkpoint_for(engine, source)
    specs = engine_tensors(source.config)
    out = []
    with tqdm(unit="B", unit_scale=True, desc="compare", disable=not progress, file=sys.stderr, leave=False) as bar:
        for spec in specs:
            out.append(_compare_tensor(engine, checkpoint, spec, bar.update, imported))
    return out


def config_differences(engine: ef.EngineFile, source: Source) -> list[str]:
    """Every config field where the engine's header and the source's config.json disagree, as "name: a ≠ b".

    Tensors can match while the config does not (an rms_norm_eps, a rope_theta): both change generation.

    >>> config_differences(engine, resolve("snapshot"))
    []
    """
    ours, theirs = engine.config.to_dict(), source.config.to_dict()
    return [f"{name} {ours[name]!r} ≠ {theirs[name]!r}" for name in ours if ours[name] != theirs[name]]


def _checkpoint_for(engine: ef.EngineFile, source: Source) -> tuple[Checkpoint, pre.Prequantized | None]:
    if source.directory is None:
        raise SourceError(f"--against {source.label}: a {source.kind} has no tensors to compare with")
    checkpoint = Checkpoint.open(source.directory)
    qc = pre.quantization_config(source.raw_config, source.label)
    imported = None
    if qc is not None:
        imported = pre.read_prequantized(qc, {e.name for e in checkpoint.entries}, source.label)
        ok = pre.check_tensors(checkpoint.entries, source.config, imported, source.label).ok
    else:
        ok = check_against_config(checkpoint.entries, source.config).ok
    if not ok:
        raise SourceError(f"--against {source.label}: the checkpoint does not match its config.json "
                          f"(see `olmoscope tensors {source.label} --check`)")
    implied = [(s.name, s.shape) for s in engine_tensors(source.config)]
    stored = [(t.name, t.shape) for t in engine.entries]
    if implied != stored:
        raise EngineError(f"{engine.path}: its tensors do not match --against {source.label} "
                          f"(a different model: compare `olmoscope arch` of both)")
    return checkpoint, imported


def _compare_tensor(engine: ef.EngineFile, checkpoint: Checkpoint, spec, on_bytes,
                    imported: pre.Prequantized | None = None) -> Comparison:
    entry = engine.entry(spec.name)
    stored = engine.tensor(spec.name)
    quant = entry.quantization
    fmt = FORMATS[quant["format"]] if quant is not None else None
    scales = engine.scales(spec.name) if quant is not None else None
    zeros = engine.zeros(spec.name) if quant is not None else None
    max_err, worst, ok, row0 = 0.0, 0.0, True, 0
    source_dtypes, kinds = [], []
    for part in spec.sources:
        if imported is not None and pre.is_quantized(part.role, imported):
            source_dtypes.append("I32")
            kinds.append("imported exactly")
            good = _compare_imported(checkpoint, imported, part, stored, scales, zeros, row0)
            max_err, worst, ok = (max_err, worst, ok) if good else (float("inf"), float("inf"), False)
            on_bytes(checkpoint.entry(pre.module_of(part.name) + ".qweight").nbytes)
            row0 += part.shape[0]
            continue
        x_all = checkpoint.read(part.name)
        source_dtypes.append(checkpoint.entry(part.name).dtype)
        kind = check_kind(source_dtypes[-1], entry.dtype)
        kinds.append(kind)
        rows = part.shape[0] if len(part.shape) == 2 else 1
        step = max(1, BLOCK_ELEMENTS // max(part.elements // rows, 1))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if len(part.shape) == 2:
                x, y = x_all[start:stop], stored[row0 + start:row0 + stop]
                if fmt is not None:  # the stored integers, dequantized, and each element's quantization step
                    r = slice(row0 + start, row0 + stop)
                    y = fmt.decode(y, scales[r], None if zeros is None else zeros[r], quant["group_size"])
                    steps = fmt.steps(scales[r], quant["group_size"])
                else:
                    steps = None
            else:
                x, y, steps = x_all, stored, None
            err, ratio, good = compare_block(x, y, kind, steps)
            max_err, worst, ok = max(max_err, err), max(worst, ratio), ok and good
            on_bytes(x.nbytes)
        row0 += rows
    return Comparison(spec.name, entry.dtype, "+".join(dict.fromkeys(source_dtypes)), "/".join(sorted(set(kinds))),
                      max_err, worst, ok)


def _compare_imported(checkpoint: Checkpoint, pq: pre.Prequantized, part, stored: np.ndarray, scales: np.ndarray,
                      zeros: np.ndarray | None, row0: int) -> bool:
    """A GPTQ/AWQ matrix's integers, scales and zero points, unpacked again, against the engine's bytes."""
    from olmoscope.quantize import INT4_SYMMETRIC_ZERO, pack_nibbles

    rows = slice(row0, row0 + part.shape[0])
    q, s, z = pre.read_matrix_rows(checkpoint, pq, part.name, 0, part.shape[0])
    same = np.array_equal(pack_nibbles(q), stored[rows]) and np.array_equal(s.view(np.uint16), scales[rows].view(np.uint16))
    return same and (np.all(z == INT4_SYMMETRIC_ZERO) if zeros is None else np.array_equal(z, zeros[rows]))


def compare_block(x: np.ndarray, y: np.ndarray, kind: str, steps: np.ndarray | None = None) -> tuple[float, float, bool]:
    """(max |y − x|, max |y − x| / bound, within bound) for a source block x and its stored block y (for a
    quantized block: y dequantized, and `steps` each element's quantization step, broadcastable to x).

    >>> compare_block(np.float32([1, 2]), np.float32([1, 2]), "bit-exact")
    (0.0, 0.0, True)
    """
    with np.errstate(all="ignore"):
        if kind == "bit-exact":
            expected = x.astype(y.dtype)  # the identity for a copy; exact for a widening cast
            same = np.array_equal(expected.view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
            err = _max_finite_err(x.astype(np.float64), y.astype(np.float64))
            return err, 0.0 if same else float("inf"), same
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if steps is not None:
            bound = np.broadcast_to(steps * QUANTIZED_BOUND, x64.shape)
        else:
            dtype = ef.DTYPES[_dtype_name(y.dtype)]
            tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal) / 2
            bound = RELATIVE_BOUND[_dtype_name(y.dtype)] * np.abs(x64) + tiny
        nan_x, nan_y = np.isnan(x64), np.isnan(y64)
        if not np.array_equal(nan_x, nan_y):
            return float("nan"), float("inf"), False  # NaN must stay NaN, and appear nowhere else
        inf_x = np.isinf(x64)
        if not np.array_equal(x64[inf_x], y64[inf_x]):
            return float("inf"), float("inf"), False
        finite = ~(nan_x | inf_x)
        err = np.abs(y64 - x64)[finite]
        if err.size == 0:
            return 0.0, 0.0, True
        b = bound[finite]
        ratio = np.divide(err, b, out=np.full_like(err, np.inf), where=b > 0)  # b = 0 only for an all-zero row/group
        ratio[err == 0] = 0.0
        worst = float(ratio.max())
        return float(err.max()), worst, worst <= 1.0


def _max_finite_err(x64: np.ndarray, y64: np.ndarray) -> float:
    both = np.isfinite(x64) & np.isfinite(y64)
    return float(np.abs(y64 - x64)[both].max()) if both.any() else 0.0


def _dtype_name(dtype: np.dtype) -> str:
    return next(k for k, v in ef.DTYPES.items() if v == dtype)


def comparison_table(comparisons: list[Comparison]) -> str:
    rows = [[c.name, c.stored, c.source, c.check, f"{c.max_abs_err:.3g}", f"{c.worst:.3f}", "ok" if c.ok else "FAIL"]
            for c in comparisons]
    return tabulate(rows, ["tensor", "stored", "source", "promise", "max |err|", "err / bound", "result"])


# ── the command ─────────────────────────────────────────────────────────────────
@click.command("verify", help="Recompute every checksum of the engine FILE and report bad tensors by name; "
               "with --against SOURCE, also compare the config and each tensor with the checkpoint it was "
               "converted from.\n\n"
               "Exit status 1 when a checksum fails, the config differs, or a tensor is outside its conversion's bound.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--against", "against", metavar="SOURCE",
              help="The checkpoint FILE was converted from: a snapshot directory, a config.json beside its "
                   "shards, or a cached Hugging Face repo id.")
def verify_command(file: Path, against: str | None) -> None:
    progress = sys.stderr.isatty()
    with ef.EngineFile.open(file) as engine:
        bad = engine.verify(progress=progress)
        regions = sum(len(t.regions()) for t in engine.entries)
        size = sum(size for t in engine.entries for _, size, _ in t.regions())
        if bad:
            click.echo(f"checksums: {len(bad)} of {regions} fail:")
            for name in bad:
                click.echo(f"  {name}")
        else:
            click.echo(f"checksums: all {regions} match ({size / 1e9:.3f} GB, xxh3-128)")
        failed, differences = [], []
        if against is not None:
            source = resolve(against)
            for note in source.notes:
                click.echo(f"olmoscope: note: {note}", err=True)
            differences = config_differences(engine, source)
            comparisons = compare_with_source(engine, source, progress)
            if differences:
                click.echo(f"config: {len(differences)} fields differ from {against}: {'; '.join(differences)}")
            else:
                click.echo(f"config: every field matches {against}")
            click.echo("")
            click.echo(comparison_table(comparisons))
            failed = [c.name for c in comparisons if not c.ok]
    problems = []
    if against is not None and differences:
        problems.append(f"the config differs from {against} ({'; '.join(differences)[:200]})")
    if bad:
        problems.append(f"{len(bad)} checksum failures ({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''})")
    if failed:
        problems.append(f"{len(failed)} tensors differ from {against} beyond their bound "
                        f"({', '.join(failed[:5])}{', …' if len(failed) > 5 else ''})")
    if problems:
        raise EngineError(f"{file}: " + "; ".join(problems))
