"""`olmoscope generate FILE`: text from an engine file, streamed, with a line of statistics on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from olmoscope.display import display_name
from olmoscope.errors import UsageError
from olmoscope.readers import decode_utf8, read_capped, read_stream

MAX_PROMPT_BYTES = 64 << 20  # 16 M tokens of text: past any context window; /dev/zero stops here


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file (- for stdin) or piped stdin: exactly one of them.

    From a file or stdin one trailing newline is dropped: `echo text |` and editors add it.
    """
    if prompt is not None and prompt_file is not None:
        raise UsageError("give the prompt once: --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    return _drop_final_newline(_read_prompt_text(prompt_file))


def _drop_final_newline(text: str) -> str:
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _read_prompt_text(prompt_file: Path | None) -> str:
    """A regular file (a FIFO or a device is refused: use - and a pipe), or stdin; at most MAX_PROMPT_BYTES."""
    if prompt_file is not None and str(prompt_file) != "-":
        shown = f"--prompt-file {display_name(str(prompt_file))}"
        return decode_utf8(read_capped(prompt_file, MAX_PROMPT_BYTES, shown, UsageError), shown, UsageError)
    if prompt_file is None and sys.stdin.isatty():
        raise UsageError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:  # a text stream without bytes underneath (an embedding application's)
        return sys.stdin.read(MAX_PROMPT_BYTES)
    data = read_stream(stdin, MAX_PROMPT_BYTES, "stdin: the prompt", UsageError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("stdin: the prompt is not UTF-8 text") from None


def sampling_notes(temperature: float, top_k: int, top_p: float, seed: int | None) -> list[str]:
    """What a greedy run ignores, said once: options given with --temperature 0 that cannot apply."""
    if temperature != 0:
        return []
    ignored = [name for name, given in (("--top-k", top_k != 0), ("--top-p", top_p != 1.0), ("--seed", seed is not None))
               if given]
    if not ignored:
        return []
    return [f"note: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with --temperature 0 "
            f"(greedy: the most likely token every time)"]


def _write(piece: str) -> None:
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()  # token by token, even when stdout is a pipe


@click.command("generate")
@click.argument("engine_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", help="The prompt text.")
@click.option("--prompt-file", type=click.Path(path_type=Path),
              help="Read the prompt from a file (- for stdin); one trailing newline is dropped.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user message in the file's chat template.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: the CUDA backend when a GPU and PyCUDA are present, else the NumPy reference.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Stop after this many tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 is greedy (reproducible, transformers' default); > 0 samples.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0: off).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Sample within this probability mass (1: off).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Divide positive / multiply negative logits of seen tokens (1: off).")
@click.option("--seed", type=int, help="Seed for sampling; the same seed repeats a run (printed with --json).")
@click.option("--stop", multiple=True, metavar="STRING", help="Stop when the text contains STRING (repeatable).")
@click.option("--max-context", type=int,
              help="KV-cache size in tokens (default: the model's context length, on a GPU capped by free memory).")
@click.option("--json", "as_json", is_flag=True, help="Print prompt, token ids, text, finish reason, timings as JSON.")
@click.option("--no-verify", is_flag=True,
              help="Skip the tensor checksums (each weight is checked as it is first read; the header always is).")
def generate_command(engine_file: Path, prompt: str | None, prompt_file: Path | None, chat: bool, device: str,
                     max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                     seed: int | None, stop: tuple[str, ...], max_context: int | None, as_json: bool,
                     no_verify: bool) -> None:
    """Generate text from an engine FILE made by `olmoscope convert`.

    The text streams to stdout as it is made; a last line of statistics goes to stderr.
    """
    from olmoscope.runtime.engine import open_engine
    from olmoscope.runtime.generator import check_generation_args, generate
    from olmoscope.runtime.sampler import SamplingParams, make_rng

    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    check_generation_args(max_new_tokens, stop)
    make_rng(seed)
    text = read_prompt(prompt, prompt_file)
    on_text = None if as_json else _write
    with open_engine(engine_file, verify=not no_verify) as engine:  # generate() leaves an open Engine open
        result = generate(engine, text, chat=chat, device=device, max_context=max_context,
                          max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop=stop, on_text=on_text)
    if as_json:
        click.echo(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    elif result.text and not result.text.endswith("\n"):
        click.echo()
    for note in [*sampling_notes(temperature, top_k, top_p, seed), *result.notes]:  # after the work: an error stays one line
        click.echo(f"olmoscope: {note}", err=True)
    click.echo(result.statistics(), err=True)
