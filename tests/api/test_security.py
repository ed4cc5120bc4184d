"""Authentication, permissions, tenants, rate limits and hostile requests, with auth on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager

from gateway.app import create_admin_app, create_app
from gateway.auth import KeysFileError, add_key, parse_keys_file, revoke_key
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, REPO, settings_for

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
KEYS = {
    "predictor": ("acme", ["predict"]),
    "auditor": ("acme", ["predict", "feedback", "audit:read"]),
    "other": ("globex", ["predict", "feedback", "audit:read"]),
    "operator": ("ops", ["admin"]),
    "analyst": ("ops", ["models:read"]),
}


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file with the KEYS above; acme may make 3 requests at once, then 1 per second."""
    path = tmp_path / "keys.yaml"
    keys = {}
    for name, (tenant, permissions) in KEYS.items():
        keys[name] = add_key(path, tenant, permissions, key=f"aigw_test_{name}_0123456789")[1]
    data = yaml.safe_load(path.read_text())
    data["tenants"]["acme"] = {"rate_per_s": 1, "burst": 3}
    path.write_text(yaml.safe_dump(data))
    return path, keys


@asynccontextmanager
async def secured(keys_path: Path, audit_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    settings = settings_for(REPO, keys_file=keys_path, audit_dir=audit_dir, watch_policies=False)
    app = create_app(settings, env=NOWHERE)
    async with LifespanManager(app) as manager:
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        admin_app = create_admin_app(app)
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=admin_app), base_url="http://a")
        async with public, admin:
            yield public, admin


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


UUID = "00000000-0000-4000-8000-000000000000"
LONG = "x" * 20_000

