"""Stream workers against a real redis-server and a real Triton: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.audit import verify
from gateway.callbacks import CallbackSender
from gateway.demo.triton_process import TritonProcess, free_port
from gateway.jobs import Backpressure, Job
from gateway.policy import PolicySet
from gateway.runtime import (
    Configuration,
    audit_log,
    build_snapshot,
    load_configuration,
    start_runtime,
)
from gateway.shared_decisions import DECISION_PREFIX
from gateway.streams import (
    GROUP,
    StreamConfig,
    StreamJobs,
    StreamStore,
    dead_stream,
    derived_prediction_id,
    request_stream,
    result_stream,
)
from gateway.worker import CallbackDestination, StreamWorker, callback_destination
from tests.conftest import CHURN_REQUEST, REPO, settings_for

pytestmark = pytest.mark.triton

MODEL = "customer-churn"
REQUESTS = request_stream(MODEL)
RESULTS = result_stream(MODEL)
DEAD = dead_stream(MODEL)


@pytest.fixture
async def redis_db(redis_server) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    """Database 1 of the session's redis-server, emptied for this test."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = aioredis.from_url(url)
    await client.flushdb()
    yield url, client
    await client.flushdb()
    await client.aclose()


async def until(condition: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return await condition()


def body(i: int) -> dict:
    """A valid request; 700 distinct feature sets over the run (cache-friendly, as traffic is)."""
    features = {
        "customer_id": f"c{i % 100}",
        "tenure_months": i % 50,
        "monthly_charges": round((i % 7) * 10.5, 2),
    }
    return {"model_id": MODEL, "features": features}


@contextlib.asynccontextmanager
async def in_process_worker(
    redis_url: str,
    env: dict[str, str],
    config: StreamConfig,
    callbacks: CallbackDestination | None = None,
) -> AsyncIterator[StreamWorker]:
    """A StreamWorker on a runtime of its own, built as `aigw worker` builds it."""
    settings = settings_for(REPO, redis_url=redis_url)
    runtime = start_runtime(settings, load_configuration(settings, env), baselines={})
    runtime.audit = audit_log(settings)
    await runtime.audit.open()
    store = StreamStore(redis_url, config)
    worker = StreamWorker(runtime, store, MODEL, "test-worker", callbacks=callbacks)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        await store.close()
        await runtime.close()


async def pending_count(client: aioredis.Redis) -> int:
    return (await client.xpending(REQUESTS, GROUP))["pending"]


# ---- (a) two `aigw worker` processes, one SIGKILLed mid-run ------------------------------------


class WorkerProcess:
    """`aigw worker` in a child process, as operators run it."""

    def __init__(self, name: str, env: dict[str, str], root: Path) -> None:
        self.name = name
        self.audit_dir = root / f"audit-{name}"  # one audit writer per directory
        self._log = open(root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--consumer", name],
            cwd=REPO,
            env={**os.environ, **env, "AIGW_AUDIT_DIR": str(self.audit_dir)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def kill_while_holding_entries(client: aioredis.Redis, worker: WorkerProcess) -> set[str]:
    """SIGKILL `worker` at a moment it holds unacknowledged entries; their ids.

    The worker is frozen (SIGSTOP) before its pending list is read, so what is read is what
    it holds when killed: a worker that happened to have acknowledged everything between
    two reads is thawed and tried again, instead of being killed holding nothing. The list is
    read again once the worker is dead: a result it had sent just before the freeze may reach
    Redis after the first read, and that entry is then answered by the killed worker."""
    for _ in range(200):
        worker.proc.send_signal(signal.SIGSTOP)
        rows = await client.xpending_range(REQUESTS, GROUP, "-", "+", 1000, worker.name)
        if rows:
            worker.kill()
            await asyncio.sleep(0.1)  # what its socket still carried has been processed
            rows = await client.xpending_range(REQUESTS, GROUP, "-", "+", 1000, worker.name)
            return {row["message_id"].decode() for row in rows}
        worker.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError(f"{worker.name} never held an unacknowledged entry")


async def publish_mixed(client: aioredis.Redis, count: int) -> set[str]:
    """`count` requests in all three entry forms; returns every prediction id they must get."""
    expected: set[str] = set()
    for start in range(0, count, 1000):
        async with client.pipeline(transaction=False) as pipe:
            kinds = []
            for i in range(start, min(start + 1000, count)):
                if i % 4 == 0:  # a Job, as StreamJobs.submit writes it
                    job = Job(str(uuid.uuid4()), MODEL, body(i)["features"], tenant="acme")
                    pipe.xadd(REQUESTS, {"job": job.to_json()})
                    kinds.append(job.prediction_id)
                elif i % 4 == 1:  # a business system's request with its own id
                    prediction_id = str(uuid.uuid4())
                    pipe.xadd(REQUESTS, {"request": orjson.dumps(body(i)),
                                         "prediction_id": prediction_id})  # fmt: skip
                    kinds.append(prediction_id)
                else:  # a bare request: its id is derived from the entry id
                    pipe.xadd(REQUESTS, {"request": orjson.dumps(body(i))})
                    kinds.append(None)
            entry_ids = await pipe.execute()
        for entry_id, prediction_id in zip(entry_ids, kinds, strict=True):
            expected.add(prediction_id or derived_prediction_id(MODEL, entry_id.decode()))
    return expected


async def test_ten_thousand_requests_get_exactly_one_result_each_despite_a_sigkilled_worker(
    redis_db, triton: TritonProcess, tmp_path: Path
):
    """Two `aigw worker`s, one SIGKILLed mid-run: 10,000 requests, 10,000 distinct results."""
    url, client = redis_db
    count = 10_000
    await client.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
    expected = await publish_mixed(client, count)
    assert len(expected) == count
    env = {
        "AIGW_REDIS_URL": url,
        "AIGW_TRITON_URL": triton.http_url,
        "AIGW_WORKER_CLAIM_IDLE_MS": "2000",
        "AIGW_WORKER_CONCURRENCY": "64",
        "AIGW_LOG_LEVEL": "warning",
    }
    started = time.monotonic()
    workers = [WorkerProcess(f"worker-{n}", env, tmp_path) for n in range(2)]
    try:

        async def mid_run() -> bool:  # a quarter answered, and worker-0 holds entries
            pending = await _pending_of(client, "worker-0")
            return pending > 0 and await client.xlen(RESULTS) >= count // 4

        assert await until(mid_run, 60), "no progress"
        abandoned = await kill_while_holding_entries(client, workers[0])
        done_at_kill = await client.xlen(RESULTS)

        async def all_answered() -> bool:
            return await client.xlen(RESULTS) >= count and await pending_count(client) == 0

        assert await until(all_answered, 90), f"{await client.xlen(RESULTS)} results"
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)  # a late duplicate would land now
        entries = await client.xrange(RESULTS)
        ids = [fields[b"prediction_id"].decode() for _, fields in entries]
        assert len(entries) == count  # none duplicated
        assert set(ids) == expected  # none lost, none invented
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(REQUESTS)}
        assert groups[GROUP]["lag"] == 0 and groups[GROUP]["pending"] == 0
        assert await client.xlen(DEAD) == 0
        answered_by = {f[b"entry_id"].decode(): f[b"consumer"].decode() for _, f in entries}
        assert set(answered_by.values()) == {"worker-0", "worker-1"}
        # What the killed worker held unacknowledged, the survivor took over and answered.
        assert abandoned and {answered_by[entry_id] for entry_id in abandoned} == {"worker-1"}
        assert workers[1].stop() == 0  # SIGTERM: a clean stop
        assert verify(workers[1].audit_dir, None).ok
        print(
            f"\n10k stream jobs: {elapsed:.1f} s ({count / elapsed:.0f} jobs/s incl. start-up); "
            f"killed worker held {len(abandoned)} unacked entries, {done_at_kill} results done"
        )
    finally:
        for worker in workers:
            worker.stop()


async def _results_at_least(client: aioredis.Redis, n: int) -> bool:
    return await client.xlen(RESULTS) >= n


async def _pending_of(client: aioredis.Redis, consumer: str) -> int:
    """Entries delivered to `consumer` and not acknowledged (0 before it first reads)."""
    with contextlib.suppress(aioredis.ResponseError):
        for info in await client.xinfo_consumers(REQUESTS, GROUP):
            if info["name"].decode() == consumer:
                return int(info["pending"])
    return 0


# ---- (b) every model erroring: still a result --------------------------------------------------


async def test_a_request_is_answered_even_when_every_model_fails(redis_db):
    """With Triton unreachable the chain's rules or default answer: results, not dead letters."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    async with in_process_worker(url, env, StreamConfig()) as worker:
        for i in range(3):
            await client.xadd(REQUESTS, {"request": orjson.dumps(body(i))})
        assert await until(lambda: _results_at_least(client, 3), 20)
        entries = await client.xrange(RESULTS)
        envelopes = [orjson.loads(fields[b"envelope"]) for _, fields in entries]
        assert all(e["degraded"] for e in envelopes)
        assert {e["served_by"] for e in envelopes} <= {"rules", "default"}
        assert await client.xlen(DEAD) == 0 and await pending_count(client) == 0
        assert worker.counts["answered"] == 3


# ---- (c) malformed entries: dead letters naming the field --------------------------------------


MALFORMED = [
    ({"request": b"{not json"}, "/request"),
    ({"request": orjson.dumps({"model_id": "nope", "features": {}})}, "/request/model_id"),
    (
        {"request": orjson.dumps({"model_id": MODEL,
                                  "features": {**CHURN_REQUEST["features"], "tenure_months": -1}})},
        "/request/features/tenure_months",
    ),
    ({"request": orjson.dumps(CHURN_REQUEST), "prediction_id": "42"}, "/prediction_id"),
    ({"payload": b"{}"}, "/request"),
]  # fmt: skip


async def test_malformed_entries_become_dead_letters_naming_the_field(
    redis_db, triton: TritonProcess
):
    """Not JSON, unknown model, invalid feature, bad id, no request: dead letters, no retries."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": triton.http_url}
    async with in_process_worker(url, env, StreamConfig()) as worker:
        sent = {(await client.xadd(REQUESTS, fields)): (fields, pointer)
                for fields, pointer in MALFORMED}  # fmt: skip
        await client.xadd(REQUESTS, {"request": orjson.dumps(CHURN_REQUEST)})

        async def settled() -> bool:
            return await client.xlen(DEAD) == len(MALFORMED) and await client.xlen(RESULTS) == 1

        assert await until(settled, 20)
        for _, letter in await client.xrange(DEAD):  # concurrent jobs: in any order
            fields, pointer = sent[letter[b"entry_id"]]
            error = orjson.loads(letter[b"error"])
            assert error["detail"]
            assert any(e["pointer"] == pointer for e in error["errors"]), error
            copied = orjson.loads(letter[b"entry"])
            assert copied == {k: v if isinstance(v, str) else v.decode() for k, v in fields.items()}
        assert await pending_count(client) == 0  # acknowledged: never retried
        assert worker.counts["rejected"] == len(MALFORMED) and worker.counts["answered"] == 1
        sample = worker.runtime.metrics.exposition().decode()
        assert f'aigw_stream_dead_letters_total{{model="{MODEL}"}} {len(MALFORMED)}.0' in sample


