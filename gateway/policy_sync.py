"""Policy versions shared by every replica through Redis, and by sibling workers through a file.

An apply on one replica is published (and kept under a key, for replicas that start
later); every other replica validates the same bundle itself and applies it, or refuses it
and reports why, exactly as for a local change. Redis is never on the request path; with
Redis unreachable each replica keeps the version it runs and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.atomic_files import replace_file
from gateway.policy_manager import PolicyManager
from gateway.policy_store import Bundle, BundleError, PolicyVersion
from gateway.redis_follow import follow_with_backoff

log = logging.getLogger("gateway.policy_sync")

CHANNEL = "aigw:policy"
CURRENT_KEY = "aigw:policy:current"
MAX_BACKOFF_S = 5.0


class PolicySync:
    """Publishes this replica's applies and applies those of its peers."""

    def __init__(self, redis_url: str, manager: PolicyManager, replica_id: str | None = None):
        self.replica_id = replica_id or uuid.uuid4().hex
        self.connected = False
        self._manager = manager
        self._redis = aioredis.from_url(redis_url, socket_connect_timeout=1.0)
        self._task: asyncio.Task | None = None
        manager.on_applied(self._publish)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow_forever(), name="policy-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _publish(self, version: PolicyVersion) -> None:
        message = version_message(self.replica_id, version)
        if message is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await self._redis.set(CURRENT_KEY, message)
                await self._redis.publish(CHANNEL, message)
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("policy version not shared", extra={"error": type(error).__name__})

    async def _follow_forever(self) -> None:
        await follow_with_backoff(self._follow, self, "policy sync", 0.2, MAX_BACKOFF_S)

    async def _follow(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            current = await self._redis.get(CURRENT_KEY)  # after subscribing: nothing is missed
            if current is not None:
                await self._adopt(current)
            self.connected = True
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    await self._adopt(message["data"])

    async def _adopt(self, data: Any) -> None:
        await adopt_message(self._manager, self.replica_id, data)


class PolicyFileSync:
    """Policy versions shared by the worker processes of one `aigw serve --workers N`.

    Siblings share a directory, not necessarily a Redis: an apply in one worker (the admin
    API is served by worker 0) is written to one file, atomically replaced, and every other
    worker polls it and applies the same bundle, exactly as replicas do through Redis. A
    worker that starts later (a restart) adopts the current version first.
    """

    def __init__(
        self, path: Path, manager: PolicyManager, replica_id: str, interval_s: float = 0.25
    ):
        self.replica_id = replica_id
        self._path = Path(path)
        self._manager = manager
        self._interval_s = interval_s
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task | None = None
        manager.on_applied(self._publish)

    async def start(self) -> None:
        await self._poll()  # before serving: a restarted worker runs what its siblings run
        self._task = asyncio.create_task(self._follow_forever(), name="policy-file-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _publish(self, version: PolicyVersion) -> None:
        message = version_message(self.replica_id, version)
        if message is None:
            return
        try:
            await asyncio.to_thread(replace_file, self._path, message)
        except OSError as error:
            log.warning("policy version not shared", extra={"error": str(error)})

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._poll()

    async def _poll(self) -> None:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        with contextlib.suppress(OSError):
            await adopt_message(self._manager, self.replica_id, self._path.read_bytes())


def version_message(origin: str, version: PolicyVersion) -> bytes | None:
    """What peers are told of an applied version; None for one learnt from a peer."""
    if version.source.startswith("peer:"):
        return None  # learnt from a peer: it has been published already
    return orjson.dumps(
        {
            "origin": origin,
            "author": version.author,
            "content_hash": version.content_hash,
            "bundle": version.bundle.to_dict(),
        }
    )


async def adopt_message(manager: PolicyManager, own_id: str, data: Any) -> None:
    """Apply a peer's version, validated here as any change is; malformed ones are ignored."""
    try:
        message = orjson.loads(data)
        if message.get("origin") == own_id:
            return
        bundle = Bundle.from_dict(message.get("bundle"))
    except (orjson.JSONDecodeError, AttributeError, BundleError):
        log.warning("malformed policy message ignored")
        return
    author = str(message.get("author", "unknown"))[:128]
    origin = str(message.get("origin", "unknown"))[:12]
    with contextlib.suppress(BundleError):  # refused: logged, counted, audited by apply
        await manager.apply(bundle, author=author, source=f"peer:{origin}")