# (id, method, path, headers builder (keys -> headers), body, expected status)
HOSTILE = [
    ("no-key", "POST", "/v1/predictions", lambda k: {}, CHURN_REQUEST, 401),
    (
        "empty-bearer",
        "POST",
        "/v1/predictions",
        lambda k: {"Authorization": "Bearer "},
        CHURN_REQUEST,
        401,
    ),
    (
        "basic-scheme",
        "POST",
        "/v1/predictions",
        lambda k: {"Authorization": "Basic dXNlcjpwYXNz"},
        CHURN_REQUEST,
        401,
    ),
    ("unknown-key", "POST", "/v1/predictions", lambda k: bearer("aigw_nope"), CHURN_REQUEST, 401),
    (
        "key-with-suffix",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"] + "x"),
        CHURN_REQUEST,
        401,
    ),
    (
        "key-prefix",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"][:-1]),
        CHURN_REQUEST,
        401,
    ),
    (
        "key-case-changed",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"].upper()),
        CHURN_REQUEST,
        401,
    ),
    ("huge-key", "POST", "/v1/predictions", lambda k: bearer("k" * 4000), CHURN_REQUEST, 401),
    (
        "bearer-lowercase",
        "POST",
        "/v1/predictions",
        lambda k: {"Authorization": "bearer " + k["predictor"]},
        CHURN_REQUEST,
        200,
    ),
    (
        "x-api-key",
        "POST",
        "/v1/predictions",
        lambda k: {"X-API-Key": k["predictor"]},
        CHURN_REQUEST,
        200,
    ),
    ("empty-x-api-key", "POST", "/v1/predictions", lambda k: {"X-API-Key": ""}, CHURN_REQUEST, 401),
    (
        "admin-key-cannot-predict",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["operator"]),
        CHURN_REQUEST,
        403,
    ),
    (
        "predict-key-cannot-feedback",
        "POST",
        "/v1/feedback",
        lambda k: bearer(k["predictor"]),
        {"prediction_id": UUID, "outcome": "churn"},
        403,
    ),
    (
        "predict-key-cannot-read-audit",
        "GET",
        f"/v1/predictions/{UUID}/explanation",
        lambda k: bearer(k["predictor"]),
        None,
        403,
    ),
    (
        "predict-key-cannot-read-experiments",
        "GET",
        "/v1/experiments/customer-churn",
        lambda k: bearer(k["predictor"]),
        None,
        403,
    ),
    (
        "auditor-unknown-prediction",
        "GET",
        f"/v1/predictions/{UUID}",
        lambda k: bearer(k["auditor"]),
        None,
        404,
    ),
    (
        "auditor-path-traversal",
        "GET",
        "/v1/predictions/..%2F..%2Fetc%2Fpasswd",
        lambda k: bearer(k["auditor"]),
        None,
        404,
    ),
    ("auditor-not-a-uuid", "GET", "/v1/predictions/abc", lambda k: bearer(k["auditor"]), None, 404),
    (
        "feedback-unknown",
        "POST",
        "/v1/feedback",
        lambda k: bearer(k["auditor"]),
        {"prediction_id": UUID, "outcome": "churn"},
        404,
    ),
    (
        "feedback-bad-outcome-type",
        "POST",
        "/v1/feedback",
        lambda k: bearer(k["auditor"]),
        {"prediction_id": UUID, "outcome": 1},
        422,
    ),
    (
        "feedback-extra-field",
        "POST",
        "/v1/feedback",
        lambda k: bearer(k["auditor"]),
        {"prediction_id": UUID, "outcome": "churn", "x": 1},
        422,
    ),
    (
        "experiments-unknown-model",
        "GET",
        "/v1/experiments/nope",
        lambda k: bearer(k["analyst"]),
        None,
        404,
    ),
    # Model-wide reports count every tenant's traffic: a tenant's auditor reads its own
    # records, not them.
    (
        "auditor-cannot-read-experiments", "GET", "/v1/experiments/customer-churn",
        lambda k: bearer(k["auditor"]), None, 403,
    ),
    (
        "auditor-cannot-read-model-health", "GET", "/v1/models/customer-churn/health",
        lambda k: bearer(k["auditor"]), None, 403,
    ),
    (
        "analyst-reads-experiments", "GET", "/v1/experiments/customer-churn",
        lambda k: bearer(k["analyst"]), None, 200,
    ),
    (
        "analyst-reads-model-health", "GET", "/v1/models/customer-churn/health",
        lambda k: bearer(k["analyst"]), None, 200,
    ),
    (
        "analyst-cannot-read-records", "GET", f"/v1/predictions/{UUID}",
        lambda k: bearer(k["analyst"]), None, 403,
    ),
    (
        "header-too-large",
        "POST",
        "/v1/predictions",
        lambda k: {**bearer(k["predictor"]), "X-Junk": LONG},
        CHURN_REQUEST,
        431,
    ),
    (
        "request-id-injection",
        "POST",
        "/v1/predictions",
        lambda k: {**bearer(k["predictor"]), "X-Request-ID": "a b<script>"},
        CHURN_REQUEST,
        200,
    ),
    (
        "bad-timeout-header",
        "POST",
        "/v1/predictions",
        lambda k: {**bearer(k["predictor"]), "X-Request-Timeout-Ms": "-1"},
        CHURN_REQUEST,
        400,
    ),
    (
        "duplicate-json-key",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"]),
        b'{"model_id":"customer-churn","model_id":"x","features":{}}',
        400,
    ),
    (
        "duplicate-feature-key",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"]),
        b'{"model_id":"customer-churn","features":{"customer_id":"a","customer_id":"b","tenure_months":1,"monthly_charges":1}}',
        400,
    ),
    (
        "nan-literal",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"]),
        b'{"model_id":"customer-churn","features":{"customer_id":"a","tenure_months":1,"monthly_charges":NaN}}',
        400,
    ),
    (
        "text-plain",
        "POST",
        "/v1/predictions",
        lambda k: {**bearer(k["predictor"]), "Content-Type": "text/plain"},
        b"{}",
        415,
    ),
    (
        "oversized-body",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"]),
        b"[" + b"1," * 40_000 + b"1]",
        413,
    ),
    (
        "wrong-model",
        "POST",
        "/v1/predictions",
        lambda k: bearer(k["predictor"]),
        {"model_id": "../../etc", "features": {}},
        422,
    ),
    ("put-method", "PUT", "/v1/predictions", lambda k: bearer(k["predictor"]), CHURN_REQUEST, 405),
    ("delete-method", "DELETE", "/v1/predictions", lambda k: bearer(k["predictor"]), None, 405),
    ("patch-method", "PATCH", "/v1/feedback", lambda k: bearer(k["auditor"]), {}, 405),
    ("get-feedback", "GET", "/v1/feedback", lambda k: bearer(k["auditor"]), None, 405),
    ("unknown-path", "GET", "/v2/predictions", lambda k: bearer(k["predictor"]), None, 404),
    ("dot-dot-path", "GET", "/v1/../admin/policies", lambda k: bearer(k["operator"]), None, 404),
    ("admin-on-public-port", "GET", "/admin/policies", lambda k: bearer(k["operator"]), None, 404),
    ("very-long-path", "GET", "/v1/" + "a" * 5000, lambda k: bearer(k["predictor"]), None, 404),
    ("null-byte-path", "GET", "/v1/predictions/%00", lambda k: bearer(k["auditor"]), None, 404),
    ("unicode-path", "GET", "/v1/experiments/%E2%98%83", lambda k: bearer(k["analyst"]), None, 404),
    ("healthz-needs-no-key", "GET", "/healthz", lambda k: {}, None, 200),
    # A trailing slash is another path, not a redirect (which would name the caller's Host).
    ("slash-predictions", "POST", "/v1/predictions/", lambda k: {}, CHURN_REQUEST, 404),
    ("slash-feedback", "POST", "/v1/feedback/", lambda k: bearer(k["auditor"]), {}, 404),
    (
        "slash-experiments", "GET", "/v1/experiments/customer-churn/",
        lambda k: bearer(k["analyst"]), None, 404,
    ),
    (
        "timeout-header-of-4401-digits", "POST", "/v1/predictions",
        lambda k: {**bearer(k["predictor"]), "X-Request-Timeout-Ms": "0" * 4400 + "5"},
        CHURN_REQUEST, 400,
    ),
    (
        "timeout-header-of-4401-digits-async", "POST", "/v1/predictions:async",
        lambda k: {**bearer(k["predictor"]), "X-Request-Timeout-Ms": "0" * 4400 + "5"},
        CHURN_REQUEST, 400,
    ),
    (
        # Deeper than stdlib json recurses (the duplicate-key check), shallower than orjson's
        # limit: refused for its depth.
        "nested-1000-deep", "POST", "/v1/predictions", lambda k: bearer(k["predictor"]),
        b'{"a":' * 1000 + b"1" + b"}" * 1000, 400,
    ),
    (
        "nested-1000-deep-feedback", "POST", "/v1/feedback", lambda k: bearer(k["auditor"]),
        b'{"a":' * 1000 + b"1" + b"}" * 1000, 400,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [pytest.param(*row[1:], id=row[0]) for row in HOSTILE],
)
async def test_hostile_requests_get_their_status_as_a_problem(
    keys_file, tmp_path, method, path, headers, body, status
):
    """Each hostile request gets its status; every refusal is problem+json revealing no key."""
    keys_path, keys = keys_file
    async with secured(keys_path, tmp_path / "audit") as (public, _):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        request_headers = headers(keys)
        if isinstance(body, bytes) and "Content-Type" not in request_headers:
            request_headers["Content-Type"] = "application/json"
        response = await public.request(method, path, headers=request_headers, **kwargs)
    assert response.status_code == status, response.text
    if status >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status
    for key in keys.values():
        assert key not in response.text
    assert "sha256:" not in response.text


