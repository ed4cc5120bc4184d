"""Builds the FastAPI application from Settings: wiring only, no business logic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import admin as admin_api
from gateway.api import async_predictions, audit, feedback, health, predictions
from gateway.api.http_headers import headers_too_large, request_id_for, with_exchange_headers
from gateway.api.responses import problem_response
from gateway.breaker_sync import BreakerFileSync, BreakerSync
from gateway.job_memory import jobs_backend
from gateway.policy_manager import PolicyManager
from gateway.policy_store import read_bundle
from gateway.policy_sync import PolicyFileSync, PolicySync
from gateway.problems import Problem
from gateway.runtime import (
    Configuration,
    Runtime,
    audit_log,
    baselines_of,
    check_audit_log_free,
    load_configuration,
    start_runtime,
)
from gateway.settings import Settings
from gateway.telemetry import Metrics
from gateway.tracing import tracing_from

log = logging.getLogger("gateway.app")


class GatewayApp(FastAPI):
    """FastAPI, with `POST /v1/predictions` answered ahead of its whole middleware stack by
    `predictions.PredictionRoute`, which gives the same headers and refusals itself."""

    def __init__(self, *args: Any, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._front = predictions.PredictionRoute(super().__call__, self, max_header_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._front(scope, receive, send)


class RequestIdMiddleware:
    """Every response carries `X-Request-ID` (the caller's when well-formed) and safe headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = with_exchange_headers(message.get("headers", []), request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette answers unhandled errors outside every middleware, so a 500 would
            # otherwise lose X-Request-ID and the security headers: answer it here instead.
            if response_started:
                raise
            log.exception("unhandled error", extra={"path": scope.get("path")})
            count_internal_error(scope.get("app"))
            problem = Problem(500, "internal-error", "Internal error")
            await problem_response(problem, scope.get("path"))(scope, receive, send_with_headers)


class HeaderLimitMiddleware:
    """431 for requests whose headers exceed the limit, before any handler runs."""

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = headers_too_large(scope["headers"], self.max_header_bytes)
            if problem is not None:
                await problem_response(problem, scope.get("path"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    env: Mapping[str, str] | None = None,
    config: Configuration | None = None,
) -> FastAPI:
    """The gateway app; files are loaded and checked now, so a bad file fails here, loudly."""
    settings = settings or Settings()
    # Read before loading: version 1 is then never newer than what runs, and an edit landing
    # while the files load differs from it, so the watcher applies it.
    startup_bundle = read_bundle(settings.policies_dir, settings.fallbacks_dir)
    config = config or load_configuration(settings, os.environ if env is None else env)
    metrics = Metrics()
    tracing = tracing_from(settings)
    baselines = baselines_of(settings)  # a bad baseline fails here, with its faults
    check_audit_log_free(settings)  # another process writing this log: one line, not a trace

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = start_runtime(settings, config, metrics, tracing, baselines)
        if runtime.key_store is None:  # said here, where HTTP is served (not by stream workers)
            log.warning("authentication is off: set AIGW_KEYS_FILE to require API keys")
        runtime.audit = audit_log(settings)
        await runtime.audit.open()
        await runtime.start_shipping_audit(_replica_name(settings))
        forwarder = runtime.audit_forwarder
        app.state.runtime = runtime
        manager = PolicyManager(runtime, os.environ if env is None else env)
        manager.start_from_disk(startup_bundle)
        app.state.policy_manager = manager
        breaker_syncs = _breaker_syncs(settings, runtime)
        for sync in breaker_syncs:
            await sync.start()
        policy_sync = _policy_sync(settings, manager)
        if policy_sync is not None:
            runtime.shared_state["policies"] = policy_sync
            await policy_sync.start()
        sibling_sync = _sibling_sync(settings, manager)
        if sibling_sync is not None:
            await sibling_sync.start()
        jobs = jobs_backend(settings)  # asynchronous predictions: memory, or Redis streams
        await jobs.start(runtime)
        app.state.jobs = jobs
        await runtime.refresh_readiness()
        tasks = [asyncio.create_task(_probe_forever(runtime, settings.readiness_interval_s))]
        if settings.watch_policies:
            tasks.append(asyncio.create_task(manager.watch_files(settings.watch_interval_s)))
        if metrics.multiprocess:
            tasks.append(asyncio.create_task(metrics.publish_forever()))
        statistics = runtime.start_publishing_statistics()
        if statistics is not None:
            tasks.append(statistics)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # Awaited: the statistics publisher sends its last counts as it stops.
            await asyncio.gather(*tasks, return_exceptions=True)
            for sync in breaker_syncs:
                await sync.stop()
            if policy_sync is not None:
                await policy_sync.stop()
            if sibling_sync is not None:
                await sibling_sync.stop()
            await jobs.close()  # answers queued jobs while the audit log is still open
            await runtime.close()  # flushes the audit log to disk
            if forwarder is not None:
                await forwarder.stop()  # then ships what is on disk, if the sink is up
            tracing.shutdown()  # exports the spans still batched

    app = GatewayApp(
        title="Resilient AI Gateway",
        max_header_bytes=settings.max_header_bytes,
        lifespan=lifespan,
        openapi_url=None,  # /openapi.json is the contract from contracts/, served by health.py
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # `/v1/feedback/` is 404, not a redirect to the caller's Host
        # The gateway makes its own spans, metrics and logs; FastAPI's would cost every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.settings = settings
    metrics.watch(lambda: getattr(app.state, "runtime", None))
    app.include_router(predictions.router)
    app.include_router(async_predictions.router)
    app.include_router(audit.router)
    app.include_router(feedback.router)
    app.include_router(health.router)
    if settings.public_metrics:
        app.include_router(health.metrics_router)
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
    app.add_middleware(HeaderLimitMiddleware, max_header_bytes=settings.max_header_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _breaker_syncs(settings: Settings, runtime: Runtime) -> list[BreakerSync | BreakerFileSync]:
    """Where breaker openings are shared: with sibling workers always (they are one
    gateway), with other replicas when asked to and Redis is there."""
    syncs: list[BreakerSync | BreakerFileSync] = []
    if settings.worker_index is not None and settings.workers_dir is not None:
        replica = f"worker-{settings.worker_index}-{os.getpid()}"  # a replacement is a peer
        breakers_dir = settings.workers_dir / "breakers"
        syncs.append(BreakerFileSync(breakers_dir, lambda: runtime.breakers, replica))
    if settings.share_breaker_state and settings.redis_url:
        runtime.shared_state["breakers"] = BreakerSync(settings.redis_url, lambda: runtime.breakers)
        syncs.append(runtime.shared_state["breakers"])
    for sync in syncs:
        runtime.on_breaker_trip(sync.share)
        runtime.on_new_breaker(sync.adopt_latest)
    return syncs


def _policy_sync(settings: Settings, manager: PolicyManager) -> PolicySync | None:
    if not (settings.share_policies and settings.redis_url):
        return None
    return PolicySync(settings.redis_url, manager)


def _sibling_sync(settings: Settings, manager: PolicyManager) -> PolicyFileSync | None:
    """With several workers, an apply in one (the admin API's) reaches its siblings."""
    if settings.worker_index is None or settings.workers_dir is None:
        return None
    path = settings.workers_dir / "policy-current.json"
    return PolicyFileSync(path, manager, replica_id=f"worker-{settings.worker_index}")


def _replica_name(settings: Settings) -> str:
    """How this process signs its audit stream entries: one name per writer of a log."""
    host = socket.gethostname()
    return host if settings.worker_index is None else f"{host}-worker-{settings.worker_index}"


def create_admin_app(gateway: FastAPI) -> FastAPI:
    """The admin API, as its own app for its own address; it acts on `gateway`'s runtime."""
    admin = FastAPI(title="Resilient AI Gateway admin", openapi_url=None, docs_url=None,
                    redoc_url=None, redirect_slashes=False,
                    telemetry={"tracing": False, "metrics": False})  # fmt: skip
    admin.state.gateway = gateway
    admin.state.metrics = gateway.state.metrics
    admin.include_router(admin_api.router)
    admin.include_router(health.metrics_router)
    admin.add_exception_handler(Problem, _problem_handler)
    admin.add_exception_handler(HTTPException, _http_error_handler)
    admin.add_exception_handler(Exception, _unexpected_error_handler)
    max_header_bytes = gateway.state.settings.max_header_bytes
    admin.add_middleware(HeaderLimitMiddleware, max_header_bytes=max_header_bytes)
    admin.add_middleware(RequestIdMiddleware)
    return admin


async def _probe_forever(runtime, interval_s: float) -> None:  # type: ignore[no-untyped-def]
    while True:
        await asyncio.sleep(interval_s)
        await runtime.refresh_readiness()


async def _problem_handler(request: Request, problem: Problem) -> Response:  # type: ignore[override]
    request.app.state.metrics.rejected.labels(str(problem.status)).inc()
    return problem_response(problem, request.url.path)


async def _http_error_handler(request: Request, error: HTTPException) -> Response:  # type: ignore[override]
    titles = {404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed")}
    slug, title = titles.get(error.status_code, ("http-error", "Request refused"))
    problem = Problem(error.status_code, slug, title, headers=dict(error.headers or {}))
    return problem_response(problem, request.url.path)


async def _unexpected_error_handler(request: Request, error: Exception) -> Response:
    """A bug must still answer in the contract's error shape, without internals."""
    log.exception("unhandled error", extra={"path": request.url.path})
    count_internal_error(request.app)
    return problem_response(Problem(500, "internal-error", "Internal error"), request.url.path)


def count_internal_error(app: Any) -> None:
    """A 500 is counted with the refusals (`aigw_rejected_requests_total{status="500"}`): a
    bug failing every request must show on the error-ratio panel, not as no traffic."""
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.rejected.labels("500").inc()
