"""POST /v1/predictions:async and GET /v1/predictions/{id}: predictions answered later.

The submit checks everything the synchronous endpoint checks (auth, hostile bodies, the
contract), plus `callback_url`, before anything is queued: an invalid job is never
enqueued. The GET answers any prediction id of the caller's tenant: a job's outcome while
the jobs backend keeps it, else the envelope rebuilt from the audit record, which is how
synchronous answers (and jobs whose outcome aged out) stay retrievable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from gateway.api.access import authorize
from gateway.api.predictions import TIMEOUT_HEADER, caller_timeout
from gateway.api.records import answer_record
from gateway.api.responses import json_response
from gateway.body import check_declared_length, check_media_type, parse_json, read_limited
from gateway.callbacks import allowed_hosts, callback_url_error
from gateway.idempotency import (
    KEY_HEADER,
    REPLAYED_HEADER,
    IdempotencyKeyReused,
    Submitted,
    idempotency_key,
    key_from_header,
    key_reused,
)
from gateway.ids import is_prediction_id
from gateway.jobs import (
    Backpressure,
    Job,
    JobBackend,
    JobRejected,
    JobStoreUnavailable,
    TenantBackpressure,
    job_from_request,
)
from gateway.problems import FieldError, Problem
from gateway.routing import routing_headers
from gateway.runtime import Runtime
from gateway.tracing import current_trace_id

router = APIRouter()

ASYNC_PATH = "/v1/predictions:async"
# The synchronous response schema (contracts: PredictionResponse), in its order.
ENVELOPE_FIELDS = (
    "prediction", "probability", "model_version", "latency_ms", "prediction_id",
    "served_by", "degraded", "arm", "cached", "fallback_reason",
)  # fmt: skip


def status_url(prediction_id: str) -> str:
    return f"/v1/predictions/{prediction_id}"


@router.post(ASYNC_PATH)
async def submit_prediction(request: Request) -> Response:
    with request.app.state.tracing.request_span(f"POST {ASYNC_PATH}", request.headers):
        return await _submit(request)


async def _submit(request: Request) -> Response:
    principal = await authorize(request, "predict")
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    timeout_ms = caller_timeout(request.headers.get(TIMEOUT_HEADER))
    raw_key = key_from_header(request.headers.get(KEY_HEADER))
    check_media_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    body = await read_limited(request.stream(), settings.max_body_bytes)
    payload = parse_json(body, settings.max_json_depth)
    state = request.scope.get("state", {})
    job = _job(
        runtime, payload, tenant=principal.tenant, request_id=state.get("request_id", ""),
        timeout_ms=timeout_ms, headers=routing_headers(request.headers.items()),
    )  # fmt: skip
    if runtime.policies.get(job.model_id) is None:
        detail = f"{job.model_id} has no policy"
        raise Problem(503, "model-unavailable", "Model unavailable", detail)
    key = None
    if raw_key is not None:
        key = idempotency_key(raw_key, tenant=principal.tenant, request=job.asked())
    jobs: JobBackend = request.app.state.jobs
    try:
        submitted = await jobs.submit(job, key)
    except TenantBackpressure as full:
        raise Problem(
            429, "too-many-jobs-waiting", "Too many of your predictions waiting",
            f"nothing was accepted: {full}; retry once some are answered",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    except Backpressure as full:
        raise Problem(
            503, "queue-full", "Too many predictions waiting",
            f"nothing was accepted: {full}; retry later",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    except IdempotencyKeyReused:
        raise key_reused() from None
    except (RedisError, JobStoreUnavailable):
        raise _store_unavailable() from None
    return _accepted(submitted)


def _accepted(submitted: Submitted) -> Response:
    """202 with the job's id and status URL; a replay answers exactly what the first submit
    did (the job may be answered by now: its status URL says so)."""
    location = status_url(submitted.prediction_id)
    accepted = {
        "prediction_id": submitted.prediction_id, "status": "pending", "status_url": location,
    }  # fmt: skip
    headers = {"Location": location}
    if submitted.replayed:
        headers[REPLAYED_HEADER] = "true"
    return json_response(accepted, 202, headers)


def _job(
    runtime: Runtime,
    payload: Any,
    *,
    tenant: str,
    request_id: str,
    timeout_ms: int | None,
    headers: dict[str, str],
) -> Job:
    """The job in `payload`, or one 422 naming every bad field (the callback's included)."""
    errors: list[FieldError] = []
    callback_url = None
    if isinstance(payload, dict) and "callback_url" in payload:
        payload = dict(payload)
        callback_url = payload.pop("callback_url")
        error = callback_url_error(
            callback_url,
            enabled=runtime.settings.callback_key is not None,
            allowed=allowed_hosts(runtime.settings.callback_allowed_hosts),
        )
        if error is not None:
            errors.append(error)
    try:
        with runtime.tracing.span("validate"):
            job = job_from_request(
                runtime.contracts, payload, tenant=tenant,
                request_id=request_id, trace_id=current_trace_id(),
                callback_url=callback_url, timeout_ms=timeout_ms, headers=headers,
            )  # fmt: skip
    except JobRejected as rejected:
        errors.extend(rejected.errors)
    if errors:
        raise Problem(
            422, "invalid-request", "The request does not match the contract",
            f"{len(errors)} field(s) are invalid", errors=errors,
        )  # fmt: skip
    return job


@router.get("/v1/predictions/{prediction_id}")
async def get_prediction(request: Request, prediction_id: str) -> Response:
    """The answer (200, the synchronous envelope), pending (202), or unknown (404)."""
    principal = await authorize(request, "predict")
    runtime: Runtime = request.app.state.runtime
    if not is_prediction_id(prediction_id):
        raise _unknown()
    jobs: JobBackend = request.app.state.jobs
    try:
        outcome = await jobs.outcome(prediction_id)
    except RedisError:
        raise _store_unavailable() from None
    if outcome is not None:
        if outcome.tenant != principal.tenant:
            raise _unknown()  # another tenant's job: not found, as though it did not exist
        if outcome.status == "pending":
            return json_response({"prediction_id": prediction_id, "status": "pending"}, 202)
        if outcome.status == "failed":
            raise _failed()
        return json_response(envelope_of(outcome.envelope or {}))
    record = await answer_record(runtime, prediction_id)
    if not is_own_prediction(record, principal.tenant):
        raise _unknown()
    return json_response(envelope_of(record))  # type: ignore[arg-type]


def is_own_prediction(record: Mapping[str, Any] | None, tenant: str) -> bool:
    """A prediction's audit record, of this tenant (anything else is not found)."""
    return (
        record is not None and record.get("type") == "prediction" and record.get("tenant") == tenant
    )


def envelope_of(source: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the synchronous envelope's fields, from a job outcome or an audit record."""
    return {name: source.get(name) for name in ENVELOPE_FIELDS}


def _store_unavailable() -> Problem:
    # The Redis jobs backend is down: nothing was accepted (a submit whose reply was lost is
    # checked, and withdrawn if it did not run), unless even that check failed; retry.
    return Problem(
        503, "jobs-unavailable", "Job store unavailable", "retry later",
        headers={"Retry-After": "1"},
    )  # fmt: skip


def _failed() -> Problem:
    # 404 as the contract has always said for an id with no answer, typed so a caller can tell
    # "never answered, resubmit" from "wrong id". Why it failed is for operators (the logs and
    # the dead-letter stream), not callers.
    return Problem(
        404, "prediction-failed", "Prediction failed",
        "the request was accepted but failed every attempt and will not be answered; "
        "submit it again (with a new Idempotency-Key, if it had one)",
    )  # fmt: skip


def _unknown() -> Problem:
    return Problem(404, "unknown-prediction", "Unknown prediction", "no prediction has this id")
