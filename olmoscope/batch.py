"""`olmoscope batch ENGINE -i requests.jsonl -o results.jsonl`: offline generation in OpenAI's batch-file format.

Each input line is {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body"};
each output line, in input order, is {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}. A bad line gets its own 400 result (OpenAI's error object as the body) and the others still run. All
requests go through one engine loop: continuous batching over the paged KV cache.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from olmoscope.atomic import atomic_output, output_path
from olmoscope.engine_options import engine_options
from olmoscope.errors import UsageError
from olmoscope.readers import decode_utf8, parse_json, read_capped
from olmoscope.openai_api import ApiError, Prepared, parse_body, prepare
from olmoscope.openai_shapes import response

MAX_INPUT_BYTES = 1 << 30  # an input file larger than this is refused before it is read
MAX_LINE_BYTES = 16 << 20  # one request line


@dataclass
class Line:
    """One input line: its request, made ready, or the error it earns."""

    custom_id: str | None
    prepared: Prepared | None = None
    error: ApiError | None = None


def read_lines(path: Path) -> list[str]:
    """The input's non-blank lines; a missing, unreadable, non-regular or oversized file is one UsageError."""
    data = read_capped(path, MAX_INPUT_BYTES, f"-i {path}", UsageError)
    return [line for line in decode_utf8(data, f"-i {path}", UsageError).splitlines() if line.strip()]


def parse_line(text: str, url_body) -> Line:
    """A line's custom_id and body; ApiError for anything malformed."""
    data = text.encode("utf-8")
    if len(data) > MAX_LINE_BYTES:
        return Line(None, error=ApiError(400, f"a line of more than {MAX_LINE_BYTES:,} bytes"))
    try:
        raw = parse_json(data, "the line", UsageError)  # duplicate keys, huge integers, deep nesting refused
    except UsageError as exc:
        return Line(None, error=ApiError(400, str(exc)))
    if not isinstance(raw, dict):
        return Line(None, error=ApiError(400, "a line must be a JSON object"))
    custom_id = raw.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else None
    try:
        unknown = sorted(set(raw) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise ApiError(400, f"unsupported field {unknown[0]!r} in the line", unknown[0])
        if custom_id is None:
            raise ApiError(400, "custom_id must be a string", "custom_id")
        if raw.get("method") != "POST":
            raise ApiError(400, "method must be \"POST\"", "method")
        return Line(custom_id, prepared=url_body(raw.get("url"), raw.get("body")))
    except ApiError as error:
        return Line(custom_id, error=error)


def output_line(line: Line, body: dict[str, Any], status: int) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


def run_batch(engine_path: Path, input_path: Path, output: str, device: str, options,
              progress: bool | None = None, verify: bool = True) -> tuple[int, int]:
    """Run every request of the input through one engine loop and write the results; (succeeded, failed)."""
    from olmoscope.runtime.devices import open_backend, resolve_device
    from olmoscope.runtime.engine import open_engine
    from olmoscope.runtime.generator import engine_tokenizer
    from olmoscope.runtime.loop import EngineLoop

    texts = read_lines(input_path)
    output_path = check_output(output)
    resolve_device(device)
    progress = sys.stderr.isatty() if progress is None else progress
    with open_engine(engine_path, verify=verify) as engine:
        tokenizer = engine_tokenizer(engine)
        model = engine_path.stem
        with open_backend(engine, device, options) as backend:
            for note in backend.notes:
                click.echo(f"olmoscope: {note}", err=True)
            eos = frozenset(engine.generation.eos_token_ids)

            def url_body(url, body) -> Prepared:
                parsed = parse_body(url, body)
                if parsed.stream:
                    raise ApiError(400, "a batch cannot stream: leave stream out", "stream")
                return prepare(parsed, tokenizer, model, backend.max_context, engine.config.vocab_size, eos,
                               uuid.uuid4().hex)

            lines = [parse_line(text, url_body) for text in texts]
            loop = EngineLoop(backend, tokenizer)
            outputs = {id(line): line.prepared.submit(loop) for line in lines if line.prepared}
            _run(loop, sum(map(len, outputs.values())), progress)
    created = int(time.time())
    results = []
    for line in lines:
        choices = outputs.get(id(line), [])
        failed = next((o for o in choices if o.finish_reason == "error"), None)
        if line.error:
            results.append(output_line(line, line.error.body(), line.error.status))
        elif failed is not None:  # the model's numbers allowed no token (NaN logits, say)
            error = ApiError(500, failed.error, kind="server_error")
            results.append(output_line(line, error.body(), error.status))
        else:
            results.append(output_line(line, response(choices, line.prepared, model, tokenizer, created), 200))
    write_results(output_path, results)
    return len(outputs), len(lines) - len(outputs)


def _run(loop, total: int, progress: bool) -> None:
    """Step the loop to the end, a progress bar counting finished requests and the tokens/s so far."""
    started = time.perf_counter()
    with tqdm(total=total, unit="req", desc="batch", disable=not progress, file=sys.stderr) as bar:
        while loop.has_work:
            finished = sum(output.finished for output in loop.step())
            if finished:
                bar.update(finished)
                rate = loop.generated_tokens / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)


def check_output(output: str) -> Path:
    """The output path, refused before any work when it cannot be a file there."""
    path = output_path(output, "-o")
    if not path.parent.is_dir():
        raise UsageError(f"-o {output}: no such directory {path.parent}")
    return path


def write_results(path: Path, results: list[dict[str, Any]]) -> None:
    try:
        with atomic_output(path, text=True) as f:
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot write ({exc.strerror or exc})") from None


@click.command("batch")
@click.argument("engine_file", metavar="ENGINE", type=click.Path(path_type=Path))
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Requests, one JSON object a line (OpenAI's batch input format).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="Results, one JSON object a line in input order; written whole or not at all.")
@engine_options
def batch_command(engine_file: Path, input_path: Path, output_path: str, device: str, options, verify: bool) -> None:
    """Generate for every request of an OpenAI batch file (-i) into a results file (-o).

    Lines hold {"custom_id", "method": "POST", "url": "/v1/completions" or "/v1/chat/completions", "body"}; a
    body takes model (optional: the engine file's stem), prompt (text or token ids) or messages, max_tokens,
    temperature, top_p, top_k, seed, stop, repetition_penalty, presence_penalty, frequency_penalty, n, logprobs
    (chat: logprobs and top_logprobs) and echo. A bad line gets a 400 result; the rest run.
    """
    done, failed = run_batch(engine_file, input_path, output_path, device, options, verify=verify)
    click.echo(f"olmoscope: {done} requests done, {failed} refused: results in {output_path}", err=True)
