"""The backend interface every runtime implements (NumPy reference, PyCUDA), and picking one for --device.

A backend owns the model's weights on its device and one KV cache. The generation loop
(generator.py), the sampler's rules (sampler.py) and the tokenizer are shared; a backend only runs the
forward pass and chooses the next token.

Contract (shapes are per sequence; there is no batch dimension):

- ``name``: ``"numpy"`` or ``"cuda"``; ``device``: what runs it, for the statistics line (``"cpu"``,
  ``"NVIDIA H100 80GB HBM3"``); ``notes``: lines for the user (e.g. "max context capped by free memory").
- ``config``: the engine's ModelConfig. ``vocab_size`` = config.vocab_size V (padded rows included).
- ``vocab_limit``: the tokenizer's vocabulary size (≤ V). Ids ≥ vocab_limit are padding rows: ``sample``
  never returns one (their logits are set to -inf first). ``logits`` still carry all V columns, raw.
- ``max_context``: the KV cache's capacity in tokens, fixed when the backend is built (``--max-context``,
  else the model's ``max_position_embeddings``, possibly capped by memory; never above the model's).
- ``position``: how many tokens the KV cache holds = the position the next token will take.
- The backend allocates and owns the KV cache (keys after QK-norm and RoPE, and values, for every layer,
  ``max_context`` positions); nothing outside reads it. ``reset()`` forgets its contents (position 0)
  without freeing or reloading anything; the weights stay.
- ``prefill(token_ids, return_logits=False)``: token_ids is int [T], 1 ≤ T ≤ max_context - position.
  Runs the forward pass for the tokens at positions position … position+T-1 (causal over the cache and
  themselves), appends their keys/values, advances ``position`` by T and keeps the logits of the last
  token for ``sample``. The generator calls it once, right after ``reset()``; the NumPy backend also
  accepts further chunks (chunked prefill), a GPU backend may refuse them with a ValueError. With
  ``return_logits`` it returns float32 [T, V], a new array the caller owns (all prompt positions, for
  tests); otherwise None (a GPU backend may then skip the lm_head for all but the last token).
- ``decode_step(token_id, return_logits=False)``: one token at ``position``: appends its keys/values,
  advances ``position`` by 1, keeps its logits for ``sample``. With ``return_logits`` returns float32 [V].
- ``sample(params, rng, history)``: the next token id (int) from the logits kept by the last
  ``prefill``/``decode_step``, by the rules of sampler.py: padding mask, repetition penalty over
  ``history``, greedy (argmax, lowest id on ties) when temperature is 0, else temperature, then the kept
  set of top-k (exactly k ids, lower id first on ties, so top-k 1 is greedy) and top-p, then one draw
  from the kept distribution. How the draw is made is the backend's (NumPy: inverse CDF with one
  ``rng.random()``; a GPU may use Gumbel-max with counter-based noise), but all randomness comes from
  ``rng``, the run's numpy Generator, consumed the same way on every call (none when greedy), so a
  fixed seed repeats a run on the same backend. ``history`` is int32 [n]: every token id so far
  (prompt, then generated), read only by the repetition penalty; it grows by one between calls.
  Sampling does not touch the cache: the caller feeds the chosen token to ``decode_step``.
- Overflowing the cache (position + T > max_context) raises UsageError before any work.
- ``close()`` frees device memory; a closed backend is not used again. Backends are context managers.

Building one: ``NumpyBackend(engine, max_context=None)``; the CUDA backend lives in
``olmoscope.runtime.cuda.backend`` (runtime/cuda/backend.py), which must import without PyCUDA and
provide ``available() -> tuple[bool, str]`` ((True, "") or (False, the reason, one line)) and
``CudaBackend(engine, max_context=None)``. The engine (runtime/engine.py) gives ``engine.config``,
``engine.vocab_limit`` and ``engine.weights``: ``.dtype`` ("bf16" | "fp16" | "fp32" | "int8"),
``.names`` (engine tensor names in consumption order), ``.specs`` (name → spec.EngineTensorSpec),
``.tensor(name)`` (the stored array, a read-only memory map; in int8 files a matrix is int8 when
quantized, the embedding stays bf16), ``.scales(name)`` (float32 [rows] of an int8 tensor),
``.float32(name)`` (upcast / dequantized copy), ``.layer(l)`` (one block's arrays by role),
``.head_name`` ("lm_head", or "embedding" when tied).
"""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING

