"""The audit trail under load: one record per answer received, even across a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.audit import find_record, verify

pytestmark = pytest.mark.triton

CLIENTS = 32
HEADERS = {"Content-Type": "application/json"}


def request_body(i: int) -> bytes:
    # Distinct customers and inputs, so the cache does not answer most of them.
    features = {
        "customer_id": f"load-{i}",
        "tenure_months": i % 72,
        "monthly_charges": 20.0 + (i % 97),
    }
    return orjson.dumps({"model_id": "customer-churn", "features": features})


async def send(base_url: str, total: int, stop: asyncio.Event | None = None) -> list[str]:
    """`total` requests over CLIENTS connections; the prediction ids of the 200 answers."""
    received: list[str] = []
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=10)

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if stop is not None and stop.is_set():
                return
            try:
                async with session.post(
                    "/v1/predictions", data=request_body(i), headers=HEADERS
                ) as response:
                    if response.status == 200:
                        received.append(orjson.loads(await response.read())["prediction_id"])
            except (aiohttp.ClientError, TimeoutError):
                return  # the gateway was killed under this request: no answer received

    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    return received


def audited_prediction_ids(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "prediction":
                ids.append(record["prediction_id"])
    return ids


def test_five_thousand_answers_make_five_thousand_records(triton, gateway_process, tmp_path):
    """Under 32 clients, the audit log holds exactly one record per answer; the chain verifies."""
    audit_dir = tmp_path / "audit"
    env = {
        "AIGW_TRITON_URL": triton.http_url,
        "AIGW_AUDIT_DIR": str(audit_dir),
        "AIGW_AUDIT_ROTATE_BYTES": str(512 * 1024),  # several rotations and checkpoints
    }
    gateway = gateway_process(env)
    received = asyncio.run(send(gateway.base_url, 5000))
    # A clean shutdown flushes everything; uvicorn re-raises SIGTERM once it has shut down.
    assert gateway.stop() in (0, -signal.SIGTERM)
    assert len(received) == 5000
    audited = audited_prediction_ids(audit_dir)
    assert sorted(audited) == sorted(received)
    assert len(list(audit_dir.glob("audit-*.jsonl"))) > 1
    result = verify(audit_dir)
    assert result.ok, str(result)
    assert result.records == 5000
    # Looked up by id (through the log's index), every answer explains itself.
    for prediction_id in received[::50]:
        record = find_record(audit_dir, prediction_id)
        assert record is not None and record["prediction_id"] == prediction_id


def test_sigkill_under_load_loses_no_answered_record(triton, gateway_process, tmp_path):
    """SIGKILL mid-load: every prediction_id a client received is in the log after restart."""
    audit_dir = tmp_path / "audit"
    env = {"AIGW_TRITON_URL": triton.http_url, "AIGW_AUDIT_DIR": str(audit_dir)}
    gateway = gateway_process(env)

    async def load_then_kill() -> list[str]:
        stop = asyncio.Event()
        load = asyncio.create_task(send(gateway.base_url, 100_000, stop))
        while len(list(audit_dir.glob("audit-*.jsonl"))) == 0 or audit_dir.stat().st_size == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # well into steady load
        gateway.kill()
        stop.set()
        return await load

    received = asyncio.run(load_then_kill())
    assert len(received) > 100
    restarted = gateway_process(env)  # opening the log repairs a torn tail, if any
    restarted.stop()
    audited = set(audited_prediction_ids(audit_dir))
    missing = [pid for pid in received if pid not in audited]
    assert not missing, f"{len(missing)} of {len(received)} answered ids not audited"
    result = verify(audit_dir)
    assert result.ok, str(result)
    # The index may have lagged the log at the kill: lookups still find every answer.
    unfound = [pid for pid in received if find_record(audit_dir, pid) is None]
    assert not unfound, f"{len(unfound)} of {len(received)} answered ids not found by id"
