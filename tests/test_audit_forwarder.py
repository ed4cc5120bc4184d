"""The audit forwarder: the local log shipped to a Redis Stream, spilled and replayed, no loss."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway import audit_forwarder as forwarder_module
from gateway.audit import AuditLog, canonical_json, chained, checkpoint, segment_files, verify
from gateway.audit_forwarder import (
    CURSOR_NAME,
    START,
    AuditForwarder,
    Cursor,
    load_cursor,
    oldest_kept_entry,
    read_batch,
    save_cursor,
    seq_gaps,
)
from gateway.demo.triton_process import free_port
from gateway.shared_decisions import DECISION_PREFIX, decision_of, entry_of
from tests.conftest import RedisServer

KEY = b"k" * 32


def decision(i: int) -> dict[str, Any]:
    return {
        "prediction_id": f"p-{i:05d}",
        "model_id": "customer-churn",
        "features": {"customer_id": f"C{i}", "tenure_months": i % 60},
        "served_by": "churn-gbm",
    }


def prediction_record(prediction_id: str) -> dict[str, Any]:
    """A prediction record as the gateway writes it, with the fields feedback reads."""
    return {
        **decision(0),
        "type": "prediction",
        "prediction_id": prediction_id,
        "arm": "control",
        "arm_model": "churn_gbm:1",
        "prediction": "stay",
        "probability": 0.25,
        "tenant": "acme",
        "model_version": "1",
    }


def new_log(directory: Path, **options: Any) -> AuditLog:
    return AuditLog(directory, KEY, KEY, **options)


async def append_decisions(log: AuditLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await log.append(decision(i))


async def write_log(directory: Path, count: int, **options: Any) -> None:
    log = new_log(directory, **options)
    await log.open()
    try:
        await append_decisions(log, count)
    finally:
        await log.close()


def log_bytes(directory: Path) -> bytes:
    """Every segment's bytes in chain order: what the stream must hold, line for line."""
    return b"".join(path.read_bytes() for _, path in segment_files(directory))


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def stream_entries(client: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await client.xrange(stream)]


def lines_of(entries: list[dict[bytes, bytes]]) -> bytes:
    return b"".join(entry[b"line"] for entry in entries)


def record_seqs(entries: list[dict[bytes, bytes]]) -> list[int]:
    return [int(entry[b"seq"]) for entry in entries if entry[b"type"] == b"record"]


@pytest.fixture
def stream() -> str:
    return f"aigw:audit:test:{uuid.uuid4().hex}"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start again on the same port."""
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def forwarder_on(stream: str) -> AsyncIterator[Callable[..., AuditForwarder]]:
    """Make forwarders polling every 20 ms; any a test leaves running is stopped after it."""
    made: list[AuditForwarder] = []

    def make(directory: Path, redis_url: str, **options: Any) -> AuditForwarder:
        options = {"stream": stream, "replica": "replica-a", "poll_s": 0.02, **options}
        made.append(AuditForwarder(directory, redis_url, **options))
        return made[-1]

    yield make
    for forwarder in made:
        await forwarder.stop(flush_timeout_s=1.0)


# ---- pure parts: the cursor and the reader ---------------------------------------------------


def test_a_saved_cursor_loads_back_and_leaves_no_temporary_file(tmp_path):
    """save_cursor replaces the file whole; load_cursor reads the same position back."""
    path = tmp_path / CURSOR_NAME
    save_cursor(path, Cursor(segment=3, offset=1234, seq=77))
    save_cursor(path, Cursor(segment=4, offset=10, seq=80))
    assert load_cursor(path) == Cursor(segment=4, offset=10, seq=80)
    assert path.read_bytes() == b'{"offset":10,"segment":4,"seq":80}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURSOR_NAME]


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"segment":1,"offset":-5,"seq":0}'])
def test_an_unreadable_cursor_means_shipping_from_the_start(tmp_path, content):
    """A cursor file that is not a cursor re-sends everything rather than skipping anything."""
    path = tmp_path / CURSOR_NAME
    path.write_bytes(content)
    assert load_cursor(path) == START
    assert load_cursor(tmp_path / "absent") == START


async def test_batches_read_from_the_cursor_cover_the_log_across_segments(tmp_path):
    """Reading batch after batch from START yields every segment's bytes, once, in order."""
    await write_log(tmp_path, 40, rotate_bytes=1500)
    assert len(segment_files(tmp_path)) > 2
    cursor, shipped = START, b""
    while (batch := read_batch(tmp_path, cursor, limit=7)).lines:
        assert len(batch.lines) <= 7
        shipped += b"".join(batch.lines)
        cursor = batch.end
    assert shipped == log_bytes(tmp_path)
    assert cursor.seq == 40
    assert read_batch(tmp_path, cursor, limit=7).lines == []


