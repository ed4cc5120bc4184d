"""Breaker openings shared by every replica through Redis.

When one replica's breaker opens on its own evidence, it publishes the opening (and keeps
it in a key that expires when the open period ends); every other replica opens the same
breaker until the same moment, so a dead backend is spared the traffic of all replicas,
not just one. Closing stays local: each replica probes for itself once the period ends.

Redis is never on the request path. Breakers call `_enqueue` synchronously (a queue put);
a background task publishes, another subscribes. With Redis unreachable, each replica
keeps working on its local breakers and retries the connection with backoff.

Open-until moments travel as wall-clock times, so replicas' clocks should be synchronised
(NTP); a skew of a second shortens or lengthens a shared opening by that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.redis_follow import follow_with_backoff
from gateway.resilience import Breaker

log = logging.getLogger("gateway.breaker_sync")

CHANNEL = "aigw:breakers"
KEY_PREFIX = "aigw:breaker:"
REDIS_TIMEOUT_S = 0.5
MAX_BACKOFF_S = 5.0


def opening_message(breaker: str, until: float, replica: str) -> dict[str, Any]:
    return {"breaker": breaker, "until": until, "replica": replica}


def remaining_open_s(message: Mapping[str, Any], replica: str, wall_now: float) -> float | None:
    """How long a peer's opening still holds here, or None when it does not apply."""
    if not isinstance(message, Mapping) or message.get("replica") == replica:
        return None
    until = message.get("until")
    if not isinstance(until, int | float) or isinstance(until, bool):
        return None
    remaining = until - wall_now
    return remaining if remaining > 0 else None


class BreakerSync:
    """Publishes local breaker openings and adopts those of other replicas."""

    def __init__(
        self,
        redis_url: str,
        breakers: Mapping[str, Breaker],
        replica_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.replica_id = replica_id or uuid.uuid4().hex
        self.connected = False
        self._breakers = breakers
        self._clock, self._wall = clock, wall_clock
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1024)
        self._tasks: list[asyncio.Task] = []
        for breaker in breakers.values():
            breaker.on_trip(self._enqueue)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="breaker-sync-publish"),
            asyncio.create_task(self._subscribe_forever(), name="breaker-sync-subscribe"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    def adopt(self, message: Mapping[str, Any]) -> bool:
        """Open our copy of a peer's breaker until the peer's moment; True when adopted."""
        breaker = self._breakers.get(str(message.get("breaker"))) if message else None
        remaining = remaining_open_s(message, self.replica_id, self._wall())
        if breaker is None or remaining is None:
            return False
        breaker.force_open(self._clock(), remaining)
        return True

    def _enqueue(self, breaker: Breaker, open_for_s: float) -> None:
        message = opening_message(breaker.name, self._wall() + open_for_s, self.replica_id)
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("breaker sync outbox full; opening not shared", extra=message)

    async def _publish_forever(self) -> None:
        while True:
            message = await self._outbox.get()
            ttl_ms = max(1, int((message["until"] - self._wall()) * 1000))
            payload = orjson.dumps(message)
            try:
                await self._redis.set(KEY_PREFIX + message["breaker"], payload, px=ttl_ms)
                await self._redis.publish(CHANNEL, payload)
            except (RedisError, OSError, TimeoutError) as error:
                self.connected = False
                log.warning("breaker opening not shared", extra={"error": type(error).__name__})

    async def _subscribe_forever(self) -> None:
        await follow_with_backoff(
            self._follow_peers, self, "breaker sync", REDIS_TIMEOUT_S, MAX_BACKOFF_S
        )

    async def _follow_peers(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            await self._adopt_current_openings()  # after subscribing, so nothing falls between
            self.connected = True
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self.adopt(_decode(message.get("data")))

    async def _adopt_current_openings(self) -> None:
        names = list(self._breakers)
        values = await self._redis.mget([KEY_PREFIX + name for name in names])
        for value in values:
            if value is not None:
                self.adopt(_decode(value))


def _decode(data: Any) -> dict[str, Any]:
    try:
        message = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return message if isinstance(message, dict) else {}
