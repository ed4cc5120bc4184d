"""Prediction caching: keys, the memory and Redis stores, Redis outages, and single flight."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.cache import CachedPrediction, MemoryCache, RedisCache, SingleFlight, cache_key
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, RedisServer

ANSWER = CachedPrediction("churn", 0.81, "1", "churn-gbm")
OTHER = CachedPrediction("stay", 0.12, "2", "churn-gbm-v2")


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- keys -------------------------------------------------------------------------------------

FEATURES = {"customer_id": "alice@example.com", "tenure_months": 24, "monthly_charges": 89.99}
BASE: dict[str, Any] = {
    "model_id": "customer-churn",
    "target": "churn-gbm",
    "answer_spec": "a" * 64,
    "contract_version": "1.0.0",
    "features": FEATURES,
    "tenant": None,
}


def key(**changes: Any) -> str:
    return cache_key(**{**BASE, **changes})


@pytest.mark.parametrize(
    ("changes", "same"),
    [
        ({"features": dict(reversed(FEATURES.items()))}, True),
        ({"features": dict(FEATURES)}, True),
        ({"model_id": "customer-churn-2"}, False),
        ({"target": "churn-gbm-v2"}, False),
        ({"answer_spec": "b" * 64}, False),
        ({"contract_version": "1.1.0"}, False),
        ({"features": {**FEATURES, "customer_id": "bob@example.com"}}, False),
        ({"features": {**FEATURES, "tenure_months": 25}}, False),
        ({"features": {**FEATURES, "monthly_charges": 90.0}}, False),
        ({"features": {k: v for k, v in FEATURES.items() if k != "tenure_months"}}, False),
        ({"tenant": "acme"}, False),
    ],
    ids=[
        "reordered-features",
        "equal-copy",
        "model_id",
        "target",
        "answer-spec",
        "contract-version",
        "customer_id",
        "tenure_months",
        "monthly_charges",
        "missing-feature",
        "tenant",
    ],
)
def test_cache_key_covers_everything_that_changes_an_answer(changes, same):
    """Keys match for the same input in any feature order and differ when any input part does."""
    assert (key(**changes) == key()) is same


def test_tenants_get_different_keys():
    """With per-tenant keys, two tenants never share an entry, nor share one with no tenant."""
    assert len({key(tenant=None), key(tenant="acme"), key(tenant="globex")}) == 3


def test_cache_key_is_a_hash_without_feature_values_in_clear():
    """A key is a namespaced SHA-256 digest: no feature value (customer ids are PII) in it."""
    value = key()
    assert re.fullmatch(r"aigw:pred:[0-9a-f]{64}", value)
    for feature in FEATURES.values():
        assert str(feature) not in value
    assert "alice" not in value


# --- both stores ------------------------------------------------------------------------------


@dataclass
class Store:
    """A cache under test, how to make its entries expire, and a per-test key prefix."""

    kind: str
    cache: MemoryCache | RedisCache
    clock: FakeClock
    prefix: str

    async def expire(self, key: str, ttl_s: float) -> bool:
        """Let `ttl_s` pass; True once the entry is gone (Redis expires on its own clock)."""
        if self.kind == "memory":
            self.clock.advance(ttl_s)
            return await self.cache.get(key) is None
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if await self.cache.get(key) is None:
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    clock = FakeClock()
    if request.param == "memory":
        cache: MemoryCache | RedisCache = MemoryCache(max_entries=100, clock=clock)
    else:
        server = request.getfixturevalue("redis_server")
        cache = RedisCache(server.url, timeout_s=1.0, clock=clock)
    yield Store(request.param, cache, clock, prefix=f"test:{uuid.uuid4().hex}:")
    await cache.close()


async def test_a_missing_key_is_a_miss(store):
    """An entry never set reads as None."""
    assert await store.cache.get(store.prefix + "absent") is None


async def test_set_then_get_round_trips_the_prediction(store):
    """What is set is read back field for field."""
    await store.cache.set(store.prefix + "k", ANSWER, ttl_s=60)
    assert await store.cache.get(store.prefix + "k") == ANSWER
    assert await store.cache.get(store.prefix + "other") is None


async def test_entries_expire_after_their_ttl(store):
    """An entry is served within its TTL and is a miss once the TTL has passed."""
    ttl_s = 0.2
    await store.cache.set(store.prefix + "k", ANSWER, ttl_s=ttl_s)
    assert await store.cache.get(store.prefix + "k") == ANSWER
    assert await store.expire(store.prefix + "k", ttl_s)


async def test_set_overwrites_an_entry(store):
    """A second set of the same key replaces the first value."""
    await store.cache.set(store.prefix + "k", ANSWER, ttl_s=60)
    await store.cache.set(store.prefix + "k", OTHER, ttl_s=60)
    assert await store.cache.get(store.prefix + "k") == OTHER


async def test_an_overwrite_restarts_the_ttl(store):
    """Overwriting an entry gives it the new TTL, not what remained of the old one."""
    await store.cache.set(store.prefix + "k", ANSWER, ttl_s=0.2)
    await store.cache.set(store.prefix + "k", OTHER, ttl_s=60)
    await store.cache.set(store.prefix + "sentinel", ANSWER, ttl_s=0.2)
    assert await store.expire(store.prefix + "sentinel", 0.2)  # the old TTL has passed too
    assert await store.cache.get(store.prefix + "k") == OTHER


async def test_set_many_keeps_each_entry_with_its_own_ttl(store):
    """A miss's answer and its stale copy go together, each with its TTL."""
    short, long = store.prefix + "fresh", store.prefix + "stale"
    await store.cache.set_many([(short, ANSWER, 0.2), (long, OTHER, 60)])
    assert [await store.cache.get(short), await store.cache.get(long)] == [ANSWER, OTHER]
    assert await store.expire(short, 0.2)
    assert await store.cache.get(long) == OTHER


