"""Choosing the next token from logits: the rules every backend follows, and their NumPy implementation.

In order, on the float32 logits [V] of the last position:
1. padding rows (ids ≥ vocab_limit) → −inf: they are never chosen;
2. repetition penalty p over every distinct id in the history (prompt and generated), the Hugging Face
   convention: a positive logit is divided by p, a negative one multiplied by p; then OpenAI's presence and
   frequency penalties over the generated ids only: l −= presence·(c > 0) + frequency·c, c the id's count;
3. temperature 0 → greedy: the largest logit, the lowest id on ties; no random draw. Otherwise:
4. logits / temperature;
5. top-k (k > 0): keep the k best-ranked ids; ranking is by logit, descending, the lower id first on
   ties (so top-k 1 is greedy);
6. softmax over what is kept;
7. top-p (p < 1): keep the shortest run of best-ranked ids whose probabilities sum to at least p·(the
   kept total), up to a relative 1e-9 for rounding (7 of 21 equal tokens hold p = 1/3);
8. one uniform u = rng.random() ∈ [0, 1); walking the kept ids in ascending id order, the chosen id is
   the first whose running sum of probabilities exceeds u·(their sum).

Steps 1–7 define what may be chosen and with what probability on every backend; step 8 is how the
NumPy backend draws (a GPU backend may draw differently, e.g. Gumbel-max, still seeded from the run's
numpy Generator), so a fixed seed repeats a run on the same backend.

Edge values (every backend follows these; the chosen id is always a real token, < vocab_limit):
- NaN in any real token's logit (after step 2) is an error, greedy or not: nothing sensible can be
  chosen from it, and it means the weights or the arithmetic went wrong (SamplingError names the count).
- +inf logits win: when any real token's logit is +inf, the candidates are exactly those ids, equally
  likely (their limit under softmax); greedy picks the lowest of them. A repetition penalty below 1 can
  make a seen token's logit overflow float32 to +inf (p = 1e-40 divides by 1e-40): the same rule holds.
- −inf logits are never chosen; if every real token's logit is −inf, that is an error.
- Steps 4–6 are computed as softmax((l − max l) / temperature) in float64, so any temperature > 0 is
  well defined however small: a subnormal one (1e-310) makes every id below the maximum underflow to
  probability 0, i.e. sampling among the ids tied at the maximum (the temperature → 0 limit). Nothing
  overflows, because l − max l ≤ 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from olmoscope.errors import EngineError, UsageError


class SamplingError(EngineError):
    """The logits allow no choice: NaN, or every real token at −inf."""


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token; invalid values are a UsageError at construction.

    >>> SamplingParams(temperature=0.8, top_p=0.95).greedy
    False
    """

    temperature: float = 0.0  # 0 = greedy (the default: reproducible, as transformers' generate)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set reaching this probability mass; 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen; 1 = off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every generated token's logit; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence of a generated token; 0 = off

    def __post_init__(self) -> None:
        _finite(self.temperature, "--temperature")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: must be ≥ 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k}: must be an integer ≥ 0 (0 = off)")
        _finite(self.top_p, "--top-p")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p}: must be in (0, 1] (1 = off)")
        _finite(self.repetition_penalty, "--repetition-penalty")
        if self.repetition_penalty <= 0:
            raise UsageError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 = off)")
        for value, option in ((self.presence_penalty, "presence_penalty"), (self.frequency_penalty, "frequency_penalty")):
            _finite(value, option)
            if not -2 <= value <= 2:
                raise UsageError(f"{option} {value}: must be in [-2, 2] (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(value: float, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{option} {value!r}: must be a finite number")


def penalized_logits(logits: np.ndarray, history: np.ndarray | None, penalty: float, vocab_limit: int) -> np.ndarray:
    """Steps 1–2: a float32 copy of logits [V] with padding masked and seen ids penalized.

    Every path to a token goes through here, so the edge-value errors are raised here (check_logits).
    """
    out = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay as they were
    out[vocab_limit:] = -np.inf
    if penalty != 1.0 and history is not None and len(history):
        seen = np.unique(np.asarray(history))
        seen = seen[(seen >= 0) & (seen < vocab_limit)]
        values = out[seen]
        with np.errstate(over="ignore", under="ignore"):  # p < 1 may overflow to +inf: a rule covers it
            out[seen] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    check_logits(out, vocab_limit)
    return out


