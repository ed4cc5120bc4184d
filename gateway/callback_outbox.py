"""The callback outbox of jobs on Redis: callbacks kept in a stream until they have an outcome.

When a stream worker stores a job's answer and the job has a callback URL (allowed by the
worker's settings), the same script (`STORE_RESULT`, gateway/streams.py) adds the callback to
the outbox stream `aigw:callbacks`: fields `prediction_id`, `url`, `body` (the envelope JSON:
the very bytes POSTed and signed), `model_id` and `tenant`. A store that finds the answer
already stored queues nothing, so each prediction id is queued once. One stream serves every
model: a callback is the same work whatever model answered it, so any worker may send any
one, and a worker's bound on deliveries in flight is one number, not one per model.

Every `aigw worker` with callbacks enabled runs a `CallbackCourier`, a consumer in the group
`aigw-callbacks`. It sends each entry with `CallbackSender.send` (the same signature, headers,
destination checks, backoff and `aigw_callback_deliveries_total{outcome}` as ever) and
acknowledges it once the delivery has its final outcome: delivered, rejected, refused or
exhausted. Delivery stays at least once; receivers deduplicate on the prediction id.

- Bounded, never dropped: at most `max_pending` (AIGW_CALLBACK_MAX_PENDING) deliveries in
  flight per worker. The courier reads no more entries than it has free places, so beyond the
  bound callbacks wait in the stream, for this worker or another.
- Held while in flight: a delivery with retries can take minutes, so every third of the claim
  timeout (AIGW_WORKER_CLAIM_IDLE_MS) the courier resets the idle time of the entries it is
  sending (`StreamStore.hold_callbacks`, as workers hold request entries): no other worker
  takes them over meanwhile.
- Taken over when abandoned: a worker that dies (SIGKILL, a crash) stops holding its entries;
  after the claim timeout another courier claims them (XAUTOCLAIM) and sends them again, from
  attempt 1. An entry handed out more than AIGW_CALLBACK_MAX_ATTEMPTS times without reaching an
  outcome ends `exhausted` unsent, rather than go round forever.
- Stopping stops reading, gives deliveries in flight a second's grace, then cuts them off
  unacknowledged (and uncounted): they stay pending and another worker claims them after the
  claim timeout.
- Bounded in size: acknowledged entries are trimmed every second (`trim_callbacks`), and
  consumers of past processes that hold nothing are forgotten, as for the request streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway.callbacks import CallbackSender, Outcome, callback_url_error
from gateway.streams import Delivery, StreamStore
from gateway.worker import (
    BLOCK_MS,
    FORGET_EVERY_S,
    FORGOTTEN_AFTER_MS,
    MAINTAIN_EVERY_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    claim_interval_s,
    hold_interval_s,
)

log = logging.getLogger("gateway.callback_outbox")

CALLBACK_GRACE_S = 1.0  # what a stop gives deliveries still under way (as the memory backend)
ACK_TRIES = 3  # an outcome not acknowledged is sent again later: worth a short retry
# Acknowledgements under way at once. Deliveries ending together (a receiver back after an
# outage: up to max_pending of them) must not each take a Redis connection: the client's pool
# refuses calls past its size (100) rather than queue them, which would fail the reads too.
ACK_CONCURRENCY = 8


@dataclass(frozen=True)
class Callback:
    """One outbox entry: what to POST where."""

    prediction_id: str
    url: str
    body: bytes


def callback_of(fields: Mapping[bytes, bytes]) -> Callback | None:
    """The callback an outbox entry holds; None when it lacks a field or is not UTF-8."""
    try:
        prediction_id = fields[b"prediction_id"].decode()
        url = fields[b"url"].decode()
        body = fields[b"body"]
    except (KeyError, UnicodeDecodeError):
        return None
    if not prediction_id or not url:
        return None
    return Callback(prediction_id, url, body)


class CallbackCourier:
    """Sends the outbox's callbacks: one consumer of the `aigw-callbacks` group; start once,
    stop once. `counts` tallies the outcomes it acknowledged."""

    def __init__(
        self,
        store: StreamStore,
        sender: CallbackSender,
        consumer: str,
        *,
        allowed: Collection[str] = (),
    ) -> None:
        self.store, self.sender, self.consumer = store, sender, consumer
        self.counts: Counter[str] = Counter()
        self._allowed = allowed
        self._max_pending = sender.max_pending
        self._claim_idle_ms = store.config.claim_idle_ms
        self._inflight: dict[str, asyncio.Task] = {}
        self._freed = asyncio.Event()
        self._acking = asyncio.Semaphore(ACK_CONCURRENCY)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._holder: asyncio.Task | None = None
        self._claim_cursor = "0-0"
        self._claim_every_s = claim_interval_s(self._claim_idle_ms)
        self._next_claim = self._next_maintenance = self._next_forget = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the courier is already running")
        await self.store.ensure_callback_group()
        self._task = asyncio.create_task(self._run(), name="callback-courier")
        self._holder = asyncio.create_task(self._hold_inflight(), name="callback-hold")

    async def stop(self, grace_s: float = CALLBACK_GRACE_S) -> None:
        """Take no more entries; let those in flight finish within `grace_s`, leave the rest
        pending (another worker claims them), and leave the group if holding nothing."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task
        await self._finish_inflight(grace_s)  # held meanwhile: they are still being sent
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
        try:
            await self.store.forget_callback_consumers(FORGOTTEN_AFTER_MS, self.consumer)
        except Exception as error:
            log.debug("callback outbox: leaving the group failed", extra=self._extra(error))

    async def _finish_inflight(self, grace_s: float) -> None:
        inflight = list(self._inflight.values())
        if not inflight:
            return
        _, late = await asyncio.wait(inflight, timeout=grace_s)
        for task in late:  # cancelled sends count nothing; their entries stay pending
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if late:
            log.info("callback outbox: deliveries left pending at stop",
                     extra={"consumer": self.consumer, "deliveries": len(late)})  # fmt: skip

    # ---- reading ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stopping.is_set():
            self._freed.clear()  # before counting: a delivery ending after it sets it again
            free = self._max_pending - len(self._inflight)
            if free <= 0:  # at the bound: the rest waits in the stream
                await self._wait_for(self._freed, BLOCK_MS / 1000)
                continue
            try:
                batch = await self._next_batch(free)
            except Exception as error:  # Redis away, or a bug: nothing is lost, entries wait
                log.warning("callback outbox: read failed; retrying", extra=self._extra(error))
                await self._wait_for(self._stopping, backoff)
                if "NOGROUP" in str(error):  # the stream was deleted (or Redis restarted empty)
                    with contextlib.suppress(Exception):
                        await self.store.ensure_callback_group()
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = MIN_BACKOFF_S
            for delivery in batch:
                self._spawn(delivery)

    async def _next_batch(self, count: int) -> list[Delivery]:
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._next_maintenance = now + MAINTAIN_EVERY_S
            await self._maintain()
        claimed: list[Delivery] = []
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every_s
            cursor, taken = await self.store.claim_callbacks(
                self.consumer, count, self._claim_cursor, len(self._inflight)
            )
            self._claim_cursor = cursor
            claimed = [d for d in taken if d.entry_id not in self._inflight]
            if claimed:
                log.info("callback outbox: took over abandoned callbacks",
                         extra={"consumer": self.consumer, "entries": len(claimed)})  # fmt: skip
        if len(claimed) >= count or self._stopping.is_set():
            return claimed
        block_ms = None if claimed else BLOCK_MS  # None: do not wait (BLOCK 0 waits forever)
        try:
            fresh = await self.store.read_callbacks(self.consumer, count - len(claimed), block_ms)
        except Exception:
            if claimed:
                return claimed  # they are ours now: send them rather than wait a claim timeout
            raise
        return claimed + fresh

    async def _maintain(self) -> None:
        """Trimming and forgetting: best effort, never at the cost of reading."""
        try:
            await self.store.trim_callbacks()
            if time.monotonic() >= self._next_forget:
                self._next_forget = time.monotonic() + FORGET_EVERY_S
                await self.store.forget_callback_consumers(FORGOTTEN_AFTER_MS)
        except Exception as error:
            log.debug("callback outbox: maintenance failed", extra=self._extra(error))

    async def _hold_inflight(self) -> None:
        """Keep the entries being sent from looking abandoned, however long their retries."""
        every_s = hold_interval_s(self._claim_idle_ms)
        while True:
            await asyncio.sleep(every_s)
            if not self._inflight:
                continue
            try:
                await self.store.hold_callbacks(self.consumer, list(self._inflight))
            except Exception as error:
                log.warning("callback outbox: deliveries not held", extra=self._extra(error))

    # ---- one entry ---------------------------------------------------------------------------

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._deliver(delivery))
        self._inflight[delivery.entry_id] = task
        task.add_done_callback(lambda done, entry_id=delivery.entry_id: self._done(entry_id, done))

    def _done(self, entry_id: str, task: asyncio.Task) -> None:
        self._inflight.pop(entry_id, None)
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("callback outbox: delivery crashed", exc_info=task.exception())

    async def _deliver(self, delivery: Delivery) -> None:
        outcome = await self._outcome_of(delivery)
        for attempt in range(1, ACK_TRIES + 1):
            try:
                async with self._acking:
                    await self.store.ack_callback(delivery.entry_id)
                break
            except Exception as error:  # left pending: claimed and sent again later
                if attempt == ACK_TRIES:
                    log.warning("callback outbox: outcome not acknowledged; it will be sent "
                                "again", extra=self._extra(error))  # fmt: skip
                    return
                await asyncio.sleep(MIN_BACKOFF_S * attempt)
        self.counts[outcome] += 1

    async def _outcome_of(self, delivery: Delivery) -> Outcome:
        callback = callback_of(delivery.fields)
        if callback is None:
            log.error("callback outbox: malformed entry removed",
                      extra={"entry_id": delivery.entry_id})  # fmt: skip
            return "malformed"
        extra = {"prediction_id": callback.prediction_id, "entry_id": delivery.entry_id}
        if delivery.deliveries > self.sender.max_attempts:
            # Each worker that took it died or stopped before it had an outcome.
            log.warning("callback outbox: handed out too often without an outcome; given up",
                        extra={**extra, "deliveries": delivery.deliveries})  # fmt: skip
            return self.sender.conclude("exhausted", delivery.deliveries - 1).outcome
        error = callback_url_error(callback.url, enabled=True, allowed=self._allowed)
        if error is not None:  # the worker that queued it allowed what this one does not
            log.warning("callback outbox: destination not allowed here",
                        extra={**extra, "error": error.detail})  # fmt: skip
            return self.sender.conclude("refused").outcome
        sent = await self.sender.send(callback.prediction_id, callback.url, callback.body)
        return sent.outcome

    async def _wait_for(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def _extra(self, error: BaseException) -> dict[str, str]:
        return {"consumer": self.consumer, "error": repr(error)}
