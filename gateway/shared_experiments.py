"""Experiment statistics shared by the workers of one `aigw serve --workers N`.

Each worker answers its own share of the traffic and counts it in memory (experiments.py).
So that `GET /v1/experiments/{model_id}` reports the whole gateway whichever worker serves
it, every worker writes its totals to `experiments/worker-N.json` in the workers' directory
once a second (a whole new file each time, renamed into place, so a reader never sees half
of one), and a report adds its siblings' latest files to its own live statistics: a
sibling's counts lag by at most about a second. A worker that replaces a dead one starts
from its predecessor's last file, so the gateway's totals do not fall back (the dead worker's
last second may be lost, as a SIGKILL allows no goodbye).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from gateway.experiments import Experiments, Totals

log = logging.getLogger("gateway.experiments")

PUBLISH_INTERVAL_S = 1.0


class SharedExperiments:
    """One worker's view of the workers' experiment files."""

    def __init__(self, workers_dir: Path, index: int) -> None:
        self.directory = workers_dir / "experiments"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.own = self.directory / f"worker-{index}.json"

    def restore(self, experiments: Experiments) -> None:
        """Continue the counts of the worker this one replaces, if it left any."""
        totals = _read(self.own)
        if totals is not None:
            experiments.add_totals(totals)

    def publish(self, totals: Totals) -> None:
        """Write this worker's totals where its siblings read them."""
        partial = self.own.with_suffix(".partial")
        partial.write_bytes(orjson.dumps(totals))
        os.replace(partial, self.own)

    def siblings(self) -> list[Totals]:
        """Every other worker's last published totals (an unreadable file is left out)."""
        files = sorted(p for p in self.directory.glob("worker-*.json") if p != self.own)
        return [totals for totals in map(_read, files) if totals is not None]

    async def publish_forever(
        self, experiments: Experiments, interval_s: float = PUBLISH_INTERVAL_S
    ) -> None:
        """Publish every `interval_s` until cancelled, and once more then (a clean stop).

        On the loop, not in a thread: a write of a few kilobytes once a second, and a
        thread's write could land after the final one and undo it."""
        try:
            while True:
                self._publish_logged(experiments)
                await asyncio.sleep(interval_s)
        finally:
            self._publish_logged(experiments)

    def _publish_logged(self, experiments: Experiments) -> None:
        try:
            self.publish(experiments.totals())
        except OSError as error:
            log.warning("experiment statistics not shared", extra={"error": repr(error)})


def _read(path: Path) -> dict[str, Any] | None:
    """The totals in `path`, checked to be statistics; None when missing or malformed."""
    try:
        totals = orjson.loads(path.read_bytes())
        Experiments().add_totals(totals)  # raises unless every arm's statistics are sound
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        log.warning(
            "experiment statistics unreadable", extra={"file": str(path), "error": repr(error)}
        )
        return None
    return totals