# --- MemoryCache ------------------------------------------------------------------------------


async def test_memory_cache_evicts_the_least_recently_used_at_max_entries():
    """At max_entries a new entry evicts the oldest; the size never exceeds the bound."""
    cache = MemoryCache(max_entries=3, clock=FakeClock())
    for name in "abcd":
        await cache.set(name, ANSWER, ttl_s=60)
    assert len(cache) == 3
    assert await cache.get("a") is None
    assert [await cache.get(n) for n in "bcd"] == [ANSWER] * 3


async def test_memory_cache_get_refreshes_recency():
    """A read makes an entry recent again, so the next eviction takes another one."""
    cache = MemoryCache(max_entries=3, clock=FakeClock())
    for name in "abc":
        await cache.set(name, ANSWER, ttl_s=60)
    assert await cache.get("a") == ANSWER
    await cache.set("d", ANSWER, ttl_s=60)
    assert await cache.get("b") is None
    assert [await cache.get(n) for n in "acd"] == [ANSWER] * 3


async def test_memory_cache_overwrite_does_not_evict():
    """Overwriting a present key at the bound evicts nothing."""
    cache = MemoryCache(max_entries=2, clock=FakeClock())
    await cache.set("a", ANSWER, ttl_s=60)
    await cache.set("b", ANSWER, ttl_s=60)
    await cache.set("a", OTHER, ttl_s=60)
    assert (await cache.get("a"), await cache.get("b"), len(cache)) == (OTHER, ANSWER, 2)


@pytest.mark.parametrize(("elapsed", "served"), [(59.999, True), (60.0, False), (61.0, False)])
async def test_memory_cache_ttl_boundary(elapsed, served):
    """An entry is served strictly before its TTL has passed and not from that instant on."""
    clock = FakeClock()
    cache = MemoryCache(max_entries=10, clock=clock)
    await cache.set("k", ANSWER, ttl_s=60)
    clock.advance(elapsed)
    assert (await cache.get("k") == ANSWER) is served


# --- RedisCache when Redis is away ------------------------------------------------------------


async def test_unreachable_redis_is_a_miss_that_counts_errors_and_then_rests(
    unreachable_redis_url,
):
    """get is None and set does not raise; one failure counts, then Redis is left alone for
    retry_after_s (no new attempt, errors steady), after which it is tried again."""
    clock = FakeClock()
    cache = RedisCache(unreachable_redis_url, retry_after_s=5.0, clock=clock)
    try:
        assert await cache.get("k") is None
        assert cache.errors == 1
        assert not cache.available
        for _ in range(10):
            assert await cache.get("k") is None
            await cache.set("k", ANSWER, ttl_s=60)
            await cache.set_many([("k", ANSWER, 60), ("s", ANSWER, 600)])
        clock.advance(4.9)
        assert await cache.get("k") is None
        assert cache.errors == 1

        clock.advance(0.1)
        assert cache.available
        await cache.set("k", ANSWER, ttl_s=60)
        assert cache.errors == 2
        assert not cache.available

        clock.advance(5.0)
        await cache.set_many([("k", ANSWER, 60), ("s", ANSWER, 600)])  # one failure, not two
        assert cache.errors == 3
        assert not cache.available
    finally:
        await cache.close()


