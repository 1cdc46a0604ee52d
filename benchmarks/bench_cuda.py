"""olmoscope's CUDA runtime against transformers, same random weights, same card, same run.

For each model size (real OLMo 2 1B / 7B dimensions, random bf16 weights made on the GPU): olmoscope's
prefill tokens/s at 128 and 2048 tokens, decode ms/token at context 128 and 2048, bytes read per token and
the % of the roofline (device copy bandwidth measured in this run), peak GPU memory; then transformers'
Olmo2ForCausalLM on the same weights, eager (sdpa attention, dynamic cache) and with a static cache +
torch.compile (mode reduce-overhead). Writes JSON and a markdown section; prints the table last.

    python3 benchmarks/bench_cuda.py --models 1b,7b --out results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM, StaticCache

from olmoscope.bench import CONTEXTS, PROMPT_LENGTHS, BenchResult, bench_backend, copy_bandwidth, table
from olmoscope.config import ModelConfig
from olmoscope.engine_format import Quantization
from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.cuda.backend import CudaBackend
from olmoscope.runtime.engine import Engine
from olmoscope.spec import engine_tensors

PRESETS = Path(__file__).resolve().parents[1] / "olmoscope" / "data" / "presets"
DECODE_STEPS = 64
INT4_GROUP = 128  # --int4: convert's default group size


def random_hf_model(preset: str) -> tuple[Olmo2ForCausalLM, ModelConfig]:
    """transformers' model in bf16 on the GPU, initialised randomly there (std 0.02; norms 1 + 0.1·randn)."""
    raw = json.loads((PRESETS / f"{preset}.json").read_text())
    config = ModelConfig.from_dict(raw, origin=preset)
    hf_config = Olmo2Config(**{k: v for k, v in raw.items() if not k.startswith("_")})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Olmo2ForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param, dtype=torch.float32))
            else:
                param.normal_(0.0, 0.02)
    return model.eval(), config


def int4_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 per group of `group` inputs on the GPU, convert's rule (range widened to hold 0, s = range/15
    rounded up to fp16, z = round(−min/s)): (packed nibbles u8 [N, K/2], scales f16 [N, K/G], zeros u8 [N, K/G])."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s16 = ((hi - lo) / 15).to(torch.float16)
    s16 = torch.where(s16.float() < (hi - lo) / 15, torch.nextafter(s16, torch.full_like(s16, torch.inf)), s16)
    s = s16.float().clamp_min(torch.finfo(torch.float32).tiny)
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.cpu().numpy(), s16.cpu().numpy(), z.to(torch.uint8).cpu().numpy()


def engine_from(model: Olmo2ForCausalLM, config: ModelConfig, int8: bool = False, int4: bool = False) -> Engine:
    """The same weights under engine names (fused on the GPU, then to host memory as bf16 / f32), or quantized
    to int8 with one f32 scale per row (w ≈ q·scale, scale = max|row| / 127), as `convert --dtype int8` does, or
    to int4 (int4_groups; the lm_head stays bf16, as convert's default)."""
    state = model.state_dict()
    tensors, scales, zeros = {}, {}, {}
    for spec in engine_tensors(config):
        fused = torch.cat([state[part.name] for part in spec.sources])
        if spec.kind != "matrix":
            tensors[spec.name] = fused.float().cpu().numpy()
        elif int4 and spec.role not in ("embedding", "lm_head"):
            tensors[spec.name], scales[spec.name], zeros[spec.name] = int4_groups(fused)
        elif int8:
            scale = fused.float().abs().amax(dim=1).clamp_min(1e-12) / 127
            tensors[spec.name] = torch.round(fused.float() / scale[:, None]).to(torch.int8).cpu().numpy()
            scales[spec.name] = scale.cpu().numpy()
        else:
            tensors[spec.name] = fused.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        del fused
    if int4:
        return Engine.from_arrays(config, tensors, scales, zeros=zeros,
                                  quantization=Quantization("int4", "asym", INT4_GROUP, False))
    return Engine.from_arrays(config, tensors, scales or None)


