"""Hostile and invalid requests to POST /v1/predictions, and what the gateway answers them.

No Triton is involved: the policy's Triton address points at a port nothing listens on, so a
valid request is answered from the fallback chain (200, degraded) and an invalid one never
gets past validation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema_rs
import pytest
import yaml
from asgi_lifespan import LifespanManager

from gateway.app import create_app
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, REPO, settings_for

PATH = "/v1/predictions"
JSON = {"content-type": "application/json"}
MISSING = object()  # marks a key to delete from CHURN_REQUEST
BIG = 20 * 1024 * 1024
LEAKS = ("Traceback", 'File "', "gateway.", "jsonschema", "orjson", "starlette", "fastapi")
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}

CONTRACT = yaml.safe_load((REPO / "contracts" / "gateway.v1.yaml").read_text(encoding="utf-8"))


def contract_validator(schema_name: str) -> Any:
    """A validator for one of the contract's component schemas, formats checked too."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": CONTRACT["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


RESPONSE_SCHEMA = contract_validator("PredictionResponse")
PROBLEM_SCHEMA = contract_validator("Problem")


def request_with(top: dict[str, Any] | None = None, **features: Any) -> bytes:
    """CHURN_REQUEST as JSON bytes with top-level keys and features replaced (MISSING deletes)."""
    payload: dict[str, Any] = {**CHURN_REQUEST, "features": dict(CHURN_REQUEST["features"])}
    for key, value in (top or {}).items():
        payload[key] = value
    for name, value in features.items():
        payload["features"][name] = value
    payload = {k: v for k, v in payload.items() if v is not MISSING}
    if isinstance(payload.get("features"), dict):
        payload["features"] = {k: v for k, v in payload["features"].items() if v is not MISSING}
    return json.dumps(payload).encode()


