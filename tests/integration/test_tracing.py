"""W3C trace context: from the caller, through the gateway, to Triton and the audit record."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import CHURN_REQUEST

pytestmark = pytest.mark.triton

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def received_traceparents(log_path) -> list[tuple[str, str]]:
    if not log_path.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in log_path.read_text().splitlines()]


async def test_callers_trace_reaches_triton_and_the_audit_record(gateway_client, healthy, tmp_path):
    """The caller's trace id is what Triton receives and what the decision's record holds."""
    headers = {"traceparent": CALLER_TRACEPARENT, "Cache-Control": "no-cache"}
    async with gateway_client(
        env={"AIGW_TRITON_URL": healthy.http_url}, audit_dir=tmp_path
    ) as client:
        answer = (await client.post("/v1/predictions", json=CHURN_REQUEST, headers=headers)).json()
        explanation = f"/v1/predictions/{answer['prediction_id']}/explanation"
        record = (await client.get(explanation)).json()
    assert answer["served_by"] == "churn-gbm"
    for _ in range(50):  # the model's handler appends its line just after answering
        received = [
            tp for model, tp in received_traceparents(healthy.received_log) if TRACE_ID in tp
        ]
        if received:
            break
        time.sleep(0.02)
    assert received, "no request with the caller's trace id reached Triton"
    version, trace_id, parent_span, flags = received[-1].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_span != "00f067aa0ba902b7"  # the gateway's own span is the parent now
    assert record["trace_id"] == TRACE_ID


async def test_a_trace_begins_when_the_caller_sends_none(gateway_client, healthy, tmp_path):
    """Without a caller's traceparent the gateway starts a trace and still passes it on."""
    async with gateway_client(
        env={"AIGW_TRITON_URL": healthy.http_url}, audit_dir=tmp_path
    ) as client:
        answer = (
            await client.post(
                "/v1/predictions", json=CHURN_REQUEST, headers={"Cache-Control": "no-cache"}
            )
        ).json()
        explanation = f"/v1/predictions/{answer['prediction_id']}/explanation"
        record = (await client.get(explanation)).json()
    trace_id = record["trace_id"]
    assert trace_id and len(trace_id) == 32 and trace_id != "0" * 32
    for _ in range(50):
        if any(trace_id in tp for _, tp in received_traceparents(healthy.received_log)):
            break
        time.sleep(0.02)
    assert any(trace_id in tp for _, tp in received_traceparents(healthy.received_log))
    assert json.dumps(record)  # the record is plain JSON
