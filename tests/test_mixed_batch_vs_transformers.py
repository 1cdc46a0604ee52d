"""A mixed step (decode tokens, a prompt's second chunk, a whole new prompt) against transformers running the same
sequences as one padded batch with an attention mask. Tolerance: ‖ours − theirs‖ / ‖theirs‖ ≤ 1e-5 per sequence
(float32 against float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.blocks import BlockPool, BlockTable
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.step import Step, Work
from test_reference_vs_transformers import engine_for, random_model, relative_error

TOLERANCE = 1e-5


def transformers_padded(model, histories: list[list[int]]) -> list[np.ndarray]:
    """Each history's logits [len, V] from one left-padded batch forward with an attention mask."""
    width = max(map(len, histories))
    ids = torch.zeros((len(histories), width), dtype=torch.long)
    mask = torch.zeros((len(histories), width), dtype=torch.long)
    for i, history in enumerate(histories):
        ids[i, width - len(history):] = torch.tensor(history)
        mask[i, width - len(history):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    return [logits[i, width - len(h):] for i, h in enumerate(histories)]


@pytest.mark.parametrize("shape", ["gqa2-d64-odd-vocab", "mha-d128-tied"])
def test_a_mixed_step_matches_transformers_on_a_padded_batch(shape):
    model = random_model(shape, seed=3)
    backend = NumpyBackend(engine_for(model), RuntimeOptions(max_context=64, max_num_seqs=4))
    pool = BlockPool(backend.num_blocks)
    rng = np.random.default_rng(5)
    V = model.config.vocab_size
    histories = [rng.integers(0, V, n).tolist() for n in (5, 12, 9, 20)]
    tables = [BlockTable(pool) for _ in histories]

    def work(i: int, start: int, end: int) -> Work:
        tables[i].reserve(end - tables[i].num_tokens)
        return Work(i, start, histories[i][start:end], list(tables[i].blocks), all_logits=True)

    backend.run(Step.ordered([work(0, 0, 4), work(1, 0, 7), work(2, 0, 8)], fresh_slots=[0, 1, 2]))
    mixed = Step.ordered([work(0, 4, 5), work(2, 8, 9), work(1, 7, 12), work(3, 0, 20)], fresh_slots=[3])
    ours = backend.run(mixed, return_logits=True).logits
    theirs = transformers_padded(model, histories)
    rows = 0
    for w in mixed.works:
        got, want = ours[rows:rows + w.count], theirs[w.slot][w.position:w.context]
        rows += w.count
        err = relative_error(got, want)
        print(f"{shape}: sequence {w.slot}, positions {w.position}…{w.context - 1}: rel err {err:.2e}")
        assert err <= TOLERANCE, f"sequence {w.slot}: rel err {err:.2e}"
