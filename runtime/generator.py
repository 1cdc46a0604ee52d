"""`generate`'s engine: one request through the engine loop, until EOS, a stop string, the limit or a full context."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from olmoscope.errors import EngineError, UsageError
from olmoscope.runtime.backend import Backend, RuntimeOptions, check_max_context
from olmoscope.runtime.devices import open_backend, resolve_device
from olmoscope.runtime.engine import Engine, open_engine
from olmoscope.runtime.loop import EngineLoop
from olmoscope.runtime.output import RequestOutput
from olmoscope.runtime.sampler import SamplingError, SamplingParams, make_rng
from olmoscope.runtime.scheduler import Request
from olmoscope.runtime.tokenizer import Tokenizer

@dataclass
class GenerationResult:
    """What one generation produced, and how long it took.

    >>> generate("tiny.olmo", "Language modeling is ", max_new_tokens=4).finish_reason
    'length'
    """

    prompt_token_ids: list[int]  # what was prefilled
    token_ids: list[int]  # generated ids, the EOS or the one completing a stop string included
    text: str  # generated text, up to (not including) a stop string
    finish_reason: str  # "eos", "stop", "length" (max new tokens) or "context" (the context is full)
    backend: str  # "numpy" or "cuda"
    device: str  # what ran it
    max_context: int  # the KV cache's capacity
    seed: int  # the sampler's seed: pass it again to repeat a sampled run
    prefill_s: float = 0.0  # the prompt's forward pass
    time_to_first_token_s: float = 0.0  # prefill plus choosing the first token
    decode_s: float = 0.0  # from the first token to the last
    load_s: float = 0.0  # building the backend (weights upcast or uploaded)
    prompt: str | None = None  # the prompt as given (before any chat template)
    notes: list[str] = field(default_factory=list)  # the backend's remarks for the user

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding; None when fewer than two were generated."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def statistics(self) -> str:
        """One line for stderr: prompt tokens, generated tokens, time to first token, decode speed, backend."""
        rate = self.decode_tokens_per_s
        speed = f"{rate:.1f} tokens/s" if rate is not None else "n/a"
        first = f"{self.time_to_first_token_s * 1e3:.1f} ms" if self.token_ids else "n/a"
        return (
            f"prompt {len(self.prompt_token_ids)} tokens, generated {len(self.token_ids)} ({self.finish_reason}), "
            f"first token {first}, decode {speed}, "
            f"{self.backend} on {self.device}, context {self.max_context}"
        )

    def to_json(self) -> dict:
        """The --json report."""
        return {
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "timings": {
                "load_s": self.load_s,
                "prefill_s": self.prefill_s,
                "time_to_first_token_s": self.time_to_first_token_s if self.token_ids else None,
                "decode_s": self.decode_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
            },
            "backend": self.backend,
            "device": self.device,
            "max_context": self.max_context,
            "seed": self.seed,
        }


def run_generation(
    backend: Backend,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_new_tokens: int,
    seed: int | None = None,
    eos_token_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    tokenizer: Tokenizer | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """One request through the engine loop, a batch of one: prefill, then sample and decode one token at a time.

    Without a tokenizer no text is made (token ids only) and stop strings cannot apply.

    >>> len(run_generation(backend, [9906, 1917], SamplingParams(), max_new_tokens=8).token_ids)
    8
    """
    check_generation_args(max_new_tokens, stop)
    if stop and tokenizer is None:
        raise UsageError("--stop needs a tokenizer to see text")
    check_prompt_fits(len(prompt_ids), backend.max_context)
    make_rng(seed)  # a bad seed fails before any work
    loop = EngineLoop(backend, tokenizer)
    request = Request("generate", [int(i) for i in prompt_ids], params, max_new_tokens, seed, frozenset(eos_token_ids))
    start = time.perf_counter()
    if max_new_tokens == 0:
        output = RequestOutput(request.request_id, request.prompt_ids, make_rng(seed)[1])
        output.finish("length")
    else:
        output = loop.add(request, stop)
        while loop.has_work:
            loop.step()
            text, _ = output.take()
            if text and on_text is not None:
                on_text(text)
    end = time.perf_counter()
    if output.finish_reason == "error":
        raise SamplingError(output.error)
    first = output.first_token_time or end
    return GenerationResult(
        prompt_token_ids=output.prompt_token_ids,
        token_ids=output.token_ids,
        text=output.text,
        finish_reason=output.finish_reason,
        backend=backend.name,
        device=backend.device,
        max_context=backend.max_context,
        seed=output.seed,
        prefill_s=first - start,
        time_to_first_token_s=first - start,
        decode_s=(output.last_token_time or end) - first,
        notes=list(backend.notes),
    )


def check_generation_args(max_new_tokens: int, stop: Sequence[str]) -> None:
    """Refuse bad limits and stop strings before any work."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {max_new_tokens!r}: must be an integer ≥ 0")
    if any(not s for s in stop):
        raise UsageError("--stop: a stop string must not be empty")


