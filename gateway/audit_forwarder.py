"""Ships the local audit log to a Redis Stream, where the trails of several replicas meet.

The local log (`gateway.audit`) stays the record of truth and is both the hand-off point and
the spill: a request is answered once its record is on local disk, and this forwarder tails the
segments afterwards, in chain order, shipping every complete line (records and checkpoints)
with XADD. While Redis is away nothing is queued in memory and nothing is dropped: the lines
simply stay on disk, `pending_bytes()` grows, and they are replayed in order when Redis returns.

Stream entries. One per line, with the fields `replica` (which gateway wrote it), `seq` (the
line's `seq`), `type` (`record` or `checkpoint`: a checkpoint repeats the seq of the last record
it seals, as in the local log, so seq alone does not name a line) and `line` (the line's exact
bytes as on disk, trailing newline included, so a consumer can rebuild a replica's segments
byte for byte and check them with `gateway.audit.ChainCheck`).

Retention. With `retention_s`, each XADD also trims entries older than that (`MINID`,
approximate: whole stream nodes, so a few older ones may stay a while), so the stream holds
a bounded window for consumers, not every answer since the first; 0 leaves trimming to them.

Decisions. With `decisions_ttl_s`, each prediction record also sets
`aigw:decision:<prediction_id>` (what feedback needs of it, expiring after that many seconds)
in the same pipeline, so feedback reaching another replica finds the decision
(shared_decisions.py). A re-sent batch sets the same keys again.

Cursor. Where shipping stands is kept in `<directory>/forwarder.cursor` (a name outside the
`audit-*.jsonl` pattern, so the log never takes it for a segment), one JSON line:

    {"offset":123456,"segment":3,"seq":4567}

`segment` is the number of the segment being read (0 before the first), `offset` the byte
offset after the last line shipped in it, `seq` that line's seq. It is rewritten after every
shipped batch by writing a temporary file, fsyncing it and renaming it over the old one, so it is
always one whole cursor, old or new.

Delivery is at least once. The cursor is written after Redis acknowledged the batch, so a
crash (or a failed pipeline that Redis had partly applied) between the two re-sends up to one
batch on the next attempt. Consumers dedupe on (`replica`, `seq`, `type`); a replica's lines
arrive in chain order, a re-sent run repeating lines already seen.

Limits. One forwarder per log directory (two would ship everything twice). Lines are read from
the page cache, so a line can ship and then be lost by the log (a machine crash before its
fsync, or a batch the writer cut back after a failed write); the log then reuses its seq. That
is logged (the segment is shorter than the cursor, or seq steps back), the stream holds two
different lines under one (replica, seq) that the chain hashes tell apart, and if the log had
already grown past the old cursor a fragment of a line ships as type `unparseable`. A sealed
segment ending in a torn line (only tampering makes one) stalls shipping there rather than
skipping bytes; `pending_bytes()` shows it and `verify` names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.audit import CHECKPOINT, MiB, is_checkpoint, parse_line, segment_files, segment_name
from gateway.shared_decisions import DECISION_PREFIX, decision_entry, with_entry

log = logging.getLogger("gateway.audit_forwarder")

STREAM = "aigw:audit"
CURSOR_NAME = "forwarder.cursor"
MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
REDIS_TIMEOUT_S = 2.0  # a 500-line pipeline must fit; a dead peer must not hold a batch long
MAX_BATCH_BYTES = 4 * MiB  # bounds one batch's memory and its time on the reader thread
RECORD, UNPARSEABLE = "record", "unparseable"


# ---- the cursor: where shipping stands, persisted atomically ---------------------------------


@dataclass(frozen=True)
class Cursor:
    """The position after the last line shipped: segment number, byte offset in it, its seq."""

    segment: int
    offset: int
    seq: int

    def to_json(self) -> bytes:
        fields = {"segment": self.segment, "offset": self.offset, "seq": self.seq}
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) + b"\n"


START = Cursor(segment=0, offset=0, seq=0)  # before the first segment: ship the whole log


def cursor_from_json(data: bytes) -> Cursor | None:
    """The cursor a file holds, or None when it is not one."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    values = [fields.get(name) for name in ("segment", "offset", "seq")]
    if not all(_is_count(value) for value in values):
        return None
    return Cursor(*values)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_cursor(path: Path) -> Cursor:
    """The persisted cursor; START when there is none or it is unreadable (at least once)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return START
    cursor = cursor_from_json(data)
    if cursor is None:
        log.warning("audit forwarder: cursor unreadable, shipping from the start")
        return START
    return cursor


def save_cursor(path: Path, cursor: Cursor) -> None:
    """Replace the cursor file in one step, so a crash leaves the old cursor or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        file.write(cursor.to_json())
        file.flush()
        os.fsync(file.fileno())  # else a machine crash could leave the renamed file empty
    os.replace(temporary, path)


# ---- reading the log: complete lines only, in chain order --------------------------------------


@dataclass(frozen=True)
class Batch:
    """Lines read from the cursor on, their seqs and types, and where they end."""

    lines: list[bytes] = field(default_factory=list)
    seqs: list[int | None] = field(default_factory=list)  # None: not a record (never expected)
    types: list[str] = field(default_factory=list)
    end: Cursor = START
    # (line index, prediction id, decision) of each prediction record, for other replicas
    decisions: list[tuple[int, str, bytes]] = field(default_factory=list)


