"""The audit trail: every prediction decision recorded, explainable and tamper-evident.

File format. The log is a directory of JSON Lines segments named `audit-000001.jsonl`,
`audit-000002.jsonl`, … (zero-padded, so name order is chain order). Each line is one record in
canonical JSON (`canonical_json`: sorted keys, compact, UTF-8, no NaN) and a newline. Besides
the caller's fields, every line carries three chain fields:

- `seq`: 1, 2, 3 … over the whole log, continuing across segments;
- `prev`: the `hash` of the line before it, in this segment or the previous one (`GENESIS`,
  64 zeros, for the very first record);
- `hash`: hex `sha256(canonical_json(line without "hash"))`; it covers `prev`, so every hash
  commits to everything before it.

Once a segment holds `rotate_bytes` or more, it is sealed by a checkpoint as its last line:

    {"file":"audit-000001.jsonl","file_records":120,"hash":"…","mac":"…","prev":"<hash of
    record 120>","seq":120,"type":"checkpoint"}

A checkpoint takes no number of its own (its `seq` repeats that of the last record it seals, so
records stay numbered 1..N); `prev` is the chain head it seals; `mac` is
`HMAC-SHA256(checkpoint_key, canonical_json(checkpoint without "mac" and "hash"))`, binding the
chain head, the segment's name and its record count. Its `hash` chains it like any other line:
the next segment's first record points at it. The checkpoint key is separate from the
pseudonymisation key and is used only at rotation, never per request. Ed25519 signatures (so a
verifier needs no secret) are the planned upgrade; they need `cryptography`, not yet a dependency.

What `verify` catches: a changed byte (hash mismatch, or a line no longer in canonical form), a
deleted, inserted, repeated or reordered record (seq and prev), a torn line, a sealed segment
that lost its checkpoint, a missing segment file, and, given the checkpoint key, a chain rewritten
by someone who recomputed the (unkeyed) hashes after an edit: the next checkpoint's MAC no longer
matches; given the rotation size, sealed segments merged into the newest, unsealed one (as such
a rewrite must, to drop their checkpoints) show by its size. Two things it cannot see alone: a
rewrite inside the newest, not yet sealed segment, and records cut off at the very end of the
log. Both show against an anchor kept elsewhere: a `(seq, hash)` that `verify` reported earlier
(`aigw audit verify` prints it; `--anchor SEQ:HASH` checks the log still holds it), or the
`AuditLog.seq` / `last_hash` of a running gateway.

Durability. `AuditLog.append` returns once the record's bytes were handed to the kernel with
write(2), so killing the process (SIGKILL, OOM) loses no acknowledged record. A machine crash can
lose what was written since the last fsync, at most `fsync_interval_s` ago; a write cut short
leaves a torn last line, which `AuditLog.open` truncates and counts (`torn_tail_repaired`).
When a write or fsync fails, the appends waiting on it and every later one raise
`AuditUnavailable` (the caller answers 503, never an unaudited answer) until `close()` and
`open()` resume from what is on disk; the writer cuts a half-written batch back first, so the
disk holds no record whose append failed, short of the cut failing too.

Lookups. `find_record` finds a decision by `prediction_id` through the log's index
(audit_index.py), which the writer thread fills after its writes, taking in those of the fast
path (below) when it next wakes; what the index does not cover is scanned.

Write path. Chaining (seq, prev, hash) happens on the event loop inside `append`, so chain
order is call order. The line then takes one of two paths:

- Fast path. When the writer thread is idle (nothing queued, nothing taken but not yet
  written, no seal pending), `append` makes the write(2) itself, on the event loop, through
  the writer thread's own write (`SegmentWriter.write_inline`: the same failure handling,
  truncation and counters), with no future to settle; it then yields to the loop once
  (`asyncio.sleep(0)`, as an append always suspended: a caller looping over appends must
  not starve other tasks) and returns, with no thread to wait for. At one
  request in flight that saves the two thread wake-ups (record to the writer, completion
  back to the loop) that cost far more than the write. One append per turn of the loop
  goes inline: another append in the same turn means load, and its record is queued.
- Group commit. Otherwise the line goes into a queue; a dedicated writer thread writes each
  batch that accumulated while it was busy with one write(2), and settles the waiting appends
  through `loop.call_soon_threadsafe`. Under load it stays busy, so records keep batching.

Sealing and rotating (an fdatasync, then a new file) are always the writer thread's: a record
that fills its segment may go inline, but its checkpoint is queued after it. An inline write
slower than `INLINE_SLOW_S` (2 ms) turns the fast path off for a pause (`INLINE_OFF_MIN_S`,
50 ms, doubling while slow writes keep coming, up to `INLINE_OFF_MAX_S`, 1 s), so a stalling
disk stalls the writer thread, not the loop: the loop pays only the write that reveals it
(and, the disk still slow, one per pause); a lone hiccup, such as the loop thread preempted
mid-write, costs a short pause, not a second of the slower path. The index (SQLite) stays the
writer thread's alone: the fast path hands it its rows, and the thread wakes at least every
`INDEX_DRAIN_S` to take them in. A second thread fsyncs in the background, so a slow fsync
never holds up a write.

Measured on the 2-core dev VM with an ~800-byte decision record (other work on the VM moves
these a lot): one append at a time takes p50 ~10-12 µs back to back and ~15-18 µs paced at
1,000/s on the fast path (chain, serialise, a write(2) of 1-3 µs, the yield), against
~32-78 µs and ~45-135 µs through the writer thread (the thread wake-ups, slower the more
deeply the idle thread sleeps); 10,000 appends started together (five asyncio.gather of
2,000) run at ~52,000-71,000/s either way, ~800-1,400 records per write. (Before the writer
thread, a writer task handing batches to `asyncio.to_thread` cost ~80-110 µs of loop CPU per
paced append.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fcntl
import hashlib
import hmac
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson

from gateway.audit_index import IndexWriter, index_lookup, uncovered

log = logging.getLogger("gateway.audit")

GENESIS = "0" * 64
MiB = 1024 * 1024
CHECKPOINT = "checkpoint"
PSEUDONYM_PREFIX = "hmac-sha256:"
CHAIN_FIELDS = frozenset({"seq", "prev", "hash"})
_SEGMENT_NAME = re.compile(r"audit-(\d{6,})\.jsonl")
_TAIL_BLOCK = 64 * 1024
_fdatasync = getattr(os, "fdatasync", os.fsync)  # appends need data and size, not mtime


class AuditError(Exception):
    """Base of the audit trail's errors."""


