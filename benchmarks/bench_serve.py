"""`olmoscope serve` under load on the GPU, like `vllm bench serve`: Poisson arrivals at several request rates and
a max-concurrency run, against the same workload offline through the engine loop (`olmoscope batch`'s path) and
through transformers' generate_batch, same random weights, same card, same run (issue 9's benchmark).

Workload: prompts of [128, 512] random token ids, 256 output tokens each, greedy; random weights at OLMo-2-1B /
7B size, saved as a checkpoint and converted to an engine file that `olmoscope serve` (started here on
127.0.0.1) loads. Reported per run: request throughput, output tokens/s, time to first token p50/p99, inter-token
latency p50/p99 (gaps between streamed chunks) and end-to-end latency p50/p99; and issue 9's three targets.

    python3 benchmarks/bench_serve.py --models 1b,7b --out DIR [--docs docs/PERFORMANCE.md]
    python3 benchmarks/bench_serve.py --smoke --out DIR     # a tiny model on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTION = "serving"
PROMPT_RANGE, NEW_TOKENS = (128, 512), 256
RATES = (2.0, 8.0, 32.0)  # requests/s, Poisson arrivals
RATE_SECONDS = 15.0  # arrivals per rate run: min(REQUESTS, rate × this)
REQUESTS, CONCURRENCY = 64, 64  # the max-concurrency run: issue 9's "7B at 64 concurrent requests"
SMOKE = dict(prompt_range=(8, 24), new_tokens=8, requests=8, concurrency=4, rates=(4.0,), rate_seconds=2.0)


# ── the model: random weights → checkpoint → engine file ────────────────────────────────────────────────
def engine_file(size: str, folder: Path, smoke: bool):
    """(engine path, the transformers model for the peer run, vocab). The snapshot takes make-tiny's tokenizer
    files, so that the engine carries a tokenizer as a real conversion would."""
    from olmoscope.convert import convert
    from olmoscope.tiny import make_tiny

    snapshot = folder / "snapshot"
    tokenizer_source = make_tiny(folder / "tokenizer-donor", seed=0)
    if smoke:
        make_tiny(snapshot, seed=0)
        from transformers import Olmo2ForCausalLM

        model = Olmo2ForCausalLM.from_pretrained(snapshot).eval()
    else:
        from bench_cuda import random_hf_model

        model, _ = random_hf_model(f"olmo2-{size}")
        model.save_pretrained(snapshot, max_shard_size="5GB")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_source / name, snapshot / name)
    path = folder / f"olmo2-{size}-random.olmo"
    convert(str(snapshot), path, dtype="bf16")
    shutil.rmtree(snapshot, ignore_errors=True)  # the engine file is all the server needs
    return path, model, model.config.vocab_size


def workload(vocab: int, count: int, prompt_range, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 100_000), int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
            for _ in range(count)]


# ── the server ─────────────────────────────────────────────────────────────────────────────────────────
class Server:
    """`olmoscope serve` on 127.0.0.1, a free port, its log in a file; SIGTERM at the end."""

    def __init__(self, engine: Path, log: Path, device: str):
        command = [sys.executable, "-c", "from olmoscope.cli import main; main()", "serve", str(engine), "--port",
                   "0", "--device", device, "--max-num-seqs", "128", "--max-num-batched-tokens", "8192",
                   "--max-queue", "100000", "--no-verify"]
        self.log = log
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not (found := re.search(r"serving \S+ on (http://\S+)", log.read_text(errors="replace"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"olmoscope serve did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        self.url = found.group(1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed completion: when it was sent, when each chunk came, how many tokens it made."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    chunks, tokens, error = [], 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"sent": sent, "error": f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens, "done": time.perf_counter(), "error": error}


async def load(url: str, work: list[list[int]], new_tokens: int, rate: float | None = None,
               concurrency: int | None = None) -> tuple[list[dict], float]:
    """Poisson arrivals at `rate` requests/s, or `concurrency` clients back to back; (results, makespan s)."""
    limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        started = time.perf_counter()
        if rate is not None:
            gaps = np.random.default_rng(1).exponential(1 / rate, len(work))

            async def arrive(i: int, prompt: list[int]) -> dict:
                await asyncio.sleep(float(gaps[: i + 1].sum()))
                return await one_request(client, url, prompt, new_tokens)

            results = await asyncio.gather(*(arrive(i, p) for i, p in enumerate(work)))
        else:
            queue = list(reversed(work))

            async def worker() -> list[dict]:
                done = []
                while queue:
                    done.append(await one_request(client, url, queue.pop(), new_tokens))
                return done

            results = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
    return results, time.perf_counter() - started


def summary(results: list[dict], makespan: float) -> dict:
    ok = [r for r in results if not r.get("error") and r.get("chunks")]
    ttft = [r["chunks"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["done"] - r["sent"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    failed = [r.get("error") or "no tokens streamed" for r in results if r not in ok]
    return {"requests": len(results), "errors": len(failed), "first_error": failed[0] if failed else None,
            "seconds": makespan,
            "requests_per_s": len(ok) / makespan, "output_tokens_per_s": tokens / makespan, "output_tokens": tokens,
            "ttft_ms": [pct(ttft, 50) * 1e3, pct(ttft, 99) * 1e3], "itl_ms": [pct(itl, 50) * 1e3, pct(itl, 99) * 1e3],
            "e2e_s": [pct(e2e, 50), pct(e2e, 99)]}


def serve_side(engine: Path, folder: Path, device: str, vocab: int, shape: dict) -> dict:
    server = Server(engine, folder / "serve.log", device)
    try:
        warm = workload(vocab, shape["concurrency"], shape["prompt_range"], seed=99)
        asyncio.run(load(server.url, warm, 8, concurrency=shape["concurrency"]))  # kernels loaded, graphs captured
        runs = {}
        for rate in shape["rates"]:
            count = min(shape["requests"], max(4, int(rate * shape["rate_seconds"])))
            work = workload(vocab, count, shape["prompt_range"], seed=int(rate))
            runs[f"rate {rate:g}/s"] = summary(*asyncio.run(load(server.url, work, shape["new_tokens"], rate=rate)))
        work = workload(vocab, shape["requests"], shape["prompt_range"])
        runs[f"max concurrency {shape['concurrency']}"] = summary(
            *asyncio.run(load(server.url, work, shape["new_tokens"], concurrency=shape["concurrency"])))
    finally:
        code = server.stop()
    return {"runs": runs, "exit_code": code, "log_tail": server.log.read_text(errors="replace")[-3000:]}


# ── the same workload offline ──────────────────────────────────────────────────────────────────────────
def offline_side(engine_path: Path, device: str, vocab: int, shape: dict) -> dict:
    """The max-concurrency workload through one engine loop in this process (olmoscope batch's path), and the
    batch-64 decode step for the inter-token latency target."""
    from bench_batch import decode_step_ms, run_loop

    from olmoscope.runtime.backend import RuntimeOptions
    from olmoscope.runtime.devices import open_backend
    from olmoscope.runtime.engine import open_engine

    work = workload(vocab, shape["requests"], shape["prompt_range"])
    options = RuntimeOptions(max_num_seqs=128, max_num_batched_tokens=8192)
    with open_engine(engine_path, verify=False) as engine, open_backend(engine, device, options) as backend:
        if not hasattr(backend, "synchronize"):  # the NumPy backend (a smoke run) runs each step at once
            backend.synchronize = lambda: None
        run_loop(backend, work[:8], 8)  # warm-up
        seconds, generated = run_loop(backend, work, shape["new_tokens"])
        step = decode_step_ms(backend, min(64, shape["concurrency"]), vocab) if device == "cuda" else float("nan")
    return {"output_tokens_per_s": generated / seconds, "seconds": seconds, "output_tokens": generated,
            "decode_step_ms": step}


def transformers_side(model, vocab: int, shape: dict) -> dict:
    from bench_batch import NEW_TOKENS as BATCH_TOKENS, transformers_batch
    import bench_batch

    work = workload(vocab, shape["requests"], shape["prompt_range"])
    bench_batch.NEW_TOKENS = shape["new_tokens"]  # generate_batch reads the module's length
    try:
        return transformers_batch(model, work)
    finally:
        bench_batch.NEW_TOKENS = BATCH_TOKENS


# ── the report ─────────────────────────────────────────────────────────────────────────────────────────
def render(everything: dict) -> str:
    shape = everything["shape"]
    lines = [f"Workload: prompts of {shape['prompt_range'][0]}–{shape['prompt_range'][1]} random token ids, "
             f"{shape['new_tokens']} output tokens each, greedy, streamed from `olmoscope serve` on 127.0.0.1 "
             f"(Poisson arrivals at {', '.join(f'{r:g}' for r in shape['rates'])} requests/s, "
             f"{shape['requests']} requests at most per rate; then {shape['requests']} requests from "
             f"{shape['concurrency']} concurrent clients); offline: the same {shape['requests']} through one engine "
             f"loop and through transformers' generate_batch. `python3 benchmarks/bench_serve.py --models "
             f"{','.join(everything['models'])}`."]
    rows = []
    for size, r in everything["models"].items():
        for mode, s in r["serve"]["runs"].items():
            rows.append([size, f"serve, {mode}", s["requests"], s["errors"], f"{s['requests_per_s']:.2f}",
                         f"{s['output_tokens_per_s']:,.0f}", *(f"{v:,.0f}" for v in s["ttft_ms"]),
                         *(f"{v:.1f}" for v in s["itl_ms"]), *(f"{v:.2f}" for v in s["e2e_s"])])
        off = r["offline"]
        rows.append([size, "offline engine loop (olmoscope batch)", shape["requests"], 0, "",
                     f"{off['output_tokens_per_s']:,.0f}", "", "", "", "", "", ""])
        peer = r.get("transformers", {})
        rows.append([size, "transformers generate_batch", shape["requests"], "", "",
                     f"{peer['tokens_per_s']:,.0f}" if "tokens_per_s" in peer else peer.get("error", "n/a")[:60],
                     "", "", "", "", "", ""])
        lines.append(_targets(size, r, shape))
        lines += [f"{size}, {mode}: {s['errors']} failed, the first with: {s['first_error']}"
                  for mode, s in r["serve"]["runs"].items() if s.get("first_error")]
    table = tabulate(rows, ["model", "run", "requests", "errors", "req/s", "output tok/s", "TTFT p50 ms",
                            "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s"], tablefmt="github")
    return "\n\n".join(lines[:1] + [table] + lines[1:] + [f"Software: {everything['software']}."]) + "\n"


def _targets(size: str, r: dict, shape: dict) -> str:
    runs, off = r["serve"]["runs"], r["offline"]
    busy = runs[f"max concurrency {shape['concurrency']}"]
    slow = next(iter(runs.values()))
    parts = [f"{busy['output_tokens_per_s'] / off['output_tokens_per_s']:.0%} of the offline loop's output tokens/s "
             f"at {shape['concurrency']} concurrent (target ≥ 85%)",
             f"TTFT p50 {slow['ttft_ms'][0]:,.0f} ms at {shape['rates'][0]:g} requests/s (target ≤ 150 ms)"]
    if off["decode_step_ms"] == off["decode_step_ms"]:  # not NaN: measured on the GPU
        parts.append(f"ITL p50 {busy['itl_ms'][0] / off['decode_step_ms']:.2f}× the batch-64 decode step of "
                     f"{off['decode_step_ms']:.2f} ms (target ≤ 1.3×)")
    return f"{size}: " + "; ".join(parts) + f"; the server exited with {r['serve']['exit_code']} after SIGTERM."


def software() -> str:
    import fastapi
    import uvicorn

    try:
        from bench_cuda import software as cuda_software

        base = cuda_software()
    except Exception:  # no GPU here (a smoke run)
        base = f"Python {sys.version.split()[0]}"
    return f"{base}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, a few requests")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--docs", type=Path, help="rewrite this benchmark's section of docs/PERFORMANCE.md")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render a saved run")
    from bench_cuda import publish

    return publish(parser.parse_args(), run, render, SECTION)


def run(args) -> dict:
    shape = dict(prompt_range=PROMPT_RANGE, new_tokens=NEW_TOKENS, requests=REQUESTS, concurrency=CONCURRENCY,
                 rates=RATES, rate_seconds=RATE_SECONDS)
    if args.smoke:
        shape.update(SMOKE)
    models = ["tiny"] if args.smoke else args.models.split(",")
    device = "cpu" if args.smoke else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    everything = {"shape": shape, "software": software(), "models": {}}
    for size in models:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=args.out) as scratch:
            folder = Path(scratch)
            engine, model, vocab = engine_file(size, folder, args.smoke)
            result = {}
            if not args.skip_transformers:  # first, while its weights are on the card; then they make room
                result["transformers"] = transformers_side(model, vocab, shape)
            del model
            _free_gpu()
            print(f"[{size}] engine file and peer done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
            result["serve"] = serve_side(engine, folder, device, vocab, shape)
            result["offline"] = offline_side(engine, device, vocab, shape)
        everything["models"][size] = result
        (args.out / "serve.json").write_text(json.dumps(everything, indent=2))
        print(f"[{size}] done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return everything


def _free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
