"""The fallback chain's ordering logic, driven by a scripted backend and a fake clock.

`ScriptedBackend` stands in for Triton only to pin the chain's decisions (which step runs,
what is skipped and why, what the breaker and retry budget see). It returns probabilities or
raises the gateway's own BackendError subclasses from a script; how the real Triton backend
produces those errors is tested against a real server in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.backends import (
    BackendError,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.contracts import load_contracts
from gateway.fallback import (
    MIN_CALL_BUDGET_S,
    ChainContext,
    ModelBackend,
    StaleAnswer,
    StepRecord,
    TargetGuard,
    run_chain,
)
from gateway.policy import BreakerConfig, Policy
from gateway.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    Bulkhead,
    Deadline,
    Outcome,
    RetryBudget,
)
from gateway.rules import Fallbacks, load_fallbacks

REPO = Path(__file__).resolve().parents[1]
MARGIN_S = 0.005
START = 100.0

NO_RULE_MATCH = {"customer_id": "c-1", "tenure_months": 24, "monthly_charges": 50.0}
RULE_MATCH = {"customer_id": "c-1", "tenure_months": 3, "monthly_charges": 80.0}


class FakeClock:
    """A monotonic clock that moves only when told: `readings[0]` is now."""

    def __init__(self, start: float = START) -> None:
        self.readings = [start]

    def __call__(self) -> float:
        return self.readings[0]

    def advance(self, seconds: float) -> None:
        self.readings[0] += seconds


class ScriptedBackend:
    """Plays a script of answers: a float is returned, an exception (a BackendError, or what
    a bug in a backend would raise) is raised.

    Each call may cost `cost_s` of fake time. Calls beyond the script fail the test, so a
    backend that must not be called gets an empty script.
    """

    def __init__(self, clock: FakeClock, *script: float | BaseException, cost_s: float = 0.0):
        self.clock = clock
        self.script = list(script)
        self.cost_s = cost_s
        self.calls: list[tuple[dict[str, Any], float, Mapping[str, str] | None]] = []

    async def predict(
        self, features: Mapping[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> float:
        self.calls.append((dict(features), timeout_s, headers))
        assert self.script, "the backend was called more often than scripted"
        self.clock.advance(self.cost_s)
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def as_model_backend(backend: ModelBackend) -> ModelBackend:
    """Typed as the chain's ModelBackend protocol, so a type checker vets ScriptedBackend."""
    return backend


def tripped_breaker(at: float, **overrides: Any) -> Breaker:
    """A breaker opened at `at` for reset_timeout_s (1 s)."""
    opened = make_breaker(failure_threshold=1, **overrides)
    permit = opened.try_acquire(at)
    assert permit is not None
    opened.record(permit, Outcome.FAILURE, 0.0, at)
    assert opened.state == OPEN
    return opened


def make_breaker(**overrides: Any) -> Breaker:
    settings: dict[str, Any] = {
        "failure_threshold": 5,
        "min_calls": 10,
        "window": 20,
        "reset_timeout_s": 1.0,
        "max_reset_timeout_s": 4.0,
        "success_threshold": 1,
        "half_open_max_calls": 1,
    }
    settings.update(overrides)
    return Breaker("t", BreakerConfig(**settings), jitter=lambda: 0.0)


def guard(
    backend: ScriptedBackend,
    *,
    breaker: Breaker | None = None,
    bulkhead: Bulkhead | None = None,
    retry_budget: RetryBudget | None = None,
    version: str = "1",
) -> TargetGuard:
    return TargetGuard(
        backend=as_model_backend(backend),
        breaker=breaker or make_breaker(),
        bulkhead=bulkhead or Bulkhead(4),
        retry_budget=retry_budget or RetryBudget(0.2),
        model_version=version,
    )


def policy(chain: list[str]) -> Policy:
    target = {
        "url": "triton:8000",
        "model": "m",
        "version": "1",
        "inputs": [{"name": "features", "features": ["tenure_months", "monthly_charges"]}],
    }
    return Policy.model_validate(
        {
            "model_id": "customer-churn",
            "timeout_ms": 400,
            "labels": {"threshold": 0.5, "positive": "churn", "negative": "stay"},
            "targets": {"primary": target, "secondary": target},
            "chain": chain,
        }
    )


