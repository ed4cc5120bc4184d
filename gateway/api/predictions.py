"""POST /v1/predictions: validate against the contract, walk the chain, answer the envelope."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.responses import json_response
from gateway.body import check_declared_length, check_media_type, parse_json, read_limited
from gateway.fallback import ChainContext, run_chain
from gateway.problems import FieldError, Problem
from gateway.resilience import Deadline, request_budget_ms
from gateway.runtime import Runtime

router = APIRouter()

TIMEOUT_HEADER = "x-request-timeout-ms"
MAX_CALLER_TIMEOUT_MS = 600_000
_TIMEOUT_RULE = f"must be an integer from 1 to {MAX_CALLER_TIMEOUT_MS}"


@router.post("/v1/predictions")
async def create_prediction(request: Request) -> Response:
    started = time.monotonic()
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    caller_timeout_ms = caller_timeout(request.headers.get(TIMEOUT_HEADER))
    check_media_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    body = await read_limited(request.stream(), settings.max_body_bytes)
    payload = parse_json(body, settings.max_json_depth)
    violations = runtime.contracts.violations(payload)
    if violations:
        raise Problem(
            422,
            "invalid-request",
            "The request does not match the contract",
            f"{len(violations)} field(s) are invalid",
            errors=violations,
        )

    model_id = payload["model_id"]
    policy = runtime.policies.get(model_id)
    if policy is None:
        raise Problem(503, "model-unavailable", "Model unavailable", f"{model_id} has no policy")
    features = runtime.contracts.models[model_id].canonical_features(payload["features"])
    budget_ms = request_budget_ms(policy.timeout_ms, caller_timeout_ms)
    deadline = Deadline.after(budget_ms / 1000, started)
    ctx = ChainContext(
        guards=runtime.guards[model_id],
        fallbacks=runtime.fallbacks[model_id],
        margin_s=settings.response_margin_ms / 1000,
    )
    result = await run_chain(policy, features, deadline, ctx)
    return json_response(
        {
            "prediction": result.prediction,
            "probability": result.probability,
            "model_version": result.model_version,
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
            "prediction_id": str(uuid.uuid4()),
            "served_by": result.served_by,
            "degraded": result.degraded,
            "arm": "default",
            "fallback_reason": result.fallback_reason,
        }
    )


def caller_timeout(raw: str | None) -> int | None:
    """The caller's `X-Request-Timeout-Ms`, or 400 naming the header when it is not usable."""
    if raw is None:
        return None
    value = raw.strip()
    # isdigit() alone also says yes to '²' and other digits int() refuses: ASCII only.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_CALLER_TIMEOUT_MS:
        raise Problem(
            400,
            "invalid-header",
            "Invalid header",
            "X-Request-Timeout-Ms must be a whole number of milliseconds",
            errors=[FieldError("", _TIMEOUT_RULE, header="X-Request-Timeout-Ms")],
        )
    return int(value)
