"""Asynchronous predictions over HTTP: submit, poll, callbacks, limits, tenants, memory jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.audit import AuditUnavailable
from gateway.auth import add_key
from gateway.callbacks import verify
from gateway.contracts import load_contracts
from gateway.demo.triton_process import free_port
from gateway.job_memory import KeptOutcomes, MemoryJobs, jobs_backend
from gateway.jobs import JobOutcome
from gateway.settings import Settings
from tests.callback_receiver import Receiver
from tests.conftest import CHURN_REQUEST, REPO, settings_for

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
CALLBACK_KEY = "test-callback-key"
CONTRACT = load_contracts(REPO / "contracts").document


def schema_validator(name: str) -> Any:
    root = {"$ref": f"#/components/schemas/{name}", "components": CONTRACT["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


ENVELOPE = schema_validator("PredictionResponse")
ACCEPTED = schema_validator("PredictionAccepted")
PENDING = schema_validator("PredictionPending")


class AuditGate:
    """Holds every audit append until opened, or refuses the next `failures` of them."""

    def __init__(self, app: FastAPI, failures: int = 0, closed: bool = False) -> None:
        audit = app.state.runtime.audit
        self._append = audit.append
        self.opened = asyncio.Event()
        if not closed:
            self.opened.set()
        self.failures = failures
        audit.append = self.append

    async def append(self, record: Any, **options: Any) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise AuditUnavailable("disk full")  # stands in for a real write failure
        await self.opened.wait()
        return await self._append(record, **options)


@asynccontextmanager
async def gateway(**settings: object) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings.setdefault("watch_policies", False)
    settings.setdefault("callback_key", CALLBACK_KEY)
    app = create_app(settings_for(REPO, **settings), env=NOWHERE)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


async def answered(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """GET `url` until it is no longer pending (bounded)."""
    for _ in range(500):
        response = await client.get(url, headers=headers)
        if response.status_code != 202:
            return response
        await asyncio.sleep(0.01)
    raise AssertionError(f"{url} still pending")


def audit_records(directory: Path) -> list[dict]:
    return [
        record
        for path in sorted(directory.rglob("audit-*.jsonl"))
        for record in map(json.loads, path.read_text().splitlines())
        if record.get("type") == "prediction"
    ]


# ---- submit and poll ----------------------------------------------------------------------------


async def test_submit_answers_202_with_a_status_url_that_gives_the_synchronous_envelope(tmp_path):
    """202 + Location; polling ends in exactly the sync envelope, audited under the same id."""
    async with gateway(audit_dir=tmp_path) as (_, client):
        submitted = await client.post("/v1/predictions:async", json=CHURN_REQUEST)
        assert submitted.status_code == 202
        accepted = submitted.json()
        assert not list(ACCEPTED.iter_errors(accepted))
        prediction_id = accepted["prediction_id"]
        assert accepted == {
            "prediction_id": prediction_id,
            "status": "pending",
            "status_url": f"/v1/predictions/{prediction_id}",
        }
        assert submitted.headers["location"] == accepted["status_url"]
        assert submitted.headers["x-request-id"]
        result = await answered(client, accepted["status_url"])
        synchronous = (await client.post("/v1/predictions", json=CHURN_REQUEST)).json()
        explained = await client.get(f"/v1/predictions/{prediction_id}/explanation")
    assert result.status_code == 200
    envelope = result.json()
    assert not list(ENVELOPE.iter_errors(envelope))
    assert set(envelope) == set(synchronous)
    assert envelope["prediction_id"] == prediction_id
    assert envelope["served_by"] == synchronous["served_by"]
    (record,) = [r for r in audit_records(tmp_path) if r["prediction_id"] == prediction_id]
    assert record["prediction"] == envelope["prediction"]
    assert explained.status_code == 200 and explained.json()["prediction_id"] == prediction_id


async def test_a_job_is_pending_while_it_runs():
    """GET says 202 pending until the job's answer is recorded, then 200."""
    async with gateway() as (app, client):
        gate = AuditGate(app, closed=True)
        accepted = (await client.post("/v1/predictions:async", json=CHURN_REQUEST)).json()
        await asyncio.sleep(0.05)  # the worker has taken it and waits on the audit log
        pending = await client.get(accepted["status_url"])
        assert pending.status_code == 202
        assert pending.json() == {"prediction_id": accepted["prediction_id"], "status": "pending"}
        assert not list(PENDING.iter_errors(pending.json()))
        gate.opened.set()
        result = await answered(client, accepted["status_url"])
    assert result.status_code == 200
    assert result.json()["prediction_id"] == accepted["prediction_id"]


