"""Shadow traffic: copies of requests to targets whose answers are compared, never served.

Shadows run after the answer is computed, as background tasks, through their own clients
and breakers, so a failing or hanging shadow cannot delay an answer, fill the serving
connection pool or trip a breaker that serving relies on. At most `max_concurrency`
copies are in flight per model; beyond that, copies are dropped and counted (`on_drop`),
as are copies still in flight when the runner closes (a reload retiring it, or shutdown):
every copy is either compared, failed or counted as dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.backends import BackendError
from gateway.fallback import TargetGuard
from gateway.resilience import Outcome

log = logging.getLogger("gateway.shadow")

ShadowReport = Callable[[str, bool | None], None]


class ShadowRunner:
    """Fires shadow copies for one model within a concurrency bound."""

    def __init__(
        self,
        guards: Mapping[str, TargetGuard],
        max_concurrency: int,
        timeout_s: float,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self.guards = guards
        self._max = max_concurrency
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task] = set()
        self._on_drop = on_drop

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def fire(
        self, target: str, features: Mapping[str, Any], served_label: str,
        label_of: Callable[[float], str], report: ShadowReport,
    ) -> bool:  # fmt: skip
        """Start one copy unless the bound is reached; never waits."""
        guard = self.guards.get(target)
        if guard is None or len(self._tasks) >= self._max:
            self._on_drop()
            return False
        task = asyncio.create_task(
            self._call(target, guard, features, served_label, label_of, report)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _call(
        self, target: str, guard: TargetGuard, features: Mapping[str, Any],
        served_label: str, label_of: Callable[[float], str], report: ShadowReport,
    ) -> None:  # fmt: skip
        permit = guard.breaker.try_acquire(time.monotonic())
        if permit is None:
            report(target, None)
            return
        started = time.monotonic()
        try:
            probability = await guard.backend_answer(features, self._timeout_s, None)
        except asyncio.CancelledError:  # dropped (a reload, shutdown): no verdict on the backend
            guard.breaker.record(permit, Outcome.IGNORED, 0.0, time.monotonic())
            raise
        except BackendError:
            guard.breaker.record(
                permit, Outcome.FAILURE, time.monotonic() - started, time.monotonic()
            )
            report(target, None)
            return
        guard.breaker.record(permit, Outcome.SUCCESS, time.monotonic() - started, time.monotonic())
        report(target, label_of(probability) == served_label)

    async def close(self) -> None:
        """Cancel the copies still in flight, each counted as dropped."""
        for task in list(self._tasks):
            if task.cancel():
                self._on_drop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
