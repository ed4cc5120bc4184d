"""Token buckets per tenant: the pure rule, in memory, shared by the workers of one machine,
and shared through a real Redis."""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import rate_limit
from gateway.auth import TenantLimits
from gateway.rate_limit import MemoryRateLimiter, RedisRateLimiter, SharedRateLimiter, take_token
from gateway.runtime import load_configuration, start_runtime
from tests.conftest import REPO, settings_for

LIMITS = TenantLimits(rate_per_s=2, burst=3)


@pytest.mark.parametrize(
    ("tokens", "elapsed_s", "allowed", "remaining", "retry_after_s"),
    [
        (3.0, 0.0, True, 2, 0.0),  # a full bucket
        (1.0, 0.0, True, 0, 0.5),  # the last token: the next one comes in half a second
        (0.0, 0.0, False, 0, 0.5),  # empty
        (0.0, 0.25, False, 0, 0.25),  # half a token refilled
        (0.0, 0.5, True, 0, 0.5),  # one token refilled, taken
        (0.0, 100.0, True, 2, 0.0),  # refills stop at the burst
    ],
)
def test_take_token(tokens, elapsed_s, allowed, remaining, retry_after_s):
    """The bucket refills at the rate, up to the burst; a refusal says how long to wait."""
    _, verdict = take_token(tokens, 0.0, elapsed_s, LIMITS)
    assert (verdict.allowed, verdict.remaining) == (allowed, remaining)
    assert verdict.retry_after_s == pytest.approx(retry_after_s)


def test_refusal_headers_carry_retry_after_and_ratelimit_fields():
    """A refusal says when to retry, in whole seconds, and the bucket's size."""
    _, verdict = take_token(0.0, 0.0, 0.0, TenantLimits(rate_per_s=0.5, burst=4))
    assert verdict.headers() == {
        "RateLimit-Limit": "4", "RateLimit-Remaining": "0", "RateLimit-Reset": "2",
        "Retry-After": "2",
    }  # fmt: skip


async def test_memory_buckets_are_per_tenant():
    """One tenant emptying its bucket leaves another's untouched."""
    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    acme = [(await limiter.check("acme", LIMITS)).allowed for _ in range(4)]
    globex = [(await limiter.check("globex", LIMITS)).allowed for _ in range(3)]
    now[0] = 0.5
    again = (await limiter.check("acme", LIMITS)).allowed
    assert acme == [True, True, True, False]
    assert globex == [True, True, True]
    assert again is True


async def test_replicas_share_one_bucket_through_redis(redis_server):
    """Two replicas draw from the same bucket: together they get the burst, no more."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    await client.delete("aigw:ratelimit:shared-tenant")
    await client.aclose()
    limits = TenantLimits(rate_per_s=0.01, burst=4)
    first, second = RedisRateLimiter(redis_server.url), RedisRateLimiter(redis_server.url)
    try:
        verdicts = [
            (await limiter.check("shared-tenant", limits)).allowed
            for limiter in (first, second, first, second, first, second)
        ]
    finally:
        await first.close()
        await second.close()
    assert verdicts == [True, True, True, True, False, False]


async def test_replicas_with_skewed_clocks_still_share_one_rate(redis_server, monkeypatch):
    """Two replicas whose clocks differ by 30 s, asked in turn as a load balancer would:
    together they allow the burst plus the rate for the time elapsed, as one replica would."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    await client.delete("aigw:ratelimit:skewed-tenant")
    await client.aclose()
    limits = TenantLimits(rate_per_s=1, burst=5)
    behind, ahead = RedisRateLimiter(redis_server.url), RedisRateLimiter(redis_server.url)
    real_time = time.time
    allowed, started = 0, time.monotonic()
    try:
        while time.monotonic() - started < 1.5:
            for limiter, skew_s in ((behind, 0.0), (ahead, 30.0)):
                clock = SimpleNamespace(time=lambda skew_s=skew_s: real_time() + skew_s)
                monkeypatch.setattr(rate_limit, "time", clock)  # this replica's wall clock
                allowed += (await limiter.check("skewed-tenant", limits)).allowed
            await asyncio.sleep(0.01)
    finally:
        monkeypatch.undo()
        await behind.close()
        await ahead.close()
    elapsed_s = time.monotonic() - started
    assert behind.errors == ahead.errors == 0  # every check was Redis's
    assert allowed <= limits.burst + math.ceil(elapsed_s * limits.rate_per_s) + 1