async def test_a_job_whose_record_cannot_be_written_is_retried_not_dropped(tmp_path):
    """AuditUnavailable twice: the job waits and tries again, and is answered and audited."""
    async with gateway(audit_dir=tmp_path) as (app, client):
        AuditGate(app, failures=2)
        accepted = (await client.post("/v1/predictions:async", json=CHURN_REQUEST)).json()
        result = await answered(client, accepted["status_url"])
        retries = app.state.jobs.audit_retries
    assert result.status_code == 200
    assert retries == 2
    assert [r["prediction_id"] for r in audit_records(tmp_path)] == [accepted["prediction_id"]]


async def test_a_job_is_routed_by_its_headers_as_the_synchronous_request_is():
    """`X-Customer-Tier: premium` takes the premium route whether asked now or later."""
    premium = {"X-Customer-Tier": "premium", "X-API-Key": "not-a-route-input"}
    async with gateway() as (_, client):
        now = (await client.post("/v1/predictions", json=CHURN_REQUEST, headers=premium)).json()
        submitted = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=premium)
        later = (await answered(client, submitted.json()["status_url"])).json()
        plain = await client.post("/v1/predictions:async", json=CHURN_REQUEST)
        await answered(client, plain.json()["status_url"])
        explained = {
            name: (await client.get(f"/v1/predictions/{pid}/explanation")).json()
            for name, pid in (
                ("now", now["prediction_id"]), ("later", later["prediction_id"]),
                ("plain", plain.json()["prediction_id"]),
            )
        }  # fmt: skip
    assert explained["now"]["route"] == explained["later"]["route"] == "premium-tier"
    assert explained["now"]["arm"] == explained["later"]["arm"] == "challenger"
    assert explained["plain"]["route"] is None


async def test_a_job_that_fails_with_a_bug_reads_as_failed_not_unknown(tmp_path):
    """Not an outage, a bug: the job is not retried forever, and its id says it failed."""
    async with gateway(audit_dir=tmp_path) as (app, client):

        async def broken_append(record: Any, **options: Any) -> str:
            raise RuntimeError("boom")  # stands in for a bug on the job's path

        app.state.runtime.audit.append = broken_append
        accepted = (await client.post("/v1/predictions:async", json=CHURN_REQUEST)).json()
        result = await answered(client, accepted["status_url"])
        unknown = await client.get(f"/v1/predictions/{'0' * 8}-0000-4000-8000-{'0' * 12}")
        metrics = (await client.get("/metrics")).text
    assert "aigw_jobs_failed_total 1.0" in metrics  # what AigwJobsFailed watches
    assert result.status_code == 404
    assert result.headers["content-type"] == "application/problem+json"
    problem = result.json()
    assert problem["type"].endswith(":prediction-failed")
    assert "submit it again" in problem["detail"] and "boom" not in json.dumps(problem)
    assert unknown.json()["type"].endswith(":unknown-prediction")
    assert audit_records(tmp_path) == []


async def test_a_full_queue_refuses_with_503_and_retry_after():
    """Queue of one, one worker held: later submits get 503 problem+json; accepted ones finish."""
    # A tenant allowed more than the whole queue: the queue's own bound is what refuses.
    async with gateway(jobs_queue_max=1, jobs_tenant_max=2, jobs_workers=1) as (app, client):
        gate = AuditGate(app, closed=True)
        responses = []
        for _ in range(4):
            responses.append(await client.post("/v1/predictions:async", json=CHURN_REQUEST))
            await asyncio.sleep(0.02)
        statuses = [r.status_code for r in responses]
        gate.opened.set()
        finished = [
            (await answered(client, r.json()["status_url"])).status_code
            for r in responses
            if r.status_code == 202
        ]
    assert statuses[:2] == [202, 202]  # one running, one queued
    refused = responses[2]
    assert statuses[2:] == [503, 503]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["type"] == "urn:aigw:problem:queue-full"
    assert finished == [200, 200]


async def test_shutdown_answers_the_jobs_still_queued(tmp_path):
    """Jobs accepted just before shutdown are answered (and audited) before the process ends."""
    async with gateway(audit_dir=tmp_path, jobs_workers=1) as (_, client):
        ids = [
            (await client.post("/v1/predictions:async", json=CHURN_REQUEST)).json()["prediction_id"]
            for _ in range(5)
        ]
    assert sorted(r["prediction_id"] for r in audit_records(tmp_path)) == sorted(ids)


