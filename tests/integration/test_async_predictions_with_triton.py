"""Asynchronous predictions end to end: `aigw serve` in front of a real Triton, a real receiver."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from gateway.callbacks import verify
from gateway.demo.triton_process import free_port
from tests.callback_receiver import Receiver
from tests.conftest import CHURN_REQUEST

pytestmark = pytest.mark.triton

CALLBACK_KEY = "integration-callback-key"


async def test_a_job_is_answered_by_triton_polled_and_called_back(
    triton, gateway_process, tmp_path: Path
):
    """Through `aigw serve`: 202, the primary model answers, the signed callback matches."""
    audit_dir = tmp_path / "audit"
    gateway = gateway_process(
        {
            "AIGW_TRITON_URL": triton.http_url,
            "AIGW_AUDIT_DIR": str(audit_dir),
            "AIGW_ADMIN_PORT": str(free_port()),
            "AIGW_WATCH_POLICIES": "false",
            "AIGW_CALLBACK_KEY": CALLBACK_KEY,
            "AIGW_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        }
    )
    async with (
        Receiver([503]) as receiver,
        httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client,
    ):
        body = {**CHURN_REQUEST, "callback_url": receiver.url}
        submitted = await client.post(
            "/v1/predictions:async", json=body, headers={"Cache-Control": "no-cache"}
        )
        assert submitted.status_code == 202, submitted.text
        status_url = submitted.headers["location"]
        for _ in range(500):
            polled = await client.get(status_url)
            if polled.status_code != 202:
                break
            await asyncio.sleep(0.02)
        await receiver.wait_accepted(timeout_s=20)
        explained = await client.get(status_url + "/explanation")
    assert polled.status_code == 200
    envelope = polled.json()
    assert envelope["prediction_id"] == submitted.json()["prediction_id"]
    assert envelope["served_by"] == "churn-gbm" and envelope["degraded"] is False
    delivered = receiver.received[-1]
    assert json.loads(delivered.body) == envelope
    timestamp = delivered.headers["X-AIGW-Timestamp"]
    assert verify(
        CALLBACK_KEY.encode(),
        delivered.body,
        timestamp,
        delivered.headers["X-AIGW-Signature"],
        now=int(timestamp),
    )
    assert explained.status_code == 200
    assert explained.json()["steps"][0]["step"] == "churn-gbm"