@pytest.mark.parametrize(
    ("key_name", "status"), [(None, 401), ("predictor", 403), ("auditor", 403), ("operator", 200)]
)
async def test_admin_api_needs_the_admin_permission(keys_file, tmp_path, key_name, status):
    """Only keys with `admin` may use the admin API."""
    keys_path, keys = keys_file
    async with secured(keys_path, tmp_path / "audit") as (_, admin):
        headers = bearer(keys[key_name]) if key_name else {}
        response = await admin.get("/admin/policies/history", headers=headers)
    assert response.status_code == status


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        pytest.param("GET", "/admin/policies/", {}, None, 404, id="trailing-slash"),
        pytest.param("GET", "/admin/policies", {"X-Junk": LONG}, None, 431, id="huge-header"),
        pytest.param(
            "POST", "/admin/policies/validate", {"Content-Type": "application/json"},
            b'{"a":' * 1000 + b"1" + b"}" * 1000, 400, id="nested-1000-deep",
        ),
    ],
)  # fmt: skip
async def test_hostile_admin_requests_get_their_status_as_a_problem(
    keys_file, tmp_path, method, path, headers, body, status
):
    """The admin listener refuses as the public one does: no redirect, 431, no 500."""
    keys_path, keys = keys_file
    async with secured(keys_path, tmp_path / "audit") as (_, admin):
        response = await admin.request(
            method, path, headers={**bearer(keys["operator"]), **headers}, content=body
        )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "location" not in response.headers


async def test_a_tenant_over_its_limit_is_refused_while_another_is_not(keys_file, tmp_path):
    """acme's 4th request in a burst gets 429 + Retry-After + RateLimit; globex is unaffected."""
    keys_path, keys = keys_file
    async with secured(keys_path, tmp_path / "audit") as (public, _):
        acme = [
            await public.post(
                "/v1/predictions", json=CHURN_REQUEST, headers=bearer(keys["predictor"])
            )
            for _ in range(5)
        ]
        globex = [
            await public.post("/v1/predictions", json=CHURN_REQUEST, headers=bearer(keys["other"]))
            for _ in range(5)
        ]
        metrics = (await public.get("/metrics")).text
    assert [r.status_code for r in acme][:3] == [200, 200, 200]
    refused = acme[3]
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-limit"] == "3"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert [r.status_code for r in globex] == [200] * 5
    assert 'aigw_rate_limited_requests_total{tenant="acme"}' in metrics