def read_batch(
    directory: Path, start: Cursor, limit: int, max_bytes: int = MAX_BATCH_BYTES
) -> Batch:
    """Up to `limit` complete lines from `start` on, moving into later segments as they seal.

    Blocking file I/O: run it on a thread.
    """
    lines: list[bytes] = []
    segment, offset = start.segment, start.offset
    while len(lines) < limit:
        # List before reading: once a later segment exists this one is sealed, so reading it to
        # its end afterwards cannot miss its checkpoint.
        later = _next_segment(directory, segment)
        budget = max_bytes - sum(map(len, lines))
        taken, offset, drained = read_complete_lines(
            directory / segment_name(segment), offset, limit - len(lines), budget
        )
        lines += taken
        if not drained or later is None:
            break
        segment, offset = later, 0
    entries = [parse_line(line) for line in lines]
    described = [describe_line(entry) for entry in entries]
    seqs = [seq for seq, _ in described]
    last_seq = next((seq for seq in reversed(seqs) if seq is not None), start.seq)
    decisions = [
        (index, *kept)
        for index, kept in enumerate(map(_decision_entry, entries))
        if kept is not None
    ]
    kinds = [kind for _, kind in described]
    return Batch(lines, seqs, kinds, Cursor(segment, offset, last_seq), decisions)


def _decision_entry(entry: dict[str, Any] | None) -> tuple[str, bytes] | None:
    return decision_entry(entry) if entry is not None else None


def read_complete_lines(
    path: Path, offset: int, limit: int, max_bytes: int
) -> tuple[list[bytes], int, bool]:
    """Complete lines from `offset`, the offset after them, and whether the file ends there.

    A last line without its newline is still being written (or torn): it is left for later.
    """
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return [], offset, True
    with file:
        offset = _clamped(path, offset, os.fstat(file.fileno()).st_size)
        file.seek(offset)
        lines: list[bytes] = []
        read = 0
        while len(lines) < limit and read < max_bytes:
            line = file.readline()
            if not line.endswith(b"\n"):
                return lines, offset + read, not line
            lines.append(line)
            read += len(line)
        return lines, offset + read, False


def _clamped(path: Path, offset: int, size: int) -> int:
    # The log only ever cuts a file back to a line boundary (a torn tail on open, a failed
    # write), so its new end is where its next line will start.
    if offset <= size:
        return offset
    log.warning(
        "audit forwarder: segment shorter than the cursor; shipped lines were cut from the log",
        extra={"file": path.name, "cursor_offset": offset, "size": size},
    )
    return size


def _next_segment(directory: Path, after: int) -> int | None:
    return next((number for number, _ in _segments(directory) if number > after), None)


def _segments(directory: Path) -> list[tuple[int, Path]]:
    try:
        return segment_files(directory)
    except FileNotFoundError:  # the log has not been opened yet
        return []


def describe_line(entry: dict[str, Any] | None) -> tuple[int | None, str]:
    """A parsed line's seq and type; a line that is no record (None) still ships, for verify
    to flag."""
    if entry is None:
        log.warning("audit forwarder: shipping a line that is not a record")
        return None, UNPARSEABLE
    return entry["seq"], CHECKPOINT if is_checkpoint(entry) else RECORD


def unshipped_bytes(directory: Path, cursor: Cursor) -> int:
    """Bytes on disk after the cursor: the spill still to be shipped."""
    total = 0
    for number, path in _segments(directory):
        if number < cursor.segment:
            continue
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            total += max(0, size - cursor.offset) if number == cursor.segment else size
    return total


def oldest_kept_entry(now_s: float, retention_s: int) -> str | None:
    """The stream id below which entries are trimmed (`XADD ... MINID`), or None to keep
    all. Redis names entries after its clock in milliseconds; a replica's clock a few seconds
    off moves the cut by as much, nothing next to a retention of hours."""
    if retention_s <= 0:
        return None
    return f"{max(0, int((now_s - retention_s) * 1000))}-0"


def seq_gaps(previous: int, seqs: list[int | None]) -> Iterator[tuple[int, int]]:
    """Where seq jumps backwards or skips: (before, after). A checkpoint repeats its seq."""
    for seq in seqs:
        if seq is None:
            continue
        if seq not in (previous, previous + 1):
            yield previous, seq
        previous = seq


# ---- the forwarder ------------------------------------------------------------------------------