# ---- (d) backpressure: refused beyond the bound, nothing lost -----------------------------------


async def test_submit_beyond_the_backlog_bound_raises_backpressure_and_loses_nothing(
    redis_db, triton: TritonProcess
):
    """Submits past the bound are refused; every accepted job is answered exactly once."""
    url, client = redis_db
    config = StreamConfig(max_backlog=50)
    settings = settings_for(REPO, redis_url=url)
    env = {"AIGW_TRITON_URL": triton.http_url}
    runtime = start_runtime(settings, load_configuration(settings, env), baselines={})
    runtime.audit = audit_log(settings)
    await runtime.audit.open()
    backend = StreamJobs(url, config)
    await backend.start(runtime)
    try:
        accepted = [Job(str(uuid.uuid4()), MODEL, body(i)["features"]) for i in range(50)]
        for job in accepted:
            await backend.submit(job)
        refused = Job(str(uuid.uuid4()), MODEL, body(50)["features"])
        with pytest.raises(Backpressure):
            await backend.submit(refused)
        assert await client.xlen(REQUESTS) == 50
        assert (await backend.outcome(accepted[0].prediction_id)).status == "pending"
        assert await backend.outcome(refused.prediction_id) is None

        workers = StreamJobs(url, config, run_workers=True)  # this process answers them
        await workers.start(runtime)
        try:
            assert await until(lambda: _results_at_least(client, 50), 30)
            outcomes = [await backend.outcome(job.prediction_id) for job in accepted]
            assert {o.status for o in outcomes} == {"done"}
            assert all(o.envelope["prediction_id"] == o.prediction_id for o in outcomes)
            await backend.submit(refused)  # room again once answered
            assert await until(lambda: _results_at_least(client, 51), 30)
        finally:
            await workers.close()
        ids = [f[b"prediction_id"].decode() for _, f in await client.xrange(RESULTS)]
        assert sorted(ids) == sorted(j.prediction_id for j in [*accepted, refused])
    finally:
        await backend.close()
        await runtime.close()


