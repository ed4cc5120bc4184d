"""Statistics shared by the workers of one `aigw serve --workers N`: experiments and health.

Each worker answers its own share of the traffic and counts it in memory: per-arm experiment
statistics (experiments.py) and the drift and quality windows of model health
(monitoring.py). So that `GET /v1/experiments/{model_id}` and `GET /v1/models/{model_id}/health`
report the whole gateway whichever worker serves them, every worker writes what it counted
to `statistics/worker-N.json` in the workers' directory once a second (a whole new file each
time, renamed into place, so a reader never sees half of one), and a report adds its
siblings' latest files to its own live statistics: a sibling's part lags by at most about a
second. A worker that replaces a dead one starts from its predecessor's last file, so the
gateway's totals do not fall back (the dead worker's last second may be lost: a SIGKILL
allows no goodbye). An unreadable file is left out and logged, never counted in.

Replicas share the same statistics through Redis instead (replica_statistics.py,
`AIGW_SHARE_STATISTICS`), which then covers the workers of each replica too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.atomic_files import replace_file
from gateway.experiments import Experiments, Totals
from gateway.monitoring import Monitor

log = logging.getLogger("gateway.statistics")

PUBLISH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Published:
    """What one worker last wrote: experiment totals, and its health windows."""

    experiments: Totals
    windows: list[dict[str, Any]]


class SharedStatistics:
    """One worker's view of the workers' statistics files."""

    def __init__(self, workers_dir: Path, index: int) -> None:
        self.directory = workers_dir / "statistics"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.own = self.directory / f"worker-{index}.json"

    def restore(self, experiments: Experiments, monitor: Monitor) -> Monitor:
        """Continue the counts of the worker this one replaces, if it left any: its
        experiment totals are added to `experiments`; the monitor to use is returned."""
        predecessor = _read(self.own)
        if predecessor is None:
            return monitor
        experiments.add_totals(predecessor.experiments)
        return monitor.combined([predecessor.windows])

    def publish(self, experiments: Experiments, monitor: Monitor) -> None:
        """Write this worker's statistics where its siblings read them."""
        content = {"experiments": experiments.totals(), "windows": monitor.windows()}
        replace_file(self.own, orjson.dumps(content))

    def siblings(self) -> list[Published]:
        """Every other worker's last published statistics (an unreadable file is left out)."""
        files = sorted(p for p in self.directory.glob("worker-*.json") if p != self.own)
        return [published for published in map(_read, files) if published is not None]

    async def publish_forever(
        self,
        statistics_of: Callable[[], tuple[Experiments, Monitor]],
        interval_s: float = PUBLISH_INTERVAL_S,
    ) -> None:
        """Publish `statistics_of()` (experiments, monitor) every `interval_s` until
        cancelled, and once more then (a clean stop).

        On the loop, not in a thread: a write of some kilobytes once a second, and a
        thread's write could land after the final one and undo it."""
        try:
            while True:
                self._publish_logged(*statistics_of())
                await asyncio.sleep(interval_s)
        finally:
            self._publish_logged(*statistics_of())

    def _publish_logged(self, experiments: Experiments, monitor: Monitor) -> None:
        try:
            self.publish(experiments, monitor)
        except OSError as error:
            log.warning(
                "statistics not shared with the other workers", extra={"error": repr(error)}
            )


def _read(path: Path) -> Published | None:
    """The statistics in `path`, their experiment totals checked; None when missing or
    malformed (the windows are checked where they are added: Monitor.combined)."""
    try:
        content = orjson.loads(path.read_bytes())
        published = Published(content["experiments"], list(content["windows"]))
        Experiments().add_totals(published.experiments)  # raises unless the totals are sound
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        log.warning("statistics unreadable", extra={"file": str(path), "error": repr(error)})
        return None
    return published