class AuditUnavailable(AuditError):
    """The record was not written: the caller must not answer as though it had been audited."""


class AuditCorrupt(AuditError):
    """The log on disk cannot be continued: its last line is not a valid record."""


class AuditLocked(AuditError):
    """Another process writes this log: two writers would interleave two chains in one."""


WRITER_LOCK_NAME = ".writer.lock"


# ---- canonical form, hashes, pseudonyms: pure functions ---------------------------------------


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The one byte form that is hashed and written: sorted keys, compact, UTF-8, no NaN."""
    return _canonical(record if isinstance(record, dict) else dict(record))


def _canonical(value: Any) -> bytes:
    encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if b"null" in encoded:
        _refuse_hidden_non_finite(value, encoded.count(b"null"), _direct_nones(value))
    return encoded


def _refuse_hidden_non_finite(value: Any, nulls: int, nones: int) -> None:
    """Refuse NaN and ±Infinity in `value`, whose encoding holds `nulls` times b"null" and
    which holds at least `nones` Nones."""
    # orjson writes NaN and ±Infinity as null, just as it writes None. Every null token in the
    # encoding is a None or a non-finite float, and counting b"null" finds every token (plus
    # any inside strings), so when the count is no more than the Nones already known to be in
    # the value, none of the tokens can be a NaN. Otherwise walk the value, exact as ever: a
    # None deeper down or a "null" inside a string only costs the walk every record used to.
    if nulls > nones:
        _refuse_non_finite((value,))


def _direct_nones(value: Any) -> int:
    """How many Nones `value` is or directly holds (one level, by identity)."""
    if isinstance(value, dict):
        value = dict.values(value)  # what orjson reads, whatever a subclass overrides
    elif not isinstance(value, (list, tuple)):
        return int(value is None)
    return sum(1 for item in value if item is None)


def _refuse_non_finite(container: dict | list | tuple) -> None:
    # Concrete types only (orjson serialises no other containers), and a call per container
    # rather than per value: this walk still runs on the event loop for any record holding a
    # None below the top level (see _refuse_hidden_non_finite).
    for item in container.values() if isinstance(container, dict) else container:
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("audit records cannot hold NaN or infinity")
        elif isinstance(item, (dict, list, tuple)):
            _refuse_non_finite(item)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a line must carry: over its canonical JSON without the `hash` field."""
    return sha256_hex(canonical_json({k: v for k, v in record.items() if k != "hash"}))


def carries_its_hash(entry: Mapping[str, Any]) -> bool:
    """The line read back carries the hash of its content. False, not an error, for content
    the gateway could never have written: orjson reads nesting it refuses to write."""
    try:
        return record_hash(entry) == entry["hash"]
    except TypeError:  # "Recursion limit reached" while serialising
        return False


def pseudonym(field: str, value: Any, key: bytes) -> str:
    """A keyed, deterministic stand-in for a personal value; the field name is mixed in."""
    message = field.encode() + b"\x00" + _canonical(value)
    return PSEUDONYM_PREFIX + hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def pseudonymise(
    features: Mapping[str, Any], pii_fields: Collection[str], key: bytes
) -> dict[str, Any]:
    """The features with each personal field replaced by its pseudonym; the rest unchanged."""
    return {
        name: pseudonym(name, value, key) if name in pii_fields else value
        for name, value in features.items()
    }


def chained(record: Mapping[str, Any], seq: int, prev: str) -> dict[str, Any]:
    """The record with its chain fields: seq, prev, and the hash covering both."""
    line = {**record, "seq": seq, "prev": prev}
    line["hash"] = sha256_hex(canonical_json(line))
    return line


