"""The sampler: reproducible with a seed, greedy at temperature 0 and top-k 1, never outside its top-k/top-p set."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from olmoscope.errors import UsageError
from olmoscope.runtime.sampler import SamplingParams, candidate_probabilities, make_rng, penalized_logits, sample

finite_logits = arrays(
    np.float32, st.integers(2, 64), elements=st.floats(-30, 30, width=32, allow_nan=False, allow_infinity=False)
)


def draw_many(logits: np.ndarray, params: SamplingParams, seed: int, count: int = 64) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(logits, params, rng) for _ in range(count)]


def ranked(scores) -> list[int]:
    """Ids best first: by score descending, the lower id first on ties."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def top_k_set(logits: np.ndarray, k: int) -> set[int]:
    return set(ranked(logits.tolist())[:k])


def top_p_set(logits: np.ndarray, p: float, temperature: float) -> set[int]:
    """The best-ranked ids until their probability reaches p (a hair of slack for rounding)."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    kept, mass = set(), 0.0
    for i in ranked(probs.tolist()):
        kept.add(i)
        mass += probs[i]
        if mass >= p * (1 - 1e-9):
            break
    return kept


def test_same_seed_gives_the_same_tokens():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    first, again = draw_many(logits, params, seed=42), draw_many(logits, params, seed=42)
    assert first == again
    assert len(set(first)) > 1  # it really sampled: a different seed sequence would differ
    assert draw_many(logits, params, seed=43) != first


@given(finite_logits, st.floats(0.05, 5.0))
@settings(max_examples=60, deadline=None)
def test_top_k_1_equals_greedy(logits, temperature):
    greedy = sample(logits, SamplingParams(), np.random.default_rng(0))
    assert greedy == int(np.argmax(logits))
    assert draw_many(logits, SamplingParams(temperature=temperature, top_k=1), seed=1, count=8) == [greedy] * 8


@given(finite_logits, st.integers(1, 70), st.floats(0.1, 3.0), st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_top_k_only_picks_inside_its_set(logits, k, temperature, seed):
    allowed = top_k_set(logits, k)
    picks = draw_many(logits, SamplingParams(temperature=temperature, top_k=k), seed, count=16)
    assert set(picks) <= allowed, f"picked {set(picks) - allowed} outside top-{k} {sorted(allowed)}"


@given(finite_logits, st.floats(0.01, 1.0), st.floats(0.1, 3.0), st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_top_p_only_picks_inside_its_set(logits, p, temperature, seed):
    allowed = top_p_set(logits, p, temperature)
    picks = draw_many(logits, SamplingParams(temperature=temperature, top_p=p), seed, count=16)
    assert set(picks) <= allowed, f"picked {set(picks) - allowed} outside top-p {p} set {sorted(allowed)}"


@given(finite_logits, st.integers(0, 70), st.floats(0.01, 0.99), st.floats(0.1, 3.0))
@settings(max_examples=80, deadline=None)
def test_kept_set_is_exactly_top_k_then_top_p(logits, k, p, temperature):
    """Not only the picks: the ids given any probability are exactly top-k's, then top-p's within them."""
    best = ranked(logits.tolist())[: k or len(logits)]
    within_k = np.full(logits.shape, -np.inf, np.float32)
    within_k[best] = logits[best]
    expected = top_p_set(within_k, p, temperature)
    probs = candidate_probabilities(logits, SamplingParams(temperature=temperature, top_k=k, top_p=p))
    kept = set(np.flatnonzero(probs).tolist())
    assert kept == expected, f"kept {sorted(kept)}, expected {sorted(expected)}"


@pytest.mark.parametrize("count, p, kept", [(21, 1 / 3, 7), (4, 0.5, 2), (10, 0.3, 3), (3, 1 / 3, 1)])
def test_top_p_keeps_exactly_p_of_equal_tokens(count, p, kept):
    """Equal probabilities summing to p exactly, up to float rounding, keep no extra token."""
    probs = candidate_probabilities(np.zeros(count, np.float32), SamplingParams(temperature=1.0, top_p=p))
    assert np.count_nonzero(probs) == kept, f"kept {np.count_nonzero(probs)} of {count} at top-p {p}"


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    picks = np.array(draw_many(logits, SamplingParams(temperature=1.0), seed=7, count=20000))
    frequencies = np.bincount(picks, minlength=3) / len(picks)
    assert np.abs(frequencies - [0.5, 0.3, 0.2]).max() <= 0.015, f"frequencies {frequencies}"


def test_padding_rows_are_never_sampled():
    logits = np.zeros(16, np.float32)
    logits[12:] = 100.0  # the padding rows would win everything
    params = SamplingParams(temperature=1.0)
    assert sample(logits, SamplingParams(), np.random.default_rng(0), vocab_limit=12) < 12
    assert max(sample(logits, params, np.random.default_rng(s), vocab_limit=12) for s in range(50)) < 12


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 1.0, 3.0], np.float32)
    penalized = penalized_logits(logits, np.array([0, 1, 0]), 2.0, vocab_limit=4)
    assert penalized.tolist() == [1.0, -4.0, 1.0, 3.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, 3.0]  # the caller's logits are left alone


@given(finite_logits, st.lists(st.integers(0, 63), max_size=20), st.floats(0.2, 5.0))
@settings(max_examples=40, deadline=None)
def test_repetition_penalty_matches_transformers(logits, history, penalty):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    history = [i for i in history if i < len(logits)] or [0]
    ours = penalized_logits(logits, np.array(history), penalty, vocab_limit=len(logits))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), torch.from_numpy(logits.copy())[None])
    diff = np.abs(ours - theirs[0].numpy()).max()
    assert diff <= 1e-6 * max(1.0, np.abs(logits).max()), f"max abs diff {diff:.2e}"


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.array([3.0, 2.0, 0.0], np.float32)
    params = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, params, np.random.default_rng(0), history=np.array([0])) == 1


def test_greedy_draws_no_random_numbers():
    rng = np.random.default_rng(5)
    sample(np.arange(10, dtype=np.float32), SamplingParams(), rng)
    assert rng.random() == np.random.default_rng(5).random()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_k": -1}, "--top-k"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
    ],
)
def test_invalid_sampling_values_are_clear_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SamplingParams(**kwargs)


def test_a_negative_seed_is_refused():
    with pytest.raises(UsageError, match="--seed"):
        make_rng(-1)


# ── edge values (issue 10, item 3; the rules are in sampler.py's docstring) ───────────────
from olmoscope.runtime.sampler import SamplingError  # noqa: E402

TIES = np.array([0.1, 2.0, -1.0, 2.0, 1.9999], np.float32)


def test_a_subnormal_temperature_samples_only_among_the_maximum_ids():
    drawn = set(draw_many(TIES, SamplingParams(temperature=1e-310), seed=0, count=200))
    assert drawn == {1, 3}, drawn  # the T → 0 limit: the two tied maxima, never 1.9999, never out of range


@given(logits=finite_logits, exponent=st.integers(-323, 2), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_any_positive_temperature_gives_an_id_in_range_with_positive_probability(logits, exponent, seed):
    params = SamplingParams(temperature=float(f"1e{exponent}"))
    probs = candidate_probabilities(logits, params)
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-9
    for token in draw_many(logits, params, seed, count=8):
        assert 0 <= token < logits.size and probs[token] > 0


def test_a_tiny_repetition_penalty_overflows_seen_positive_logits_to_inf_and_they_win():
    params = SamplingParams(temperature=0.7, repetition_penalty=1e-40)
    history = np.array([0, 2])  # 0.1 / 1e-40 overflows float32 to +inf; -1.0 · 1e-40 is tiny
    rng = np.random.default_rng(1)
    assert {sample(TIES, params, rng, history) for _ in range(100)} == {0}
    assert sample(TIES, SamplingParams(repetition_penalty=1e-40), rng, history) == 0  # greedy agrees


def test_inf_logits_share_all_the_mass_and_greedy_takes_the_lowest():
    logits = np.array([1.0, np.inf, 5.0, np.inf, -np.inf], np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == 1
    probs = candidate_probabilities(logits, SamplingParams(temperature=1.0))
    assert probs.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert set(draw_many(logits, SamplingParams(temperature=1.0), seed=2, count=100)) == {1, 3}


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.9)])
def test_nan_logits_are_one_clear_error_greedy_or_not(params):
    logits = TIES.copy()
    logits[2] = np.nan
    with pytest.raises(SamplingError, match="logits hold NaN for 1 of 5 tokens"):
        sample(logits, params, np.random.default_rng(0))


def test_nan_in_padding_rows_is_masked_not_an_error():
    logits = np.concatenate([TIES, np.float32([np.nan, np.nan])])
    assert sample(logits, SamplingParams(), np.random.default_rng(0), vocab_limit=5) == 1


def test_all_minus_inf_is_one_clear_error():
    with pytest.raises(SamplingError, match="every token's logit is -inf"):
        sample(np.full(4, -np.inf, np.float32), SamplingParams(temperature=1.0), np.random.default_rng(0))


def test_every_path_through_penalized_logits_refuses_nan():
    """Batched backends call penalized_logits → candidate_probabilities → draw directly, not sample()."""
    logits = TIES.copy()
    logits[0] = np.nan
    with pytest.raises(SamplingError, match="NaN"):
        penalized_logits(logits, None, 1.0, vocab_limit=5)
    padded = np.concatenate([TIES, np.float32([np.nan])])  # NaN in a padding row is masked first: no error
    assert np.isneginf(penalized_logits(padded, None, 1.0, vocab_limit=5)[5])
