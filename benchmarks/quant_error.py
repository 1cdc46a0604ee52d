"""What quantization costs: a quantized engine (int8 or int4) against the bf16 engine of the same source.

Per tensor, the relative weight error ‖W_q − W_bf16‖ / ‖W_bf16‖ (dequantized, in float64); for the whole
model, the logits of some prompts through a backend (NumPy by default): max |Δ|, RMS Δ, the share of
positions whose top-1 token agrees, and the mean KL(bf16 ‖ quantized) over positions. Not a test; a smoke
test runs it on a tiny model.

    python3 benchmarks/quant_error.py model-bf16.olmo model-int4.olmo [--prompts 4] [--tokens 32] [--json]
                                      [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.devices import open_backend
from olmoscope.runtime.engine import Engine, open_engine
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.step import Sample, Step, Work

PROMPT_TEXT = ("The history of the printing press begins in", "def fibonacci(n):\n    ", "Photosynthesis is the process",
               "In 1969, the first humans")


def tensor_errors(reference: Engine, quantized: Engine) -> list[dict]:
    """Relative Frobenius error and max |Δ| of every engine tensor, one tensor in memory at a time."""
    rows = []
    for name in reference.weights.names:
        ref = reference.weights.float32(name).astype(np.float64)
        ours = quantized.weights.float32(name).astype(np.float64)
        norm = float(np.linalg.norm(ref))
        delta = ours - ref
        stored = (quantized.weights.matrix(name).format.name if quantized.weights.is_quantized(name)
                  else quantized.weights.tensor(name).dtype.name)
        rows.append({"tensor": name, "stored": stored,
                     "relative_error": float(np.linalg.norm(delta)) / norm if norm else 0.0,
                     "max_abs_error": float(np.abs(delta).max())})
    return rows


def prompts(engine: Engine, count: int, tokens: int, seed: int) -> list[list[int]]:
    """Token ids: the tokenizer's encoding of a few sentences when the engine has one that fits its vocabulary,
    else random ids."""
    if engine.tokenizer_json is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(engine.tokenizer_json)
        texts = [PROMPT_TEXT[i % len(PROMPT_TEXT)] for i in range(count)]
        encoded = [tokenizer.encode(text).ids[:tokens] for text in texts]
        if all(encoded) and max(map(max, encoded)) < engine.vocab_limit:  # a tiny model's vocab may be smaller
            return encoded
    rng = np.random.default_rng(seed)
    return [rng.integers(0, engine.vocab_limit, tokens).tolist() for _ in range(count)]


def prompt_logits(backend, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of every position of one prompt, in one prefill step."""
    table = BlockTable(BlockPool(backend.num_blocks))
    table.reserve(len(ids))
    work = Work(0, 0, ids, list(table.blocks), Sample(SamplingParams()), all_logits=True)
    return np.asarray(backend.run(Step([work], fresh_slots=[0]), return_logits=True).logits, np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_errors(reference: Engine, quantized: Engine, token_lists: list[list[int]], device: str) -> dict:
    """Whole-model agreement over every position of every prompt."""
    options = RuntimeOptions(max_num_seqs=1, max_context=max(map(len, token_lists)) + 16)
    limit = reference.vocab_limit
    per_model = []
    for engine in (reference, quantized):
        backend = open_backend(engine, device, options)
        try:
            per_model.append([prompt_logits(backend, ids)[:, :limit] for ids in token_lists])
        finally:
            backend.close()
    ref, ours = np.concatenate(per_model[0]), np.concatenate(per_model[1])  # [positions, V]
    delta = ours - ref
    p_log, q_log = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    return {"positions": int(ref.shape[0]), "max_abs": float(np.abs(delta).max()),
            "rms": float(np.sqrt((delta ** 2).mean())), "reference_rms": float(np.sqrt((ref ** 2).mean())),
            "top1_agreement": float((ref.argmax(-1) == ours.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max())}


def report(reference_path: str, quantized_path: str, count: int, tokens: int, device: str, seed: int = 0) -> dict:
    with open_engine(reference_path) as reference, open_engine(quantized_path) as quantized:
        if reference.weights.dtype != "bf16":
            raise OlmoscopeError(f"{reference_path}: the reference must be a bf16 engine, not {reference.weights.dtype}")
        if reference.config != quantized.config:
            raise OlmoscopeError(f"{quantized_path}: not the same model as {reference_path} (the configs differ)")
        q = quantized.weights.quantization
        return {"reference": reference_path, "quantized": quantized_path, "weight_dtype": quantized.weights.dtype,
                "quantization": None if q is None else q.to_json(), "device": device,
                "tensors": tensor_errors(reference, quantized),
                "logits": logit_errors(reference, quantized, prompts(reference, count, tokens, seed), device)}


def text(result: dict) -> str:
    from tabulate import tabulate

    rows = [[t["tensor"], t["stored"], f"{t['relative_error']:.4f}", f"{t['max_abs_error']:.3g}"]
            for t in result["tensors"]]
    lg = result["logits"]
    lines = [f"{result['quantized']} ({result['weight_dtype']}) against {result['reference']} (bf16):", "",
             tabulate(rows, ["tensor", "stored", "rel. error", "max |Δ|"]), "",
             f"logits over {lg['positions']} positions ({result['device']}): max |Δ| {lg['max_abs']:.4g}, "
             f"RMS Δ {lg['rms']:.4g} (RMS of the bf16 logits {lg['reference_rms']:.4g}), top-1 agreement "
             f"{100 * lg['top1_agreement']:.1f}%, KL(bf16 ‖ quantized) mean {lg['kl_mean']:.4g} max {lg['kl_max']:.4g}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the bf16 engine file")
    parser.add_argument("quantized", help="the int8 or int4 engine file of the same source")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per prompt (at most)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.tokens < 1:
        parser.error("--prompts and --tokens must be at least 1")
    try:
        result = report(args.reference, args.quantized, args.prompts, args.tokens, args.device)
    except OlmoscopeError as exc:
        print(f"quant_error: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