@pytest.mark.parametrize(
    ("ahead_s", "kept"),
    [
        (1.0, True),  # Redis's clock stepped back a little: no refill until that time comes
        (3600.0, False),  # another server's clock (a failover): go on from now, no refill
    ],
)
async def test_a_bucket_stamped_in_the_future(redis_server, ahead_s, kept):
    """A bucket last updated later than Redis's clock now says is never refilled for that
    time again; a stamp further ahead than a whole refill (1.5 s here) is another clock's,
    which must not refuse the tenant until it catches up."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    seconds, micros = await client.time()
    later = seconds + micros / 1e6 + ahead_s
    await client.hset("aigw:ratelimit:future-tenant", mapping={"t": 0, "u": later})
    limiter = RedisRateLimiter(redis_server.url)
    try:
        verdicts = [(await limiter.check("future-tenant", LIMITS)).allowed for _ in range(3)]
        stored = float(await client.hget("aigw:ratelimit:future-tenant", "u"))
    finally:
        await limiter.close()
        await client.aclose()
    assert verdicts == [False, False, False]  # an empty bucket stays empty either way
    assert (stored == pytest.approx(later, abs=1e-3)) is kept


async def test_unreachable_redis_falls_back_to_a_local_bucket(unreachable_redis_url):
    """Redis down: the replica limits on its own bucket rather than refusing everyone."""
    limiter = RedisRateLimiter(unreachable_redis_url)
    try:
        verdicts = [(await limiter.check("acme", LIMITS)).allowed for _ in range(4)]
    finally:
        await limiter.close()
    assert verdicts == [True, True, True, False]
    assert limiter.errors == 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_workers_draw_from_one_shared_bucket(tmp_path):
    """Two workers' limiters on one file: the tenant's burst is the gateway's, not each's."""
    clock = Clock()
    first = SharedRateLimiter(tmp_path / "buckets", clock)
    second = SharedRateLimiter(tmp_path / "buckets", clock)
    verdicts = [await limiter.check("acme", LIMITS) for limiter in (first, second) * 3]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False, False]
    assert (await second.check("other", LIMITS)).allowed  # each tenant has its own slot
    clock.now += 0.5  # one token refilled, seen by both
    assert (await second.check("acme", LIMITS)).allowed
    assert not (await first.check("acme", LIMITS)).allowed
    assert first.fallbacks == second.fallbacks == 0
    await first.close()
    await second.close()


CHILD = """
import asyncio, sys
from gateway.auth import TenantLimits
from gateway.rate_limit import SharedRateLimiter

async def main():
    limiter = SharedRateLimiter(__import__("pathlib").Path(sys.argv[1]))
    limits = TenantLimits(rate_per_s=0.001, burst=25)
    shared = 0
    for _ in range(200):
        before = limiter.fallbacks
        if (await limiter.check("acme", limits)).allowed and limiter.fallbacks == before:
            shared += 1
    print(shared, limiter.fallbacks)

asyncio.run(main())
"""


def test_worker_processes_together_allow_one_burst(tmp_path):
    """Four real processes take tokens at once from one file: 25 allowed in all, not 100."""
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "buckets")],
                         stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        for _ in range(4)
    ]  # fmt: skip
    results = [child.communicate(timeout=60)[0].split() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sum(int(shared) for shared, _ in results) == 25  # the one bucket's burst, exactly
    fallbacks = sum(int(f) for _, f in results)
    assert fallbacks <= 8, fallbacks  # rare: a lock holder descheduled for milliseconds


async def test_a_lock_held_elsewhere_falls_back_to_the_workers_own_bucket(tmp_path):
    """A sibling stopped while holding the lock must not stop this worker's event loop."""
    limiter = SharedRateLimiter(tmp_path / "buckets")
    holder = os.open(tmp_path / "buckets", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        verdict = await limiter.check("acme", LIMITS)
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert verdict.allowed and limiter.fallbacks == 1
    assert (await limiter.check("acme", LIMITS)).allowed and limiter.fallbacks == 1
    await limiter.close()


async def test_a_tenant_finding_no_free_slot_is_limited_locally(tmp_path, monkeypatch):
    monkeypatch.setattr(rate_limit, "SHARED_SLOTS", 2)
    limiter = SharedRateLimiter(tmp_path / "buckets")
    for tenant in ("a", "b", "c"):
        assert (await limiter.check(tenant, LIMITS)).allowed
    assert limiter.fallbacks == 1  # the third tenant
    await limiter.close()


async def test_a_bucket_from_another_boot_starts_full(tmp_path):
    """CLOCK_MONOTONIC restarts at boot: a slot updated "in the future" is a new bucket."""
    clock = Clock()
    limiter = SharedRateLimiter(tmp_path / "buckets", clock)
    for _ in range(3):
        await limiter.check("acme", LIMITS)
    assert not (await limiter.check("acme", LIMITS)).allowed
    clock.now = 5.0  # after a reboot, the file still there
    assert (await limiter.check("acme", LIMITS)).allowed
    await limiter.close()


@pytest.mark.parametrize(
    ("workers_dir", "expected"), [(True, SharedRateLimiter), (False, MemoryRateLimiter)]
)
async def test_the_workers_of_one_gateway_share_buckets_and_a_lone_process_keeps_its_own(
    tmp_path, workers_dir, expected
):
    settings = settings_for(REPO, workers_dir=tmp_path if workers_dir else None)
    runtime = start_runtime(settings, load_configuration(settings, {}), baselines={})
    try:
        assert type(runtime.rate_limiter) is expected
    finally:
        await runtime.close()
