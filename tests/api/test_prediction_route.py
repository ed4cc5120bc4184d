"""The plain-ASGI prediction route: what it answers itself, and what it leaves to FastAPI."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest
from asgi_lifespan import LifespanManager

import gateway.api.predictions as predictions
from gateway.app import create_app
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, REPO, settings_for

NEW_CUSTOMER = {**CHURN_REQUEST, "features": {**CHURN_REQUEST["features"], "tenure_months": 3}}
SECURITY = ("x-content-type-options", "cache-control", "x-frame-options", "referrer-policy")


def nowhere() -> dict[str, str]:
    return {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


def scope(headers: list[tuple[bytes, bytes]], path: str = "/v1/predictions") -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": None,
    }  # fmt: skip


async def exchange(tmp_path: Path, messages: list[dict], headers: list) -> list[dict]:
    """Every message the app sends for one request whose body arrives as `messages`."""
    app = create_app(settings_for(REPO, audit_dir=tmp_path), env=nowhere())
    sent: list[dict] = []
    incoming = list(messages)

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async with LifespanManager(app) as manager:
        await manager.app(scope(headers), receive, send)
    return sent


async def test_an_answer_is_one_start_and_one_body_with_every_header(tmp_path):
    """The answer goes out as one start and one body: JSON, its length, X-Request-ID, safety."""
    body = orjson.dumps(NEW_CUSTOMER)
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"caller-7")]
    chunks = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
    ]
    sent = await exchange(tmp_path, chunks, headers)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    start, answer = sent
    out = {name.decode(): value.decode() for name, value in start["headers"]}
    assert start["status"] == 200
    assert out["content-type"] == "application/json"
    assert int(out["content-length"]) == len(answer["body"])
    assert out["x-request-id"] == "caller-7"
    assert all(name in out for name in SECURITY)
    assert orjson.loads(answer["body"])["served_by"] == "rules"


async def test_a_caller_gone_before_its_body_gets_no_answer(tmp_path):
    """A disconnect while the body is read ends the request without a response or a record."""
    sent = await exchange(
        tmp_path,
        [{"type": "http.disconnect"}],
        [(b"content-type", b"application/json")],
    )
    assert sent == []
    assert not any(line for p in tmp_path.glob("audit-*.jsonl") for line in p.read_bytes())


async def test_a_bug_is_a_500_problem_with_the_exchange_headers(gateway_client, monkeypatch):
    """An unexpected error answers 500 in the problem shape, with X-Request-ID, no internals."""

    async def broken(runtime, request):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    monkeypatch.setattr(predictions, "answer_first", broken)
    async with gateway_client(env=nowhere()) as client:
        response = await client.post("/v1/predictions", json=NEW_CUSTOMER)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(":internal-error")
    assert "secret" not in response.text
    assert response.headers["x-request-id"] and response.headers["x-frame-options"] == "DENY"


async def test_refusals_on_the_route_are_counted_by_status(gateway_client):
    """Problems the route answers itself count in aigw_rejected_requests, as the app's do."""
    async with gateway_client(env=nowhere()) as client:
        await client.post("/v1/predictions", content=b"x", headers={"content-type": "text/plain"})
        await client.post("/v1/predictions", json={"model_id": "customer-churn"})
        await client.post("/v1/predictions", json={"model_id": "customer-churn"})
        metrics = (await client.get("/metrics")).text
    counted = dict(re.findall(r'aigw_rejected_requests_total\{status="(\d+)"\} (\S+)', metrics))
    assert counted == {"415": "1.0", "422": "2.0"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/predictions", 405),
        ("PUT", "/v1/predictions", 405),
        ("POST", "/v1/predictions:async", 202),
        ("GET", "/v1/predictions/00000000-0000-4000-8000-000000000000", 404),
        ("POST", "/v1/prediction", 404),
    ],
)
async def test_every_other_request_reaches_fastapi(gateway_client, method, path, status):
    """Other methods on the path, and neighbouring paths, are FastAPI's routes, not this one."""
    async with gateway_client(env=nowhere()) as client:
        response = await client.request(method, path, json=NEW_CUSTOMER)
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] and response.headers["x-frame-options"] == "DENY"