FULL_CHAIN = policy(["primary", "secondary", "rules", "stale-cache", "default"])
TWO_MODELS = policy(["primary", "secondary", "default"])


@pytest.fixture(scope="module")
def fallbacks() -> Fallbacks:
    return load_fallbacks(REPO / "fallbacks", load_contracts(REPO / "contracts"))["customer-churn"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def context(clock: FakeClock, fallbacks: Fallbacks, **guards: TargetGuard) -> ChainContext:
    return ChainContext(
        guards=guards, fallbacks=fallbacks, clock=clock, margin_s=MARGIN_S, headers={"h": "v"}
    )


def deadline(clock: FakeClock, budget_s: float = 0.4) -> Deadline:
    return Deadline.after(budget_s, clock())


def outcomes(result) -> list[tuple[str, str, str | None]]:
    return [(s.step, s.outcome, s.reason) for s in result.steps]


async def test_primary_answers_undegraded(clock, fallbacks):
    """When the primary answers, it serves undegraded and nothing after it runs."""
    primary = ScriptedBackend(clock, 0.8, cost_s=0.05)
    secondary = ScriptedBackend(clock)
    ctx = context(clock, fallbacks, primary=guard(primary, version="7"), secondary=guard(secondary))
    result = await run_chain(FULL_CHAIN, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.degraded, result.fallback_reason) == ("primary", False, None)
    assert (result.prediction, result.probability, result.model_version) == ("churn", 0.8, "7")
    assert result.rule is None
    assert result.steps == (
        StepRecord(step="primary", outcome="answered", duration_ms=50.0, attempts=1),
    )
    assert secondary.calls == []
    assert primary.calls == [(NO_RULE_MATCH, pytest.approx(0.4 - MARGIN_S), {"h": "v"})]


@pytest.mark.parametrize(
    ("probability", "label"), [(0.5, "churn"), (0.4999, "stay"), (0.0, "stay")]
)
async def test_model_probability_becomes_the_policy_label(clock, fallbacks, probability, label):
    """A model's probability is labelled with the policy's threshold (>= is positive)."""
    ctx = context(clock, fallbacks, primary=guard(ScriptedBackend(clock, probability)))
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.prediction, result.probability) == (label, probability)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (BackendTimeout("no answer within 395 ms"), "timeout"),
        (BackendOverloaded("triton 503"), "overloaded"),
        (BackendError("triton 500"), "backend_error"),
        (BackendRejected("triton 400"), "backend_error"),
    ],
)
async def test_failed_primary_hands_over_to_the_next_target(clock, fallbacks, error, reason):
    """A failing primary is recorded with its reason, the next target answers, degraded."""
    primary = ScriptedBackend(clock, error, cost_s=0.1)
    secondary = ScriptedBackend(clock, 0.2)
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary, version="3"))
    result = await run_chain(FULL_CHAIN, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.degraded, result.fallback_reason) == (
        "secondary",
        True,
        reason,
    )
    assert (result.prediction, result.probability, result.model_version) == ("stay", 0.2, "3")
    assert outcomes(result) == [("primary", "failed", reason), ("secondary", "answered", None)]
    assert result.steps[0].error == str(error)
    assert result.steps[0].attempts == 1  # none of these is retried
    assert len(primary.calls) == 1


async def test_next_target_gets_only_what_is_left_of_the_deadline(clock, fallbacks):
    """Every model call is bounded by the request's remaining budget minus the margin."""
    primary = ScriptedBackend(clock, BackendTimeout("slow"), cost_s=0.3)
    secondary = ScriptedBackend(clock, 0.2)
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock, 0.4), ctx)
    assert primary.calls[0][1] == pytest.approx(0.4 - MARGIN_S)
    assert secondary.calls[0][1] == pytest.approx(0.1 - MARGIN_S)


async def test_unavailable_is_retried_once_within_budget(clock, fallbacks):
    """BackendUnavailable is retried once when the retry budget allows: attempts == 2."""
    primary = ScriptedBackend(clock, BackendUnavailable("ClientConnectorError"), 0.9)
    ctx = context(clock, fallbacks, primary=guard(primary, retry_budget=RetryBudget(0.2)))
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.degraded, result.probability) == ("primary", False, 0.9)
    assert result.steps[0].attempts == 2
    assert len(primary.calls) == 2


