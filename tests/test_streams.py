"""The Redis Streams protocol: entry parsing, ids, keys, and the atomic scripts on a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import orjson
import pytest
from redis.exceptions import RedisError

from gateway import streams
from gateway.audit import AuditUnavailable
from gateway.cli import main
from gateway.contracts import load_contracts
from gateway.idempotency import IdempotencyKey, IdempotencyKeyReused, Submitted, idempotency_key
from gateway.jobs import Backpressure, Job, JobRejected
from gateway.streams import (
    GROUP,
    Delivery,
    StreamConfig,
    StreamJobs,
    StreamStore,
    dead_stream,
    derived_prediction_id,
    failed_key,
    failure_record,
    idempotency_claim_key,
    outcome_from,
    parse_entry,
    pending_key,
    request_stream,
    result_key,
    result_stream,
    stream_id,
)
from gateway.worker import StreamWorker, claim_interval_s, failure_action
from tests.conftest import CHURN_REQUEST, REPO

CONTRACTS = load_contracts(REPO / "contracts")
MODEL = "customer-churn"
BODY = orjson.dumps(CHURN_REQUEST)
PID = "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"
ENVELOPE = {"prediction": "stay", "probability": 0.2, "prediction_id": PID, "degraded": False}


def job_json(**changes: object) -> bytes:
    job = {"prediction_id": PID, "model_id": MODEL, "features": CHURN_REQUEST["features"]}
    job.update(changes)
    return orjson.dumps({k: v for k, v in job.items() if v is not ...})


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (request_stream("m1"), "aigw:requests:m1"),
        (result_stream("m1"), "aigw:results:m1"),
        (dead_stream("m1"), "aigw:dead:m1"),
        (result_key(PID), f"aigw:result:{PID}"),
        (pending_key(PID), f"aigw:pending:{PID}"),
        (GROUP, "aigw-workers"),
    ],
)
def test_key_names(key, expected):
    """Stream, record and group names are the documented ones."""
    assert key == expected


def test_a_derived_prediction_id_is_a_uuid_fixed_by_model_and_entry():
    """A redelivered entry keeps its derived id; another entry or model gets another."""
    first = derived_prediction_id(MODEL, "1700000000000-0")
    assert first == derived_prediction_id(MODEL, "1700000000000-0")
    assert str(uuid.UUID(first)) == first
    assert first != derived_prediction_id(MODEL, "1700000000000-1")
    assert first != derived_prediction_id("other-model", "1700000000000-0")


@pytest.mark.parametrize(
    ("fields", "prediction_id", "tenant"),
    [
        ({b"request": BODY}, derived_prediction_id(MODEL, "5-0"), "default"),
        ({b"request": BODY, b"prediction_id": PID.encode()}, PID, "default"),
        ({b"request": BODY, b"prediction_id": PID.upper().encode()}, PID, "default"),
        ({"request": BODY.decode(), "tenant": "acme"}, derived_prediction_id(MODEL, "5-0"), "acme"),
        ({b"job": job_json()}, PID, "default"),
        ({b"job": job_json(tenant="acme", timeout_ms=250)}, PID, "acme"),
    ],
)
def test_valid_entries_become_jobs(fields, prediction_id, tenant):
    """A `request` or `job` entry becomes the job it asks for, features made canonical."""
    job = parse_entry(CONTRACTS, MODEL, "5-0", fields)
    assert (job.prediction_id, job.tenant, job.model_id) == (prediction_id, tenant, MODEL)
    assert job.features == {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99}


def test_a_job_survives_the_round_trip_through_its_json():
    """`Job.to_json()` as `submit` publishes it parses back to the same job."""
    job = Job(PID, MODEL, CHURN_REQUEST["features"], tenant="acme", request_id="r-1",
              trace_id="ab" * 16, callback_url="https://example.invalid/cb", timeout_ms=300,
              submitted_at=1700000000.5, headers={"x-customer-tier": "premium"})  # fmt: skip
    assert parse_entry(CONTRACTS, MODEL, "1-0", {b"job": job.to_json()}) == job


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Customer-Tier": "premium"}, {"x-customer-tier": "premium"}),
        ({"x-a": "1", "content-type": "text/plain"}, {"x-a": "1"}),  # routes read x- only
        ({"x-api-key": "secret"}, {}),  # never offered to route conditions
        ({"x-long": "v" * 1000}, {"x-long": "v" * 256}),
        ({}, {}),
    ],
)
def test_an_entrys_headers_are_the_ones_routes_read_over_http(headers, expected):
    """A stream entry may carry the request's headers; routes see what HTTP would give them."""
    fields = {b"request": BODY, b"headers": orjson.dumps(headers)}
    assert parse_entry(CONTRACTS, MODEL, "5-0", fields).headers == expected
    assert parse_entry(CONTRACTS, MODEL, "5-0", {b"job": job_json(headers=headers)}).headers == (
        expected
    )


