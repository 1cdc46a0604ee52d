"""`olmoscope batch`: OpenAI batch files through the engine loop on the NumPy backend (make-tiny → convert).

Greedy and seeded results must equal, token for token, what `generate` gives for each prompt alone; every bad
line gets its own error result in its place; a bad input file is one clean error line and no output file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_checks import assert_one_line_error
from olmoscope.cli import main
from olmoscope.runtime.engine import open_engine
from olmoscope.runtime.generator import generate
from olmoscope.runtime.sampler import SamplingParams


@pytest.fixture
def engine_file(tiny_engine_file) -> Path:
    return tiny_engine_file


@pytest.fixture(autouse=True)
def no_gpu(cpu_only):
    """Tests run the NumPy backend."""


def line(custom_id, body, url="/v1/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(engine_file: Path, tmp_path: Path, lines: list[str], *options: str):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["batch", str(engine_file), "-i", str(source), "-o", str(target), *options])
    return result, ([json.loads(x) for x in target.read_text().splitlines()] if target.exists() else None)


PROMPTS = ["Language modeling is ", "Hello world", "The capital of France", "a", "Once upon a time, in a land far",
           "1 2 3 4", "¿Qué tal?", "def f(x):"]


def test_greedy_results_equal_generate_alone(engine_file, tmp_path):
    lines = [line(f"c{i}", {"prompt": p, "max_tokens": 4 + 3 * i, "temperature": 0}) for i, p in enumerate(PROMPTS)]
    lines.append(line("chat", {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 9,
                               "temperature": 0}, url="/v1/chat/completions"))
    result, out = run_batch(engine_file, tmp_path, lines, "--max-num-seqs", "4", "--max-num-batched-tokens", "16")
    assert result.exit_code == 0, result.output
    assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(len(PROMPTS))] + ["chat"]
    with open_engine(engine_file) as engine:
        for i, (prompt, o) in enumerate(zip(PROMPTS, out)):
            alone = generate(engine, prompt, device="cpu", max_new_tokens=4 + 3 * i)
            body = o["response"]["body"]
            assert o["response"]["status_code"] == 200 and o["error"] is None
            assert body["object"] == "text_completion" and body["model"] == "tiny"
            assert body["choices"][0]["text"] == alone.text, f"request {i}"
            assert body["usage"] == {"prompt_tokens": len(alone.prompt_token_ids),
                                     "completion_tokens": len(alone.token_ids),
                                     "total_tokens": len(alone.prompt_token_ids) + len(alone.token_ids)}
        chat = generate(engine, "Hi there", chat=True, device="cpu", max_new_tokens=9)
    body = out[-1]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": chat.text}
    assert body["choices"][0]["finish_reason"] == {"length": "length", "eos": "stop"}[chat.finish_reason]


def test_seeded_sampling_and_stop_strings_equal_generate_alone(engine_file, tmp_path):
    params = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)
    lines = [line(f"s{i}", {"prompt": p, "max_tokens": 12, "seed": 100 + i, **params}) for i, p in enumerate(PROMPTS)]
    lines.append(line("ids", {"prompt": [14126, 34579, 374, 220], "max_tokens": 6, "temperature": 0, "stop": " the"}))
    result, out = run_batch(engine_file, tmp_path, lines)
    assert result.exit_code == 0, result.output
    with open_engine(engine_file) as engine:
        for i, (prompt, o) in enumerate(zip(PROMPTS, out)):
            alone = generate(engine, prompt, device="cpu", max_new_tokens=12, seed=100 + i,
                             sampling=SamplingParams(**params))
            assert o["response"]["body"]["choices"][0]["text"] == alone.text, f"request {i}"
        alone = generate(engine, "Language modeling is ", device="cpu", max_new_tokens=6, stop=[" the"])
    assert out[-1]["response"]["body"]["choices"][0]["text"] == alone.text


@pytest.mark.parametrize("bad, status, fragment", [
    ("{not json", 400, "invalid JSON"),
    ("{\"custom_id\": \"d\", \"custom_id\": \"e\"}", 400, "duplicate key"),
    (json.dumps([1, 2]), 400, "JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), 400, "custom_id"),
    (line("b", {"prompt": "x", "best_of": 2}), 400, "unsupported parameter 'best_of'"),
    (line("b", {"prompt": "x", "stream": True}), 400, "cannot stream"),
    (line("b", {"prompt": "x", "temperature": "hot"}), 400, "'temperature'"),
    (line("b", {"prompt": "x", "temperature": 3.5}), 400, "'temperature'"),
    (line("b", {"prompt": ""}), 400, "empty"),
    (line("b", {"prompt": "x", "max_tokens": 5000}), 400, "max_tokens is 5000"),
    (line("b", {"prompt": "x", "model": "gpt-4"}), 404, "does not exist"),
    (line("b", {"prompt": "x"}, url="/v1/embeddings"), 404, "unknown endpoint"),
    (line("b", {"messages": [{"role": "robot", "content": "hi"}]}, url="/v1/chat/completions"), 400, "messages"),
    (line("b", {"messages": "hi"}, url="/v1/chat/completions"), 400, "messages"),
    (line("b", {"prompt": [5, 10**9]}), 400, "beyond the model"),
])
def test_a_bad_line_gets_its_own_error_and_the_rest_run(engine_file, tmp_path, bad, status, fragment):
    good = line("good", {"prompt": "Hello world", "max_tokens": 3, "temperature": 0})
    result, out = run_batch(engine_file, tmp_path, [good, bad, good.replace('"good"', '"after"')],
                            "--max-context", "64")
    assert result.exit_code == 0, result.output
    assert [o["response"]["status_code"] for o in out] == [200, status, 200]
    error = out[1]["response"]["body"]["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}


def test_a_missing_input_is_one_clean_line_and_no_output(engine_file, tmp_path):
    target = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["batch", str(engine_file), "-i", str(tmp_path / "nope.jsonl"), "-o", str(target)])
    assert_one_line_error(result, "nope.jsonl")
    assert not target.exists()


def test_an_input_that_is_a_directory_or_a_fifo_is_refused(engine_file, tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    for source in (tmp_path, tmp_path / "fifo"):
        result = CliRunner().invoke(main, ["batch", str(engine_file), "-i", str(source), "-o", str(tmp_path / "o")])
        assert_one_line_error(result, str(source))
    assert not (tmp_path / "o").exists()


def test_an_output_directory_is_refused_before_any_work(engine_file, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", {"prompt": "x"}) + "\n")
    for target in (str(tmp_path) + "/", str(tmp_path / "missing" / "out.jsonl")):
        result = CliRunner().invoke(main, ["batch", str(engine_file), "-i", str(source), "-o", target])
        assert_one_line_error(result, "-o")


def test_a_failing_engine_leaves_no_output(tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(line("a", {"prompt": "x"}) + "\n")
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "missing.olmo"), "-i", str(source), "-o", str(target)])
    assert_one_line_error(result, "missing.olmo")
    assert not target.exists()


def test_n_choices_and_logprobs_in_a_batch(engine_file, tmp_path):
    """n seeded choices come back in order (choice 0 equal to the request alone with n = 1), each with its tokens'
    logprobs in the completion shape; chat gets the chat shape."""
    lines = [line("n", {"prompt": "Hello world", "max_tokens": 5, "n": 3, "seed": 11, "logprobs": 2}),
             line("one", {"prompt": "Hello world", "max_tokens": 5, "seed": 11}),
             line("chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
                           "logprobs": True, "top_logprobs": 1}, url="/v1/chat/completions")]
    result, out = run_batch(engine_file, tmp_path, lines)
    assert result.exit_code == 0, result.output
    choices = out[0]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[0]["text"] == out[1]["response"]["body"]["choices"][0]["text"]
    assert out[0]["response"]["body"]["usage"]["completion_tokens"] == 15
    for choice in choices:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
        assert all(len(top) <= 3 and token in top for token, top in zip(lp["tokens"], lp["top_logprobs"]))
    content = out[2]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 1 for e in content)
    assert all(e["logprob"] == e["top_logprobs"][0]["logprob"] for e in content)  # greedy: the best one
