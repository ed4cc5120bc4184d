"""Breaker openings shared by every replica (through Redis) and every worker (through files).

When one process's breaker opens on its own evidence, it tells the others the moment the
opening ends; every other process opens the same breaker until the same moment, so a dead
backend is spared the traffic of all of them, not just one. Closing stays local: each
process probes for itself once the period ends.

Two exchanges carry openings, with the same messages and the same rules:
- `BreakerSync`, across replicas: a Redis channel, and a key per breaker that expires when
  the opening ends (for replicas that join later);
- `BreakerFileSync`, across the workers of one `aigw serve --workers N`: one file per
  breaker in the workers' directory, polled every quarter second (no Redis needed).

Neither is on the request path. A breaker tells its exchange synchronously (a queue put); a
background task publishes, another follows the peers. With the exchange unreachable, each
process keeps working on its local breakers. The exchange reads the live breakers each time
(`breakers_of`), so it follows policy applies: a target whose breaker a new policy replaced
is shared as before (the runtime hooks every new breaker, `Runtime.on_breaker_trip`), and a
breaker an apply creates takes up a peer's opening that still holds (`Runtime.on_new_breaker`).

Open-until moments travel as wall-clock times, so replicas' clocks should be synchronised
(NTP); a skew of a second shortens or lengthens a shared opening by that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.atomic_files import replace_file
from gateway.redis_follow import follow_with_backoff
from gateway.resilience import Breaker

log = logging.getLogger("gateway.breaker_sync")

CHANNEL = "aigw:breakers"
KEY_PREFIX = "aigw:breaker:"
REDIS_TIMEOUT_S = 0.5
MAX_BACKOFF_S = 5.0
FILE_POLL_INTERVAL_S = 0.25
MAX_REMEMBERED = 4096  # peers' latest openings kept before ended ones are dropped

BreakersOf = Callable[[], Mapping[str, Breaker]]


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


class _OpeningExchange:
    """What both exchanges share: publishing our trips, adopting the peers' openings."""

    def __init__(
        self,
        breakers_of: BreakersOf,
        replica_id: str | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.replica_id = replica_id or uuid.uuid4().hex
        self._breakers_of = breakers_of
        self._clock, self._wall = clock, wall_clock
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1024)
        self._tasks: list[asyncio.Task] = []
        # Each breaker's latest opening by a peer, adopted or not: a breaker that a policy
        # apply creates later takes it up (`adopt_latest`), or it would learn only of the
        # peers' next openings, while they keep the current one.
        self._latest: dict[str, Mapping[str, Any]] = {}

    def share(self, breaker: Breaker, open_for_s: float) -> None:
        """A trip hook (`Breaker.on_trip`): queue the opening for the peers."""
        message = opening_message(breaker.name, self._wall() + open_for_s, self.replica_id)
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("breaker sync outbox full; opening not shared", extra=message)

    def adopt(self, message: Mapping[str, Any]) -> bool:
        """Open our copy of a peer's breaker until the peer's moment; True when adopted."""
        remaining = remaining_open_s(message, self.replica_id, self._wall())
        if remaining is None:
            return False
        name = str(message.get("breaker"))
        self._remember(name, message)
        breaker = self._breakers_of().get(name)
        if breaker is None:
            return False
        breaker.force_open(self._clock(), remaining)
        return True

    def adopt_latest(self, breaker: Breaker) -> bool:
        """A new-breaker hook (`Runtime.on_new_breaker`): open `breaker` if a peer's latest
        opening of it still holds; True when it does."""
        message = self._latest.get(breaker.name)
        remaining = remaining_open_s(message, self.replica_id, self._wall()) if message else None
        if remaining is None:
            return False
        breaker.force_open(self._clock(), remaining)
        return True

    def _remember(self, name: str, message: Mapping[str, Any]) -> None:
        self._latest[name] = message
        if len(self._latest) > MAX_REMEMBERED:  # only ended openings go: they open nothing
            now = self._wall()
            for stale in [n for n, m in self._latest.items() if m.get("until", 0) <= now]:
                del self._latest[stale]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class BreakerSync(_OpeningExchange):
    """Publishes local breaker openings to Redis and adopts those of other replicas."""

    def __init__(
        self,
        redis_url: str,
        breakers_of: BreakersOf,
        replica_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(breakers_of, replica_id, clock, wall_clock)
        self.connected = False
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="breaker-sync-publish"),
            asyncio.create_task(self._subscribe_forever(), name="breaker-sync-subscribe"),
        ]

    async def stop(self) -> None:
        await super().stop()
        await self._redis.aclose()

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
        names = list(self._breakers_of())
        if not names:
            return
        values = await self._redis.mget([KEY_PREFIX + name for name in names])
        for value in values:
            if value is not None:
                self.adopt(_decode(value))


class BreakerFileSync(_OpeningExchange):
    """Openings shared by the workers of one machine through files in their directory.

    Each breaker's latest opening is one file (`breakers/<quoted name>.json`), replaced
    whole so a reader never sees half of one; each worker polls the directory and adopts a
    file when it changes. A file outlives its opening harmlessly: an opening that has ended
    is not adopted. A worker starting (or replacing a dead one) adopts the current openings
    before it serves.
    """

    def __init__(
        self,
        directory: Path,
        breakers_of: BreakersOf,
        replica_id: str | None = None,
        interval_s: float = FILE_POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(breakers_of, replica_id, clock, wall_clock)
        self.directory = Path(directory)
        self._interval_s = interval_s
        self._seen: dict[str, tuple[int, int, int]] = {}

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.poll()
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="breaker-file-publish"),
            asyncio.create_task(self._follow_forever(), name="breaker-file-follow"),
        ]

    def poll(self) -> int:
        """Adopt the openings written since the last poll; how many were adopted."""
        adopted = 0
        try:
            entries = [e for e in os.scandir(self.directory) if e.name.endswith(".json")]
        except OSError as error:
            log.warning("breaker openings not read", extra={"error": str(error)})
            return 0
        for entry in entries:
            try:
                stat = entry.stat()
                seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if self._seen.get(entry.name) == seen:
                    continue
                self._seen[entry.name] = seen
                data = Path(entry.path).read_bytes()
            except OSError:
                continue  # replaced or removed while we looked: the next poll sees it
            adopted += self.adopt(_decode(data))
        return adopted

    async def _publish_forever(self) -> None:
        while True:
            message = await self._outbox.get()
            path = self.directory / f"{quote(message['breaker'], safe='')}.json"
            try:
                await asyncio.to_thread(replace_file, path, orjson.dumps(message))
            except OSError as error:
                log.warning("breaker opening not shared", extra={"error": str(error)})

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.poll()


def _decode(data: Any) -> dict[str, Any]:
    try:
        message = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return message if isinstance(message, dict) else {}
