"""`olmoscope perplexity`: its loss equals transformers' on the same windows (a tiny random fp32 model).

The reference is written here from Hugging Face's recipe, independently of olmoscope: the text tokenized by the
`tokenizers` library, windows of `context` tokens every `stride`, labels −100 on the tokens an earlier window
scored, Olmo2ForCausalLM's loss per window weighted by the labels it counts. Tolerance: relative error of the mean
NLL ≤ 1e-5 (float32 against float32). Runs with overlapping and non-overlapping windows, many windows per step
and small step budgets (chunked prefill), and the CLI's errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from transformers import Olmo2ForCausalLM

from cli_checks import assert_one_line_error
from olmoscope.cli import main
from olmoscope.convert import convert
from olmoscope.perplexity import windows
from olmoscope.tiny import make_tiny

TOLERANCE = 1e-5
CONTEXT = 128  # the tiny model's trained context
FINAL_NORM_SCALE = 40.0
WORDS = ("the river runs past a stone mill where quiet models count tokens in windows of cached blocks, "
         "and every step of the loop is fast or slow; perplexity says how surprised it was.").split()


def sharpen(snapshot: Path, scale: float) -> None:
    """Scale the final norm's weight: a random model's next-token distribution is nearly uniform (every NLL ≈ ln V),
    which would hide a token scored against the wrong target; scaled, the logprobs spread over several nats."""
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = snapshot / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * np.float32(scale)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.fixture(autouse=True)
def no_gpu(cpu_only):
    """Tests run the NumPy backend."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("perplexity")
    snapshot = make_tiny(directory / "snapshot", seed=3, num_kv_heads=2, max_position_embeddings=CONTEXT)
    sharpen(snapshot, FINAL_NORM_SCALE)
    convert(str(snapshot), directory / "tiny.olmo", dtype="fp32")
    rng = np.random.default_rng(0)
    text = directory / "text.txt"
    text.write_text(" ".join(rng.choice(WORDS, 220)) + "\n", encoding="utf-8")
    model = Olmo2ForCausalLM.from_pretrained(snapshot, dtype=torch.float32, attn_implementation="eager").eval()
    ids = HFTokenizer.from_file(str(snapshot / "tokenizer.json")).encode(text.read_text(encoding="utf-8")).ids
    return {"engine": directory / "tiny.olmo", "text": text, "model": model, "ids": ids}


