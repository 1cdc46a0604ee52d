"""`olmoscope demo`: the whole path on the bundled tiny model, on a machine with nothing downloaded.

The bundled model is a recipe, not a file: make-tiny writes it deterministically (seed 0) with random
weights and the real dolma2 tokenizer, so the text it generates is fluent nonsense by design.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click

from olmoscope import arch, tensors
from olmoscope.convert import convert
from olmoscope.engine_format import EngineFile
from olmoscope.errors import EngineError
from olmoscope.sources import resolve
from olmoscope.tiny import make_tiny
from olmoscope.verify import compare_with_source

# The bundled tiny model: GQA (2 query heads per kv head), head_dim 32, the real 100,352-row vocabulary.
TINY_MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, dtype="float32", seed=0)
DEFAULT_PROMPT = "Language modeling is "


def _step(number: int, total: int, title: str) -> None:
    click.secho(f"\n[{number}/{total}] {title}", bold=True)


def run_demo(workdir: Path, prompt: str, max_new_tokens: int) -> None:
    """make-tiny → arch → tensors → convert → verify → generate, printing each step's output."""
    started = time.perf_counter()
    snapshot, engine_path = workdir / "tiny-olmo2", workdir / "tiny-olmo2.bf16.olmo"
    total = 6

    _step(1, total, f"make-tiny {snapshot}  (random weights, seed 0, real dolma2 tokenizer)")
    make_tiny(snapshot, force=True, **TINY_MODEL)
    source = resolve(str(snapshot))
    click.echo(f"wrote {sorted(p.name for p in snapshot.iterdir())}")

    _step(2, total, f"arch {snapshot}")
    for line in arch.summary_lines(source):
        click.echo(line)

    _step(3, total, f"tensors {snapshot} --check")
    for line in tensors.summary_lines(source):
        click.echo(line)

    _step(4, total, f"convert {snapshot} -o {engine_path}  (fp32 → bf16, fused qkv and gate/up)")
    click.echo(convert(source, engine_path, dtype="bf16", force=True).table())

    _step(5, total, f"verify {engine_path} --against {snapshot}")
    with EngineFile.open(engine_path) as engine:
        bad = engine.verify()
        click.echo(f"checksums: {len(engine.entries) - len(bad)} of {len(engine.entries)} tensors match (xxh3-128)")
        comparisons = compare_with_source(engine, source)
        within = sum(c.ok for c in comparisons)
        click.echo(f"against the source: {within} of {len(comparisons)} tensors within their rounding bound")
    if bad or within != len(comparisons):
        raise EngineError(f"{engine_path}: verification failed, see above")  # cannot happen unless the converter is broken

    _step(6, total, f"generate {engine_path} --prompt {prompt!r} --max-new-tokens {max_new_tokens}  (NumPy, CPU)")
    from olmoscope.runtime.generator import generate  # the runtime loads only when it is needed

    click.echo(prompt, nl=False)
    result = generate(engine_path, prompt, device="cpu", max_new_tokens=max_new_tokens,
                      on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    click.echo("")
    click.echo(result.statistics(), err=True)
    click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s")


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the tiny snapshot and engine file here (default: a temporary folder, removed after).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="The prompt for the generate step.")
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1, 512),
              help="Tokens to generate in the last step.")
def demo_command(workdir: Path | None, prompt: str, max_new_tokens: int) -> None:
    """Run the whole path on the bundled tiny OLMo 2 model: make-tiny, arch, tensors, convert, verify, generate.

    Needs no download and no GPU; takes a few seconds on 2 CPU cores. The model has random weights, so
    the generated text is nonsense: the demo shows the machinery, not a language model.
    """
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run_demo(workdir, prompt, max_new_tokens)
        click.echo(f"the snapshot and engine file are in {workdir}")
        return
    with tempfile.TemporaryDirectory(prefix="olmoscope-demo-") as tmp:
        run_demo(Path(tmp), prompt, max_new_tokens)
