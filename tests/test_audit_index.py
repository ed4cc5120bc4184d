"""The audit log's index by prediction id: lookups read one line, and a missing, lagging or
broken index makes them slower, never wrong."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway import audit_index
from gateway.audit import INDEX_DRAIN_S, find_record, segment_files
from gateway.audit_index import INDEX_NAME, Coverage, prediction_id_of, uncovered
from tests.test_audit import decision, new_log, write_log

COVERAGE = Coverage(from_segment=2, from_offset=100, to_segment=4, to_offset=50)


@pytest.mark.parametrize(
    ("segment", "size", "coverage", "expected"),
    [
        (1, 500, None, [(0, 500)]),  # no index: everything
        (1, 0, None, []),
        (1, 500, COVERAGE, [(0, 500)]),  # older than the index
        (2, 500, COVERAGE, [(0, 100)]),  # the index began inside this segment
        (3, 500, COVERAGE, []),  # wholly covered
        (4, 50, COVERAGE, []),  # covered up to its end
        (4, 80, COVERAGE, [(50, 80)]),  # written after the index's last batch
        (5, 30, COVERAGE, [(0, 30)]),  # a segment the index never saw
        (2, 80, Coverage(2, 100, 2, 100), [(0, 80)]),  # shorter than where indexing began
        (2, 300, Coverage(2, 100, 2, 200), [(0, 100), (200, 300)]),
    ],
)
def test_only_what_the_index_does_not_cover_is_scanned(segment, size, coverage, expected):
    """Byte ranges left to scan, per segment, for each shape of coverage."""
    assert uncovered(segment, size, coverage) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"model_id":"m","prediction_id":"p-1","seq":1}\n', "p-1"),
        (b'{"action":"apply","seq":2,"type":"admin"}\n', None),
        (b'{"prediction_id":"","seq":3}\n', None),
        # A caller's feature of that name sorts before the record's own id: not taken for it.
        (b'{"features":{"prediction_id":"p-2"},"prediction_id":"p-9","seq":4}\n', "p-9"),
    ],
)
def test_the_id_is_read_from_the_canonical_line(line, expected):
    """Decisions are indexed by their id; admin records and checkpoints are not."""
    assert prediction_id_of(line) == expected


async def test_every_decision_is_found_through_the_index_across_rotations(tmp_path):
    """60 decisions over several segments: each is found, from the index, by its id."""
    await write_log(tmp_path, 60, rotate_bytes=2000)
    assert len(segment_files(tmp_path)) > 2
    with sqlite3.connect(tmp_path / INDEX_NAME) as index:
        (indexed,) = index.execute("SELECT count(*) FROM records").fetchone()
    assert indexed == 60
    for i in (0, 7, 31, 59):
        found = find_record(tmp_path, f"p-{i:05d}")
        assert found is not None and found["features"]["customer_id"] == f"C{i}"
    assert find_record(tmp_path, "p-99999") is None


async def test_an_unknown_id_is_not_looked_for_where_the_index_covers(tmp_path):
    """A line the index never took in, inside what it covers, is not scanned for: lookups of
    unknown ids cost an index query, not a read of the log."""
    await write_log(tmp_path, 20)
    (_, path), *_ = segment_files(tmp_path)
    original = path.read_bytes()
    # Same length, so every indexed offset still holds: only the id of one line changes.
    path.write_bytes(original.replace(b'"p-00005"', b'"ghost00"', 1))
    assert find_record(tmp_path, "ghost00") is None
    assert find_record(tmp_path, "p-00006") is not None


async def test_records_the_index_missed_before_a_crash_are_still_found_and_indexed(tmp_path):
    """An index behind its log (the writer died between write and index): lookups scan the
    gap, and the next open takes the gap in."""
    await write_log(tmp_path, 10)
    with sqlite3.connect(tmp_path / INDEX_NAME) as index:
        (offset,) = index.execute("SELECT offset FROM records WHERE id = 'p-00006'").fetchone()
        index.execute("DELETE FROM records WHERE id >= 'p-00006'")
        index.execute("UPDATE coverage SET to_offset = ?", (offset,))
    assert find_record(tmp_path, "p-00008") is not None  # scanned: after the coverage
    await write_log(tmp_path, 2, start=10)  # opens again: catches up, then appends
    with sqlite3.connect(tmp_path / INDEX_NAME) as index:
        ids = {row[0] for row in index.execute("SELECT id FROM records")}
    assert ids == {f"p-{i:05d}" for i in range(12)}


async def test_a_broken_index_makes_lookups_scan_and_writes_go_on(tmp_path):
    """Garbage in place of the index: every decision is still found and appends still work."""
    await write_log(tmp_path, 5)
    for leftover in tmp_path.glob(f"{INDEX_NAME}*"):
        leftover.unlink()
    (tmp_path / INDEX_NAME).write_bytes(b"this is not a database" * 100)
    assert find_record(tmp_path, "p-00003") is not None
    await write_log(tmp_path, 3, start=5)  # the writer switches its index off, and writes
    assert find_record(tmp_path, "p-00007") is not None


async def test_a_log_from_before_the_index_is_found_by_scanning_its_older_part(tmp_path):
    """An index started on an existing log covers only what comes after: the rest is scanned."""
    await write_log(tmp_path, 5)
    for leftover in tmp_path.glob(f"{INDEX_NAME}*"):
        leftover.unlink()  # as if written by a gateway without the index
    await write_log(tmp_path, 5, start=5)
    assert find_record(tmp_path, "p-00001") is not None  # before the index: scanned
    assert find_record(tmp_path, "p-00008") is not None  # from the index
    with sqlite3.connect(tmp_path / INDEX_NAME) as index:
        (indexed,) = index.execute("SELECT count(*) FROM records").fetchone()
    assert indexed == 5


async def test_decisions_not_yet_committed_to_the_index_are_found_while_the_log_runs(tmp_path):
    """The index commits in batches: what it holds back lies past its coverage and is
    scanned, so a decision is found the moment its append returns."""
    log = new_log(tmp_path)
    await log.open()
    try:
        for i in range(5):
            await log.append(decision(i))
            found = find_record(tmp_path, f"p-{i:05d}")
            assert found is not None and found["seq"] == i + 1
    finally:
        await log.close()
    with sqlite3.connect(tmp_path / INDEX_NAME) as index:
        (indexed,) = index.execute("SELECT count(*) FROM records").fetchone()
    assert indexed == 5  # committed at the latest on close


async def test_a_feature_named_prediction_id_does_not_take_another_records_place(tmp_path):
    """A decision whose features hold a `prediction_id` (another decision's) is indexed under
    its own id, and the other decision keeps its row."""
    hostile = {**decision(100), "prediction_id": "p-own", "features": {"prediction_id": "p-00002"}}
    log = new_log(tmp_path)
    await log.open()
    try:
        for record in (decision(1), decision(2), hostile, decision(3)):
            await log.append(record)
    finally:
        await log.close()
    assert find_record(tmp_path, "p-own")["features"] == {"prediction_id": "p-00002"}
    assert find_record(tmp_path, "p-00002")["features"]["customer_id"] == "C2"


async def test_a_lookup_finds_a_record_whose_row_is_committed_while_it_reads(tmp_path, monkeypatch):
    """The writer commits rows and coverage together, at any moment. Here it commits while a
    lookup reads the index (forced by running the commit inside the lookup's coverage read):
    the record, acknowledged before the lookup began, is still found."""
    log = new_log(tmp_path)
    await log.open()
    try:
        index = log._writer._index
        index._flush_s = 3600.0  # rows wait for an explicit commit, however slow the machine
        await log.append(decision(1))
        index.flush()  # the index covers the first record
        await log.append(decision(2))  # acknowledged; its row waits for the next commit
        for _ in range(100):  # the writer thread takes inline writes in every INDEX_DRAIN_S
            if index._rows:
                break
            await asyncio.sleep(INDEX_DRAIN_S / 5)
        assert index._rows, "the row must wait for its commit"
        read_coverage = audit_index._coverage

        def commit_then_read(connection):
            index.flush()
            return read_coverage(connection)

        monkeypatch.setattr(audit_index, "_coverage", commit_then_read)
        found = find_record(tmp_path, "p-00002")
    finally:
        await log.close()
    assert found is not None and found["seq"] == 2
