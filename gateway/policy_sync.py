"""Policy versions shared by every replica through Redis.

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
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

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
        if version.source.startswith("peer:"):
            return  # learnt from a peer: it has been published already
        message = orjson.dumps(
            {
                "origin": self.replica_id,
                "author": version.author,
                "content_hash": version.content_hash,
                "bundle": version.bundle.to_dict(),
            }
        )
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
        try:
            message = orjson.loads(data)
            if message.get("origin") == self.replica_id:
                return
            bundle = Bundle.from_dict(message.get("bundle"))
        except (orjson.JSONDecodeError, AttributeError, BundleError):
            log.warning("malformed policy message ignored")
            return
        author = str(message.get("author", "unknown"))[:128]
        with contextlib.suppress(BundleError):  # refused: logged, counted, audited by apply
            await self._manager.apply(
                bundle, author=author, source=f"peer:{message['origin'][:12]}"
            )
