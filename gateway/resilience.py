"""Resilience primitives: deadlines, circuit breakers, retry budgets and bulkheads.

Everything here is decision logic over plain numbers. Callers pass `now` (a monotonic
clock reading in seconds) instead of these classes reading a clock, so tests drive time
without sleeping and the event loop is never blocked: no lock is held across an `await`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import pybreaker

from gateway.policy import BreakerConfig

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN


@dataclass(frozen=True)
class Deadline:
    """A request's single time budget; every step spends from it."""

    expires_at: float

    @classmethod
    def after(cls, budget_s: float, now: float) -> Deadline:
        return cls(expires_at=now + budget_s)

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


def request_budget_ms(policy_timeout_ms: int, caller_timeout_ms: int | None) -> int:
    """The budget a request gets: the policy's, lowered (never raised) by the caller's."""
    if caller_timeout_ms is None:
        return policy_timeout_ms
    return max(1, min(policy_timeout_ms, caller_timeout_ms))


class Outcome(Enum):
    """How one backend call ended, as the breaker sees it."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # neither the backend's fault nor a sign of health: not counted


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; `generation` ties the outcome to the state it was given in."""

    generation: int
    probe: bool


TripHook = Callable[["Breaker", float], None]
"""Told `(breaker, open_for_s)` when a breaker opens on its own evidence."""