def features(**changes: object) -> bytes:
    return orjson.dumps({"model_id": MODEL, "features": {**CHURN_REQUEST["features"], **changes}})


@pytest.mark.parametrize(
    ("fields", "pointer"),
    [
        ({}, "/request"),
        ({b"other": b"x"}, "/request"),
        ({b"request": b"not json"}, "/request"),
        ({b"request": b""}, "/request"),
        ({b"request": b"\xff\xfe"}, "/request"),
        ({b"request": b'{"model_id": "customer-churn", "model_id": "x"}'}, "/request"),
        ({b"request": b"[" * 40 + b"]" * 40}, "/request"),
        ({b"request": b'"' + b"x" * 70_000 + b'"'}, "/request"),
        ({b"request": b"[]"}, "/request"),
        ({b"request": b'{"features": {}}'}, "/request/model_id"),
        ({b"request": b'{"model_id": "nope", "features": {}}'}, "/request/model_id"),
        ({b"request": features(tenure_months=-1)}, "/request/features/tenure_months"),
        ({b"request": features(monthly_charges="x")}, "/request/features/monthly_charges"),
        ({b"request": features(colour="red")}, "/request/features"),
        ({b"request": BODY, b"prediction_id": b"not-a-uuid"}, "/prediction_id"),
        ({b"request": BODY, b"tenant": b"a b"}, "/tenant"),
        ({b"request": BODY, b"tenant": b""}, "/tenant"),
        ({b"job": b"{"}, "/job"),
        ({b"job": b"[1]"}, "/job"),
        ({b"job": job_json(prediction_id=...)}, "/job/prediction_id"),
        ({b"job": job_json(prediction_id=7)}, "/job/prediction_id"),
        ({b"job": job_json(timeout_ms=-3)}, "/job/timeout_ms"),
        ({b"job": job_json(timeout_ms=True)}, "/job/timeout_ms"),
        ({b"job": job_json(request_id=5)}, "/job/request_id"),
        ({b"job": job_json(tenant=["a"])}, "/job/tenant"),
        ({b"job": job_json(model_id="nope")}, "/job/model_id"),
        ({b"job": job_json(features={"tenure_months": 1})}, "/job/features"),
        ({b"request": BODY, b"headers": b"not json"}, "/headers"),
        ({b"request": BODY, b"headers": b'["x-a"]'}, "/headers"),
        ({b"request": BODY, b"headers": b'{"x-a": 1}'}, "/headers"),
        ({b"job": job_json(headers="x-a: 1")}, "/job/headers"),
        ({b"job": job_json(headers={"x-a": None})}, "/job/headers"),
    ],
)
def test_invalid_entries_are_rejected_naming_the_field(fields, pointer):
    """Anything unparsable or off-contract is a JobRejected whose error names the field."""
    with pytest.raises(JobRejected) as caught:
        parse_entry(CONTRACTS, MODEL, "5-0", fields)
    document = caught.value.to_dict()
    assert document["detail"]
    assert any(e["pointer"].startswith(pointer) for e in document["errors"]), document


def test_an_entry_on_another_models_stream_is_rejected():
    """A request for model A published on model B's stream is refused, not served as B."""
    with pytest.raises(JobRejected) as caught:
        parse_entry(CONTRACTS, "other-model", "5-0", {b"request": BODY})
    assert caught.value.errors[0].pointer == "/request/model_id"


@pytest.mark.parametrize(
    ("error", "deliveries", "action"),
    [
        (AuditUnavailable("disk full"), 1, "retry"),
        (AuditUnavailable("disk full"), 99, "retry"),
        (ConnectionError("redis away"), 99, "retry"),
        (TimeoutError(), 99, "retry"),
        (KeyError("customer-churn"), 1, "retry"),
        (KeyError("customer-churn"), 4, "retry"),
        (KeyError("customer-churn"), 5, "dead"),
        (ValueError("bug"), 6, "dead"),
    ],
)
def test_what_a_failed_attempt_leads_to(error, deliveries, action):
    """Infrastructure failures are retried forever; others dead-letter at the 5th delivery."""
    assert failure_action(error, deliveries, max_attempts=5) == action


@pytest.mark.parametrize(
    ("idle_ms", "interval_s"), [(100, 0.5), (2000, 1.0), (30_000, 10.0), (600_000, 10.0)]
)
def test_how_often_abandoned_entries_are_looked_for(idle_ms, interval_s):
    """The claim scan runs about twice per claim timeout, between 0.5 s and 10 s apart."""
    assert claim_interval_s(idle_ms) == interval_s


FAILED = failure_record("acme", {"detail": "failed 3 times; last error: KeyError()"})