# ---- failures while running a job: retried, never lost ------------------------------------------


async def test_entries_wait_pending_while_the_audit_log_refuses_and_are_answered_after(redis_db):
    """AuditUnavailable leaves entries pending (no result, no dead letter) until it recovers."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    config = StreamConfig(claim_idle_ms=200, max_attempts=2)
    async with in_process_worker(url, env, config) as worker:
        await worker.runtime.audit.close()  # every append now raises AuditUnavailable
        for i in range(3):
            await client.xadd(REQUESTS, {"request": orjson.dumps(body(i))})

        async def retried() -> bool:
            return worker.counts["retry"] >= 6  # each entry tried at least twice

        assert await until(retried, 20)
        assert await pending_count(client) == 3
        assert await client.xlen(RESULTS) == 0 and await client.xlen(DEAD) == 0
        await worker.runtime.audit.open()
        assert await until(lambda: _results_at_least(client, 3), 20)
        assert await pending_count(client) == 0 and await client.xlen(DEAD) == 0


async def test_an_entry_failing_every_attempt_becomes_a_dead_letter_with_its_error(redis_db):
    """An unexpected error on every delivery dead-letters the entry after max_attempts."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    config = StreamConfig(claim_idle_ms=200, max_attempts=3)
    async with in_process_worker(url, env, config) as worker:
        # The contract still knows the model but no policy serves it: predict() fails.
        runtime = worker.runtime
        bare = Configuration(runtime.contracts, PolicySet({}, "none"), runtime.fallbacks)
        runtime.snapshot = build_snapshot(bare, runtime.metrics)
        entry_id = await client.xadd(REQUESTS, {"request": orjson.dumps(body(1))})
        assert await until(lambda: _dead_at_least(client, 1), 20)
        [(_, letter)] = await client.xrange(DEAD)
        assert letter[b"entry_id"] == entry_id and letter[b"attempts"] == b"3"
        assert "failed 3 times" in orjson.loads(letter[b"error"])["detail"]
        prediction_id = derived_prediction_id(MODEL, entry_id.decode())
        assert letter[b"prediction_id"] == prediction_id.encode()
        assert await pending_count(client) == 0 and await client.xlen(RESULTS) == 0
        assert worker.counts["retry"] == 2 and worker.counts["dead"] == 1
        outcome = await worker.store.outcome(prediction_id)  # what GET /v1/predictions/{id} reads
        assert outcome.status == "failed" and "failed 3 times" in outcome.reason