class AuditForwarder:
    """Tails the local audit log and ships every line to a Redis Stream, at least once.

    Counters, plain ints for metrics: `forwarded` lines acknowledged by Redis, `errors` failed
    attempts (Redis unreachable or refusing, a file or the cursor unwritable). `pending_bytes()`
    is the spill: bytes on disk not yet shipped. Consumers dedupe on (replica, seq, type): after
    a crash or a failed batch, up to one batch may arrive twice. Start once, stop once; one
    forwarder per log directory.
    """

    def __init__(
        self,
        directory: Path,
        redis_url: str,
        stream: str = STREAM,
        replica: str | None = None,
        batch: int = 500,
        poll_s: float = 0.2,
        retention_s: int = 0,
        decisions_ttl_s: int = 0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        # Entries older than this are trimmed from the stream as batches are added (0: kept
        # until a consumer trims them). The local log stays the record of everything.
        self.retention_s = retention_s
        self._wall = wall_clock
        # Each prediction's decision kept this long for feedback elsewhere (0: not kept).
        self.decisions_ttl_s = decisions_ttl_s
        self.stream = stream
        self.replica = replica or socket.gethostname()
        self.forwarded = self.errors = 0
        self._batch, self._poll_s = batch, poll_s
        self._cursor_path = self.directory / CURSOR_NAME
        self._cursor = self._saved = START
        # No retries inside redis-py: each attempt fails fast and our backoff paces the next.
        self._redis = aioredis.from_url(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def cursor(self) -> Cursor:
        """Where shipping stands: the position after the last line Redis acknowledged."""
        return self._cursor

    def pending_bytes(self) -> int:
        """Bytes written to the log and not yet shipped (a listing and a few stats: cheap)."""
        return unshipped_bytes(self.directory, self._cursor)

    async def start(self) -> None:
        """Resume from the persisted cursor and tail the log in the background; never connects."""
        if self._task is not None:
            raise RuntimeError("the audit forwarder is already running")
        self._cursor = self._saved = await asyncio.to_thread(load_cursor, self._cursor_path)
        self._task = asyncio.create_task(self._forward_forever(), name="audit-forwarder")

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Ship what is on disk while Redis takes it (within the timeout), then stop.

        With Redis away the flush gives up at the first failure: the lines stay on disk and
        the next start replays them. Never raises for Redis trouble.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=flush_timeout_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning(
                "audit forwarder: flush timed out; the rest ships on the next start",
                extra={"pending_bytes": self.pending_bytes()},
            )
        await self._redis.aclose()

    async def _forward_forever(self) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            try:
                shipped = await self._forward_batch()
            except Exception as error:  # outlive any failure: the lines wait on disk meanwhile
                self._count_failure(error)
                if self._stopping.is_set():
                    return  # shutting down with Redis away: the next start replays the rest
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = MIN_BACKOFF_S
            if shipped:
                continue  # a backlog: keep going without waiting for the poll
            if self._stopping.is_set():
                return  # everything on disk has shipped
            await self._pause(self._poll_s)

    async def _forward_batch(self) -> int:
        """Ship the next batch and persist the cursor after it; how many lines shipped."""
        batch = await asyncio.to_thread(read_batch, self.directory, self._cursor, self._batch)
        if batch.lines:
            self._warn_on_seq_gaps(batch.seqs)
            await self._xadd(batch)
            self.forwarded += len(batch.lines)
        self._cursor = batch.end
        if self._cursor != self._saved:
            # Also retried with no new lines, so a cursor that failed to save is saved later.
            cursor = self._cursor
            await asyncio.to_thread(save_cursor, self._cursor_path, cursor)
            self._saved = cursor
        return len(batch.lines)

    async def _xadd(self, batch: Batch) -> None:
        oldest = oldest_kept_entry(self._wall(), self.retention_s)
        async with self._redis.pipeline(transaction=False) as pipe:
            for line, seq, kind in zip(batch.lines, batch.seqs, batch.types, strict=True):
                fields = {
                    "replica": self.replica,
                    "seq": "" if seq is None else seq,
                    "type": kind,
                    "line": line,
                }
                # Approximate trimming drops whole radix-tree nodes: cheap, and never an entry
                # younger than `oldest`.
                pipe.xadd(self.stream, fields, minid=oldest, approximate=True)
            entry_ids = await pipe.execute()
        if self.decisions_ttl_s and batch.decisions:
            await self._keep_decisions(batch.decisions, entry_ids)

    async def _keep_decisions(
        self, decisions: list[tuple[int, str, bytes]], entry_ids: list[Any]
    ) -> None:
        """Each decision, naming the entry its whole record went to (one more round trip;
        if it fails, the batch is shipped again: at least once, as every line)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for index, prediction_id, decision in decisions:
                entry = entry_ids[index]
                kept = with_entry(decision, entry.decode() if isinstance(entry, bytes) else entry)
                pipe.set(DECISION_PREFIX + prediction_id, kept, ex=self.decisions_ttl_s)
            await pipe.execute()

    def _warn_on_seq_gaps(self, seqs: list[int | None]) -> None:
        for before, after in seq_gaps(self._cursor.seq, seqs):
            log.warning(
                "audit forwarder: seq jumps; lines were lost or rewritten before shipping",
                extra={"after_seq": before, "seq": after},
            )

    def _count_failure(self, error: Exception) -> None:
        self.errors += 1
        details = {"error": repr(error), "pending_bytes": self.pending_bytes()}
        if isinstance(error, RedisError | OSError):
            log.warning("audit forwarder: batch not shipped; retrying", extra=details)
        else:
            log.exception("audit forwarder: unexpected failure; retrying", extra=details)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when stop() asks for the flush."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
