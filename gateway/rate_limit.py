"""Per-tenant rate limits: token buckets, in memory by default, shared through Redis.

A bucket holds up to `burst` tokens and refills at `rate_per_s`; each request takes one.
In Redis one Lua script updates a tenant's bucket atomically, by Redis's own clock, so every
replica draws from the same bucket whatever its own clock says. With Redis unreachable a
replica falls back to its own in-memory bucket (each replica then allows the full rate:
limits loosen, requests are never refused for it).

The worker processes of one `aigw serve --workers N` share their buckets without Redis, in a
small memory-mapped file in the workers' directory (`SharedRateLimiter`), so a tenant gets
its rate from the gateway, not N times it. A worker never blocks on another's lock: it tries
a few times over a few milliseconds, and if a sibling still holds it (stopped while holding
it, say), that request is counted against the worker's own bucket instead.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


# One slot per tenant: a 16-byte digest of its name (all zeros: free), tokens, updated at.
_SLOT = struct.Struct("16sdd")
SHARED_SLOTS = 4096  # tenants; far more than a keys file names (128 KiB)
# Waits between tries for a sibling's lock: it holds it for microseconds, unless the scheduler
# took its core meanwhile. A few milliseconds in all (the loop's timers are coarser than these),
# awaited, never blocking the loop; then this request uses the worker's own bucket.
_LOCK_WAITS_S = (0.0, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3)


class SharedRateLimiter:
    """Buckets shared by the worker processes of one machine, in a memory-mapped file.

    Every worker maps the same file and updates a tenant's slot under an exclusive `flock`,
    with `time.monotonic()` (one clock for every process of the machine). A tenant that finds
    no free slot, or a lock held too long, is limited by this worker's own bucket.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._local = MemoryRateLimiter(clock)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SHARED_SLOTS * _SLOT.size
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # zero-filled: every slot free
        self._map = mmap.mmap(self._fd, size)
        self._slots: dict[str, int] = {}  # tenant → its slot, once found
        self.fallbacks = 0

    async def check(self, tenant: str, limits: TenantLimits) -> Verdict:
        for wait_s in _LOCK_WAITS_S:
            if wait_s:
                await asyncio.sleep(wait_s)  # the loop serves others meanwhile
            if not self._try_lock():
                continue
            try:  # nothing awaits while the lock is held
                offset = self._slot_of(tenant)
                if offset is not None:
                    return self._take(offset, limits)
                break
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.fallbacks += 1
        return await self._local.check(tenant, limits)

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _take(self, offset: int, limits: TenantLimits) -> Verdict:
        key, tokens, updated_at = _SLOT.unpack_from(self._map, offset)
        now = self._clock()
        if updated_at == 0.0 or updated_at > now:  # a new bucket (or another boot's clock)
            tokens, updated_at = float(limits.burst), now
        tokens, verdict = take_token(tokens, updated_at, now, limits)
        _SLOT.pack_into(self._map, offset, key, tokens, now)
        return verdict

    def _slot_of(self, tenant: str) -> int | None:
        """The tenant's slot (claimed if new; open addressing), or None when all are taken."""
        known = self._slots.get(tenant)
        if known is not None:
            return known
        key = hashlib.blake2b(tenant.encode(), digest_size=16).digest()
        start = int.from_bytes(key[:4], "little") % SHARED_SLOTS
        for probe in range(SHARED_SLOTS):
            offset = (start + probe) % SHARED_SLOTS * _SLOT.size
            found = self._map[offset : offset + 16]
            if found == key or found == bytes(16):
                if found != key:
                    _SLOT.pack_into(self._map, offset, key, 0.0, 0.0)
                self._slots[tenant] = offset
                return offset
        log.warning("shared rate limits: no free slot; this worker limits the tenant alone")
        return None

    async def close(self) -> None:
        self._map.close()
        os.close(self._fd)


# KEYS[1] bucket; ARGV: rate, burst. Returns {allowed, tokens*1000, wait*1000}.
# `now` is Redis's own clock, never a replica's: replicas' clocks differ, and a replica ahead
# of the others would see the difference as elapsed time and refill the bucket on every call.
# The stored time never moves backwards (Redis's clock may step back), so a bucket is never
# refilled twice for the same time; but one further ahead than a whole refill takes is another
# clock's (a failover to a server whose clock is behind), and waiting for it would refuse
# the tenant until that clock catches up: the bucket then goes on from now, without refilling.
_TAKE_TOKEN = """
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
if updated - now > burst / rate then updated = now end
now = math.max(now, updated)
tokens = math.min(burst, tokens + (now - updated) * rate)
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
                    args=[limits.rate_per_s, limits.burst],
                )
        except (RedisError, OSError, TimeoutError) as error:
            self.errors += 1
            log.warning("rate limit falls back to local", extra={"error": type(error).__name__})
            return await self._local.check(tenant, limits)
        remaining = int(tokens_milli) // 1000
        return Verdict(bool(allowed), limits.burst, remaining, int(wait_ms) / 1000)

    async def close(self) -> None:
        await self._redis.aclose()