def transformers_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """HF's recipe: (mean NLL over the scored tokens, how many), each window's loss weighted by its label count."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : (end - begin) - (end - previous_end)] = -100  # scored by an earlier window
        counted = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        if counted:
            with torch.no_grad():
                loss = model(input_ids=window, labels=labels).loss
            total += float(loss) * counted
            count += counted
        previous_end = end
        if end == len(ids):
            break
    return total / count, count


def perplexity(tiny: dict, *options: str):
    return CliRunner().invoke(main, ["perplexity", str(tiny["engine"]), "--text", str(tiny["text"]), "--device",
                                     "cpu", *options])


@pytest.mark.parametrize("context,stride,engine_options", [
    (CONTEXT, CONTEXT, ()),
    (64, 64, ("--max-num-seqs", "3")),
    (64, 24, ()),
    (50, 17, ("--max-num-batched-tokens", "40", "--max-num-seqs", "4")),
    (40, 6, ("--max-num-batched-tokens", "64")),
], ids=["one-window", "non-overlapping", "overlapping", "chunked-prefill", "stride-6"])
def test_the_loss_equals_transformers_on_the_same_windows(tiny, context, stride, engine_options):
    want, scored = transformers_nll(tiny["model"], tiny["ids"], context, stride)
    result = perplexity(tiny, "--context", str(context), "--stride", str(stride), "--json", *engine_options)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    err = abs(got["mean_nll"] - want) / want
    print(f"context {context}, stride {stride}: {got['windows']} windows, NLL {got['mean_nll']:.6f} vs "
          f"transformers {want:.6f}: rel err {err:.1e}")
    assert err <= TOLERANCE, f"relative error {err:.2e}"
    assert got["scored_tokens"] == scored
    assert math.isclose(got["perplexity"], math.exp(got["mean_nll"]), rel_tol=1e-12)


def test_json_is_one_object_with_the_run_and_its_numbers(tiny):
    result = perplexity(tiny, "--context", "64", "--stride", "32", "--json", "--max-windows", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert set(got) == {"engine", "text", "device", "backend", "context", "stride", "text_tokens", "windows",
                        "scored_tokens", "evaluated_tokens", "mean_nll", "perplexity", "seconds", "tokens_per_second"}
    assert (got["backend"], got["context"], got["stride"], got["windows"]) == ("numpy", 64, 32, 3)
    assert got["text_tokens"] == len(tiny["ids"])
    assert (got["scored_tokens"], got["evaluated_tokens"]) == (63 + 32 + 32, 3 * 64)


def test_the_summary_line_names_the_perplexity_and_the_speed(tiny):
    result = perplexity(tiny, "--context", "64")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("perplexity ") and "windows of 64, stride 64" in line and line.endswith("tokens/s")


def test_windows_follow_hugging_faces_strided_scheme():
    def spans(n, context, stride):
        return [(w.begin, w.end, w.score_from) for w in windows(n, context, stride)]

    assert spans(10, 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert spans(10, 4, 3) == [(0, 4, 1), (3, 7, 1), (6, 10, 1)]
    assert spans(9, 4, 4) == [(0, 4, 1), (4, 8, 1)]  # [8, 9) holds one token: nothing to score
    assert spans(3, 8, 8) == [(0, 3, 1)]
    assert spans(7, 4, 1) == [(0, 4, 1), (1, 5, 3), (2, 6, 3), (3, 7, 3)]


@pytest.mark.parametrize("n,context,stride", [(100, 16, 5), (101, 16, 16), (57, 9, 8), (40, 40, 7)])
def test_every_token_but_the_first_is_scored_once_when_windows_overlap(n, context, stride):
    scored = [w.begin + p for w in windows(n, context, stride) for p in range(w.score_from, w.end - w.begin)]
    starts = {w.begin for w in windows(n, context, stride)} - {0}
    expected = [p for p in range(1, n) if stride < context or p not in starts]  # a window's first has no context
    assert scored == expected


@pytest.mark.parametrize("options,fragments", [
    (("--context", "1"), ["--context 1", "at least 2"]),
    (("--context", str(CONTEXT + 1)), [f"--context {CONTEXT + 1}", f"context length {CONTEXT}"]),
    (("--context", "64", "--max-context", "32"), ["--context 64", "--max-context 32"]),
    (("--stride", "0"), ["--stride 0", "at least 1"]),
    (("--context", "16", "--stride", "17"), ["--stride 17", "beyond --context 16"]),
    (("--max-windows", "0"), ["--max-windows 0"]),
], ids=["context-1", "context-past-model", "context-past-max-context", "stride-0", "stride-past-context",
        "max-windows-0"])
def test_bad_window_options_are_one_line_errors(tiny, options, fragments):
    assert_one_line_error(perplexity(tiny, *options), *fragments)


@pytest.mark.parametrize("content,fragments", [
    (b"", ["empty"]),
    (b"a", ["1 token", "at least 2"]),
    (b"caf\xe9 au lait", ["not UTF-8", "offset 3"]),
], ids=["empty", "one-token", "not-utf8"])
def test_bad_texts_are_one_line_errors(tiny, tmp_path, content, fragments):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    result = CliRunner().invoke(main, ["perplexity", str(tiny["engine"]), "--text", str(text), "--device", "cpu"])
    assert_one_line_error(result, "--text", *fragments)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_text_that_is_not_a_regular_file_is_refused(tiny, tmp_path, kind):
    path = tmp_path / "nothing.txt" if kind == "missing" else tmp_path
    result = CliRunner().invoke(main, ["perplexity", str(tiny["engine"]), "--text", str(path), "--device", "cpu"])
    assert_one_line_error(result, "--text", "no such file" if kind == "missing" else "directory")


def test_nan_logits_are_an_error_not_a_perplexity():
    from olmoscope.errors import OlmoscopeError
    from olmoscope.perplexity import measure
    from olmoscope.runtime.backend import RuntimeOptions
    from olmoscope.runtime.engine import Engine
    from olmoscope.runtime.numpy_backend import NumpyBackend
    from test_batched_reference import ENGINE

    arrays = {name: np.array(ENGINE.weights.float32(name)) for name in ENGINE.weights.specs}
    arrays["lm_head"][5] = np.nan  # one output row: every row's log-sum-exp is NaN
    with NumpyBackend(Engine.from_arrays(ENGINE.config, arrays), RuntimeOptions(max_context=64, max_num_seqs=4)) as b:
        with pytest.raises(OlmoscopeError, match="mean NLL is nan"):
            measure(b, np.arange(40, dtype=np.int32) % 90, context=16, stride=16)
