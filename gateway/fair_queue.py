"""A bounded queue that serves tenants in turn, so one tenant's backlog never starves another.

The in-process jobs backend (gateway/job_memory.py) used to keep one FIFO queue: a tenant
within its rate limit could fill it, and every other tenant's submits were then refused, and
its jobs, once in, waited behind the whole backlog. Here each tenant has its own FIFO line;
workers take one job from each tenant with waiting jobs in turn (round robin), and a tenant
may hold at most `tenant_max` waiting jobs, so the rest of the queue stays open to others.
The whole queue is still bounded by `maxsize`. Jobs are never dropped once accepted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every place in the queue is taken."""


class TenantQueueFull(QueueFull):
    """This tenant holds its share of the queue already; others may still have room."""


class FairQueue(Generic[T]):
    """Waiting items, one line per tenant, served round robin; asyncio.Queue's interface
    where the backend uses it (`put_nowait`, `get`, `task_done`, `join`, `qsize`)."""

    def __init__(self, maxsize: int, tenant_max: int, tenant_of: Callable[[T], str]) -> None:
        self.maxsize = maxsize
        self.tenant_max = tenant_max
        self._tenant_of = tenant_of
        self._lines: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting items, next to serve first
        self._size = 0
        self._available = asyncio.Semaphore(0)  # one permit per waiting item
        self._unfinished = 0
        self._finished = asyncio.Event()
        self._finished.set()

    def qsize(self) -> int:
        return self._size

    def waiting_for(self, tenant: str) -> int:
        line = self._lines.get(tenant)
        return 0 if line is None else len(line)

    def put_nowait(self, item: T) -> None:
        """Add `item` at the end of its tenant's line, or raise QueueFull / TenantQueueFull."""
        tenant = self._tenant_of(item)
        line = self._lines.get(tenant)
        # The tenant's own share first: over it, waiting is its own doing, whatever the rest.
        if line is not None and len(line) >= self.tenant_max:
            raise TenantQueueFull(f"{self.tenant_max} jobs of this tenant are already waiting")
        if self._size >= self.maxsize:
            raise QueueFull(f"{self.maxsize} jobs are already waiting")
        if line is None:
            line = self._lines[tenant] = deque()
            self._turns.append(tenant)
        line.append(item)
        self._size += 1
        self._unfinished += 1
        self._finished.clear()
        self._available.release()

    async def get(self) -> T:
        """The first item of the tenant whose turn it is (waits while the queue is empty)."""
        await self._available.acquire()
        tenant = self._turns.popleft()
        line = self._lines[tenant]
        item = line.popleft()
        self._size -= 1
        if line:
            self._turns.append(tenant)  # its next item waits for every other tenant's turn
        else:
            del self._lines[tenant]
        return item

    def task_done(self) -> None:
        """One item taken by `get` is dealt with (for `join`)."""
        self._unfinished -= 1
        if self._unfinished <= 0:
            self._finished.set()

    async def join(self) -> None:
        """Wait until every item put has been taken and marked done."""
        await self._finished.wait()