# ---- hostile input: never enqueued ------------------------------------------------------------

CHURN_FEATURES = CHURN_REQUEST["features"]
HOSTILE: list[tuple[str, Any, dict[str, str], int, list[str]]] = [
    ("not-json", b"{not json", {}, 400, []),
    ("empty", b"", {}, 400, []),
    ("wrong-media-type", b"{}", {"content-type": "text/plain"}, 415, []),
    ("too-large", b'{"x":"' + b"a" * 70_000 + b'"}', {}, 413, []),
    ("duplicate-key", b'{"model_id":"customer-churn","model_id":"x","features":{}}', {}, 400, []),
    ("too-deep", b"[" * 40 + b"]" * 40, {}, 400, []),
    ("bad-timeout-header", CHURN_REQUEST, {"x-request-timeout-ms": "0"}, 400, []),
    ("array", [CHURN_REQUEST], {}, 422, [""]),
    ("no-model", {"features": CHURN_FEATURES}, {}, 422, ["/model_id"]),
    ("unknown-model", {"model_id": "../etc", "features": {}}, {}, 422, ["/model_id"]),
    ("no-features", {"model_id": "customer-churn"}, {}, 422, ["/features"]),
    ("extra-field", {**CHURN_REQUEST, "priority": "high"}, {}, 422, ["/priority"]),
    (
        "bad-feature",
        {"model_id": "customer-churn", "features": {**CHURN_FEATURES, "tenure_months": -1}},
        {},
        422,
        ["/features/tenure_months"],
    ),
    (
        "callback-ftp",
        {**CHURN_REQUEST, "callback_url": "ftp://h.example/x"},
        {},
        422,
        ["/callback_url"],
    ),
    (
        "callback-userinfo",
        {**CHURN_REQUEST, "callback_url": "http://u:p@h.example/"},
        {},
        422,
        ["/callback_url"],
    ),
    ("callback-null", {**CHURN_REQUEST, "callback_url": None}, {}, 422, ["/callback_url"]),
    ("callback-number", {**CHURN_REQUEST, "callback_url": 7}, {}, 422, ["/callback_url"]),
    ("callback-relative", {**CHURN_REQUEST, "callback_url": "/hook"}, {}, 422, ["/callback_url"]),
    (
        "callback-too-long",
        {**CHURN_REQUEST, "callback_url": "http://h.example/" + "a" * 3000},
        {},
        422,
        ["/callback_url"],
    ),
    (
        "callback-and-body-bad",
        {"model_id": "customer-churn", "callback_url": "gopher://x"},
        {},
        422,
        ["/callback_url", "/features"],
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "pointers"),
    [pytest.param(*row[1:], id=row[0]) for row in HOSTILE],
)
async def test_hostile_submits_are_refused_and_never_enqueued(
    tmp_path, body, headers, status, pointers
):
    """Each bad body gets its 4xx problem naming the fields, and no job is queued or run."""
    async with gateway(audit_dir=tmp_path) as (app, client):
        if isinstance(body, bytes):
            sent = {"content": body, "headers": {"content-type": "application/json", **headers}}
        else:
            sent = {"json": body, "headers": headers}
        response = await client.post("/v1/predictions:async", **sent)
        jobs: MemoryJobs = app.state.jobs
        assert jobs.queued == 0 and jobs.answered == 0
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    if pointers:
        assert [e["pointer"] for e in response.json()["errors"]] == pointers
    assert audit_records(tmp_path) == []


async def test_callback_hosts_outside_the_allow_list_are_refused():
    """AIGW_CALLBACK_ALLOWED_HOSTS set: other hosts are 422 naming /callback_url at submit."""
    async with gateway(callback_allowed_hosts="hooks.example.com") as (_, client):
        refused = await client.post(
            "/v1/predictions:async",
            json={**CHURN_REQUEST, "callback_url": "http://169.254.169.254/latest/meta-data"},
        )
        allowed = await client.post(
            "/v1/predictions:async",
            json={**CHURN_REQUEST, "callback_url": "https://hooks.example.com/aigw"},
        )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["pointer"] == "/callback_url"
    assert allowed.status_code == 202