async def test_redis_killed_mid_run_is_survived_and_used_again_once_back():
    """Redis stops: calls are misses and never raise. It comes back on the same port: after
    retry_after_s the cache works again."""
    server = RedisServer(free_port())
    server.start()
    clock = FakeClock()
    cache = RedisCache(server.url, timeout_s=1.0, retry_after_s=2.0, clock=clock)
    try:
        await cache.set("k", ANSWER, ttl_s=60)
        assert await cache.get("k") == ANSWER

        server.stop()
        assert await cache.get("k") is None
        assert cache.errors == 1
        await cache.set("k", OTHER, ttl_s=60)
        assert await cache.get("k") is None
        assert cache.errors == 1  # resting: not tried again

        clock.advance(2.0)
        assert await cache.get("k") is None  # tried, still down
        assert cache.errors == 2

        server.start()
        assert await cache.get("k") is None  # still resting after the last failure
        clock.advance(2.0)
        assert await cache.get("k") is None  # back, empty: a plain miss, not an error
        await cache.set("k", OTHER, ttl_s=60)
        assert await cache.get("k") == OTHER
        assert cache.errors == 2
    finally:
        await cache.close()
        server.stop()


async def test_a_frozen_redis_costs_a_request_no_more_than_the_time_it_has_left():
    """Redis stops answering (SIGSTOP): a call given 20 ms gives up then, a miss, and counts
    no error: the request ran out of time, Redis has not been shown ill. Without a limit of
    the request's, the cache's own (1 s here) applies and a failure counts."""
    server = RedisServer(free_port())
    server.start()
    cache = RedisCache(server.url, timeout_s=0.5)
    try:
        await cache.set("k", ANSWER, ttl_s=60)
        os.kill(server.pid, signal.SIGSTOP)
        assert await cache.get("k", within_s=0.02) is None
        await cache.set_many([("k", OTHER, 60)], within_s=0.02)
        # No error counted: both calls ended at the request's limit, not at the cache's own
        # (which counts one and rests, as the next call shows).
        assert (cache.errors, cache.available) == (0, True)
        assert await cache.get("k") is None  # its own limit: a failure, and a rest
        assert (cache.errors, cache.available) == (1, False)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await cache.close()
        server.stop()


# --- SingleFlight -----------------------------------------------------------------------------


class Computation:
    """A compute function that counts its calls and finishes when released."""

    def __init__(self, result: Any = "answer", error: Exception | None = None) -> None:
        self.calls = 0
        self.released = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> Any:
        self.calls += 1
        await self.released.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_single_flight_shares_one_computation_among_concurrent_callers():
    """50 concurrent identical runs compute once: one leader, 49 told the answer was shared."""
    flight, compute = SingleFlight(), Computation()
    tasks = [asyncio.create_task(flight.run("k", compute)) for _ in range(50)]
    await asyncio.sleep(0)  # every task reaches its first await
    compute.released.set()
    results = await asyncio.gather(*tasks)
    assert compute.calls == 1
    assert all(value == "answer" for value, _ in results)
    assert sorted(shared for _, shared in results) == [False] + [True] * 49
    assert flight.coalesced == 49


async def test_single_flight_does_not_share_between_keys():
    """Concurrent runs of different keys each compute their own answer."""
    flight = SingleFlight()
    a, b = Computation("a"), Computation("b")
    tasks = [asyncio.create_task(flight.run("a", a)), asyncio.create_task(flight.run("b", b))]
    await asyncio.sleep(0)
    a.released.set()
    b.released.set()
    assert await asyncio.gather(*tasks) == [("a", False), ("b", False)]
    assert (a.calls, b.calls, flight.coalesced) == (1, 1, 0)


