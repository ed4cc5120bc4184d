"""The callback outbox of jobs on Redis, against a real redis-server and real HTTP receivers:
a callback is queued with its result, once, and sent until it has an outcome, whatever
happens to the worker that took it."""

from __future__ import annotations

import asyncio
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

from gateway.callback_outbox import CallbackCourier, callback_of
from gateway.callbacks import CallbackSender, verify
from gateway.demo.triton_process import free_port
from gateway.jobs import Job
from gateway.streams import (
    CALLBACK_GROUP,
    CALLBACK_STREAM,
    StreamConfig,
    StreamStore,
    request_stream,
)
from gateway.worker import StreamWorker, callback_destination
from tests.callback_receiver import Receiver
from tests.conftest import CHURN_REQUEST, REPO, settings_for

KEY = b"k" * 32
MODEL = "customer-churn"
ENVELOPE = {"prediction": "stay", "probability": 0.2, "degraded": False}
CLAIM_IDLE_MS = 100


@pytest.fixture
async def store(redis_server) -> AsyncIterator[StreamStore]:
    """A store on database 2 of the session's redis-server (the outbox is one key for all
    models, so each test has the database to itself), emptied before and after."""
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    store = StreamStore(url, StreamConfig(claim_idle_ms=CLAIM_IDLE_MS, result_ttl_s=60))
    await store.redis.flushdb()
    await store.ensure_group(MODEL)
    yield store
    await store.redis.flushdb()
    await store.close()


class Outcomes(list):
    """What the sender counts in `aigw_callback_deliveries_total{outcome}`, in order."""

    def observe(self, outcome: str) -> None:
        self.append(outcome)


def sender(outcomes: Outcomes, **options: object) -> CallbackSender:
    """A sender with short backoff, allowed to reach the loopback receivers."""
    defaults: dict[str, object] = {
        "max_attempts": 5, "timeout_s": 2.0, "backoff_s": 0.05, "backoff_max_s": 0.2,
        "allowed": ("127.0.0.1",), "observe": outcomes.observe,
    }  # fmt: skip
    return CallbackSender(KEY, **{**defaults, **options})  # type: ignore[arg-type]


def job(url: str | None) -> Job:
    return Job(str(uuid.uuid4()), MODEL, CHURN_REQUEST["features"], tenant="acme",
               callback_url=url)  # fmt: skip


async def queue(store: StreamStore, url: str, count: int = 1) -> list[str]:
    """`count` answers stored with their callbacks, as a worker stores them; their ids."""
    ids = []
    for _ in range(count):
        answered = job(url)
        envelope = {**ENVELOPE, "prediction_id": answered.prediction_id}
        assert await store.store_result(answered, envelope, "1-0", "w", answered.callback_url)
        ids.append(answered.prediction_id)
    return ids