async def test_callbacks_are_refused_when_no_signing_key_is_set():
    """Without AIGW_CALLBACK_KEY no unsigned callback is ever sent: the submit is 422."""
    async with gateway(callback_key=None) as (_, client):
        refused = await client.post(
            "/v1/predictions:async",
            json={**CHURN_REQUEST, "callback_url": "https://hooks.example.com/aigw"},
        )
        plain = await client.post("/v1/predictions:async", json=CHURN_REQUEST)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [
        {"pointer": "/callback_url", "detail": "callbacks are not enabled on this gateway"}
    ]
    assert plain.status_code == 202


# ---- GET semantics, routing, tenants ----------------------------------------------------------


async def test_a_synchronous_prediction_is_retrievable_by_its_id():
    """GET /v1/predictions/{id} of a sync answer rebuilds the very envelope from its record."""
    async with gateway() as (_, client):
        synchronous = (await client.post("/v1/predictions", json=CHURN_REQUEST)).json()
        again = await client.get(f"/v1/predictions/{synchronous['prediction_id']}")
    assert again.status_code == 200
    assert again.json() == synchronous
    assert not list(ENVELOPE.iter_errors(again.json()))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/predictions/00000000-0000-0000-0000-000000000000",
        "/v1/predictions/abc",
        "/v1/predictions/..%2F..%2Fetc%2Fpasswd",
        "/v1/predictions/%00",
    ],
)
async def test_unknown_prediction_ids_are_404_problems(path):
    """An id never made, or not an id at all, is a 404 problem."""
    async with gateway() as (_, client):
        response = await client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_colon_path_does_not_collide_with_the_id_path():
    """`/v1/predictions:async` is its own route: GET there is 405, POST /v1/predictions is sync."""
    async with gateway() as (_, client):
        get_async = await client.get("/v1/predictions:async")
        put_async = await client.put("/v1/predictions:async", json=CHURN_REQUEST)
        synchronous = await client.post("/v1/predictions", json=CHURN_REQUEST)
        submitted = await client.post("/v1/predictions:async", json=CHURN_REQUEST)
        by_id = await client.get(f"/v1/predictions/{submitted.json()['prediction_id']}")
    assert get_async.status_code == 405 and put_async.status_code == 405
    assert synchronous.status_code == 200 and "status" not in synchronous.json()
    assert submitted.status_code == 202
    assert by_id.status_code in (200, 202)


@pytest.fixture
def tenant_keys(tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    path = tmp_path / "keys.yaml"
    keys = {
        "acme": add_key(path, "acme", ["predict"], key="aigw_test_acme_0123456789")[1],
        "acme-auditor": add_key(
            path, "acme", ["predict", "audit:read"], key="aigw_test_acme_audit_0123456789"
        )[1],
        "globex": add_key(
            path, "globex", ["predict", "audit:read"], key="aigw_test_globex_0123456789"
        )[1],
    }
    return path, {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}


async def test_another_tenants_prediction_is_not_found(tenant_keys, tmp_path):
    """globex cannot see acme's job (pending or answered) nor its sync answer: 404, as unknown."""
    path, auth = tenant_keys
    async with gateway(keys_file=path, audit_dir=tmp_path / "audit") as (app, client):
        gate = AuditGate(app, closed=True)
        job = (
            await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=auth["acme"])
        ).json()
        foreign_pending = await client.get(job["status_url"], headers=auth["globex"])
        gate.opened.set()
        own = await answered(client, job["status_url"], auth["acme"])
        foreign = await client.get(job["status_url"], headers=auth["globex"])
        sync = (
            await client.post("/v1/predictions", json=CHURN_REQUEST, headers=auth["acme"])
        ).json()
        sync_url = f"/v1/predictions/{sync['prediction_id']}"
        own_sync = await client.get(sync_url, headers=auth["acme"])
        foreign_sync = await client.get(sync_url, headers=auth["globex"])
        foreign_explanation = await client.get(sync_url + "/explanation", headers=auth["globex"])
        anonymous = await client.get(job["status_url"])
    assert foreign_pending.status_code == 404
    assert own.status_code == 200 and foreign.status_code == 404
    assert own_sync.status_code == 200 and foreign_sync.status_code == 404
    assert foreign_explanation.status_code == 404
    assert anonymous.status_code == 401


