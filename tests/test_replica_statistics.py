"""Experiment and health statistics shared by replicas through a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.demo.triton_process import free_port
from gateway.experiments import Decision, Experiments
from gateway.monitoring import Monitor
from gateway.replica_statistics import (
    APPLIED_KEY,
    EXPERIMENTS_KEY,
    WINDOWS_KEY,
    ReplicaStatistics,
    _Publish,
    flatten,
    increments,
    unflatten,
    without,
)
from tests.conftest import CHURN_REQUEST, RedisServer

MODEL = "customer-churn"
ARM_MODELS = {"control": "churn_gbm:1", "challenger": "churn_gbm_v2:1"}


def answered(experiments: Experiments, count: int, arm: str = "control", latency: float = 5.0):  # type: ignore[no-untyped-def]
    for i in range(count):
        decision = Decision(MODEL, arm, "churn", "acme", "churn-gbm:1", 0.8, ARM_MODELS[arm])
        experiments.record_answer(f"{arm}-{i}-{id(experiments)}", decision, latency, False, False)


def requests_in(report: dict, arm: str = "control") -> int:
    return report.get(arm, {}).get("requests", 0)


# --- pure: fields, increments, subtraction ---------------------------------------------------


def test_totals_survive_the_round_trip_through_fields():
    experiments = Experiments()
    answered(experiments, 3, latency=7.5)
    answered(experiments, 2, arm="challenger")
    experiments.record_shadow(MODEL, "control", "churn_gbm:1", "churn-logreg", agreed=True)
    experiments.record_shadow(MODEL, "control", "churn_gbm:1", "churn-logreg", agreed=None)
    totals = experiments.totals()
    assert unflatten(flatten(totals)) == totals


REQUESTS, SLOWEST = '["m","a","requests"]', '["m","a","latency_ms_max"]'


@pytest.mark.parametrize(
    ("current", "published", "sums", "maxima"),
    [
        ({REQUESTS: 5.0}, {}, {REQUESTS: 5.0}, {}),
        ({REQUESTS: 5.0}, {REQUESTS: 3.0}, {REQUESTS: 2.0}, {}),
        ({REQUESTS: 5.0}, {REQUESTS: 5.0}, {}, {}),
        ({SLOWEST: 9.0}, {SLOWEST: 4.0}, {}, {SLOWEST: 9.0}),
        ({SLOWEST: 4.0}, {SLOWEST: 4.0}, {}, {}),
    ],
)
def test_a_publish_adds_what_changed_and_raises_maxima(current, published, sums, maxima):
    assert increments(current, published) == (sums, maxima)


def test_the_others_part_is_the_shared_less_ones_own_never_negative():
    shared = {
        '["m","a","requests"]': 10.0,
        '["m","a","latency_ms_max"]': 9.0,
        '["m","a","cached"]': 1.0,
    }
    own = {
        '["m","a","requests"]': 4.0,
        '["m","a","latency_ms_max"]': 9.0,
        '["m","a","cached"]': 3.0,
    }
    assert without(shared, own) == {
        '["m","a","requests"]': 6.0,
        '["m","a","latency_ms_max"]': 9.0,  # a maximum does not subtract
        '["m","a","cached"]': 0.0,  # the hash was reset under us: zero, not negative
    }


@pytest.mark.parametrize(
    "field",
    ["not json", '{"m": 1}', '["m", "a"]', '["m", "a", "unknown_counter"]', '["m", 1, "requests"]',
     '["m", "a", "shadows", "t", "unknown"]'],
)  # fmt: skip
def test_fields_of_another_shape_are_left_out(field):
    assert unflatten({field: 3.0}) == {}


def test_an_arm_seen_through_one_counter_is_complete():
    [[arm]] = [list(arms.values()) for arms in unflatten({'["m","a","requests"]': 2.0}).values()]
    assert arm["requests"] == 2 and arm["feedback"] == 0 and arm["shadows"] == {}
    Experiments().add_totals({"m": {"a": arm}})  # a report can count it in


# --- against a real redis-server --------------------------------------------------------------


@pytest.fixture
async def clean_redis(redis_server):  # type: ignore[no-untyped-def]
    redis = aioredis.from_url(redis_server.url)
    await redis.delete(EXPERIMENTS_KEY, WINDOWS_KEY, APPLIED_KEY)
    yield redis_server.url
    await redis.delete(EXPERIMENTS_KEY, WINDOWS_KEY, APPLIED_KEY)
    await redis.aclose()


async def test_every_replica_reports_the_traffic_of_all(clean_redis):
    a, b = ReplicaStatistics(clean_redis, "a"), ReplicaStatistics(clean_redis, "b")
    counts_a, counts_b = Experiments(), Experiments()
    answered(counts_a, 3)
    answered(counts_b, 2)
    await a.publish(counts_a, Monitor({}))
    await b.publish(counts_b, Monitor({}))
    await a.publish(counts_a, Monitor({}))  # reads b's part back
    answered(counts_a, 1)  # not yet published: a's own live counts are in its report anyway
    assert (
        requests_in(counts_a.report(MODEL, ARM_MODELS, [p.experiments for p in a.siblings()])) == 6
    )
    assert (
        requests_in(counts_b.report(MODEL, ARM_MODELS, [p.experiments for p in b.siblings()])) == 5
    )
    await a.publish(counts_a, Monitor({}))  # every later publish adds what is new
    await b.publish(counts_b, Monitor({}))
    assert (
        requests_in(counts_b.report(MODEL, ARM_MODELS, [p.experiments for p in b.siblings()])) == 6
    )


async def test_a_publish_whose_reply_was_lost_is_counted_once(clean_redis):
    """The increments go with a sequence number; sending the same publish again (as after a
    reply lost on the way back) adds nothing."""
    a = ReplicaStatistics(clean_redis, "a")
    counts = Experiments()
    answered(counts, 4)
    await a.publish(counts, Monitor({}))
    # The reply "lost": the publish just acknowledged is pending again, as it would be.
    again = {'["customer-churn","control@churn_gbm:1","requests"]': 4.0}
    a._pending = _Publish(a._sequence, again, {}, flatten(counts.totals()))
    await a.publish(counts, Monitor({}))
    observer = ReplicaStatistics(clean_redis, "observer")
    await observer.publish(Experiments(), Monitor({}))
    assert (
        requests_in(
            Experiments().report(MODEL, ARM_MODELS, [p.experiments for p in observer.siblings()])
        )
        == 4
    )


async def test_a_replica_gone_keeps_its_counts_and_its_windows_age_out(clean_redis):
    now = [1_000_000.0]
    gone = ReplicaStatistics(clean_redis, "gone", stale_after_s=60, wall_clock=lambda: now[0])
    live = ReplicaStatistics(clean_redis, "live", stale_after_s=60, wall_clock=lambda: now[0])
    counts = Experiments()
    answered(counts, 3)
    await gone.publish(counts, Monitor({}))
    now[0] += 61
    await live.publish(Experiments(), Monitor({}))
    await live.publish(Experiments(), Monitor({}))
    redis = aioredis.from_url(clean_redis)
    try:
        assert await redis.hkeys(WINDOWS_KEY) == [b"live"]  # the silent one's windows dropped
    finally:
        await redis.aclose()
    assert (
        requests_in(
            Experiments().report(MODEL, ARM_MODELS, [p.experiments for p in live.siblings()])
        )
        == 3
    )


async def test_with_redis_away_a_replica_reports_its_own_and_catches_up(unreachable_redis_url):
    a = ReplicaStatistics(unreachable_redis_url, "a")
    counts = Experiments()
    answered(counts, 2)
    task = asyncio.create_task(a.publish_forever(lambda: (counts, Monitor({})), interval_s=0.05))
    await asyncio.sleep(0.3)
    assert not a.connected and a.siblings() == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_gateway_replicas_report_each_others_answers(gateway_client, clean_redis):
    """Two replicas sharing statistics: each one's experiment report and model health count
    both's answers (3 on one, 2 on the other: 5 on each, within about a second)."""
    shared = {"redis_url": clean_redis, "share_statistics": True}
    async with gateway_client(**shared) as a, gateway_client(**shared) as b:
        for client, customers in ((a, ["a0", "a1", "a2"]), (b, ["b0", "b1"])):
            for customer in customers:
                features = {**CHURN_REQUEST["features"], "customer_id": customer}
                answer = await client.post(
                    "/v1/predictions", json={**CHURN_REQUEST, "features": features}
                )
                assert answer.status_code == 200

        async def counted_at(client) -> tuple[int, int]:  # type: ignore[no-untyped-def]
            """(requests in the experiment report, drift sample sizes in model health)"""
            arms = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
            health = (await client.get(f"/v1/models/{MODEL}/health")).json()
            drift = sum(
                stream["drift"]["sample_size"]
                for arms_of_version in health["versions"].values()
                for stream in arms_of_version.values()
                if stream["drift"] is not None
            )
            return sum(arm.get("requests", 0) for arm in arms.values()), drift

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counts = (await counted_at(a), await counted_at(b))
            if counts == ((5, 5), (5, 5)):
                break
            await asyncio.sleep(0.1)
        assert counts == ((5, 5), (5, 5))


async def test_counts_of_a_publish_that_failed_on_a_frozen_redis_arrive_once_it_thaws():
    """Redis freezes (SIGSTOP) under a publish, which fails; once Redis thaws, what that
    publish carried and what was counted since reach the shared totals: none lost, none
    twice. (A reply lost after Redis applied a publish: the test above.)"""
    server = RedisServer(free_port())
    server.start()
    try:
        a = ReplicaStatistics(server.url, "a")
        observer = ReplicaStatistics(server.url, "observer")
        counts = Experiments()
        answered(counts, 2)
        await a.publish(counts, Monitor({}))
        answered(counts, 3)
        server.freeze()
        with pytest.raises((RedisError, OSError, TimeoutError)):
            await a.publish(counts, Monitor({}))
        answered(counts, 4)
        server.thaw()
        await a.publish(counts, Monitor({}))  # the kept publish again (its 3)
        await a.publish(counts, Monitor({}))  # then what came since (4)
        await observer.publish(Experiments(), Monitor({}))
        others = [p.experiments for p in observer.siblings()]
        assert requests_in(Experiments().report(MODEL, ARM_MODELS, others)) == 9
    finally:
        server.stop()
