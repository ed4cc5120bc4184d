"""Deadlines, circuit breakers, retry budgets and bulkheads, driven by explicit `now` values."""

from __future__ import annotations

import random
from typing import Any

import pybreaker
import pytest

from gateway.policy import BreakerConfig
from gateway.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    Bulkhead,
    Deadline,
    Outcome,
    Permit,
    RetryBudget,
    request_budget_ms,
)

FAST_S = 0.001  # well under any slow_call_ms used below


def no_jitter() -> float:
    return 0.0


def make_breaker(jitter=no_jitter, **overrides: Any) -> Breaker:
    """A breaker whose rate rules stay out of the way unless a test turns them on."""
    settings: dict[str, Any] = {
        "failure_threshold": 3,
        "failure_rate": 1.0,
        "slow_call_ms": 250,
        "slow_call_rate": 1.0,
        "window": 100,
        "min_calls": 100,
        "reset_timeout_s": 1.0,
        "max_reset_timeout_s": 5.0,
        "success_threshold": 2,
        "half_open_max_calls": 1,
    }
    settings.update(overrides)
    return Breaker("target", BreakerConfig(**settings), jitter=jitter)


def call(breaker: Breaker, outcome: Outcome, now: float, duration_s: float = FAST_S) -> Permit:
    """One whole call: acquire a permit (which must be granted) and record its outcome."""
    permit = breaker.try_acquire(now)
    assert permit is not None, f"breaker {breaker.state} rejected a call at t={now}"
    breaker.record(permit, outcome, duration_s, now)
    return permit


def trip(breaker: Breaker, now: float) -> None:
    """Open a closed breaker with consecutive failures."""
    for _ in range(breaker.config.failure_threshold):
        call(breaker, Outcome.FAILURE, now)
    assert breaker.state == OPEN


def open_period(breaker: Breaker, now: float) -> float:
    """How long the breaker, opened at `now`, stays open."""
    return breaker.open_remaining(now)


# --- Deadline and request budget ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_at", "now", "remaining"),
    [
        (10.0, 9.5, 0.5),
        (10.0, 0.0, 10.0),
        (10.0, 10.0, 0.0),
        (10.0, 10.25, 0.0),
        (10.0, 1e9, 0.0),
    ],
)
def test_deadline_remaining_counts_down_and_never_goes_negative(expires_at, now, remaining):
    """Deadline.remaining is what is left of the budget, floored at zero once spent."""
    assert Deadline(expires_at=expires_at).remaining(now) == pytest.approx(remaining)


def test_deadline_after_starts_the_budget_at_now():
    """Deadline.after(budget, now) expires `budget` seconds after `now`."""
    deadline = Deadline.after(0.4, now=100.0)
    assert deadline.expires_at == pytest.approx(100.4)
    assert deadline.remaining(100.1) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("policy_ms", "caller_ms", "budget_ms"),
    [
        (400, None, 400),  # no caller timeout: the policy's
        (400, 100, 100),  # caller lowers it
        (400, 399, 399),
        (400, 400, 400),
        (400, 401, 400),  # caller cannot raise it
        (400, 600_000, 400),
        (400, 1, 1),
        (400, 0, 1),  # never zero: a request always gets some budget
        (400, -5, 1),
    ],
)
def test_request_budget_caller_can_lower_never_raise(policy_ms, caller_ms, budget_ms):
    """The request budget is the policy's, lowered (never raised) by the caller's, at least 1."""
    assert request_budget_ms(policy_ms, caller_ms) == budget_ms


# --- Breaker: opening ----------------------------------------------------------------------


def test_breaker_starts_closed_and_grants_plain_permits():
    """A new breaker is closed and grants non-probe permits."""
    breaker = make_breaker()
    permit = breaker.try_acquire(0.0)
    assert breaker.state == CLOSED
    assert permit is not None
    assert permit.probe is False


def test_breaker_opens_after_failure_threshold_consecutive_failures():
    """failure_threshold failures in a row open it; one fewer does not."""
    breaker = make_breaker(failure_threshold=3)
    call(breaker, Outcome.FAILURE, 0.0)
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == OPEN


