"""Batched generation on the GPU: olmoscope's engine loop against transformers, same random weights, same card,
same run (issue 8's benchmark).

Workload: 64 requests, prompt lengths uniform in [128, 512] tokens, 256 new tokens each, greedy, no early stop;
random weights at OLMo-2-1B / 7B size. Reported: output tokens/s end to end; decode step time at batch 1, 8, 16,
32, 64, 128 with the % of its roofline ((weight bytes + KV bytes read) / the copy bandwidth measured here);
prefill tokens/s; the KV pool. Peers: transformers' generate_batch (continuous batching, "paged|sdpa") and its
padded generate (sdpa) on the same 64 prompts. --quantized int8,int4: the decode step at batch 1, 16 and 64 with the
same weights quantized (bench_cuda.engine_from's int8 and int4), beside bf16's.

    python3 benchmarks/bench_batch.py --models 1b,7b --out DIR [--quantized int8,int4] [--docs docs/PERFORMANCE.md]
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
from bench_cuda import engine_from, publish, random_hf_model, software  # noqa: E402

from olmoscope.bench import copy_bandwidth  # noqa: E402
from olmoscope.runtime.backend import RuntimeOptions, kv_block_bytes  # noqa: E402
from olmoscope.runtime.blocks import BLOCK_SIZE  # noqa: E402
from olmoscope.runtime.cuda.backend import CudaBackend  # noqa: E402
from olmoscope.runtime.loop import EngineLoop  # noqa: E402
from olmoscope.runtime.scheduler import Request  # noqa: E402

SECTION = "batched runtime"
REQUESTS, PROMPT_RANGE, NEW_TOKENS = 64, (128, 512), 256
BATCHES = (1, 8, 16, 32, 64, 128)
DECODE_CONTEXT, DECODE_STEPS, WARMUP = 448, 32, 8
QUANT_BATCHES = (1, 16, 64)  # --quantized: up to the int4 kernels' 64 rows


def prompts(vocab: int, count: int = REQUESTS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1))).tolist()
            for _ in range(count)]


def run_loop(backend, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) for the batch through one engine loop, greedy, no stop but the length."""
    loop = EngineLoop(backend)
    outputs = [loop.add(Request(f"r{i}", p, max_new_tokens=new_tokens)) for i, p in enumerate(batch)]
    backend.synchronize()
    started = time.perf_counter()
    loop.run()
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.token_ids) for o in outputs)


def decode_step_ms(backend, batch: int, vocab: int) -> float:
    """ms per decode step with `batch` sequences at about DECODE_CONTEXT positions, through the engine loop."""
    loop = EngineLoop(backend)
    rng = np.random.default_rng(batch)
    outputs = [loop.add(Request(f"d{i}", rng.integers(0, vocab, DECODE_CONTEXT).tolist(),
                                max_new_tokens=1 + WARMUP + DECODE_STEPS)) for i in range(batch)]
    while min(len(o.token_ids) for o in outputs) < 1 + WARMUP:
        loop.step()
    started, steps = time.perf_counter(), loop.steps
    loop.run()
    return (time.perf_counter() - started) / (loop.steps - steps) * 1e3


def mixed_step_ms(backend, vocab: int, decoding: int = 64, chunk: int = 512, repeats: int = 5) -> dict:
    """One chunked-prefill step: `decoding` sequences' decode tokens plus a `chunk`-token prompt, timed (synchronized
    around the step) against a decode-only step of the same sequences, median of `repeats` each."""
    loop = EngineLoop(backend)
    rng = np.random.default_rng(5)
    for i in range(decoding):
        loop.add(Request(f"m{i}", rng.integers(0, vocab, DECODE_CONTEXT).tolist(), max_new_tokens=10**4))
    for _ in range(WARMUP):  # every prompt in, every sequence decoding
        loop.step()

    def timed() -> float:
        backend.synchronize()
        started = time.perf_counter()
        loop.step()
        backend.synchronize()
        return (time.perf_counter() - started) * 1e3

    mixed, plain = [], []
    for r in range(repeats):
        plain.append(timed())
        loop.add(Request(f"p{r}", rng.integers(0, vocab, chunk).tolist(), max_new_tokens=1))
        mixed.append(timed())
    for i in range(decoding):
        loop.abort(f"m{i}")
    loop.run()
    return {"decoding": decoding, "chunk": chunk, "mixed_ms": float(np.median(mixed)),
            "decode_ms": float(np.median(plain))}


