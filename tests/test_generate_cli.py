"""`olmoscope generate` and runtime.generator.generate on a tiny engine file (make-tiny → convert)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from olmoscope.cli import main
from olmoscope.config import ModelConfig
from olmoscope.runtime.backend import Backend, DoneStep, RuntimeOptions
from olmoscope.runtime.step import StepResult
from olmoscope.tiny import tiny_config
from olmoscope.runtime.engine import open_engine
from olmoscope.runtime.generator import generate
from olmoscope.runtime.output import StopScanner
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.tokenizer import Tokenizer

PROMPT = "Language modeling is "  # [14126, 34579, 374, 220]


@pytest.fixture
def engine_file(tiny_engine_file) -> Path:
    return tiny_engine_file


@pytest.fixture(autouse=True)
def no_gpu(cpu_only):
    """Tests run the NumPy backend."""


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["generate", *args], input=input)


def run_json(*args: str, input: str | None = None) -> dict:
    result = run(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_greedy_text_streams_to_stdout_and_statistics_to_stderr(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    report = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert result.stdout == report["text"] + ("" if report["text"].endswith("\n") else "\n")
    stats = result.stderr.strip().splitlines()[-1]
    for fragment in ("prompt 4 tokens", "generated 12 (length)", "first token", "tokens/s", "numpy on cpu"):
        assert fragment in stats, stats


def test_json_report_holds_prompt_ids_text_finish_reason_and_timings(engine_file):
    report = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "10")
    assert report["prompt"] == PROMPT
    assert report["prompt_token_ids"] == [14126, 34579, 374, 220]
    assert len(report["token_ids"]) == 10 and report["finish_reason"] == "length"
    assert report["text"] == Tokenizer.bundled().decode(report["token_ids"])
    assert max(report["token_ids"]) < 100278  # padding rows (100278…100351) never come out
    assert set(report["timings"]) >= {"prefill_s", "time_to_first_token_s", "decode_s", "decode_tokens_per_s"}
    assert (report["backend"], report["device"], report["max_context"]) == ("numpy", "cpu", 4096)


def test_cli_and_python_function_agree(engine_file):
    report = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "8")
    pieces: list[str] = []
    result = generate(engine_file, PROMPT, device="cpu", max_new_tokens=8, on_text=pieces.append)
    assert result.token_ids == report["token_ids"]
    assert "".join(pieces) == result.text == report["text"]


def test_prompt_from_stdin_and_from_a_file(engine_file, tmp_path):
    expected = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "4")["token_ids"]
    assert run_json(str(engine_file), "--max-new-tokens", "4", input=PROMPT + "\n")["token_ids"] == expected
    (tmp_path / "prompt.txt").write_text(PROMPT, encoding="utf-8")
    from_file = run_json(str(engine_file), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "4")
    assert from_file["token_ids"] == expected


def test_chat_wraps_the_prompt_in_the_template(engine_file):
    report = run_json(str(engine_file), "--prompt", "Hi", "--chat", "--max-new-tokens", "2")
    assert Tokenizer.bundled().decode(report["prompt_token_ids"]) == "<|endoftext|><|user|>\nHi\n<|assistant|>\n"


def test_same_seed_same_sample_and_the_seed_is_reported(engine_file):
    args = (str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "1.0", "--top-p", "0.9")
    first = run_json(*args, "--seed", "123")
    assert first["seed"] == 123
    assert run_json(*args, "--seed", "123")["token_ids"] == first["token_ids"]
    unseeded = run_json(*args)
    assert run_json(*args, "--seed", str(unseeded["seed"]))["token_ids"] == unseeded["token_ids"]


def test_stop_string_ends_generation_before_it(engine_file):
    full = generate(engine_file, PROMPT, device="cpu", max_new_tokens=12)
    stop = Tokenizer.bundled().decode(full.token_ids[4:6])  # text that the greedy run is sure to produce
    args = ("--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop, "--stop", "never!")
    report = run_json(str(engine_file), *args)
    assert report["finish_reason"] == "stop"
    assert report["text"] == full.text[: full.text.index(stop)]
    assert stop not in report["text"]


def test_eos_ends_generation_and_is_not_shown(engine_file):
    with open_engine(engine_file) as engine:
        full = generate(engine, PROMPT, device="cpu", max_new_tokens=8)
        eos = full.token_ids[3]
        engine.generation = dataclasses.replace(engine.generation, eos_token_ids=(eos,))
        result = generate(engine, PROMPT, device="cpu", max_new_tokens=8)
    first = full.token_ids.index(eos)
    assert result.finish_reason == "eos"
    assert result.token_ids == full.token_ids[: first + 1]
    assert result.text == Tokenizer.bundled().decode(full.token_ids[:first])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--seed", "-5"], "--seed"),
        (["--stop", ""], "--stop"),
    ],
)
def test_invalid_values_are_refused_before_any_work(args, message, tmp_path):
    # the engine file does not exist: the value must be refused before anything looks for it
    result = run(str(tmp_path / "absent.olmo"), "--prompt", "x", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("olmoscope: error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_prompt_longer_than_the_context_is_refused(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--max-context", "3")
    assert result.exit_code == 2 and "4 tokens, more than the context (3)" in result.stderr, result.output


def test_max_context_beyond_the_model_is_refused(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--max-context", "5000")
    assert result.exit_code == 2 and "beyond the model's context length 4096" in result.stderr, result.output


@pytest.mark.parametrize(
    "args, input, message",
    [
        (["--prompt", "a", "--prompt-file", "p.txt"], None, "not both"),
        (["--prompt-file", "missing.txt"], None, "missing.txt: no such file"),
    ],
)
def test_prompt_sources_are_exactly_one(engine_file, args, input, message):
    result = run(str(engine_file), *args, input=input)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_missing_engine_file_is_one_clear_line(tmp_path):
    result = run(str(tmp_path / "absent.olmo"), "--prompt", "x")
    assert result.exit_code == 1
    assert result.stderr == f"olmoscope: error: {tmp_path / 'absent.olmo'}: no such file\n"


def test_a_file_that_is_not_an_engine_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run(str(tmp_path / "config.json"), "--prompt", "x")
    assert result.exit_code == 1 and result.stderr.startswith("olmoscope: error: "), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_device_cuda_without_a_gpu_is_a_clear_error(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda: no GPU in this test" in result.stderr, result.output


def test_engine_without_a_tokenizer_is_a_clear_error(tmp_path):
    from olmoscope.convert import convert
    from olmoscope.tiny import make_tiny

    snapshot = make_tiny(tmp_path / "snapshot", hidden_size=32, num_layers=1, num_heads=2, vocab_size=256)
    (Path(snapshot) / "tokenizer.json").unlink()
    convert(str(snapshot), tmp_path / "bare.olmo", dtype="fp32")
    result = run(str(tmp_path / "bare.olmo"), "--prompt", "x")
    assert result.exit_code == 1 and "carries no tokenizer" in result.stderr, result.output


def test_streamed_pieces_hold_back_a_possible_stop_string():
    scanner = StopScanner(["STOP"])
    shown = [scanner.add("ab"), scanner.add("cST"), scanner.add("Oxy"), scanner.flush()]
    assert shown == ["ab", "c", "STOxy", ""] and not scanner.stopped
    scanner = StopScanner(["STOP"])
    shown = [scanner.add("abST"), scanner.add("OP and more")]
    assert shown == ["ab", ""] and scanner.stopped and scanner.text == "ab"


def test_invalid_sampling_params_in_python_are_usage_errors():
    from olmoscope.errors import UsageError

    with pytest.raises(UsageError):
        generate("does-not-matter.olmo", "x", sampling=SamplingParams(top_p=0.5), max_new_tokens=-1)


class ScriptedBackend(Backend):
    """Stands in for a backend: 'samples' a fixed script of ids, one per sampled row, and records each step."""

    name, device, notes, vocab_limit = "scripted", "nowhere", [], 100278
    max_context, num_blocks, max_seqs, max_step_tokens = 64, 8, 1, 64

    def __init__(self, script: list[int]):
        self.script, self.steps = list(script), []
        self.config = ModelConfig.from_dict(tiny_config())

    def launch(self, step, return_logits=False):
        arrays = self.check_step(step)
        self.steps.append(arrays.token_ids.tolist())
        tokens = [self.script.pop(0) for _ in arrays.sample_rows]
        return DoneStep(StepResult(np.array(tokens, np.int32)))


def test_streamed_pieces_are_whole_characters():
    from olmoscope.runtime.generator import run_generation

    tokenizer = Tokenizer.bundled()
    text = "日本語 🙂🙂 naïve"  # 語 and each 🙂 take two byte-level tokens
    script = tokenizer.encode(text)
    pieces: list[str] = []
    result = run_generation(ScriptedBackend(script), [9906], SamplingParams(), len(script),
                            tokenizer=tokenizer, on_text=pieces.append)
    assert "".join(pieces) == result.text == text
    assert all("\ufffd" not in piece for piece in pieces), pieces
    assert len(pieces) < len(script)  # some ids completed no character and were held back


def test_each_step_feeds_the_prompt_then_every_generated_id_but_the_last():
    from olmoscope.runtime.generator import run_generation

    backend = ScriptedBackend([5, 6, 7])
    result = run_generation(backend, [1, 2], SamplingParams(repetition_penalty=1.3), 3)
    assert backend.steps == [[1, 2], [5], [6]] and result.token_ids == [5, 6, 7]


def test_repetition_penalty_keeps_seen_tokens_out(engine_file):
    plain = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert len(set(plain["token_ids"])) < 16  # the random tiny model repeats itself greedily
    report = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "16", "--repetition-penalty", "1000")
    ids = report["prompt_token_ids"] + report["token_ids"]
    assert len(set(ids)) == len(ids), f"a seen token came back: {ids}"


@pytest.mark.parametrize("args, input", [(["--prompt", "ok \udcff"], None), ([], b"ok \xff\n")])
def test_a_prompt_that_is_not_utf8_is_one_clear_line(engine_file, args, input):
    result = run(str(engine_file), *args, input=input)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("olmoscope: error: ") and "not UTF-8" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output


def test_a_directory_given_as_the_engine_file_says_so(tmp_path):
    result = run(str(tmp_path), "--prompt", "x")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"olmoscope: error: {tmp_path}: a directory, not an engine file"), result.stderr


def test_zero_new_tokens_reports_no_first_token_time(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "0")
    assert result.exit_code == 0 and result.stdout == "", result.output
    assert "generated 0 (length), first token n/a, decode n/a, numpy on cpu" in result.stderr, result.stderr
    assert run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "0")["timings"]["time_to_first_token_s"] is None


def test_greedy_sample_is_the_argmax_of_the_returned_logits(engine_file):
    from olmoscope.runtime.numpy_backend import NumpyBackend
    from olmoscope.runtime.step import Sample, Step, Work

    with open_engine(engine_file) as engine, NumpyBackend(engine, RuntimeOptions(max_context=16)) as backend:
        work = Work(0, 0, [14126, 34579, 374, 220], [1], Sample(SamplingParams()), all_logits=True)
        result = backend.run(Step([work]), return_logits=True)
        assert result.logits.shape == (4, engine.config.vocab_size)
        assert result.tokens.tolist() == [int(np.argmax(result.logits[-1, : backend.vocab_limit]))]


def test_engine_file_marks_rows_beyond_the_tokenizer_as_padding(engine_file):
    from olmoscope.runtime.numpy_backend import NumpyBackend

    with open_engine(engine_file) as engine, NumpyBackend(engine, RuntimeOptions(max_context=8)) as backend:
        assert engine.config.vocab_size == 100352
        assert backend.vocab_limit == engine.vocab_limit == Tokenizer.bundled().vocab_size == 100278


# ── issue 10: corrupt files, odd files, edge values ────────────────────────────────
from cli_checks import assert_one_line_error  # noqa: E402


def _damaged(engine_file: Path, tmp_path: Path, tensor: str) -> Path:
    from olmoscope.engine_format import EngineFile

    with EngineFile.open(engine_file) as engine:
        entry = engine.entry(tensor)
    data = bytearray(engine_file.read_bytes())
    data[entry.offset + entry.nbytes // 2] ^= 0x10
    out = tmp_path / "damaged.olmo"
    out.write_bytes(bytes(data))
    return out


def test_a_corrupt_tensor_is_an_error_naming_it_and_no_verify_skips_the_check(engine_file, tmp_path):
    damaged = _damaged(engine_file, tmp_path, "layers.1.down_proj")
    assert_one_line_error(run(str(damaged), "--prompt", PROMPT, "--max-new-tokens", "2"),
                          "tensor layers.1.down_proj fails its checksum", "--no-verify skips", exit_code=1)
    result = run(str(damaged), "--prompt", PROMPT, "--max-new-tokens", "2", "--no-verify")
    assert result.exit_code == 0, result.output


def test_open_engine_checks_each_tensor_once_as_it_is_read(engine_file, tmp_path):
    from olmoscope.errors import EngineError

    damaged = _damaged(engine_file, tmp_path, "final_norm")
    with open_engine(damaged) as engine:
        engine.weights.tensor("embedding")  # a good tensor reads fine
        with pytest.raises(EngineError, match="tensor final_norm fails its checksum"):
            engine.weights.float32("final_norm")
    with open_engine(damaged, verify=False) as engine:
        assert engine.weights.tensor("final_norm").shape == (64,)


def test_an_engine_file_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.olmo")
    assert_one_line_error(run(str(tmp_path / "fifo.olmo"), "--prompt", "x"), "not a regular file (a FIFO)", exit_code=1)


@pytest.mark.parametrize("make", ["fifo", "/dev/zero", "directory"])
def test_a_prompt_file_that_is_not_a_regular_file_is_refused(engine_file, tmp_path, make):
    import os

    path = {"fifo": tmp_path / "p.fifo", "/dev/zero": Path("/dev/zero"), "directory": tmp_path}[make]
    if make == "fifo":
        os.mkfifo(path)
    result = run(str(engine_file), "--prompt-file", str(path))
    assert_one_line_error(result, f"--prompt-file {path}", exit_code=2)


def test_a_prompt_on_stdin_is_capped(engine_file, monkeypatch):
    from olmoscope import generate as generate_module

    monkeypatch.setattr(generate_module, "MAX_PROMPT_BYTES", 1000)
    assert_one_line_error(run(str(engine_file), input="x" * 1001), "stdin: the prompt: more than 1,000 bytes", exit_code=2)
    assert run(str(engine_file), "--max-new-tokens", "1", input="x" * 1000).exit_code == 0


def test_sampling_options_ignored_by_greedy_are_noted_in_one_line(engine_file):
    result = run(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "1", "--top-k", "5", "--top-p", "0.5")
    assert result.exit_code == 0
    notes = [line for line in result.stderr.splitlines() if "ignored" in line]
    assert notes == ["olmoscope: note: --top-k, --top-p are ignored with --temperature 0 (greedy: the most likely "
                     "token every time)"]
    quiet = run(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "1", "--temperature", "0.5", "--top-k", "5")
    assert "ignored" not in quiet.stderr


def test_edge_sampling_values_generate_valid_tokens(engine_file):
    greedy = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "4")["token_ids"]
    tiny = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "1e-310")
    assert tiny["token_ids"] == greedy  # T → 0 is greedy when the maximum is unique
    penalized = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "0.7",
                         "--repetition-penalty", "1e-40", "--seed", "3")
    assert all(0 <= t < 100278 for t in penalized["token_ids"])


def test_a_nan_weight_is_one_clear_error_when_sampling(tmp_path):
    from safetensors.numpy import load_file, save_file

    from olmoscope.convert import convert
    from olmoscope.tiny import make_tiny

    snapshot = make_tiny(tmp_path / "snapshot", hidden_size=32, num_layers=1, num_heads=2, vocab_size=256)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = snapshot / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, shard)
    convert(str(snapshot), tmp_path / "nan.olmo", dtype="fp32")
    for extra in ([], ["--temperature", "0.7"]):
        assert_one_line_error(run(str(tmp_path / "nan.olmo"), "--prompt", "x", *extra),
                              "logits hold NaN, so no token can be chosen", exit_code=1)


def test_a_huge_max_new_tokens_allocates_nothing_by_it(engine_file):
    """Issue 10: --max-new-tokens 10000000000 with --max-context 8 once asked for 37 GiB of history; now the context
    ends it, in a moment."""
    report = run_json(str(engine_file), "--prompt", PROMPT, "--max-new-tokens", "10000000000", "--max-context", "8")
    assert report["finish_reason"] == "context" and len(report["token_ids"]) == 8 - 4 + 1, report