def test_breaker_success_resets_the_consecutive_failure_count():
    """A success between failures breaks the run: 2 failures, success, 2 failures stays closed."""
    breaker = make_breaker(failure_threshold=3)
    for outcome in [Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE]:
        call(breaker, outcome, 0.0)
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == OPEN


@pytest.mark.parametrize(
    ("outcomes", "state"),
    [
        # min_calls=4: a 2/3 failure rate is not judged before the 4th call
        ("SFF", CLOSED),
        ("FSF", CLOSED),
        # at 4 calls, 2/4 reaches failure_rate=0.5
        ("SFSF", OPEN),
        ("FSFS", OPEN),
        ("SFFS", OPEN),
        # 1/4 and 2/5 stay under it
        ("SSSF", CLOSED),
        ("SSSFF", CLOSED),
        # 3/6 reaches it
        ("SSSFFF", OPEN),
    ],
)
def test_breaker_opens_on_failure_rate_once_min_calls_reached(outcomes, state):
    """The failure rate is judged only with min_calls calls in the window, at >= failure_rate."""
    breaker = make_breaker(failure_threshold=10, failure_rate=0.5, min_calls=4, window=10)
    by_letter = {"S": Outcome.SUCCESS, "F": Outcome.FAILURE}
    for letter in outcomes:
        call(breaker, by_letter[letter], 0.0)
    assert breaker.state == state


def test_breaker_failure_rate_is_over_a_sliding_window():
    """Old calls leave the window: early failures no longer count once pushed out."""
    breaker = make_breaker(failure_threshold=10, failure_rate=0.5, min_calls=4, window=4)
    call(breaker, Outcome.FAILURE, 0.0)  # window: F
    for _ in range(4):  # pushes the failure out: S S S S
        call(breaker, Outcome.SUCCESS, 0.0)
    call(breaker, Outcome.FAILURE, 0.0)  # S S S F: 1/4
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 0.0)  # S S F F: 2/4
    assert breaker.state == OPEN


@pytest.mark.parametrize(
    ("durations_s", "state"),
    [
        ([0.25, 0.25, 0.25], CLOSED),  # slow, but fewer than min_calls
        ([0.25, 0.25, 0.25, 0.25], OPEN),  # duration == slow_call_ms is slow
        ([0.3, 0.001, 0.3, 0.001], OPEN),  # 2/4 reaches slow_call_rate=0.5
        ([0.3, 0.001, 0.001, 0.001], CLOSED),  # 1/4 does not
        ([0.249, 0.249, 0.249, 0.249], CLOSED),  # just under slow_call_ms
    ],
)
def test_breaker_opens_on_slow_call_rate_even_when_all_succeed(durations_s, state):
    """Successful calls taking >= slow_call_ms open it at slow_call_rate once min_calls are in."""
    breaker = make_breaker(slow_call_ms=250, slow_call_rate=0.5, min_calls=4, window=10)
    for duration_s in durations_s:
        call(breaker, Outcome.SUCCESS, 0.0, duration_s=duration_s)
    assert breaker.state == state


def test_breaker_ignored_outcomes_never_count_towards_the_rate():
    """IGNORED calls are neither failures nor successes: 3 F, 10 IGNORED, 1 F is a 4/4 rate."""
    breaker = make_breaker(failure_threshold=10, failure_rate=0.5, min_calls=4, window=20)
    for _ in range(3):
        call(breaker, Outcome.FAILURE, 0.0)
    for _ in range(10):
        call(breaker, Outcome.IGNORED, 0.0)
    assert breaker.state == CLOSED  # ignored calls did not fill up min_calls
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == OPEN  # ignored calls did not dilute the rate either