async def test_a_line_without_its_newline_is_not_read(tmp_path):
    """An incomplete last line stays unread and the cursor stops before it."""
    await write_log(tmp_path, 3)
    _, path = segment_files(tmp_path)[-1]
    complete = path.stat().st_size
    with path.open("ab") as file:
        file.write(b'{"half":')
    batch = read_batch(tmp_path, START, limit=100)
    assert len(batch.lines) == 3
    assert batch.end == Cursor(segment=1, offset=complete, seq=3)


async def test_a_segment_sealed_during_a_read_is_not_left_before_its_checkpoint(
    tmp_path, monkeypatch
):
    """The writer sealing a segment and opening the next mid-read costs no line of the old one."""
    await write_log(tmp_path, 3)
    _, path = segment_files(tmp_path)[-1]
    last = orjson.loads(path.read_bytes().splitlines()[-1])
    seal = canonical_json(checkpoint(path.name, 3, last["hash"], 3, KEY)) + b"\n"
    real_read = forwarder_module.read_complete_lines

    def read_then_rotate(*args: Any) -> tuple[list[bytes], int, bool]:
        read = real_read(*args)
        if not (tmp_path / "audit-000002.jsonl").exists():
            with path.open("ab") as file:
                file.write(seal)
            (tmp_path / "audit-000002.jsonl").touch()
        return read

    monkeypatch.setattr(forwarder_module, "read_complete_lines", read_then_rotate)
    first = read_batch(tmp_path, Cursor(segment=1, offset=0, seq=0), limit=100)
    assert len(first.lines) == 3
    second = read_batch(tmp_path, first.end, limit=100)
    assert second.lines == [seal]
    assert b"".join(first.lines + second.lines) == log_bytes(tmp_path)
    assert second.end == Cursor(segment=2, offset=0, seq=3)


def test_seq_gaps_allow_a_checkpoint_to_repeat_its_seq():
    """1,2,2(checkpoint),3 is continuous; a skip or a step back is reported."""
    assert list(seq_gaps(0, [1, 2, 2, 3, None, 4])) == []
    assert list(seq_gaps(4, [5, 7])) == [(5, 7)]
    assert list(seq_gaps(9, [3])) == [(9, 3)]


# ---- against a real redis-server -------------------------------------------------------------


