"""`olmoscope perplexity ENGINE --text FILE`: the perplexity of a model over a text, in windows of --context tokens.

The strided scheme of Hugging Face's "Perplexity of fixed-length models": the text's tokens are cut into windows of
`context` tokens that start `stride` tokens apart; each window scores only the tokens no earlier window scored
(the first window: all but its first token), each given everything before it inside its window. Every window is
one prompt-scoring request (runtime/scheduler.py, Request.score_from) of the batched runtime, so many windows run
in each step.

    >>> measured = measure(backend, tokens, context=2048, stride=512)
    >>> measured.perplexity == math.exp(measured.nll)
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from olmoscope.display import display_name
from olmoscope.engine_options import engine_options
from olmoscope.errors import OlmoscopeError, UsageError
from olmoscope.readers import decode_utf8, read_capped

MAX_TEXT_BYTES = 64 << 20  # about 15 M tokens; WikiText-2's test split, the usual text, is 1.3 MB
DEFAULT_CONTEXT = 2048  # llama.cpp's default is 512; OLMo 2 was trained at 4096


@dataclass(frozen=True)
class Window:
    """Tokens begin … end − 1 of the text; positions score_from … of the window are scored."""

    begin: int
    end: int
    score_from: int  # inside the window, ≥ 1: a scored token needs one before it

    @property
    def scored(self) -> int:
        return self.end - self.begin - self.score_from


def windows(tokens: int, context: int, stride: int) -> Iterator[Window]:
    """HF's strided windows over a text of `tokens` tokens; windows with nothing to score are left out.

    >>> [(w.begin, w.end, w.score_from) for w in windows(10, context=4, stride=2)]
    [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    """
    scored_to = 0  # tokens before this one have been scored (or are the text's first)
    for begin in range(0, tokens, stride):
        end = min(begin + context, tokens)
        window = Window(begin, end, max(1, scored_to - begin))
        if window.scored > 0:
            yield window
        scored_to = end
        if end == tokens:
            return


@dataclass(frozen=True)
class Perplexity:
    """What a run measured."""

    windows: int  # windows scored
    scored: int  # tokens scored
    evaluated: int  # token positions run through the model (window overlaps count again)
    nll: float  # mean negative log-likelihood of the scored tokens, nats
    seconds: float  # from the first step to the last

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def tokens_per_second(self) -> float:
        """Positions through the model per second (prefill throughput)."""
        return self.evaluated / max(self.seconds, 1e-9)


def measure(backend, tokens: np.ndarray, context: int, stride: int, max_windows: int | None = None,
            progress: bool = False) -> Perplexity:
    """Score every window of `tokens` through one engine loop over `backend`, the windows running side by side."""
    from olmoscope.runtime.loop import EngineLoop

    plan = list(windows(len(tokens), context, stride))[:max_windows]
    loop = EngineLoop(backend)
    requests = (window_request(i, window, tokens) for i, window in enumerate(plan))
    room = 2 * backend.max_seqs  # windows in the loop at once: enough to fill every step, bounded for any text
    nll = np.zeros(len(plan))  # each window's summed NLL, added up in window order at the end (deterministic)
    done = 0  # positions of the finished windows
    started = time.perf_counter()
    with tqdm(total=len(plan), unit="window", desc="perplexity", disable=not progress, file=sys.stderr) as bar:
        while True:
            for request in itertools.islice(requests, room):
                loop.add(request)
                room -= 1
            if not loop.has_work:
                break
            for output in (output for output in loop.step() if output.finished):
                if output.finish_reason != "length":
                    raise OlmoscopeError(f"window {output.request_id}: {output.error or output.finish_reason}")
                i = int(output.request_id)
                nll[i] = -math.fsum(output.prompt_logprobs)
                room, done = room + 1, done + plan[i].end - plan[i].begin
                bar.update(1)
                bar.set_postfix_str(f"{done / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
    scored = sum(w.scored for w in plan)
    mean = float(np.sum(nll)) / scored
    if not math.isfinite(mean):  # NaN or infinite logits somewhere: no perplexity to report
        raise OlmoscopeError(f"the mean NLL is {mean} (the model's logits overflow or hold NaN: `olmoscope verify` "
                             f"checks the file)")
    return Perplexity(len(plan), scored, sum(w.end - w.begin for w in plan), mean, time.perf_counter() - started)


def window_request(i: int, window: Window, tokens: np.ndarray):
    """Window i as a prompt-scoring request that generates nothing (its id: i)."""
    from olmoscope.runtime.scheduler import Request

    return Request(str(i), tokens[window.begin:window.end].tolist(), max_new_tokens=0, score_from=window.score_from)


def read_text(path: Path) -> str:
    """The text file, UTF-8, at most MAX_TEXT_BYTES; empty is refused."""
    shown = f"--text {display_name(str(path))}"
    text = decode_utf8(read_capped(path, MAX_TEXT_BYTES, shown, UsageError), shown, UsageError)
    if not text:
        raise UsageError(f"{shown}: the file is empty")
    return text


def check_window_options(context: int | None, stride: int | None, max_windows: int | None) -> None:
    """Refuse impossible numbers before any file is read (the model's own limit is checked once it is open)."""
    if context is not None and context < 2:
        raise UsageError(f"--context {context}: must be at least 2 (a scored token needs one before it)")
    if stride is not None and stride < 1:
        raise UsageError(f"--stride {stride}: must be at least 1")
    if stride is not None and context is not None and stride > context:
        raise UsageError(f"--stride {stride}: beyond --context {context} (windows would leave tokens unscored)")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max-windows {max_windows}: must be at least 1")


def window_context(context: int | None, model_context: int, max_context: int | None) -> int:
    """--context, or its default: DEFAULT_CONTEXT within the model's context and --max-context."""
    limit = min(model_context, max_context or model_context)
    if context is None:
        return min(DEFAULT_CONTEXT, limit)
    if context > model_context:
        raise UsageError(f"--context {context}: beyond the model's context length {model_context}")
    if context > limit:
        raise UsageError(f"--context {context}: beyond --max-context {max_context}")
    return context


def run_perplexity(engine_path: Path, text_path: Path, context: int | None, stride: int | None,
                   max_windows: int | None, device: str, options, verify: bool = True,
                   progress: bool = False) -> tuple[dict, Perplexity]:
    """Open the engine, tokenize the text, measure: (the run's settings, what it measured)."""
    from olmoscope.runtime.devices import open_backend, resolve_device
    from olmoscope.runtime.engine import open_engine
    from olmoscope.runtime.generator import engine_tokenizer

    check_window_options(context, stride, max_windows)
    text = read_text(text_path)
    resolve_device(device)
    with open_engine(engine_path, verify=verify) as engine:
        context = window_context(context, engine.config.max_position_embeddings, options.max_context)
        stride = stride or context
        check_window_options(context, stride, max_windows)
        tokens = np.asarray(engine_tokenizer(engine).encode(text), np.int32)
        if len(tokens) < 2:
            raise UsageError(f"--text {display_name(str(text_path))}: {len(tokens)} token(s); perplexity needs at "
                             f"least 2")
        options = dataclasses.replace(options, max_context=options.max_context or context)  # the pool fits windows
        with open_backend(engine, device, options) as backend:
            for note in backend.notes:
                click.echo(f"olmoscope: {note}", err=True)
            if context > backend.max_context:
                raise UsageError(f"--context {context}: the KV cache holds only {backend.max_context} positions a "
                                 f"sequence (give it more memory, or lower --context)")
            measured = measure(backend, tokens, context, stride, max_windows, progress)
            settings = {"engine": str(engine_path), "text": str(text_path), "device": backend.device,
                        "backend": backend.name, "context": context, "stride": stride, "text_tokens": len(tokens)}
    return settings, measured


def report(settings: dict, measured: Perplexity) -> dict:
    """The --json object."""
    return {**settings, "windows": measured.windows, "scored_tokens": measured.scored,
            "evaluated_tokens": measured.evaluated, "mean_nll": measured.nll, "perplexity": measured.perplexity,
            "seconds": round(measured.seconds, 3), "tokens_per_second": round(measured.tokens_per_second, 1)}


@click.command("perplexity")
@click.argument("engine_file", metavar="ENGINE", type=click.Path(path_type=Path))
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path),
              help="The text to score: a UTF-8 file, tokenized whole (no BOS added).")
