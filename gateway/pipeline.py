"""One prediction, from validated features to the envelope: route, cache, chain, shadows.

The HTTP handler validates and hands over plain data; this module decides, in order:
which arm serves (routing), whether a cached answer stands (cache), the chain walk under
one deadline (fallback), what is kept for next time, which shadows get a copy, and what
the experiment statistics learn. It returns a plain `Answer`; it does no HTTP.

Learning (answer metrics, drift, experiment statistics, shadow copies) does not change the
answer, so `answer_first` hands it back undone, as a `Learning` the HTTP handler runs right
after the body is sent: the caller does not wait for it. `predict` runs it straight away,
for callers with nothing to send first (asynchronous jobs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.cache import CachedPrediction, cache_key, stale_key
from gateway.experiments import Decision
from gateway.fallback import ChainContext, ChainResult, StaleAnswer, StepRecord, run_chain
from gateway.ids import new_uuid4
from gateway.monitoring import version_key
from gateway.policy import Policy
from gateway.resilience import Deadline, request_budget_ms
from gateway.routing import Assignment
from gateway.runtime import ModelRuntime, Runtime, Snapshot
from gateway.tracing import trace_headers

log = logging.getLogger("gateway.pipeline")


@dataclass(frozen=True)
class PredictionInput:
    """A validated request, as plain data."""

    model_id: str
    features: Mapping[str, Any]
    headers: Mapping[str, str]
    tenant: str
    caller_timeout_ms: int | None
    use_cache: bool
    started: float
    request_id: str = ""
    trace_id: str | None = None
    # Set when the id was promised before the answer (asynchronous jobs); else made here.
    prediction_id: str | None = None


@dataclass(frozen=True)
class Answer:
    """The envelope's content and how it was reached (kept for audit and explanations)."""

    prediction_id: str
    prediction: str
    probability: float
    model_version: str
    served_by: str
    degraded: bool
    fallback_reason: str | None
    arm: str
    arm_model: str  # what the arm asks first, `model:version` (experiments.py)
    route: str | None
    cached: bool
    coalesced: bool
    latency_ms: float
    steps: tuple[StepRecord, ...]
    rule: str | None
    policy_version: str

    def envelope(self) -> dict[str, Any]:
        return {
            "prediction": self.prediction,
            "probability": self.probability,
            "model_version": self.model_version,
            "latency_ms": self.latency_ms,
            "prediction_id": self.prediction_id,
            "served_by": self.served_by,
            "degraded": self.degraded,
            "arm": self.arm,
            "cached": self.cached,
            "fallback_reason": self.fallback_reason,
        }


@dataclass(frozen=True, slots=True)
class Learning:
    """What is learnt from one answer, not yet done: call it once, after the answer is out.

    It holds the objects of the answer's own snapshot, so it learns against the
    configuration that answered even if a reload happened in between."""

    runtime: Runtime
    model: ModelRuntime
    policy: Policy
    assignment: Assignment
    request: PredictionInput
    answer: Answer

    def __call__(self) -> None:
        """Learn; a failure is logged, never raised: the answer was given (or is about to be)
        and audited, and a caller that already has its 200 must not see the app crash."""
        try:
            _learn(
                self.runtime, self.model, self.policy, self.assignment, self.request, self.answer
            )
        except Exception:
            # Often run after the request's span ended: name its trace so the log links to it.
            extra = {"prediction_id": self.answer.prediction_id, "trace_id": self.request.trace_id}
            log.exception("learning step failed after the answer", extra=extra)


async def predict(runtime: Runtime, request: PredictionInput) -> Answer:
    """Answer one validated request and learn from it before returning (nothing to send)."""
    answer, learning = await answer_first(runtime, request)
    learning()
    return answer


