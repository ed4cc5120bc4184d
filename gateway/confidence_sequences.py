"""Intervals of a proportion that stay valid however often they are looked at.

A 95% interval (Wilson's, Newcombe's) holds its 5% error for *one* look at a sample size
fixed beforehand. An operator watching an experiment's report every day and stopping at the
first difference it shows looks many times: checked after every outcome, the Wilson interval
of a fair coin excludes one half at some point in about a third of runs of a thousand
(tests/test_confidence_sequences.py measures it). A *confidence sequence* holds its level
simultaneously at every sample size, so any look, and any rule for when to stop looking, keeps
the error below `alpha`.

The one here is Robbins' beta-binomial mixture (Robbins 1970; Howard et al. 2021, "Time-
uniform, nonparametric, nonasymptotic confidence sequences", section 3): for each candidate
p, the likelihood of the outcomes under a Beta(1, 1) mixture of proportions over their
likelihood under p is a nonnegative martingale with mean 1 when p is the truth, so by Ville's
inequality it ever reaches 1/alpha with probability at most alpha. The sequence is every p
whose ratio is below 1/alpha: an interval around the observed share, exact for outcomes that
are independent draws with a constant rate, and about twice as wide as Wilson's at a
thousand trials; that width is the price of looking whenever one likes.
"""

from __future__ import annotations

import math

ALPHA_95 = 0.05
_PRIOR = (1.0, 1.0)  # Beta(1, 1): every proportion equally likely before the first outcome
_BISECTIONS = 60  # halves [0, 1] to below 1e-18, beyond a float's resolution near p


def log_mixture_ratio(successes: int, trials: int, p: float) -> float:
    """log of the mixture likelihood of `successes` in `trials` over their likelihood at
    `p`; +inf where the outcomes are impossible at `p` (a success at p = 0)."""
    a, b = _PRIOR
    failures = trials - successes
    log_mixture = _log_beta(a + successes, b + failures) - _log_beta(a, b)
    log_at_p = _x_log_y(successes, p) + _x_log_y(failures, 1.0 - p)
    return math.inf if log_at_p == -math.inf else log_mixture - log_at_p


def confidence_sequence(
    successes: int, trials: int, alpha: float = ALPHA_95
) -> tuple[float, float] | None:
    """The proportions the sequence still holds after `successes` in `trials`, or None
    without trials. The observed share always lies inside (the mixture likelihood never
    exceeds the greatest likelihood)."""
    if trials <= 0:
        return None
    share = successes / trials
    threshold = math.log(1.0 / alpha)
    low = 0.0 if successes == 0 else _crossing(successes, trials, threshold, 0.0, share)
    high = 1.0 if successes == trials else _crossing(successes, trials, threshold, 1.0, share)
    return (low, high)


def difference_sequence(
    successes: int,
    trials: int,
    reference_successes: int,
    reference_trials: int,
    alpha: float = ALPHA_95,
) -> tuple[float, float] | None:
    """A confidence sequence of p − p_reference, or None while either side has no trials:
    each proportion's sequence at alpha/2, so both hold at once, at every look, with
    probability at least 1 − alpha (a union bound: no assumption on how the two sides'
    outcomes interleave)."""
    own = confidence_sequence(successes, trials, alpha / 2)
    reference = confidence_sequence(reference_successes, reference_trials, alpha / 2)
    if own is None or reference is None:
        return None
    return (own[0] - reference[1], own[1] - reference[0])


def _crossing(
    successes: int, trials: int, threshold: float, outside: float, inside: float
) -> float:
    """The p between `outside` (ratio above the threshold) and `inside` (below it) where the
    log ratio crosses the threshold; it is convex in p, so there is one crossing."""
    for _ in range(_BISECTIONS):
        middle = (outside + inside) / 2
        if log_mixture_ratio(successes, trials, middle) >= threshold:
            outside = middle
        else:
            inside = middle
    return inside  # the side still in the sequence


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _x_log_y(x: int, y: float) -> float:
    """x·log(y), taken as 0 when x is 0 (no outcome of that kind, whatever its probability)."""
    if x == 0:
        return 0.0
    return -math.inf if y <= 0.0 else x * math.log(y)