async def test_records_reach_the_stream_in_order_exactly_once(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """Records appended while the forwarder runs arrive once each, in seq order, byte for byte."""
    forwarder = forwarder_on(tmp_path, redis_server.url)
    await forwarder.start()  # before the log exists: it waits for the first segment
    log = new_log(tmp_path)
    await log.open()
    await append_decisions(log, 50)
    assert await until(lambda: forwarder.forwarded == 50 and forwarder.pending_bytes() == 0)
    await log.close()

    entries = await stream_entries(client, stream)
    assert await client.xlen(stream) == 50
    assert record_seqs(entries) == list(range(1, 51))
    assert lines_of(entries) == log_bytes(tmp_path)
    assert {entry[b"replica"] for entry in entries} == {b"replica-a"}
    assert verify(tmp_path).ok  # the cursor file beside the segments does not disturb the log


async def test_segments_ship_in_order_across_rotations(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """With tiny segments, every record and every checkpoint ships once, in chain order."""
    log = new_log(tmp_path, rotate_bytes=1500)
    await log.open()
    await append_decisions(log, 30)
    forwarder = forwarder_on(tmp_path, redis_server.url, batch=16)
    await forwarder.start()
    await append_decisions(log, 30, start=30)
    await log.close()
    segments = len(segment_files(tmp_path))
    assert segments > 3
    total_lines = log_bytes(tmp_path).count(b"\n")
    assert await until(lambda: forwarder.forwarded == total_lines)

    entries = await stream_entries(client, stream)
    assert len(entries) == total_lines
    assert lines_of(entries) == log_bytes(tmp_path)
    assert record_seqs(entries) == list(range(1, 61))
    assert sum(entry[b"type"] == b"checkpoint" for entry in entries) >= segments - 1
    # The cursor moves once the batch is acknowledged, a moment after the counter: poll.
    assert await until(lambda: forwarder.cursor.segment == segments)


async def test_records_spill_while_redis_is_down_and_replay_in_order_when_it_returns(
    tmp_path, own_redis, stream, forwarder_on
):
    """200 records written during an outage wait on disk, counted, then all ship in order."""
    log = new_log(tmp_path)
    await log.open()
    forwarder = forwarder_on(tmp_path, own_redis.url, batch=64)
    await forwarder.start()
    await append_decisions(log, 10)
    assert await until(lambda: forwarder.forwarded == 10)
    client = aioredis.from_url(own_redis.url)
    try:
        before_outage = await stream_entries(client, stream)
    finally:
        await client.aclose()

    own_redis.stop()
    await append_decisions(log, 200, start=10)  # answers keep being audited meanwhile
    assert await until(lambda: forwarder.errors > 0)
    assert forwarder.pending_bytes() > 0
    assert forwarder.forwarded == 10

    own_redis.start()  # same port, empty: the stream now holds only what is replayed
    assert await until(lambda: forwarder.pending_bytes() == 0, within_s=20)
    await log.close()
    client = aioredis.from_url(own_redis.url)
    try:
        replayed = await stream_entries(client, stream)
    finally:
        await client.aclose()
    assert forwarder.forwarded == 210
    assert record_seqs(replayed) == list(range(11, 211))
    assert lines_of(before_outage) + lines_of(replayed) == log_bytes(tmp_path)


async def test_a_restarted_forwarder_resumes_from_its_cursor_without_resending(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """A second forwarder on a fully shipped log sends only what is appended after it."""
    log = new_log(tmp_path)
    await log.open()
    await append_decisions(log, 30)
    first = forwarder_on(tmp_path, redis_server.url)
    await first.start()
    assert await until(lambda: first.forwarded == 30)
    await first.stop()
    size = segment_files(tmp_path)[0][1].stat().st_size
    assert load_cursor(tmp_path / CURSOR_NAME) == Cursor(segment=1, offset=size, seq=30)

    second = forwarder_on(tmp_path, redis_server.url)
    await second.start()
    assert second.cursor == first.cursor
    assert second.pending_bytes() == 0
    await append_decisions(log, 1, start=30)
    assert await until(lambda: second.forwarded == 1)
    await log.close()

    entries = await stream_entries(client, stream)
    assert await client.xlen(stream) == 31
    assert record_seqs(entries) == list(range(1, 32))


async def test_a_torn_last_line_ships_only_once_completed(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """Bytes of a line still being written are left on disk until its newline lands."""
    await write_log(tmp_path, 5)
    _, path = segment_files(tmp_path)[-1]
    last = orjson.loads(path.read_bytes().splitlines()[-1])
    whole = canonical_json(chained(decision(5), seq=6, prev=last["hash"])) + b"\n"
    half = len(whole) // 2
    with path.open("ab") as file:
        file.write(whole[:half])

    forwarder = forwarder_on(tmp_path, redis_server.url)
    await forwarder.start()
    assert await until(lambda: forwarder.forwarded >= 5)
    assert forwarder.forwarded == 5  # the first batch saw the torn bytes and left them
    assert forwarder.pending_bytes() == half
    assert await client.xlen(stream) == 5

    with path.open("ab") as file:
        file.write(whole[half:])
    assert await until(lambda: forwarder.forwarded == 6)
    entries = await stream_entries(client, stream)
    assert entries[-1][b"line"] == whole
    assert forwarder.pending_bytes() == 0


async def test_stop_ships_what_was_written(tmp_path, redis_server, client, stream, forwarder_on):
    """A forwarder that would not poll again for an hour still flushes everything on stop."""
    log = new_log(tmp_path)
    await log.open()
    await append_decisions(log, 1)
    forwarder = forwarder_on(tmp_path, redis_server.url, poll_s=3600)
    await forwarder.start()
    assert await until(lambda: forwarder.forwarded == 1)
    await append_decisions(log, 30, start=1)

    started = time.monotonic()
    await forwarder.stop()
    assert time.monotonic() - started < 5
    await log.close()
    entries = await stream_entries(client, stream)
    assert record_seqs(entries) == list(range(1, 32))
    assert forwarder.pending_bytes() == 0


async def test_replicas_share_one_stream_each_in_its_own_order(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """Two replicas' forwarders interleave in one stream; each replica's lines keep seq order."""
    forwarders = []
    for name in ("replica-a", "replica-b"):
        await write_log(tmp_path / name, 20)
        forwarders.append(forwarder_on(tmp_path / name, redis_server.url, replica=name))
    await asyncio.gather(*(forwarder.start() for forwarder in forwarders))
    assert await until(lambda: all(forwarder.forwarded == 20 for forwarder in forwarders))

    entries = await stream_entries(client, stream)
    for name in (b"replica-a", b"replica-b"):
        own = [entry for entry in entries if entry[b"replica"] == name]
        assert record_seqs(own) == list(range(1, 21))


async def test_an_unreachable_redis_never_raises_out_of_start_or_stop(
    tmp_path, unreachable_redis_url, forwarder_on
):
    """With nothing listening, start and stop return promptly and every line stays pending."""
    await write_log(tmp_path, 20)
    forwarder = forwarder_on(tmp_path, unreachable_redis_url)
    await forwarder.start()
    assert await until(lambda: forwarder.errors > 0)

    started = time.monotonic()
    await forwarder.stop()
    assert time.monotonic() - started < 2
    assert forwarder.forwarded == 0
    assert forwarder.pending_bytes() == len(log_bytes(tmp_path))
    assert not (tmp_path / CURSOR_NAME).exists()
    await forwarder.stop()  # a second stop is a no-op


async def test_prediction_records_leave_their_decisions_for_the_ttl(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """With `decisions_ttl_s`, each prediction record ships and also leaves its decision
    (shared_decisions.py) expiring after the TTL; other records leave none."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    log = new_log(tmp_path)
    await log.open()
    for prediction_id in ids:
        await log.append(prediction_record(prediction_id))
    await log.append({**prediction_record("not-one"), "type": "policy_applied"})
    await log.close()
    forwarder = forwarder_on(tmp_path, redis_server.url, decisions_ttl_s=600)
    await forwarder.start()
    assert await until(lambda: forwarder.forwarded == 4 and forwarder.pending_bytes() == 0)

    for prediction_id in ids:
        value = await client.get(DECISION_PREFIX + prediction_id)
        [(_, fields)] = await client.xrange(stream, entry_of(value), entry_of(value))
        assert orjson.loads(fields[b"line"])["prediction_id"] == prediction_id  # its entry
        kept = decision_of(value)
        wrote = {k: v for k, v in prediction_record(prediction_id).items() if k in kept}
        assert kept == wrote and kept["arm"] == "control" and kept["type"] == "prediction"
        assert 590 <= await client.ttl(DECISION_PREFIX + prediction_id) <= 600
    assert not await client.exists(DECISION_PREFIX + "not-one")


async def test_without_a_ttl_no_decision_is_kept(tmp_path, redis_server, client, forwarder_on):
    prediction_id = str(uuid.uuid4())
    log = new_log(tmp_path)
    await log.open()
    await log.append(prediction_record(prediction_id))
    await log.close()
    forwarder = forwarder_on(tmp_path, redis_server.url)
    await forwarder.start()
    assert await until(lambda: forwarder.forwarded == 1)
    assert not await client.exists(DECISION_PREFIX + prediction_id)


# ---- the stream's retention -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("now_s", "retention_s", "oldest"),
    [(1_765_000_000.5, 3600, "1764996400500-0"), (1_765_000_000.0, 0, None), (50.0, 100, "0-0")],
    ids=["an-hour", "keep-all", "before-the-epoch"],
)
def test_the_oldest_entry_kept_is_the_retention_before_now(now_s, retention_s, oldest):
    assert oldest_kept_entry(now_s, retention_s) == oldest


async def test_entries_older_than_the_retention_are_trimmed_as_batches_are_added(
    tmp_path, redis_server, client, stream, forwarder_on
):
    """200 records ship; later, with the cut between them and 20 new ones, the next batch
    trims the old ones from the oldest (whole stream nodes at a time: the few sharing a node
    with a young entry stay), and never a young one."""
    log = new_log(tmp_path)
    await log.open()
    for n in range(200):
        await log.append(prediction_record(f"old-{n}"))
    first = forwarder_on(tmp_path, redis_server.url, retention_s=3600)
    await first.start()
    assert await until(lambda: first.forwarded == 200 and first.pending_bytes() == 0)
    await first.stop()
    await asyncio.sleep(0.05)
    cut = time.time()
    await asyncio.sleep(0.05)
    for n in range(20):
        await log.append(prediction_record(f"new-{n}"))
    await log.close()
    later = forwarder_on(
        tmp_path, redis_server.url, retention_s=3600, wall_clock=lambda: cut + 3600
    )
    await later.start()
    assert await until(lambda: later.forwarded == 20 and later.pending_bytes() == 0)

    kept = [orjson.loads(f[b"line"])["prediction_id"] for _, f in await client.xrange(stream)]
    young = [p for p in kept if p.startswith("new-")]
    old = [p for p in kept if p.startswith("old-")]
    assert young == [f"new-{n}" for n in range(20)]
    assert len(old) < 50 and old == [f"old-{n}" for n in range(200 - len(old), 200)]


async def test_a_retention_of_zero_keeps_every_entry(
    tmp_path, redis_server, client, stream, forwarder_on
):
    log = new_log(tmp_path)
    await log.open()
    for n in range(30):
        await log.append(prediction_record(f"p-{n}"))
    await log.close()
    forwarder = forwarder_on(tmp_path, redis_server.url, retention_s=0, wall_clock=lambda: 4e9)
    await forwarder.start()
    assert await until(lambda: forwarder.forwarded == 30 and forwarder.pending_bytes() == 0)
    assert await client.xlen(stream) == 30