async def test_the_explanation_moved_and_still_needs_audit_read(tenant_keys, tmp_path):
    """/explanation gives the audit record to `audit:read`; `predict` alone gets 403 there."""
    path, auth = tenant_keys
    async with gateway(keys_file=path, audit_dir=tmp_path / "audit") as (_, client):
        made = (
            await client.post("/v1/predictions", json=CHURN_REQUEST, headers=auth["acme"])
        ).json()
        url = f"/v1/predictions/{made['prediction_id']}"
        envelope = await client.get(url, headers=auth["acme"])
        forbidden = await client.get(url + "/explanation", headers=auth["acme"])
        explained = await client.get(url + "/explanation", headers=auth["acme-auditor"])
    assert envelope.status_code == 200
    assert forbidden.status_code == 403
    assert explained.status_code == 200
    record = explained.json()
    assert record["tenant"] == "acme" and record["prediction_id"] == made["prediction_id"]
    assert "steps" in record and "policy_version" in record


# ---- callbacks through the app ----------------------------------------------------------------


async def test_a_job_with_a_callback_url_posts_its_signed_envelope_there():
    """The receiver gets the polled envelope, once, signed with AIGW_CALLBACK_KEY; counted."""
    async with (
        Receiver([503]) as receiver,
        gateway(callback_backoff_s=0.01, callback_allowed_hosts="127.0.0.1") as (_, client),
    ):
        submitted = await client.post(
            "/v1/predictions:async", json={**CHURN_REQUEST, "callback_url": receiver.url}
        )
        envelope = (await answered(client, submitted.json()["status_url"])).json()
        await receiver.wait_accepted()
        for _ in range(200):  # the sender counts once it has read the receiver's answer
            metrics = (await client.get("/metrics")).text
            if 'outcome="delivered"' in metrics:
                break
            await asyncio.sleep(0.01)
    delivered = receiver.received[-1]
    assert len(receiver.received) == 2
    assert json.loads(delivered.body) == envelope
    assert delivered.headers["X-AIGW-Prediction-Id"] == envelope["prediction_id"]
    timestamp = delivered.headers["X-AIGW-Timestamp"]
    signature = delivered.headers["X-AIGW-Signature"]
    assert verify(CALLBACK_KEY.encode(), delivered.body, timestamp, signature, now=int(timestamp))
    assert 'aigw_callback_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert 'aigw_callback_deliveries_total{outcome="retry"} 1.0' in metrics


# ---- the memory backend's own parts -----------------------------------------------------------


def test_kept_outcomes_are_bounded_in_number_and_age():
    """The oldest outcome goes when the bound is passed, and any outcome once it is too old."""
    kept = KeptOutcomes(limit=2, keep_s=10)
    for n, at in ((1, 0.0), (2, 1.0), (3, 2.0)):
        kept.put(JobOutcome(f"p-{n}", "t", "done", {"n": n}), now=at)
    assert len(kept) == 2
    assert kept.get("p-1", now=2.0) is None
    assert kept.get("p-2", now=2.0) is not None
    assert kept.get("p-2", now=11.0) is None  # 10 s after it was kept
    assert kept.get("p-3", now=11.0) is not None
    assert kept.get("p-3", now=12.0) is None
    assert len(kept) == 0


def test_the_backend_is_memory_unless_redis_is_asked_for_and_configured():
    """Memory by default; `redis` without AIGW_REDIS_URL is a start-up error, not a fallback."""
    assert isinstance(jobs_backend(Settings()), MemoryJobs)
    with pytest.raises(ValueError, match="AIGW_REDIS_URL"):
        jobs_backend(Settings(jobs_backend="redis"))


