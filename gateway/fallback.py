"""The fallback chain: try each step of a policy's chain until one answers.

Model steps go through their target's breaker, bulkhead and retry budget, each bounded by
what is left of the request's deadline. Rules, the stale cache and the static default
cost microseconds and need no budget, so an answer always arrives in time. Every step
tried is recorded with its outcome, so the decision can be explained afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.backends import BackendError, BackendRejected
from gateway.policy import DEFAULT_STEP, RULES_STEP, STALE_CACHE_STEP, Policy
from gateway.resilience import Breaker, Bulkhead, Deadline, Outcome, RetryBudget
from gateway.rules import Fallbacks

log = logging.getLogger("gateway.fallback")

# A model call is not started with less budget than this: it could not answer in time.
MIN_CALL_BUDGET_S = 0.002


class ModelBackend(Protocol):
    async def predict(
        self, features: Mapping[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> float: ...


@dataclass
class TargetGuard:
    """What stands between a request and one target: breaker, bulkhead, retry budget."""

    backend: ModelBackend
    breaker: Breaker
    bulkhead: Bulkhead
    retry_budget: RetryBudget
    model_version: str

    async def backend_answer(
        self, features: Mapping[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> float:
        """The backend's probability; whatever it raises is a BackendError. Backends turn
        their clients' errors into BackendErrors, but an answer no check foresaw (or a bug)
        may raise anything: that is this call's failure, counted against the target, and the
        chain goes on, never a 500 nor a breaker permit left unsettled."""
        try:
            return await self.backend.predict(features, timeout_s, headers)
        except BackendError:
            raise
        except Exception as error:
            log.warning("backend call raised an unexpected error", exc_info=True)
            raise BackendError(f"unexpected {type(error).__name__}: {error}"[:300]) from None


@dataclass(frozen=True)
class StepRecord:
    """What one chain step did: `answered`, `skipped` (with why), `failed` or `no_match`."""

    step: str
    outcome: str
    reason: str | None = None
    duration_ms: float = 0.0
    error: str | None = None
    rule: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class StaleAnswer:
    prediction: str
    probability: float
    model_version: str


StaleLookup = Callable[[], Awaitable[StaleAnswer | None]]


@dataclass(frozen=True)
class ChainResult:
    """The answer and how it was reached."""

    prediction: str
    probability: float
    model_version: str
    served_by: str
    degraded: bool
    fallback_reason: str | None
    steps: tuple[StepRecord, ...]
    rule: str | None = None


@dataclass
class ChainContext:
    """What a chain walk needs besides the policy: live guards, fallbacks, clock."""

    guards: Mapping[str, TargetGuard]
    fallbacks: Fallbacks
    stale_lookup: StaleLookup | None = None
    clock: Callable[[], float] = time.monotonic
    margin_s: float = 0.005
    headers: Mapping[str, str] = field(default_factory=dict)
    # Told of every backend call: (target, outcome, seconds); metrics hook in here.
    observe_call: Callable[[str, str, float], None] | None = None
    # Opens a span named for a step (tracing hooks in here); no-op by default.
    span: Callable[[str], AbstractContextManager[Any]] = lambda name: nullcontext()
    # Headers for an outgoing backend call from the current span (W3C trace context).
    outgoing_headers: Callable[[], Mapping[str, str]] = dict


async def run_chain(
    policy: Policy,
    features: Mapping[str, Any],
    deadline: Deadline,
    ctx: ChainContext,
    chain: Sequence[str] | None = None,
) -> ChainResult:
    """Walk `chain` (the policy's first arm's when not given); `default` always answers."""
    chain = list(chain or policy.arm_list[0].chain)
    steps: list[StepRecord] = []
    for step in chain:
        if step == DEFAULT_STEP:
            break
        with ctx.span(f"chain.{step}"):
            result = await _run_step(step, chain[0], policy, features, deadline, ctx, steps)
        if result is not None:
            return result
    default = ctx.fallbacks.default
    steps.append(StepRecord(step=DEFAULT_STEP, outcome="answered"))
    return _result(
        chain[0], default.prediction, default.probability, "default", DEFAULT_STEP, steps
    )


async def _run_step(
    step: str,
    primary: str,
    policy: Policy,
    features: Mapping[str, Any],
    deadline: Deadline,
    ctx: ChainContext,
    steps: list[StepRecord],
) -> ChainResult | None:
    if step == RULES_STEP:
        match = ctx.fallbacks.first_match(features)
        if match is None:
            steps.append(StepRecord(step=RULES_STEP, outcome="no_match"))
            return None
        steps.append(StepRecord(step=RULES_STEP, outcome="answered", rule=match.rule))
        answer = match.answer
        return _result(
            primary,
            answer.prediction,
            answer.probability,
            ctx.fallbacks.version,
            RULES_STEP,
            steps,
            rule=match.rule,
        )
    if step == STALE_CACHE_STEP:
        stale = await ctx.stale_lookup() if ctx.stale_lookup else None
        if stale is None:
            steps.append(StepRecord(step=STALE_CACHE_STEP, outcome="no_match"))
            return None
        steps.append(StepRecord(step=STALE_CACHE_STEP, outcome="answered"))
        return _result(
            primary,
            stale.prediction,
            stale.probability,
            stale.model_version,
            STALE_CACHE_STEP,
            steps,
        )
    record, probability = await call_target(step, ctx.guards[step], features, deadline, ctx)
    steps.append(record)
    if probability is None:
        return None
    label = policy.labels.label(probability)
    return _result(primary, label, probability, ctx.guards[step].model_version, step, steps)


async def call_target(
    name: str,
    guard: TargetGuard,
    features: Mapping[str, Any],
    deadline: Deadline,
    ctx: ChainContext,
) -> tuple[StepRecord, float | None]:
    """One model step: breaker, bulkhead, then the call, retried once when worth it."""
    started = ctx.clock()
    guard.retry_budget.on_call()
    attempts = 0
    last_error: BackendError | None = None  # the failure a refused retry leaves standing
    while True:
        budget = deadline.remaining(ctx.clock()) - ctx.margin_s
        if budget < MIN_CALL_BUDGET_S:
            return _refused(name, "timeout", last_error, started, ctx, attempts), None
        permit = guard.breaker.try_acquire(ctx.clock())
        if permit is None:
            return _refused(name, "breaker_open", last_error, started, ctx, attempts), None
        if not guard.bulkhead.try_enter():
            # Our own load shedding: give the permit back without blaming the backend.
            guard.breaker.record(permit, Outcome.IGNORED, 0.0, ctx.clock())
            return _refused(name, "overloaded", last_error, started, ctx, attempts), None
        attempts += 1
        call_started = ctx.clock()
        try:
            headers = {**ctx.headers, **ctx.outgoing_headers()}
            probability = await guard.backend_answer(features, budget, headers)
        except asyncio.CancelledError:  # the caller left: no verdict on the backend
            guard.breaker.record(permit, Outcome.IGNORED, 0.0, ctx.clock())
            raise
        except BackendError as error:
            outcome = Outcome.IGNORED if isinstance(error, BackendRejected) else Outcome.FAILURE
            if ctx.observe_call is not None:
                ctx.observe_call(name, error.reason, ctx.clock() - call_started)
            log.debug(
                "backend call failed",
                extra={"target": name, "reason": error.reason, "error": str(error)},
            )
            now = ctx.clock()
            guard.breaker.record(permit, outcome, now - call_started, now)
            if error.transient and attempts == 1 and guard.retry_budget.try_spend():
                last_error = error
                continue
            return _failed(name, error, started, ctx, attempts), None
        finally:
            guard.bulkhead.leave()
        now = ctx.clock()
        guard.breaker.record(permit, Outcome.SUCCESS, now - call_started, now)
        if ctx.observe_call is not None:
            ctx.observe_call(name, "success", now - call_started)
        record = StepRecord(
            step=name, outcome="answered", duration_ms=_ms(now - started), attempts=attempts
        )
        return record, probability


def _refused(
    name: str,
    reason: str,
    last_error: BackendError | None,
    started: float,
    ctx: ChainContext,
    attempts: int,
) -> StepRecord:
    """A call that could not start: a skip, or, when it was a retry, the failure before it."""
    if last_error is not None:
        return _failed(name, last_error, started, ctx, attempts)
    return _skipped(name, reason, started, ctx, attempts)


def _skipped(
    name: str, reason: str, started: float, ctx: ChainContext, attempts: int
) -> StepRecord:
    return StepRecord(
        step=name,
        outcome="skipped",
        reason=reason,
        duration_ms=_ms(ctx.clock() - started),
        attempts=attempts,
    )


def _failed(
    name: str, error: BackendError, started: float, ctx: ChainContext, attempts: int
) -> StepRecord:
    return StepRecord(
        step=name,
        outcome="failed",
        reason=error.reason,
        error=str(error),
        duration_ms=_ms(ctx.clock() - started),
        attempts=attempts,
    )


def _result(
    primary: str,
    prediction: str,
    probability: float,
    model_version: str,
    served_by: str,
    steps: list[StepRecord],
    rule: str | None = None,
) -> ChainResult:
    degraded = served_by != primary
    return ChainResult(
        prediction=prediction,
        probability=probability,
        model_version=model_version,
        served_by=served_by,
        degraded=degraded,
        fallback_reason=steps[0].reason if degraded else None,
        steps=tuple(steps),
        rule=rule,
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