async def test_a_stopped_worker_leaves_the_consumer_group(redis_db):
    """Consumers are named per process: a worker that stops with nothing pending deletes its
    own, so restarts do not pile them up in the group."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}  # rules answer
    async with in_process_worker(url, env, StreamConfig()) as worker:
        await client.xadd(REQUESTS, {"request": orjson.dumps(body(1))})
        assert await until(lambda: _results_at_least(client, 1), 20)
        consumers = await client.xinfo_consumers(REQUESTS, GROUP)
        assert [c["name"] for c in consumers] == [worker.consumer.encode()]
    assert await client.xinfo_consumers(REQUESTS, GROUP) == []


async def _dead_at_least(client: aioredis.Redis, n: int) -> bool:
    return await client.xlen(DEAD) >= n


async def test_a_stopping_worker_finishes_what_it_took_and_takes_no_more(
    redis_db, triton: TritonProcess
):
    """Stop mid-stream: every entry read is answered and acked; the rest wait, undelivered."""
    url, client = redis_db
    env = {"AIGW_TRITON_URL": triton.http_url}
    async with in_process_worker(url, env, StreamConfig(concurrency=8)) as worker:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(2000):
                pipe.xadd(REQUESTS, {"request": orjson.dumps(body(i))})
            await pipe.execute()
        assert await until(lambda: _results_at_least(client, 100), 20)
        await worker.stop()
        answered = await client.xlen(RESULTS)
        lag = {g["name"].decode(): g for g in await client.xinfo_groups(REQUESTS)}[GROUP]["lag"]
        assert await pending_count(client) == 0  # nothing left half-done
        assert 100 <= answered < 2000 and answered + lag == 2000


async def test_a_jobs_callback_is_sent_once_its_result_is_stored(redis_db, triton: TritonProcess):
    """A job's allowed callback URL gets the envelope, from the outbox; a host not allowed
    gets nothing, and nothing is queued for it."""
    from gateway.callback_outbox import CallbackCourier
    from gateway.streams import CALLBACK_STREAM
    from tests.callback_receiver import Receiver

    url, client = redis_db
    env = {"AIGW_TRITON_URL": triton.http_url}
    sender = CallbackSender(b"k" * 32, max_attempts=2, backoff_s=0.05, allowed=("127.0.0.1",))
    hook = callback_destination(settings_for(REPO, callback_allowed_hosts="127.0.0.1"))
    store = StreamStore(url, StreamConfig())
    courier = CallbackCourier(store, sender, "test-worker", allowed=("127.0.0.1",))
    try:
        async with Receiver() as receiver, in_process_worker(url, env, StreamConfig(), hook):
            await courier.start()
            allowed = Job(str(uuid.uuid4()), MODEL, body(1)["features"], callback_url=receiver.url)
            # The same receiver by another name: a host the operator did not allow.
            other_name = receiver.url.replace("127.0.0.1", "localhost")
            refused = Job(str(uuid.uuid4()), MODEL, body(2)["features"], callback_url=other_name)
            for job in (refused, allowed):
                await client.xadd(REQUESTS, {"job": job.to_json()})
            await receiver.wait_accepted()
            assert await until(lambda: _results_at_least(client, 2), 10)
            await asyncio.sleep(0.3)  # a callback to the refused host would have arrived now
            [received] = receiver.received
            assert orjson.loads(received.body)["prediction_id"] == allowed.prediction_id
            assert await client.xlen(CALLBACK_STREAM) == 1  # only the allowed one was queued
    finally:
        await courier.stop()
        await sender.close()
        await store.close()


async def test_a_worker_follows_policy_files_as_a_gateway_does(
    redis_db, triton: TritonProcess, data_dirs: Path, tmp_path: Path
):
    """An edit of the policy files reaches a running `aigw worker`: later jobs use it."""
    url, client = redis_db
    env = {
        "AIGW_REDIS_URL": url,
        "AIGW_TRITON_URL": triton.http_url,
        "AIGW_CONTRACTS_DIR": str(data_dirs / "contracts"),
        "AIGW_POLICIES_DIR": str(data_dirs / "policies"),
        "AIGW_FALLBACKS_DIR": str(data_dirs / "fallbacks"),
        "AIGW_WATCH_INTERVAL_S": "0.2",
    }
    worker = WorkerProcess("follower", env, tmp_path)

    async def arm_of_next_answer() -> str:
        before = await client.xlen(RESULTS)
        await client.xadd(REQUESTS, {"request": orjson.dumps(CHURN_REQUEST)})
        assert await until(lambda: _results_at_least(client, before + 1), 30)
        (_, fields), *_ = await client.xrevrange(RESULTS, count=1)
        return orjson.loads(fields[b"envelope"])["arm"]

    try:
        assert await arm_of_next_answer() == "control"  # customer 12345's arm
        policy = data_dirs / "policies" / "customer-churn.yaml"
        policy.write_text(policy.read_text().replace("weight: 90", "weight: 0"))
        deadline = time.monotonic() + 10
        arm = "control"
        while arm == "control" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            arm = await arm_of_next_answer()
        assert arm == "challenger"
        assert worker.stop() == 0
        records = [line for f in worker.audit_dir.glob("audit-*.jsonl") for line in f.open()]
        assert any('"action":"apply"' in line for line in records)  # the change is audited
    finally:
        worker.stop()


async def test_a_frozen_redis_mid_run_loses_and_duplicates_nothing(
    triton: TritonProcess, tmp_path: Path
):
    """Redis unanswering for 3 s mid-run (SIGSTOP): the worker waits it out, then every
    request still gets exactly one result."""
    from tests.conftest import RedisServer

    server = RedisServer(free_port())
    server.start()
    client = aioredis.from_url(server.url)
    count = 3_000
    env = {
        "AIGW_REDIS_URL": server.url,
        "AIGW_TRITON_URL": triton.http_url,
        "AIGW_WORKER_CLAIM_IDLE_MS": "2000",
        "AIGW_LOG_LEVEL": "warning",
    }
    try:
        await client.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
        expected = await publish_mixed(client, count)
        worker = WorkerProcess("partitioned", env, tmp_path)
        assert await until(lambda: _results_at_least(client, count // 10), 60), "no progress"
        server.freeze()
        await asyncio.sleep(3)
        server.thaw()
        assert await client.xlen(RESULTS) < count  # the outage fell mid-run

        async def all_answered() -> bool:
            return await client.xlen(RESULTS) >= count and await pending_count(client) == 0

        assert await until(all_answered, 90), f"{await client.xlen(RESULTS)} results"
        await asyncio.sleep(0.5)  # a late duplicate would land now
        entries = await client.xrange(RESULTS)
        assert len(entries) == count
        assert {fields[b"prediction_id"].decode() for _, fields in entries} == expected
        assert await client.xlen(DEAD) == 0
        assert worker.stop() == 0
    finally:
        await client.aclose()
        server.stop()


async def test_a_workers_answers_reach_the_audit_stream_and_take_feedback_at_a_gateway(
    redis_db, gateway_client, tmp_path: Path
):
    """With `AIGW_AUDIT_STREAM_URL`, an `aigw worker` ships its audit log as a gateway does,
    so a job it answered is in the one audit stream, and its outcome, sent to a gateway that
    never saw the job, is taken (202) and counted once; with `AIGW_SHARE_STATISTICS` the
    gateway's experiment report counts the worker's answer too."""
    url, client = redis_db
    dead_triton = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}  # the rules answer
    worker = WorkerProcess(
        "shipper",
        {
            "AIGW_REDIS_URL": url,
            "AIGW_AUDIT_STREAM_URL": url,
            "AIGW_SHARE_STATISTICS": "true",
            **dead_triton,
        },
        tmp_path,
    )
    prediction_id = str(uuid.uuid4())
    try:
        request = orjson.dumps(CHURN_REQUEST)
        await client.xadd(REQUESTS, {"request": request, "prediction_id": prediction_id})
        assert await until(lambda: _results_at_least(client, 1), 30)
        assert await until(lambda: client.exists(DECISION_PREFIX + prediction_id), 10)
        shared = {"audit_stream_url": url, "redis_url": url, "share_statistics": True}
        async with gateway_client(env=dead_triton, **shared) as gateway:
            taken = await gateway.post(
                "/v1/feedback", json={"prediction_id": prediction_id, "outcome": "churn"}
            )
            again = await gateway.post(
                "/v1/feedback", json={"prediction_id": prediction_id, "outcome": "churn"}
            )

            async def reported() -> bool:  # the worker publishes once a second
                arms = (await gateway.get(f"/v1/experiments/{MODEL}")).json()["arms"]
                counted = [(a.get("requests", 0), a.get("feedback", 0)) for a in arms.values()]
                return (sum(r for r, _ in counted), sum(f for _, f in counted)) == (1, 1)

            assert await until(reported, 10), (await gateway.get(f"/v1/experiments/{MODEL}")).text
    finally:
        assert worker.stop() == 0
    assert taken.status_code == 202, taken.text
    assert again.status_code == 409, again.text
    shipped = [orjson.loads(f[b"line"]) for _, f in await client.xrange("aigw:audit")]
    [record] = [r for r in shipped if r.get("prediction_id") == prediction_id]
    assert record["type"] == "prediction"
    replicas = {f[b"replica"] for _, f in await client.xrange("aigw:audit")}
    assert any(str(worker.audit_dir.resolve()).encode() in name for name in replicas), replicas
