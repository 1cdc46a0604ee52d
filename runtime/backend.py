"""The backend interface every runtime implements (NumPy reference, CUDA), and picking one for --device.

A backend owns the model's weights on its device, the paged KV cache's storage, and per-sequence state slots.
It runs steps (runtime/step.py): one forward pass over a ragged batch, the new keys/values appended to the
cache, logits for the rows that need them, and each sampled row drawn with its own parameters; only token ids
come back. Which block holds what is the scheduler's business (runtime/blocks.py), not the backend's.

Contract:
- ``name`` ("numpy" | "cuda"), ``device`` (what runs it), ``notes`` (lines for the user), ``config``,
  ``vocab_limit`` (ids ≥ it are padding rows, never sampled), ``vocab_size`` (V, logits columns).
- Sizes fixed at construction: ``max_context`` (positions one sequence may hold), ``num_blocks`` (KV blocks,
  the null block 0 included), ``max_seqs`` (state slots 0 … max_seqs−1), ``max_step_tokens`` (rows in a step).
- State slot s keeps the set of token ids its sequence has seen (for the repetition penalty) and its last
  sample. Before a step runs: ``step.copies`` blocks are copied, ``step.fresh_slots`` forget their seen set,
  ``step.seen`` ids are marked seen. Every token of the step is marked seen in its slot before sampling; a FED
  token is first replaced by its slot's last sample.
- ``launch(step, return_logits=False)`` queues the step and returns a PendingStep; ``.result()`` gives its
  StepResult (sampled ids in step order; with return_logits the float32 logits [R, V] of step.pack().logit_rows,
  raw, before any penalty; and, when the step scores rows (Work.score), the float32 logprob of each row's target
  under the log-softmax of its raw logits over all V columns, in pack().score_rows order: lm_head runs over the
  scored rows a bounded number at a time, and only those logprobs cross to the host). A backend may run the step
  at once (NumPy) or asynchronously (CUDA: the next step can be launched before this one's result is read, and
  will see this one's samples as FED tokens).
- ``run(step)`` is launch + result. ``close()`` frees device memory. Backends are context managers.
- A step that breaks the sizes above raises ValueError before any work.

Building one: ``devices.open_backend(engine, device, options)``.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from olmoscope.errors import UsageError
from olmoscope.runtime.blocks import BLOCK_SIZE
from olmoscope.runtime.scheduler import Limits
from olmoscope.runtime.step import FED, Step, StepArrays, StepResult

if TYPE_CHECKING:
    from olmoscope.config import ModelConfig

GiB = 1 << 30


@dataclass(frozen=True)
class RuntimeOptions:
    """How big a backend's cache and steps are; None means "as the backend decides" (see each field)."""

    max_context: int | None = None  # positions one sequence may hold; default the model's context length
    max_num_seqs: int = 1  # sequences at once (generate: 1, batch/serve: many)
    max_num_batched_tokens: int = 4096  # token rows in one step (prompt chunks are cut to fit)
    kv_cache_gib: float | None = None  # KV pool size; default: from free memory
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the backend may fill (weights, cache, buffers)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise UsageError(f"--max-num-seqs {self.max_num_seqs}: must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise UsageError(f"--max-num-batched-tokens {self.max_num_batched_tokens}: must be at least 1")
        if self.kv_cache_gib is not None and not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise UsageError(f"--kv-cache-gib {self.kv_cache_gib}: must be a positive number")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UsageError(f"--gpu-memory-utilization {self.gpu_memory_utilization}: must be in (0, 1]")


class PendingStep(abc.ABC):
    """A launched step; result() waits for it."""

    @abc.abstractmethod
    def result(self) -> StepResult:
        """The step's samples (and logits when asked)."""


class DoneStep(PendingStep):
    """A step that ran at launch."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result


class Backend(abc.ABC):
    """One model on one device with one paged KV cache; see the module docstring for the exact contract.

    >>> with open_backend(engine, "cpu") as backend: backend.run(step).tokens
    array([1917], dtype=int32)
    """

    name: str  # "numpy" or "cuda"
    device: str  # what runs it, for the statistics line
    config: ModelConfig  # the engine's model
    vocab_limit: int  # ids at or above this are padding rows, never sampled
    notes: list[str]  # lines worth telling the user (stderr)
    max_context: int  # positions one sequence may hold
    num_blocks: int  # KV blocks, the null block included
    max_seqs: int  # state slots
    max_step_tokens: int  # token rows one step may hold

    @property
    def vocab_size(self) -> int:
        """V: logits columns, padding rows included."""
        return self.config.vocab_size

    @property
    def limits(self) -> Limits:
        """What a scheduler over this backend may ask of it."""
        return Limits(self.max_context, self.max_seqs, self.max_step_tokens)

    @abc.abstractmethod
    def launch(self, step: Step, return_logits: bool = False) -> PendingStep:
        """Queue one step (see the module docstring)."""

    def run(self, step: Step, return_logits: bool = False) -> StepResult:
        """Run one step and wait for it."""
        return self.launch(step, return_logits).result()

    def close(self) -> None:
        """Free what the backend holds (nothing to do for host memory)."""

    def in_thread(self) -> contextlib.AbstractContextManager:
        """Held around everything another thread than the creating one does with the backend (a GPU context is
        current per thread: the serving engine steps the loop in a thread of its own)."""
        return contextlib.nullcontext()

    def check_step(self, step: Step) -> StepArrays:
        """The step's arrays, refused (ValueError) when it breaks the backend's sizes."""
        if not step.works:
            raise ValueError("a step needs at least one work")
        longest = max(work.context for work in step.works)
        if longest > self.max_context:
            raise ValueError(f"a sequence of {longest} positions, beyond max context {self.max_context}")
        arrays = step.pack(-(-self.max_context // BLOCK_SIZE))
        ids = arrays.token_ids
        if arrays.num_tokens > self.max_step_tokens:
            raise ValueError(f"{arrays.num_tokens} token rows in one step, more than {self.max_step_tokens}")
        if arrays.num_seqs > self.max_seqs:
            raise ValueError(f"{arrays.num_seqs} sequences in one step, more than {self.max_seqs}")
        if np.any((ids != FED) & ((ids < 0) | (ids >= self.vocab_size))) or np.any(
                (arrays.score_targets < 0) | (arrays.score_targets >= self.vocab_size)):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        blocks = arrays.block_tables[np.arange(arrays.block_tables.shape[1])[None, :]
                                     < -(-arrays.context[:, None] // BLOCK_SIZE)]
        copied = np.asarray(step.copies, np.int64).reshape(-1)
        if np.any(blocks < 1) or np.any(blocks >= self.num_blocks) or np.any((copied < 1) | (copied >= self.num_blocks)):
            raise ValueError(f"block id out of range [1, {self.num_blocks})")
        states = [arrays.token_state, np.asarray(step.fresh_slots, np.int32), np.asarray([s for s, _ in step.seen])]
        if any(np.any((s < 0) | (s >= self.max_seqs)) for s in states if s.size):
            raise ValueError(f"state slot out of range [0, {self.max_seqs})")
        return arrays

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def kv_block_bytes(config: ModelConfig, itemsize: int) -> int:
    """Bytes of one KV block across all layers: keys and values of BLOCK_SIZE positions."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK_SIZE * config.head_dim * itemsize


def plan_blocks(options: RuntimeOptions, config: ModelConfig, itemsize: int, available_bytes: int,
                where: str) -> tuple[int, int, list[str]]:
    """(KV blocks for the pool, the null block included; the context one sequence may hold; notes saying so).

    Explicit --kv-cache-gib is taken as is (refused when it does not fit `available_bytes`); otherwise the pool
    holds max_num_seqs sequences of the context, capped by `available_bytes`. The pool must hold one sequence of
    the context: an explicit --max-context that does not fit is refused, the model's own is cut to fit.
    """
    block_bytes = kv_block_bytes(config, itemsize)
    context = check_max_context(options.max_context, config)
    notes = []
    if options.kv_cache_gib is not None:
        wanted = int(options.kv_cache_gib * GiB)
        if wanted > available_bytes:
            raise UsageError(f"--kv-cache-gib {options.kv_cache_gib:g}: only {available_bytes / GiB:.1f} GiB of "
                             f"{where} memory is free for the KV cache")
        blocks = wanted // block_bytes
    else:
        blocks = min(options.max_num_seqs * -(-context // BLOCK_SIZE), available_bytes // block_bytes)
    if blocks * BLOCK_SIZE < context:
        if options.max_context is not None or blocks < 1:
            raise UsageError(f"the KV cache holds {blocks * BLOCK_SIZE} tokens ({blocks * block_bytes / GiB:.2f} GiB "
                             f"of {where} memory), less than one sequence of {context} positions: lower --max-context "
                             f"or give the cache more memory")
        notes.append(f"max context cut to what the KV cache holds: {blocks * BLOCK_SIZE} of {context} tokens")
        context = blocks * BLOCK_SIZE
    notes.append(f"KV cache: {blocks} blocks of {BLOCK_SIZE} tokens = {blocks * BLOCK_SIZE:,} tokens "
                 f"({blocks * block_bytes / GiB:.2f} GiB, {where})")
    return blocks + 1, context, notes