def olmoscope_side(engine, config, bandwidth: float, work: list[list[int]]) -> dict:
    options = RuntimeOptions(max_num_seqs=max(BATCHES), max_num_batched_tokens=8192)
    with CudaBackend(engine, options, progress=False) as backend:
        run_loop(backend, work[:8], 8)  # warm-up: kernels loaded, graphs captured
        run_loop(backend, work, 2)
        seconds, generated = run_loop(backend, work, NEW_TOKENS)
        prefill_s, _ = run_loop(backend, work, 1)
        kv_token = kv_block_bytes(config, 2) // BLOCK_SIZE
        steps = {}
        for batch in BATCHES:
            ms = decode_step_ms(backend, batch, config.vocab_size)
            context = DECODE_CONTEXT + WARMUP + DECODE_STEPS // 2
            roof = (backend.decode_weight_bytes(batch) + batch * context * kv_token) / bandwidth * 1e3
            steps[batch] = {"ms": ms, "roofline_ms": roof, "share": roof / ms}
        mixed = mixed_step_ms(backend, config.vocab_size)
        return {"device": backend.device, "tokens_per_s": generated / seconds, "mixed_step": mixed, "seconds": seconds,
                "generated": generated, "prefill_tokens_per_s": sum(map(len, work)) / prefill_s,
                "kv_blocks": backend.num_blocks - 1, "kv_tokens": (backend.num_blocks - 1) * BLOCK_SIZE,
                "kv_gib": (backend.num_blocks - 1) * kv_block_bytes(config, 2) / 2**30, "decode_steps": steps,
                "notes": backend.notes}


def quantized_steps(model, config, formats: list[str], work: list[list[int]]) -> dict:
    """format → {batch: decode step ms} for the same weights quantized to each format (int8, int4)."""
    steps = {}
    for fmt in formats:
        engine = engine_from(model, config, int8=fmt == "int8", int4=fmt == "int4")
        options = RuntimeOptions(max_num_seqs=max(QUANT_BATCHES), max_num_batched_tokens=8192)
        with CudaBackend(engine, options, progress=False) as backend:
            run_loop(backend, work[:8], 8)  # warm-up: kernels loaded, graphs captured
            steps[fmt] = {batch: decode_step_ms(backend, batch, config.vocab_size) for batch in QUANT_BATCHES}
        del engine
    return steps


def transformers_batch(model, work: list[list[int]]) -> dict:
    """generate_batch: continuous batching with a paged cache, greedy."""
    from transformers import GenerationConfig

    try:
        model.set_attn_implementation("paged|sdpa")
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.generate_batch(inputs=work[:4], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                                                 eos_token_id=None, pad_token_id=0),
                             progress_bar=False)
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=work, generation_config=config, progress_bar=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        return {"tokens_per_s": generated / seconds, "seconds": seconds, "generated": generated}
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        model.set_attn_implementation("sdpa")


