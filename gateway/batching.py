"""Micro-batching: concurrent calls to one target become one call with a batch dimension.

A row that finds the target idle (no batch of this batcher in flight) is sent at once, by
its own caller (no task, no future to hand the answer over): one client never pays the
window, nor the batching machinery. While a batch is in flight, rows gather, and go together when
it returns, when `max_delay_s` has passed since the first of them, or at `max_batch` rows,
whichever is first; the answer is split back, row by row. At most `max_in_flight` batches are
on their way at once: past that, rows wait for a batch to return, because a backend that is
already busy serves one large batch sooner than several small ones queued behind each other.
Load thus batches itself: the busier the target, the larger the batches, and an idle one adds
no delay.

Shadow copies (shadow.py) use a batcher that gathers first (`gather_first`): even at an idle
target a row waits `max_delay_s` for others, and rows that arrive while a batch is in flight
go when the window that began with the first of them ends, or when the batch returns if that
is later (or at `max_batch` rows). Copies, whose answers nobody waits for, so go as few,
large calls, and take as few turns as they can from serving calls on the same backend; none
waits longer than the window plus one call in flight.

Each row keeps its own deadline: a batch that answers too late for one row is a timeout for
that row only. When Triton refuses a batch as malformed, every row is sent again on its own,
so one bad row never fails its batch-mates; any other failure (a timeout, a 5xx) is the
target's, and is every row's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gateway.backends import BackendError, BackendRejected, BackendTimeout

Rows = dict[str, np.ndarray]
Send = Callable[[Rows, float, Mapping[str, str] | None], Awaitable[np.ndarray]]


@dataclass
class _Pending:
    row: Rows
    future: asyncio.Future
    expires_at: float
    headers: Mapping[str, str] | None
    arrived_at: float


def stack_rows(rows: list[Rows]) -> Rows:
    """One array per input tensor, the rows stacked along the batch dimension."""
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


class MicroBatcher:
    """Collects rows for one target and sends them as batches."""

    def __init__(
        self,
        send: Send,
        max_batch: int,
        max_delay_s: float,
        max_in_flight: int = 1,
        gather_first: bool = False,
    ) -> None:
        self._send = send
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_in_flight = max_in_flight
        # A row at an idle target waits `max_delay_s` for others instead of going at once.
        self.gather_first = gather_first
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._in_flight = 0  # batches on their way: sent by a task, or by a lone row's caller
        self.batches = 0
        self.rows = 0
        # Told the size of every call sent (the batch-size metric), when set.
        self.on_batch: Callable[[int], None] | None = None

    async def submit(
        self, row: Rows, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> np.ndarray:
        """This row's output, once its batch answers; BackendTimeout past `timeout_s`."""
        idle = not self._in_flight
        if idle and not self._pending and not self.gather_first:
            return await self._send_alone(row, timeout_s, headers)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = _Pending(row, loop.create_future(), now + timeout_s, headers, now)
        self._pending.append(pending)
        if len(self._pending) >= self.max_batch or (idle and not self.gather_first):
            self._flush()
        elif self._timer is None and self._in_flight < self.max_in_flight:
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(pending.future)
        except TimeoutError:
            pending.future.cancel()  # still waiting to be sent: it will not be
            raise BackendTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None

    async def _send_alone(
        self, row: Rows, timeout_s: float, headers: Mapping[str, str] | None
    ) -> np.ndarray:
        """A batch of one, sent by its caller; rows arriving meanwhile gather behind it."""
        self._in_flight += 1
        self._count(1)
        try:
            async with asyncio.timeout(timeout_s):
                output = await self._send(row, timeout_s, headers)
        except TimeoutError:
            raise BackendTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None
        except BackendRejected:
            raise BackendRejected("triton refused the row") from None
        finally:
            self._in_flight -= 1
            self._send_gathered()
        return one_row_each(output, 1)[0]

    def _count(self, rows: int) -> None:
        self.batches += 1
        self.rows += rows
        if self.on_batch is not None:
            self.on_batch(rows)

    def _send_gathered(self) -> None:
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        if self.gather_first and len(self._pending) < self.max_batch:
            # What gathered meanwhile goes when its window ends: a window from the first of it.
            wait_s = self._pending[0].arrived_at + self.max_delay_s - time.monotonic()
            if wait_s > 0:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(wait_s, self._flush)
                return
        self._flush()  # a slot is free again: what gathered meanwhile goes now

    def _flush(self) -> None:
        """Sends what gathered, `max_batch` rows a call, while a slot is free; the rest waits
        for a batch to return."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = [p for p in self._pending if not p.future.done()]
        while self._pending and self._in_flight < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            task = asyncio.ensure_future(self._send_batch(batch))
            self._tasks.add(task)
            self._in_flight += 1
            task.add_done_callback(self._batch_returned)

    def _batch_returned(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._send_gathered()

    async def _send_batch(self, batch: list[_Pending]) -> None:
        self._count(len(batch))
        # The batch may take as long as its most patient row; each row stops waiting at its own.
        timeout_s = max(0.001, max(p.expires_at for p in batch) - time.monotonic())
        try:
            output = await self._send(
                stack_rows([p.row for p in batch]), timeout_s, batch[0].headers
            )
            answers = one_row_each(output, len(batch))
        except BackendRejected:
            if len(batch) == 1:
                _fail(batch[0], BackendRejected("triton refused the row"))
                return
            await asyncio.gather(*(self._send_batch([p]) for p in batch))
            return
        except Exception as error:  # the target's failure (or its answer's) is every row's
            for pending in batch:
                _fail(pending, error)
            return
        for pending, answer in zip(batch, answers, strict=True):
            if not pending.future.done():
                pending.future.set_result(answer)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def one_row_each(output: np.ndarray, rows: int) -> list[np.ndarray]:
    """The answer split back into one row per row sent; BackendError unless it has exactly
    that many. Rows are matched by position, so an answer of any other length would hand
    callers each other's results."""
    if not isinstance(output, np.ndarray) or output.ndim == 0 or output.shape[0] != rows:
        got = (
            "no rows"
            if not isinstance(output, np.ndarray) or output.ndim == 0
            else (f"{output.shape[0]} rows")
        )
        raise BackendError(f"the answer has {got} for {rows} sent")
    return [output[index : index + 1] for index in range(rows)]


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
        pending.future.exception()  # retrieved: a row that stopped waiting must not warn
