"""Prediction caching: one interface, an in-memory LRU (default) and Redis (shared by replicas).

Keys cover everything that could change an answer: the model, the arm's primary target and
its pinned version, the contract version and the canonical features (key order and number
formatting do not matter), plus the tenant when the policy scopes entries per tenant. A new
model version, target or contract therefore never serves an old answer.

Only primary answers are cached as good ones. Each is also kept, longer, as a stale copy
that the chain's `stale-cache` step may serve when every model fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("gateway.cache")

T = TypeVar("T")
KEY_PREFIX = "aigw:pred:"
STALE_PREFIX = "aigw:stale:"


class CachedPrediction(NamedTuple):
    """One kept answer."""

    prediction: str
    probability: float
    model_version: str
    served_by: str

    def to_json(self) -> bytes:
        return orjson.dumps(self._asdict())

    @classmethod
    def from_json(cls, data: bytes) -> CachedPrediction | None:
        try:
            raw = orjson.loads(data)
            return cls(
                prediction=str(raw["prediction"]),
                probability=float(raw["probability"]),
                model_version=str(raw["model_version"]),
                served_by=str(raw["served_by"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


Entry = tuple[str, CachedPrediction, float]  # key, value, TTL in seconds


def cache_key(
    model_id: str,
    target: str,
    answer_spec: str,
    contract_version: str,
    features: Mapping[str, Any],
    tenant: str | None = None,
) -> str:
    """The key of one exact input; features must already be canonical (see contracts.py).
    `answer_spec` (Policy.answer_spec) names everything that shapes the target's answer."""
    material = orjson.dumps(
        [model_id, target, answer_spec, contract_version, tenant, features],
        option=orjson.OPT_SORT_KEYS,
    )
    return KEY_PREFIX + hashlib.sha256(material).hexdigest()


def stale_key(key: str) -> str:
    """Where the longer-lived stale copy of `key`'s answer is kept."""
    return STALE_PREFIX + key.removeprefix(KEY_PREFIX)


class PredictionCache(Protocol):
    """Where answers are kept. Errors never escape: a failing store is a miss.

    `within_s` is what the request may still spend: a store with round trips gives up
    after that long (a miss, a write not made), so a slow store never makes an answer late."""

    async def get(self, key: str, within_s: float | None = None) -> CachedPrediction | None: ...

    async def set(self, key: str, value: CachedPrediction, ttl_s: float) -> None: ...

    async def set_many(self, entries: Sequence[Entry], within_s: float | None = None) -> None:
        """Each (key, value, ttl_s), in one round trip where the store has round trips."""
        ...

    async def close(self) -> None: ...


class MemoryCache:
    """An LRU bounded in entries, with a TTL per entry; the default, per process."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        # (expires_at, *answer) as a plain tuple of plain values, which the cyclic garbage
        # collector stops tracking (a NamedTuple it never does): a hundred thousand entries
        # would otherwise be walked by every full collection (see gateway/garbage.py).
        self._entries: OrderedDict[str, tuple[float, str, float, str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, within_s: float | None = None) -> CachedPrediction | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return CachedPrediction._make(entry[1:])

    async def set(self, key: str, value: CachedPrediction, ttl_s: float) -> None:
        self._entries[key] = (self._clock() + ttl_s, *value)
        self._entries.move_to_end(key)
        self._evict_beyond_bound()

    def resize(self, max_entries: int) -> None:
        """Hold at most `max_entries` from now on, the least recently used going first."""
        self.max_entries = max_entries
        self._evict_beyond_bound()

    def _evict_beyond_bound(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def set_many(self, entries: Sequence[Entry], within_s: float | None = None) -> None:
        for key, value, ttl_s in entries:
            await self.set(key, value, ttl_s)

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Entries in Redis, shared by every replica.

    Redis sits on the request path here, so every call is bounded by a short timeout, and
    after a failure Redis is left alone for `retry_after_s`: a dead Redis costs requests
    nothing but their cache, and `errors` counts what it cost.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.05,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._resting_until = 0.0
        self.errors = 0

    @property
    def available(self) -> bool:
        return self._clock() >= self._resting_until

    async def get(self, key: str, within_s: float | None = None) -> CachedPrediction | None:
        data = await self._call(self._redis.get(key), within_s)
        return CachedPrediction.from_json(data) if data else None

    async def set(self, key: str, value: CachedPrediction, ttl_s: float) -> None:
        await self._call(self._redis.set(key, value.to_json(), px=_milliseconds(ttl_s)))

    async def set_many(self, entries: Sequence[Entry], within_s: float | None = None) -> None:
        # A miss keeps its answer and its stale copy: one round trip on the request's path,
        # not one per key. Not a transaction: either write alone is a valid cache state.
        pipe = self._redis.pipeline(transaction=False)
        for key, value, ttl_s in entries:
            pipe.set(key, value.to_json(), px=_milliseconds(ttl_s))
        await self._call(pipe.execute(), within_s)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, operation: Awaitable[Any], within_s: float | None = None) -> Any:
        own_limit_s = self._timeout_s * 2
        if not self.available or (within_s is not None and within_s <= 0):
            _discard(operation)
            return None
        cut_short = within_s is not None and within_s < own_limit_s
        try:
            async with asyncio.timeout(within_s if cut_short else own_limit_s):
                return await operation
        except (RedisError, OSError, TimeoutError) as error:
            if cut_short and isinstance(error, TimeoutError):
                return None  # the request ran out of time: that says nothing of Redis's health
            self.errors += 1
            self._resting_until = self._clock() + self._retry_after_s
            log.warning("redis cache unavailable", extra={"error": type(error).__name__})
            return None


def _milliseconds(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


def _discard(operation: Awaitable[Any]) -> None:
    close = getattr(operation, "close", None)
    if close is not None:
        close()  # an un-awaited coroutine must be closed, or Python warns about it


class SingleFlight:
    """Concurrent identical misses share one computation instead of each calling a backend.

    A follower takes the leader's result only within its own time (`wait_s`) and only when
    `shareable` says so: the leader's run spent the leader's budget, through the leader's
    chain, so a degraded result says how the leader fared, not how this caller must. A
    follower that will not take it runs its own computation, alone."""

    def __init__(self) -> None:
        self._in_flight: dict[str, asyncio.Future] = {}
        self.coalesced = 0

    async def run(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        wait_s: float | None = None,
        shareable: Callable[[T], bool] = lambda result: True,
    ) -> tuple[T, bool]:
        """The result for `key`, and whether it was shared from another caller's run."""
        while (existing := self._in_flight.get(key)) is not None:
            try:
                async with asyncio.timeout(wait_s):
                    result = await asyncio.shield(existing)
            except TimeoutError:
                return await compute(), False  # out of time to wait: answer with what is left
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not existing.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller itself was cancelled
                continue  # the leader was cancelled, not this caller: lead (or join) anew
            if not shareable(result):
                return await compute(), False
            self.coalesced += 1
            return result, True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await compute()
        except asyncio.CancelledError:
            future.cancel()  # followers take over; they are not cancelled themselves
            raise
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: followers re-raise it, nobody else must
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            del self._in_flight[key]