async def until(condition: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def outbox_pending(store: StreamStore) -> list[tuple[str, str, int]]:
    """(entry id, consumer, times delivered) of every callback taken and not yet finished."""
    rows = await store.redis.xpending_range(CALLBACK_STREAM, CALLBACK_GROUP, "-", "+", 100)
    return [(r["message_id"].decode(), r["consumer"].decode(), r["times_delivered"]) for r in rows]


async def settled(store: StreamStore) -> bool:
    """Every queued callback was taken and acknowledged."""
    return await store.callback_backlog() == (0, 0)


# ---- queuing: with the result, once ------------------------------------------------------------


async def test_a_stored_result_queues_its_callback_once_and_a_duplicate_store_none(store):
    """The result and its callback are written by one script: the first store of an id
    queues one outbox entry with the envelope's exact JSON; a second store of the id (a
    re-run after a takeover) stores nothing and queues nothing; no URL, no entry."""
    answered = job("https://receiver.example/hook")
    envelope = {**ENVELOPE, "prediction_id": answered.prediction_id}
    url = answered.callback_url
    assert await store.store_result(answered, envelope, "1-0", "w1", url)
    assert not await store.store_result(answered, {**envelope, "prediction": "x"}, "2-0", "w2", url)
    assert await store.store_result(job(None), envelope, "3-0", "w1", None)  # stored, no URL
    [(_, fields)] = await store.redis.xrange(CALLBACK_STREAM)
    callback = callback_of(fields)
    assert callback is not None
    assert (callback.prediction_id, callback.url) == (answered.prediction_id, url)
    assert callback.body == orjson.dumps(envelope)  # what `schedule` would have POSTed
    assert (fields[b"model_id"], fields[b"tenant"]) == (MODEL.encode(), b"acme")


# ---- delivering: signed, acknowledged, bounded ---------------------------------------------


async def sent_by_a_live_worker(
    store: StreamStore, receiver: Receiver
) -> tuple[Outcomes, CallbackCourier]:
    """A live worker ("alive") sends what the outbox holds, until the receiver has it and
    the outbox is settled."""
    outcomes = Outcomes()
    callbacks = sender(outcomes)
    courier = CallbackCourier(store, callbacks, "alive", allowed=("127.0.0.1",))
    await courier.start()
    try:
        await receiver.wait_accepted(5)
        assert await until(lambda: settled(store))
    finally:
        await courier.stop()
        await callbacks.close()
    return outcomes, courier


async def test_a_worker_sends_the_callback_of_the_job_it_answered_signed_and_acknowledges_it(
    store, offline_runtime
):
    """End to end on one worker: a submitted job with a callback URL is answered, its
    callback queued with the result, POSTed signed with the stored envelope, counted
    `delivered` and acknowledged."""
    outcomes = Outcomes()
    callbacks = sender(outcomes)
    settings = settings_for(REPO, callback_key="k" * 32, callback_allowed_hosts="127.0.0.1")
    async with Receiver() as receiver:
        submitted = job(receiver.url)
        await store.submit(submitted)
        worker = StreamWorker(offline_runtime, store, MODEL, "w1",
                              callbacks=callback_destination(settings))  # fmt: skip
        courier = CallbackCourier(store, callbacks, "w1", allowed=("127.0.0.1",))
        await worker.start()
        await courier.start()
        try:
            await receiver.wait_accepted()
            assert await until(lambda: settled(store))
        finally:
            await courier.stop()
            await worker.stop()
            await callbacks.close()
    [received] = receiver.received
    stored = (await store.outcome(submitted.prediction_id)).envelope
    assert orjson.loads(received.body) == stored
    assert received.headers["X-AIGW-Prediction-Id"] == submitted.prediction_id
    assert received.headers["X-AIGW-Attempt"] == "1"
    timestamp = received.headers["X-AIGW-Timestamp"]
    assert verify(KEY, received.body, timestamp, received.headers["X-AIGW-Signature"],
                  now=time.time())  # fmt: skip
    assert outcomes == ["delivered"] and courier.counts == {"delivered": 1}
    assert await outbox_pending(store) == []


async def test_trimming_the_outbox_drops_only_finished_callbacks(store):
    """The outbox stays bounded: acknowledged callbacks are trimmed (whole nodes, as
    approximate trimming goes), any taken and unfinished or not yet taken are kept."""
    await queue(store, "https://receiver.example/hook", 250)
    await store.ensure_callback_group()
    taken = await store.read_callbacks("w1", 200, None)
    for delivery in taken[:150]:
        await store.ack_callback(delivery.entry_id)
    await store.trim_callbacks()
    remaining = {i.decode() for i, _ in await store.redis.xrange(CALLBACK_STREAM)}
    assert {d.entry_id for d in taken[150:]} <= remaining and len(remaining) < 250
    assert await store.callback_backlog() == (50, 50)


async def test_beyond_max_pending_callbacks_wait_in_the_outbox_and_none_is_dropped(store):
    """A slow receiver and max_pending 2: the courier takes two callbacks, the other three
    wait in the stream untaken (not dropped, not counted), and all five arrive, once each,
    as places free up."""
    outcomes = Outcomes()
    callbacks = sender(outcomes, max_pending=2)
    gate = asyncio.Event()
    async with Receiver(gate=gate) as receiver:
        ids = await queue(store, receiver.url, 5)
        courier = CallbackCourier(store, callbacks, "w1", allowed=("127.0.0.1",))
        await courier.start()
        try:
            assert await until(lambda: _received_at_least(receiver, 2))
            await asyncio.sleep(0.3)  # a third taken beyond the bound would be sent by now
            assert len(receiver.received) == 2 and courier.in_flight == 2
            assert await store.callback_backlog() == (3, 2)  # (untaken, taken unfinished)
            gate.set()
            assert await until(lambda: settled(store))
        finally:
            gate.set()
            await courier.stop()
            await callbacks.close()
    sent = [r.headers["X-AIGW-Prediction-Id"] for r in receiver.received]
    assert sorted(sent) == sorted(ids)
    assert outcomes == ["delivered"] * 5


async def _received_at_least(receiver: Receiver, count: int) -> bool:
    return len(receiver.received) >= count


# ---- nothing lost: a worker dying or stopping, a receiver down ----------------------------------


async def test_a_callback_taken_by_a_worker_that_died_is_sent_by_another(store):
    """A worker took the callback and died (SIGKILL: never acknowledged, never held again).
    After the claim timeout a live worker takes it over and sends it; it is acknowledged."""
    async with Receiver() as receiver:
        [prediction_id] = await queue(store, receiver.url)
        await store.ensure_callback_group()
        [taken] = await store.read_callbacks("died", 10, None)
        outcomes, courier = await sent_by_a_live_worker(store, receiver)
    [received] = receiver.received
    assert received.headers["X-AIGW-Prediction-Id"] == prediction_id
    assert outcomes == ["delivered"] and courier.counts == {"delivered": 1}
    assert taken.deliveries == 1


async def test_a_sigkilled_aigw_worker_loses_no_callback(store, tmp_path: Path):
    """A real `aigw worker` answers a job and starts its callback; the receiver says 503 and
    the worker waits out a long backoff. SIGKILL: nothing acknowledged the callback, so once
    the claim timeout has passed another worker takes it over and delivers it."""
    env = {
        **os.environ,
        "AIGW_REDIS_URL": _url_of(store),
        "AIGW_TRITON_URL": f"127.0.0.1:{free_port()}",  # nothing there: the chain's default
        "AIGW_CONTRACTS_DIR": str(REPO / "contracts"),
        "AIGW_POLICIES_DIR": str(REPO / "policies"),
        "AIGW_FALLBACKS_DIR": str(REPO / "fallbacks"),
        "AIGW_AUDIT_DIR": str(tmp_path / "audit"),
        "AIGW_CALLBACK_KEY": KEY.decode(),
        "AIGW_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "AIGW_CALLBACK_BACKOFF_S": "30",
        "AIGW_WORKER_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
        "AIGW_LOG_LEVEL": "warning",
    }
    async with Receiver([503]) as receiver:
        submitted = job(receiver.url)
        await store.submit(submitted)
        with open(tmp_path / "worker.log", "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "worker", "--model", MODEL,
                 "--consumer", "doomed"],
                cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                assert await until(lambda: _received_at_least(receiver, 1), 20), (
                    tmp_path / "worker.log"
                ).read_text()
                [(_, consumer, _)] = await outbox_pending(store)
                assert consumer == "doomed"
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait()
        outcomes, _ = await sent_by_a_live_worker(store, receiver)
    first, second = receiver.received
    assert first.body == second.body
    assert second.headers["X-AIGW-Prediction-Id"] == submitted.prediction_id
    assert outcomes == ["delivered"]


def _url_of(store: StreamStore) -> str:
    kwargs = store.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


async def test_a_stopping_worker_leaves_an_unfinished_callback_pending_for_the_next(store):
    """A receiver answering 503, and a long backoff: at stop the delivery is between
    attempts. The stop's grace passes, the delivery is cut off unacknowledged and not
    counted `dropped`; the entry stays pending, and the next worker sends it."""
    first_outcomes, second_outcomes = Outcomes(), Outcomes()
    first_sender = sender(first_outcomes, backoff_s=30.0, backoff_max_s=30.0)
    async with Receiver([503]) as receiver:
        [prediction_id] = await queue(store, receiver.url)
        first = CallbackCourier(store, first_sender, "stopping", allowed=("127.0.0.1",))
        await first.start()
        assert await until(lambda: _received_at_least(receiver, 1))
        # The delivery waits out a 30 s backoff: a stop that waited for it would time out.
        await asyncio.wait_for(first.stop(grace_s=0.2), timeout=10)
        await first_sender.close()
        [(_, consumer, _)] = await outbox_pending(store)
        assert consumer == "stopping" and first.counts == {}
        assert first_outcomes == ["retry"]  # no `dropped`: nothing is lost
        second_sender = sender(second_outcomes)
        second = CallbackCourier(store, second_sender, "next", allowed=("127.0.0.1",))
        await second.start()
        try:
            await receiver.wait_accepted(5)
            assert await until(lambda: settled(store))
        finally:
            await second.stop()
            await second_sender.close()
    assert [r.headers["X-AIGW-Prediction-Id"] for r in receiver.received] == [prediction_id] * 2
    assert second_outcomes == ["delivered"] and second.counts == {"delivered": 1}


async def test_a_receiver_down_for_a_while_gets_the_callback_once_it_is_back(store):
    """The receiver's port refuses connections for a second (ten claim timeouts) while the
    sender retries with short backoff; a second worker is free and claiming all along. The
    callback arrives once the receiver listens again, once, from the worker that took it:
    its delivery is held while it retries, never taken over and sent twice."""
    port = free_port()
    outcomes, other_outcomes = Outcomes(), Outcomes()
    callbacks = sender(outcomes, max_attempts=20)
    other_sender = sender(other_outcomes)
    [prediction_id] = await queue(store, f"http://127.0.0.1:{port}/hook")
    courier = CallbackCourier(store, callbacks, "sending", allowed=("127.0.0.1",))
    other = CallbackCourier(store, other_sender, "other", allowed=("127.0.0.1",))
    await courier.start()
    try:
        assert await until(lambda: _pending_count(store, 1))
        await other.start()
        await asyncio.sleep(1.0)
        [(_, consumer, delivered)] = await outbox_pending(store)
        assert (consumer, delivered) == ("sending", 1)
        back = time.monotonic()
        async with Receiver(port=port) as receiver:
            await receiver.wait_accepted(5)
            arrived_s = time.monotonic() - back
            assert await until(lambda: settled(store))
    finally:
        await other.stop()
        await courier.stop()
        await callbacks.close()
        await other_sender.close()
    assert arrived_s < 1.0, arrived_s  # within the backoff cap (0.2 s) and an attempt
    [received] = receiver.received
    assert received.headers["X-AIGW-Prediction-Id"] == prediction_id
    assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"retry"}
    assert other_outcomes == [] and other.counts == {}