async def test_unavailable_twice_fails_the_step_after_two_attempts(clock, fallbacks):
    """A retry is made at most once: a second BackendUnavailable fails the step."""
    primary = ScriptedBackend(clock, BackendUnavailable("a"), BackendUnavailable("b"))
    secondary = ScriptedBackend(clock, 0.3)
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert outcomes(result) == [
        ("primary", "failed", "backend_error"),
        ("secondary", "answered", None),
    ]
    assert (result.steps[0].attempts, result.steps[0].error) == (2, "b")


@pytest.mark.parametrize(
    "budget",
    [RetryBudget(0.0), RetryBudget(0.2, reserve=0.0)],
    ids=["ratio-zero", "budget-exhausted"],
)
async def test_unavailable_is_not_retried_without_retry_budget(clock, fallbacks, budget):
    """With no retry budget left, BackendUnavailable fails the step after one attempt."""
    primary = ScriptedBackend(clock, BackendUnavailable("ClientConnectorError"))
    secondary = ScriptedBackend(clock, 0.3)
    ctx = context(
        clock, fallbacks, primary=guard(primary, retry_budget=budget), secondary=guard(secondary)
    )
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert outcomes(result) == [
        ("primary", "failed", "backend_error"),
        ("secondary", "answered", None),
    ]
    assert result.steps[0].attempts == 1
    assert len(primary.calls) == 1


@pytest.mark.parametrize(
    ("error", "state"),
    [(BackendRejected("triton 400"), CLOSED), (BackendError("triton 500"), OPEN)],
    ids=["rejected-ignored", "error-counted"],
)
async def test_rejected_does_not_count_against_the_breaker(clock, fallbacks, error, state):
    """A 4xx rejection is a mapping fault, not ill health: the breaker does not count it."""
    target_breaker = make_breaker(failure_threshold=1)
    primary = ScriptedBackend(clock, error)
    ctx = context(
        clock,
        fallbacks,
        primary=guard(primary, breaker=target_breaker),
        secondary=guard(ScriptedBackend(clock, 0.5)),
    )
    await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert target_breaker.state == state


@pytest.mark.parametrize(
    "error", [AttributeError("'int' object has no attribute 'get'"), IndexError("too many")]
)
async def test_an_unexpected_error_from_a_backend_is_its_failure_and_the_chain_goes_on(
    clock, fallbacks, error
):
    """Whatever a backend raises (an answer no check foresaw, a bug) fails its step, counts
    against its breaker and leaves no half-open probe permit behind: the next step answers,
    the breaker re-opens, and once its opening ends it lets a probe through again."""
    breaker = tripped_breaker(START - 1.0)  # its second of opening has just ended
    primary = ScriptedBackend(clock, error)
    ctx = context(
        clock, fallbacks,
        primary=guard(primary, breaker=breaker), secondary=guard(ScriptedBackend(clock, 0.3)),
    )  # fmt: skip
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert outcomes(result)[:2] == [
        ("primary", "failed", "backend_error"),
        ("secondary", "answered", None),
    ]
    assert type(error).__name__ in result.steps[0].error
    assert breaker.state == OPEN  # the probe's failure was counted
    clock.advance(10.0)
    assert breaker.try_acquire(clock()) is not None  # no probe permit was left unsettled


class HangingBackend:
    """Never answers: the call waits until its caller is cancelled."""

    async def predict(self, features, timeout_s, headers) -> float:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_call_cancelled_by_its_caller_gives_its_probe_permit_back(clock, fallbacks):
    """A request cancelled mid-call (a stream worker stopping, say) passes no verdict on the
    backend, and its half-open probe permit is returned: the next request may probe."""
    breaker = tripped_breaker(START - 1.0)
    ctx = context(clock, fallbacks, primary=guard(HangingBackend(), breaker=breaker))
    call = asyncio.create_task(run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx))
    await asyncio.sleep(0.01)
    assert breaker.try_acquire(clock()) is None  # the one probe is out
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert breaker.state == HALF_OPEN
    assert breaker.try_acquire(clock()) is not None


