"""Driving a backend by hand in tests: one sequence's steps over a fresh block table, with every logit returned."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from olmoscope.runtime.backend import Backend
from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.runtime.step import Sample, Step, Work

GREEDY = Sample(SamplingParams())


def teacher_forced_logits(backend: Backend, tokens: Sequence[int], prompt: int, slot: int = 0,
                          chunks: Sequence[int] = ()) -> list[np.ndarray]:
    """[prompt logits [prompt, V], then one [V] per later token], each token fed in order (no sampling choice).

    `chunks`: prefill the prompt in pieces of these sizes (the rest in one last piece).
    """
    table = BlockTable(BlockPool(backend.num_blocks))
    sizes = list(chunks) + [prompt - sum(chunks)]
    out, start = [], 0
    fresh = [slot]
    for size in sizes:
        table.reserve(size)
        work = Work(slot, start, list(tokens[start:start + size]), list(table.blocks), GREEDY, all_logits=True)
        out.append(backend.run(Step([work], fresh_slots=fresh), return_logits=True).logits)
        start, fresh = start + size, []
    out = [np.concatenate(out)]
    for position in range(prompt, len(tokens)):
        table.reserve(1)
        work = Work(slot, position, [int(tokens[position])], list(table.blocks), GREEDY)
        out.append(backend.run(Step([work]), return_logits=True).logits[0])
    return out


def prompt_logits(backend: Backend, tokens: Sequence[int]) -> np.ndarray:
    """Logits [T, V] of every position of one prompt."""
    return teacher_forced_logits(backend, tokens, len(tokens))[0]
