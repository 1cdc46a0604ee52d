"""Where a decode step's time goes: each kernel timed alone, 100 launches replayed from a CUDA graph (so host
launch overhead is out), its bytes over its time against the copy bandwidth; then the whole step as a graph
replay, and the generator's loop (step + sampling + the token to the host).

    python3 benchmarks/profile_decode.py --models 1b,7b
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pycuda.driver as cuda
import torch
from tabulate import tabulate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_cuda import engine_from, random_hf_model  # noqa: E402

from olmoscope.bench import copy_bandwidth, time_decode  # noqa: E402
from olmoscope.runtime.cuda.backend import CudaBackend, CudaGraph  # noqa: E402
from olmoscope.runtime.cuda.kernels import DeviceBuffer  # noqa: E402

REPEATS = 100


def graph_us(backend, launch) -> float:
    """µs per launch of `launch`, REPEATS of them captured in one graph and replayed (best of 3)."""
    graph = CudaGraph(backend.stream)
    graph.capture(lambda: [launch() for _ in range(REPEATS)])
    start, end = cuda.Event(), cuda.Event()
    best = math.inf
    try:
        for _ in range(4):
            start.record(backend.stream)
            graph.launch()
            end.record(backend.stream)
            end.synchronize()
            best = min(best, end.time_since(start) * 1e3 / REPEATS)
    finally:
        graph.close()
    return best


def profile(backend, bandwidth: float) -> list[list]:
    k, b, w, cfg = backend.kernels, backend.dec, backend.w, backend.config
    flat = backend._flat
    rows = []

    def gemv_rows(name, x, y, silu=False):
        weight = w[name]
        pairs = weight.shape[0] // 2
        chosen = k.gemv_split(pairs)
        for split in (1, 2, 4, 8):
            us = graph_us(backend, lambda: k.gemv(weight, None, x, y, silu=silu, split=split))
            mark = " (chosen)" if split == chosen else ""
            rows.append([f"gemv {name.split('.')[-1]} {list(weight.shape)} split {split}{mark}", f"{us:.1f}",
                         f"{weight.nbytes / us / 1e3:.0f}", f"{weight.nbytes / us / 1e3 / (bandwidth / 1e9):.0%}"])

    h = flat(b["h"])
    gemv_rows("layers.0.qkv", h, flat(b["qkv"]))
    gemv_rows("layers.0.o_proj", b["attn"], flat(b["a"]))
    gemv_rows("layers.0.gate_up", h, b["act"], silu=True)
    gemv_rows("layers.0.down_proj", b["act"], flat(b["a"]))
    gemv_rows("lm_head", flat(b["xf"]), backend.logits_slots[0])
    kc, vc = backend._cache(0)
    start_pos = DeviceBuffer(backend.step.ptr + 4, (1,), "i32")
    eps = cfg.rms_norm_eps
    small = {
        "qk_norm_rope_append": lambda: k.qk_norm_rope_append(b["qkv"], w["layers.0.q_norm"], w["layers.0.k_norm"],
                                                             backend.inv_freq, b["q"], kc, vc, start_pos, 1, eps),
        "flash_decode (merge fused)": lambda: k.flash_decode(b["q"], kc, vc, b["po"], b["pml"], b["attn"], b["counters"],
                                                             start_pos),
        "residual_rmsnorm_add": lambda: k.residual_norm(b["h"], b["a"], w["layers.0.post_attention_norm"], None, 1, eps),
        "rmsnorm (final)": lambda: k.rmsnorm(b["h"], w["final_norm"], b["xf"], 1, eps),
        "sample (greedy)": lambda: k.sample(backend.logits_slots[0], backend.vocab_limit, 0.0, 0, 1.0, 0.0, backend.token_out),
        "sample (t=0.8, top-k 40, top-p 0.9)": lambda: k.sample(backend.logits_slots[0], backend.vocab_limit, 0.8, 40, 0.9, 0.5,
                                                                 backend.token_out),
    }
    for position in (127, 2047):
        backend._step_host[1] = position
        cuda.memcpy_htod(backend.step.ptr, backend._step_host)
        for name, launch in small.items():
            if name.startswith("flash") or position == 127:
                rows.append([f"{name} @{position + 1}", f"{graph_us(backend, launch):.1f}", "", ""])
        rows.append([f"whole decode step (graph) @{position + 1}", f"{graph_us(backend, lambda: backend._decode_kernels(0)):.1f}",
                     "", ""])
    for context in (128, 2048):
        rows.append([f"generator loop per token @{context}", f"{time_decode(backend, context) * 1e3:.1f}", "", ""])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="1b,7b")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    for size in args.models.split(","):
        model, config = random_hf_model(f"olmo2-{size}")
        engine = engine_from(model, config)
        del model
        torch.cuda.empty_cache()
        with CudaBackend(engine, max_context=4096, progress=False) as backend:
            backend.prefill(np.arange(2100, dtype=np.int32) % 1000)
            backend.synchronize()
            rows = profile(backend, bandwidth)
            print(f"\nOLMo-2-{size.upper()} on {backend.device}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        print(tabulate(rows, headers=["kernel", "µs", "GB/s", "% of copy bw"], tablefmt="github"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