def nested(depth: int) -> Any:
    """`depth` levels of nested arrays."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def chunked(total: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A body httpx must send chunked: it has no length up front."""
    for _ in range(total // chunk):
        yield b" " * chunk


@dataclass(frozen=True)
class Case:
    status: int
    body: bytes | Callable[[], AsyncIterator[bytes]] | None = None
    headers: dict[str, str | bytes] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = PATH
    pointers: tuple[str, ...] | None = None  # exact set of `errors[].pointer`, when checked
    header_errors: tuple[str, ...] = ()  # exact `errors[].header` names, for header faults
    detail: str | None = None  # a fragment the problem's `detail` must contain


def row(case_id: str, status: int, body: Any = None, **kwargs: Any) -> Any:
    return pytest.param(Case(status, body, **kwargs), id=case_id)


def timeout_row(case_id: str, value: str | bytes) -> Any:
    headers = {**JSON, "x-request-timeout-ms": value}
    return row(
        case_id, 400, request_with(), headers=headers, header_errors=("X-Request-Timeout-Ms",)
    )


HUGE_JSON = request_with(customer_id="a" * BIG)
DEEP_ARRAYS = b"[" * 5000 + b"]" * 5000
DEEP_OBJECTS = b'{"a":' * 5000 + b"1" + b"}" * 5000
BODY = request_with()

CASES = [
    # Bytes that are not JSON at all.
    row("broken-json", 400, b'{"model_id": customer-churn}'),
    row("empty-body", 400, b"", detail="empty"),
    row("truncated-json", 400, BODY[:-7]),
    row("nan-literal", 400, BODY.replace(b"89.99", b"NaN")),
    row("infinity-literal", 400, BODY.replace(b"89.99", b"Infinity")),
    row("minus-infinity-literal", 400, BODY.replace(b"89.99", b"-Infinity")),
    row("invalid-utf8", 400, BODY.replace(b"12345", b"12\xff\xfe45"), detail="UTF-8"),
    row("utf16-bom-body", 400, BODY.decode().encode("utf-16")),
    row("bad-content-length", 400, BODY, headers={**JSON, "content-length": "abc"}),
    # JSON, but not an object.
    row("body-array", 422, b"[]", pointers=("",)),
    row("body-string", 422, b'"customer-churn"', pointers=("",)),
    row("body-number", 422, b"42", pointers=("",)),
    row("body-null", 422, b"null", pointers=("",)),
    # model_id.
    row("missing-model-id", 422, request_with({"model_id": MISSING}), pointers=("/model_id",)),
    row("model-id-number", 422, request_with({"model_id": 7}), pointers=("/model_id",)),
    row("model-id-object", 422, request_with({"model_id": {"a": 1}}), pointers=("/model_id",)),
    row("unknown-model-id", 422, request_with({"model_id": "nope"}), pointers=("/model_id",)),
    # features as a whole.
    row("missing-features", 422, request_with({"features": MISSING}), pointers=("/features",)),
    row("features-array", 422, request_with({"features": [1, 2]}), pointers=("/features",)),
    row("features-string", 422, request_with({"features": "x"}), pointers=("/features",)),
    row(
        "features-empty",
        422,
        request_with({"features": {}}),
        pointers=(
            "/features/customer_id",
            "/features/tenure_months",
            "/features/monthly_charges",
        ),
    ),
    # Each feature missing.
    *(
        row(
            f"missing-{name}", 422, request_with(**{name: MISSING}), pointers=(f"/features/{name}",)
        )
        for name in ("customer_id", "tenure_months", "monthly_charges")
    ),
    # Each feature of the wrong type.
    *(
        row(case_id, 422, request_with(**{name: value}), pointers=(f"/features/{name}",))
        for case_id, name, value in [
            ("tenure-string", "tenure_months", "24"),
            ("tenure-float", "tenure_months", 1.5),
            ("tenure-bool", "tenure_months", True),
            ("tenure-null", "tenure_months", None),
            ("charges-string", "monthly_charges", "89.99"),
            ("charges-bool", "monthly_charges", False),
            ("charges-array", "monthly_charges", [89.99]),
            ("customer-id-number", "customer_id", 12345),
            ("customer-id-null", "customer_id", None),
        ]
    ),
    row(
        "two-bad-features",
        422,
        request_with(tenure_months="x", monthly_charges=True),
        pointers=("/features/tenure_months", "/features/monthly_charges"),
    ),
    # Out of range.
    row(
        "tenure-negative",
        422,
        request_with(tenure_months=-1),
        pointers=("/features/tenure_months",),
    ),
    row(
        "tenure-too-big",
        422,
        request_with(tenure_months=1201),
        pointers=("/features/tenure_months",),
    ),
    row(
        "charges-negative",
        422,
        request_with(monthly_charges=-0.01),
        pointers=("/features/monthly_charges",),
    ),
    row(
        "customer-id-empty", 422, request_with(customer_id=""), pointers=("/features/customer_id",)
    ),
    row(
        "customer-id-overlong",
        422,
        request_with(customer_id="c" * 65),
        pointers=("/features/customer_id",),
    ),
    row(
        "all-features-bad",
        422,
        request_with(customer_id="", tenure_months=-3, monthly_charges=-5),
        pointers=(
            "/features/customer_id",
            "/features/tenure_months",
            "/features/monthly_charges",
        ),
    ),
    # Unknown fields.
    row(
        "unknown-feature", 422, request_with(tenur_months=24), pointers=("/features/tenur_months",)
    ),
    row(
        "unknown-feature-slash-tilde",
        422,
        request_with(**{"a/b~c": 1}),
        pointers=("/features/a~1b~0c",),
    ),
    row("unknown-top-level", 422, request_with({"debug": True}), pointers=("/debug",)),
    row(
        "unknown-top-level-and-bad-feature",
        422,
        request_with({"debug": True}, tenure_months="x"),
        pointers=("/debug", "/features/tenure_months"),
    ),
    # Nesting.
    row("nesting-5000-arrays", 400, DEEP_ARRAYS, detail="nest"),
    row("nesting-5000-objects", 400, DEEP_OBJECTS, detail="nest"),
    row("nesting-40-inside-feature", 400, request_with(customer_id=nested(40)), detail="nest"),
    # Size.
    row("huge-body-with-content-length", 413, HUGE_JSON),
    row("huge-body-chunked", 413, lambda: chunked(BIG)),
    # Media type.
    row("text-plain", 415, BODY, headers={"content-type": "text/plain"}),
    row("no-content-type", 415, BODY, headers={}),
    row("multipart", 415, BODY, headers={"content-type": "multipart/form-data; boundary=x"}),
    row("xml", 415, BODY, headers={"content-type": "application/xml"}),
    row("form", 415, BODY, headers={"content-type": "application/x-www-form-urlencoded"}),
    # A merge patch is a set of edits, not a prediction request; the contract takes only JSON.
    row("merge-patch-json", 415, BODY, headers={"content-type": "application/merge-patch+json"}),
    # X-Request-Timeout-Ms.
    *(
        timeout_row(f"timeout-{case_id}", value)
        for case_id, value in [
            ("letters", "abc"),
            ("zero", "0"),
            ("negative", "-5"),
            ("exponent", "1e3"),
            ("huge", "999999999"),
            ("above-maximum", "600001"),
            ("fraction", "1.5"),
            ("empty", ""),
            # Latin-1 "²": str.isdigit() says yes, int() says no.
            ("superscript-two", b"\xb2"),
        ]
    ),
    # Wrong method or path.
    row("get", 405, method="GET", headers={}),
    row("put", 405, BODY, method="PUT"),
    row("delete", 405, method="DELETE", headers={}),
    row("unknown-path", 404, BODY, path="/v1/prediction"),
    row("unknown-version", 404, BODY, path="/v2/predictions"),
    row("root", 404, method="GET", path="/", headers={}),
]


def triton_nowhere() -> dict[str, str]:
    return {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


async def send(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    content = case.body() if callable(case.body) else case.body
    return await client.request(case.method, case.path, content=content, headers=case.headers)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is a contract-shaped problem document that leaks no internals."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].split(";")[0] == "application/problem+json"
    problem = response.json()
    errors = list(PROBLEM_SCHEMA.iter_errors(problem))
    assert not errors, [e.message for e in errors]
    assert problem["type"] and problem["title"]
    assert problem["status"] == status
    for leak in LEAKS:
        assert leak not in response.text, leak
    return problem


@pytest.mark.parametrize("case", CASES)
async def test_hostile_request_gets_a_precise_problem(gateway_client, case: Case) -> None:
    """Each hostile or invalid request gets its 4xx as problem+json naming every bad field."""
    async with gateway_client(env=triton_nowhere()) as client:
        response = await send(client, case)
    problem = assert_problem(response, case.status)
    errors = problem.get("errors", [])
    if case.pointers is not None:
        assert sorted(e.get("pointer", "<none>") for e in errors) == sorted(case.pointers)
    if case.header_errors:
        assert [e.get("header") for e in errors] == list(case.header_errors)
    if case.detail is not None:
        assert case.detail in problem.get("detail", ""), problem
    if case.status == 405:
        assert "POST" in response.headers["allow"]
    if callable(case.body):
        assert "content-length" not in response.request.headers  # really sent chunked


def test_the_table_is_big_enough() -> None:
    """The hostile-request table keeps at least 35 rows."""
    assert len(CASES) >= 35


def assert_envelope(response: httpx.Response) -> dict[str, Any]:
    """A 200 whose body is a complete PredictionResponse answered by the fallback chain."""
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].split(";")[0] == "application/json"
    body = response.json()
    errors = list(RESPONSE_SCHEMA.iter_errors(body))
    assert not errors, [e.message for e in errors]
    declared = CONTRACT["components"]["schemas"]["PredictionResponse"]["properties"]
    assert set(body) == set(declared)
    assert body["served_by"] in {"default", "rules"}
    assert body["degraded"] is True
    return body


async def test_valid_request_survives_the_whole_table(gateway_client) -> None:
    """After every hostile row hits one gateway, a normal request still gets the full envelope."""
    async with gateway_client(env=triton_nowhere()) as client:
        for param in CASES:
            (case,) = param.values
            assert (await send(client, case)).status_code < 500  # the table checks each status
        response = await client.post(PATH, json=CHURN_REQUEST)
    assert_envelope(response)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(BODY, JSON, id="plain"),
        pytest.param(BODY, {"content-type": "application/json; charset=utf-8"}, id="charset"),
        pytest.param(BODY, {"content-type": "Application/JSON"}, id="media-type-case"),
        pytest.param(request_with(tenure_months=24.0), JSON, id="integer-written-as-24.0"),
        pytest.param(request_with(monthly_charges=90), JSON, id="number-written-as-90"),
        pytest.param(request_with(tenure_months=0, monthly_charges=0), JSON, id="zeros"),
        pytest.param(request_with(tenure_months=1200), JSON, id="tenure-at-maximum"),
        pytest.param(request_with(customer_id="c" * 64), JSON, id="customer-id-64"),
        pytest.param(request_with(customer_id="ü" * 64), JSON, id="customer-id-64-non-ascii"),
        pytest.param(BODY, {**JSON, "x-request-timeout-ms": "600000"}, id="timeout-maximum"),
        pytest.param(BODY, {**JSON, "x-request-timeout-ms": "1"}, id="timeout-minimum"),
    ],
)
async def test_valid_request_gets_the_envelope(gateway_client, body: bytes, headers) -> None:
    """Valid requests at the edges of the contract get 200 and the full envelope."""
    async with gateway_client(env=triton_nowhere()) as client:
        response = await client.post(PATH, content=body, headers=headers)
    assert_envelope(response)


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        pytest.param("abc-123", True, id="plain"),
        pytest.param("trace:0af7651916cd43dd.8448eb211c80319c_x", True, id="all-allowed-chars"),
        pytest.param("r" * 128, True, id="128-chars"),
        pytest.param("r" * 129, False, id="129-chars"),
        pytest.param("r" * 500, False, id="500-chars"),
        pytest.param("<script>", False, id="markup"),
        pytest.param("has space", False, id="space"),
        pytest.param("a;b", False, id="semicolon"),
        pytest.param("", False, id="empty"),
    ],
)
async def test_request_id_is_echoed_only_when_well_formed(gateway_client, sent, echoed) -> None:
    """A well-formed X-Request-ID comes back as sent; anything else is replaced by a fresh id."""
    async with gateway_client(env=triton_nowhere()) as client:
        response = await client.post(PATH, json=CHURN_REQUEST, headers={"x-request-id": sent})
    assert response.status_code == 200
    returned = response.headers.get_list("x-request-id")
    assert len(returned) == 1
    if echoed:
        assert returned[0] == sent
    else:
        assert returned[0] != sent
        assert 0 < len(returned[0]) <= 128
        assert set(returned[0]) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"
        )


