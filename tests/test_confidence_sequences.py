"""Confidence sequences: valid at every look, where a fixed-sample interval is not."""

from __future__ import annotations

import math
import random

import pytest

from gateway.confidence_sequences import (
    confidence_sequence,
    difference_sequence,
    log_mixture_ratio,
)
from gateway.experiments import wilson_interval

RUNS, LOOKS = 1000, 1000  # seeded runs of outcomes, each looked at after every outcome


def runs_ever_excluding(truth: float, excludes, seed: int) -> float:
    """The share of seeded runs of Bernoulli(truth) outcomes in which `excludes(successes,
    trials)` is true after some outcome: an interval that holds at every look keeps it at
    or below its alpha."""
    rng = random.Random(seed)
    ever = 0
    for _ in range(RUNS):
        successes = 0
        for trials in range(1, LOOKS + 1):
            successes += rng.random() < truth
            if excludes(successes, trials):
                ever += 1
                break
    return ever / RUNS


@pytest.mark.parametrize("truth", [0.5, 0.9])
def test_the_sequence_excludes_the_truth_at_any_look_in_at_most_alpha_of_runs(truth):
    """The sequence is every p whose mixture ratio stays below 1/alpha, so 'the truth ever
    left it' is the ratio at the truth ever reaching 1/alpha. Three standard errors above
    alpha allow for the finite number of runs; the sequence's own bound is alpha."""
    threshold = math.log(1 / 0.05)
    rate = runs_ever_excluding(
        truth, lambda k, n: log_mixture_ratio(k, n, truth) >= threshold, seed=11
    )
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / RUNS)


def test_a_fixed_sample_interval_looked_at_every_time_excludes_the_truth_far_more_often():
    """Why the sequence exists: Wilson's 95% interval, checked after every outcome from the
    tenth, leaves out a fair coin's one half at some point in far more than 5% of runs."""

    def wilson_excludes(k: int, n: int) -> bool:
        low, high = wilson_interval(k, n)
        return n >= 10 and not low <= 0.5 <= high

    assert runs_ever_excluding(0.5, wilson_excludes, seed=11) > 0.3


@pytest.mark.parametrize(("successes", "trials"), [(1, 3), (45, 50), (900, 1000), (3, 10_000)])
def test_the_bounds_are_where_the_ratio_reaches_one_over_alpha(successes, trials):
    """The interval is the set the coverage test checks: inside, the ratio is below 1/alpha;
    at each bound it reaches it."""
    low, high = confidence_sequence(successes, trials)
    threshold = math.log(1 / 0.05)
    assert low < successes / trials < high
    for bound in (low, high):
        assert log_mixture_ratio(successes, trials, bound) == pytest.approx(threshold, abs=1e-6)
    assert log_mixture_ratio(successes, trials, (low + high) / 2) < threshold


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [(0, 20, 0.0, None), (20, 20, None, 1.0), (0, 1, 0.0, None), (1, 1, None, 1.0)],
)
def test_no_success_or_no_failure_leaves_that_end_at_its_limit(successes, trials, low, high):
    got = confidence_sequence(successes, trials)
    if low is not None:
        assert got[0] == low and got[1] < 1.0
    if high is not None:
        assert got[1] == high and got[0] > 0.0


def test_the_sequence_is_wider_than_a_single_look_interval_and_narrows_with_trials():
    widths = []
    for trials in (100, 1_000, 10_000):
        low, high = confidence_sequence(trials * 9 // 10, trials)
        wilson_low, wilson_high = wilson_interval(trials * 9 // 10, trials)
        assert low < wilson_low and wilson_high < high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)


def test_without_trials_there_is_no_sequence():
    assert confidence_sequence(0, 0) is None
    assert difference_sequence(5, 10, 0, 0) is None
    assert difference_sequence(0, 0, 5, 10) is None


def test_the_difference_spans_both_sides_sequences_at_half_alpha_each():
    """Both sides' sequences hold at once with probability 1 − alpha only if each holds
    with 1 − alpha/2: the difference's ends are the farthest the two can be apart."""
    own, reference = confidence_sequence(90, 100, 0.025), confidence_sequence(60, 100, 0.025)
    assert difference_sequence(90, 100, 60, 100) == (own[0] - reference[1], own[1] - reference[0])
    assert difference_sequence(90, 100, 60, 100)[0] > 0  # a 30-point gap shows at 100 each
    assert difference_sequence(60, 100, 90, 100)[1] < 0  # and the other way round