def _chained_line(record: Mapping[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """`canonical_json(chained(record, seq, prev)) + b"\\n"` and its hash, serialised once.

    `record` must not hold seq, prev or hash (`_refuse_reserved_fields`).
    """
    # orjson sorts keys by their UTF-8 bytes, which is the order of str comparison, so the
    # line is `{<fields before "hash">,"hash":"…",<fields after>}` and the hashed bytes are the
    # same without the hash field. Serialising the two halves apart yields both, byte for
    # byte, from one pass over the record instead of a second full serialisation.
    try:
        before, after, nones = _split_at_hash(record)
    except TypeError:  # a key that is not a str: let orjson refuse it exactly as it always has
        entry = chained(record, seq, prev)
        return canonical_json(entry) + b"\n", entry["hash"]
    after["seq"], after["prev"] = seq, prev
    head = orjson.dumps(before, option=orjson.OPT_SORT_KEYS)[:-1]  # b"{…" or just b"{"
    tail = orjson.dumps(after, option=orjson.OPT_SORT_KEYS)[1:]  # b"…}", never empty
    # Walk the halves, not `record`: together they hold every value, and they are dicts.
    nulls = head.count(b"null") + tail.count(b"null")
    _refuse_hidden_non_finite((before, after), nulls, nones)
    if len(head) > 1:
        head += b","
    digest = hashlib.sha256(head + tail).hexdigest()
    return b"".join((head, b'"hash":"', digest.encode(), b'",', tail, b"\n")), digest


def _split_at_hash(record: Mapping[str, Any]) -> tuple[dict, dict, int]:
    """The fields sorting before "hash", those after, and how many of the values are None."""
    # One loop rather than a comprehension per half: measured ~1 µs against ~2 µs per record.
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    nones = 0
    for key, value in record.items():
        if key < "hash":
            before[key] = value
        else:
            after[key] = value
        if value is None:
            nones += 1
    return before, after, nones


def checkpoint_mac(checkpoint: Mapping[str, Any], key: bytes) -> str:
    body = {k: v for k, v in checkpoint.items() if k not in ("mac", "hash")}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def checkpoint(file: str, seq: int, prev: str, file_records: int, key: bytes) -> dict[str, Any]:
    """The line that seals a segment: MAC over its body, then chained like any line."""
    line: dict[str, Any] = {
        "type": CHECKPOINT,
        "file": file,
        "seq": seq,
        "prev": prev,
        "file_records": file_records,
    }
    line["mac"] = checkpoint_mac(line, key)
    line["hash"] = sha256_hex(canonical_json(line))
    return line


def is_checkpoint(line: Mapping[str, Any]) -> bool:
    return line.get("type") == CHECKPOINT


WORKER_DIR_PREFIX = "worker-"


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """The log's segments in chain order, with their numbers."""
    found = (
        (int(match.group(1)), path)
        for path in Path(directory).iterdir()
        if (match := _SEGMENT_NAME.fullmatch(path.name))
    )
    return sorted(found)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The line as a record when it is a JSON object with seq, prev and hash; else None."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    seq = entry.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if not isinstance(entry.get("prev"), str) or not isinstance(entry.get("hash"), str):
        return None
    return entry


# ---- verification: a pure checker fed line by line, and the walk over the files -------------


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on a log: ok, or the first problem as `file:line: what`."""

    ok: bool
    records: int
    problem: str | None = None
    file: str | None = None
    line: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.records} records, last seq {self.last_seq}"
        return f"{self.file}:{self.line}: {self.problem}"


class ChainCheck:
    """Takes a log's lines in order and names the first thing wrong; does no I/O."""

    def __init__(
        self,
        checkpoint_key: bytes | None = None,
        rotate_bytes: int | None = None,
        anchor: tuple[int, str] | None = None,
    ) -> None:
        self.seq = 0
        self.head = GENESIS
        self.records = 0
        self._key = checkpoint_key
        self._rotate_bytes = rotate_bytes
        self._anchor = anchor
        self._file: str | None = None
        self._file_records = 0
        self._file_bytes = self._last_line_bytes = 0
        self._sealed = False

    def start_file(self, name: str) -> None:
        self._file, self._file_records, self._sealed = name, 0, False
        self._file_bytes = self._last_line_bytes = 0

    def line_problem(self, line: bytes) -> str | None:
        """Why this line breaks the log, or None after taking it as the new chain head."""
        if self._sealed:
            return "a line follows the segment's checkpoint"
        if not line.endswith(b"\n"):
            return "torn line (no newline at the end): the file was truncated"
        entry = parse_line(line)
        if entry is None:
            return "not a JSON object with seq, prev and hash"
        problem = self._content_problem(entry, line) or self._order_problem(entry)
        problem = problem or (self._checkpoint_problem(entry) if is_checkpoint(entry) else None)
        problem = problem or self._anchor_problem(entry)
        if problem is None:
            self._advance(entry)
            self._file_bytes += len(line)
            self._last_line_bytes = len(line)
        return problem

    def end_problem(self, last_file: bool) -> str | None:
        """Why the current segment may not end here, or None."""
        if self._sealed:
            return None
        if not last_file:
            return "the segment ends without its checkpoint: lines were cut off"
        return self._unsealed_size_problem()

    def anchor_missed(self) -> str | None:
        """After the last line: why the anchor's record was never reached, or None."""
        if self._anchor is None or self.seq >= self._anchor[0]:
            return None
        return (
            f"the log ends at seq {self.seq}, before the anchor's seq {self._anchor[0]}: "
            "records were cut off"
        )

    def _unsealed_size_problem(self) -> str | None:
        # The writer seals a segment once a record takes it to `rotate_bytes`, so an unsealed
        # newest segment held less than that before its last record (which may have crossed
        # it just before a crash). More means segments were merged into it, as a rewrite of
        # sealed segments must, their checkpoints' MACs being out of reach without the key.
        if self._rotate_bytes is None:
            return None
        before_last = self._file_bytes - self._last_line_bytes
        if before_last < self._rotate_bytes:
            return None
        return (
            f"the newest segment holds {self._file_bytes} bytes unsealed, past the rotation "
            f"size {self._rotate_bytes}: segments were merged into it (or the rotation size "
            "was lowered since it was written)"
        )

    def _anchor_problem(self, entry: dict[str, Any]) -> str | None:
        if self._anchor is None or is_checkpoint(entry) or entry["seq"] != self._anchor[0]:
            return None
        if hmac.compare_digest(entry["hash"], self._anchor[1]):
            return None
        return f"record {entry['seq']} does not carry the anchor's hash: the log was rewritten"

    def _content_problem(self, entry: dict[str, Any], line: bytes) -> str | None:
        if not carries_its_hash(entry):
            return "hash mismatch: the record was altered"
        if canonical_json(entry) + b"\n" != line:
            return "not in canonical form: the bytes were altered"
        return None

    def _order_problem(self, entry: dict[str, Any]) -> str | None:
        # A checkpoint repeats the seq of the last record it seals; a record takes the next one.
        expected = self.seq if is_checkpoint(entry) else self.seq + 1
        seq = entry["seq"]
        if seq > expected:
            return f"seq {seq} where {expected} was expected: a record is missing or out of order"
        if seq < expected:
            return f"seq {seq} where {expected} was expected: a record is repeated or reordered"
        if entry["prev"] != self.head:
            return "prev is not the hash of the line before: the chain is broken"
        return None

    def _checkpoint_problem(self, entry: dict[str, Any]) -> str | None:
        if entry.get("file") != self._file:
            return f"the checkpoint seals {entry.get('file')!r}, not this file"
        if entry.get("file_records") != self._file_records:
            counted = entry.get("file_records")
            return f"the checkpoint counts {counted} records, the file holds {self._file_records}"
        if self._key is not None:
            mac = entry.get("mac")
            if not isinstance(mac, str) or not hmac.compare_digest(
                mac, checkpoint_mac(entry, self._key)
            ):
                return "checkpoint MAC does not match: the chain was rewritten or forged"
        return None

    def _advance(self, entry: dict[str, Any]) -> None:
        self.seq, self.head = entry["seq"], entry["hash"]
        if is_checkpoint(entry):
            self._sealed = True
        else:
            self.records += 1
            self._file_records += 1

    def result(
        self, problem: str | None = None, file: str | None = None, line: int = 0
    ) -> VerifyResult:
        return VerifyResult(
            ok=problem is None,
            records=self.records,
            problem=problem,
            file=file,
            line=line if problem else None,
            last_seq=self.seq,
            last_hash=self.head,
        )


def verify(
    directory: Path,
    checkpoint_key: bytes | None = None,
    rotate_bytes: int | None = None,
    anchor: tuple[int, str] | None = None,
) -> VerifyResult:
    """Walk every segment in order and report the first problem; only reads.

    Without `checkpoint_key` the checkpoints' MACs are not checked (see the module docstring
    for what that leaves unseen). With `rotate_bytes`, the log's rotation size, an unsealed
    newest segment larger than the writer leaves one is a problem. With `anchor`, a
    (seq, hash) taken from this log earlier and kept elsewhere, the log must still hold that
    record with that hash.
    """
    check = ChainCheck(checkpoint_key, rotate_bytes, anchor)
    segments = segment_files(directory)
    for index, (number, path) in enumerate(segments):
        expected = segments[index - 1][0] + 1 if index else 1
        if number != expected:
            missing = f"{segment_name(expected)} is missing (the files jump to {path.name})"
            return check.result(missing, path.name, 1)
        check.start_file(path.name)
        lines = 0
        try:
            with path.open("rb") as file:
                for lines, line in enumerate(file, 1):
                    if problem := check.line_problem(line):
                        return check.result(problem, path.name, lines)
        except OSError as error:  # a directory or dangling link in a segment's name, say
            return check.result(f"cannot be read: {error.strerror}", path.name, lines + 1)
        if problem := check.end_problem(last_file=index == len(segments) - 1):
            return check.result(problem, path.name, lines + 1)
    if problem := check.anchor_missed():
        last = segments[-1][1].name if segments else "(no segment)"
        return check.result(problem, last, 0)
    return check.result()


def worker_log_directory(root: Path, worker_index: int | None) -> Path:
    """Where one process writes: `root`, or `root/worker-N` when several workers share it
    (a log has exactly one writer, so each worker keeps its own chain)."""
    return root if worker_index is None else Path(root) / f"{WORKER_DIR_PREFIX}{worker_index}"


def log_directories(root: Path) -> list[Path]:
    """Every log under `root`: `root` itself when it holds segments, and each worker's."""
    root = Path(root)
    if not root.is_dir():
        return []
    workers = sorted(
        (path for path in root.glob(f"{WORKER_DIR_PREFIX}*") if path.is_dir()),
        key=lambda path: path.name,
    )
    own = [root] if segment_files(root) or not workers else []
    return own + [path for path in workers if segment_files(path)]


def find_record(directory: Path, prediction_id: str) -> dict[str, Any] | None:
    """The record of one decision, by `prediction_id`, in any log under `directory`, or None.

    Each log's index (audit_index.py) gives the line to read; what it does not cover (older
    segments, the last moments before a crash, a log without an index) is scanned, newest
    first, with a byte pre-filter before parsing.
    """
    for log_directory in log_directories(directory):
        entry = _find_in_log(log_directory, prediction_id)
        if entry is not None:
            return entry
    return None


def _find_in_log(directory: Path, prediction_id: str) -> dict[str, Any] | None:
    coverage, location = index_lookup(directory, prediction_id)
    if location is not None:
        entry = _entry_at(directory, *location)
        if entry is not None and entry.get("prediction_id") == prediction_id:
            return entry
        coverage = None  # the index points elsewhere: trust only a full scan
    needle = orjson.dumps(prediction_id)
    for number, path in reversed(segment_files(directory)):
        for start, end in uncovered(number, path.stat().st_size, coverage):
            for line in _lines_containing(path, needle, start, end):
                entry = parse_line(line)
                if entry is not None and entry.get("prediction_id") == prediction_id:
                    return entry
    return None


def _entry_at(directory: Path, segment: int, offset: int) -> dict[str, Any] | None:
    try:
        with (directory / segment_name(segment)).open("rb") as file:
            file.seek(offset)
            return parse_line(file.readline())
    except OSError:
        return None


def _lines_containing(path: Path, needle: bytes, start: int = 0, end: int = -1) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        position = start
        for line in file:
            if 0 <= end <= position:
                return
            position += len(line)
            if needle in line:
                yield line


# ---- recovery on open: where the chain on disk ends -------------------------------------------


@dataclass
class ChainTail:
    """What the next line continues from, and where it goes."""

    seq: int
    prev: str
    segment: int
    segment_bytes: int
    segment_records: int


def cut_torn_tail(path: Path) -> int:
    """Truncate a last line that lacks its newline (a write cut short); the bytes cut."""
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = _last_newline_before(file, size) + 1
        if end < size:
            file.truncate(end)
            os.fsync(file.fileno())
        return size - end


def _last_newline_before(file: BinaryIO, position: int) -> int:
    """Offset of the last newline before `position`, or -1; reads backwards in blocks."""
    while position > 0:
        start = max(0, position - _TAIL_BLOCK)
        file.seek(start)
        found = file.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found
        position = start
    return -1


def _last_line(path: Path) -> bytes | None:
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = _last_newline_before(file, size - 1) + 1
        file.seek(start)
        return file.read(size - start)


def _first_line(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.readline()


def _valid_entry(line: bytes, path: Path) -> dict[str, Any]:
    entry = parse_line(line)
    if entry is None or not carries_its_hash(entry):
        raise AuditCorrupt(f"{path.name}: the last line is not a valid record; run verify")
    return entry


def chain_tail(directory: Path) -> ChainTail:
    """Where the chain on disk ends (a torn last line must have been cut already)."""
    segments = segment_files(directory)
    newest = segments[-1][0] if segments else 1
    found = _newest_line(segments)
    if found is None:
        return ChainTail(0, GENESIS, newest, 0, 0)
    number, path, line = found
    entry = _valid_entry(line, path)
    if is_checkpoint(entry):
        # A sealed newest segment means a crash between sealing it and opening the next.
        segment = newest + 1 if number == newest else newest
        return ChainTail(entry["seq"], entry["hash"], segment, 0, 0)
    if number != newest:
        return ChainTail(entry["seq"], entry["hash"], newest, 0, 0)
    first = parse_line(_first_line(path)) or entry
    records = entry["seq"] - first["seq"] + 1
    return ChainTail(entry["seq"], entry["hash"], newest, path.stat().st_size, records)


def _newest_line(segments: list[tuple[int, Path]]) -> tuple[int, Path, bytes] | None:
    """The last line of the newest segment that has one (a fresh segment is empty)."""
    for number, path in reversed(segments):
        if (line := _last_line(path)) is not None:
            return number, path, line
    return None


# ---- the writer: one write() per batch (or inline when idle), rotation, background fsync ------

_STOP = object()
Item = tuple[bytes, "asyncio.Future[None] | None", bool]  # line, waiting append, seals segment
Settle = Callable[[list, list, int, int], None]  # acknowledged, refused, errors, writes
Indexed = tuple[int, int, list[bytes]]  # segment, offset, the lines written there

# The fast path (see the module docstring): an inline write slower than INLINE_SLOW_S turns it
# off for INLINE_OFF_MIN_S, doubled for each slow one that follows within INLINE_OFF_MAX_S of
# the last pause, up to INLINE_OFF_MAX_S, so a stalling disk stalls the writer thread, not the
# event loop, while a one-off (the loop thread preempted, say) costs only a short pause.
INLINE_SLOW_S = 0.002
INLINE_OFF_MIN_S = 0.05
INLINE_OFF_MAX_S = 1.0
# How long lines written inline may wait before the writer thread takes them into the index
# when no batch wakes it sooner (the index may lag its log; lookups scan what it lacks).
INDEX_DRAIN_S = 0.25


def open_segment(path: Path) -> BinaryIO:
    # Unbuffered: each write() is the write(2) that hands the bytes to the kernel.
    return path.open("ab", buffering=0)


class InlineWrite(enum.Enum):
    """What became of a line the event loop wrote itself (`SegmentWriter.write_inline`)."""

    WRITTEN = "written"
    FAILED = "failed"  # write(2) failed: the log has failed
    REFUSED = "refused"  # the log had failed already: nothing was tried


class Outcome(NamedTuple):
    """What writing one batch came to."""

    acknowledged: list  # the appends whose lines were written
    refused: list  # the appends whose lines were not
    errors: int  # failed writes and rotations
    writes: int  # write() calls that succeeded
    indexed: list[Indexed]  # what the index must take in, in write order

    @property
    def settlement(self) -> tuple[list, list, int, int]:
        """The arguments of `Settle`."""
        return self.acknowledged, self.refused, self.errors, self.writes


class SegmentWriter:
    """Owns the open segment; writes on its own thread, or on the loop's when that one is idle.

    Exclusion: the writer thread writes only items counted in `_queued` (by the loop thread)
    and not yet in `_done` (by the writer thread, after writing and rotating), so when the two
    are equal it has nothing to write and the loop thread may write instead (`write_inline`).
    """

    def __init__(
        self,
        directory: Path,
        segment: int,
        inbox: queue.SimpleQueue,
        settle: Settle,
        loop: asyncio.AbstractEventLoop,
        fsync_interval_s: float,
    ) -> None:
        self.failure: BaseException | None = None
        self._directory, self._segment = directory, segment
        self._inbox, self._settle, self._loop = inbox, settle, loop
        self._fsync_interval_s = fsync_interval_s
        self._file_lock = threading.Lock()  # the syncer must not dup a file being swapped
        self._dirty = False
        self._stopping = threading.Event()
        self._file = self._open(segment)
        self._size = os.fstat(self._file.fileno()).st_size
        self._index = IndexWriter(directory)
        self._idle_lock = threading.Lock()  # orders the counters and file state across threads
        self._queued = self._done = 0
        self._started = False  # the writer thread has started the index: inline writes may go
        self._inline_off_until = 0.0  # perf_counter time before which nothing is written inline
        self._inline_off_s = INLINE_OFF_MIN_S  # the last pause
        self._inline_indexed: collections.deque[Indexed] = collections.deque()
        self._threads = [
            threading.Thread(target=self._write_forever, name="audit-writer", daemon=True),
            threading.Thread(target=self._sync_forever, name="audit-fsync", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def enqueue(self, item: Item) -> None:
        """Hand the item to the writer thread (loop thread only)."""
        self._queued += 1
        self._inbox.put(item)

    def write_inline(self, line: bytes) -> InlineWrite | None:
        """Write one record's line (never a seal: rotation fsyncs) on the calling thread, the
        event loop's; None, having done nothing, unless the writer thread is idle and the fast
        path is on."""
        # Never wait for the lock: the writer thread holds it only to count a batch done, and
        # then it is not idle anyway.
        if not self._idle_lock.acquire(blocking=False):
            return None
        try:
            if not self._started or self._done != self._queued:
                return None  # something is queued, being written, or a seal is pending
            began = time.perf_counter()
            if began < self._inline_off_until:
                return None
            if self.failure is not None:  # once failed, later lines would chain onto lost ones
                return InlineWrite.REFUSED
            segment, offset = self._segment, self._size
            written = self._write_or_fail(line)
            self._note_inline_time(began)
        finally:
            self._idle_lock.release()
        if not written:
            return InlineWrite.FAILED
        self._inline_indexed.append((segment, offset, [line]))  # the index is the writer thread's
        return InlineWrite.WRITTEN

    def _write_or_fail(self, data: bytes) -> bool:
        try:
            return self._write(data)
        except Exception as error:  # e.g. a closed file's ValueError: the log has failed
            self._fail(error)
            return False

    def _note_inline_time(self, began: float) -> None:
        ended = time.perf_counter()
        if ended - began <= INLINE_SLOW_S:
            return
        # A lone slow write is likelier the loop thread preempted than the disk: pause briefly.
        # Slow writes that keep coming double the pause.
        again = ended - self._inline_off_until < INLINE_OFF_MAX_S
        pause = min(2 * self._inline_off_s, INLINE_OFF_MAX_S) if again else INLINE_OFF_MIN_S
        self._inline_off_s, self._inline_off_until = pause, ended + pause
        log.log(
            logging.WARNING if pause >= INLINE_OFF_MAX_S else logging.DEBUG,
            "audit log: slow write on the event loop; the writer thread takes writes a while",
            extra={"ms": round((ended - began) * 1000, 3), "pause_s": pause},
        )

    def _open(self, segment: int) -> BinaryIO:
        path = self._directory / segment_name(segment)
        created = not path.exists()
        file = open_segment(path)
        if created:
            _fsync_directory(self._directory)  # so the new name survives a machine crash
        return file

    def _write_forever(self) -> None:
        self._index.start(self._segment, self._size, segment_files(self._directory))
        with self._idle_lock:
            self._started = True
        while True:
            items = _take_all(self._inbox, INDEX_DRAIN_S)
            # First: every line written inline so far precedes what was just taken, since
            # nothing is written inline while an item is queued.
            self._index_inline_writes()
            stopping = bool(items) and items[-1] is _STOP
            if stopping:
                items.pop()
            if items:
                self._write_taken(items)
            if stopping:
                self._finish()
                return

    def _write_taken(self, items: list[Item]) -> None:
        outcome = self._write_batch_or_refuse(items)
        with self._idle_lock:
            # Before the report: the append it releases may then be written inline at once.
            self._done += len(items)
        self._report(*outcome.settlement)
        for segment, offset, lines in outcome.indexed:  # after the answers are released
            self._index.add(segment, offset, lines)

    def _index_inline_writes(self) -> None:
        pending = self._inline_indexed
        while pending:  # only this thread takes from it, so non-empty means popleft succeeds
            self._index.add(*pending.popleft())

    def _write_batch_or_refuse(self, items: list[Item]) -> Outcome:
        try:
            return self._write_batch(items)
        except Exception as error:  # e.g. a closed file's ValueError: never leave appends waiting
            self._fail(error)
            return Outcome([], [future for _, future, _ in items if future is not None], 1, 0, [])

    def _write_batch(self, items: list[Item]) -> Outcome:
        acknowledged: list[asyncio.Future[None]] = []
        refused: list[asyncio.Future[None]] = []
        errors = writes = 0
        indexed: list[Indexed] = []
        for run, seals in runs_by_segment(items):
            futures = [future for _, future, _ in run if future is not None]
            written = False
            if self.failure is None:  # once failed, later lines would chain onto lost ones
                lines = [line for line, _, _ in run]
                segment, offset = self._segment, self._size
                written = self._write(b"".join(lines))
                writes, errors = writes + written, errors + (not written)
                if written:
                    indexed.append((segment, offset, lines))
            (acknowledged if written else refused).extend(futures)
            if written and seals and not self._rotate():
                errors += 1
        return Outcome(acknowledged, refused, errors, writes, indexed)

    def _write(self, data: bytes) -> bool:
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) :]
        except OSError as error:
            self._fail(error)
            # Cut what part of the batch did land, so only acknowledged records stay on disk.
            with contextlib.suppress(OSError):
                self._file.truncate(self._size)
            return False
        self._size += len(data)
        self._dirty = True
        return True

    def _rotate(self) -> bool:
        try:
            _fdatasync(self._file.fileno())  # the sealed segment is durable before its successor
            new = self._open(self._segment + 1)
        except OSError as error:
            self._fail(error)
            return False
        with self._file_lock:
            old, self._file = self._file, new
        old.close()
        self._segment, self._size = self._segment + 1, 0
        return True

    def _sync_forever(self) -> None:
        while not self._stopping.wait(self._fsync_interval_s):
            if self._dirty:
                self._sync()

    def _sync(self) -> None:
        self._dirty = False
        try:
            with self._file_lock:
                fd = os.dup(self._file.fileno())
            try:
                _fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            self._fail(error)  # after a failed fsync the kernel may have dropped the pages
            self._report([], [], 1, 0)

    def _finish(self) -> None:
        self._stopping.set()
        self._threads[1].join()
        self._sync()
        self._file.close()
        self._index.close()

    def _fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        log.error("audit log write failed", extra={"error": repr(error)})

    def _report(self, acknowledged: list, refused: list, errors: int, writes: int) -> None:
        self._loop.call_soon_threadsafe(self._settle, acknowledged, refused, errors, writes)


def _take_all(inbox: queue.SimpleQueue, timeout: float | None = None) -> list:
    """Wait up to `timeout` for one item, then take whatever else is already waiting: one
    batch, empty when nothing came."""
    try:
        items = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(inbox.get_nowait())
    return items


def runs_by_segment(items: list[Item]) -> Iterator[tuple[list[Item], bool]]:
    """Split a batch where a checkpoint seals a segment; the flag says a run ends sealed."""
    start = 0
    for end, (_, _, seals) in enumerate(items, 1):
        if seals or end == len(items):
            yield items[start:end], seals
            start = end


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the log as the gateway sees it -----------------------------------------------------------


class AuditLog:
    """Appends chained records to rotating JSONL segments: written inline while the writer
    thread is idle, else group-committed by it (see "Write path" in the module docstring).

    Counters, plain ints for metrics: `written` records acknowledged, `batches` write() calls,
    `inline_writes` appends that took the fast path (`append` made their write itself),
    `write_errors` failed writes or fsyncs, `refused` appends answered with AuditUnavailable,
    `torn_tail_repaired` torn last lines cut on open (`torn_tail_bytes` how much).
    """

    def __init__(
        self,
        directory: Path,
        key: bytes,
        checkpoint_key: bytes,
        rotate_bytes: int = 64 * MiB,
        fsync_interval_s: float = 0.05,
    ) -> None:
        self.directory = Path(directory)
        self._key, self._checkpoint_key = key, checkpoint_key
        self._rotate_bytes, self._fsync_interval_s = rotate_bytes, fsync_interval_s
        self.written = self.batches = self.write_errors = self.refused = 0
        self.inline_writes = 0
        self.torn_tail_repaired = self.torn_tail_bytes = 0
        self._tail = ChainTail(0, GENESIS, 1, 0, 0)
        self._writer: SegmentWriter | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inline_this_turn = False  # see append

    @property
    def seq(self) -> int:
        """The seq of the last record appended: with `last_hash`, an anchor for `verify`."""
        return self._tail.seq

    @property
    def last_hash(self) -> str:
        """The hash of the last line appended, a record or a checkpoint."""
        return self._tail.prev

    async def open(self) -> None:
        """Continue the chain on disk (or start one), cutting a torn last line if a crash left one.

        After AuditUnavailable, `close()` then `open()` resumes from what is on disk.
        """
        if self._writer is not None:
            raise RuntimeError("the audit log is already open")
        self._tail = await asyncio.to_thread(self._recover)
        self._loop = asyncio.get_running_loop()
        self._inbox = queue.SimpleQueue()
        self._inline_this_turn = False  # a yield may have been left behind in a past loop
        try:
            self._writer = await asyncio.to_thread(
                SegmentWriter,
                self.directory,
                self._tail.segment,
                self._inbox,
                self._settle,
                self._loop,
                self._fsync_interval_s,
            )
        except BaseException:
            release_writer_lock(self._writer_lock)  # no writer: close() will not run
            raise
        self._writer.start()

    def _recover(self) -> ChainTail:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer_lock = take_writer_lock(self.directory)
        try:
            return self._continue_chain()
        except BaseException:
            release_writer_lock(self._writer_lock)
            raise

    def _continue_chain(self) -> ChainTail:
        segments = segment_files(self.directory)
        if segments and (cut := cut_torn_tail(segments[-1][1])):
            self.torn_tail_repaired += 1
            self.torn_tail_bytes += cut
            log.warning(
                "audit log: torn last line cut", extra={"file": segments[-1][1].name, "bytes": cut}
            )
        return chain_tail(self.directory)

    async def append(self, record: Mapping[str, Any], *, pii_fields: Collection[str] = ()) -> str:
        """Chain the record and return its hash once write(2) has taken it.

        `pii_fields` name the personal fields of `record["features"]`, pseudonymised before
        the record enters the chain. Raises AuditUnavailable when the record could not be
        written; cancelling the await does not unwrite a record already chained.
        """
        self._refuse_when_unavailable()
        if pii_fields:
            record = {**record, "features": pseudonymise(record["features"], pii_fields, self._key)}
        line, digest = self._chain(record)
        # One inline write per turn of the event loop: another append in the same turn means
        # appends are arriving together. Written inline, each would cost the loop a write(2)
        # of its own; queued, they share one on the writer thread, which then stays busy, so
        # the queue goes on batching them while the load lasts.
        inline = None if self._inline_this_turn else self._writer.write_inline(line)
        if inline is None:
            future = self._loop.create_future()
            self._writer.enqueue((line, future, False))
            self._seal_segment_when_full()
            await future
            return digest
        self._count_inline(inline)
        self._seal_segment_when_full()
        await self._yield_turn()
        if inline is not InlineWrite.WRITTEN:
            raise AuditUnavailable("the audit record could not be written")
        return digest

    def _seal_segment_when_full(self) -> None:
        if self._tail.segment_bytes >= self._rotate_bytes:
            self._seal_segment()  # queued after the record, whichever path the record took

    def _count_inline(self, inline: InlineWrite) -> None:
        """The counters `_settle` keeps, for one line the loop wrote itself."""
        self.inline_writes += 1
        if inline is InlineWrite.WRITTEN:
            self.batches += 1
            self.written += 1
            return
        self.write_errors += inline is InlineWrite.FAILED
        self.refused += 1

    async def _yield_turn(self) -> None:
        """Let the loop run its other ready tasks once, as an append always has: a caller
        looping over appends (and nothing else that waits) must not starve the loop."""
        # Until this task resumes, in the loop's next turn, other appends are queued.
        self._inline_this_turn = True
        try:
            await asyncio.sleep(0)  # a bare yield: no thread, no future to wait for
        finally:
            self._inline_this_turn = False

    def _refuse_when_unavailable(self) -> None:
        if self._writer is None:
            self.refused += 1
            raise AuditUnavailable("the audit log is not open")
        if self._writer.failure is not None:
            self.refused += 1
            raise AuditUnavailable(f"the audit log cannot be written: {self._writer.failure!r}")

    def _chain(self, record: Mapping[str, Any]) -> tuple[bytes, str]:
        _refuse_reserved_fields(record)
        tail = self._tail
        line, digest = _chained_line(record, tail.seq + 1, tail.prev)
        tail.seq, tail.prev = tail.seq + 1, digest
        tail.segment_bytes += len(line)
        tail.segment_records += 1
        return line, digest

    def _seal_segment(self) -> None:
        tail = self._tail
        name = segment_name(tail.segment)
        seal = checkpoint(name, tail.seq, tail.prev, tail.segment_records, self._checkpoint_key)
        # Always the writer thread's: rotating fsyncs, which must never stall the event loop.
        self._writer.enqueue((canonical_json(seal) + b"\n", None, True))
        tail.prev = seal["hash"]
        tail.segment, tail.segment_bytes, tail.segment_records = tail.segment + 1, 0, 0

    def _settle(self, acknowledged: list, refused: list, errors: int, writes: int) -> None:
        self.batches += writes
        self.written += len(acknowledged)
        self.write_errors += errors
        self.refused += len(refused)
        for future in acknowledged:
            if not future.done():
                future.set_result(None)
        for future in refused:
            if not future.done():
                future.set_exception(AuditUnavailable("the audit record could not be written"))

    async def close(self) -> None:
        """Write what is queued, fsync, and stop; nothing is written after."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(writer.join)
        release_writer_lock(self._writer_lock)


def take_writer_lock(directory: Path) -> int:
    """An exclusive lock on the log for this process's life (the kernel drops it when the
    process dies, however it dies); AuditLocked while another process holds it."""
    fd = os.open(directory / WRITER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLocked(
            f"{directory}: another process writes this audit log; give each gateway process "
            "(`aigw serve`, `aigw worker`) its own AIGW_AUDIT_DIR"
        ) from None
    return fd


def release_writer_lock(fd: int) -> None:
    os.close(fd)  # closing the only descriptor releases the flock


def check_no_other_writer(directory: Path) -> None:
    """AuditLocked now if another process writes the log at `directory`: a start-up check,
    so the refusal is one clear line before serving begins (`open` takes the lock itself)."""
    if Path(directory).is_dir():
        release_writer_lock(take_writer_lock(Path(directory)))


def _refuse_reserved_fields(record: Mapping[str, Any]) -> None:
    clash = CHAIN_FIELDS.intersection(record)
    if clash:
        raise ValueError(f"audit records may not set {sorted(clash)}: the log assigns them")
    if is_checkpoint(record):
        raise ValueError("audit records may not pose as checkpoints")