def test_redis_settings_choose_the_stream_backend():
    """AIGW_JOBS_BACKEND=redis with AIGW_REDIS_URL gives gateway.streams.StreamJobs."""
    streams = pytest.importorskip("gateway.streams")
    backend = jobs_backend(Settings(jobs_backend="redis", redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(backend, streams.StreamJobs)


def test_the_async_request_schema_is_the_sync_one_plus_callback_url():
    """What the contract declares for :async is what is enforced: each model's sync request
    schema, plus `callback_url`; a model added to one discriminator must be in the other."""
    schemas = CONTRACT["components"]["schemas"]

    def resolved(ref: str) -> dict:
        return schemas[ref.rsplit("/", 1)[-1]]

    sync = schemas["PredictionRequest"]["discriminator"]["mapping"]
    later = schemas["AsyncPredictionRequest"]["discriminator"]["mapping"]
    assert set(sync) == set(later)
    for model_id, ref in sync.items():
        plain, with_callback = resolved(ref), dict(resolved(later[model_id]))
        properties = dict(with_callback.pop("properties"))
        assert properties.pop("callback_url") == {"$ref": "#/components/schemas/CallbackUrl"}
        assert properties == plain["properties"]
        assert with_callback == {k: v for k, v in plain.items() if k != "properties"}


async def test_a_callback_to_an_unlisted_loopback_name_is_refused_at_delivery():
    """`localhost` passes the submit check (a name), but resolves to loopback: never sent."""
    async with Receiver() as receiver, gateway() as (_, client):
        url = receiver.url.replace("127.0.0.1", "localhost")
        submitted = await client.post(
            "/v1/predictions:async", json={**CHURN_REQUEST, "callback_url": url}
        )
        assert submitted.status_code == 202
        assert (await answered(client, submitted.json()["status_url"])).status_code == 200
        for _ in range(200):
            metrics = (await client.get("/metrics")).text
            if 'outcome="refused"' in metrics:
                break
            await asyncio.sleep(0.01)
    assert 'aigw_callback_deliveries_total{outcome="refused"} 1.0' in metrics
    assert receiver.received == []


# ---- idempotency keys -------------------------------------------------------------------------

KEY = {"Idempotency-Key": "0f8fad5b-d9cb-469f-a165-70867728950e"}
OTHER_REQUEST = {**CHURN_REQUEST, "features": {**CHURN_REQUEST["features"], "tenure_months": 3}}


def reordered(request: dict[str, Any]) -> dict[str, Any]:
    """The same request written in another order: a retry by another client library."""
    return {"features": dict(reversed(list(request["features"].items()))), **request}


async def test_a_retry_with_the_same_idempotency_key_is_one_job(tmp_path):
    """The first submit queues; its retries (before and after the answer) get the same 202,
    marked as replays, and queue nothing: one audit record in all."""
    async with gateway(audit_dir=tmp_path) as (app, client):
        gate = AuditGate(app, closed=True)
        first = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        retry = await client.post("/v1/predictions:async", json=reordered(CHURN_REQUEST),
                                  headers=KEY)  # fmt: skip
        gate.opened.set()
        result = await answered(client, first.json()["status_url"])
        late = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        jobs: MemoryJobs = app.state.jobs
        answered_jobs = jobs.answered
    assert [first.status_code, retry.status_code, late.status_code] == [202, 202, 202]
    assert first.json() == retry.json() == late.json()
    assert first.headers["location"] == retry.headers["location"] == late.headers["location"]
    assert "idempotent-replayed" not in first.headers
    assert retry.headers["idempotent-replayed"] == late.headers["idempotent-replayed"] == "true"
    assert not list(ACCEPTED.iter_errors(retry.json()))
    assert result.status_code == 200
    assert answered_jobs == 1
    assert [r["prediction_id"] for r in audit_records(tmp_path)] == [first.json()["prediction_id"]]


async def test_a_key_reused_for_another_request_is_422_and_queues_nothing(tmp_path):
    async with gateway(audit_dir=tmp_path) as (_, client):
        first = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        reused = await client.post("/v1/predictions:async", json=OTHER_REQUEST, headers=KEY)
        callback = {**CHURN_REQUEST, "callback_url": "https://hooks.example/x"}
        reused_with_callback = await client.post(
            "/v1/predictions:async", json=callback, headers=KEY
        )
        await answered(client, first.json()["status_url"])
    for response in (reused, reused_with_callback):
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "urn:aigw:problem:idempotency-key-reused"
        assert problem["errors"] == [
            {"header": "Idempotency-Key", "detail": "already used for a different request"}
        ]
        assert first.json()["prediction_id"] not in json.dumps(problem)  # nothing to learn
    assert len(audit_records(tmp_path)) == 1


async def test_two_tenants_using_one_key_get_two_jobs(tenant_keys, tmp_path):
    """Keys are per tenant: acme's key does not replay for globex (nor tell it anything)."""
    path, auth = tenant_keys
    async with gateway(keys_file=path, audit_dir=tmp_path / "audit") as (_, client):
        acme = await client.post("/v1/predictions:async", json=CHURN_REQUEST,
                                 headers={**auth["acme"], **KEY})  # fmt: skip
        globex = await client.post("/v1/predictions:async", json=OTHER_REQUEST,
                                   headers={**auth["globex"], **KEY})  # fmt: skip
        for submitted, tenant in ((acme, "acme"), (globex, "globex")):
            assert (await answered(client, submitted.json()["status_url"], auth[tenant])).is_success
    assert acme.status_code == globex.status_code == 202
    assert "idempotent-replayed" not in globex.headers
    assert acme.json()["prediction_id"] != globex.json()["prediction_id"]


async def test_a_retry_is_answered_even_while_the_queue_is_full():
    """Replaying an accepted job needs no room: the retry is 202 where a new job is 503."""
    async with gateway(jobs_queue_max=1, jobs_tenant_max=2, jobs_workers=1) as (app, client):
        gate = AuditGate(app, closed=True)
        first = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        await asyncio.sleep(0.05)  # the worker holds it; the queue is empty again
        queued = await client.post("/v1/predictions:async", json=OTHER_REQUEST)
        new = await client.post("/v1/predictions:async", json=OTHER_REQUEST)
        retry = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        gate.opened.set()
        for submitted in (first, queued):
            assert (await answered(client, submitted.json()["status_url"])).status_code == 200
    assert [first.status_code, queued.status_code, new.status_code] == [202, 202, 503]
    assert retry.status_code == 202
    assert retry.json()["prediction_id"] == first.json()["prediction_id"]


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "tab\tinside"], ids=["empty", "too-long", "control-character"]
)
async def test_an_unusable_idempotency_key_is_400_naming_the_header(tmp_path, key):
    async with gateway(audit_dir=tmp_path) as (app, client):
        response = await client.post(
            "/v1/predictions:async", json=CHURN_REQUEST, headers={"Idempotency-Key": key}
        )
        jobs: MemoryJobs = app.state.jobs
        assert jobs.queued == 0 and jobs.answered == 0
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["header"] for e in response.json()["errors"]] == ["Idempotency-Key"]
    assert audit_records(tmp_path) == []


