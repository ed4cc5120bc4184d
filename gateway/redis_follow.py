"""Following a Redis channel for as long as the process runs, reconnecting with backoff.

Replicas learn breaker openings and policy versions from their peers this way. A lost
connection is logged once, retried soon, then ever more slowly (capped); requests never
wait on any of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.exceptions import RedisError

log = logging.getLogger("gateway.redis_follow")


class Follower(Protocol):
    connected: bool


async def follow_with_backoff(
    follow: Callable[[], Awaitable[None]],
    follower: Follower,
    name: str,
    first_backoff_s: float = 0.2,
    max_backoff_s: float = 5.0,
) -> None:
    """Run `follow` again whenever Redis drops it; `follow` sets `follower.connected`."""
    backoff = first_backoff_s
    while True:
        try:
            await follow()
        except (RedisError, OSError, TimeoutError) as error:
            if follower.connected:
                log.warning(f"{name} lost redis", extra={"error": type(error).__name__})
                backoff = first_backoff_s  # it was up a moment ago: try again soon
            follower.connected = False
        except Exception:
            # A bug, or a failure this loop does not know (the audit log refusing a peer's
            # policy record, say): following must outlive it, or the replica stops learning
            # its peers' changes for the rest of its life.
            log.exception(f"{name} failed; following again")
            follower.connected = False
        await asyncio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)
