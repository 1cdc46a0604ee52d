"""`olmoscope bench FILE`: how fast the CUDA backend runs an engine file, against the card's bandwidth roofline.

Measures prefill tokens/s at given prompt lengths, decode ms/token at given contexts (the generator's real
loop: one graph-replayed decode step plus GPU sampling, the token id back on the host), the bytes one
decode step must read, the device copy bandwidth measured in the same run, and the roofline they imply.
benchmarks/bench_cuda.py adds transformers on the same weights.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import click
import numpy as np
from tabulate import tabulate

from olmoscope.errors import UsageError

PROMPT_LENGTHS = (128, 2048)
CONTEXTS = (128, 2048)


@dataclass
class BenchResult:
    """One backend on one model: the figures docs/PERFORMANCE.md reports."""

    label: str  # what ran (e.g. "olmoscope cuda")
    device: str  # the card's name
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)  # prompt length → tokens/s
    decode_ms_per_token: dict[int, float] = field(default_factory=dict)  # context → ms/token
    bytes_per_token: dict[int, int] = field(default_factory=dict)  # context → bytes one decode step reads
    roofline_ms: dict[int, float] = field(default_factory=dict)  # context → bytes / copy bandwidth
    peak_memory_bytes: int = 0  # device memory held
    notes: list[str] = field(default_factory=list)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of repeats)."""
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    src, dst = cuda.mem_alloc(nbytes), cuda.mem_alloc(nbytes)
    start, end = cuda.Event(), cuda.Event()
    times = []
    try:
        cuda.memcpy_dtod(dst, src, nbytes)  # warm-up
        for _ in range(repeats):
            start.record()
            cuda.memcpy_dtod(dst, src, nbytes)
            end.record()
            end.synchronize()
            times.append(end.time_since(start) / 1e3)
    finally:
        src.free()
        dst.free()
        context.pop()
    return 2 * nbytes / statistics.median(times)


def decode_bytes(backend, context: int, batch: int = 1) -> int:
    """Bytes a decode step of `batch` sequences reads at `context`: the weights once (the embedding: a row per
    sequence), plus every sequence's KV cache."""
    cfg = backend.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * context
    return backend.decode_weight_bytes(batch) + batch * kv


def _prompt(backend, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, backend.vocab_limit, length).tolist()


def time_prefill(backend, length: int, repeats: int = 5, seed: int = 0) -> float:
    """Median tokens/s of prefilling `length` random tokens into an empty cache (one step, the last token sampled)."""
    from olmoscope.runtime.blocks import BlockPool, BlockTable
    from olmoscope.runtime.sampler import SamplingParams
    from olmoscope.runtime.step import Sample, Step, Work

    table = BlockTable(BlockPool(backend.num_blocks))
    table.reserve(length)
    step = Step([Work(0, 0, _prompt(backend, length, seed), table.blocks, Sample(SamplingParams()))],
                fresh_slots=[0])
    times = []
    for i in range(repeats + 1):
        backend.synchronize()
        started = time.perf_counter()
        backend.run(step)
        if i:  # the first run warms up
            times.append(time.perf_counter() - started)
    return length / statistics.median(times)


def time_decode(backend, context: int, steps: int = 64, seed: int = 0) -> float:
    """ms per token of greedy decoding after a `context`-token prompt, through the generator's own loop."""
    from olmoscope.runtime.loop import EngineLoop
    from olmoscope.runtime.scheduler import Request

    warmup = 8
    loop = EngineLoop(backend)
    output = loop.add(Request("bench", _prompt(backend, context, seed), max_new_tokens=1 + warmup + steps))
    while len(output.token_ids) < 1 + warmup:
        loop.step()
    started = time.perf_counter()
    loop.run()
    return (time.perf_counter() - started) / steps * 1e3


def bench_backend(backend, prompt_lengths=PROMPT_LENGTHS, contexts=CONTEXTS, bandwidth: float | None = None,
                  label: str = "olmoscope cuda") -> BenchResult:
    """Every figure for one CUDA backend; bandwidth measured here unless given."""
    bandwidth = bandwidth or copy_bandwidth()
    result = BenchResult(label, backend.device, notes=list(backend.notes))
    for length in prompt_lengths:
        if length <= backend.max_context:
            result.prefill_tokens_per_s[length] = time_prefill(backend, length)
    for context in contexts:
        if context + 80 <= backend.max_context:
            result.decode_ms_per_token[context] = time_decode(backend, context)
            result.bytes_per_token[context] = decode_bytes(backend, context)
            result.roofline_ms[context] = result.bytes_per_token[context] / bandwidth * 1e3
    result.peak_memory_bytes = backend.allocated_bytes
    return result


def table(results: list[BenchResult], bandwidth: float) -> str:
    """The markdown table of docs/PERFORMANCE.md: one row per (model, runner)."""
    rows = []
    for r in results:
        row = {"runner": r.label}
        for length, rate in r.prefill_tokens_per_s.items():
            row[f"prefill {length} (tok/s)"] = f"{rate:,.0f}"
        for context, ms in r.decode_ms_per_token.items():
            roof = r.roofline_ms.get(context)
            pct = f" ({roof / ms:.0%} of roofline)" if roof else ""
            row[f"decode @{context} (ms/tok)"] = f"{ms:.2f}{pct}"
        if r.bytes_per_token:
            row["bytes/token @128"] = f"{next(iter(r.bytes_per_token.values())) / 1e9:.2f} GB"
        row["peak GPU memory"] = f"{r.peak_memory_bytes / 2**30:.1f} GiB" if r.peak_memory_bytes else "n/a"
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    body = tabulate([[row.get(k, "") for k in keys] for row in rows], headers=keys, tablefmt="github")
    return f"{body}\n\ncopy bandwidth (read + write): {bandwidth / 1e9:,.0f} GB/s"


@click.command("bench")
@click.argument("engine_file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--prompt-lengths", default="128,2048", show_default=True, help="Prefill lengths to time.")
@click.option("--contexts", default="128,2048", show_default=True, help="Contexts to time decoding at.")
@click.option("--max-context", type=int, help="KV-cache capacity. [default: the model's, capped by memory]")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_command(engine_file: str, prompt_lengths: str, contexts: str, max_context: int | None, as_json: bool) -> None:
    """Time the CUDA backend on an engine file: prefill, decode, bytes per token and % of the roofline."""
    from olmoscope.runtime.backend import RuntimeOptions
    from olmoscope.runtime.devices import open_backend
    from olmoscope.runtime.engine import open_engine

    lengths, ctxs = _int_list(prompt_lengths, "--prompt-lengths"), _int_list(contexts, "--contexts")
    options = RuntimeOptions(max_context=max_context)
    with open_engine(engine_file) as engine, open_backend(engine, "cuda", options) as backend:
        bandwidth = copy_bandwidth()
        result = bench_backend(backend, lengths, ctxs, bandwidth)
    if as_json:
        click.echo(json.dumps({"bandwidth_bytes_per_s": bandwidth, **asdict(result)}, indent=2))
    else:
        click.echo(f"{engine_file} on {result.device}")
        click.echo(table([result], bandwidth))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r}: expected positive integers")
    return values