def generated_penalties(scores: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """Step 2's second half: scores [V] less presence·(c > 0) + frequency·c, counts [V] of each generated id."""
    if presence == 0 and frequency == 0:
        return scores
    generated = counts > 0
    out = scores.copy()
    out[generated] -= np.float32(presence) + np.float32(frequency) * counts[generated].astype(np.float32)
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (the raw logits' log-softmax over the real vocabulary)
    and the best alternatives at its position, best first (the lower id first on ties)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


def token_logprobs(logits: np.ndarray, token: int, k: int, vocab_limit: int) -> TokenLogprob:
    """`token`'s logprob under softmax(logits[:vocab_limit]) (before any penalty or temperature), and the k best."""
    real = np.asarray(logits[:vocab_limit], np.float64)
    top = real.max()
    log_z = top + np.log(np.sum(np.exp(real - top)))
    best = ranking(real)[:k]
    chosen = float(real[token] - log_z) if 0 <= token < vocab_limit else 0.0
    return TokenLogprob(token, chosen, [(int(i), float(real[i] - log_z)) for i in best])


def ranking(scores: np.ndarray) -> np.ndarray:
    """Ids from best to worst: by score descending, the lower id first on ties."""
    return np.lexsort((np.arange(scores.size), -scores))


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Step 5: bool [V], True for the k best-ranked ids (all when k is 0 or ≥ V)."""
    if k <= 0 or k >= logits.size:
        return np.ones(logits.shape, bool)
    kth_largest = np.partition(logits, logits.size - k)[logits.size - k]
    keep = logits > kth_largest
    ties = np.flatnonzero(logits == kth_largest)  # ascending ids: the lowest fill the remaining places
    keep[ties[: k - int(keep.sum())]] = True
    return keep


TOP_P_SLACK = 1e-9  # relative: float sums of equal probabilities land a hair below an exact p


def top_p_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """Step 7: bool [V], the shortest best-ranked run of ids holding mass p."""
    if p >= 1.0:
        return probs > 0
    order = ranking(probs)
    running = np.cumsum(probs[order])
    target = p * running[-1] * (1 - TOP_P_SLACK)  # a run whose mass is p up to rounding reaches it
    last = min(int(np.searchsorted(running, target, side="left")), probs.size - 1)
    keep = np.zeros(probs.shape, bool)
    keep[order[: last + 1]] = True
    return keep & (probs > 0)


def candidate_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Steps 4–7: float64 [V] probabilities, zero outside the kept set (not renormalized after top-p).

    By the edge-value rules: +inf logits share all the mass; (l − max) / T never overflows.
    """
    scores = logits.astype(np.float64)
    scores[~top_k_mask(logits, params.top_k)] = -np.inf
    top = np.max(scores)
    if top == np.inf:  # the +inf ids take everything, equally
        scaled = np.where(scores == np.inf, 0.0, -np.inf)
    else:
        with np.errstate(over="ignore", under="ignore"):  # (l − max) / 1e-310 → −inf: probability 0, as meant
            scaled = (scores - top) / params.temperature
        scaled[scores == top] = 0.0  # exact: the maximum has weight exp(0) = 1 whatever the temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    return np.where(top_p_mask(probs, params.top_p), probs, 0.0)


def check_logits(scores: np.ndarray, limit: int) -> None:
    """The edge-value rules' errors: NaN among the real tokens, or no real token above −inf."""
    real = scores[:limit]
    nan = np.isnan(real)
    if nan.any():
        raise SamplingError(f"the model's logits hold NaN for {int(nan.sum()):,} of {limit:,} tokens, so no token "
                            f"can be chosen (corrupt or overflowing weights? `olmoscope verify` checks the file)")
    if not (real > -np.inf).any():
        raise SamplingError("every token's logit is -inf, so no token can be chosen")


def draw(probs: np.ndarray, u: float) -> int:
    """Step 8: the first id, ascending, whose running probability sum exceeds u·(the total)."""
    running = np.cumsum(probs)
    return int(np.searchsorted(running, u * running[-1], side="right"))


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    history: np.ndarray | None = None,
    vocab_limit: int | None = None,
) -> int:
    """The next token id from float32 logits [V], by the module's rules.

    >>> sample(np.array([0.1, 2.0, -1.0], np.float32), SamplingParams(), np.random.default_rng(0))
    1
    """
    limit = logits.shape[-1] if vocab_limit is None else min(vocab_limit, logits.shape[-1])
    scores = penalized_logits(logits, history, params.repetition_penalty, limit)  # NaN / all −inf: SamplingError
    if params.greedy:
        return int(np.argmax(scores[:limit]))  # +inf beats everything; the lowest id on ties
    chosen = draw(candidate_probabilities(scores, params), rng.random())
    if not 0 <= chosen < limit:  # the rules make this impossible; refuse rather than return a bad id
        raise SamplingError(f"the sampler drew id {chosen}, outside the {limit:,} real tokens")
    return chosen


def make_rng(seed: int | None) -> tuple[np.random.Generator, int]:
    """The run's generator and the seed it came from (a fresh one when None, so a run can be repeated)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed {seed!r}: must be a non-negative integer")
    return np.random.default_rng(seed), seed