@click.option("--context", type=int,
              help=f"Tokens per window. [default: {DEFAULT_CONTEXT}, or the model's context if shorter]")
@click.option("--stride", type=int, help="Tokens between window starts, 1 … --context. [default: --context]")
@click.option("--max-windows", type=int, help="Score only the first N windows (a quick look).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary line.")
@engine_options
def perplexity_command(engine_file: Path, text_path: Path, context: int | None, stride: int | None,
                       max_windows: int | None, as_json: bool, device: str, options, verify: bool) -> None:
    """The perplexity of ENGINE over a text file: exp(mean negative log-likelihood per token).

    Windows of --context tokens start --stride tokens apart (Hugging Face's "Perplexity of fixed-length
    models"): each window scores only the tokens no earlier window scored, each given everything before it in
    the window; the first window scores all but its first token. With --stride equal to --context (the
    default) windows do not overlap and each window's first token goes unscored; a smaller stride gives every
    scored token more context (a lower perplexity) for more work. llama.cpp's perplexity differs: it cuts
    non-overlapping windows and scores only the second half of each, so its numbers compare only with its
    own. Probabilities are over all of the model's output rows, as in transformers' loss. The windows run
    side by side through the batched runtime; the result is one line on stdout (or --json).
    """
    progress = sys.stderr.isatty() and not as_json
    settings, measured = run_perplexity(engine_file, text_path, context, stride, max_windows, device, options,
                                        verify, progress)
    if as_json:
        click.echo(json.dumps(report(settings, measured)))
        return
    click.echo(f"perplexity {measured.perplexity:.4f} (mean NLL {measured.nll:.5f} nats) over {measured.scored:,} "
               f"tokens in {measured.windows:,} windows of {settings['context']:,}, stride {settings['stride']:,}: "
               f"{measured.seconds:.1f} s, {measured.tokens_per_second:,.0f} tokens/s")