import numpy as np

from olmoscope.errors import UsageError

if TYPE_CHECKING:
    from olmoscope.config import ModelConfig
    from olmoscope.runtime.engine import Engine
    from olmoscope.runtime.sampler import SamplingParams

DEVICES = ("auto", "cpu", "cuda")


class Backend(abc.ABC):
    """One model on one device with one KV cache; see the module docstring for the exact contract.

    >>> with open_backend(engine, "cpu") as backend: backend.prefill(np.array([9906, 1917]))
    """

    name: str  # "numpy" or "cuda"
    device: str  # what runs it, for the statistics line
    config: ModelConfig  # the engine's model
    vocab_limit: int  # ids at or above this are padding rows, never sampled
    max_context: int  # KV-cache capacity in tokens
    notes: list[str]  # lines worth telling the user (stderr)

    @property
    def vocab_size(self) -> int:
        """V: logits columns, padding rows included."""
        return self.config.vocab_size

    @property
    @abc.abstractmethod
    def position(self) -> int:
        """Tokens held in the KV cache: the position the next token takes."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the KV cache's contents (position 0); weights and allocations stay."""

    @abc.abstractmethod
    def prefill(self, token_ids: np.ndarray, return_logits: bool = False) -> np.ndarray | None:
        """Run T tokens (int [T]) into the cache; float32 [T, V] logits when asked."""

    @abc.abstractmethod
    def decode_step(self, token_id: int, return_logits: bool = False) -> np.ndarray | None:
        """Run one token into the cache; float32 [V] logits when asked."""

    @abc.abstractmethod
    def sample(self, params: SamplingParams, rng: np.random.Generator, history: np.ndarray) -> int:
        """The next token id from the last logits, by sampler.py's rules."""

    def close(self) -> None:
        """Free what the backend holds (nothing to do for host memory)."""

    def check_room(self, count: int) -> None:
        """Refuse, before any work, to run `count` more tokens than the cache has room for."""
        if count < 1:
            raise UsageError("nothing to run: at least one token is needed")
        if self.position + count > self.max_context:
            raise UsageError(
                f"context full: {self.position} + {count} tokens exceed max context {self.max_context}"
            )

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ── choosing a backend for --device ────────────────────────────────────────────────
CUDA_MODULE = "olmoscope.runtime.cuda.backend"  # provides available() -> (bool, reason) and CudaBackend


def cuda_availability() -> tuple[bool, str]:
    """(True, "") when the CUDA backend can run here, else (False, why not).

    >>> cuda_availability()[0]   # on a machine without an NVIDIA GPU
    False
    """
    try:
        module = importlib.import_module(CUDA_MODULE)
    except Exception as exc:  # a broken driver or PyCUDA install must not stop --device auto
        return False, f"the CUDA backend cannot be imported ({exc})"
    return module.available()


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when the CUDA backend is available, else "cpu"; "cuda" unavailable → UsageError."""
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    usable, reason = cuda_availability()
    if usable:
        return "cuda"
    if device == "cuda":
        raise UsageError(f"--device cuda: {reason}")
    return "cpu"


def open_backend(engine: Engine, device: str = "auto", max_context: int | None = None) -> Backend:
    """Build the backend for `device` (auto|cpu|cuda) on an open engine, its KV cache sized for max_context.

    >>> open_backend(open_engine("tiny.olmo"), "cpu").name
    'numpy'
    """
    resolved = resolve_device(device)
    if resolved == "cuda":
        module = importlib.import_module(CUDA_MODULE)
        return module.CudaBackend(engine, max_context=max_context)
    from olmoscope.runtime.numpy_backend import NumpyBackend

    return NumpyBackend(engine, max_context=max_context)


def check_max_context(max_context: int | None, config: ModelConfig) -> int:
    """The requested context (default: the model's), refused when < 1 or beyond the model's trained length."""
    limit = config.max_position_embeddings
    if max_context is None:
        return limit
    if max_context < 1:
        raise UsageError(f"--max-context {max_context}: must be at least 1")
    if max_context > limit:
        raise UsageError(f"--max-context {max_context}: beyond the model's context length {limit}")
    return max_context
