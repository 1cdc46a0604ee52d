"""benchmarks/bench_kernels.py on the CPU emulator: a smoke run that every variant it times launches with valid
shapes, arguments and shared memory (the timings are meaningless: events read 1 ms, graphs run their launches once).

    python tests/cuda_emulator/bench.py --models tiny --quick --gemm-only     (after build.py; about a minute)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cuda_emulator.plugin as plugin  # noqa: E402  (installs the stand-in pycuda.driver and the emulated Kernels)


class Event:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def time_since(self, other) -> float:
        return 1.0


class Graph:
    """CudaGraph's stand-in: capture runs the launches once, replays do nothing."""

    def __init__(self, stream):
        pass

    def capture(self, record) -> None:
        record()

    def launch(self) -> None:
        pass

    def close(self) -> None:
        pass


plugin.driver.Event = Event
plugin.driver.memcpy_dtod_async = lambda dst, src, nbytes, stream=None: None
plugin.Device.name = lambda self: "olmoscope CPU emulator"
# a 1 MiB "L2": one or two copies of each input instead of the dozens that outrun a real 50 MB cache
plugin.Device.get_attribute = lambda self, attribute: {"MULTIPROCESSOR_COUNT": plugin.SM_COUNT,
                                                       "L2_CACHE_SIZE": 1 << 20}[attribute]

import bench_kernels  # noqa: E402

bench_kernels.CudaGraph = Graph
bench_kernels.REPLAYS = 1

if __name__ == "__main__":
    sys.argv = ["bench_kernels.py", *sys.argv[1:]]
    sys.exit(bench_kernels.main())
