"""POST /v1/feedback and GET /v1/experiments/{model_id}: real outcomes, and what arms did.

An outcome is often known long after the answer (a customer churns weeks later), and may
reach any worker or replica of the gateway. The decision it judges comes from this process's
ledger of recent answers, else from the audit trail, which every worker of this machine
writes under `AIGW_AUDIT_DIR` and which keeps every answer (so feedback for an answer of a
sibling worker, of an earlier run, or too old for the ledger is counted too), else, with the
audit stream, from the decisions every replica keeps there (shared_decisions.py). An outcome
taken is audited (a `feedback` record) before it is counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.access import authorize
from gateway.api.responses import json_response
from gateway.audit import AuditUnavailable, find_record
from gateway.auth import Principal
from gateway.body import check_declared_length, check_media_type, parse_json, read_limited
from gateway.experiments import UNRECORDED_MODEL, Decision
from gateway.monitoring import version_key
from gateway.problems import FieldError, Problem
from gateway.runtime import Runtime
from gateway.shared_decisions import SharedDecisionsUnavailable
from gateway.shared_statistics import Published

router = APIRouter()


@router.post("/v1/feedback")
async def record_feedback(request: Request) -> Response:
    """Tie a real outcome to a recent prediction, for the experiment's outcome statistics."""
    principal = await authorize(request, "feedback")
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    check_media_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    payload = parse_json(
        await read_limited(request.stream(), settings.max_body_bytes), settings.max_json_depth
    )
    violations = runtime.contracts.feedback_violations(payload)
    if violations:
        raise Problem(
            422, "invalid-request", "The request does not match the contract",
            f"{len(violations)} field(s) are invalid", errors=violations,
        )  # fmt: skip
    prediction_id, outcome = payload["prediction_id"], payload["outcome"]
    decision = await _decision_judged(runtime, prediction_id)
    if decision is None or decision.tenant != principal.tenant:  # another tenant's: not found
        raise Problem(404, "unknown-prediction", "Unknown prediction", "no prediction has this id")
    policy = runtime.policies.get(decision.model_id)
    if policy is None:
        raise Problem(
            404, "unknown-model", "Unknown model",
            f"model {decision.model_id!r} of this prediction is no longer served",
        )  # fmt: skip
    labels = policy.labels
    if outcome not in (labels.positive, labels.negative):
        detail = f"must be {labels.positive!r} or {labels.negative!r}"
        raise Problem(
            422, "invalid-request", "The request does not match the contract", detail,
            errors=[FieldError("/outcome", detail)],
        )  # fmt: skip
    if not await _first_judgement(runtime, prediction_id):
        raise _duplicate()
    if not runtime.experiments.claim(prediction_id):  # this process took it already
        raise _duplicate()
    await _audit_outcome(runtime, feedback_record(prediction_id, outcome, decision, principal))
    runtime.experiments.count_outcome(decision, outcome, labels.positive)
    runtime.monitor.observe_outcome(
        decision.model_id, decision.version_key, decision.arm, decision.prediction, outcome,
        decision.probability, labels.positive, time.time(),
    )  # fmt: skip
    return json_response({"prediction_id": prediction_id, "status": "recorded"}, 202)


def feedback_record(
    prediction_id: str, outcome: str, decision: Decision, principal: Principal
) -> dict[str, Any]:
    """The audit record of an outcome taken: what it judges, who said it, and whether the
    answer was right. It names its prediction `of_prediction`: `prediction_id` is how the
    trail finds the prediction's own record (audit_index.py)."""
    return {
        "type": "feedback",
        "of_prediction": prediction_id,
        "model_id": decision.model_id,
        "arm": decision.arm,
        "arm_model": decision.arm_model,
        "version_key": decision.version_key,
        "prediction": decision.prediction,
        "outcome": outcome,
        "correct": outcome == decision.prediction,
        "tenant": principal.tenant,
        "key_id": principal.key_id,
    }


async def _audit_outcome(runtime: Runtime, record: Mapping[str, Any]) -> None:
    """An outcome is counted only once its record is in the trail: else its claims are
    undone (so a retry is taken) and the caller is told to retry."""
    if runtime.audit is None:
        return
    try:
        await runtime.audit.append(record)
    except AuditUnavailable:
        prediction_id = str(record["of_prediction"])
        runtime.experiments.release(prediction_id)
        if runtime.shared_decisions is not None:
            await runtime.shared_decisions.release(prediction_id)
        elif runtime.judged is not None:
            await runtime.judged.release(prediction_id)
        raise Problem(
            503,
            "audit-unavailable",
            "Audit trail unavailable",
            "no outcome is counted that could not be recorded; retry later",
            headers={"Retry-After": "1"},
        ) from None