@pytest.mark.parametrize(
    ("stored", "pending", "failed", "expected"),
    [
        (None, None, None, None),
        (None, b'{"tenant": "acme"}', None, ("pending", "acme", None)),
        (orjson.dumps({"tenant": "acme", "envelope": ENVELOPE}), None, None,
         ("done", "acme", ENVELOPE)),
        (orjson.dumps({"tenant": "t", "envelope": ENVELOPE}), b'{"tenant":"t"}', None,
         ("done", "t", ENVELOPE)),
        (None, None, FAILED, ("failed", "acme", None)),
        # A slow worker answered after another gave the entry up: the answer is what counts.
        (orjson.dumps({"tenant": "acme", "envelope": ENVELOPE}), None, FAILED,
         ("done", "acme", ENVELOPE)),
    ],
)  # fmt: skip
def test_outcome_from_the_stored_keys(stored, pending, failed, expected):
    """A stored result wins over the pending and failed markers; none means an unknown id."""
    outcome = outcome_from(PID, stored, pending, failed)
    if expected is None:
        assert outcome is None
    else:
        assert (outcome.status, outcome.tenant, outcome.envelope) == expected


def test_a_failure_record_keeps_the_tenant_and_a_bounded_reason():
    record = orjson.loads(failure_record("acme", {"detail": "x" * 5000, "errors": []}))
    assert record["tenant"] == "acme" and record["reason"] == "x" * 2000


@pytest.mark.parametrize(
    ("a", "b"), [("1-0", "1-1"), ("9-5", "10-0"), ("1700000000000-9", "1700000000000-10")]
)
def test_stream_ids_compare_as_numbers(a, b):
    """`9-5` comes before `10-0`: ids are compared numerically, not as text."""
    assert stream_id(a) < stream_id(b)


# ---- against a real redis-server -------------------------------------------------------------


@pytest.fixture
async def store(redis_server):
    store = StreamStore(redis_server.url, StreamConfig(max_backlog=3, result_ttl_s=60))
    yield store
    await store.close()


@pytest.fixture
def model_id() -> str:
    return f"model-{uuid.uuid4().hex[:8]}"  # streams of this test alone


async def publish(store: StreamStore, model_id: str, count: int) -> list[str]:
    return [
        (await store.redis.xadd(request_stream(model_id), {"request": BODY})).decode()
        for _ in range(count)
    ]


async def test_two_stores_of_one_prediction_id_make_one_result_and_ack_both(store, model_id):
    """The exactly-once script: the second store of an id only acknowledges its entry."""
    await store.ensure_group(model_id)
    await publish(store, model_id, 2)
    entries = await store.read(model_id, "c1", 10, None)
    job = Job(PID, model_id, {}, tenant="acme")
    first = await store.store_result(job, ENVELOPE, entries[0].entry_id, "c1")
    second = await store.store_result(
        job, {**ENVELOPE, "prediction": "churn"}, entries[1].entry_id, "c1"
    )
    assert (first, second) == (True, False)
    results = await store.redis.xrange(result_stream(model_id))
    assert len(results) == 1
    fields = results[0][1]
    assert fields[b"prediction_id"] == PID.encode() and fields[b"tenant"] == b"acme"
    assert orjson.loads(fields[b"envelope"])["prediction"] == "stay"
    assert fields[b"entry_id"] == entries[0].entry_id.encode()
    assert (await store.redis.xpending(request_stream(model_id), GROUP))["pending"] == 0
    outcome = await store.outcome(PID)
    assert (outcome.status, outcome.tenant, outcome.envelope["prediction"]) == (
        "done",
        "acme",
        "stay",
    )
    assert 0 < await store.redis.ttl(result_key(PID)) <= 60
    await store.redis.delete(result_key(PID))


async def test_submit_refuses_at_the_backlog_bound_and_keeps_what_it_took(store, model_id):
    """Over `max_backlog` waiting entries submit raises Backpressure; nothing is trimmed."""
    await store.ensure_group(model_id)
    jobs = [Job(str(uuid.uuid4()), model_id, {}) for _ in range(4)]
    for job in jobs[:3]:
        await store.submit(job)
    with pytest.raises(Backpressure):
        await store.submit(jobs[3])
    assert await store.redis.xlen(request_stream(model_id)) == 3
    known = [(await store.outcome(j.prediction_id)) is not None for j in jobs]
    assert known == [True, True, True, False]
    assert (await store.outcome(jobs[0].prediction_id)).status == "pending"
    # Delivered but unacknowledged entries still count; acknowledged ones free their place.
    delivered = await store.read(model_id, "c1", 2, None)
    with pytest.raises(Backpressure):
        await store.submit(jobs[3])
    await store.ack(model_id, delivered[0].entry_id)
    await store.submit(jobs[3])
    assert await store.backlog(model_id) == (2, 1)  # (not yet delivered, delivered unacked)