async def test_single_flight_leader_error_reaches_every_follower_and_frees_the_key():
    """The leader's exception is raised in every follower; the next call computes afresh."""
    flight = SingleFlight()
    failing = Computation(error=RuntimeError("backend exploded"))
    tasks = [asyncio.create_task(flight.run("k", failing)) for _ in range(10)]
    await asyncio.sleep(0)
    failing.released.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert failing.calls == 1
    assert all(isinstance(o, RuntimeError) and str(o) == "backend exploded" for o in outcomes)

    fresh = Computation("recovered")
    fresh.released.set()
    assert await flight.run("k", fresh) == ("recovered", False)
    assert fresh.calls == 1


async def test_single_flight_runs_again_after_a_result():
    """A finished run is not a cache: a later call for the same key computes again."""
    flight, compute = SingleFlight(), Computation()
    compute.released.set()
    assert await flight.run("k", compute) == ("answer", False)
    assert await flight.run("k", compute) == ("answer", False)
    assert compute.calls == 2


async def test_single_flight_follower_cancelled_leaves_the_leader_running():
    """A follower that gives up does not cancel the shared computation for the others."""
    flight, compute = SingleFlight(), Computation()
    leader = asyncio.create_task(flight.run("k", compute))
    follower = asyncio.create_task(flight.run("k", compute))
    other = asyncio.create_task(flight.run("k", compute))
    await asyncio.sleep(0)
    follower.cancel()
    await asyncio.sleep(0)
    compute.released.set()
    assert await leader == ("answer", False)
    assert await other == ("answer", True)
    assert follower.cancelled()


async def test_single_flight_leader_cancelled_does_not_cancel_the_followers():
    """A caller cancelled while leading does not cancel callers that merely waited on it."""
    flight, compute = SingleFlight(), Computation()
    leader = asyncio.create_task(flight.run("k", compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.run("k", compute))
    await asyncio.sleep(0)
    leader.cancel()
    compute.released.set()
    value, _ = await follower
    assert value == "answer"
    assert leader.cancelled()


# --- through the API --------------------------------------------------------------------------


async def test_degraded_answers_are_never_cached(gateway_client):
    """With Triton unreachable every answer is a fallback, and none is reused from the cache."""
    async with gateway_client(env={"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}) as client:
        bodies = [
            (await client.post("/v1/predictions", json=CHURN_REQUEST)).json() for _ in range(3)
        ]
    assert [b["degraded"] for b in bodies] == [True, True, True]
    assert [b["cached"] for b in bodies] == [False, False, False]
    assert len({b["prediction_id"] for b in bodies}) == 3


async def test_a_follower_waits_no_longer_than_its_own_time_then_answers_alone():
    """A follower with 20 ms left does not wait for a leader that needs longer: it computes
    its own result, and the leader's run goes on for the leader."""
    flight, slow, quick = SingleFlight(), Computation("leader's"), Computation("own")
    leader = asyncio.create_task(flight.run("k", slow))
    await asyncio.sleep(0)
    quick.released.set()
    assert await flight.run("k", quick, wait_s=0.02) == ("own", False)
    slow.released.set()
    assert await leader == ("leader's", False)
    assert (slow.calls, quick.calls, flight.coalesced) == (1, 1, 0)


async def test_a_follower_does_not_take_a_result_it_may_not_share():
    """A degraded answer says how the leader fared, with the leader's budget and chain: a
    follower that may not share it computes its own."""
    flight, leader_run, own_run = SingleFlight(), Computation("degraded"), Computation("own")
    leader = asyncio.create_task(flight.run("k", leader_run))
    await asyncio.sleep(0)
    follower = asyncio.create_task(
        flight.run("k", own_run, shareable=lambda result: result != "degraded")
    )
    await asyncio.sleep(0)
    leader_run.released.set()
    own_run.released.set()
    assert await leader == ("degraded", False)
    assert await follower == ("own", False)
    assert flight.coalesced == 0


async def test_a_smaller_bound_evicts_the_least_recently_used_at_once():
    """An apply lowering the largest `cache.max_entries` shrinks the in-memory cache then."""
    cache = MemoryCache(max_entries=4, clock=FakeClock())
    for name in "abcd":
        await cache.set(name, ANSWER, ttl_s=60)
    assert await cache.get("a") == ANSWER  # now the most recently used
    cache.resize(2)
    assert [await cache.get(n) is not None for n in "abcd"] == [True, False, False, True]
    assert len(cache) == 2