def _duplicate() -> Problem:
    return Problem(
        409, "duplicate-feedback", "Outcome already recorded", "one outcome per prediction"
    )


def _unavailable() -> Problem:
    return Problem(
        503, "feedback-unavailable", "Feedback cannot be taken now",
        "the shared decisions of other replicas cannot be reached; retry later",
        headers={"Retry-After": "1"},
    )  # fmt: skip


async def _first_judgement(runtime: Runtime, prediction_id: str) -> bool:
    """False when an outcome for `prediction_id` was taken already: by any replica (with the
    audit stream), else by any worker of this machine; this process checks its own after."""
    if runtime.shared_decisions is not None:
        try:
            return await runtime.shared_decisions.first_judgement(prediction_id)
        except SharedDecisionsUnavailable:
            raise _unavailable() from None
    if runtime.judged is not None:
        return await runtime.judged.first_time(prediction_id) is not False
    return True


async def _decision_judged(runtime: Runtime, prediction_id: str) -> Decision | None:
    """The ledger's decision, else the one this machine's audit trail recorded (read off the
    loop), else the one another replica shared."""
    decision = runtime.experiments.decision(prediction_id)
    if decision is not None:
        return decision
    record = await asyncio.to_thread(find_record, runtime.settings.audit_dir, prediction_id)
    if record is None and runtime.shared_decisions is not None:
        try:
            record = await runtime.shared_decisions.find(prediction_id)
        except SharedDecisionsUnavailable:
            raise _unavailable() from None
    return decision_in_record(record) if record is not None else None


def decision_in_record(record: Mapping[str, Any]) -> Decision | None:
    """The decision an audit record of a prediction holds, or None for any other record."""
    if record.get("type") != "prediction":
        return None
    try:
        return Decision(
            model_id=str(record["model_id"]),
            arm=str(record["arm"]),
            prediction=str(record["prediction"]),
            tenant=str(record["tenant"]),
            version_key=version_key(str(record["served_by"]), str(record["model_version"])),
            probability=float(record["probability"]),
            arm_model=str(record.get("arm_model", UNRECORDED_MODEL)),
        )
    except (KeyError, TypeError, ValueError):
        return None  # not a record this gateway writes


@router.get("/v1/models/{model_id}/health")
async def model_health(request: Request, model_id: str) -> Response:
    """Drift of features and predictions, and quality from feedback, per version and arm."""
    await authorize(request, "models:read")
    runtime: Runtime = request.app.state.runtime
    if runtime.policies.get(model_id) is None:
        raise Problem(404, "unknown-model", "Unknown model", "no policy for this model_id")
    siblings = await _siblings(runtime)
    now = time.time()
    runtime.monitor.forget_idle(now)  # this worker's own streams, which it also publishes
    monitor = runtime.monitor.combined(p.windows for p in siblings) if siblings else runtime.monitor
    return json_response(monitor.health(model_id, now))


async def _siblings(runtime: Runtime) -> list[Published]:
    """With several workers, the other workers' statistics (files: read off the loop)."""
    shared = runtime.shared_statistics
    return await asyncio.to_thread(shared.siblings) if shared is not None else []


@router.get("/v1/experiments/{model_id}")
async def experiment_report(request: Request, model_id: str) -> Response:
    """Per arm: requests, latency, fallback rate, outcomes and shadow agreement, with 95% CIs."""
    await authorize(request, "models:read")
    runtime: Runtime = request.app.state.runtime
    policy = runtime.policies.get(model_id)
    if policy is None:
        raise Problem(404, "unknown-model", "Unknown model", "no policy for this model_id")
    arms = {arm.name: {"weight": arm.weight, "chain": arm.chain} for arm in policy.arm_list}
    arm_models = {arm.name: policy.arm_model(arm) for arm in policy.arm_list}
    siblings = [published.experiments for published in await _siblings(runtime)]
    stats = runtime.experiments.report(model_id, arm_models, siblings)
    return json_response(
        {
            "model_id": model_id,
            "policy_version": runtime.policies.version_hash,
            "arms": {name: {**config, **stats[name]} for name, config in arms.items()},
        }
    )
