"""The audit trail: canonical form, pseudonyms, the hash chain, rotation, verify, durability."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from gateway import audit
from gateway.audit import (
    GENESIS,
    AuditCorrupt,
    AuditLocked,
    AuditLog,
    AuditUnavailable,
    ChainCheck,
    canonical_json,
    chained,
    checkpoint,
    checkpoint_mac,
    find_record,
    is_checkpoint,
    pseudonymise,
    record_hash,
    segment_files,
    segment_name,
    verify,
)
from gateway.audit_index import INDEX_NAME

REPO = Path(__file__).resolve().parents[1]
KEY = b"pseudonym-key"
CHECKPOINT_KEY = b"checkpoint-key"


def decision(i: int) -> dict[str, Any]:
    return {
        "prediction_id": f"p-{i:05d}",
        "model_id": "customer-churn",
        "features": {"customer_id": f"C{i}", "tenure_months": i % 60, "monthly_charges": 89.99},
        "served_by": "churn-gbm",
        "degraded": False,
        "fallback_reason": None,
    }


def new_log(directory: Path, **options: Any) -> AuditLog:
    return AuditLog(directory, KEY, CHECKPOINT_KEY, **options)


async def write_log(directory: Path, count: int, start: int = 0, **options: Any) -> list[str]:
    """Append `count` decisions one after the other and close; their hashes."""
    log = new_log(directory, **options)
    await log.open()
    try:
        return [await log.append(decision(start + i)) for i in range(count)]
    finally:
        await log.close()


def entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for _, path in segment_files(directory)
        for line in path.read_bytes().splitlines()
    ]


def records(directory: Path) -> list[dict[str, Any]]:
    return [entry for entry in entries(directory) if entry.get("type") != "checkpoint"]


# ---- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"z": {"y": 1, "x": [3, {"d": 0, "c": 0}]}}, b'{"z":{"x":[3,{"c":0,"d":0}],"y":1}}'),
        ({"name": "Zoë"}, '{"name":"Zoë"}'.encode()),
        ({"p": 0.1, "n": None, "t": True}, b'{"n":null,"p":0.1,"t":true}'),
    ],
)
def test_canonical_json_sorts_keys_at_every_level_and_is_compact(record, expected):
    """Canonical JSON: keys sorted at every depth, no spaces, raw UTF-8."""
    assert canonical_json(record) == expected


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), [1.0, float("-inf")], {"deep": (float("nan"),)}]
)
def test_canonical_json_refuses_nan_and_infinity(value):
    """NaN and infinities are refused rather than silently written as null."""
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"v": value})


@pytest.mark.parametrize(
    ("features", "pii", "key", "same_as_baseline"),
    [
        ({"customer_id": "12345"}, {"customer_id"}, KEY, True),
        ({"customer_id": "12345"}, {"customer_id"}, b"another key", False),
        ({"customer_id": 12345}, {"customer_id"}, KEY, False),
        ({"account_id": "12345"}, {"account_id"}, KEY, False),
    ],
)
def test_pseudonyms_depend_on_key_value_type_and_field_name(features, pii, key, same_as_baseline):
    """A pseudonym is stable for one (key, field, value) and changes with any of them."""
    baseline = next(iter(pseudonymise({"customer_id": "12345"}, {"customer_id"}, KEY).values()))
    pseudonym = next(iter(pseudonymise(features, pii, key).values()))
    assert pseudonym.startswith("hmac-sha256:")
    assert len(pseudonym) == len("hmac-sha256:") + 32
    assert (pseudonym == baseline) is same_as_baseline


def test_pseudonymise_leaves_other_fields_unchanged():
    """Only the named personal fields are replaced; the rest pass through as they were."""
    features = {"customer_id": "12345", "email": "a@b.c", "tenure_months": 24, "plan": None}
    out = pseudonymise(features, {"customer_id", "email", "absent"}, KEY)
    assert out["tenure_months"] == 24 and out["plan"] is None
    assert "12345" not in out["customer_id"] and "a@b.c" not in out["email"]
    assert set(out) == set(features)


def test_a_chained_hash_covers_the_previous_hash():
    """The same record after a different predecessor gets a different hash."""
    first = chained({"a": 1}, 1, GENESIS)
    other = chained({"a": 1}, 1, "f" * 64)
    assert first["hash"] == record_hash(first) != other["hash"]


def straight_line(record: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The line and hash by the book: orjson over the record with seq and prev, then again
    with the hash added (what AuditLog wrote before the line was built in one pass)."""
    body = {**record, "seq": seq, "prev": prev}
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return orjson.dumps({**body, "hash": digest}, option=orjson.OPT_SORT_KEYS) + b"\n", digest