def test_breaker_ignored_outcomes_do_not_break_a_failure_run_nor_count_as_slow():
    """An IGNORED call, however slow, neither resets consecutive failures nor counts as one."""
    breaker = make_breaker(failure_threshold=3, slow_call_rate=0.1, min_calls=1, window=10)
    call(breaker, Outcome.IGNORED, 0.0, duration_s=60.0)
    assert breaker.state == CLOSED
    breaker = make_breaker(failure_threshold=3)
    call(breaker, Outcome.FAILURE, 0.0)
    call(breaker, Outcome.FAILURE, 0.0)
    for _ in range(5):
        call(breaker, Outcome.IGNORED, 0.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 0.0)
    assert breaker.state == OPEN


# --- Breaker: open and half-open -----------------------------------------------------------


def test_breaker_rejects_while_open_until_the_reset_timeout():
    """Open rejects every call until reset_timeout_s has passed, then lets a probe through."""
    breaker = make_breaker(reset_timeout_s=1.0)
    trip(breaker, now=10.0)
    for now in (10.0, 10.5, 10.999):
        assert breaker.try_acquire(now) is None
        assert breaker.state == OPEN
    assert breaker.open_remaining(10.25) == pytest.approx(0.75)
    permit = breaker.try_acquire(11.0)
    assert permit is not None
    assert permit.probe is True
    assert breaker.state == HALF_OPEN
    assert breaker.open_remaining(11.0) == 0.0


@pytest.mark.parametrize("max_calls", [1, 2, 5])
def test_breaker_half_open_lets_exactly_max_calls_probes_through(max_calls):
    """Half-open grants half_open_max_calls probe permits at once and rejects any more."""
    breaker = make_breaker(half_open_max_calls=max_calls, success_threshold=10)
    trip(breaker, now=0.0)
    permits = [breaker.try_acquire(1.0) for _ in range(max_calls)]
    assert all(p is not None and p.probe for p in permits)
    assert breaker.try_acquire(1.0) is None
    assert breaker.try_acquire(1.5) is None
    assert breaker.state == HALF_OPEN


def test_breaker_a_finished_probe_frees_its_slot():
    """When a probe's outcome is recorded (success or ignored), another probe may start."""
    breaker = make_breaker(half_open_max_calls=1, success_threshold=3)
    trip(breaker, now=0.0)
    first = breaker.try_acquire(1.0)
    assert first is not None
    assert breaker.try_acquire(1.0) is None
    breaker.record(first, Outcome.SUCCESS, FAST_S, 1.0)
    second = breaker.try_acquire(1.0)
    assert second is not None
    assert breaker.try_acquire(1.0) is None
    breaker.record(second, Outcome.IGNORED, FAST_S, 1.0)
    assert breaker.try_acquire(1.0) is not None
    assert breaker.state == HALF_OPEN


@pytest.mark.parametrize("success_threshold", [1, 2, 3])
def test_breaker_closes_after_success_threshold_probe_successes(success_threshold):
    """success_threshold successful probes close it; one fewer leaves it half-open."""
    breaker = make_breaker(success_threshold=success_threshold, half_open_max_calls=1)
    trip(breaker, now=0.0)
    for _ in range(success_threshold - 1):
        call(breaker, Outcome.SUCCESS, 1.0)
        assert breaker.state == HALF_OPEN
    call(breaker, Outcome.SUCCESS, 1.0)
    assert breaker.state == CLOSED
    permit = breaker.try_acquire(1.0)
    assert permit is not None
    assert permit.probe is False


def test_breaker_ignored_probe_neither_closes_nor_reopens():
    """An IGNORED probe outcome leaves the breaker half-open with its success count unchanged."""
    breaker = make_breaker(success_threshold=1)
    trip(breaker, now=0.0)
    call(breaker, Outcome.IGNORED, 1.0, duration_s=60.0)
    assert breaker.state == HALF_OPEN
    call(breaker, Outcome.SUCCESS, 1.0)
    assert breaker.state == CLOSED


