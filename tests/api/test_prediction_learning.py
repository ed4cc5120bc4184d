"""The learning step (metrics, drift, experiment statistics, shadows) runs after the answer.

Both ways to `POST /v1/predictions` (the plain-ASGI route in front, and the FastAPI route
behind it) append the audit record, send the body, and only then learn, before the app's
call returns; a failing learning step is logged and leaves the 200 as it was sent."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import gateway.pipeline as pipeline
from gateway.app import create_app
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, REPO, settings_for

NEW_CUSTOMER = {**CHURN_REQUEST, "features": {**CHURN_REQUEST["features"], "tenure_months": 3}}
BODY = orjson.dumps(NEW_CUSTOMER)
ROUTES = ("plain", "fastapi")

App = Callable[[dict, Callable, Callable], Any]


def scope() -> dict:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/predictions", "raw_path": b"/v1/predictions",
        "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": None,
    }  # fmt: skip


@asynccontextmanager
async def gateway(route: str) -> AsyncIterator[tuple[FastAPI, App]]:
    """The started app, and the ASGI callable that reaches the chosen route."""
    app = create_app(settings_for(REPO), env={"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"})
    async with LifespanManager(app):
        if route == "plain":
            yield app, app
        else:  # FastAPI's own stack, without `PredictionRoute` in front of it
            yield app, lambda s, r, sd: FastAPI.__call__(app, s, r, sd)


async def call(asgi: App, events: list[str], sent: list[dict]) -> None:
    """One prediction request; every message sent is kept and named in `events`."""
    incoming = [{"type": "http.request", "body": BODY, "more_body": False}]

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a caller that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        events.append(message["type"])
        sent.append(message)

    await asgi(scope(), receive, send)
    events.append("returned")


def record_learning(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Name the learning step in `events` when it runs, and let it run."""
    learn = pipeline._learn

    def recorded(*args: Any) -> None:
        events.append("learn")
        learn(*args)

    monkeypatch.setattr(pipeline, "_learn", recorded)


def record_audit(monkeypatch: pytest.MonkeyPatch, app: FastAPI, events: list[str]) -> None:
    audit = app.state.runtime.audit
    append = audit.append

    async def recorded(*args: Any, **kwargs: Any) -> str:
        digest = await append(*args, **kwargs)
        events.append("audit")
        return digest

    monkeypatch.setattr(audit, "append", recorded)


@pytest.mark.parametrize("route", ROUTES)
async def test_the_body_leaves_after_its_audit_record_and_before_learning(monkeypatch, route):
    """audit, start, body, learn: the caller waits for no bookkeeping, and the learning is
    done before the app's call returns (nothing else was served in between)."""
    events: list[str] = []
    sent: list[dict] = []
    record_learning(monkeypatch, events)
    async with gateway(route) as (app, asgi):
        record_audit(monkeypatch, app, events)
        await call(asgi, events, sent)
    assert events == ["audit", "http.response.start", "http.response.body", "learn", "returned"]
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("route", ROUTES)
async def test_statistics_and_metrics_include_an_answer_once_its_request_ended(route):
    """Once the request is done, the experiment ledger and aigw_requests both count it."""
    async with gateway(route) as (app, asgi):
        sent: list[dict] = []
        await call(asgi, [], sent)
        await call(asgi, [], sent)
        runtime = app.state.runtime
        ids = [orjson.loads(m["body"])["prediction_id"] for m in sent if "body" in m]
        assert all(runtime.experiments.decision(prediction_id) for prediction_id in ids)
        metrics = runtime.metrics.exposition().decode()
    counted = re.findall(r'aigw_requests_total\{[^}]*model="customer-churn"[^}]*\} (\S+)', metrics)
    assert sum(float(value) for value in counted) == 2.0


@pytest.mark.parametrize("route", ROUTES)
async def test_a_failing_learning_step_keeps_the_200_and_is_logged(monkeypatch, caplog, route):
    """The caller has its answer; the app does not raise after it, and the error is logged
    with its traceback and the prediction it was about."""

    def broken(*args: Any) -> None:
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(pipeline, "_learn", broken)
    caplog.set_level(logging.ERROR, logger="gateway.app")
    async with gateway(route) as (_, asgi):
        # httpx re-raises whatever the app raises, after its answer too.
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.post("/v1/predictions", json=NEW_CUSTOMER)
    assert response.status_code == 200
    failures = [r for r in caplog.records if r.getMessage().startswith("learning step failed")]
    assert len(failures) == 1
    assert failures[0].exc_info and "statistics exploded" in str(failures[0].exc_info[1])
    assert failures[0].prediction_id == response.json()["prediction_id"]  # type: ignore[attr-defined]


async def test_predict_learns_before_it_returns(monkeypatch):
    """Callers with no answer to send first (asynchronous jobs) learn as before: at once."""
    events: list[str] = []
    record_learning(monkeypatch, events)
    async with gateway("plain") as (app, _):
        runtime = app.state.runtime
        request = pipeline.PredictionInput(
            model_id="customer-churn", features=NEW_CUSTOMER["features"], headers={},
            tenant="default", caller_timeout_ms=None, use_cache=True,
            started=asyncio.get_running_loop().time(),
        )  # fmt: skip
        answer = await pipeline.predict(runtime, request)
        events.append("returned")
        assert runtime.experiments.decision(answer.prediction_id) is not None
    assert events == ["learn", "returned"]


async def test_a_job_whose_learning_fails_keeps_its_answer(monkeypatch, caplog):
    """predict() (asynchronous jobs) logs a failing learning step and still returns the
    audited answer: a retry would record the same prediction twice."""

    def broken(*args: Any) -> None:
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(pipeline, "_learn", broken)
    caplog.set_level(logging.ERROR, logger="gateway.pipeline")
    async with gateway("plain") as (app, _):
        request = pipeline.PredictionInput(
            model_id="customer-churn", features=NEW_CUSTOMER["features"], headers={},
            tenant="default", caller_timeout_ms=None, use_cache=True,
            started=asyncio.get_running_loop().time(),
        )  # fmt: skip
        answer = await pipeline.predict(app.state.runtime, request)
    assert answer.prediction in ("churn", "stay")
    failures = [r for r in caplog.records if r.getMessage().startswith("learning step failed")]
    assert [f.prediction_id for f in failures] == [answer.prediction_id]  # type: ignore[attr-defined]
