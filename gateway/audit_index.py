"""An index of one audit log by prediction id: a lookup reads one line, not the whole log.

`GET /v1/predictions/{id}` and its explanation look decisions up by id, and an unknown id
would otherwise mean reading every segment. The index is a SQLite file, `index.sqlite`,
beside the segments. The log's writer thread fills it after each group commit (answers never
wait for it), with each record's segment and byte offset, and it keeps the span of the log it
covers: from where indexing began to the end of the last batch it took in.

The index is a shortcut, never the truth: a lookup reads the line it points at and checks the
id there, and whatever the index does not cover (segments older than it, or records written
after its last batch, e.g. before a crash) is scanned as before. So a missing, stale or
broken index makes lookups slower, never wrong. At start the writer indexes what the log
gained since the index's coverage ended (normally nothing; after a crash, the last batch).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.sqlite_wal import enable_write_ahead_log

log = logging.getLogger("gateway.audit")

INDEX_NAME = "index.sqlite"
_ID_FIELD = b'"prediction_id":"'
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, segment INTEGER NOT NULL, offset INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS coverage (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    from_segment INTEGER NOT NULL, from_offset INTEGER NOT NULL,
    to_segment INTEGER NOT NULL, to_offset INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Coverage:
    """The log positions the index has taken in: (segment, offset) from, to (exclusive)."""

    from_segment: int
    from_offset: int
    to_segment: int
    to_offset: int


def prediction_id_of(line: bytes) -> str | None:
    """The `prediction_id` of a canonical audit line (sorted, compact keys), or None."""
    start = line.find(_ID_FIELD)
    if start < 0:
        return None
    if line.count(_ID_FIELD) > 1:
        # A caller's features may hold a key of that name too, and sort before the record's
        # own: only the parsed top level says which is the record's.
        return _top_level_id(line)
    start += len(_ID_FIELD)
    end = line.find(b'"', start)
    return line[start:end].decode() if end > start else None


def _top_level_id(line: bytes) -> str | None:
    try:
        value = orjson.loads(line).get("prediction_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def located(segment: int, offset: int, lines: Iterable[bytes]) -> Iterator[tuple[str, int, int]]:
    """(prediction id, segment, offset) of each decision among lines written from `offset`."""
    for line in lines:
        prediction_id = prediction_id_of(line)
        if prediction_id is not None:
            yield prediction_id, segment, offset
        offset += len(line)


def uncovered(segment: int, size: int, coverage: Coverage | None) -> list[tuple[int, int]]:
    """The byte ranges of one segment (of `size` bytes) that the index does not cover."""
    if coverage is None:
        return [(0, size)] if size else []
    start = (coverage.from_segment, coverage.from_offset)
    end = (coverage.to_segment, coverage.to_offset)
    ranges = []
    if (segment, 0) < start:  # part or all of this segment is older than the index
        stop = size if segment < start[0] else min(size, start[1])
        ranges.append((0, stop))
    if (segment, size) > end:  # part or all of it was written after the index's last batch
        begin = 0 if segment > end[0] else end[1]
        ranges.append((begin, size))
    return [(a, b) for a, b in ranges if b > a]


def _connect(directory: Path, read_only: bool = False) -> sqlite3.Connection:
    path = Path(directory) / INDEX_NAME
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    connection = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    enable_write_ahead_log(connection, timeout_s=5.0)
    connection.execute("PRAGMA synchronous=NORMAL")  # the index can be rebuilt: no fsync each
    connection.executescript(_SCHEMA)
    return connection


def _coverage(connection: sqlite3.Connection) -> Coverage | None:
    row = connection.execute(
        "SELECT from_segment, from_offset, to_segment, to_offset FROM coverage"
    ).fetchone()
    return Coverage(*row) if row else None


class IndexWriter:
    """Used by the log's writer thread only. Any SQLite error switches the index off for this
    process (logged once): lookups then scan what it no longer covers.

    Rows are committed in batches (`flush_rows` rows, or `flush_s` after the first waiting
    one, checked as batches arrive), not per group commit: a commit per answer cost about a
    tenth of a millisecond of the process's CPU. Rows not yet committed lie beyond the
    coverage, so lookups scan for them: correct, just slower, for that short tail.
    """

    def __init__(
        self,
        directory: Path,
        flush_rows: int = 512,
        flush_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = Path(directory)
        self._connection: sqlite3.Connection | None = None
        self._flush_rows, self._flush_s, self._clock = flush_rows, flush_s, clock
        self._rows: list[tuple[str, int, int]] = []
        self._end: tuple[int, int] | None = None
        self._first_waiting_at = 0.0

    def start(self, segment: int, size: int, segments: list[tuple[int, Path]]) -> None:
        """Open the index and take in what the log gained since its coverage ended."""
        try:
            self._connection = _connect(self._directory)
            coverage = _coverage(self._connection)
            if coverage is None or (coverage.to_segment, coverage.to_offset) > (segment, size):
                # New, or ahead of a log cut back: cover from here on (older: scanned).
                self._set_coverage(Coverage(segment, size, segment, size))
                return
            self._catch_up(coverage, segment, size, segments)
        except (sqlite3.Error, OSError) as error:
            self._switch_off(error)

    def add(self, segment: int, offset: int, lines: list[bytes]) -> None:
        """Take in lines just written to `segment` from `offset`; commit when one is due."""
        if self._connection is None:
            return
        if not self._rows:
            self._first_waiting_at = self._clock()
        self._rows.extend(located(segment, offset, lines))
        self._end = (segment, offset + sum(len(line) for line in lines))
        if (
            len(self._rows) >= self._flush_rows
            or self._clock() - self._first_waiting_at >= self._flush_s
        ):
            self.flush()

    def flush(self) -> None:
        """Commit the waiting rows and extend the coverage to the last line taken in."""
        if self._connection is None or self._end is None:
            return
        rows, self._rows = self._rows, []
        try:
            self._commit(rows, *self._end)
        except sqlite3.Error as error:
            self._switch_off(error)
        self._end = None

    def close(self) -> None:
        self.flush()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _commit(self, rows: Iterable[tuple[str, int, int]], segment: int, end: int) -> None:
        assert self._connection is not None
        self._connection.executemany(
            "INSERT OR REPLACE INTO records (id, segment, offset) VALUES (?, ?, ?)", rows
        )
        self._connection.execute(
            "UPDATE coverage SET to_segment = ?, to_offset = ?", (segment, end)
        )
        self._connection.commit()

    def _catch_up(
        self, coverage: Coverage, segment: int, size: int, segments: list[tuple[int, Path]]
    ) -> None:
        for number, path in segments:
            if number < coverage.to_segment or number > segment:
                continue
            begin = coverage.to_offset if number == coverage.to_segment else 0
            with path.open("rb") as file:
                file.seek(begin)
                lines = [line for line in file.readlines() if line.endswith(b"\n")]
            end = begin + sum(len(line) for line in lines)
            self._commit(located(number, begin, lines), number, end)

    def _set_coverage(self, coverage: Coverage) -> None:
        assert self._connection is not None
        self._connection.execute("DELETE FROM coverage")
        self._connection.execute(
            "INSERT INTO coverage VALUES (1, ?, ?, ?, ?)",
            (coverage.from_segment, coverage.from_offset, coverage.to_segment, coverage.to_offset),
        )
        self._connection.commit()

    def _switch_off(self, error: BaseException) -> None:
        log.error("audit index off: lookups scan the log", extra={"error": repr(error)})
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._rows, self._end = [], None


def index_lookup(
    directory: Path, prediction_id: str
) -> tuple[Coverage | None, tuple[int, int] | None]:
    """(coverage, (segment, offset) of the id) from the index; (None, None) without one."""
    if not (Path(directory) / INDEX_NAME).exists():
        return None, None
    try:
        connection = _connect(directory, read_only=True)
        try:
            # Coverage first: the writer commits rows and coverage together, so a row missing
            # after this read was missing at it too, and lies beyond the coverage read, where
            # the caller scans. Read the other way round, a commit between the two reads
            # would give no row and a coverage that skips the record.
            coverage = _coverage(connection)
            row = connection.execute(
                "SELECT segment, offset FROM records WHERE id = ?", (prediction_id,)
            ).fetchone()
            return coverage, (row[0], row[1]) if row else None
        finally:
            connection.close()
    except sqlite3.Error:
        return None, None  # a broken index: the caller scans everything