class ClaimedMeanwhile:
    """Claims where another worker claims every key between this worker's look (free) and its
    own claim: the interleaving of two workers given the same key at the same moment."""

    def __init__(self, claims: Any, rival: str) -> None:
        self._claims, self.rival = claims, rival

    async def holder(self, scope: str) -> None:
        return None

    async def claim(self, scope: str, claim: Any) -> Any:
        from gateway.idempotency import Claim

        await asyncio.sleep(0.05)  # a claim takes a while (a file's does): workers are free
        await self._claims.claim(scope, Claim(self.rival, claim.fingerprint))
        return await self._claims.claim(scope, claim)

    async def release(self, scope: str, claim: Any) -> None:
        await self._claims.release(scope, claim)


async def test_a_job_whose_key_another_worker_claimed_meanwhile_never_runs(tmp_path):
    """Queued, then found to be a duplicate: it is withdrawn before any worker runs it, and
    leaves no trace; the caller gets the other worker's job."""
    rival = "9b2e7f0c-8a41-4d5e-9c3b-2f6a1d7e8b90"
    async with gateway(audit_dir=tmp_path) as (app, client):
        jobs: MemoryJobs = app.state.jobs
        jobs._claims = ClaimedMeanwhile(jobs._claims, rival)
        response = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        await asyncio.sleep(0.2)  # a worker has taken the withdrawn job off the queue by now
        queued, answered_jobs, pending = jobs.queued, jobs.answered, dict(jobs._pending)
    assert response.status_code == 202
    assert response.json()["prediction_id"] == rival
    assert response.headers["idempotent-replayed"] == "true"
    assert (queued, answered_jobs, pending) == (0, 0, {})
    assert audit_records(tmp_path) == []