async def test_request_id_is_made_when_absent(gateway_client) -> None:
    """Without X-Request-ID, each response gets its own fresh id."""
    async with gateway_client(env=triton_nowhere()) as client:
        first = await client.post(PATH, json=CHURN_REQUEST)
        second = await client.post(PATH, json=CHURN_REQUEST)
    assert first.headers["x-request-id"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "case",
    [
        row("prediction", 200, BODY),
        row("invalid-request", 422, b"[]"),
        row("malformed-json", 400, b"{"),
        row("too-large", 413, HUGE_JSON),
        row("media-type", 415, BODY, headers={"content-type": "text/plain"}),
        row("not-found", 404, method="GET", path="/nope", headers={}),
        row("method-not-allowed", 405, method="GET", headers={}),
        row("bad-header", 400, BODY, headers={**JSON, "x-request-timeout-ms": "x"}),
    ],
)
async def test_security_headers_on_every_response(gateway_client, case: Case) -> None:
    """Answers and errors alike carry nosniff, no-store, DENY, a closed CSP and X-Request-ID."""
    async with gateway_client(env=triton_nowhere()) as client:
        response = await send(client, case)
    assert response.status_code == case.status
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert response.headers.get("x-request-id")


async def test_unexpected_error_keeps_the_contract_shape(monkeypatch) -> None:
    """A bug inside the handler answers 500 problem+json with X-Request-ID and security headers."""

    async def broken_chain(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("gateway.fallback exploded")

    monkeypatch.setattr("gateway.api.predictions.answer_first", broken_chain)
    monkeypatch.setattr("gateway.api.feedback._decision_judged", broken_chain)
    app = create_app(settings_for(REPO), env=triton_nowhere())
    async with LifespanManager(app) as manager:
        # The app re-raises after answering, as ASGI servers expect; only its answer matters here.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.post(PATH, json=CHURN_REQUEST, headers={"x-request-id": "r-1"})
            feedback = {"prediction_id": "00000000-0000-4000-8000-000000000000", "outcome": "x"}
            through_fastapi = await client.post("/v1/feedback", json=feedback)
            metrics = (await client.get("/metrics")).text
    assert_problem(through_fastapi, 500)
    # Both counted once, so a bug that fails every request shows as errors, not as no traffic.
    assert 'aigw_rejected_requests_total{status="500"} 2.0' in metrics
    assert_problem(response, 500)
    assert "exploded" not in response.text
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert response.headers.get("x-request-id") == "r-1"