async def test_open_breaker_skips_the_target_without_calling_it(clock, fallbacks):
    """An open breaker skips its target with `breaker_open`; the backend is never called."""
    open_breaker = tripped_breaker(at=clock())
    primary = ScriptedBackend(clock)
    secondary = ScriptedBackend(clock, 0.6)
    ctx = context(
        clock, fallbacks, primary=guard(primary, breaker=open_breaker), secondary=guard(secondary)
    )
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert primary.calls == []
    assert outcomes(result) == [
        ("primary", "skipped", "breaker_open"),
        ("secondary", "answered", None),
    ]
    assert result.steps[0].attempts == 0
    assert (result.served_by, result.degraded, result.fallback_reason) == (
        "secondary",
        True,
        "breaker_open",
    )


@pytest.mark.parametrize("breaker_state", [CLOSED, HALF_OPEN])
async def test_full_bulkhead_skips_as_overloaded_leaving_the_breaker_alone(
    clock, fallbacks, breaker_state
):
    """A full bulkhead skips its target with `overloaded`; the breaker neither counts it nor
    keeps its half-open probe slot."""
    if breaker_state == HALF_OPEN:
        target_breaker = tripped_breaker(at=clock() - 1.0)  # its open period has just ended
    else:
        target_breaker = make_breaker(failure_threshold=1)
    full = Bulkhead(2)
    assert full.try_enter() and full.try_enter()
    primary = ScriptedBackend(clock)
    secondary = ScriptedBackend(clock, 0.6)
    ctx = context(
        clock,
        fallbacks,
        primary=guard(primary, breaker=target_breaker, bulkhead=full),
        secondary=guard(secondary),
    )
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert primary.calls == []
    assert outcomes(result) == [
        ("primary", "skipped", "overloaded"),
        ("secondary", "answered", None),
    ]
    assert result.fallback_reason == "overloaded"
    assert full.in_use == 2
    assert target_breaker.state == breaker_state
    assert target_breaker.try_acquire(clock()) is not None  # a probe slot is still free


@pytest.mark.parametrize("budget_s", [0.0, MARGIN_S, MARGIN_S + MIN_CALL_BUDGET_S * 0.99])
async def test_no_budget_left_skips_model_steps_as_timeout(clock, fallbacks, budget_s):
    """Without MIN_CALL_BUDGET_S left after the margin, no model is called: `timeout` skips,
    and the default still answers."""
    primary = ScriptedBackend(clock)
    secondary = ScriptedBackend(clock)
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock, budget_s), ctx)
    assert primary.calls == secondary.calls == []
    assert outcomes(result) == [
        ("primary", "skipped", "timeout"),
        ("secondary", "skipped", "timeout"),
        ("default", "answered", None),
    ]
    assert (result.served_by, result.fallback_reason) == ("default", "timeout")


async def test_just_enough_budget_still_calls_the_model(clock, fallbacks):
    """With exactly MIN_CALL_BUDGET_S left after the margin, the model is called."""
    primary = ScriptedBackend(clock, 0.7)
    ctx = context(clock, fallbacks, primary=guard(primary))
    budget_s = MARGIN_S + MIN_CALL_BUDGET_S * 1.01
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock, budget_s), ctx)
    assert result.served_by == "primary"
    assert primary.calls[0][1] == pytest.approx(MIN_CALL_BUDGET_S * 1.01)


async def test_everything_failing_falls_to_a_matching_rule(clock, fallbacks):
    """When no model answers, the first matching rule answers and is named in the result."""
    primary = ScriptedBackend(clock, BackendTimeout("slow"))
    secondary = ScriptedBackend(clock, BackendOverloaded("triton 429"))
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    result = await run_chain(FULL_CHAIN, RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.rule) == ("rules", "new-customer-high-bill")
    assert (result.prediction, result.probability) == ("churn", 0.74)
    assert result.model_version == fallbacks.version
    assert (result.degraded, result.fallback_reason) == (True, "timeout")
    assert [(s.step, s.outcome, s.reason, s.rule) for s in result.steps] == [
        ("primary", "failed", "timeout", None),
        ("secondary", "failed", "overloaded", None),
        ("rules", "answered", None, "new-customer-high-bill"),
    ]


