"""The jobs queue: tenants served in turn, each bounded to its share, the whole bounded."""

from __future__ import annotations

import asyncio

import pytest

from gateway.fair_queue import FairQueue, QueueFull, TenantQueueFull


def queue(maxsize: int = 100, tenant_max: int = 100) -> FairQueue[tuple[str, int]]:
    return FairQueue(maxsize, tenant_max, tenant_of=lambda item: item[0])


async def taken(waiting: FairQueue, count: int) -> list:
    return [await waiting.get() for _ in range(count)]


async def test_tenants_are_served_in_turn_each_in_its_own_order():
    """acme's backlog of four does not make globex or initech wait behind it."""
    waiting = queue()
    for item in [("acme", 1), ("acme", 2), ("acme", 3), ("acme", 4), ("globex", 1),
                 ("initech", 1), ("globex", 2)]:  # fmt: skip
        waiting.put_nowait(item)
    assert await taken(waiting, 7) == [
        ("acme", 1), ("globex", 1), ("initech", 1),
        ("acme", 2), ("globex", 2),
        ("acme", 3), ("acme", 4),
    ]  # fmt: skip
    assert waiting.qsize() == 0


async def test_a_tenant_arriving_later_is_served_within_one_round():
    waiting = queue()
    for n in range(5):
        waiting.put_nowait(("acme", n))
    assert await taken(waiting, 1) == [("acme", 0)]
    waiting.put_nowait(("globex", 0))
    assert await taken(waiting, 2) == [("acme", 1), ("globex", 0)]


async def test_a_tenant_holding_its_share_is_refused_while_others_still_get_in():
    waiting = queue(maxsize=5, tenant_max=2)
    waiting.put_nowait(("acme", 1))
    waiting.put_nowait(("acme", 2))
    with pytest.raises(TenantQueueFull):
        waiting.put_nowait(("acme", 3))
    waiting.put_nowait(("globex", 1))
    assert (waiting.waiting_for("acme"), waiting.waiting_for("globex")) == (2, 1)
    await waiting.get()  # acme's first leaves: acme has room again
    waiting.put_nowait(("acme", 3))
    assert waiting.qsize() == 3


async def test_the_whole_queue_stays_bounded():
    waiting = queue(maxsize=3, tenant_max=2)
    for item in [("acme", 1), ("acme", 2), ("globex", 1)]:
        waiting.put_nowait(item)
    with pytest.raises(QueueFull) as refused:
        waiting.put_nowait(("initech", 1))
    assert not isinstance(refused.value, TenantQueueFull)  # the gateway's capacity, not its own
    with pytest.raises(TenantQueueFull):  # over its share: said so even when the queue is full
        waiting.put_nowait(("acme", 3))
    assert waiting.qsize() == 3


async def test_get_waits_for_an_item_and_a_cancelled_get_takes_none():
    waiting = queue()
    cancelled = asyncio.create_task(waiting.get())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    getter = asyncio.create_task(waiting.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    waiting.put_nowait(("acme", 1))
    assert await asyncio.wait_for(getter, 1) == ("acme", 1)
    assert cancelled.cancelled()


async def test_join_waits_until_every_item_is_done():
    waiting = queue()
    await asyncio.wait_for(waiting.join(), 1)  # nothing put: nothing to wait for
    waiting.put_nowait(("acme", 1))
    waiting.put_nowait(("globex", 1))
    joined = asyncio.create_task(waiting.join())
    await taken(waiting, 2)
    waiting.task_done()
    await asyncio.sleep(0.01)
    assert not joined.done()
    waiting.task_done()
    await asyncio.wait_for(joined, 1)