class Breaker:
    """A circuit breaker per backend target, with pybreaker holding its state.

    pybreaker's own `call()` is synchronous and holds a lock around the guarded call, so
    it cannot guard an `await`. This adapter asks before a call (`try_acquire`) and records
    the outcome after it (`record`), and moves pybreaker between its states itself, adding
    what a consecutive-failure counter misses:

    - it opens on `failure_threshold` failures in a row, or on a failure rate or slow-call
      rate over a sliding window of the last `window` calls once `min_calls` are in it;
    - half-open lets at most `half_open_max_calls` probes through at once and closes after
      `success_threshold` successes; any failed probe re-opens it. A probe cannot hang the
      breaker half-open: every call is bounded by its request's deadline;
    - each re-open without a close in between doubles the open period, capped at
      `max_reset_timeout_s` and jittered down by up to 20% so replicas do not probe in step;
    - an operator's `force` (policy) overrides all of it: `open` rejects every call, `closed`
      lets every call through; neither learns from outcomes nor from other replicas.
    """

    def __init__(
        self, name: str, config: BreakerConfig, jitter: Callable[[], float] = random.random
    ) -> None:
        self.name = name
        self.config = config
        self._jitter = jitter
        self._state_machine = pybreaker.CircuitBreaker(
            fail_max=config.failure_threshold,
            reset_timeout=config.reset_timeout_s,
            success_threshold=config.success_threshold,
            name=name,
        )
        self._window: deque[tuple[bool, bool]] = deque(maxlen=config.window)
        self._consecutive_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._trips_without_close = 0
        self._opened_at = 0.0
        self._open_for = 0.0
        self._generation = 0
        self._trip_hooks: list[TripHook] = []
        if config.force == "open":
            self._enter(OPEN)  # reported open (metrics, logs) for as long as it is forced

    @property
    def state(self) -> str:
        return self._state_machine.current_state

    def add_listener(self, listener: pybreaker.CircuitBreakerListener) -> None:
        """Listeners see every state change (metrics and logs hook in here)."""
        self._state_machine.add_listener(listener)

    def on_trip(self, hook: TripHook) -> None:
        """Call `hook(breaker, open_for_s)` whenever this breaker opens on its own evidence."""
        self._trip_hooks.append(hook)

    def force_open(self, now: float, open_for_s: float) -> None:
        """Open for `open_for_s` on another's evidence (another replica, an operator).

        A breaker already open keeps the later of the two re-open times; trip hooks are not
        called, so an opening learnt from a peer is not echoed back to it.
        """
        if self.config.force is not None:
            return  # the operator's word stands
        until = now + open_for_s
        if self.state == OPEN:
            if until > self._opened_at + self._open_for:
                self._open_for = until - self._opened_at
            return
        self._opened_at, self._open_for = now, open_for_s
        self._enter(OPEN)

    def try_acquire(self, now: float) -> Permit | None:
        """Leave for one call, or None when the breaker rejects it."""
        if self.config.force is not None:
            return None if self.config.force == "open" else Permit(self._generation, False)
        if self.state == OPEN:
            if now < self._opened_at + self._open_for:
                return None
            self._enter(HALF_OPEN)
        if self.state == HALF_OPEN:
            if self._probes_in_flight >= self.config.half_open_max_calls:
                return None
            self._probes_in_flight += 1
            return Permit(self._generation, probe=True)
        return Permit(self._generation, probe=False)

    def record(self, permit: Permit, outcome: Outcome, duration_s: float, now: float) -> None:
        """Count one call's outcome; outcomes from an earlier state change nothing."""
        if permit.probe and permit.generation == self._generation:
            self._probes_in_flight -= 1
        if (
            outcome is Outcome.IGNORED
            or permit.generation != self._generation
            or self.config.force is not None
        ):
            return
        slow = duration_s * 1000 >= self.config.slow_call_ms
        if self.state == HALF_OPEN:
            self._record_probe(outcome is Outcome.FAILURE or slow, now)
        else:
            self._record_closed(outcome is Outcome.FAILURE, slow, now)

    def open_remaining(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._open_for - now)

    def _record_closed(self, failed: bool, slow: bool, now: float) -> None:
        self._window.append((failed, slow))
        self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
        if self._consecutive_failures >= self.config.failure_threshold or self._rates_exceeded():
            self._trip(now)

    def _record_probe(self, bad: bool, now: float) -> None:
        if bad:
            self._trip(now)
            return
        self._probe_successes += 1
        if self._probe_successes >= self.config.success_threshold:
            self._trips_without_close = 0
            self._enter(CLOSED)

    def _rates_exceeded(self) -> bool:
        calls = len(self._window)
        if calls < self.config.min_calls:
            return False
        failures = sum(1 for failed, _ in self._window if failed)
        slow = sum(1 for _, was_slow in self._window if was_slow)
        return (
            failures / calls >= self.config.failure_rate
            or slow / calls >= self.config.slow_call_rate
        )

    def _trip(self, now: float) -> None:
        base = self.config.reset_timeout_s * (2**self._trips_without_close)
        capped = min(base, self.config.max_reset_timeout_s)
        self._open_for = capped * (1.0 - 0.2 * self._jitter())
        self._opened_at = now
        self._trips_without_close += 1
        self._enter(OPEN)
        for hook in self._trip_hooks:
            hook(self, self._open_for)

    def _enter(self, state: str) -> None:
        """Move pybreaker to `state` (it notifies listeners) and start a fresh generation."""
        self._generation += 1
        self._window.clear()
        self._consecutive_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        {
            OPEN: self._state_machine.open,
            HALF_OPEN: self._state_machine.half_open,
            CLOSED: self._state_machine.close,
        }[state]()


class RetryBudget:
    """Retries may spend at most `ratio` of calls, so a failing backend is not hammered.

    Each call deposits `ratio` of a token, each retry withdraws one; a small reserve lets
    the first retries of a quiet target through (Finagle's retry budget, simplified).
    """

    def __init__(self, ratio: float, reserve: float = 3.0) -> None:
        self.ratio = ratio
        self._reserve = reserve
        self._tokens = reserve if ratio > 0 else 0.0
        self._cap = reserve + 100 * ratio

    def on_call(self) -> None:
        self._tokens = min(self._cap, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Bulkhead:
    """A concurrency limit per target: when full, callers move on at once, never queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def try_enter(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def leave(self) -> None:
        self.in_use -= 1
