"""Workers' statistics files: each worker publishes what it counted, and reads its siblings'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.experiments import Decision, Experiments
from gateway.monitoring import Monitor, load_baselines
from gateway.shared_statistics import SharedStatistics
from tests.conftest import REPO

MODEL = "customer-churn"
ROW = {"tenure_months": 24, "monthly_charges": 89.99}
ARM_MODEL = "churn_gbm:1"  # what the control arm asks first
CONTROL = f"control@{ARM_MODEL}"  # where its statistics are kept


def empty_monitor() -> Monitor:
    return Monitor(load_baselines(REPO / "baselines"), min_sample_size=1)


def answered(count: int) -> tuple[Experiments, Monitor]:
    """A worker's statistics after `count` answers of the control arm, at t = 1 s."""
    experiments, monitor = Experiments(), empty_monitor()
    for n in range(count):
        experiments.record_answer(
            f"a-{n}", Decision(MODEL, "control", "stay", "t", arm_model=ARM_MODEL), 10.0, 0, 0
        )
        monitor.observe_prediction(MODEL, "churn-gbm:1", "control", ROW, 0.26, 1.0)
    return experiments, monitor


def requests_in(shared: SharedStatistics) -> list[int]:
    return [p.experiments[MODEL][CONTROL]["requests"] for p in shared.siblings()]


def drift_sample(monitor: Monitor) -> int:
    health = monitor.health(MODEL, now=2.0)["versions"]["churn-gbm:1"]["control"]
    return health["drift"]["sample_size"]


def test_each_worker_reads_every_sibling_but_itself(tmp_path: Path):
    """Three workers publish; each one's siblings are the other two, with their windows."""
    workers = [SharedStatistics(tmp_path, index) for index in range(3)]
    for index, worker in enumerate(workers):
        worker.publish(*answered(index + 1))
    assert requests_in(workers[0]) == [2, 3]
    assert requests_in(workers[2]) == [1, 2]
    combined = empty_monitor().combined(p.windows for p in workers[0].siblings())
    assert drift_sample(combined) == 5
    assert sorted(p.name for p in (tmp_path / "statistics").iterdir()) == [
        "worker-0.json",
        "worker-1.json",
        "worker-2.json",
    ]  # fmt: skip  (no partial file is left behind)


def test_a_replacement_worker_continues_its_predecessors_counts(tmp_path: Path):
    """Worker 1 dies after publishing 4 answers; its replacement starts from those 4."""
    SharedStatistics(tmp_path, 1).publish(*answered(4))
    experiments = Experiments()
    monitor = SharedStatistics(tmp_path, 1).restore(experiments, empty_monitor())
    assert experiments.report(MODEL, {"control": ARM_MODEL})["control"]["requests"] == 4
    assert drift_sample(monitor) == 4
    fresh = Experiments()
    untouched = empty_monitor()
    assert SharedStatistics(tmp_path, 2).restore(fresh, untouched) is untouched  # no predecessor
    assert fresh.totals() == {}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"experiments": {"customer-churn": {"control@m:1": {"requests": -3}}}, "windows": []}',
        b'{"experiments": {}}',
    ],
    ids=["empty", "broken-json", "not-an-object", "negative-count", "no-windows"],
)
def test_an_unreadable_sibling_file_is_left_out(tmp_path: Path, content: bytes):
    """A damaged file is skipped (and logged), never counted in, never an error."""
    worker, sibling = SharedStatistics(tmp_path, 0), SharedStatistics(tmp_path, 1)
    SharedStatistics(tmp_path, 2).publish(*answered(2))
    sibling.own.write_bytes(content)
    assert requests_in(worker) == [2]
    restored = Experiments()
    sibling.restore(restored, empty_monitor())  # the damaged worker's successor starts afresh
    assert restored.totals() == {}


async def test_publishing_runs_until_cancelled_and_publishes_once_more_then(tmp_path: Path):
    """The background task keeps the file fresh, and its last act is a final publish."""
    experiments, monitor = answered(1)
    worker, reader = SharedStatistics(tmp_path, 0), SharedStatistics(tmp_path, 1)
    task = asyncio.create_task(
        worker.publish_forever(lambda: (experiments, monitor), interval_s=0.01)
    )
    for _ in range(200):
        if requests_in(reader) == [1]:
            break
        await asyncio.sleep(0.01)
    assert requests_in(reader) == [1]
    experiments.record_answer(
        "late", Decision(MODEL, "control", "stay", "t", arm_model=ARM_MODEL), 1.0, False, False
    )
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert requests_in(reader) == [2]