async def test_submit_counts_every_entry_before_any_worker_made_the_group(store, model_id):
    """Without a consumer group (no worker yet) every entry in the stream is backlog."""
    for _ in range(3):
        await store.submit(Job(str(uuid.uuid4()), model_id, {}))
    with pytest.raises(Backpressure):
        await store.submit(Job(str(uuid.uuid4()), model_id, {}))


async def test_a_dead_letter_is_written_and_acknowledged_at_once(store, model_id):
    """The dead-letter stream gets the entry, its error and attempts, once; it is acked."""
    await store.ensure_group(model_id)
    await publish(store, model_id, 1)
    [delivery] = await store.read(model_id, "c1", 10, None)
    error = {"detail": "bad", "errors": [{"pointer": "/request", "detail": "is not JSON"}]}
    assert await store.dead_letter(model_id, delivery, error, "c1")
    assert not await store.dead_letter(model_id, delivery, error, "c2")  # settled already
    [(_, fields)] = await store.redis.xrange(dead_stream(model_id))
    assert orjson.loads(fields[b"error"]) == error
    assert orjson.loads(fields[b"entry"]) == {"request": BODY.decode()}
    assert fields[b"entry_id"] == delivery.entry_id.encode() and fields[b"attempts"] == b"1"
    assert (await store.redis.xpending(request_stream(model_id), GROUP))["pending"] == 0
    assert not await store.redis.keys("aigw:failed:*")  # no job parsed from it: none failed


async def test_a_dead_lettered_job_reads_as_failed_never_as_unknown(store, model_id):
    """A job given up on turns from pending into failed in the same step, for its tenant."""
    await store.ensure_group(model_id)
    pid = str(uuid.uuid4())
    job = Job(pid, model_id, {}, tenant="acme")
    await store.submit(job)
    assert (await store.outcome(pid)).status == "pending"
    [delivery] = await store.read(model_id, "c1", 10, None)
    error = {"detail": "failed 3 times; last error: RuntimeError('boom')", "errors": []}
    assert await store.dead_letter(model_id, delivery, error, "c1", job)
    outcome = await store.outcome(pid)
    assert (outcome.status, outcome.tenant, outcome.envelope) == ("failed", "acme", None)
    assert "boom" in outcome.reason
    assert await store.redis.ttl(failed_key(pid)) > 0  # kept as long as a result would be
    assert not await store.redis.exists(pending_key(pid))


async def consumer_names(store: StreamStore, model_id: str) -> list[str]:
    consumers = await store.redis.xinfo_consumers(request_stream(model_id), GROUP)
    return sorted(c["name"].decode() for c in consumers)


