"""POST /v1/predictions: validate against the contract, walk the chain, answer the envelope."""

from __future__ import annotations

import time
from collections.abc import Mapping

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.access import authorize
from gateway.api.responses import json_response
from gateway.audit import AuditUnavailable
from gateway.body import check_declared_length, check_media_type, parse_json, read_limited
from gateway.pipeline import PredictionInput, predict
from gateway.problems import FieldError, Problem
from gateway.runtime import Runtime
from gateway.tracing import current_trace_id

router = APIRouter()

TIMEOUT_HEADER = "x-request-timeout-ms"
_PRIVATE_HEADERS = frozenset({"x-api-key"})  # never offered to route conditions
MAX_CALLER_TIMEOUT_MS = 600_000
_TIMEOUT_RULE = f"must be an integer from 1 to {MAX_CALLER_TIMEOUT_MS}"


@router.post("/v1/predictions")
async def create_prediction(request: Request) -> Response:
    started = time.monotonic()
    with request.app.state.tracing.request_span("POST /v1/predictions", request.headers):
        return await _create_prediction(request, started)


async def _create_prediction(request: Request, started: float) -> Response:
    principal = await authorize(request, "predict")
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    caller_timeout_ms = caller_timeout(request.headers.get(TIMEOUT_HEADER))
    check_media_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    body = await read_limited(request.stream(), settings.max_body_bytes)
    payload = parse_json(body, settings.max_json_depth)
    with runtime.tracing.span("validate"):
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
    if runtime.policies.get(model_id) is None:
        raise Problem(503, "model-unavailable", "Model unavailable", f"{model_id} has no policy")
    request_input = PredictionInput(
        model_id=model_id,
        features=runtime.contracts.models[model_id].canonical_features(payload["features"]),
        headers=routing_headers(request.headers),
        tenant=principal.tenant,
        caller_timeout_ms=caller_timeout_ms,
        use_cache=not bypasses_cache(request.headers.get("cache-control")),
        started=started,
        request_id=request.scope.get("state", {}).get("request_id", ""),
        trace_id=current_trace_id(),
    )
    try:
        answer = await predict(runtime, request_input)
    except AuditUnavailable:
        raise Problem(
            503,
            "audit-unavailable",
            "Audit trail unavailable",
            "no answer is given that could not be recorded; retry later",
            headers={"Retry-After": "1"},
        ) from None
    return json_response(answer.envelope())


def bypasses_cache(cache_control: str | None) -> bool:
    """`Cache-Control: no-cache` (or `no-store`) asks for a fresh answer."""
    if not cache_control:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
    return bool(directives & {"no-cache", "no-store"})


def routing_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers route conditions may read: `x-` headers, lower-cased, bounded in size."""
    return {
        name: value[:256]
        for name, value in headers.items()
        if name.startswith("x-") and len(name) <= 64 and name not in _PRIVATE_HEADERS
    }


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