async def test_everything_failing_without_rule_match_falls_to_default(clock, fallbacks):
    """With no rule matching and no stale answer, the static default answers; every step tried
    is recorded in chain order."""
    primary = ScriptedBackend(clock, BackendError("triton 500"))
    secondary = ScriptedBackend(clock, BackendTimeout("slow"))
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    result = await run_chain(FULL_CHAIN, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.model_version, result.rule) == ("default", "default", None)
    assert (result.prediction, result.probability) == ("stay", 0.27)
    assert (result.degraded, result.fallback_reason) == (True, "backend_error")
    assert outcomes(result) == [
        ("primary", "failed", "backend_error"),
        ("secondary", "failed", "timeout"),
        ("rules", "no_match", None),
        ("stale-cache", "no_match", None),
        ("default", "answered", None),
    ]


async def test_stale_answer_serves_before_default(clock, fallbacks):
    """With no model or rule answering, a stale cached answer serves with its own version."""

    async def lookup() -> StaleAnswer:
        return StaleAnswer(prediction="churn", probability=0.66, model_version="1")

    ctx = context(
        clock,
        fallbacks,
        primary=guard(ScriptedBackend(clock, BackendTimeout("slow"))),
        secondary=guard(ScriptedBackend(clock, BackendTimeout("slow"))),
    )
    ctx.stale_lookup = lookup
    result = await run_chain(FULL_CHAIN, NO_RULE_MATCH, deadline(clock), ctx)
    assert (result.served_by, result.prediction, result.probability) == (
        "stale-cache",
        "churn",
        0.66,
    )
    assert [s.step for s in result.steps] == ["primary", "secondary", "rules", "stale-cache"]


async def test_chain_order_is_the_policys(clock, fallbacks):
    """Steps run in the policy's chain order: here rules before any model."""
    rules_first = policy(["rules", "secondary", "primary", "default"])
    primary = ScriptedBackend(clock, 0.9)
    secondary = ScriptedBackend(clock, BackendTimeout("slow"))
    ctx = context(clock, fallbacks, primary=guard(primary), secondary=guard(secondary))
    result = await run_chain(rules_first, NO_RULE_MATCH, deadline(clock), ctx)
    assert outcomes(result) == [
        ("rules", "no_match", None),
        ("secondary", "failed", "timeout"),
        ("primary", "answered", None),
    ]
    assert (result.served_by, result.degraded) == ("primary", True)


@pytest.mark.parametrize(
    "script",
    [(0.5,), (BackendError("e"),), (BackendUnavailable("a"), 0.5), (BackendRejected("r"),)],
    ids=["answer", "error", "retried", "rejected"],
)
async def test_bulkhead_slot_is_released_after_every_call(clock, fallbacks, script):
    """Whatever the call's outcome, its bulkhead slot is given back."""
    bulkhead = Bulkhead(1)
    ctx = context(
        clock,
        fallbacks,
        primary=guard(ScriptedBackend(clock, *script), bulkhead=bulkhead),
        secondary=guard(ScriptedBackend(clock, 0.5)),
    )
    await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert bulkhead.in_use == 0


async def test_failure_is_recorded_when_its_retry_cannot_start(clock, fallbacks):
    """A call that failed and whose retry is refused is recorded as that failure, not a skip."""
    trips_on_first_failure = make_breaker(failure_threshold=1)
    primary = ScriptedBackend(clock, BackendUnavailable("ClientConnectorError"))
    secondary = ScriptedBackend(clock, 0.4)
    ctx = context(
        clock,
        fallbacks,
        primary=guard(primary, breaker=trips_on_first_failure),
        secondary=guard(secondary),
    )
    result = await run_chain(TWO_MODELS, NO_RULE_MATCH, deadline(clock), ctx)
    assert len(primary.calls) == 1
    assert trips_on_first_failure.state == OPEN
    assert result.steps[0] == StepRecord(
        step="primary",
        outcome="failed",
        reason="backend_error",
        error="ClientConnectorError",
        attempts=1,
    )
    assert result.fallback_reason == "backend_error"