async def test_consumers_holding_nothing_are_forgotten_and_holders_kept(store, model_id):
    """Restarts leave consumers behind; those with no pending entry go, the others stay."""
    await store.ensure_group(model_id)
    await publish(store, model_id, 2)
    [answered] = await store.read(model_id, "answered-all", 1, None)
    await store.ack(model_id, answered.entry_id)
    [held] = await store.read(model_id, "holds-one", 1, None)
    await store.redis.xgroup_createconsumer(request_stream(model_id), GROUP, "got-nothing")
    assert await store.forget_consumers(model_id, idle_ms=3_600_000) == 0  # all active now
    assert await store.forget_consumers(model_id, idle_ms=3_600_000, also="got-nothing") == 1
    assert await consumer_names(store, model_id) == ["answered-all", "holds-one"]
    assert await store.forget_consumers(model_id, idle_ms=0, also="holds-one") == 1
    assert await consumer_names(store, model_id) == ["holds-one"]
    pending = await store.redis.xpending_range(request_stream(model_id), GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [held.entry_id]  # still claimable


async def test_claiming_takes_over_idle_entries_with_their_delivery_counts(redis_server, model_id):
    """XAUTOCLAIM hands a dead consumer's entries to another, counting each delivery."""
    store = StreamStore(redis_server.url, StreamConfig(claim_idle_ms=100))
    try:
        await store.ensure_group(model_id)
        ids = await publish(store, model_id, 3)
        await store.read(model_id, "dead-consumer", 10, None)
        cursor, none_yet = await store.claim(model_id, "alive", 10, "0-0")
        assert none_yet == []
        await asyncio.sleep(0.15)
        cursor, claimed = await store.claim(model_id, "alive", 10, "0-0")
        assert [d.entry_id for d in claimed] == ids and {d.deliveries for d in claimed} == {2}
        assert cursor == "0-0"
        await asyncio.sleep(0.15)
        _, again = await store.claim(model_id, "alive", 10, "0-0")
        assert {d.deliveries for d in again} == {3}
    finally:
        await store.close()


@pytest.fixture
async def churn_store(redis_server):
    """A store on the churn model's own streams (a worker serves a model of the policies),
    emptied before and after."""
    config = StreamConfig(claim_idle_ms=100, max_attempts=3, result_ttl_s=60)
    store = StreamStore(redis_server.url, config)
    streams = (request_stream(MODEL), dead_stream(MODEL), result_stream(MODEL))
    await store.redis.delete(*streams)
    await store.ensure_group(MODEL)
    yield store
    await store.redis.delete(*streams)
    await store.close()


async def delivered_before(store: StreamStore, job: Job, times: int) -> str:
    """Submit the job and leave it pending as though `times` workers had each taken it and
    died running it: delivered that often, never acknowledged."""
    entry_id = (await store.submit(job)).entry_id
    await store.read(MODEL, "died", 10, None)
    await store.redis.xclaim(
        request_stream(MODEL), GROUP, "died", 0, [entry_id], retrycount=times, justid=True
    )
    return entry_id


async def until(condition, within_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize(("earlier", "status"), [(2, "done"), (3, "failed")])
async def test_an_entry_that_never_finished_max_attempts_is_dead_lettered_unrun(
    churn_store, offline_runtime, earlier, status
):
    """A poison entry kills every worker that runs it, so no failure is ever counted: once
    `max_attempts` (3) deliveries ended without an outcome, the next worker to claim it
    dead-letters it instead of running it (and dying too). Fewer, and it runs again."""
    job = Job(str(uuid.uuid4()), MODEL, CHURN_REQUEST["features"], tenant="acme")
    entry_id = await delivered_before(churn_store, job, earlier)
    worker = StreamWorker(offline_runtime, churn_store, MODEL, "survivor")
    await worker.start()
    try:
        keys = (failed_key(job.prediction_id), result_key(job.prediction_id))
        settled = await until(lambda: churn_store.redis.exists(*keys))
    finally:
        await worker.stop()
    assert settled
    assert (await churn_store.outcome(job.prediction_id)).status == status
    assert (await churn_store.redis.xpending(request_stream(MODEL), GROUP))["pending"] == 0
    dead = await churn_store.redis.xrange(dead_stream(MODEL))
    if status == "done":
        assert dead == [] and worker.counts["answered"] == 1
        return
    [(_, fields)] = dead
    assert fields[b"entry_id"] == entry_id.encode() and fields[b"attempts"] == b"4"
    assert orjson.loads(fields[b"error"])["detail"].startswith(
        "delivered 3 times without an outcome"
    )
    assert worker.counts == {"dead": 1}
    assert offline_runtime.audit.written == 0  # it never ran


async def test_an_outage_gives_its_delivery_back(churn_store, offline_runtime):
    """An attempt that failed because the audit log (or Redis) was down is no attempt: its
    delivery is given back, so an outage however long never dead-letters an entry as one
    that never finished. A delivery another consumer has claimed since is left alone."""
    job = Job(str(uuid.uuid4()), MODEL, CHURN_REQUEST["features"], tenant="acme")
    entry_id = await delivered_before(churn_store, job, 3)
    await asyncio.sleep(0.15)  # idle past the claim timeout
    _, [delivery] = await churn_store.claim(MODEL, "survivor", 10, "0-0")
    worker = StreamWorker(offline_runtime, churn_store, MODEL, "survivor")
    outcome = await worker._failed(delivery, job, AuditUnavailable("the disk is full"))

    async def times_delivered() -> int:
        rows = await churn_store.redis.xpending_range(request_stream(MODEL), GROUP, "-", "+", 1)
        return int(rows[0]["times_delivered"])

    assert (delivery.deliveries, outcome, await times_delivered()) == (4, "retry", 3)
    assert not await churn_store.give_back_delivery(MODEL, delivery, "survivor")  # count moved
    await churn_store.redis.xclaim(request_stream(MODEL), GROUP, "other", 0, [entry_id])
    taken = Delivery(entry_id, {}, 4)
    assert not await churn_store.give_back_delivery(MODEL, taken, "survivor")
    assert await times_delivered() == 4


async def test_holding_entries_restarts_their_idle_time_only_for_their_holder(
    redis_server, model_id
):
    """`hold` keeps the entries a consumer is running from looking abandoned: their idle
    time restarts and their delivery count stays; an entry another consumer took over in the
    meantime stays that consumer's, and an acknowledged one is not brought back."""
    store = StreamStore(redis_server.url, StreamConfig(claim_idle_ms=100))
    stream = request_stream(model_id)
    try:
        await store.ensure_group(model_id)
        taken, answered, running = await publish(store, model_id, 3)
        await store.read(model_id, "holder", 10, None)
        await asyncio.sleep(0.15)  # all three idle past the claim timeout
        _, [claimed] = await store.claim(model_id, "other", 1, "0-0")
        assert claimed.entry_id == taken
        await store.ack(model_id, answered)
        assert await store.hold(model_id, "holder", [taken, answered, running]) == 1
        rows = await store.redis.xpending_range(stream, GROUP, "-", "+", 10)
        pending = {
            r["message_id"].decode(): (r["consumer"].decode(), r["times_delivered"]) for r in rows
        }
        assert pending == {taken: ("other", 2), running: ("holder", 1)}
        assert all(r["time_since_delivered"] < 100 for r in rows)
        assert (await store.claim(model_id, "third", 10, "0-0"))[1] == []  # none looks idle
    finally:
        await store.close()


def stall_first_record(monkeypatch, runtime) -> asyncio.Event:
    """The first job's audit record waits until the event is set (a chain near its budget, a
    stalled disk: a job running past the claim timeout); later jobs' records go at once."""
    append, first = runtime.audit.append, [True]

    async def stalling(record, **options):
        if first.pop() if first else False:
            await release.wait()
        return await append(record, **options)

    release = asyncio.Event()
    monkeypatch.setattr(runtime.audit, "append", stalling)
    return release


async def in_flight(worker: StreamWorker, entry_id: str) -> bool:
    return entry_id in worker._inflight


async def test_a_job_running_past_the_claim_timeout_is_neither_taken_over_nor_counted_again(
    churn_store, offline_runtime, monkeypatch
):
    """While its job runs for ten claim timeouts (100 ms each), the worker running it keeps
    its entry: a second worker, free and claiming, never takes it over (it runs once, and is
    answered by the worker that took it), and its delivery count stays 1, so `max_attempts`
    counts attempts, not seconds of running."""
    release = stall_first_record(monkeypatch, offline_runtime)
    job = Job(str(uuid.uuid4()), MODEL, CHURN_REQUEST["features"], tenant="acme")
    entry_id = (await churn_store.submit(job)).entry_id
    running = StreamWorker(offline_runtime, churn_store, MODEL, "running")
    other = StreamWorker(offline_runtime, churn_store, MODEL, "other")
    await running.start()
    try:
        assert await until(lambda: in_flight(running, entry_id))
        await other.start()
        for _ in range(10):
            await asyncio.sleep(0.1)
            rows = await churn_store.redis.xpending_range(
                request_stream(MODEL), GROUP, "-", "+", 10
            )
            held = [(r["consumer"], r["times_delivered"]) for r in rows]
            assert held == [(b"running", 1)], held
        release.set()
        assert await until(lambda: churn_store.redis.exists(result_key(job.prediction_id)))
    finally:
        release.set()
        await other.stop()
        await running.stop()
    [(_, fields)] = await churn_store.redis.xrange(result_stream(MODEL))
    assert fields[b"consumer"] == b"running" and fields[b"entry_id"] == entry_id.encode()
    assert offline_runtime.audit.written == 1  # run once
    assert running.counts == {"answered": 1} and other.counts == {}
    assert await churn_store.redis.xlen(dead_stream(MODEL)) == 0
    assert (await churn_store.outcome(job.prediction_id)).status == "done"


async def test_an_entry_no_longer_running_is_claimable_after_the_claim_timeout(
    churn_store, offline_runtime, monkeypatch
):
    """The hold lasts as long as a live worker runs the job, a stop's wait for the jobs in
    flight included: once it no longer does (the job cut off at the stop's deadline here; a
    killed process stops holding alike), another consumer claims the entry soon after the
    claim timeout (0.1 s), as its second delivery."""
    release = stall_first_record(monkeypatch, offline_runtime)
    job = Job(str(uuid.uuid4()), MODEL, CHURN_REQUEST["features"], tenant="acme")
    entry_id = (await churn_store.submit(job)).entry_id
    worker = StreamWorker(offline_runtime, churn_store, MODEL, "cut-off")
    await worker.start()
    stopping = None
    try:
        assert await until(lambda: in_flight(worker, entry_id))
        stopping = asyncio.create_task(worker.stop(timeout_s=1.0))  # waits for the job 1 s
        for _ in range(8):  # eight claim timeouts while the job runs and the stop waits
            await asyncio.sleep(0.1)
            assert (await churn_store.claim(MODEL, "other", 10, "0-0"))[1] == []
    finally:
        await (stopping if stopping is not None else worker.stop(timeout_s=0.01))
        release.set()
    let_go = time.monotonic()  # the job was cut off; its entry stays pending
    claimed: list[Delivery] = []
    while not claimed and time.monotonic() - let_go < 2:
        await asyncio.sleep(0.02)
        _, claimed = await churn_store.claim(MODEL, "other", 10, "0-0")
    waited_s = time.monotonic() - let_go
    assert [(d.entry_id, d.deliveries) for d in claimed] == [(entry_id, 2)]
    assert waited_s < 0.5, waited_s  # the claim timeout after the last hold, and a turn
    assert offline_runtime.audit.written == 0 and worker.counts == {}


class LateSubmit:
    """A TCP proxy in front of the real redis-server that holds back one exchange, the first
    request carrying `marker` (the submit): either its reply (the submit runs, and its answer
    comes after the client's timeout) or the request itself (it lands after the client gave
    up on it). Everything else passes at once."""

    def __init__(self, redis_port: int, marker: bytes, hold: str, delay_s: float) -> None:
        self.redis_port, self.marker, self.hold, self.delay_s = redis_port, marker, hold, delay_s
        self._seen = False
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _carry(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.redis_port)
        hold_reply = asyncio.Event()
        await asyncio.gather(
            self._requests(client_in, server_out, hold_reply),
            self._replies(server_in, client_out, hold_reply),
            return_exceptions=True,
        )

    async def _requests(self, source, sink, hold_reply: asyncio.Event) -> None:
        try:
            while data := await source.read(65536):
                if self.marker in data and not self._seen:
                    self._seen = True
                    if self.hold == "requests":
                        await asyncio.sleep(self.delay_s)
                    else:
                        hold_reply.set()
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def _replies(self, source, sink, hold_reply: asyncio.Event) -> None:
        try:
            while data := await source.read(65536):
                if hold_reply.is_set():
                    hold_reply.clear()
                    await asyncio.sleep(self.delay_s)
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.mark.parametrize("hold", ["replies", "requests"])
async def test_a_submit_whose_reply_is_lost_is_either_accepted_or_withdrawn(
    redis_server, model_id, monkeypatch, hold
):
    """A submit times out. If it ran (its reply was late), the job is queued and will be
    answered: the submit succeeds, so the caller gets its id rather than a 503 whose retry
    would make a second job. If it had not run (the request was late), it is withdrawn: the
    503 is true, since the submit adds nothing when it lands after all."""
    monkeypatch.setattr(streams, "REDIS_TIMEOUT_S", 0.3)  # so the test waits little
    job = Job(str(uuid.uuid4()), model_id, CHURN_REQUEST["features"], tenant="acme")
    proxy = LateSubmit(redis_server.port, job.prediction_id.encode(), hold, delay_s=0.8)
    jobs = StreamJobs(await proxy.start(), StreamConfig(result_ttl_s=60))
    await jobs.store.redis.script_load(streams.SUBMIT)  # the held request is the submit itself
    try:
        if hold == "replies":
            await jobs.submit(job)  # accepted after all: no error
        else:
            with pytest.raises(RedisError):
                await jobs.submit(job)
        await asyncio.sleep(1.0)  # whatever was held back has landed
        entries = await jobs.store.redis.xlen(request_stream(model_id))
        outcome = await jobs.store.outcome(job.prediction_id)
    finally:
        await jobs.close()
        await proxy.close()
    if hold == "replies":
        assert (entries, outcome.status, outcome.tenant) == (1, "pending", "acme")
    else:
        assert (entries, outcome) == (0, None)


# ---- idempotency keys -------------------------------------------------------------------------


def retried(model_id: str) -> Job:
    """A new job (its own prediction id) for the same request, as a caller's retry makes."""
    return Job(str(uuid.uuid4()), model_id, CHURN_REQUEST["features"], tenant="acme")


def new_key(request: dict | None = None) -> IdempotencyKey:
    asked = request or {"model_id": MODEL, "features": CHURN_REQUEST["features"]}
    return idempotency_key(str(uuid.uuid4()), tenant="acme", request=asked)


async def test_a_claimed_key_replays_its_job_and_adds_nothing(store, model_id):
    """The claim is made with the job, in one script; a retry gets the first job's id, a
    reuse for another request is refused; the claim lives as long as results do."""
    key = new_key()
    first, retry = retried(model_id), retried(model_id)
    queued = await store.submit(first, key)
    replayed = await store.submit(retry, key)
    with pytest.raises(IdempotencyKeyReused):
        reused = IdempotencyKey(key.scope, fingerprint="of another request")
        await store.submit(retried(model_id), reused)
    assert (queued.prediction_id, queued.replayed, queued.entry_id is not None) == (
        first.prediction_id, False, True,
    )  # fmt: skip
    assert replayed == Submitted(first.prediction_id, replayed=True)
    assert await store.redis.xlen(request_stream(model_id)) == 1
    assert await store.outcome(retry.prediction_id) is None  # the retry's own id: nothing
    assert 0 < await store.redis.ttl(idempotency_claim_key(key.scope)) <= 60


async def test_a_retry_is_replayed_even_at_the_backlog_bound(store, model_id):
    """A full backlog refuses new jobs, never the retry of an accepted one."""
    key = new_key()
    first = retried(model_id)
    await store.submit(first, key)
    for _ in range(2):
        await store.submit(Job(str(uuid.uuid4()), model_id, {}))
    with pytest.raises(Backpressure):
        await store.submit(Job(str(uuid.uuid4()), model_id, {}))
    replayed = await store.submit(retried(model_id), key)
    assert replayed == Submitted(first.prediction_id, replayed=True)


@pytest.mark.parametrize("settle", ["answers", "silent"])
@pytest.mark.parametrize("hold", ["replies", "requests"])
async def test_a_retry_after_a_lost_submit_reply_is_one_job(
    redis_server, model_id, monkeypatch, hold, settle
):
    """Whatever happened to the first submit (ran with its reply lost, or landed late), and
    whether or not Redis could then say which (`silent`: the settle check fails too, so the
    caller got a 503 whose outcome was unknown), a retry with the same key makes one job in
    all, under the id of whichever submit ran."""
    monkeypatch.setattr(streams, "REDIS_TIMEOUT_S", 0.3)
    if settle == "silent":

        async def cannot_tell(self, prediction_id):
            raise TimeoutError  # stands in for Redis not answering the settle check in time

        monkeypatch.setattr(StreamStore, "accepted_after_all", cannot_tell)
    key = new_key()
    first = retried(model_id)
    proxy = LateSubmit(redis_server.port, first.prediction_id.encode(), hold, delay_s=0.8)
    jobs = StreamJobs(await proxy.start(), StreamConfig(result_ttl_s=60))
    await jobs.store.redis.script_load(streams.SUBMIT)
    try:
        try:
            answer = await jobs.submit(first, key)
        except RedisError:
            answer = None  # the caller's 503
        await asyncio.sleep(1.0)  # whatever was held back has landed
        retry = await jobs.submit(retried(model_id), key)
        entries = await jobs.store.redis.xlen(request_stream(model_id))
    finally:
        await jobs.close()
        await proxy.close()
    assert entries == 1
    ran_first = hold == "replies" or settle == "silent"  # a late request runs unless withdrawn
    if ran_first:
        assert retry == Submitted(first.prediction_id, replayed=True)
    else:
        assert retry.prediction_id != first.prediction_id and not retry.replayed
    if hold == "replies" and settle == "answers":
        assert answer == Submitted(first.prediction_id)  # accepted after all, as before
    else:
        assert answer is None


async def test_trimming_drops_only_acknowledged_entries(store, model_id):
    """Entries still pending or undelivered survive trimming; acknowledged ones before go."""
    await store.ensure_group(model_id)
    ids = await publish(store, model_id, 250)
    delivered = await store.read(model_id, "c1", 200, None)
    for delivery in delivered[:150]:
        await store.ack(model_id, delivery.entry_id)
    await store.trim_acknowledged(model_id)
    remaining = [i.decode() for i, _ in await store.redis.xrange(request_stream(model_id))]
    assert set(ids[150:]) <= set(remaining)  # every unacknowledged entry is kept
    assert len(remaining) < 250  # approximate trimming dropped whole nodes of acked entries
    assert await store.backlog(model_id) == (50, 50)


# ---- `aigw worker`: start-up refusals --------------------------------------------------------


@pytest.fixture
def worker_env(monkeypatch, redis_server):
    """The repo's files and a Redis URL; the root logger is restored afterwards (the command
    points it at this test's captured stderr, which later tests must not write to)."""
    for name in ("CONTRACTS", "POLICIES", "FALLBACKS"):
        monkeypatch.setenv(f"AIGW_{name}_DIR", str(REPO / name.lower()))
    monkeypatch.setenv("AIGW_REDIS_URL", redis_server.url)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield monkeypatch
    root.handlers[:], root.level = handlers, level


def test_the_worker_needs_a_redis_url(worker_env, capsys):
    """Without AIGW_REDIS_URL `aigw worker` exits 2 saying what it needs."""
    worker_env.delenv("AIGW_REDIS_URL")
    assert main(["worker"]) == 2
    assert "AIGW_REDIS_URL" in capsys.readouterr().err


def test_the_worker_refuses_bad_files_listing_their_faults(worker_env, data_dirs, capsys):
    """A bad policy stops `aigw worker` at start with the faults listed, as for `serve`."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    policy.write_text(policy.read_text().replace("timeout_ms: 400", "timeout_ms: -5"))
    worker_env.setenv("AIGW_POLICIES_DIR", str(data_dirs / "policies"))
    assert main(["worker"]) == 1
    err = capsys.readouterr().err
    assert "customer-churn.yaml" in err and "timeout_ms" in err


def test_the_worker_refuses_a_model_without_a_policy(worker_env, capsys):
    """`--model` must name a logical model that has a policy."""
    assert main(["worker", "--model", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