def check_prompt_fits(prompt_tokens: int, max_context: int) -> None:
    """A prompt must hold at least one token and fit the KV cache."""
    if prompt_tokens == 0:
        raise UsageError("the prompt is empty: at least one token is needed")
    if prompt_tokens > max_context:
        raise UsageError(f"the prompt has {prompt_tokens} tokens, more than the context ({max_context})")


def engine_tokenizer(engine: Engine) -> Tokenizer:
    """The engine's tokenizer with its chat template (OLMo 2 Instruct's when the file carries none)."""
    if engine.tokenizer_json is None:
        raise EngineError(f"{engine.label}: carries no tokenizer, so text cannot be turned into tokens")
    g = engine.generation
    eos = g.eos_token_ids[0] if g.eos_token_ids else None
    return Tokenizer.from_json(engine.tokenizer_json, g.chat_template, g.bos_token_id, eos, origin=engine.label)


def encode_prompt(engine: Engine, tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's ids (as a one-message chat with --chat), checked against the model's vocabulary."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes from argv or stdin arrive as lone surrogates
        raise UsageError(f"the prompt is not UTF-8 text (bad byte at character {exc.start})") from None
    ids = tokenizer.encode_chat(prompt) if chat else tokenizer.encode(prompt)
    beyond = [i for i in ids if i >= engine.config.vocab_size]
    if beyond:
        raise EngineError(
            f"{engine.label}: the tokenizer produced id {beyond[0]}, beyond the model's {engine.config.vocab_size} rows"
        )
    return ids


def generate(
    engine: str | Path | Engine,
    prompt: str,
    *,
    chat: bool = False,
    device: str = "auto",
    max_context: int | None = None,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    backend: Backend | None = None,
    verify: bool = True,
) -> GenerationResult:
    """Generate from an engine file (or an open Engine) on `device`; stream text pieces to on_text.

    Every argument is checked before the weights are loaded. Pass an open `backend` to reuse its weights.

    >>> generate("tiny.olmo", "Language modeling is ", device="cpu", max_new_tokens=8).finish_reason
    'length'
    """
    sampling = sampling or SamplingParams()
    check_generation_args(max_new_tokens, stop)
    make_rng(seed)  # a bad seed fails now, not after loading
    owned = not isinstance(engine, Engine)
    engine = open_engine(engine, verify=verify) if owned else engine
    try:
        if backend is None:
            resolve_device(device)
        tokenizer = engine_tokenizer(engine)
        prompt_ids = encode_prompt(engine, tokenizer, prompt, chat)
        context = check_max_context(max_context, engine.config) if backend is None else backend.max_context
        check_prompt_fits(len(prompt_ids), context)
        load_start = time.perf_counter()
        own_backend = backend is None
        backend = backend or open_backend(engine, device, RuntimeOptions(max_context=max_context))
        load_s = time.perf_counter() - load_start
        try:
            result = run_generation(
                backend, prompt_ids, sampling, max_new_tokens, seed,
                engine.generation.eos_token_ids, stop, tokenizer, on_text,
            )
        finally:
            if own_backend:
                backend.close()
        result.prompt, result.load_s = prompt, load_s
        return result
    finally:
        if owned:
            engine.close()