def transformers_padded(model, work: list[list[int]]) -> dict:
    """generate on the 64 prompts left-padded into one batch, greedy."""
    width = max(map(len, work))
    ids = torch.zeros((len(work), width), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, p in enumerate(work):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    try:
        with torch.no_grad():
            model.generate(input_ids=ids[:4], attention_mask=mask[:4], max_new_tokens=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        generated = (out.shape[1] - width) * len(work)
        return {"tokens_per_s": generated / seconds, "seconds": seconds, "generated": generated}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def render(everything: dict) -> str:
    lines = ["## Batched runtime (`benchmarks/bench_batch.py`)",
             f"Workload: {REQUESTS} requests, prompts uniform in [{PROMPT_RANGE[0]}, {PROMPT_RANGE[1]}] tokens, "
             f"{NEW_TOKENS} new tokens each, greedy, no early stop; random weights at the model's real size. "
             f"Copy bandwidth measured in the run: {everything['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s. "
             f"`python3 benchmarks/bench_batch.py --models 1b,7b{_quant_flag(everything)}`."]
    for size, r in everything["models"].items():
        ours = r["olmoscope"]
        rows = [["olmoscope batch (engine loop, CUDA)", f"{ours['tokens_per_s']:,.0f}", f"{ours['seconds']:.2f}"]]
        for label, key in (("transformers generate_batch (paged|sdpa)", "generate_batch"),
                           ("transformers generate, padded (sdpa)", "padded")):
            peer = r.get(key, {})
            rows.append([label, f"{peer['tokens_per_s']:,.0f}" if "tokens_per_s" in peer else peer.get("error", "n/a"),
                         f"{peer['seconds']:.2f}" if "seconds" in peer else ""])
        best = max((r.get(k, {}).get("tokens_per_s", 0) for k in ("generate_batch", "padded")), default=0)
        ratio = f" ({ours['tokens_per_s'] / best:.1f}× the better transformers runner)" if best else ""
        steps = [[b, f"{s['ms']:.2f}", f"{s['roofline_ms']:.2f}", f"{s['share']:.0%}"]
                 for b, s in ours["decode_steps"].items()]
        lines.append(
            f"### OLMo-2-{size.upper()} dimensions on {ours['device']}\n\n"
            + tabulate(rows, ["runner", "output tokens/s", "seconds"], tablefmt="github")
            + f"\n\nolmoscope: {ours['tokens_per_s']:,.0f} output tokens/s{ratio}; prefill "
            f"{ours['prefill_tokens_per_s']:,.0f} tokens/s (the 64 prompts, one token each); KV pool "
            f"{ours['kv_tokens']:,} tokens in {ours['kv_blocks']:,} blocks of {BLOCK_SIZE} ({ours['kv_gib']:.1f} GiB).\n\n"
            + f"Decode step at ≈{DECODE_CONTEXT + WARMUP + DECODE_STEPS // 2} positions per sequence:\n\n"
            + tabulate(steps, ["batch", "ms/step", "roofline ms", "% of roofline"], tablefmt="github")
            + _mixed_line(ours.get("mixed_step")) + _quant_table(ours))
    lines.append(f"Software: {everything['software']}.")
    return "\n\n".join(lines) + "\n"


def _mixed_line(mixed: dict | None) -> str:
    if not mixed:
        return ""
    return (f"\n\nA mixed chunked-prefill step ({mixed['chunk']} prompt tokens + {mixed['decoding']} decode rows): "
            f"{mixed['mixed_ms']:.2f} ms, against {mixed['decode_ms']:.2f} ms for the {mixed['decoding']} decode rows "
            f"alone (the prompt's {mixed['chunk']} tokens cost {mixed['mixed_ms'] - mixed['decode_ms']:.2f} ms, "
            f"{mixed['chunk'] / max(mixed['mixed_ms'] - mixed['decode_ms'], 1e-9) * 1e3:,.0f} tokens/s).")


def _quant_flag(everything: dict) -> str:
    formats = next((list(r["olmoscope"]["quantized"]) for r in everything["models"].values()
                    if r["olmoscope"].get("quantized")), [])
    return f" --quantized {','.join(formats)}" if formats else ""


def _quant_table(ours: dict) -> str:
    quant = ours.get("quantized")
    if not quant:
        return ""
    def at(table: dict, batch: int):  # int keys in a run, str keys from its JSON
        return table[batch] if batch in table else table[str(batch)]

    rows = []
    for batch in QUANT_BATCHES:
        bf16 = at(ours["decode_steps"], batch)["ms"]
        rows.append([batch, f"{bf16:.2f}"] + [f"{at(q, batch):.2f} ({bf16 / at(q, batch):.2f}×)" for q in quant.values()])
    return ("\n\nDecode step by weight format (the same weights quantized: int8 per row, int4 asymmetric in groups of "
            f"128, lm_head bf16), ms/step (speed-up over bf16):\n\n"
            + tabulate(rows, ["batch", "bf16", *quant], tablefmt="github"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quantized", default="", help="comma-separated weight formats (int8, int4) whose decode "
                        f"step to time at batch {', '.join(map(str, QUANT_BATCHES))} beside bf16's")
    parser.add_argument("--docs", type=Path, help="rewrite this benchmark's section of docs/PERFORMANCE.md")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render a saved run")
    return publish(parser.parse_args(), run, render, SECTION)


def run(args) -> dict:
    """Each model: olmoscope's engine loop, then (unless skipped) transformers' two runners; batch.json after each."""
    args.out.mkdir(parents=True, exist_ok=True)
    everything = {"bandwidth_bytes_per_s": copy_bandwidth(), "software": software(), "models": {}}
    for size in args.models.split(","):
        started = time.perf_counter()
        model, config = random_hf_model(f"olmo2-{size}")
        engine = engine_from(model, config)
        work = prompts(config.vocab_size)
        result = {"olmoscope": olmoscope_side(engine, config, everything["bandwidth_bytes_per_s"], work)}
        del engine
        formats = [f for f in args.quantized.split(",") if f]
        if formats:
            result["olmoscope"]["quantized"] = quantized_steps(model, config, formats, work)
        print(f"[{size}] olmoscope done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if not args.skip_transformers:
            result["generate_batch"] = transformers_batch(model, work)
            result["padded"] = transformers_padded(model, work)
        del model
        torch.cuda.empty_cache()
        everything["models"][size] = result
        (args.out / "batch.json").write_text(json.dumps(everything, indent=2))
        print(f"[{size}] done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return everything


if __name__ == "__main__":
    sys.exit(main())
