"""POST /v1/predictions: validate against the contract, walk the chain, answer the envelope.

The hot path is `PredictionRoute`, plain ASGI in front of the whole FastAPI app (app.py's
`GatewayApp`): it answers exactly `POST /v1/predictions` itself, without FastAPI's
middleware stack, routing, Request object, dependency solving and exception handlers,
reading the body from `receive` and sending one `http.response.start` and one body.
Everything else, including other methods on this path and `/v1/predictions:async` or
`/v1/predictions/{id}`, goes on to FastAPI. Both ways run the same `prediction_answer`, so
the checks and their problems are one code path; the FastAPI route stays for what routing
alone decides (405 for other methods) and for a router used without `GatewayApp`.

Both send the body first and then run the answer's learning step (metrics, drift, experiment
statistics, shadows), synchronously, on the loop: no caller waits for that bookkeeping, and
since nothing awaits between the send and the step, the loop serves no other request before
the statistics include this answer. The audit record is appended before the body, as ever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, NamedTuple

import orjson
from fastapi import APIRouter, Request
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.access import authorize_headers
from gateway.api.http_headers import (
    headers_too_large,
    request_id_for,
    sending_exchange_headers,
    with_exchange_headers,
)
from gateway.api.responses import problem_response
from gateway.audit import AuditUnavailable
from gateway.body import (
    check_declared_length,
    check_media_type,
    parse_json,
    read_limited,
    receive_chunks,
)
from gateway.pipeline import Learning, PredictionInput, answer_first
from gateway.problems import FieldError, Problem
from gateway.routing import routing_headers
from gateway.runtime import Runtime
from gateway.tracing import current_trace_id

log = logging.getLogger("gateway.app")  # where the app's middleware logs unhandled errors
router = APIRouter()

PATH = "/v1/predictions"
SPAN_NAME = "POST /v1/predictions"
TIMEOUT_HEADER = "x-request-timeout-ms"
MAX_CALLER_TIMEOUT_MS = 600_000
_TIMEOUT_RULE = f"must be an integer from 1 to {MAX_CALLER_TIMEOUT_MS}"
_TIMEOUT_DIGITS_AT_MOST = 16  # room for leading zeros; any more is no timeout anyone means
_JSON_TYPE = (b"content-type", b"application/json")


class Reply(NamedTuple):
    """An answer's JSON body, and the learning step to run once the body is sent."""

    body: bytes
    learn: Learning


class PredictionRoute:
    """`POST /v1/predictions` in plain ASGI, in front of the app; all else goes on to `app`.

    It gives what the app's middleware gives every request (X-Request-ID, the security
    headers, 431 for oversized headers, a 500 problem for a bug) with the same functions,
    counts refusals as the app's problem handler does, and sends the answer as one
    `http.response.start` and one body."""

    def __init__(self, app: ASGIApp, gateway: Any, max_header_bytes: int) -> None:
        self.app = app
        self.gateway = gateway  # whose state holds the runtime once the lifespan started
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        raw = scope["headers"]
        request_id = request_id_for(raw)
        problem = headers_too_large(raw, self.max_header_bytes)
        if problem is not None:
            await self._refuse(problem, request_id, scope, receive, send, count=False)
            return
        runtime: Runtime = self.gateway.state.runtime
        pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
        headers = dict(reversed(pairs))  # the first of repeated headers, as Starlette's get()
        try:
            with runtime.tracing.request_span(SPAN_NAME, headers):
                reply = await prediction_answer(
                    runtime, headers, pairs, receive_chunks(receive), request_id.decode(), started
                )
        except Problem as problem:
            await self._refuse(problem, request_id, scope, receive, send)
            return
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception:
            log.exception("unhandled error", extra={"path": PATH})
            problem = Problem(500, "internal-error", "Internal error")
            await self._refuse(problem, request_id, scope, receive, send)
            return
        length = (b"content-length", str(len(reply.body)).encode())
        headers_out = with_exchange_headers([length, _JSON_TYPE], request_id)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers_out})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            # Right after the send, with no await between: no other request runs first. Also
            # when sending failed: the answer was given and audited, so it is learnt from.
            reply.learn()

    async def _refuse(
        self,
        problem: Problem,
        request_id: bytes,
        scope: Scope,
        receive: Receive,
        send: Send,
        count: bool = True,
    ) -> None:
        if count:  # as the app's problem handler counts what reaches it
            self.gateway.state.metrics.rejected.labels(str(problem.status)).inc()
        response = problem_response(problem, PATH)
        await response(scope, receive, sending_exchange_headers(send, request_id))