def cuda_ms(fn, repeats: int) -> float:
    """Median ms of fn() over repeats, timed with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def hf_prefill(model, length: int) -> float:
    ids = torch.randint(0, 100000, (1, length), device="cuda")
    return length / (cuda_ms(lambda: model(ids, logits_to_keep=1), 5) / 1e3)


@torch.no_grad()
def hf_decode_eager(model, context: int) -> float:
    """ms/token: a dynamic cache, one forward per token, greedy pick on the GPU."""
    ids = torch.randint(0, 100000, (1, context), device="cuda")

    def run():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / DECODE_STEPS * 1e3

    run()
    return run()


@torch.no_grad()
def hf_decode_compiled(model, contexts: list[int]) -> dict[int, float]:
    """ms/token with a static cache and torch.compile(mode="reduce-overhead") on the one-token forward."""
    cache = StaticCache(config=model.config, max_cache_len=max(contexts) + DECODE_STEPS + 16)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    results = {}
    for context in contexts:
        ids = torch.randint(0, 100000, (1, context), device="cuda")

        def run():
            cache.reset()
            out = model(ids, past_key_values=cache, cache_position=torch.arange(context, device="cuda"),
                        use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            position = torch.tensor([context], device="cuda")
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(DECODE_STEPS):
                out = step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
                token = out.logits[:, -1:].argmax(-1).clone()
                position = position + 1
            torch.cuda.synchronize()
            return (time.perf_counter() - started) / DECODE_STEPS * 1e3

        run()  # compiles (first context) and records the graphs
        results[context] = min(run(), run())
    return results


def bench_transformers(model, device: str) -> list[BenchResult]:
    torch.cuda.reset_peak_memory_stats()
    eager = BenchResult("transformers eager (sdpa)", device)
    for length in PROMPT_LENGTHS:
        eager.prefill_tokens_per_s[length] = hf_prefill(model, length)
    for context in CONTEXTS:
        eager.decode_ms_per_token[context] = hf_decode_eager(model, context)
    eager.peak_memory_bytes = torch.cuda.max_memory_allocated()
    compiled = BenchResult("transformers static cache + compile", device)
    try:
        torch.cuda.reset_peak_memory_stats()
        compiled.decode_ms_per_token = hf_decode_compiled(model, list(CONTEXTS))
        compiled.peak_memory_bytes = torch.cuda.max_memory_allocated()
    except Exception as exc:  # a compile failure must not lose the rest of the run
        compiled.notes.append(f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    return [eager, compiled]


SECTION = "bench_cuda"
PREFACE = """## CUDA runtime

`benchmarks/device_check.sh bench` on the GPU machine (it installs the carried wheels, then runs
`python3 benchmarks/bench_cuda.py --models 1b,7b --int8 --int4 --docs docs/PERFORMANCE.md`). Random weights at the real
OLMo 2 dimensions, made on the GPU by transformers' `Olmo2ForCausalLM` in bf16 (std 0.02, norm weights
1 + 0.1·randn), then handed to olmoscope as an in-memory engine (`Engine.from_arrays`: the same upload path as
an engine file, without the disk); int8 rows quantize the same weights per row (scale = max|row| / 127).

- prefill: prompt length / median wall time of 5 prefills after a warm-up (last token's logits only;
  transformers: `model(ids, logits_to_keep=1)`, sdpa attention);
- decode: mean over 64 greedy tokens after a prompt of the given length, through the generator's own loop
  (`decode_step` + sampling on the GPU + the token id back to the host); transformers eager: one forward per
  token with a dynamic cache, argmax on the GPU; transformers static + compile: a `StaticCache` and
  `torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)` for the one-token step;
- bytes/token: what one decode step must read (every weight but the embedding table, of which one row, plus
  the KV cache at that context); roofline = those bytes / the device-to-device copy bandwidth (bytes read +
  written) measured in the same run; the same bytes are used for transformers' % (same model);