@pytest.mark.parametrize(
    ("outcome", "duration_s"),
    [(Outcome.FAILURE, FAST_S), (Outcome.SUCCESS, 0.25), (Outcome.SUCCESS, 5.0)],
    ids=["failed", "slow-at-threshold", "slow"],
)
def test_breaker_bad_probe_reopens_with_doubled_open_period(outcome, duration_s):
    """A failed or slow probe re-opens it for twice the previous open period."""
    breaker = make_breaker(reset_timeout_s=1.0, max_reset_timeout_s=10.0, slow_call_ms=250)
    trip(breaker, now=0.0)
    assert open_period(breaker, 0.0) == pytest.approx(1.0)
    call(breaker, outcome, 1.0, duration_s=duration_s)
    assert breaker.state == OPEN
    assert open_period(breaker, 1.0) == pytest.approx(2.0)
    assert breaker.try_acquire(2.999) is None
    assert breaker.try_acquire(3.0) is not None


def test_breaker_open_period_doubles_per_reopen_capped_at_max():
    """Re-opens without a close go 1, 2, 4, then stop at max_reset_timeout_s (5)."""
    breaker = make_breaker(reset_timeout_s=1.0, max_reset_timeout_s=5.0)
    now = 0.0
    trip(breaker, now)
    periods = [open_period(breaker, now)]
    for _ in range(5):
        now += periods[-1]
        call(breaker, Outcome.FAILURE, now)  # the probe fails
        periods.append(open_period(breaker, now))
    assert periods == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])


@pytest.mark.parametrize("jitter_value", [0.0, 0.25, 0.5, 0.999])
def test_breaker_jitter_shortens_the_open_period_by_up_to_20_percent(jitter_value):
    """The open period is base * (1 - 0.2 * jitter()): never longer, at most 20% shorter."""
    breaker = make_breaker(jitter=lambda: jitter_value, reset_timeout_s=2.0)
    trip(breaker, now=0.0)
    assert open_period(breaker, 0.0) == pytest.approx(2.0 * (1 - 0.2 * jitter_value))


def test_breaker_default_jitter_stays_within_bounds():
    """With random jitter, every open period stays within [80%, 100%] of the capped base."""
    rng = random.Random(1234)
    breaker = make_breaker(jitter=rng.random, reset_timeout_s=1.0, max_reset_timeout_s=4.0)
    now = 0.0
    trip(breaker, now)
    bases = [1.0, 2.0, 4.0] + [4.0] * 47
    for base in bases:
        period = open_period(breaker, now)
        assert 0.8 * base <= period <= base
        now += period
        call(breaker, Outcome.FAILURE, now)


def test_breaker_close_resets_the_backoff():
    """After a close, the next trip opens for reset_timeout_s again, not the doubled period."""
    breaker = make_breaker(reset_timeout_s=1.0, max_reset_timeout_s=10.0, success_threshold=1)
    trip(breaker, now=0.0)
    call(breaker, Outcome.FAILURE, 1.0)  # failed probe: open for 2
    assert open_period(breaker, 1.0) == pytest.approx(2.0)
    call(breaker, Outcome.SUCCESS, 3.0)  # probe succeeds: closed
    assert breaker.state == CLOSED
    trip(breaker, now=4.0)
    assert open_period(breaker, 4.0) == pytest.approx(1.0)


def test_breaker_closing_starts_a_fresh_window():
    """Calls counted before the breaker opened count neither in the run nor in the rate later."""
    breaker = make_breaker(
        failure_threshold=3, failure_rate=0.5, min_calls=4, window=10, success_threshold=1
    )
    trip(breaker, now=0.0)  # window: F F F
    call(breaker, Outcome.SUCCESS, 1.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.SUCCESS, 1.0)  # with the old window kept: F F F S, 3/4
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 1.0)
    call(breaker, Outcome.FAILURE, 1.0)  # a run of 2, not 5
    assert breaker.state == CLOSED