async def answer_first(runtime: Runtime, request: PredictionInput) -> tuple[Answer, Learning]:
    """Answer one validated request, audited; always answers (the chain ends in a default).

    The learning step is returned, not run: the caller runs it once the answer is sent."""
    snapshot = runtime.snapshot  # this request runs on this configuration to the end
    policy = snapshot.policies.policies[request.model_id]
    model = snapshot.models[request.model_id]
    prediction_id = request.prediction_id or new_uuid4()
    assignment = model.routes.assign(
        request.features, request.headers, request.tenant, prediction_id
    )
    key = _key(snapshot, policy, assignment, request)
    budget = _Budget(
        Deadline.after(
            request_budget_ms(policy.timeout_ms, request.caller_timeout_ms) / 1000,
            request.started,
        ),
        runtime.settings.response_margin_ms / 1000,
    )
    with runtime.tracing.span("cache.lookup"):
        looked_up = key and request.use_cache
        cached = await runtime.cache.get(key, budget.left()) if looked_up else None
    if key:
        runtime.metrics.observe_cache(_cache_event(cached, request.use_cache))
    if cached is not None:
        result, coalesced = _from_cache(cached), False
    elif key:
        # Another request's answer only while this one has time to wait, and only a primary
        # answer: a degraded one says how the other fared, through its own chain and budget.
        result, coalesced = await runtime.single_flight.run(
            key,
            lambda: _walk(runtime, snapshot, model, policy, assignment, request, key, budget),
            wait_s=budget.left(),
            shareable=lambda shared: not shared.degraded,
        )
    else:
        result = await _walk(runtime, snapshot, model, policy, assignment, request, None, budget)
        coalesced = False
    answer = _answer(
        snapshot, policy, prediction_id, assignment, request, result, cached, coalesced
    )
    if runtime.audit is not None:
        # The answer leaves only once its record is handed to the log (AuditUnavailable else).
        pii = snapshot.contracts.models[request.model_id].pii_features
        record = audit_record(snapshot.contracts.version, request, answer)
        await runtime.audit.append(record, pii_fields=pii)
    return answer, Learning(runtime, model, policy, assignment, request, answer)


def _monitor(
    runtime: Runtime,
    policy: Policy,
    assignment: Assignment,
    request: PredictionInput,
    answer: Answer,
) -> None:
    """Drift is measured per arm's model version: the inputs it was meant to score always,
    its probability only when it answered itself (a fallback's answer is not its output)."""
    primary = assignment.arm.primary
    target = policy.targets.get(primary)
    if target is None:
        return
    own_answer = answer.served_by == primary
    runtime.monitor.observe_prediction(
        request.model_id, version_key(primary, target.version), answer.arm, request.features,
        answer.probability if own_answer else math.nan, time.time(),
    )  # fmt: skip


def _cache_event(cached: CachedPrediction | None, looked_up: bool) -> str:
    if not looked_up:
        return "bypass"
    return "hit" if cached is not None else "miss"


def audit_record(contract_version: str, request: PredictionInput, answer: Answer) -> dict[str, Any]:
    """Everything needed later to explain this decision (PII is hashed by the log)."""
    return {
        "type": "prediction",
        "prediction_id": answer.prediction_id,
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "request_id": request.request_id,
        "trace_id": request.trace_id,
        "tenant": request.tenant,
        "model_id": request.model_id,
        "contract_version": contract_version,
        "policy_version": answer.policy_version,
        "features": dict(request.features),
        "route": answer.route,
        "arm": answer.arm,
        "arm_model": answer.arm_model,
        "cached": answer.cached,
        "coalesced": answer.coalesced,
        "steps": [_step_fields(step) for step in answer.steps],
        "rule": answer.rule,
        "served_by": answer.served_by,
        "model_version": answer.model_version,
        "prediction": answer.prediction,
        "probability": answer.probability,
        "degraded": answer.degraded,
        "fallback_reason": answer.fallback_reason,
        "latency_ms": answer.latency_ms,
    }


_STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepRecord))


def _step_fields(step: StepRecord) -> dict[str, Any]:
    """A step as the record keeps it: its fields that say something (no None, no zero)."""
    fields = ((name, getattr(step, name)) for name in _STEP_FIELDS)
    return {name: value for name, value in fields if value not in (None, 0, 0.0)}


@dataclass(frozen=True)
class _Budget:
    """A request's deadline, less the margin kept for sending the answer."""

    deadline: Deadline
    margin_s: float

    def left(self) -> float:
        """Seconds this request may still spend before it must answer."""
        return max(0.0, self.deadline.remaining(time.monotonic()) - self.margin_s)


