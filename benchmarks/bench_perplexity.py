"""`olmoscope perplexity` on the GPU against transformers, same random weights, same card, same run.

Workload: WINDOWS windows of --context random tokens (non-overlapping, stride = context), random weights at OLMo-2
1B / 7B size. olmoscope scores them through the engine loop (prompt-scoring requests, many windows a step);
transformers runs Hugging Face's perplexity recipe (`model(window, labels=window)`, one window at a time) and the
same with --hf-batch windows a forward. Reported: tokens/s through the model, and each mean NLL (bf16 on both
sides: they agree to about 1e-3 relative, not exactly).

    python3 benchmarks/bench_perplexity.py --models 1b,7b --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import engine_from, random_hf_model  # noqa: E402

from olmoscope.perplexity import measure  # noqa: E402
from olmoscope.runtime.backend import RuntimeOptions  # noqa: E402
from olmoscope.runtime.cuda.backend import CudaBackend  # noqa: E402

WINDOWS = 64


@torch.no_grad()
def transformers_nll(model, tokens: np.ndarray, context: int, batch: int) -> tuple[float, float]:
    """(mean NLL, seconds) of HF's recipe over non-overlapping windows, `batch` windows a forward."""
    windows = torch.as_tensor(tokens[: len(tokens) // context * context].reshape(-1, context), dtype=torch.long,
                              device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    total = 0.0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        total += float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0] * (context - 1)
    torch.cuda.synchronize()
    return total / (len(windows) * (context - 1)), time.perf_counter() - started


def bench(preset: str, context: int, hf_batch: int, options: RuntimeOptions) -> dict:
    model, config = random_hf_model(preset)
    tokens = np.random.default_rng(0).integers(0, 100278, WINDOWS * context).astype(np.int32)
    engine = engine_from(model, config)
    with CudaBackend(engine, options) as backend:
        measure(backend, tokens[: 2 * context], context, context)  # warm-up: kernels built and loaded
        ours = measure(backend, tokens, context, context)
    evaluated = WINDOWS * context
    row = {"model": preset, "context": context, "windows": WINDOWS,
           "olmoscope tokens/s": round(ours.tokens_per_second), "olmoscope NLL": round(ours.nll, 5)}
    for batch in sorted({1, hf_batch}):
        transformers_nll(model, tokens[: 2 * context], context, batch)  # warm-up
        nll, seconds = transformers_nll(model, tokens, context, batch)
        row[f"transformers b{batch} tokens/s"] = round(evaluated / seconds)
        row[f"transformers b{batch} NLL"] = round(nll, 5)
    del model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b", help="comma-separated presets' sizes: 1b, 7b")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args()
    options = RuntimeOptions(max_context=args.context, max_num_seqs=64,
                             max_num_batched_tokens=args.max_num_batched_tokens)
    rows = [bench(f"olmo2-{size}", args.context, args.hf_batch, options) for size in args.models.split(",")]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "perplexity.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=2))
    print(torch.cuda.get_device_name())
    print(tabulate(rows, headers="keys", intfmt=","))


if __name__ == "__main__":
    main()
