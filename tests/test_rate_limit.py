"""Token buckets per tenant: the pure rule, in memory, and shared through a real Redis."""

from __future__ import annotations

import pytest

from gateway.auth import TenantLimits
from gateway.rate_limit import MemoryRateLimiter, RedisRateLimiter, take_token

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


async def test_unreachable_redis_falls_back_to_a_local_bucket(unreachable_redis_url):
    """Redis down: the replica limits on its own bucket rather than refusing everyone."""
    limiter = RedisRateLimiter(unreachable_redis_url)
    try:
        verdicts = [(await limiter.check("acme", LIMITS)).allowed for _ in range(4)]
    finally:
        await limiter.close()
    assert verdicts == [True, True, True, False]
    assert limiter.errors == 4