@router.post(PATH)
async def create_prediction(request: Request) -> Response:
    """The same answer through FastAPI, for when `PredictionRoute` is not in front."""
    started = time.monotonic()
    runtime: Runtime = request.app.state.runtime
    request_id = request.scope.get("state", {}).get("request_id", "")
    with runtime.tracing.request_span(SPAN_NAME, request.headers):
        reply = await prediction_answer(
            runtime, request.headers, request.headers.items(), request.stream(), request_id,
            started,
        )  # fmt: skip
    # Starlette runs a response's background task right after its body is sent.
    learning = BackgroundTask(_learn_on_loop, reply.learn)
    return Response(reply.body, media_type="application/json", background=learning)


async def _learn_on_loop(learn: Learning) -> None:
    # A coroutine, so that Starlette awaits it on the loop: a plain function given to a
    # BackgroundTask would go to the thread pool, racing the loop for the statistics.
    learn()


async def prediction_answer(
    runtime: Runtime,
    headers: Mapping[str, str],
    header_pairs: Iterable[tuple[str, str]],
    chunks: AsyncIterator[bytes],
    request_id: str,
    started: float,
) -> Reply:
    """The envelope as JSON bytes with its learning step (to run once they are sent), or the
    Problem that refuses the request.

    `headers` answers lookups (the first of repeated headers); `header_pairs` are all of
    them, in order, for the route conditions."""
    principal = await authorize_headers(runtime, headers, "predict")
    settings = runtime.settings
    caller_timeout_ms = caller_timeout(headers.get(TIMEOUT_HEADER))
    check_media_type(headers.get("content-type"))
    check_declared_length(headers.get("content-length"), settings.max_body_bytes)
    body = await read_limited(chunks, settings.max_body_bytes)
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
        headers=routing_headers(header_pairs),
        tenant=principal.tenant,
        caller_timeout_ms=caller_timeout_ms,
        use_cache=not bypasses_cache(headers.get("cache-control")),
        started=started,
        request_id=request_id,
        trace_id=current_trace_id(),
    )
    try:
        answer, learn = await answer_first(runtime, request_input)
    except AuditUnavailable:
        raise Problem(
            503,
            "audit-unavailable",
            "Audit trail unavailable",
            "no answer is given that could not be recorded; retry later",
            headers={"Retry-After": "1"},
        ) from None
    return Reply(orjson.dumps(answer.envelope()), learn)


def bypasses_cache(cache_control: str | None) -> bool:
    """`Cache-Control: no-cache` (or `no-store`) asks for a fresh answer."""
    if not cache_control:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
    return bool(directives & {"no-cache", "no-store"})


def caller_timeout(raw: str | None) -> int | None:
    """The caller's `X-Request-Timeout-Ms`, or 400 naming the header when it is not usable."""
    if raw is None:
        return None
    value = raw.strip()
    # isdigit() alone also says yes to '²' and other digits int() refuses: ASCII only. The
    # length goes first: int() refuses more than 4,300 digits with an error of its own.
    if (
        not (len(value) <= _TIMEOUT_DIGITS_AT_MOST and value.isascii() and value.isdigit())
        or not 1 <= int(value) <= MAX_CALLER_TIMEOUT_MS
    ):
        raise Problem(
            400,
            "invalid-header",
            "Invalid header",
            "X-Request-Timeout-Ms must be a whole number of milliseconds",
            errors=[FieldError("", _TIMEOUT_RULE, header="X-Request-Timeout-Ms")],
        )
    return int(value)
