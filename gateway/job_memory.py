"""Jobs kept in this process: the `JobBackend` used when Redis is not configured.

A bounded asyncio queue feeds a few worker tasks that answer each job through `run_job`,
exactly as a synchronous request is answered (and audited). Outcomes are kept in a bounded
map for polling; one evicted (too old, or too many) is still retrievable, as every answer
is, from its audit record. Nothing survives the process: a crash loses queued jobs, which is
what the Redis backend (gateway/streams.py) is for.

An audit log that refuses records (`AuditUnavailable`) makes the job wait and try again
with a capped backoff, in its worker: a job is never answered unaudited and never dropped,
and while the log is down the queue fills and new submits are refused (503), not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.audit import AuditUnavailable
from gateway.callbacks import CallbackSender, callback_sender, retry_delay
from gateway.expiring_map import ExpiringMap
from gateway.fair_queue import FairQueue, QueueFull, TenantQueueFull
from gateway.idempotency import (
    Claim,
    Claims,
    IdempotencyKey,
    KeptClaims,
    SharedClaims,
    Submitted,
    resolve,
)
from gateway.jobs import (
    Backpressure,
    Job,
    JobBackend,
    JobOutcome,
    JobStoreUnavailable,
    TenantBackpressure,
    run_job,
)
from gateway.runtime import Runtime
from gateway.settings import Settings

log = logging.getLogger("gateway.jobs")

AUDIT_RETRY_S = 0.1
AUDIT_RETRY_MAX_S = 5.0
CALLBACK_GRACE_S = 1.0
T = TypeVar("T")


class KeptOutcomes:
    """Answered outcomes, at most `limit` of them and none older than `keep_s`: memory stays
    flat whatever the traffic. Pure: the caller passes the time."""

    def __init__(self, limit: int, keep_s: float) -> None:
        self._entries: ExpiringMap[str, JobOutcome] = ExpiringMap(limit, keep_s)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, outcome: JobOutcome, now: float) -> None:
        self._entries.put(outcome.prediction_id, outcome, now)

    def get(self, prediction_id: str, now: float) -> JobOutcome | None:
        return self._entries.get(prediction_id, now)


FAILED_MARK = "failed"  # a mark's first word: a failed job, not a holder's pid


class PendingMarks:
    """Jobs pending in one worker, visible to its siblings (`aigw serve --workers N`).

    A poll may reach any worker: each pending job leaves a small file named by its id,
    holding its tenant and the holding worker's pid, removed when answered. A mark whose
    worker died is not pending (the in-memory job died with it). A job that failed leaves
    `failed <tenant>` instead, read as failed for as long as outcomes are kept, then removed:
    its answer will never be in the audit log, where siblings find answered jobs.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def mark(self, prediction_id: str, tenant: str) -> None:
        (self._directory / prediction_id).write_text(f"{os.getpid()} {tenant}")

    def clear(self, prediction_id: str) -> None:
        (self._directory / prediction_id).unlink(missing_ok=True)

    def mark_failed(self, prediction_id: str, tenant: str) -> None:
        path = self._directory / prediction_id
        temporary = path.with_name(f".{prediction_id}.{os.getpid()}")
        temporary.write_text(f"{FAILED_MARK} {tenant}")
        os.replace(temporary, path)  # never seen half-written: as unknown, not even briefly

    def holder_tenant(self, prediction_id: str) -> str | None:
        """The job's tenant while a live worker holds it, else None."""
        pid, tenant = self._read(prediction_id)
        return tenant if pid.isdigit() and _alive(int(pid)) else None

    def failed_tenant(self, prediction_id: str, keep_s: float) -> str | None:
        """The job's tenant if it failed within the last `keep_s` seconds, else None."""
        state, tenant = self._read(prediction_id)
        if state != FAILED_MARK:
            return None
        path = self._directory / prediction_id
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime <= keep_s:
                return tenant
            path.unlink(missing_ok=True)  # kept as long as an outcome in memory would be
        return None

    def _read(self, prediction_id: str) -> tuple[str, str | None]:
        try:
            state, tenant = (self._directory / prediction_id).read_text().split(" ", 1)
        except (OSError, ValueError):
            return "", None
        return state, tenant


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MemoryJobs:
    """In-process queue and workers; implements `JobBackend`."""

    def __init__(
        self,
        *,
        queue_max: int = 1000,
        tenant_max: int | None = None,
        workers: int = 4,
        keep: int = 10_000,
        keep_s: float = 3600.0,
        drain_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        siblings_dir: Path | None = None,
        claims: Claims | None = None,
    ) -> None:
        self._queue_max = queue_max
        self._tenant_max = tenant_max if tenant_max is not None else default_tenant_max(queue_max)
        self._siblings = PendingMarks(siblings_dir) if siblings_dir is not None else None
        self._worker_count = workers
        self._drain_s = drain_s
        self._clock = clock
        self._kept = KeptOutcomes(keep, keep_s)
        self._keep_s = keep_s
        self._pending: dict[str, str] = {}  # queued or running: prediction_id → tenant
        self._claims = claims if claims is not None else KeptClaims(keep, keep_s)
        # Jobs queued while their idempotency key is being claimed: a worker waits for the
        # claim before running one, and skips it when another submit had the key.
        self._unconfirmed: dict[str, asyncio.Event] = {}
        self._withdrawn: set[str] = set()
        self._queue: FairQueue[Job] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._runtime: Runtime | None = None
        self._callbacks: CallbackSender | None = None
        self._closing = False
        self.answered = 0
        self.audit_retries = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryJobs:
        return cls(
            queue_max=settings.jobs_queue_max,
            tenant_max=settings.jobs_tenant_max,
            workers=settings.jobs_workers,
            keep=settings.jobs_keep,
            keep_s=settings.jobs_keep_s,
            drain_s=settings.jobs_drain_s,
            siblings_dir=(
                settings.workers_dir / "pending-jobs" if settings.workers_dir is not None else None
            ),
            # A retry may reach any worker of `aigw serve --workers N`: they share the claims.
            claims=(
                SharedClaims(settings.workers_dir, settings.jobs_keep, settings.jobs_keep_s)
                if settings.workers_dir is not None
                else None
            ),
        )

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._callbacks = callback_sender(runtime.settings, runtime.metrics.observe_callback)
        self._queue = FairQueue(self._queue_max, self._tenant_max, tenant_of=_tenant)
        self._workers = [
            asyncio.create_task(self._work(), name=f"aigw-job-worker-{n}")
            for n in range(self._worker_count)
        ]

    async def submit(self, job: Job, key: IdempotencyKey | None = None) -> Submitted:
        """Queue the job, or Backpressure when the queue is full or shutting down.

        With a key: a key already claimed is answered from its claim, even when the queue is
        full (nothing is queued). Otherwise the job is queued held back, the key claimed, and
        the job released to the workers, or withdrawn if another submit claimed the key in
        between (a sibling worker, or this one across the claim's await)."""
        if key is None:
            self._enqueue(job)
            return Submitted(job.prediction_id)
        holder = await self._claims_call(self._claims.holder(key.scope), job)
        if holder is not None:
            return resolve(key, holder)
        self._enqueue(job)
        self._unconfirmed[job.prediction_id] = gate = asyncio.Event()
        try:
            holder = await self._claims_call(
                self._claims.claim(key.scope, Claim(job.prediction_id, key.fingerprint)), job
            )
            if holder.prediction_id != job.prediction_id:
                self._withdraw(job)
        except BaseException:
            self._withdraw(job)
            raise
        finally:
            del self._unconfirmed[job.prediction_id]
            gate.set()
        if holder.prediction_id != job.prediction_id:
            return resolve(key, holder)
        return Submitted(job.prediction_id)

    def _enqueue(self, job: Job) -> None:
        if self._queue is None or self._closing:
            raise Backpressure("the job queue is not accepting jobs")
        try:
            self._queue.put_nowait(job)
        except TenantQueueFull as full:
            raise TenantBackpressure(str(full)) from None
        except QueueFull as full:
            raise Backpressure(str(full)) from None
        self._pending[job.prediction_id] = job.tenant
        if self._siblings is not None:
            self._siblings.mark(job.prediction_id, job.tenant)

    def _withdraw(self, job: Job) -> None:
        """A queued job that must never run: no trace of it stays."""
        self._withdrawn.add(job.prediction_id)
        self._pending.pop(job.prediction_id, None)
        if self._siblings is not None:
            self._siblings.clear(job.prediction_id)

    @staticmethod
    async def _claims_call(call: Awaitable[T], job: Job) -> T:
        try:
            return await call
        except sqlite3.Error as error:
            log.warning(
                "idempotency keys unavailable",
                extra={"prediction_id": job.prediction_id, "error": repr(error)},
            )
            raise JobStoreUnavailable("idempotency keys unavailable") from None

    async def outcome(self, prediction_id: str) -> JobOutcome | None:
        tenant = self._pending.get(prediction_id)
        if tenant is not None:
            return JobOutcome(prediction_id, tenant, "pending")
        kept = self._kept.get(prediction_id, self._clock())
        if kept is None and self._siblings is not None:
            # Another worker of this gateway may hold it: its answer, once given, is in
            # the audit log (which the API reads next); until then its mark says pending.
            tenant = self._siblings.holder_tenant(prediction_id)
            if tenant is not None:
                return JobOutcome(prediction_id, tenant, "pending")
            tenant = self._siblings.failed_tenant(prediction_id, self._keep_s)
            if tenant is not None:
                return JobOutcome(prediction_id, tenant, "failed", reason="failed in a sibling")
        return kept

    async def close(self) -> None:
        """Refuse new jobs, answer the queued ones within `drain_s`, then stop the workers."""
        self._closing = True
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), self._drain_s)
            except TimeoutError:
                log.warning("jobs left unanswered at shutdown", extra={"jobs": len(self._pending)})
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._callbacks is not None:
            # Callbacks still retrying are given a short grace only: the answer stays
            # retrievable by polling, and shutdown must not wait out a receiver's outage.
            await self._callbacks.close(min(self._drain_s, CALLBACK_GRACE_S))

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                if not await self._released(job):
                    continue
                await self._answer(job)
            except Exception as error:
                # A bug, not an outage (those are retried in _answer): the job cannot be
                # answered; it is logged and kept as failed rather than retried forever, so
                # its caller learns it will never be answered instead of finding it unknown.
                log.exception("job failed", extra={"prediction_id": job.prediction_id})
                reason = f"failed: {error!r}"[:2000]
                self._keep(JobOutcome(job.prediction_id, job.tenant, "failed", reason=reason))
                if self._runtime is not None:
                    self._runtime.metrics.observe_job_failed()
            finally:
                self._queue.task_done()

    async def _released(self, job: Job) -> bool:
        """False for a job withdrawn before it ran (its idempotency key was another's)."""
        gate = self._unconfirmed.get(job.prediction_id)
        if gate is not None:
            await gate.wait()
        if job.prediction_id in self._withdrawn:
            self._withdrawn.discard(job.prediction_id)
            return False
        return True

    async def _answer(self, job: Job) -> None:
        assert self._runtime is not None
        attempt = 0
        while True:
            try:
                answer = await run_job(self._runtime, job)
                break
            except AuditUnavailable:
                attempt += 1
                self.audit_retries += 1
                await asyncio.sleep(
                    retry_delay(attempt, AUDIT_RETRY_S, AUDIT_RETRY_MAX_S, random.random())
                )
        self._finish(job, answer.envelope())

    def _finish(self, job: Job, envelope: Mapping[str, Any]) -> None:
        self._keep(JobOutcome(job.prediction_id, job.tenant, "done", envelope))
        self.answered += 1
        if job.callback_url and self._callbacks is not None:
            self._callbacks.schedule(job.prediction_id, job.callback_url, envelope)

    def _keep(self, outcome: JobOutcome) -> None:
        # Kept before it stops being pending, with no await between: never seen as unknown.
        self._kept.put(outcome, self._clock())
        self._pending.pop(outcome.prediction_id, None)
        if self._siblings is None:
            return
        if outcome.status == "failed":  # replaces the pending mark in one step
            self._siblings.mark_failed(outcome.prediction_id, outcome.tenant)
        else:
            self._siblings.clear(outcome.prediction_id)


def default_tenant_max(queue_max: int) -> int:
    """Half the queue: one tenant's backlog leaves the other half to everyone else."""
    return max(1, (queue_max + 1) // 2)


def _tenant(job: Job) -> str:
    return job.tenant


def jobs_backend(settings: Settings) -> JobBackend:
    """The backend the settings choose: Redis streams when asked for and configured, else memory.

    `gateway.streams` is imported only when chosen, so the memory backend needs neither it
    nor a Redis server.
    """
    if settings.jobs_backend == "redis":
        if not settings.redis_url:
            raise ValueError("AIGW_JOBS_BACKEND=redis needs AIGW_REDIS_URL")
        from gateway.streams import StreamConfig, StreamJobs

        # Jobs are answered by `aigw worker` processes reading the streams.
        return StreamJobs(settings.redis_url, StreamConfig.from_settings(settings))
    return MemoryJobs.from_settings(settings)