async def test_tenants_cannot_read_each_others_records_or_feedback(keys_file, tmp_path):
    """A prediction made by acme is invisible to globex: its record and its feedback are 404."""
    keys_path, keys = keys_file
    async with secured(keys_path, tmp_path / "audit") as (public, _):
        made = await public.post(
            "/v1/predictions", json=CHURN_REQUEST, headers=bearer(keys["auditor"])
        )
        prediction_id = made.json()["prediction_id"]
        explanation = f"/v1/predictions/{prediction_id}/explanation"
        own = await public.get(explanation, headers=bearer(keys["auditor"]))
        foreign = await public.get(explanation, headers=bearer(keys["other"]))
        feedback = {"prediction_id": prediction_id, "outcome": "churn"}
        foreign_feedback = await public.post(
            "/v1/feedback", json=feedback, headers=bearer(keys["other"])
        )
        own_feedback = await public.post(
            "/v1/feedback", json=feedback, headers=bearer(keys["auditor"])
        )
    assert own.status_code == 200 and own.json()["tenant"] == "acme"
    assert foreign.status_code == 404
    assert foreign_feedback.status_code == 404
    assert own_feedback.status_code == 202


async def test_keys_are_added_and_revoked_without_restart(keys_file, tmp_path):
    """A key added to the file works within a second; a revoked one stops working."""
    keys_path, _ = keys_file
    async with secured(keys_path, tmp_path / "audit") as (public, _):
        key_id, new = add_key(keys_path, "initech", ["predict"])
        statuses = []
        for _ in range(40):
            response = await public.post("/v1/predictions", json=CHURN_REQUEST, headers=bearer(new))
            statuses.append(response.status_code)
            if response.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert statuses[-1] == 200
        revoke_key(keys_path, key_id)
        for _ in range(40):
            response = await public.post("/v1/predictions", json=CHURN_REQUEST, headers=bearer(new))
            if response.status_code == 401:
                break
            await asyncio.sleep(0.05)
    assert response.status_code == 401


async def test_no_key_or_key_hash_reaches_logs_metrics_or_audit(keys_file, tmp_path, caplog):
    """Keys and their hashes never appear in logs, /metrics or the audit trail."""
    keys_path, keys = keys_file
    caplog.set_level(logging.DEBUG)
    audit_dir = tmp_path / "audit"
    async with secured(keys_path, audit_dir) as (public, _):
        for name in ("predictor", "auditor", "other"):
            await public.post("/v1/predictions", json=CHURN_REQUEST, headers=bearer(keys[name]))
        await public.post("/v1/predictions", json=CHURN_REQUEST, headers=bearer("aigw_wrong_key"))
        metrics = (await public.get("/metrics")).text
    hashes = [entry["hash"] for entry in yaml.safe_load(keys_path.read_text())["keys"]]
    audit = b"".join(p.read_bytes() for p in audit_dir.glob("*"))  # the index file too
    for secret in [*keys.values(), *hashes, "aigw_wrong_key"]:
        assert secret not in caplog.text
        assert secret not in metrics
        assert secret.encode() not in audit
    segments = b"".join(p.read_bytes() for p in sorted(audit_dir.glob("audit-*.jsonl")))
    records = [json.loads(line) for line in segments.decode().splitlines()]
    assert {r["tenant"] for r in records if r.get("type") == "prediction"} == {"acme", "globex"}


@pytest.mark.parametrize("public_metrics", [True, False])
async def test_metrics_are_on_the_admin_listener_and_on_the_public_one_only_if_allowed(
    tmp_path, public_metrics
):
    """/metrics names tenants and models in its labels: with AIGW_PUBLIC_METRICS=false only
    the admin listener serves it, which Prometheus scrapes without a key either way."""
    settings = settings_for(
        REPO, audit_dir=tmp_path, watch_policies=False, public_metrics=public_metrics
    )
    app = create_app(settings, env=NOWHERE)
    async with LifespanManager(app) as manager:
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(app)), base_url="http://a"
        )
        async with public, admin:
            on_admin = await admin.get("/metrics")
            on_public = await public.get("/metrics")
    assert on_admin.status_code == 200 and "aigw_requests_total" in on_admin.text
    assert on_public.status_code == (200 if public_metrics else 404)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("keys: " + "[" * 50_000 + "]" * 50_000, "nested too deeply (more than 64 levels)"),
        ("keys: []\nkeys: []\n", "key 'keys' appears twice"),
    ],
    ids=["nested-too-deeply", "key-twice"],
)
def test_an_unreadable_keys_file_is_one_fault_naming_it(text, fragment):
    """A keys file nested too deeply or with a key written twice is a fault, not a crash."""
    with pytest.raises(KeysFileError) as caught:
        parse_keys_file(text, "keys.yaml")
    [fault] = caught.value.faults
    assert fault.startswith("keys.yaml: cannot be read: ") and fragment in fault, fault
