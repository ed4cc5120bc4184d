"""Predictions asked for now and answered later: the job, its outcome, and running one.

A job is a prediction request whose id is promised before it is answered. It travels as
plain data (an HTTP `POST /v1/predictions:async` body, or a Redis stream entry), is run
through exactly the same pipeline as a synchronous request (routing, cache, chain, audit),
and its outcome is stored once under its `prediction_id`. `JobBackend` is the one interface
the HTTP surface uses; `MemoryJobs` (in-process) and `StreamJobs` (Redis streams) implement it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from gateway.contracts import ContractSet
from gateway.idempotency import IdempotencyKey, Submitted
from gateway.ids import new_uuid4
from gateway.pipeline import Answer, PredictionInput, predict
from gateway.problems import FieldError
from gateway.runtime import Runtime

JobStatus = Literal["pending", "done", "failed"]


class JobRejected(Exception):
    """A job that can never be run (not JSON, or not the contract): a dead letter, not a retry."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []

    def to_dict(self) -> dict[str, Any]:
        return {"detail": self.detail, "errors": [e.to_dict() for e in self.errors]}


class Backpressure(Exception):
    """The queue is at its bound: the caller should retry later, nothing was accepted."""


class TenantBackpressure(Backpressure):
    """The caller's tenant holds its share of the queue: nothing was accepted; the queue may
    still have room for other tenants."""


class JobStoreUnavailable(Exception):
    """Where jobs (or their idempotency keys) are kept cannot be reached: nothing was
    accepted; the caller should retry later."""


@dataclass(frozen=True)
class Job:
    """One prediction request to be answered later, as plain data."""

    prediction_id: str
    model_id: str
    features: Mapping[str, Any]
    tenant: str = "default"
    request_id: str = ""
    trace_id: str | None = None
    callback_url: str | None = None
    timeout_ms: int | None = None
    submitted_at: float = field(default_factory=time.time)
    # The request's `x-` headers route conditions may read (routing.routing_headers), so a
    # job is routed as the same request made synchronously would be.
    headers: Mapping[str, str] = field(default_factory=dict)

    def asked(self) -> dict[str, Any]:
        """What the caller asked for, as an idempotency key's request fingerprint reads it:
        a retry asks the same, whatever its trace or request id."""
        return {
            "model_id": self.model_id,
            "features": dict(self.features),
            "callback_url": self.callback_url,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "prediction_id": self.prediction_id,
                "model_id": self.model_id,
                "features": dict(self.features),
                "tenant": self.tenant,
                "request_id": self.request_id,
                "trace_id": self.trace_id,
                "callback_url": self.callback_url,
                "timeout_ms": self.timeout_ms,
                "submitted_at": self.submitted_at,
                "headers": dict(self.headers),
            }
        )


@dataclass(frozen=True)
class JobOutcome:
    """What `GET /v1/predictions/{id}` reports: pending, the envelope once answered, or that
    the job failed every attempt and will never be answered (`reason` says why, for logs)."""

    prediction_id: str
    tenant: str
    status: JobStatus
    envelope: Mapping[str, Any] | None = None
    reason: str | None = None


class JobBackend(Protocol):
    """Where jobs wait and where their outcomes are kept."""

    async def start(self, runtime: Runtime) -> None: ...

    async def submit(self, job: Job, key: IdempotencyKey | None = None) -> Submitted:
        """Accept the job or raise Backpressure (or JobStoreUnavailable, or RedisError);
        an accepted job is answered exactly once. With a `key` already claimed, the job is
        not queued: the claim's job is replayed (`IdempotencyKeyReused` for another
        request)."""

    async def outcome(self, prediction_id: str) -> JobOutcome | None:
        """The job's outcome, or None when no such job is known."""

    async def close(self) -> None: ...


def job_from_request(
    contracts: ContractSet,
    payload: Any,
    *,
    prediction_id: str | None = None,
    tenant: str = "default",
    request_id: str = "",
    trace_id: str | None = None,
    callback_url: str | None = None,
    timeout_ms: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Job:
    """A job from a prediction request body, checked against the contract (JobRejected else)."""
    violations = contracts.violations(payload)
    if violations:
        raise JobRejected(f"{len(violations)} field(s) are invalid", violations)
    model_id = payload["model_id"]
    return Job(
        prediction_id=prediction_id or new_uuid4(),
        model_id=model_id,
        features=contracts.models[model_id].canonical_features(payload["features"]),
        tenant=tenant,
        request_id=request_id,
        trace_id=trace_id,
        callback_url=callback_url,
        timeout_ms=timeout_ms,
        headers=dict(headers or {}),
    )


async def run_job(runtime: Runtime, job: Job) -> Answer:
    """Answer a job through the same pipeline as a synchronous request (audited the same).

    Always answers while the audit log takes records: the chain ends in a default. Raises
    `AuditUnavailable` when it does not, and the job must then be retried, not dropped.
    """
    request = PredictionInput(
        model_id=job.model_id,
        features=job.features,
        headers=job.headers,
        tenant=job.tenant,
        caller_timeout_ms=job.timeout_ms,
        use_cache=True,
        started=time.monotonic(),
        request_id=job.request_id,
        trace_id=job.trace_id,
        prediction_id=job.prediction_id,
    )
    return await predict(runtime, request)
