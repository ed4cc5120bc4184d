"""Per-tenant rate limits: token buckets, in memory by default, shared through Redis.

A bucket holds up to `burst` tokens and refills at `rate_per_s`; each request takes one.
In Redis one Lua script updates a tenant's bucket atomically, so every replica draws from
the same bucket. With Redis unreachable a replica falls back to its own in-memory bucket
(each replica then allows the full rate: limits loosen, requests are never refused for it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth import TenantLimits

log = logging.getLogger("gateway.rate_limit")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        """IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers), and Retry-After."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.retry_after_s)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def take_token(
    tokens: float, updated_at: float, now: float, limits: TenantLimits
) -> tuple[float, Verdict]:
    """Refill a bucket to `now` and take one token if there is one: (new tokens, verdict)."""
    tokens = min(limits.burst, tokens + max(0.0, now - updated_at) * limits.rate_per_s)
    if tokens >= 1.0:
        tokens -= 1.0
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / limits.rate_per_s
        return tokens, Verdict(True, limits.burst, int(tokens), wait)
    wait = (1.0 - tokens) / limits.rate_per_s
    return tokens, Verdict(False, limits.burst, 0, wait)


class MemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    async def check(self, tenant: str, limits: TenantLimits) -> Verdict:
        now = self._clock()
        tokens, updated_at = self._buckets.get(tenant, (float(limits.burst), now))
        tokens, verdict = take_token(tokens, updated_at, now, limits)
        self._buckets[tenant] = (tokens, now)
        return verdict

    async def close(self) -> None:
        return None


# KEYS[1] bucket; ARGV: rate, burst, now (s). Returns {allowed, tokens*1000, wait*1000}.
_TAKE_TOKEN = """
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tokens, 'u', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, math.floor(tokens * 1000), math.ceil(wait * 1000)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by replicas; a local bucket stands in while Redis is down."""

    def __init__(self, url: str, timeout_s: float = 0.05) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self._redis.register_script(_TAKE_TOKEN)
        self._local = MemoryRateLimiter()
        self._timeout_s = timeout_s
        self.errors = 0

    async def check(self, tenant: str, limits: TenantLimits) -> Verdict:
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                allowed, tokens_milli, wait_ms = await self._script(
                    keys=[f"aigw:ratelimit:{tenant}"],
                    args=[limits.rate_per_s, limits.burst, time.time()],
                )
        except (RedisError, OSError, TimeoutError) as error:
            self.errors += 1
            log.warning("rate limit falls back to local", extra={"error": type(error).__name__})
            return await self._local.check(tenant, limits)
        remaining = int(tokens_milli) // 1000
        return Verdict(bool(allowed), limits.burst, remaining, int(wait_ms) / 1000)

    async def close(self) -> None:
        await self._redis.aclose()
