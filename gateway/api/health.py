"""Liveness, readiness, the contract document itself, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.responses import json_response
from gateway.runtime import Runtime
from gateway.telemetry import CONTENT_TYPE

router = APIRouter()


@router.get("/healthz")
async def liveness() -> Response:
    """The process is up and its event loop turns; says nothing about backends."""
    return json_response({"status": "ok"})


@router.get("/readyz")
async def readiness(request: Request) -> Response:
    """Policies are loaded and every backend's pinned model is ready (probed off-path)."""
    runtime: Runtime = request.app.state.runtime
    checks = {"policies": runtime.policies.version_hash, **runtime.readiness}
    manager = getattr(request.app.state, "policy_manager", None)
    if manager is not None and manager.history.current is not None:
        checks["policy_version"] = str(manager.history.current.number)
    status = 200 if runtime.ready else 503
    return json_response(
        {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status
    )


@router.get("/openapi.json")
async def openapi_document(request: Request) -> Response:
    """The contract from `contracts/`: what callers read is what the gateway enforces."""
    runtime: Runtime = request.app.state.runtime
    return json_response(runtime.contracts.document)


metrics_router = APIRouter()  # on the admin listener always, on the public one if allowed


@metrics_router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this replica's metrics."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
