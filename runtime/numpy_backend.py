"""The NumPy reference backend: reference.py's float32 forward pass over a paged cache, behind the Backend interface.

It is the oracle for the CUDA backend and for the scheduler, so it runs exactly the same steps (same block
tables, same state slots, same FED tokens), synchronously.
"""

from __future__ import annotations

import numpy as np

from olmoscope.runtime import reference
from olmoscope.runtime.backend import Backend, DoneStep, PendingStep, RuntimeOptions, plan_blocks
from olmoscope.runtime.engine import Engine, Weights
from olmoscope.runtime.sampler import (SamplingError, candidate_probabilities, draw, generated_penalties,
                                       penalized_logits, token_logprobs)
from olmoscope.runtime.step import FED, SAMPLE_NAN, SAMPLE_NO_MASS, Step, StepArrays, StepResult
from olmoscope.runtime.weights import model_weights

WEIGHT_SHARE = 0.4  # upcast every weight to float32 at load only when that fits this share of free memory
KV_SHARE = 0.25  # the default KV pool may take this share of free memory (np.zeros: untouched blocks cost nothing)


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux MemAvailable; else physical pages free)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LazyFloat32:
    """A weight kept as stored and upcast (int8/int4: dequantized) to float32 each time the math reads it."""

    def __init__(self, weights: Weights, name: str):
        self._weights, self._name = weights, name
        self.shape = weights.specs[name].shape

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._weights.float32(self._name)

    def __getitem__(self, rows) -> np.ndarray:
        """Rows as float32 (the embedding gather): only those rows are upcast."""
        return self._weights.float32(self._name, rows)


class NumpyBackend(Backend):
    """float32 on the CPU; see backend.py for the contract.

    >>> NumpyBackend(engine).run(step, return_logits=True).logits.shape
    (1, 100352)
    """

    name = "numpy"

    def __init__(self, engine: Engine, options: RuntimeOptions | None = None):
        options = options or RuntimeOptions()
        cfg = self.config = engine.config
        self.device = "cpu"
        self.vocab_limit = engine.vocab_limit
        self.max_seqs = options.max_num_seqs
        self.max_step_tokens = options.max_num_batched_tokens
        self.notes: list[str] = []
        self.weights = model_weights(engine.weights.specs.values(), self._loader(engine.weights))
        self.num_blocks, self.max_context, notes = plan_blocks(options, cfg, 4, int(available_memory() * KV_SHARE),
                                                               "host")
        self.notes += notes
        self.kv = reference.PagedKV(cfg.num_hidden_layers, self.num_blocks, cfg.num_key_value_heads, cfg.head_dim)
        self.seen = np.zeros((self.max_seqs, cfg.vocab_size), bool)  # [slots, V]: ids each sequence has seen
        self.counts = np.zeros((self.max_seqs, cfg.vocab_size), np.int32)  # [slots, V]: times each id was generated
        self.last_sampled = np.zeros(self.max_seqs, np.int32)  # [slots]: what a FED token becomes

    def _loader(self, weights: Weights):
        """float32 arrays for the reference: a quantized file's matrices stay as stored and are dequantized at
        each use (layer by layer: their point is the memory they save); others are upcast once when they fit
        in memory, else at each use too."""
        matrices = [spec for spec in weights.specs.values() if spec.kind == "matrix"]
        upcast_bytes = 4 * sum(spec.elements for spec in matrices)
        eager = not weights.format.quantized and (weights.dtype == "fp32"
                                                  or upcast_bytes <= WEIGHT_SHARE * available_memory())
        if not eager and not weights.format.quantized:
            self.notes.append(f"{weights.dtype} weights stay as stored and are upcast layer by layer "
                              f"({upcast_bytes / 2**30:.1f} GiB as float32 would not fit in memory)")
        return lambda spec: weights.float32(spec.name) if eager or spec.kind != "matrix" else LazyFloat32(weights,
                                                                                                         spec.name)

    def launch(self, step: Step, return_logits: bool = False) -> PendingStep:
        arrays = self.check_step(step)
        self._keep_state(step)
        ids = np.where(arrays.token_ids == FED, self.last_sampled[arrays.token_state], arrays.token_ids)
        self.seen[arrays.token_state, ids] = True
        logits, scores = reference.forward(self.config, self.weights, arrays, ids, self.kv, step.window)
        tokens = self._sample(logits, arrays)
        sampled = tokens >= 0
        self.last_sampled[arrays.sample_state[sampled]] = tokens[sampled]
        np.add.at(self.counts, (arrays.sample_state[sampled], tokens[sampled]), 1)
        result = StepResult(tokens, logits if return_logits else None, scores=scores if len(scores) else None)
        if np.any(arrays.logprobs >= 0):
            self._logprobs(result, logits, arrays)
        return DoneStep(result)

    def _keep_state(self, step: Step) -> None:
        """The cache and slot upkeep a step asks for before it runs."""
        for source, destination in step.copies:
            self.kv.copy_block(source, destination)
        self.seen[step.fresh_slots] = False
        self.counts[step.fresh_slots] = 0
        for slot, ids in step.seen:
            self.seen[slot, np.asarray(ids, np.int64)] = True
        for slot, ids in step.counted:
            np.add.at(self.counts[slot], np.asarray(ids, np.int64), 1)

    def _sample(self, logits: np.ndarray, arrays: StepArrays) -> np.ndarray:
        """Each sampled row by sampler.py's rules, with its own parameters, history and uniform draw; a row that
        cannot be sampled gets SAMPLE_NAN or SAMPLE_NO_MASS (the loop makes it that request's error)."""
        tokens = np.empty(len(arrays.sample_rows), np.int32)
        for i, (row, params) in enumerate(zip(arrays.sample_rows, arrays.params)):
            state = arrays.sample_state[i]
            try:
                scores = penalized_logits(logits[row], np.flatnonzero(self.seen[state]), params.repetition_penalty,
                                          self.vocab_limit)
            except SamplingError:
                tokens[i] = SAMPLE_NAN if np.isnan(logits[row, : self.vocab_limit]).any() else SAMPLE_NO_MASS
                continue
            scores = generated_penalties(scores, self.counts[state], params.presence_penalty, params.frequency_penalty)
            if params.greedy:
                tokens[i] = int(np.argmax(scores))
            else:
                tokens[i] = draw(candidate_probabilities(scores, params), float(arrays.u[i]))
        return tokens

    def _logprobs(self, result: StepResult, logits: np.ndarray, arrays: StepArrays) -> None:
        """The sampled tokens' logprobs and their best alternatives, for the rows that asked."""
        S, K = len(arrays.sample_rows), max(0, int(arrays.logprobs.max()))
        result.logprobs = np.zeros(S, np.float32)
        result.top_ids, result.top_logprobs = np.full((S, K), -1, np.int32), np.zeros((S, K), np.float32)
        for i, (row, k) in enumerate(zip(arrays.sample_rows, arrays.logprobs)):
            if k >= 0:
                found = token_logprobs(logits[row], int(result.tokens[i]), int(k), self.vocab_limit)
                result.logprobs[i] = found.logprob
                for j, (token, logprob) in enumerate(found.top):
                    result.top_ids[i, j], result.top_logprobs[i, j] = token, logprob

    def close(self) -> None:
        # drop the float32 weights (views of the engine's memory map for fp32 files) so the file can close
        self.weights = None