async def _pending_count(store: StreamStore, count: int) -> bool:
    return len(await outbox_pending(store)) >= count


async def test_a_callback_handed_out_too_often_without_an_outcome_ends_exhausted_unsent(store):
    """Every worker that took it died before it had an outcome: after max_attempts such
    deliveries the next worker gives it up (`exhausted`, acknowledged) instead of sending."""
    async with Receiver() as receiver:
        await queue(store, receiver.url)
        await store.ensure_callback_group()
        [taken] = await store.read_callbacks("died", 10, None)
        await store.redis.xclaim(CALLBACK_STREAM, CALLBACK_GROUP, "died", 0, [taken.entry_id],
                                 retrycount=3, justid=True)  # fmt: skip
        outcomes = Outcomes()
        callbacks = sender(outcomes, max_attempts=3)
        courier = CallbackCourier(store, callbacks, "alive", allowed=("127.0.0.1",))
        await courier.start()
        try:
            assert await until(lambda: settled(store))
        finally:
            await courier.stop()
            await callbacks.close()
    assert receiver.received == []
    assert outcomes == ["exhausted"] and courier.counts == {"exhausted": 1}


def test_the_outbox_and_its_group_have_the_documented_names():
    """README's key table names these."""
    assert (CALLBACK_STREAM, CALLBACK_GROUP) == ("aigw:callbacks", "aigw-callbacks")
    assert request_stream(MODEL) == "aigw:requests:customer-churn"
