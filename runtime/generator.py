"""The generation loop shared by every backend: tokenize, prefill, decode until EOS, a stop string or the limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from olmoscope.errors import EngineError, UsageError
from olmoscope.runtime.backend import Backend, check_max_context, open_backend, resolve_device
from olmoscope.runtime.engine import Engine, open_engine
from olmoscope.runtime.sampler import SamplingParams, make_rng
from olmoscope.runtime.tokenizer import TextStream, Tokenizer

@dataclass
class GenerationResult:
    """What one generation produced, and how long it took.

    >>> generate("tiny.olmo", "Language modeling is ", max_new_tokens=4).finish_reason
    'length'
    """

    prompt_token_ids: list[int]  # what was prefilled
    token_ids: list[int]  # generated ids, the EOS or the one completing a stop string included
    text: str  # generated text, up to (not including) a stop string
    finish_reason: str  # "eos", "stop" or "length"
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


class StopScanner:
    """Assembles streamed text, holding back what could still become a stop string.

    >>> s = StopScanner(["\\n\\n"]); s.add("Hi\\n"), s.add("\\nthere")
    ('Hi', '')
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""  # everything released or held, up to a stop string
        self.released = 0  # characters of text handed out so far
        self.stopped = False  # a stop string was found

    def add(self, piece: str) -> str:
        """Take the next piece; return what can be shown now."""
        before = len(self.text)
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop_length())

    def flush(self) -> str:
        """Everything still held back (the generation ended without a stop string)."""
        return self._release(len(self.text))

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of text that begins some stop string."""
        longest = max((len(s) for s in self.stop), default=1)
        for n in range(min(longest - 1, len(self.text) - self.released), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        piece, self.released = self.text[self.released : end], max(self.released, end)
        return piece


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
    """Prefill prompt_ids on a reset backend, then sample and decode one token at a time.

    Without a tokenizer no text is made (token ids only) and stop strings cannot apply.

    >>> len(run_generation(backend, [9906, 1917], SamplingParams(), max_new_tokens=8).token_ids)
    8
    """
    check_generation_args(max_new_tokens, stop)
    if stop and tokenizer is None:
        raise UsageError("--stop needs a tokenizer to see text")
    check_prompt_fits(len(prompt_ids), backend.max_context)
    rng, seed = make_rng(seed)
    history = np.zeros(len(prompt_ids) + max_new_tokens, np.int32)  # prompt then generated ids
    history[: len(prompt_ids)] = prompt_ids
    stream: TextStream | None = tokenizer.stream() if tokenizer else None
    scanner = StopScanner(stop)

    def emit(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    eos = set(eos_token_ids)

    backend.reset()
    start = time.perf_counter()
    backend.prefill(np.asarray(prompt_ids, np.int32))
    prefill_end = first_token = time.perf_counter()
    generated: list[int] = []
    finish = "length"
    while len(generated) < max_new_tokens:
        token = backend.sample(params, rng, history[: len(prompt_ids) + len(generated)])
        if not generated:
            first_token = time.perf_counter()
        history[len(prompt_ids) + len(generated)] = token
        generated.append(token)
        if token in eos:
            finish = "eos"
            break
        if stream is not None:
            emit(scanner.add(stream.step(token)))
            if scanner.stopped:
                finish = "stop"
                break
        if len(generated) == max_new_tokens or backend.position >= backend.max_context:
            break  # the last token needs no forward pass: nothing will read its logits
        backend.decode_step(token)
    end = time.perf_counter()
    emit(scanner.flush())
    return GenerationResult(
        prompt_token_ids=[int(i) for i in prompt_ids],
        token_ids=generated,
        text=scanner.text,
        finish_reason=finish,
        backend=backend.name,
        device=backend.device,
        max_context=backend.max_context,
        seed=seed,
        prefill_s=prefill_end - start,
        time_to_first_token_s=first_token - start,
        decode_s=end - first_token if generated else 0.0,
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
    engine = open_engine(engine) if owned else engine
    try:
        if backend is None:
            resolve_device(device)
        tokenizer = engine_tokenizer(engine)
        prompt_ids = encode_prompt(engine, tokenizer, prompt, chat)
        context = check_max_context(max_context, engine.config) if backend is None else backend.max_context
        check_prompt_fits(len(prompt_ids), context)
        load_start = time.perf_counter()
        own_backend = backend is None
        backend = backend or open_backend(engine, device, max_context)
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