# --- Breaker: stale permits ------------------------------------------------------------------


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.FAILURE])
def test_breaker_permit_from_closed_state_does_not_move_half_open(outcome):
    """A call started while closed and ending after the breaker went half-open is not a probe."""
    breaker = make_breaker(success_threshold=1, half_open_max_calls=1)
    stale = breaker.try_acquire(0.0)
    assert stale is not None
    trip(breaker, now=0.0)
    probe = breaker.try_acquire(1.0)
    assert probe is not None
    breaker.record(stale, outcome, 5.0, 1.0)
    assert breaker.state == HALF_OPEN
    assert breaker.try_acquire(1.0) is None  # the probe's slot is still taken
    breaker.record(probe, Outcome.SUCCESS, FAST_S, 1.0)
    assert breaker.state == CLOSED


def test_breaker_permit_from_before_a_trip_does_not_count_while_open():
    """Outcomes of calls started before the breaker opened change nothing while it is open."""
    breaker = make_breaker(reset_timeout_s=1.0)
    stale = [breaker.try_acquire(0.0) for _ in range(5)]
    trip(breaker, now=0.0)
    for permit in stale:
        assert permit is not None
        breaker.record(permit, Outcome.FAILURE, FAST_S, 0.5)
    assert breaker.state == OPEN
    assert open_period(breaker, 0.5) == pytest.approx(0.5)  # not re-opened at 0.5


def test_breaker_stale_failures_do_not_count_after_close():
    """Failures of calls started before a close do not count towards the next trip."""
    breaker = make_breaker(failure_threshold=2, success_threshold=1)
    trip(breaker, now=0.0)
    stale_probe_era = breaker.try_acquire(1.0)  # the probe
    assert stale_probe_era is not None
    breaker.record(stale_probe_era, Outcome.SUCCESS, FAST_S, 1.0)
    assert breaker.state == CLOSED
    old = Permit(generation=0, probe=False)  # granted in the very first closed period
    breaker.record(old, Outcome.FAILURE, FAST_S, 1.0)
    breaker.record(old, Outcome.FAILURE, FAST_S, 1.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 1.0)
    assert breaker.state == CLOSED
    call(breaker, Outcome.FAILURE, 1.0)
    assert breaker.state == OPEN


def test_breaker_stale_probe_neither_frees_a_slot_nor_counts_as_success():
    """A probe from an earlier half-open period ending late changes nothing in the current one."""
    breaker = make_breaker(half_open_max_calls=2, success_threshold=1, reset_timeout_s=1.0)
    trip(breaker, now=0.0)
    failing, late = breaker.try_acquire(1.0), breaker.try_acquire(1.0)
    assert failing is not None
    assert late is not None
    breaker.record(failing, Outcome.FAILURE, FAST_S, 1.0)  # re-opened for 2 s
    assert breaker.state == OPEN
    current = [breaker.try_acquire(3.0), breaker.try_acquire(3.0)]
    assert all(p is not None for p in current)
    breaker.record(late, Outcome.SUCCESS, FAST_S, 3.0)
    assert breaker.state == HALF_OPEN  # success_threshold=1, yet not closed by a stale probe
    assert breaker.try_acquire(3.0) is None  # and no slot was freed


# --- Breaker: pybreaker state and listeners ----------------------------------------------------


class Recorder(pybreaker.CircuitBreakerListener):
    """Records (breaker name, old state, new state) for every change it is told about.

    pybreaker notifies before it updates its storage, so a listener reads the new state
    from `new_state`, not from `cb.current_state`.
    """

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:
        old = old_state.name if old_state is not None else "none"
        self.changes.append((cb.name, old, new_state.name))


def test_breaker_state_is_pybreakers_and_listeners_see_every_change():
    """breaker.state is pybreaker's state name; a listener sees each transition in order."""
    breaker = make_breaker(success_threshold=1, reset_timeout_s=1.0)
    recorder = Recorder()
    breaker.add_listener(recorder)
    assert breaker.state == pybreaker.STATE_CLOSED
    trip(breaker, now=0.0)
    assert breaker.state == pybreaker.STATE_OPEN
    call(breaker, Outcome.FAILURE, 1.0)  # half-open, then the probe re-opens it
    assert breaker.state == pybreaker.STATE_OPEN
    call(breaker, Outcome.SUCCESS, 3.0)  # half-open, then closed
    assert breaker.state == pybreaker.STATE_CLOSED
    assert recorder.changes == [
        ("target", "closed", "open"),
        ("target", "open", "half-open"),
        ("target", "half-open", "open"),
        ("target", "open", "half-open"),
        ("target", "half-open", "closed"),
    ]


