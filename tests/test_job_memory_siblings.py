"""Pending jobs visible to sibling workers through marks in the shared directory."""

from __future__ import annotations

import subprocess
import sys

from gateway.job_memory import MemoryJobs, PendingMarks


def test_a_marked_job_is_pending_with_its_tenant_until_cleared(tmp_path):
    """A mark names the job's tenant while it waits; a cleared mark says nothing."""
    marks = PendingMarks(tmp_path / "pending")
    marks.mark("id-1", "acme")
    assert marks.holder_tenant("id-1") == "acme"
    marks.clear("id-1")
    assert marks.holder_tenant("id-1") is None
    marks.clear("id-1")  # clearing twice is harmless


def test_a_mark_left_by_a_dead_worker_is_not_pending(tmp_path):
    """The in-memory job died with its worker: its mark no longer says pending."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "id-2").write_text(f"{dead.stdout.strip()} acme")
    assert PendingMarks(tmp_path).holder_tenant("id-2") is None


def test_an_unreadable_mark_is_not_pending(tmp_path):
    """A torn or foreign file in the directory is ignored, not an error."""
    (tmp_path / "id-3").write_text("garbage")
    assert PendingMarks(tmp_path).holder_tenant("id-3") is None
    assert PendingMarks(tmp_path).holder_tenant("never-marked") is None


def test_a_failed_job_reads_as_failed_for_the_keep_time_then_is_forgotten(tmp_path):
    """Its answer will never reach the audit log: the mark itself says failed, for a while."""
    marks = PendingMarks(tmp_path)
    marks.mark("id-4", "acme")
    marks.mark_failed("id-4", "acme")
    assert marks.holder_tenant("id-4") is None  # not pending any more
    assert marks.failed_tenant("id-4", keep_s=60) == "acme"
    assert marks.failed_tenant("id-4", keep_s=-1) is None  # older than kept: removed
    assert not (tmp_path / "id-4").exists()
    assert marks.failed_tenant("never-marked", keep_s=60) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left behind


async def test_a_sibling_reports_a_job_another_worker_failed(tmp_path):
    """A poll that reaches another worker than the failed job's gets failed, not unknown."""
    sibling = MemoryJobs(siblings_dir=tmp_path)
    PendingMarks(tmp_path).mark("id-5", "acme")
    assert (await sibling.outcome("id-5")).status == "pending"
    PendingMarks(tmp_path).mark_failed("id-5", "acme")
    outcome = await sibling.outcome("id-5")
    assert (outcome.status, outcome.tenant) == ("failed", "acme")
