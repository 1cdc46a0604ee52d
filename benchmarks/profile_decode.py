"""Where a decode step's time goes: the captured decode graph replayed alone (GPU time only, CUDA events), against
the same step through the engine loop (scheduling, metadata upload, sampling, the ids back to the host), and the
step's roofline. Each kernel's own time at the same shapes is benchmarks/bench_kernels.py's job.

    python3 benchmarks/profile_decode.py --models 1b,7b --batches 1,64 --context 448 [--dtypes bf16,int4] [--kernels]

--dtypes profiles the same random weights in each weight format (bench_cuda.engine_from's int8 per row and int4
asymmetric in groups of 128, lm_head bf16), one table each.

--kernels adds, per batch, each kernel's GPU time inside the replayed graph (CUPTI through torch.profiler, which sees
PyCUDA's launches): one row per kernel of a layer (the same kernel name launched k times per layer is k rows, in
launch order), summed over the layers, and the time no kernel runs. Under programmatic dependent launch (on by
default, OLMOSCOPE_PDL=0 turns it off) a kernel starts while the previous one drains and waits for its data, so its
time includes that wait and the rows overlap: run with OLMOSCOPE_PDL=0 for each kernel's own time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pycuda.driver as cuda
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import engine_from, random_hf_model  # noqa: E402

from olmoscope.bench import copy_bandwidth  # noqa: E402
from olmoscope.runtime.backend import RuntimeOptions, kv_block_bytes  # noqa: E402
from olmoscope.runtime.blocks import BLOCK_SIZE  # noqa: E402
from olmoscope.runtime.cuda.backend import CudaBackend  # noqa: E402
from olmoscope.runtime.loop import EngineLoop  # noqa: E402
from olmoscope.runtime.scheduler import Request  # noqa: E402

REPLAYS, STEPS = 50, 32


def kernel_times(graph, stream, replays: int = 20) -> tuple[list[tuple[str, float]], float, float]:
    """([(kernel name, µs)] of one replay in launch order, the medians over the replays; the replay's span in µs;
    the µs of it when no kernel runs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.launch()
        stream.synchronize()
    kernels = sorted((e.start_ns(), e.duration_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                     if e.device_type().name == "CUDA" and e.duration_ns() > 0 and "Memcpy" not in e.name())
    per = len(kernels) // replays
    if per == 0 or per * replays != len(kernels):
        raise RuntimeError(f"{len(kernels)} kernel events for {replays} replays")
    times = [statistics.median(kernels[r * per + i][1] for r in range(replays)) / 1e3 for i in range(per)]
    span = statistics.median((kernels[r * per + per - 1][0] + kernels[r * per + per - 1][1] - kernels[r * per][0])
                             for r in range(replays)) / 1e3
    idle = statistics.median(idle_ns(kernels[r * per:(r + 1) * per]) for r in range(replays)) / 1e3
    return [(kernels[i][2], times[i]) for i in range(per)], span, idle


def idle_ns(kernels: list[tuple[int, int, str]]) -> int:
    """ns between the first kernel's start and the last one's end with no kernel running (kernels sorted by start)."""
    idle, reach = 0, kernels[0][0]
    for start, duration, _ in kernels:
        idle += max(0, start - reach)
        reach = max(reach, start + duration)
    return idle


def kernel_table(launches: list[tuple[str, float]], span: float, idle: float, layers: int) -> str:
    """The launches of one replay folded by layer: a kernel launched k·layers + r times (r < layers) is k rows (its
    j-th launch of a layer counted in row j), and its last r launches (lm_head's GEMV after the layers) one row each."""
    counts = Counter(name for name, _ in launches)
    totals: dict[tuple[str, int], list[float]] = {}
    seen: dict[str, int] = {}
    for name, us in launches:
        per_layer = counts[name] // layers
        j = seen.get(name, 0)
        seen[name] = j + 1
        key = (name, j % per_layer if j < per_layer * layers else j)
        totals.setdefault(key, []).append(us)
    rows = [[name[:48], j, len(v), f"{statistics.mean(v):.1f}", f"{sum(v):.0f}", f"{sum(v) / span:.1%}"]
            for (name, j), v in totals.items()]
    rows.append(["(no kernel running)", "", "", "", f"{idle:.0f}", f"{idle / span:.1%}"])
    return tabulate(rows, ["kernel", "launch # in layer", "launches", "µs each", "µs per step", "share"],
                    tablefmt="github")


def profile(backend: CudaBackend, batch: int, context: int, bandwidth: float, kernels: bool = False) -> list:
    """[batch, graph ms, loop ms, roofline ms, graph % of roofline, host share]; with kernels, the step's kernel
    table printed."""
    rng = np.random.default_rng(batch)
    loop = EngineLoop(backend)
    outputs = [loop.add(Request(f"p{i}", rng.integers(0, backend.vocab_limit, context).tolist(),
                                max_new_tokens=8 + 2 * STEPS)) for i in range(batch)]
    while min(len(o.token_ids) for o in outputs) < 8:  # prefilled, decoding, the graph captured
        loop.step()
    started, steps = time.perf_counter(), loop.steps
    for _ in range(STEPS):
        loop.step()
    loop_ms = (time.perf_counter() - started) / (loop.steps - steps) * 1e3
    size = next(s for s in backend.graph_sizes if s >= batch)
    graph = backend._graph(size)  # the very graph the loop replays, on the metadata of its last step
    start, end = cuda.Event(), cuda.Event()
    times = []
    for _ in range(REPLAYS):
        start.record(backend.stream)
        graph.launch()
        end.record(backend.stream)
        end.synchronize()
        times.append(end.time_since(start))
    if kernels:
        launches, span, idle = kernel_times(graph, backend.stream)
        overlap = sum(us for _, us in launches) + idle - span
        print(f"\nbatch {batch}: {len(launches)} kernels, {span:.0f} µs from the first one's start to the last one's end"
              + (f"; {overlap:.0f} µs of kernel time overlaps (programmatic launch: a kernel waiting for the one "
                 "before)" if overlap > 0.01 * span else ""))
        print(kernel_table(launches, span, idle, backend.config.num_hidden_layers))
    loop.run()
    graph_ms = statistics.median(times)
    kv = batch * (context + 8 + STEPS) * kv_block_bytes(backend.config, 2) // BLOCK_SIZE
    roof = (backend.decode_weight_bytes(batch) + kv) / bandwidth * 1e3
    return [batch, f"{graph_ms:.3f}", f"{loop_ms:.3f}", f"{roof:.3f}", f"{roof / graph_ms:.0%}",
            f"{max(0.0, loop_ms - graph_ms) / loop_ms:.0%}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=448)
    parser.add_argument("--dtypes", default="bf16", help="comma-separated weight formats: bf16, int8, int4")
    parser.add_argument("--kernels", action="store_true", help="each kernel's GPU time in the graph (needs torch)")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"bf16", "int8", "int4"}:
        parser.error(f"--dtypes takes bf16, int8 and int4, not {args.dtypes}")
    bandwidth = copy_bandwidth()
    batches = [int(b) for b in args.batches.split(",")]
    for size in args.models.split(","):
        model, config = random_hf_model(f"olmo2-{size}")
        for dtype in dtypes:
            engine = engine_from(model, config, int8=dtype == "int8", int4=dtype == "int4")
            rows = []
            with CudaBackend(engine, RuntimeOptions(max_num_seqs=max(batches)), progress=False) as backend:
                for batch in batches:
                    rows.append(profile(backend, batch, args.context, bandwidth, args.kernels))
                device = backend.device
            del engine
            print(f"\nOLMo-2-{size.upper()} dimensions, {dtype} weights, on {device}, context ≈{args.context}, "
                  f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
            print(tabulate(rows, ["batch", "graph ms", "loop ms/step", "roofline ms", "graph % of roofline",
                                  "loop time not in the graph"], tablefmt="github"))
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