def test_breaker_records_nothing_to_listeners_without_a_state_change():
    """Calls that leave the state as it is notify no listener."""
    breaker = make_breaker(failure_threshold=3)
    recorder = Recorder()
    breaker.add_listener(recorder)
    for outcome in [Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED, Outcome.FAILURE]:
        call(breaker, outcome, 0.0)
    assert recorder.changes == []


# --- An operator's force ------------------------------------------------------------------------


def test_a_breaker_forced_open_rejects_every_call_whatever_the_time():
    """`force: open` (the kill switch): reported open from the start, never a permit, not
    even after any reset timeout; a peer's opening changes nothing."""
    breaker = make_breaker(force="open")
    assert breaker.state == OPEN
    assert [breaker.try_acquire(now) for now in (0.0, 1.0, 10.0, 3600.0)] == [None] * 4
    breaker.force_open(5.0, 0.5)
    assert breaker.state == OPEN and breaker.try_acquire(3600.0) is None


def test_a_breaker_forced_closed_lets_every_call_through_whatever_they_return():
    """`force: closed`: failures and slow calls past every threshold never open it, and a
    peer's opening does not either."""
    breaker = make_breaker(force="closed", min_calls=3, window=5)
    for n in range(20):
        call(breaker, Outcome.FAILURE, float(n), duration_s=10.0)
    breaker.force_open(25.0, 60.0)
    assert breaker.state == CLOSED
    assert breaker.try_acquire(26.0) is not None


# --- Retry budget and bulkhead -----------------------------------------------------------------


def retries_allowed(budget: RetryBudget, calls: int) -> int:
    """Every call fails and asks for a retry right away; count the retries granted."""
    granted = 0
    for _ in range(calls):
        budget.on_call()
        if budget.try_spend():
            granted += 1
    return granted


@pytest.mark.parametrize(
    ("ratio", "reserve", "calls", "low", "high"),
    [
        (0.2, 3.0, 1000, 202, 203),  # 20% of 1000 plus the reserve of 3
        (0.1, 3.0, 1000, 102, 103),
        (0.2, 0.0, 1000, 199, 200),
        (0.0, 3.0, 1000, 0, 0),  # ratio 0: no retries, not even from the reserve
        (1.0, 3.0, 10, 10, 10),
    ],
)
def test_retry_budget_allows_ratio_of_calls_plus_reserve(ratio, reserve, calls, low, high):
    """Over many failing calls, retries stay at about ratio * calls + reserve."""
    budget = RetryBudget(ratio, reserve=reserve)
    assert low <= retries_allowed(budget, calls) <= high


def test_retry_budget_reserve_lets_the_first_retries_of_a_quiet_target_through():
    """A fresh budget grants `reserve` retries before any deposit, then refuses."""
    budget = RetryBudget(0.2, reserve=3.0)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_does_not_bank_unlimited_credit():
    """Healthy calls bank at most reserve + 100 * ratio retries for a later burst."""
    budget = RetryBudget(0.2, reserve=3.0)
    for _ in range(10_000):
        budget.on_call()
    granted = sum(budget.try_spend() for _ in range(1000))
    assert 3 <= granted <= 3 + 100 * 0.2


@pytest.mark.parametrize("limit", [1, 2, 48])
def test_bulkhead_admits_up_to_limit_then_refuses_at_once(limit):
    """try_enter admits `limit` callers, refuses the next, and admits again after a leave."""
    bulkhead = Bulkhead(limit)
    assert all(bulkhead.try_enter() for _ in range(limit))
    assert bulkhead.in_use == limit
    assert bulkhead.try_enter() is False
    assert bulkhead.in_use == limit
    bulkhead.leave()
    assert bulkhead.try_enter() is True
    assert bulkhead.try_enter() is False