async def _walk(
    runtime: Runtime,
    snapshot: Snapshot,
    model: ModelRuntime,
    policy: Policy,
    assignment: Assignment,
    request: PredictionInput,
    key: str | None,
    budget: _Budget,
) -> ChainResult:
    ctx = ChainContext(
        guards=model.guards,
        fallbacks=snapshot.fallbacks[request.model_id],
        stale_lookup=_stale_lookup(runtime, key, budget),
        margin_s=budget.margin_s,
        observe_call=runtime.metrics.observe_backend_call,
        span=runtime.tracing.span,
        outgoing_headers=trace_headers,
    )
    result = await run_chain(
        policy, request.features, budget.deadline, ctx, chain=assignment.arm.chain
    )
    if key and not result.degraded:
        kept = CachedPrediction(
            result.prediction, result.probability, result.model_version, result.served_by
        )
        entries = [(key, kept, policy.cache.ttl_s)]
        if policy.cache.stale_ttl_s > 0:
            entries.append((stale_key(key), kept, policy.cache.stale_ttl_s))
        await runtime.cache.set_many(entries, budget.left())
    return result


def _stale_lookup(runtime: Runtime, key: str | None, budget: _Budget):  # type: ignore[no-untyped-def]
    if key is None:
        return None

    async def lookup() -> StaleAnswer | None:
        kept = await runtime.cache.get(stale_key(key), budget.left())
        if kept is None:
            return None
        return StaleAnswer(kept.prediction, kept.probability, kept.model_version)

    return lookup


def _key(
    snapshot: Snapshot, policy: Policy, assignment: Assignment, request: PredictionInput
) -> str | None:
    """The cache key of this request's arm, or None when the policy does not cache, or
    when an operator forced the arm's primary open: its answers, cached or stale, are out."""
    target = policy.targets.get(assignment.arm.primary)
    if not policy.cache.enabled or target is None or target.breaker.force == "open":
        return None
    tenant = request.tenant if policy.cache.per_tenant else None
    answer_spec = snapshot.models[policy.model_id].answer_specs[assignment.arm.primary]
    return cache_key(
        policy.model_id, assignment.arm.primary, answer_spec, snapshot.contracts.version,
        request.features, tenant,
    )  # fmt: skip


def _from_cache(cached: CachedPrediction) -> ChainResult:
    return ChainResult(
        prediction=cached.prediction,
        probability=cached.probability,
        model_version=cached.model_version,
        served_by=cached.served_by,
        degraded=False,
        fallback_reason=None,
        steps=(StepRecord(step="cache", outcome="answered"),),
    )


def _answer(
    snapshot: Snapshot,
    policy: Policy,
    prediction_id: str,
    assignment: Assignment,
    request: PredictionInput,
    result: ChainResult,
    cached: CachedPrediction | None,
    coalesced: bool,
) -> Answer:
    return Answer(
        prediction_id=prediction_id,
        prediction=result.prediction,
        probability=result.probability,
        model_version=result.model_version,
        served_by=result.served_by,
        degraded=result.degraded,
        fallback_reason=result.fallback_reason,
        arm=assignment.arm.name,
        arm_model=policy.arm_model(assignment.arm),
        route=assignment.route,
        cached=cached is not None,
        coalesced=coalesced,
        latency_ms=round((time.monotonic() - request.started) * 1000, 3),
        steps=result.steps,
        rule=result.rule,
        policy_version=snapshot.policies.version_hash,
    )


def _learn(
    runtime: Runtime,
    model: ModelRuntime,
    policy: Policy,
    assignment: Assignment,
    request: PredictionInput,
    answer: Answer,
) -> None:
    """Statistics for the experiment, and shadow copies, after the answer is settled."""
    runtime.metrics.observe_answer(request.model_id, answer)
    _monitor(runtime, policy, assignment, request, answer)
    answered_by = version_key(answer.served_by, answer.model_version)
    decision = Decision(
        request.model_id, answer.arm, answer.prediction, request.tenant, answered_by,
        answer.probability, answer.arm_model,
    )  # fmt: skip
    runtime.experiments.record_answer(
        answer.prediction_id, decision, answer.latency_ms, answer.degraded, answer.cached
    )
    if answer.cached:
        return  # a cached answer called no model: nothing new to compare a shadow with

    def report(target: str, agreed: bool | None) -> None:
        runtime.experiments.record_shadow(
            request.model_id, answer.arm, answer.arm_model, target, agreed
        )
        runtime.metrics.observe_shadow(request.model_id, target, agreed)

    for target in model.routes.shadows_for(assignment, answer.served_by):
        model.shadows.fire(target, request.features, answer.prediction, policy.labels.label, report)