async def test_workers_of_one_gateway_share_their_keys(tmp_path):
    """A retry that reaches another worker (`aigw serve --workers N`) is a replay there too."""
    shared = {"workers_dir": tmp_path / "workers"}
    shared["workers_dir"].mkdir()  # the supervisor makes it before starting its workers
    async with (
        gateway(audit_dir=tmp_path / "a", **shared) as (_, one),
        gateway(audit_dir=tmp_path / "b", **shared) as (_, two),
    ):
        first = await one.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        retry = await two.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        reused = await two.post("/v1/predictions:async", json=OTHER_REQUEST, headers=KEY)
        await answered(one, first.json()["status_url"])
    assert first.status_code == retry.status_code == 202
    assert retry.json()["prediction_id"] == first.json()["prediction_id"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert reused.status_code == 422
    assert audit_records(tmp_path / "b") == [] and len(audit_records(tmp_path / "a")) == 1


async def test_keys_that_cannot_be_checked_queue_nothing_and_say_503(tmp_path):
    """The workers' key file cannot be opened (here: a directory stands where it should be):
    a submit with a key is 503 `jobs-unavailable` and queues nothing; one without a key runs."""
    workers = tmp_path / "workers"
    (workers / "idempotency.sqlite").mkdir(parents=True)
    async with gateway(audit_dir=tmp_path / "audit", workers_dir=workers) as (app, client):
        refused = await client.post("/v1/predictions:async", json=CHURN_REQUEST, headers=KEY)
        jobs: MemoryJobs = app.state.jobs
        queued, answered_jobs = jobs.queued, jobs.answered
        plain = await client.post("/v1/predictions:async", json=CHURN_REQUEST)
        assert (await answered(client, plain.json()["status_url"])).status_code == 200
    assert refused.status_code == 503
    assert refused.json()["type"] == "urn:aigw:problem:jobs-unavailable"
    assert refused.headers["retry-after"] == "1"
    assert (queued, answered_jobs) == (0, 0)
    assert len(audit_records(tmp_path / "audit")) == 1


async def test_keys_hold_across_gateways_sharing_redis(redis_server, tmp_path):
    """With the Redis jobs backend the claim lives in Redis: a retry reaching another
    replica is a replay there, and a reuse is refused there."""
    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of this test alone
    redis = Redis.from_url(url)
    await redis.flushdb()
    shared = {"jobs_backend": "redis", "redis_url": url}
    key = {"Idempotency-Key": "0f8fad5b-d9cb-469f-a165-70867728950e"}
    async with (
        gateway(audit_dir=tmp_path / "a", **shared) as (_, one),
        gateway(audit_dir=tmp_path / "b", **shared) as (_, two),
    ):
        first = await one.post("/v1/predictions:async", json=CHURN_REQUEST, headers=key)
        retry = await two.post("/v1/predictions:async", json=CHURN_REQUEST, headers=key)
        reused = await two.post("/v1/predictions:async", json=OTHER_REQUEST, headers=key)
        pending = await two.get(first.json()["status_url"])
    entries = await redis.xlen("aigw:requests:customer-churn")
    await redis.flushdb()
    await redis.aclose()
    assert entries == 1
    assert first.status_code == retry.status_code == 202
    assert retry.json() == first.json() and retry.headers["idempotent-replayed"] == "true"
    assert reused.status_code == 422
    assert pending.status_code == 202  # queued once, waiting for an `aigw worker`


# ---- tenants sharing the queue --------------------------------------------------------------


async def test_a_tenant_over_its_share_of_the_queue_is_429_and_others_still_get_in(
    tenant_keys, tmp_path
):
    """acme fills its share: its next submit is 429 (its own backlog); globex is accepted."""
    path, auth = tenant_keys
    settings = {"keys_file": path, "audit_dir": tmp_path, "jobs_queue_max": 4, "jobs_workers": 1}
    async with gateway(**settings) as (app, client):
        gate = AuditGate(app, closed=True)

        async def submit(tenant: str) -> httpx.Response:
            response = await client.post(
                "/v1/predictions:async", json=CHURN_REQUEST, headers=auth[tenant]
            )
            await asyncio.sleep(0.02)  # let the worker take what it can
            return response

        acme = [await submit("acme") for _ in range(4)]  # one running, two waiting, one over
        globex = await submit("globex")
        gate.opened.set()
        for response in [*acme[:3], globex]:
            tenant = "globex" if response is globex else "acme"
            assert (await answered(client, response.json()["status_url"], auth[tenant])).is_success
    assert [r.status_code for r in acme] == [202, 202, 202, 429]
    refused = acme[3]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["type"] == "urn:aigw:problem:too-many-jobs-waiting"
    assert globex.status_code == 202
    assert len(audit_records(tmp_path)) == 4


async def test_a_tenants_job_does_not_wait_behind_another_tenants_backlog(tenant_keys, tmp_path):
    """One worker, acme's backlog of five waiting, then one globex job: globex's is answered
    second, not sixth."""
    path, auth = tenant_keys
    settings = {"keys_file": path, "audit_dir": tmp_path, "jobs_workers": 1}
    async with gateway(**settings) as (app, client):
        gate = AuditGate(app, closed=True)
        submitted = []
        for tenant in ["acme"] * 6 + ["globex"]:
            response = await client.post(
                "/v1/predictions:async", json=CHURN_REQUEST, headers=auth[tenant]
            )
            submitted.append((tenant, response.json()))
            await asyncio.sleep(0.01)
        gate.opened.set()
        for tenant, accepted in submitted:
            assert (await answered(client, accepted["status_url"], auth[tenant])).is_success
    order = [record["tenant"] for record in audit_records(tmp_path)]
    assert order == ["acme", "acme", "globex", "acme", "acme", "acme", "acme"]
