"""Following a channel outlives what ends one round of it: a lost Redis, or a bug."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.redis_follow import follow_with_backoff


@pytest.mark.parametrize(
    "failure", [RedisConnectionError("gone"), OSError("reset"), ValueError("a bug")]
)
async def test_following_goes_on_after_a_round_ends_in_any_error(failure):
    rounds: list[int] = []
    followed_again = asyncio.Event()
    follower = SimpleNamespace(connected=True)

    async def follow() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise failure
        followed_again.set()
        await asyncio.Event().wait()  # follows until cancelled, as a real round does

    task = asyncio.create_task(follow_with_backoff(follow, follower, "test", 0.01, 0.01))
    try:
        await asyncio.wait_for(followed_again.wait(), timeout=5)
    finally:
        task.cancel()
    assert len(rounds) == 2
    assert follower.connected is False  # nothing set it again in this stand-in round