NEAR_HASH_KEYS = ["", "a", "h", "ha", "has", "hasg", "hash_", "hasha", "hashes", "hash\x00"]
NEAR_HASH_KEYS += ["hasi", "Hash", "HASH", "ĥash", "hash\u00e9", "😀", "é", "\uffff", "z", "~"]
TRICKY_STRINGS = ["", "null", '"hash":"', ',"hash":', '"}', "\\", "\n\t\x00\x1f", "\u2028"]
TRICKY_STRINGS += ["Zoë", "日本語", "😀 emoji", "NaN", "Infinity", "a" * 300]
ONE_PASS_RECORDS = [
    {},
    {"a": 1},
    {"z": 1},
    {key: i for i, key in enumerate(NEAR_HASH_KEYS)},
    {"route": None, "rule": None, "fallback_reason": None},
    {"features": {"hash": GENESIS, "seq": 1, "prev": None}, "steps": [{"hash": "x"}]},
    {"nested": {"b": {"d": [1, {"f": None, "e": 2.5}], "c": ()}, "a": []}},
    {"list": [None, [None, [None]], {"n": None}], "null": "null", "nullable": None},
    {"strings": TRICKY_STRINGS, **{f"k{i}": text for i, text in enumerate(TRICKY_STRINGS)}},
    {"numbers": [0, -1, 2**63 - 1, -(2**63), 0.1, -0.0, 1e300, 5e-324, True, False]},
    {"tuple": (1, (2, None), "x"), "hash_like": "0" * 64},
    {"features": pseudonymise({"customer_id": "C-1", "email": None, "n": 3}, {"customer_id"}, KEY)},
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -7, 2**62, rng.randrange(-(2**63), 2**63)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1e-300, 1.5e300, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4, 5):
        return rng.choice(TRICKY_STRINGS) + rng.choice(NEAR_HASH_KEYS)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return tuple(random_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    return random_record(rng, depth + 1)


def random_record(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = NEAR_HASH_KEYS + ["seq", "prev", "hash", "type", "route", "features"] * (depth > 0)
    return {
        rng.choice(keys) + rng.choice(["", "_", "x", "é", "😀"]): random_value(rng, depth)
        for _ in range(rng.randrange(12))
    }


@pytest.mark.parametrize("record", ONE_PASS_RECORDS)
@pytest.mark.parametrize("prev", [GENESIS, "f" * 64])
def test_the_line_built_in_one_pass_is_the_straight_serialisation(record, prev):
    """Hash spliced into the hashed bytes: the very bytes and hash of serialising twice."""
    assert audit._chained_line(record, 42, prev) == straight_line(record, 42, prev)


@pytest.mark.parametrize("seed", range(20))
def test_the_line_built_in_one_pass_matches_for_random_records(seed):
    """Random keys around "hash" (unicode too), nesting, Nones and hostile strings."""
    rng = random.Random(seed)
    for seq in range(1, 201):
        record = random_record(rng)
        record = {key: value for key, value in record.items() if key not in audit.CHAIN_FIELDS}
        prev = rng.choice([GENESIS, hashlib.sha256(str(seq).encode()).hexdigest()])
        assert audit._chained_line(record, seq, prev) == straight_line(record, seq, prev)


NAN, INF = float("nan"), float("inf")
NON_FINITE_ERROR = r"^audit records cannot hold NaN or infinity$"
NON_FINITE_RECORDS = [
    {"p": NAN},
    {"p": -INF, "route": None},
    {"route": None, "rule": None, "fallback_reason": None, "probability": INF},
    {"features": {"x": NAN}},
    {"features": {"x": None, "y": [1.0, {"z": -INF}]}, "route": None},
    {"values": [None, 1.0, NAN]},
    {"values": (None, (INF,))},
    {"note": "null null null", "route": None, "p": NAN},
    {"steps": [{"outcome": "answered", "step": "a"}, {"duration_ms": NAN, "step": "b"}]},
]


@pytest.mark.parametrize("record", NON_FINITE_RECORDS)
async def test_non_finite_floats_anywhere_are_still_refused(tmp_path, record):
    """However many Nones sit beside it, a NaN or infinity raises the same ValueError."""
    with pytest.raises(ValueError, match=NON_FINITE_ERROR):
        audit._chained_line(record, 1, GENESIS)
    with pytest.raises(ValueError, match=NON_FINITE_ERROR):
        canonical_json(record)
    log = new_log(tmp_path)
    await log.open()
    with pytest.raises(ValueError, match="NaN"):
        await log.append(record)
    await log.close()
    assert (log.seq, log.written) == (0, 0)


@pytest.mark.parametrize(
    "record",
    [
        {"route": None},
        {"features": {"plan": None}, "steps": [{"rule": None}], "values": [None, (None,)]},
        {"text": "null", "nullable": None, "deep": {"null": [None, "null"]}},
    ],
)
async def test_none_values_anywhere_are_written_as_null(tmp_path, record):
    """None is fine at every depth, and the line on disk is the straight serialisation."""
    assert b"null" in canonical_json(record)
    log = new_log(tmp_path)
    await log.open()
    digest = await log.append(record)
    await log.close()
    line = segment(tmp_path, 0).read_bytes()
    assert (line, digest) == straight_line(record, 1, GENESIS)
    assert verify(tmp_path).ok


def test_a_key_that_is_not_a_string_is_refused_as_orjson_refuses_it():
    """The one-pass split cannot order it; the error stays orjson's own."""
    with pytest.raises(TypeError, match="Dict key must be str"):
        audit._chained_line({1: "x", "a": 2}, 1, GENESIS)


def chain_lines(*fields: dict[str, Any], file: str = "audit-000001.jsonl") -> list[bytes]:
    """Valid log lines for records, sealing the file at a `{"seal": True}` marker."""
    lines, seq, prev, count = [], 0, GENESIS, 0
    for extra in fields:
        if extra.get("seal"):
            entry = checkpoint(file, seq, prev, count, CHECKPOINT_KEY)
        else:
            seq, count = seq + 1, count + 1
            entry = chained(extra, seq, prev)
        prev = entry["hash"]
        lines.append(canonical_json(entry) + b"\n")
    return lines


def forged(line: bytes, **changes: Any) -> bytes:
    """The line with fields changed and its hash recomputed, as a forger would."""
    entry = {**orjson.loads(line), **changes}
    entry["hash"] = record_hash(entry)
    return canonical_json(entry) + b"\n"


def first_problem(lines: list[bytes], key: bytes | None = CHECKPOINT_KEY) -> tuple[int, str] | None:
    check = ChainCheck(key)
    check.start_file("audit-000001.jsonl")
    for number, line in enumerate(lines, 1):
        if problem := check.line_problem(line):
            return number, problem
    return None


VALID = chain_lines({"a": 1}, {"a": 2}, {"seal": True})


@pytest.mark.parametrize(
    ("lines", "key", "expected"),
    [
        (VALID, CHECKPOINT_KEY, None),
        ([VALID[0], VALID[1], forged(VALID[2], file="audit-000009.jsonl")], None, (3, "seals")),
        ([VALID[0], VALID[1], forged(VALID[2], file_records=5)], None, (3, "counts 5")),
        ([VALID[0], VALID[1], forged(VALID[2], mac="0" * 64)], CHECKPOINT_KEY, (3, "MAC")),
        ([VALID[0], VALID[1], forged(VALID[2], mac="0" * 64)], None, None),
        ([VALID[0], VALID[1].replace(b",", b", ", 1)], None, (2, "canonical form")),
        ([VALID[0], VALID[1].rstrip(b"\n")], None, (2, "torn")),
        ([VALID[0], b"[1,2]\n"], None, (2, "not a JSON object")),
        ([*VALID, VALID[0]], None, (4, "follows the segment's checkpoint")),
    ],
)
def test_the_chain_check_names_the_first_bad_line(lines, key, expected):
    """The pure checker: checkpoints must name their file, count and MAC; lines stay canonical."""
    found = first_problem(lines, key)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found[0] == expected[0] and expected[1] in found[1]


@pytest.mark.parametrize(
    ("seals", "runs"),
    [
        ([False, False, False], [3]),
        ([False, True, False], [2, 1]),
        ([True, False, True], [1, 2]),
        ([False], [1]),
    ],
)
def test_a_batch_is_split_where_a_checkpoint_seals_a_segment(seals, runs):
    """One write per segment touched by a batch; a checkpoint ends its run."""
    items = [(b"x\n", None, seal) for seal in seals]
    assert [len(run) for run, _ in audit.runs_by_segment(items)] == runs


# ---- the log on disk --------------------------------------------------------------------------


@pytest.fixture(params=["inline", "queued"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the fast path ("inline": an idle writer thread lets append write itself)
    and without it ("queued": every line goes through the writer thread, as before it)."""
    if request.param == "queued":
        monkeypatch.setattr(audit.SegmentWriter, "write_inline", lambda self, line: None)
    else:  # a busy test machine preempting a write must not switch the fast path off
        monkeypatch.setattr(audit, "INLINE_SLOW_S", 60.0)
    return request.param


async def test_concurrent_appends_are_all_written_in_order_and_verify(tmp_path, write_path):
    """2,000 concurrent appends: 2,000 lines, seq 1..N, group-committed, the chain verifies.

    They arrive in one turn of the loop, so at most the first is written inline."""
    count = 2000
    log = new_log(tmp_path)
    await log.open()
    hashes = await asyncio.gather(*(log.append(decision(i)) for i in range(count)))
    await log.close()

    written = records(tmp_path)
    assert len((tmp_path / "audit-000001.jsonl").read_bytes().splitlines()) == count
    assert [entry["seq"] for entry in written] == list(range(1, count + 1))
    assert [entry["hash"] for entry in written] == list(hashes)
    assert (log.written, log.write_errors, log.refused) == (count, 0, 0)
    assert 1 <= log.batches < count
    assert log.inline_writes <= 1
    result = verify(tmp_path, CHECKPOINT_KEY)
    assert result.ok and result.records == count and result.last_hash == log.last_hash


async def test_rotation_seals_each_segment_with_a_checkpoint_and_verifies_across_files(
    tmp_path, write_path
):
    """A tiny rotate_bytes gives several numbered files, each sealed; seq runs on across them.

    On the fast path too: the record that fills a segment may go inline, its seal is queued
    after it, and the rotation stays on the writer thread."""
    await write_log(tmp_path, 60, rotate_bytes=2000)

    segments = segment_files(tmp_path)
    assert len(segments) >= 4
    assert [path.name for _, path in segments[:2]] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    for _, path in segments[:-1]:
        seal = orjson.loads(path.read_bytes().splitlines()[-1])
        assert seal["type"] == "checkpoint" and seal["file"] == path.name
        assert seal["mac"] == checkpoint_mac(seal, CHECKPOINT_KEY)
    assert [entry["seq"] for entry in records(tmp_path)] == list(range(1, 61))
    result = verify(tmp_path, CHECKPOINT_KEY)
    assert result.ok and result.records == 60, result


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def segment(directory: Path, index: int) -> Path:
    return segment_files(directory)[index][1]


def edit_lines(path: Path, edit: Callable[[list[bytes]], object]) -> None:
    lines = read_lines(path)
    edit(lines)
    path.write_bytes(b"".join(lines))


def flip_a_character(directory: Path) -> tuple[str, int]:
    path = segment(directory, 1)
    edit_lines(path, lambda ls: ls.__setitem__(3, ls[3].replace(b"churn", b"chum")))
    return segment(directory, 1).name, 4


def break_the_json(directory: Path) -> tuple[str, int]:
    edit_lines(segment(directory, 0), lambda ls: ls.__setitem__(2, b"]" + ls[2][1:]))
    return segment(directory, 0).name, 3


def delete_a_line(directory: Path) -> tuple[str, int]:
    edit_lines(segment(directory, 1), lambda ls: ls.pop(2))
    return segment(directory, 1).name, 3


def swap_two_lines(directory: Path) -> tuple[str, int]:
    def swap(lines: list[bytes]) -> None:
        lines[1], lines[2] = lines[2], lines[1]

    edit_lines(segment(directory, 0), swap)
    return segment(directory, 0).name, 2


def insert_a_copied_line(directory: Path) -> tuple[str, int]:
    edit_lines(segment(directory, 1), lambda ls: ls.insert(4, ls[1]))
    return segment(directory, 1).name, 5


def truncate_the_last_line_midway(directory: Path) -> tuple[str, int]:
    path = segment(directory, -1)
    lines = read_lines(path)
    path.write_bytes(b"".join(lines)[: -(len(lines[-1]) // 2)])
    return path.name, len(lines)


def remove_a_final_checkpoint(directory: Path) -> tuple[str, int]:
    path = segment(directory, 0)
    edit_lines(path, lambda ls: ls.pop())
    return path.name, len(read_lines(path)) + 1


def change_a_checkpoint_mac(directory: Path) -> tuple[str, int]:
    path = segment(directory, 0)
    edit_lines(path, lambda ls: ls.__setitem__(-1, ls[-1].replace(b'"mac":"', b'"mac":"0', 1)))
    return path.name, len(read_lines(path))


def forge_a_checkpoint_mac(directory: Path) -> tuple[str, int]:
    path = segment(directory, 1)
    edit_lines(path, lambda ls: ls.__setitem__(-1, forged(ls[-1], mac="0" * 64)))
    return path.name, len(read_lines(path))


def delete_a_middle_file(directory: Path) -> tuple[str, int]:
    segment(directory, 1).unlink()
    return segment(directory, 1).name, 1


def rewrite_the_chain_after_an_edit(directory: Path) -> tuple[str, int]:
    """Edit a record, then recompute every later hash and prev (MACs need the key: kept)."""
    prev, edited = GENESIS, False
    for _, path in segment_files(directory):
        lines = []
        for line in read_lines(path):
            entry = orjson.loads(line)
            if entry.get("prediction_id") == "p-00002":
                entry["served_by"], edited = "rules", True
            if edited:
                entry["prev"] = prev
                entry["hash"] = record_hash(entry)
            prev = entry["hash"]
            lines.append(canonical_json(entry) + b"\n")
        path.write_bytes(b"".join(lines))
    first = segment(directory, 0)
    return first.name, len(read_lines(first))


TAMPERING = [
    (flip_a_character, "hash mismatch"),
    (break_the_json, "not a JSON object"),
    (delete_a_line, "missing or out of order"),
    (swap_two_lines, "missing or out of order"),
    (insert_a_copied_line, "repeated or reordered"),
    (truncate_the_last_line_midway, "torn line"),
    (remove_a_final_checkpoint, "without its checkpoint"),
    (change_a_checkpoint_mac, "hash mismatch"),
    (forge_a_checkpoint_mac, "MAC does not match"),
    (delete_a_middle_file, "audit-000002.jsonl is missing"),
    (rewrite_the_chain_after_an_edit, "MAC does not match"),
]


@pytest.fixture
async def rotated_log(tmp_path: Path) -> Path:
    """A verified log of four or more segments of at least six lines each, the newest unsealed."""
    await write_log(tmp_path, 60, rotate_bytes=3000)
    assert len(segment_files(tmp_path)) >= 4 and verify(tmp_path, CHECKPOINT_KEY).ok
    assert (
        read_lines(segment(tmp_path, -1))
        and min(len(read_lines(path)) for _, path in segment_files(tmp_path)) >= 6
    )
    return tmp_path


@pytest.mark.parametrize(("tamper", "what"), TAMPERING, ids=[t.__name__ for t, _ in TAMPERING])
async def test_verify_names_the_file_and_line_of_each_kind_of_tampering(rotated_log, tamper, what):
    """Every tampering makes verify fail at the right `file:line`, saying what is wrong."""
    file, line = tamper(rotated_log)
    result = verify(rotated_log, CHECKPOINT_KEY)
    assert not result.ok
    assert (result.file, result.line) == (file, line), str(result)
    assert what in result.problem, str(result)


async def test_without_the_checkpoint_key_a_recomputed_chain_goes_unseen(rotated_log):
    """The documented limit: hashes are unkeyed, so only the checkpoint MAC catches a rewrite."""
    rewrite_the_chain_after_an_edit(rotated_log)
    assert verify(rotated_log).ok
    assert not verify(rotated_log, CHECKPOINT_KEY).ok


def merge_a_rewritten_history_into_one_unsealed_segment(directory: Path) -> None:
    """Rewrite the chain after an edit in the first segment, drop every checkpoint the key
    would expose, and put all lines in one newest segment: what a forger without the key can
    do to keep each later line's hash and prev consistent."""
    prev, lines = GENESIS, []
    for _, path in segment_files(directory):
        for line in read_lines(path):
            entry = orjson.loads(line)
            if is_checkpoint(entry):
                continue
            if entry.get("prediction_id") == "p-00002":
                entry["served_by"] = "rules"
            entry["prev"] = prev
            entry["hash"] = prev = record_hash(entry)
            lines.append(canonical_json(entry) + b"\n")
        path.unlink()
    (directory / segment_name(1)).write_bytes(b"".join(lines))


async def test_a_history_merged_into_the_unsealed_segment_shows_by_its_size(rotated_log):
    """The checkpoints' MACs cannot be forged, so a rewrite must drop them and leave one
    unsealed segment, bigger than the writer ever leaves one: verify, told the rotation
    size, refuses it. Without the size the rewrite passes even with the key."""
    merge_a_rewritten_history_into_one_unsealed_segment(rotated_log)
    assert verify(rotated_log, CHECKPOINT_KEY).ok
    result = verify(rotated_log, CHECKPOINT_KEY, rotate_bytes=3000)
    assert not result.ok and "segments were merged" in result.problem
    assert result.file == segment_name(1)


async def test_a_segment_whose_last_record_crossed_the_rotation_size_before_a_crash_passes(
    tmp_path,
):
    """The writer seals after the record that reaches the rotation size: a crash between the
    two leaves that record unsealed, which is no tampering."""
    await write_log(tmp_path, 5)
    lines = read_lines(segment(tmp_path, 0))
    before_last = sum(len(line) for line in lines[:-1])
    assert verify(tmp_path, CHECKPOINT_KEY, rotate_bytes=before_last + 1).ok
    result = verify(tmp_path, CHECKPOINT_KEY, rotate_bytes=before_last)
    assert not result.ok and "past the rotation size" in result.problem


@pytest.mark.parametrize(
    ("tamper", "what"),
    [
        (lambda lines: lines[:-2], "before the anchor's seq 30: records were cut off"),
        (lambda lines: [*lines[:-1], forged(lines[-1], served_by="rules")], "was rewritten"),
        (lambda lines: lines, None),
        (lambda lines: [*lines, forged(lines[-1], seq=31, prev=orjson.loads(lines[-1])["hash"])],
         None),  # a log that grew past the anchor still holds it
    ],
    ids=["tail-cut", "tail-rewritten", "untouched", "grown"],
)  # fmt: skip
async def test_an_anchor_kept_elsewhere_shows_what_the_unsealed_tail_hides(tmp_path, tamper, what):
    """A cut or a rewrite inside the newest, unsealed segment passes every check of the log
    alone; against the head verify reported earlier (kept elsewhere) it shows."""
    await write_log(tmp_path, 30)
    head = verify(tmp_path, CHECKPOINT_KEY)
    edit_lines(segment(tmp_path, 0), lambda lines: lines.__setitem__(slice(None), tamper(lines)))
    assert verify(tmp_path, CHECKPOINT_KEY).ok  # alone, nothing shows
    result = verify(tmp_path, CHECKPOINT_KEY, anchor=(head.last_seq, head.last_hash))
    if what is None:
        assert result.ok, str(result)
    else:
        assert not result.ok and what in result.problem, str(result)


def test_a_line_nested_deeper_than_the_writer_writes_is_altered_not_a_crash(tmp_path):
    """orjson reads nesting it refuses to write: verify calls such a line altered, and open
    refuses the log as corrupt, instead of failing on the serialiser's own error."""
    deep = b"[" * 300 + b"]" * 300
    line = b'{"hash":"' + b"0" * 64 + b'","prev":"' + GENESIS.encode() + b'","seq":1,"x":'
    (tmp_path / segment_name(1)).write_bytes(line + deep + b"}\n")
    result = verify(tmp_path)
    assert not result.ok and "hash mismatch" in result.problem
    with pytest.raises(AuditCorrupt):
        asyncio.run(new_log(tmp_path).open())


@pytest.mark.parametrize("kind", ["directory", "dangling-link"])
def test_a_segment_that_cannot_be_read_is_named(tmp_path, kind):
    path = tmp_path / segment_name(1)
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone")
    result = verify(tmp_path)
    assert not result.ok and "cannot be read" in result.problem and result.file == path.name


async def test_a_second_writer_of_one_log_is_refused_until_the_first_closes(tmp_path):
    """Two writers would interleave two chains in one log (verify would call it tampering):
    the second is refused, naming the directory, and may open once the first has closed."""
    first, second = new_log(tmp_path), new_log(tmp_path)
    await first.open()
    try:
        await first.append(decision(1))
        with pytest.raises(AuditLocked, match="another process writes this audit log"):
            await second.open()
    finally:
        await first.close()
    await second.open()
    try:
        await second.append(decision(2))
    finally:
        await second.close()
    assert verify(tmp_path, CHECKPOINT_KEY).records == 2


def test_an_empty_directory_verifies_as_an_empty_log(tmp_path):
    """No segments yet is a valid, empty log."""
    assert verify(tmp_path) == audit.VerifyResult(ok=True, records=0)


async def test_reopening_continues_seq_and_prev_across_restarts(tmp_path):
    """After close and open, the next record takes the next seq and points at the last hash."""
    first = await write_log(tmp_path, 5)
    second = await write_log(tmp_path, 5, start=5)

    written = records(tmp_path)
    assert [entry["seq"] for entry in written] == list(range(1, 11))
    assert written[5]["prev"] == first[-1]
    assert [entry["hash"] for entry in written] == first + second
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_reopening_across_rotations_keeps_one_chain(tmp_path):
    """Restarts in the middle of rotated segments still give one verifiable chain."""
    for start in range(0, 60, 15):
        await write_log(tmp_path, 15, start=start, rotate_bytes=2000)
    assert [entry["seq"] for entry in records(tmp_path)] == list(range(1, 61))
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_a_crash_between_sealing_and_the_next_file_continues_in_a_new_file(tmp_path):
    """When the newest segment ends with its checkpoint, the chain continues in the next one."""
    log = new_log(tmp_path, rotate_bytes=1)  # every record seals its segment
    await log.open()
    await log.append(decision(0))
    await log.close()
    segment(tmp_path, -1).unlink()  # the fresh empty segment was never created

    await write_log(tmp_path, 2, start=1, rotate_bytes=1)
    assert [path.name for _, path in segment_files(tmp_path)][:3] == [
        "audit-000001.jsonl",
        "audit-000002.jsonl",
        "audit-000003.jsonl",
    ]
    assert verify(tmp_path, CHECKPOINT_KEY).ok


@pytest.mark.parametrize(
    "garbage", [b'{"seq":4,"prev":"00', b"\x00" * 100, b"x"], ids=["half", "zeros", "byte"]
)
async def test_a_torn_tail_is_cut_on_open_and_counted(tmp_path, garbage):
    """A partial last line from a crash is truncated away on open, and the counter says so."""
    await write_log(tmp_path, 3)
    path = segment(tmp_path, -1)
    with path.open("ab") as file:
        file.write(garbage)
    assert not verify(tmp_path).ok

    log = new_log(tmp_path)
    await log.open()
    await log.append(decision(3))
    await log.close()
    assert (log.torn_tail_repaired, log.torn_tail_bytes) == (1, len(garbage))
    assert [entry["seq"] for entry in records(tmp_path)] == [1, 2, 3, 4]
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_a_complete_but_invalid_last_line_is_refused_on_open(tmp_path):
    """A whole but altered last line is tampering, not a crash: open will not chain on it."""
    await write_log(tmp_path, 3)
    edit_lines(segment(tmp_path, 0), lambda ls: ls.__setitem__(-1, ls[-1].replace(b"C2", b"C9")))
    with pytest.raises(AuditCorrupt, match=r"audit-000001\.jsonl"):
        await new_log(tmp_path).open()


async def test_personal_values_never_reach_the_file(tmp_path):
    """With pii_fields, the clear values appear nowhere in the log's bytes."""
    log = new_log(tmp_path)
    await log.open()
    record = {
        "prediction_id": "p-1",
        "features": {"customer_id": "CUST-SECRET-98765", "email": "jane@example.org", "n": 3},
    }
    await log.append(record, pii_fields={"customer_id", "email"})
    await log.close()

    raw = b"".join(path.read_bytes() for _, path in segment_files(tmp_path))
    assert b"CUST-SECRET-98765" not in raw and b"jane@example.org" not in raw
    assert pseudonymise(record["features"], {"email"}, KEY)["email"].encode() in raw
    assert records(tmp_path)[0]["features"]["n"] == 3


@pytest.mark.parametrize(
    "record",
    [{"seq": 9}, {"prev": GENESIS}, {"hash": "x"}, {"type": "checkpoint"}, {"p": float("nan")}],
)
async def test_a_malformed_record_is_refused_and_the_chain_is_untouched(tmp_path, record):
    """Chain fields, a posing checkpoint or NaN raise ValueError; the next record gets seq 1."""
    log = new_log(tmp_path)
    await log.open()
    with pytest.raises(ValueError):
        await log.append(record)
    await log.append(decision(0))
    await log.close()
    assert [entry["seq"] for entry in records(tmp_path)] == [1]
    assert verify(tmp_path).ok


class FailingFile:
    """A segment file whose writes raise `failing` once it is set, after landing `torn` bytes
    of the first failing write (a write cut short) when that is set."""

    failing: Exception | None = None
    torn = 0

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        if FailingFile.failing is not None:
            if FailingFile.torn:
                landed, FailingFile.torn = FailingFile.torn, 0
                return self._file.write(bytes(data[:landed]))
            raise FailingFile.failing
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@pytest.fixture
def failing_disk(monkeypatch: pytest.MonkeyPatch) -> type[FailingFile]:
    real_open = audit.open_segment
    monkeypatch.setattr(audit, "open_segment", lambda path: FailingFile(real_open(path)))
    monkeypatch.setattr(FailingFile, "failing", None)
    monkeypatch.setattr(FailingFile, "torn", 0)
    return FailingFile


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), ValueError("I/O operation on closed file")],
    ids=["disk-full", "file-closed"],
)
async def test_a_failed_write_raises_audit_unavailable_until_reopened(
    tmp_path, failing_disk, write_path, error
):
    """A write error fails the append and every later one (counted); reopening resumes cleanly.

    The same on both paths: inline, the failing append raises without ever waiting."""
    log = new_log(tmp_path)
    await log.open()
    await log.append(decision(0))  # from here on the writer thread is running
    inline = log.inline_writes
    failing_disk.failing = error
    step = log.append(decision(1))
    if write_path == "inline":
        assert step.send(None) is None  # refused then and there: a bare yield, no future
        with pytest.raises(AuditUnavailable):
            step.send(None)
    else:
        with pytest.raises(AuditUnavailable):
            await step
    assert log.inline_writes - inline == (write_path == "inline")
    with pytest.raises(AuditUnavailable):
        await log.append(decision(2))
    assert (log.written, log.write_errors, log.refused) == (1, 1, 2)
    await log.close()

    failing_disk.failing = None
    await write_log(tmp_path, 1, start=3)
    assert [entry["prediction_id"] for entry in records(tmp_path)] == ["p-00000", "p-00003"]
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_a_write_cut_short_is_cut_back_on_either_path(tmp_path, failing_disk, write_path):
    """Half a line lands, then the write fails: the file is cut back to the records that were
    acknowledged, so none whose append failed stays on disk, and it verifies as it is."""
    log = new_log(tmp_path)
    await log.open()
    await log.append(decision(0))
    path = segment(tmp_path, -1)
    before = path.read_bytes()
    failing_disk.failing, failing_disk.torn = OSError(errno.EIO, "I/O error"), 100
    with pytest.raises(AuditUnavailable):
        await log.append(decision(1))
    assert path.read_bytes() == before
    assert (log.written, log.write_errors, log.refused) == (1, 1, 1)
    await log.close()
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_appending_to_a_closed_log_raises_audit_unavailable(tmp_path):
    """Before open and after close, append refuses instead of dropping the record."""
    log = new_log(tmp_path)
    with pytest.raises(AuditUnavailable):
        await log.append(decision(0))
    await log.open()
    await log.close()
    with pytest.raises(AuditUnavailable):
        await log.append(decision(0))


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every data fsync the log makes, recorded (and still done)."""
    calls: list[int] = []
    real = audit._fdatasync

    def recording(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(audit, "_fdatasync", recording)
    return calls


async def test_appends_do_not_fsync_but_close_does(tmp_path, fsyncs):
    """No fsync per request: with a long interval none happens until close, which makes one."""
    log = new_log(tmp_path, fsync_interval_s=3600)
    await log.open()
    await asyncio.gather(*(log.append(decision(i)) for i in range(50)))
    assert fsyncs == []
    await log.close()
    assert len(fsyncs) == 1


async def test_written_records_are_fsynced_in_the_background(tmp_path, fsyncs, write_path):
    """A segment with fresh writes is fsynced by the background thread within the interval,
    whichever thread wrote them (the second append goes inline on the fast path)."""
    log = new_log(tmp_path, fsync_interval_s=0.01)
    await log.open()
    try:
        for i in range(2):
            fsyncs.clear()
            await log.append(decision(i))
            deadline = time.monotonic() + 5
            while not fsyncs and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the one wait here: the syncer runs on its own clock
            assert fsyncs
        assert log.inline_writes >= (write_path == "inline")
    finally:
        await log.close()


async def test_find_record_looks_up_a_decision_across_segments(tmp_path):
    """A decision is found by prediction_id in any segment; an unknown id gives None."""
    await write_log(tmp_path, 60, rotate_bytes=2000)
    found = find_record(tmp_path, "p-00007")
    assert found is not None and found["seq"] == 8 and found["features"]["customer_id"] == "C7"
    assert find_record(tmp_path, "p-99999") is None


# ---- the write path: inline while the writer thread is idle, group commit otherwise -----------


def index_rows(directory: Path) -> tuple[set[str], tuple[int, int]]:
    """The ids the log's index holds, and where its coverage ends (segment, offset)."""
    with sqlite3.connect(directory / INDEX_NAME) as index:
        ids = {row[0] for row in index.execute("SELECT id FROM records")}
        end = index.execute("SELECT to_segment, to_offset FROM coverage").fetchone()
    return ids, end


def log_end(directory: Path) -> tuple[int, int]:
    """(segment, size) of the newest segment holding a line: where the last write ended."""
    return next(
        (number, path.stat().st_size)
        for number, path in reversed(segment_files(directory))
        if path.stat().st_size
    )


async def test_one_append_at_a_time_is_written_inline_with_no_thread_to_wait_for(
    tmp_path, monkeypatch
):
    """With the writer thread idle, each append is its own write(2), made by append itself:
    written and counted at its first step, whose only suspension is one bare yield to the
    loop (not a future waiting for the writer thread)."""
    monkeypatch.setattr(audit, "INLINE_SLOW_S", 60.0)  # a preempted test must not switch it off
    log = new_log(tmp_path)
    await log.open()
    await log.append(decision(0))  # from here on the writer thread is running
    inline, batches = log.inline_writes, log.batches
    for i in range(1, 51):
        step = log.append(decision(i))
        assert step.send(None) is None
        assert (log.inline_writes - inline, log.batches - batches, log.written) == (i, i, i + 1)
        with pytest.raises(StopIteration):
            step.send(None)
    assert (log.inline_writes - inline, log.batches - batches) == (50, 50)
    await log.close()
    assert [entry["prediction_id"] for entry in records(tmp_path)] == [
        f"p-{i:05d}" for i in range(51)
    ]
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_a_task_looping_over_appends_lets_other_tasks_run(tmp_path, write_path):
    """An append yields to the loop on either path, as it always has: a task appending in a
    loop, with nothing else to wait for, does not starve the loop's other tasks."""
    log = new_log(tmp_path)
    await log.open()
    await log.append(decision(0))
    turns = 0
    done = asyncio.Event()

    async def other_task() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    try:
        for i in range(1, 101):
            await log.append(decision(i))
    finally:
        done.set()
        await other
        await log.close()
    assert turns >= 100
    if write_path == "inline":
        assert log.inline_writes >= 100


@pytest.mark.parametrize("rotate_bytes", [64 * 1024 * 1024, 20_000], ids=["one-file", "rotating"])
async def test_single_appends_and_bursts_interleave_in_chain_order(
    tmp_path, write_path, rotate_bytes
):
    """Single appends (inline) and bursts (queued) in turn: the file holds them in call order,
    seals fall where the segments fill, the chain verifies and the index covers all of it."""
    log = new_log(tmp_path, rotate_bytes=rotate_bytes)
    await log.open()
    hashes: list[str] = []
    for start in range(0, 1000, 100):
        hashes += [await log.append(decision(start + i)) for i in range(20)]
        burst = (log.append(decision(start + i)) for i in range(20, 100))
        hashes += await asyncio.gather(*burst)
    await log.close()

    assert [entry["hash"] for entry in records(tmp_path)] == hashes
    assert [entry["prediction_id"] for entry in records(tmp_path)] == [
        f"p-{i:05d}" for i in range(1000)
    ]
    result = verify(tmp_path, CHECKPOINT_KEY)
    assert result.ok and result.records == 1000, result
    assert (len(segment_files(tmp_path)) > 1) is (rotate_bytes < 1_000_000)
    assert log.batches < 1000  # the bursts were group-committed
    if write_path == "inline":
        assert log.inline_writes >= 100  # most single appends, some first appends of a burst
    ids, end = index_rows(tmp_path)
    assert ids == {f"p-{i:05d}" for i in range(1000)}
    assert end == log_end(tmp_path)


async def test_the_index_takes_in_inline_writes_while_the_log_runs(tmp_path, monkeypatch):
    """The writer thread wakes on its own to index what append wrote inline: the rows reach
    the index while the log is open, not only at close."""
    monkeypatch.setattr(audit, "INLINE_SLOW_S", 60.0)
    monkeypatch.setattr(audit, "INDEX_DRAIN_S", 0.01)
    log = new_log(tmp_path)
    await log.open()
    try:
        await log.append(decision(0))
        for i in range(1, 600):  # past the index's batch of 512 rows, so it commits them
            await log.append(decision(i))
        assert log.inline_writes >= 599
        deadline = time.monotonic() + 5
        while len(index_rows(tmp_path)[0]) < 512 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(index_rows(tmp_path)[0]) >= 512
    finally:
        await log.close()
    assert index_rows(tmp_path)[0] == {f"p-{i:05d}" for i in range(600)}


class GatedFile:
    """A segment file whose writes from the writer thread wait at `gate` while it is closed."""

    gate = threading.Event()
    waiting = threading.Event()

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        if threading.current_thread().name == "audit-writer" and not GatedFile.gate.is_set():
            GatedFile.waiting.set()
            GatedFile.gate.wait(timeout=10)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


async def test_a_line_taken_by_the_writer_thread_but_not_yet_written_keeps_its_place(
    tmp_path, monkeypatch
):
    """With its queue empty but a line in hand, the writer thread is not idle: an append that
    comes then is queued behind that line, not written inline ahead of it."""
    monkeypatch.setattr(audit, "INLINE_SLOW_S", 60.0)
    real_open = audit.open_segment
    monkeypatch.setattr(audit, "open_segment", lambda path: GatedFile(real_open(path)))
    monkeypatch.setattr(GatedFile, "gate", threading.Event())
    monkeypatch.setattr(GatedFile, "waiting", threading.Event())
    log = new_log(tmp_path)
    await log.open()
    try:
        GatedFile.gate.set()
        await log.append(decision(0))  # from here on the writer thread is running
        GatedFile.gate.clear()
        # Two in one turn: the first goes inline, the second to the writer thread, which
        # takes it and then waits at the gate, mid-write.
        together = asyncio.gather(log.append(decision(1)), log.append(decision(2)))
        assert await asyncio.to_thread(GatedFile.waiting.wait, 10)
        inline = log.inline_writes
        late = asyncio.ensure_future(log.append(decision(3)))
        await asyncio.sleep(0)  # it has chained its line and chosen its path
        assert log.inline_writes == inline
        GatedFile.gate.set()
        await asyncio.gather(together, late)
    finally:
        GatedFile.gate.set()
        await log.close()
    assert [entry["prediction_id"] for entry in records(tmp_path)] == [
        f"p-{i:05d}" for i in range(4)
    ]
    assert verify(tmp_path, CHECKPOINT_KEY).ok


class Stopwatch:
    """Stands in for the audit module's clock; a write through `ClockedFile` moves it on by
    `write_takes`, so a slow disk needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.write_takes = 0.0

    def perf_counter(self) -> float:
        return self.now


class ClockedFile:
    def __init__(self, file: Any, clock: Stopwatch) -> None:
        self._file, self._clock = file, clock

    def write(self, data: bytes) -> int:
        self._clock.now += self._clock.write_takes
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@pytest.fixture
def stopwatch(monkeypatch: pytest.MonkeyPatch) -> Stopwatch:
    clock = Stopwatch()
    real_open = audit.open_segment
    monkeypatch.setattr(audit, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(audit, "open_segment", lambda path: ClockedFile(real_open(path), clock))
    return clock


async def test_a_slow_inline_write_leaves_writes_to_the_writer_thread_for_a_pause(
    tmp_path, stopwatch
):
    """An inline write over INLINE_SLOW_S pauses the fast path: INLINE_OFF_MIN_S at first,
    doubled when slow writes keep coming, back to the short pause after a quiet spell."""
    shortest, longest = audit.INLINE_OFF_MIN_S, audit.INLINE_OFF_MAX_S
    log = new_log(tmp_path)
    await log.open()
    counter = iter(range(100))

    async def path_taken(write_takes: float = 0.0, after_s: float = 0.0) -> str:
        stopwatch.now += after_s
        stopwatch.write_takes = write_takes
        inline = log.inline_writes
        await log.append(decision(next(counter)))
        stopwatch.write_takes = 0.0
        return "inline" if log.inline_writes > inline else "queued"

    slow = audit.INLINE_SLOW_S * 2
    try:
        await path_taken()  # from here on the writer thread is running
        assert await path_taken() == "inline"
        assert await path_taken(write_takes=slow) == "inline"  # found out only once it is done
        assert await path_taken() == "queued"
        assert await path_taken(after_s=shortest * 0.9) == "queued"
        assert await path_taken(after_s=shortest * 0.2) == "inline"
        assert await path_taken(write_takes=slow) == "inline"  # slow again, soon: twice as long
        assert await path_taken(after_s=shortest * 1.5) == "queued"
        assert await path_taken(after_s=shortest * 0.6) == "inline"
        pause = shortest * 2
        for _ in range(6):  # they keep coming: the pause doubles up to its longest
            pause = min(pause * 2, longest)
            assert await path_taken(write_takes=slow) == "inline"
            assert await path_taken(after_s=pause * 0.9) == "queued"
            assert await path_taken(after_s=pause * 0.2) == "inline"
        assert pause == longest
        assert await path_taken(write_takes=slow, after_s=longest * 2) == "inline"  # quiet
        assert await path_taken(after_s=shortest * 1.1) == "inline"
    finally:
        await log.close()
    assert (log.written, log.write_errors, log.refused) == (log.batches, 0, 0)
    assert verify(tmp_path, CHECKPOINT_KEY).ok


async def test_close_writes_every_record_appended_before_it_and_nothing_after(tmp_path, write_path):
    """Appends still waiting when close() is called are written and acknowledged; once
    closed, appends are refused and the files stay as they are."""
    log = new_log(tmp_path)
    await log.open()
    first = await log.append(decision(0))
    waiting = [asyncio.ensure_future(log.append(decision(i))) for i in range(1, 101)]
    await asyncio.sleep(0)  # each has chained its record, written inline or queued
    await log.close()
    hashes = [first, *await asyncio.gather(*waiting)]
    on_disk = {path: path.read_bytes() for _, path in segment_files(tmp_path)}

    with pytest.raises(AuditUnavailable):
        await log.append(decision(101))
    assert {path: path.read_bytes() for _, path in segment_files(tmp_path)} == on_disk
    assert [entry["hash"] for entry in records(tmp_path)] == hashes
    assert (log.written, log.refused) == (101, 1)
    assert verify(tmp_path, CHECKPOINT_KEY).ok


# ---- durability: a SIGKILL loses nothing that append acknowledged -----------------------------

CHILD = """
import asyncio, sys
from pathlib import Path
from gateway.audit import AuditLog

WRITERS = 16

async def main():
    log = AuditLog(Path(sys.argv[1]), b"pseudonym-key", b"checkpoint-key", rotate_bytes=16384)
    await log.open()

    async def writer(i):
        while True:  # each writer appends again at once, so writes are always in flight
            digest = await log.append({"prediction_id": f"k-{i}", "payload": "x" * 100})
            sys.stdout.write(f"{i} {digest}\\n")
            sys.stdout.flush()
            i += WRITERS

    await asyncio.gather(*(writer(i) for i in range(WRITERS)))

asyncio.run(main())
"""


def read_some_lines(stream: Any, count: int, within_s: float) -> tuple[list[bytes], bytes]:
    """At least `count` complete lines from a pipe, or fail after `within_s`."""
    lines: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + within_s
    while len(lines) < count:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stream.fileno(), 65536) if ready else b""
        if not chunk:
            break
        *complete, buffer = (buffer + chunk).split(b"\n")
        lines += complete
    return lines, buffer


async def test_every_acknowledged_record_survives_a_sigkill(tmp_path):
    """Kill -9 the writer mid-stream: every hash it printed is on disk, and the log verifies."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        lines, buffer = read_some_lines(child.stdout, 400, within_s=30)
        assert len(lines) >= 400, child.stderr.read1(4096) if child.poll() is not None else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    rest = buffer + child.stdout.read()
    lines += rest.split(b"\n")[:-1]  # a last line without its newline was cut by the kill
    child.stdout.close()
    child.stderr.close()

    log = new_log(tmp_path)
    await log.open()  # cuts a torn tail if the kill landed mid-write
    await log.close()
    on_disk = {entry["hash"]: entry["prediction_id"] for entry in records(tmp_path)}
    acknowledged = [line.split() for line in lines]
    missing = [i for i, digest in acknowledged if on_disk.get(digest.decode()) != f"k-{i.decode()}"]
    assert missing == []
    assert len(segment_files(tmp_path)) > 1
    assert verify(tmp_path, CHECKPOINT_KEY).ok
