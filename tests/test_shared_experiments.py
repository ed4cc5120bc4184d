"""Workers' experiment files: each worker publishes its totals, and reads its siblings'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.experiments import Decision, Experiments
from gateway.shared_experiments import SharedExperiments

MODEL = "customer-churn"


def answered(count: int, arm: str = "control") -> Experiments:
    experiments = Experiments()
    for n in range(count):
        decision = Decision(MODEL, arm, "stay", "t")
        experiments.record_answer(f"{arm}-{n}", decision, 10.0, False, False)
    return experiments


def requests_in(totals: list, arm: str = "control") -> list[int]:
    return [t[MODEL][arm]["requests"] for t in totals]


def test_each_worker_reads_every_sibling_but_itself(tmp_path: Path):
    """Three workers publish; each one's siblings are the other two."""
    workers = [SharedExperiments(tmp_path, index) for index in range(3)]
    for index, worker in enumerate(workers):
        worker.publish(answered(index + 1).totals())
    assert requests_in(workers[0].siblings()) == [2, 3]
    assert requests_in(workers[2].siblings()) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "experiments").iterdir()) == [
        "worker-0.json",
        "worker-1.json",
        "worker-2.json",
    ]  # fmt: skip  (no partial file is left behind)


def test_a_replacement_worker_continues_its_predecessors_counts(tmp_path: Path):
    """Worker 1 dies after publishing 4 answers; its replacement starts from those 4."""
    SharedExperiments(tmp_path, 1).publish(answered(4).totals())
    replacement = Experiments()
    SharedExperiments(tmp_path, 1).restore(replacement)
    assert replacement.report(MODEL)["control"]["requests"] == 4
    fresh = Experiments()
    SharedExperiments(tmp_path, 2).restore(fresh)  # no predecessor: starts from nothing
    assert fresh.report(MODEL) == {}


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[]", b'{"customer-churn": {"control": {"requests": -3}}}'],
    ids=["empty", "broken-json", "not-an-object", "negative-count"],
)
def test_an_unreadable_sibling_file_is_left_out(tmp_path: Path, content: bytes):
    """A damaged file is skipped (and logged), never counted in, never an error."""
    worker, sibling = SharedExperiments(tmp_path, 0), SharedExperiments(tmp_path, 1)
    SharedExperiments(tmp_path, 2).publish(answered(2).totals())
    sibling.own.write_bytes(content)
    assert requests_in(worker.siblings()) == [2]
    restored = Experiments()
    sibling.restore(restored)  # a replacement of the damaged worker starts from nothing
    assert restored.report(MODEL) == {}


async def test_publishing_runs_until_cancelled_and_publishes_once_more_then(tmp_path: Path):
    """The background task keeps the file fresh, and its last act is a final publish."""
    experiments = answered(1)
    worker, reader = SharedExperiments(tmp_path, 0), SharedExperiments(tmp_path, 1)
    task = asyncio.create_task(worker.publish_forever(experiments, interval_s=0.01))
    for _ in range(200):
        if requests_in(reader.siblings()) == [1]:
            break
        await asyncio.sleep(0.01)
    assert requests_in(reader.siblings()) == [1]
    experiments.record_answer("late", Decision(MODEL, "control", "stay", "t"), 1.0, False, False)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert requests_in(reader.siblings()) == [2]