- peak GPU memory: what olmoscope allocated (weights, 4096-token KV cache, workspaces); transformers:
  `torch.cuda.max_memory_allocated()`.
"""


def render(everything: dict) -> str:
    """The markdown section (between its markers) from the JSON the run wrote."""
    bandwidth = everything["bandwidth_bytes_per_s"]
    parts = [PREFACE.rstrip("\n")]
    for size, rows in everything["models"].items():
        results = [BenchResult(**row) for row in rows]
        for r in results[1:]:  # the same model reads the same bytes, whoever runs it
            r.bytes_per_token = r.bytes_per_token or results[0].bytes_per_token
            r.roofline_ms = r.roofline_ms or results[0].roofline_ms
        notes = "".join(f"\n- {r.label}: {n}" for r in results for n in r.notes)
        parts.append(f"### OLMo-2-{size.upper()} dimensions on {results[0].device}\n\n{table(results, bandwidth)}{notes}")
    parts.append(f"Software: {everything.get('software', 'not recorded')}.")
    return "\n\n".join(parts) + "\n"


def write_section(path: Path, text: str, section: str = SECTION) -> None:
    """Replace a benchmark's section of docs/PERFORMANCE.md (between its markers), or append it."""
    begin, end = f"<!-- {section}: begin -->", f"<!-- {section}: end -->"
    doc = path.read_text() if path.exists() else "# Performance\n"
    block = f"{begin}\n{text}{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def software() -> str:
    import subprocess

    import transformers

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return (f"driver {driver}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {sys.version.split()[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,7b", help="comma-separated presets: 1b, 7b")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for bench.json and cuda_section.md")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also time an int8-weight engine of the same model")
    parser.add_argument("--int4", action="store_true", help=f"also time an int4 engine (asymmetric, groups of "
                        f"{INT4_GROUP}) of the same model")
    parser.add_argument("--docs", type=Path, help="rewrite this file's CUDA runtime section (docs/PERFORMANCE.md)")
    parser.add_argument("--render", type=Path, metavar="BENCH_JSON", help="only render a saved run's section")
    return publish(parser.parse_args(), run, render, SECTION)


def publish(args, run, render, section: str) -> int:
    """Every benchmark's ending: a saved run (--render JSON) or a new one (run(args)), rendered, written into its
    section of --docs when given, and printed."""
    everything = json.loads(args.render.read_text()) if args.render else run(args)
    text = render(everything)
    if args.docs:
        write_section(args.docs, text, section)
    print(text)
    return 0


def run(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    everything = {"bandwidth_bytes_per_s": bandwidth, "software": software(), "models": {}}
    for size in args.models.split(","):
        started = time.perf_counter()
        model, config = random_hf_model(f"olmo2-{size}")
        engine = engine_from(model, config)
        print(f"[{size}] weights made in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        with CudaBackend(engine, RuntimeOptions(max_context=4096), progress=False) as backend:
            device = backend.device
            results = [bench_backend(backend, bandwidth=bandwidth, label="olmoscope cuda (bf16)")]
        del engine
        for flag, label in ((args.int8, "int8"), (args.int4, "int4")):
            if not flag:
                continue
            engine = engine_from(model, config, int8=label == "int8", int4=label == "int4")
            with CudaBackend(engine, RuntimeOptions(max_context=4096), progress=False) as backend:
                results.append(bench_backend(backend, bandwidth=bandwidth, label=f"olmoscope cuda ({label} weights)"))
            del engine
        print(f"[{size}] olmoscope done at {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if not args.skip_transformers:
            results += bench_transformers(model, device)
        del model
        torch.cuda.empty_cache()
        print(f"[{size}] transformers done at {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        everything["models"][size] = [asdict(r) for r in results]
        (args.out / "bench.json").write_text(json.dumps(everything, indent=2))
        (args.out / "cuda_section.md").write_text(render(everything))
    return everything


if __name__ == "__main__":
    sys.exit(main())
