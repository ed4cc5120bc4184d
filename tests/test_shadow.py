"""Shadow copies: bounded, and every copy never compared is counted, across reloads too.

No Triton is called: the shadow target gathers its copies for 5 s before any call, so every
copy below is still gathering when the runner closes.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime import Snapshot, build_snapshot
from gateway.shadow import ShadowRunner
from gateway.telemetry import Metrics
from tests.test_runtime import MODEL, WINDOW, configuration

FEATURES = {"customer_id": "c-1", "tenure_months": 12, "monthly_charges": 70.0}
SLOW_GATHERING = [
    ("shadow_max_concurrency: 64", "shadow_max_concurrency: 2"),
    ("timeout_ms: 400", "timeout_ms: 10000"),
    (WINDOW, "shadow_batch_window_ms: 5000"),
]


def dropped(metrics: Metrics) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "aigw_shadow_dropped_total" and sample.labels == {"model": MODEL}:
                return sample.value
    return 0.0


def slow_gathering(data_dirs: Path) -> Path:
    for old, new in SLOW_GATHERING:
        configuration(data_dirs, (old, new))  # asserts the shipped text is there
    return data_dirs


def shadow_runner(
    root: Path, metrics: Metrics, previous: Snapshot | None = None
) -> tuple[Snapshot, ShadowRunner]:
    snapshot = build_snapshot(configuration(root), metrics, previous=previous)
    return snapshot, snapshot.models[MODEL].shadows


def fire(runner: ShadowRunner, reports: list) -> bool:
    return runner.fire(
        "churn-logreg", FEATURES, "stay", lambda _: "stay", lambda *r: reports.append(r)
    )


async def test_copies_past_the_bound_and_copies_cancelled_by_close_are_counted(data_dirs):
    """Two copies in flight at most: three more are dropped; closing the runner cancels the
    two gathering copies, which are counted too, and none of them is reported compared."""
    metrics, reports = Metrics(), []
    _, runner = shadow_runner(slow_gathering(data_dirs), metrics)
    assert [fire(runner, reports) for _ in range(5)] == [True, True, False, False, False]
    assert runner.in_flight == 2 and dropped(metrics) == 3
    await runner.close()
    assert runner.in_flight == 0 and dropped(metrics) == 5
    assert reports == []


async def test_the_dropped_count_survives_a_reload(data_dirs):
    """A reload builds a new runner for every model; the exported total keeps counting."""
    metrics, reports = Metrics(), []
    first, runner = shadow_runner(slow_gathering(data_dirs), metrics)
    for _ in range(3):
        fire(runner, reports)
    _, replacement = shadow_runner(data_dirs, metrics, previous=first)
    assert replacement is not runner
    await runner.close()  # what the reload does once the retired runner's grace has passed
    assert dropped(metrics) == 3  # one past the bound, two cancelled
    for _ in range(3):
        fire(replacement, reports)
    await replacement.close()
    assert dropped(metrics) == 6
