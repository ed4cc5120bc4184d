"""Stream workers: consumers in the `aigw-workers` group that answer queued predictions.

A `StreamWorker` serves one logical model. It reads new entries with XREADGROUP, at most
`worker_concurrency` jobs at once, runs each with `run_job` (the same routing, cache, chain
and audit trail as a synchronous request) and stores the answer with the exactly-once script
(gateway/streams.py), which also acknowledges the entry. Every `claim_every_s` it takes over,
with XAUTOCLAIM, entries another consumer (a dead one, usually) left unacknowledged for longer
than `worker_claim_idle_ms`. Nothing touches an entry while its job runs, so every third of
that timeout the worker resets the idle time of the entries it is running (`StreamStore.hold`,
which counts no delivery): a job running longer than the claim timeout (a policy's
`timeout_ms` goes up to 600 s) is neither taken over and run again nor counted as delivered
again. A worker that dies stops doing so, and its entries are claimable after the timeout.

What happens to an entry:
- answered: result stored (or, for an id answered before, only acknowledged: `duplicate`);
- not a valid request: a dead letter at once, with the error naming the field (`rejected`);
- failed with a transient error (the audit log refusing records, Redis away): left pending and
  retried after the claim timeout, however often; the worker pauses reading meanwhile;
- failed with any other error: left pending and retried the same way, until its delivery
  count reaches `worker_max_attempts`; then a dead letter with the error (`dead`);
- delivered more than `worker_max_attempts` times without an outcome (each worker running it
  died: OOM, a native crash, SIGKILL): a dead letter before it runs again (`dead`). A
  transient failure gives its delivery back, so outages never count towards this.
A request whose every chain step fails is still answered (the chain ends in a default).

Callbacks: with `callbacks` (`callback_destination`: the job's URL, checked against the
allow-list), the result is stored together with its callback in the outbox, and `aigw
worker` runs a `CallbackCourier` (gateway/callback_outbox.py) that sends the outbox's
callbacks; no callback depends on the process that answered the job staying alive.

Stopping stops reading, lets the jobs in flight finish, and leaves nothing half-done: an entry
whose job did not finish stays pending and another worker claims it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

from redis.exceptions import RedisError

from gateway.audit import AuditUnavailable
from gateway.callbacks import allowed_hosts, callback_sender, callback_url_error
from gateway.garbage import settle_startup_heap
from gateway.jobs import Job, JobRejected, run_job
from gateway.monitoring import Baseline
from gateway.policy_manager import PolicyManager
from gateway.policy_store import Bundle
from gateway.policy_sync import PolicySync
from gateway.runtime import (
    Configuration,
    Runtime,
    audit_log,
    baselines_of,
    start_runtime,
)
from gateway.settings import Settings
from gateway.streams import Delivery, StreamConfig, StreamStore, parse_entry

log = logging.getLogger("gateway.worker")

OUTCOMES = ("answered", "duplicate", "rejected", "dead", "retry")
BLOCK_MS = 500  # a blocking read returns this often, so a stop is noticed within it
MAINTAIN_EVERY_S = 1.0  # backlog metrics and trimming of acknowledged entries
FORGET_EVERY_S = 60.0  # how often a worker looks for consumers long gone
FORGOTTEN_AFTER_MS = 3_600_000  # a consumer with nothing pending, silent this long, is deleted
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0
STOP_TIMEOUT_S = 30.0

OnResult = Callable[[Job, Mapping[str, Any]], Awaitable[None]]
# The callback URL to queue with a job's result (None: no callback), see callback_destination.
CallbackDestination = Callable[[Job], str | None]


def is_transient(error: BaseException) -> bool:
    """Failures of the infrastructure, not of the entry: retrying later can succeed."""
    return isinstance(error, AuditUnavailable | RedisError | OSError | TimeoutError)


def failure_action(
    error: BaseException, deliveries: int, max_attempts: int
) -> Literal["retry", "dead"]:
    """After a failed attempt: leave the entry pending for a retry, or dead-letter it.

    Transient failures never dead-letter (an audit outage must not turn requests into dead
    letters); other failures do once the entry has been delivered `max_attempts` times.
    """
    if is_transient(error):
        return "retry"
    return "dead" if deliveries >= max_attempts else "retry"


def claim_interval_s(claim_idle_ms: int) -> float:
    """How often to look for abandoned entries: often enough to take one over soon after it
    becomes claimable, rarely enough to cost nothing."""
    return min(max(claim_idle_ms / 2000, 0.5), 10.0)


def hold_interval_s(claim_idle_ms: int) -> float:
    """How often the entries being run are held: three times per claim timeout, so that one
    or two missed turns (Redis slow to answer) still leave none looking abandoned."""
    return claim_idle_ms / 3000


def default_consumer() -> str:
    """A consumer name unique per process, stable for its life: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StreamWorker:
    """One consumer of one model's request stream; start once, stop once.

    Counts per outcome (`counts`, a Counter over OUTCOMES) mirror `aigw_stream_jobs_total`.
    """

    def __init__(
        self,
        runtime: Runtime,
        store: StreamStore,
        model_id: str,
        consumer: str,
        *,
        on_result: OnResult | None = None,
        callbacks: CallbackDestination | None = None,
    ) -> None:
        self.runtime, self.store, self.model_id, self.consumer = runtime, store, model_id, consumer
        self.config: StreamConfig = store.config
        self.counts: Counter[str] = Counter()
        self._on_result = on_result
        self._callbacks = callbacks
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._inflight: dict[str, asyncio.Task] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._holder: asyncio.Task | None = None
        self._claim_cursor = "0-0"
        self._claim_every_s = claim_interval_s(self.config.claim_idle_ms)
        self._next_claim = self._next_maintenance = self._next_forget = 0.0
        self._hold_until = 0.0
        self._hold_s = MIN_BACKOFF_S

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the worker is already running")
        await self.store.ensure_group(self.model_id)
        self._task = asyncio.create_task(self._run(), name=f"stream-worker-{self.model_id}")
        self._holder = asyncio.create_task(
            self._hold_inflight(), name=f"stream-hold-{self.model_id}"
        )

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop reading, finish the jobs in flight (within the timeout), leave the group."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task
        await self._finish_inflight(timeout_s)  # held meanwhile: they are still running
        await self._stop_holding()
        await self._leave_group()

    async def _finish_inflight(self, timeout_s: float) -> None:
        inflight = list(self._inflight.values())
        if not inflight:
            return
        _, late = await asyncio.wait(inflight, timeout=timeout_s)
        for job in late:  # their entries stay pending: another worker claims them
            job.cancel()
        if late:
            log.warning("stream worker: jobs cut off at stop", extra={"jobs": len(late)})

    async def _stop_holding(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder

    async def _leave_group(self) -> None:
        """Delete this consumer from the group if it holds nothing (else a later worker's
        clean-up does, once its entries were claimed): restarts must not pile up consumers."""
        try:
            await self.store.forget_consumers(self.model_id, FORGOTTEN_AFTER_MS, self.consumer)
        except Exception as error:
            log.debug("stream worker: leaving the group failed", extra=self._extra(error))

    # ---- reading ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stopping.is_set():
            await self._pause(self._hold_until - time.monotonic())
            taken = await self._take_slots()
            if self._stopping.is_set():
                self._release(taken)
                return
            try:
                batch = await self._next_batch(taken)
            except Exception as error:  # Redis away, or a bug: nothing is lost, entries wait
                self._release(taken)
                log.warning("stream worker: read failed; retrying", extra=self._extra(error))
                await self._pause(backoff)
                if "NOGROUP" in str(error):  # the stream was deleted (or Redis restarted empty)
                    with contextlib.suppress(Exception):
                        await self.store.ensure_group(self.model_id)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = MIN_BACKOFF_S
            self._release(taken - len(batch))
            for delivery in batch:
                self._spawn(delivery)

    async def _take_slots(self) -> int:
        """Wait for one free job slot, then take every other one free now."""
        await self._slots.acquire()
        taken = 1
        while taken < self.config.concurrency and not self._slots.locked():
            await self._slots.acquire()  # returns at once: a slot is free
            taken += 1
        return taken

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    async def _next_batch(self, count: int) -> list[Delivery]:
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._next_maintenance = now + MAINTAIN_EVERY_S
            await self._maintain()
        claimed: list[Delivery] = []
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every_s
            claimed = await self._claim(count)
        if len(claimed) >= count:
            return claimed
        block_ms = None if claimed else BLOCK_MS  # None: do not wait (BLOCK 0 waits forever)
        try:
            fresh = await self.store.read(
                self.model_id, self.consumer, count - len(claimed), block_ms
            )
        except Exception:
            if claimed:
                return claimed  # they are ours now: run them rather than wait another timeout
            raise
        return claimed + fresh

    async def _claim(self, count: int) -> list[Delivery]:
        cursor, claimed = await self.store.claim(
            self.model_id, self.consumer, count, self._claim_cursor
        )
        self._claim_cursor = cursor  # `0-0` once the whole pending list was scanned
        # An entry of ours still running is held (_hold_inflight); should the hold lapse (the
        # loop stalled for a claim timeout), it is being handled all the same.
        taken = [d for d in claimed if d.entry_id not in self._inflight]
        if taken:
            log.info(
                "stream worker: took over abandoned entries",
                extra={"model": self.model_id, "entries": len(taken)},
            )
        return taken

    async def _hold_inflight(self) -> None:
        """Keep the entries whose jobs are running from looking abandoned, until stopped
        (best effort: a turn missed is made up by the next, within the claim timeout)."""
        every_s = hold_interval_s(self.config.claim_idle_ms)
        while True:
            await asyncio.sleep(every_s)
            if not self._inflight:
                continue
            try:
                await self.store.hold(self.model_id, self.consumer, list(self._inflight))
            except Exception as error:
                log.warning("stream worker: entries in flight not held", extra=self._extra(error))

    async def _maintain(self) -> None:
        """Backlog metrics and trimming: best effort, never at the cost of reading."""
        try:
            lag, pending = await self.store.backlog(self.model_id)
            self.runtime.metrics.observe_stream_backlog(self.model_id, lag, pending)
            await self.store.trim_acknowledged(self.model_id)
            if time.monotonic() >= self._next_forget:
                self._next_forget = time.monotonic() + FORGET_EVERY_S
                await self.store.forget_consumers(self.model_id, FORGOTTEN_AFTER_MS)
        except Exception as error:
            log.debug("stream worker: maintenance failed", extra=self._extra(error))

    # ---- one entry ---------------------------------------------------------------------------

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self._inflight[delivery.entry_id] = task
        task.add_done_callback(lambda _, entry_id=delivery.entry_id: self._finished(entry_id))

    def _finished(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)
        self._slots.release()

    async def _handle(self, delivery: Delivery) -> None:
        outcome = await self._outcome_of(delivery)
        self.counts[outcome] += 1
        self.runtime.metrics.observe_stream_job(self.model_id, outcome)

    async def _outcome_of(self, delivery: Delivery) -> str:
        contracts = self.runtime.snapshot.contracts
        try:
            job = parse_entry(contracts, self.model_id, delivery.entry_id, delivery.fields,
                              self.config)  # fmt: skip
        except JobRejected as rejected:
            return await self._dead_letter(delivery, rejected.to_dict(), None, "rejected")
        except Exception as error:  # a bug in parsing: retried, then a dead letter
            return await self._failed(delivery, None, error)
        try:
            if delivery.deliveries > 1 and await self.store.has_result(job.prediction_id):
                await self.store.ack(self.model_id, delivery.entry_id)  # answered before
                return "duplicate"
            if delivery.deliveries > self.config.max_attempts:
                return await self._never_finished(delivery, job)
            answer = await run_job(self.runtime, job)
            envelope = answer.envelope()
            callback_url = self._callbacks(job) if self._callbacks is not None else None
            stored = await self.store.store_result(
                job, envelope, delivery.entry_id, self.consumer, callback_url
            )
        except Exception as error:
            return await self._failed(delivery, job, error)
        self._hold_s = MIN_BACKOFF_S
        if stored and self._on_result is not None:
            await self._notify(job, envelope)
        return "answered" if stored else "duplicate"

    async def _never_finished(self, delivery: Delivery, job: Job) -> str:
        """Dead-letter an entry whose earlier attempts all ended without an outcome: each
        worker that ran it died (OOM, a native crash, SIGKILL) before it could fail, so no
        exception ever counted, and running it again would take this worker down too."""
        attempts = delivery.deliveries - 1
        extra = {"model": self.model_id, "consumer": self.consumer,
                 "entry_id": delivery.entry_id, "deliveries": delivery.deliveries}  # fmt: skip
        log.error("stream worker: entry never finished an attempt; dead letter", extra=extra)
        detail = f"delivered {attempts} times without an outcome; the workers running it died"
        return await self._dead_letter(delivery, {"detail": detail, "errors": []}, job, "dead")

    async def _failed(self, delivery: Delivery, job: Job | None, error: Exception) -> str:
        action = failure_action(error, delivery.deliveries, self.config.max_attempts)
        extra = {**self._extra(error), "entry_id": delivery.entry_id,
                 "deliveries": delivery.deliveries}  # fmt: skip
        if action == "dead":
            log.error("stream worker: entry failed every attempt; dead letter", extra=extra)
            detail = f"failed {delivery.deliveries} times; last error: {error!r}"[:2000]
            error_doc = {"detail": detail, "errors": []}
            return await self._dead_letter(delivery, error_doc, job, "dead")
        log.warning("stream worker: job failed; left pending for a retry", extra=extra)
        if is_transient(error):
            # The audit log or Redis is down: stop taking entries that would fail the same way.
            self._hold_until = time.monotonic() + self._hold_s
            self._hold_s = min(self._hold_s * 2, MAX_BACKOFF_S)
            await self._give_back(delivery)
        return "retry"

    async def _give_back(self, delivery: Delivery) -> None:
        """An outage is no attempt: its delivery must not bring the entry nearer to being
        dead-lettered as one that never finished (best effort: Redis may be what is down)."""
        try:
            await self.store.give_back_delivery(self.model_id, delivery, self.consumer)
        except Exception as error:
            log.debug("stream worker: delivery not given back", extra=self._extra(error))

    async def _dead_letter(
        self,
        delivery: Delivery,
        error: Mapping[str, Any],
        job: Job | None,
        outcome: str,
    ) -> str:
        try:
            written = await self.store.dead_letter(
                self.model_id, delivery, error, self.consumer, job
            )
        except Exception as failure:  # the entry stays pending: dead-lettered on a later try
            log.warning("stream worker: dead letter not written", extra=self._extra(failure))
            return "retry"
        return outcome if written else "duplicate"  # another worker had settled it

    async def _notify(self, job: Job, envelope: Mapping[str, Any]) -> None:
        try:
            await self._on_result(job, envelope)  # type: ignore[misc]
        except Exception:  # the result is stored: a hook's failure must not undo that
            log.exception("stream worker: result hook failed", extra={"model": self.model_id})

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    def _extra(self, error: BaseException) -> dict[str, str]:
        return {"model": self.model_id, "consumer": self.consumer, "error": repr(error)}


# ---- `aigw worker` -------------------------------------------------------------------------------


async def serve_streams(
    settings: Settings,
    config: Configuration,
    models: Sequence[str],
    consumer: str,
    metrics_port: int | None = None,
    baselines: dict[str, Baseline] | None = None,
    startup_bundle: Bundle | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    """Run a worker per model on one runtime until SIGTERM or SIGINT, then stop cleanly.

    `startup_bundle` is the policy files as read before `config` was loaded (version 1)."""
    if baselines is None:
        baselines = baselines_of(settings)
    runtime = start_runtime(settings, config, baselines=baselines)
    runtime.audit = audit_log(settings)
    await runtime.audit.open()
    # Named by host and log directory: the one writer of that log, the same after a restart.
    await runtime.start_shipping_audit(f"{socket.gethostname()}:{settings.audit_dir.resolve()}")
    forwarder = runtime.audit_forwarder
    store = StreamStore(settings.redis_url or "", StreamConfig.from_settings(settings))
    sender = callback_sender(settings, runtime.metrics.observe_callback)
    courier, destination = None, None
    if sender is not None:  # callbacks queued with results, sent from the outbox
        from gateway.callback_outbox import CallbackCourier

        allowed = allowed_hosts(settings.callback_allowed_hosts)
        courier = CallbackCourier(store, sender, consumer, allowed=allowed)
        destination = callback_destination(settings)
    workers = [
        StreamWorker(runtime, store, model_id, consumer, callbacks=destination)
        for model_id in models
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if metrics_port is not None:
        serve_metrics(runtime, metrics_port, metrics_host)
    policies = await _follow_policies(settings, runtime, startup_bundle)
    # With AIGW_SHARE_STATISTICS its answers count in every replica's reports.
    statistics = runtime.start_publishing_statistics()
    try:
        for worker in workers:
            await worker.start()
        if courier is not None:
            await courier.start()
        settle_startup_heap()
        log.info("stream workers started", extra={"models": list(models), "consumer": consumer})
        await stop.wait()
    finally:
        # The courier takes no more callbacks and leaves those it cannot finish within its
        # grace pending in the outbox, for another worker.
        stopping = [worker.stop() for worker in workers]
        await asyncio.gather(*stopping, *([courier.stop()] if courier is not None else []))
        if statistics is not None:
            statistics.cancel()  # publishes the last counts as it stops
            await asyncio.gather(statistics, return_exceptions=True)
        await policies.stop()
        if sender is not None:
            await sender.close()  # its client; the courier has stopped its deliveries
        await store.close()
        await runtime.close()  # flushes and fsyncs the audit log
        if forwarder is not None:
            await forwarder.stop()  # then ships what is on disk, if the stream's Redis is up
        log.info("stream workers stopped", extra={"consumer": consumer})


def callback_destination(settings: Settings) -> CallbackDestination:
    """Which callback a job's result queues in the outbox (gateway/callback_outbox.py): its
    `callback_url`, checked as the HTTP API checks it, since an entry written straight to the
    stream must not make a worker call a host the operator did not allow; None for none."""
    allowed = allowed_hosts(settings.callback_allowed_hosts)

    def destination(job: Job) -> str | None:
        if not job.callback_url:
            return None
        error = callback_url_error(job.callback_url, enabled=True, allowed=allowed)
        if error is not None:
            log.warning(
                "stream worker: callback not sent",
                extra={"prediction_id": job.prediction_id, "error": error.detail},
            )
            return None
        return job.callback_url

    return destination


def serve_metrics(runtime: Runtime, port: int, host: str = "127.0.0.1") -> Any:
    """Prometheus text on host:port (a thread of prometheus-client's); its server. Loopback
    by default: a pod that Prometheus scrapes gives `--metrics-host 0.0.0.0`."""
    from prometheus_client import start_http_server

    runtime.metrics.watch(lambda: runtime)
    return start_http_server(port, addr=host, registry=runtime.metrics.registry)


class _PolicyFollowing:
    """What keeps a worker's policies current: watched files, and with
    `AIGW_SHARE_POLICIES` the versions gateways apply (through the same Redis)."""

    def __init__(self, watcher: asyncio.Task | None, sync: PolicySync | None) -> None:
        self._watcher, self._sync = watcher, sync

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._sync is not None:
            await self._sync.stop()


async def _follow_policies(
    settings: Settings, runtime: Runtime, startup_bundle: Bundle | None
) -> _PolicyFollowing:
    """Workers answer with the policies the gateways run: a change is validated and swapped
    in exactly as `aigw serve` does it (and recorded in this worker's audit log)."""
    manager = PolicyManager(runtime, os.environ)
    manager.start_from_disk(startup_bundle)
    watcher = None
    if settings.watch_policies:
        watcher = asyncio.create_task(manager.watch_files(settings.watch_interval_s))
    sync = None
    if settings.share_policies and settings.redis_url:
        sync = PolicySync(settings.redis_url, manager)
        await sync.start()
    return _PolicyFollowing(watcher, sync)
