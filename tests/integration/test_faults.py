"""Real faults on a real Triton: errors, slowness, a frozen or killed server, a silent port.

Each test opens its own gateway (fresh breakers) in front of this module's breakable Triton
and restores the server afterwards. Waiting for recovery polls with a bound; nothing sleeps
for a fixed time to hope a state was reached.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.demo.triton_process import TritonProcess, free_port
from tests.api.test_admin import bundle_with, gateway_and_admin
from tests.conftest import CHURN_REQUEST
from tests.integration.test_traffic_and_cache import triton_successes

pytestmark = pytest.mark.triton

POLICY_TIMEOUT_MS = 400  # policies/customer-churn.yaml
# The gateway's own work after the deadline (rules, default, serialising) is microseconds;
# scheduling on a busy 2-core machine is not, so allow this much over the budget.
DEADLINE_SLACK_MS = 150


async def predict(client: httpx.AsyncClient, **headers: str) -> dict:
    """One prediction that bypasses the cache, so every call exercises the backends."""
    headers = {"Cache-Control": "no-cache", **headers}
    response = await client.post("/v1/predictions", json=CHURN_REQUEST, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def until_served_by(client: httpx.AsyncClient, target: str, within_s: float) -> dict:
    """Send requests until `target` answers one; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        body = await predict(client)
        if body["served_by"] == target:
            return body
        await asyncio.sleep(0.05)
    pytest.fail(f"{target} did not answer within {within_s} s")


def env_for(triton: TritonProcess) -> dict[str, str]:
    return {"AIGW_TRITON_URL": triton.http_url}


async def test_model_error_falls_back_to_simpler_model_then_recovers(gateway_client, healthy):
    """A failing primary: the simpler model answers, the breaker opens, then closes again."""
    healthy.set_control("error", models=["churn_gbm"])
    async with gateway_client(env=env_for(healthy)) as client:
        first = await predict(client)
        assert first["served_by"] == "churn-logreg"
        assert first["degraded"] is True
        assert first["fallback_reason"] == "backend_error"
        for _ in range(6):
            body = await predict(client)
        assert body["fallback_reason"] == "breaker_open"
        assert body["served_by"] == "churn-logreg"

        healthy.set_control("ok")
        recovered = await until_served_by(client, "churn-gbm", within_s=10)
    assert recovered["degraded"] is False


async def test_a_pinned_version_triton_does_not_have_opens_the_breaker(
    gateway_client, healthy, data_dirs
):
    """Triton answers 404 for a model version it has not loaded (unloaded in a model swap,
    or a server without it): that is the target gone, not a malformed request. The simpler
    model answers, and the breaker opens instead of every request paying the round trip."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    pinned = 'model: churn_gbm\n    version: "1"'
    assert pinned in policy.read_text()
    policy.write_text(policy.read_text().replace(pinned, 'model: churn_gbm\n    version: "9"'))
    async with gateway_client(env=env_for(healthy), root=data_dirs) as client:
        first = await predict(client)
        explained = await client.get(f"/v1/predictions/{first['prediction_id']}/explanation")
        reasons = [(await predict(client))["fallback_reason"] for _ in range(6)]
        metrics = (await client.get("/metrics")).text
    assert (first["served_by"], first["fallback_reason"]) == ("churn-logreg", "backend_error")
    assert "triton 404" in json.dumps(explained.json()["steps"])  # the record says why
    assert reasons[-1] == "breaker_open"
    assert 'aigw_breaker_state{target="customer-churn/churn-gbm"} 2.0' in metrics


async def test_slow_models_are_cut_at_the_deadline(gateway_client, healthy):
    """Models slower than the budget: rules or default answer, within the budget."""
    healthy.set_control("slow", delay_ms=1500)
    async with gateway_client(env=env_for(healthy)) as client:
        body = await predict(client)
    assert body["degraded"] is True
    assert body["fallback_reason"] == "timeout"
    assert body["served_by"] in ("rules", "default")
    assert body["latency_ms"] <= POLICY_TIMEOUT_MS + DEADLINE_SLACK_MS


@pytest.mark.parametrize(("header_ms", "budget_ms"), [("120", 120), ("5000", POLICY_TIMEOUT_MS)])
async def test_caller_can_lower_but_not_raise_the_budget(
    gateway_client, healthy, header_ms: str, budget_ms: int
):
    """X-Request-Timeout-Ms lowers the budget; a larger value keeps the policy's."""
    healthy.set_control("slow", delay_ms=1500)
    async with gateway_client(env=env_for(healthy)) as client:
        body = await predict(client, **{"X-Request-Timeout-Ms": header_ms})
    assert body["fallback_reason"] == "timeout"
    assert body["latency_ms"] <= budget_ms + DEADLINE_SLACK_MS
    if budget_ms < POLICY_TIMEOUT_MS:
        assert body["latency_ms"] < POLICY_TIMEOUT_MS


async def test_slow_calls_open_the_breaker_even_when_they_succeed(
    gateway_client, healthy, data_dirs
):
    """Answers slower than slow_call_ms trip the breaker on the slow-call rate."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    policy.write_text(policy.read_text().replace("slow_call_ms: 300", "slow_call_ms: 100"))
    async with gateway_client(env=env_for(healthy), root=data_dirs) as client:
        await until_served_by(client, "churn-gbm", within_s=10)
        healthy.set_control("slow", delay_ms=150, models=["churn_gbm"])
        bodies = [await predict(client) for _ in range(14)]
    assert bodies[0]["served_by"] == "churn-gbm"  # a slow success is a success for its caller
    assert bodies[0]["degraded"] is False
    assert bodies[-1]["fallback_reason"] == "breaker_open"
    assert bodies[-1]["served_by"] == "churn-logreg"


async def test_frozen_server_gets_degraded_answers_in_time_then_recovers(gateway_client, healthy):
    """SIGSTOPped Triton (connections hang): degraded answers in budget; thaw restores it."""
    async with gateway_client(env=env_for(healthy)) as client:
        assert (await predict(client))["served_by"] == "churn-gbm"
        healthy.freeze()
        try:
            bodies = [await predict(client) for _ in range(8)]
        finally:
            healthy.thaw()
        recovered = await until_served_by(client, "churn-gbm", within_s=10)
    assert all(b["degraded"] for b in bodies)
    assert {b["fallback_reason"] for b in bodies} <= {"timeout", "breaker_open"}
    assert bodies[-1]["fallback_reason"] == "breaker_open"
    assert max(b["latency_ms"] for b in bodies) <= POLICY_TIMEOUT_MS + DEADLINE_SLACK_MS
    assert recovered["degraded"] is False


async def test_killed_server_gets_degraded_answers_then_recovers(gateway_client, healthy):
    """A dead Triton: the gateway keeps answering; a restarted one takes traffic back."""
    async with gateway_client(env=env_for(healthy)) as client:
        healthy.kill()
        bodies = [await predict(client) for _ in range(8)]
        await asyncio.to_thread(healthy.restart)
        recovered = await until_served_by(client, "churn-gbm", within_s=10)
    assert all(b["degraded"] and b["served_by"] in ("rules", "default") for b in bodies)
    assert bodies[0]["fallback_reason"] == "backend_error"
    assert bodies[-1]["fallback_reason"] == "breaker_open"
    assert recovered["degraded"] is False


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes TCP handshakes (backlog) but never reads or answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    yield server.getsockname()[1]
    server.close()


async def test_port_that_never_answers_is_cut_at_the_deadline(gateway_client, silent_port: int):
    """A backend that accepts and never answers costs a request its budget, no more."""
    async with gateway_client(env={"AIGW_TRITON_URL": f"127.0.0.1:{silent_port}"}) as client:
        body = await predict(client)
    assert body["degraded"] is True
    assert body["fallback_reason"] == "timeout"
    assert body["latency_ms"] <= POLICY_TIMEOUT_MS + DEADLINE_SLACK_MS


CHALLENGER_BREAKER = (
    """gather_ms: 5.0}
    breaker: *breaker

  churn-logreg:""",
    """gather_ms: 5.0}
    breaker: {<<: *breaker, force: open}

  churn-logreg:""",
)


async def test_an_operator_forces_a_target_open_and_back_through_the_admin_api(
    data_dirs, triton: TritonProcess
):
    """The kill switch: an applied `force: open` on churn-gbm-v2 sends the challenger's
    traffic to its next step at once, without a call to it (reason breaker_open), and the
    apply is in the audit trail; rolling back brings the model back."""
    premium = {"x-customer-tier": "premium"}  # routed to the challenger arm
    async with gateway_and_admin(data_dirs, env_for(triton), watch_policies=False) as (
        public, admin, audit_dir,
    ):  # fmt: skip
        before = (await public.post("/v1/predictions", json=CHURN_REQUEST, headers=premium)).json()
        bundle = bundle_with(data_dirs, *CHALLENGER_BREAKER)
        applied = await admin.post("/admin/policies", json={"author": "ops", "bundle": bundle})
        assert applied.status_code == 200, applied.text
        calls_before = triton_successes(triton, "churn_gbm_v2")
        forced = [
            (await public.post("/v1/predictions", json=CHURN_REQUEST, headers=premium)).json()
            for _ in range(5)
        ]
        calls_forced = triton_successes(triton, "churn_gbm_v2") - calls_before
        metrics = (await public.get("/metrics")).text
        rolled = await admin.post("/admin/policies/rollback", json={"author": "ops", "version": 1})
        after = (await public.post("/v1/predictions", json=CHURN_REQUEST, headers=premium)).json()
    assert before["served_by"] == "churn-gbm-v2" and rolled.status_code == 200
    assert {(b["served_by"], b["degraded"], b["fallback_reason"]) for b in forced} == {
        ("churn-logreg", True, "breaker_open")
    }
    assert calls_forced == 0
    assert 'aigw_breaker_state{target="customer-churn/churn-gbm-v2"} 2.0' in metrics
    assert after["served_by"] == "churn-gbm-v2" and after["degraded"] is False
    applies = [
        json.loads(line)
        for path in audit_dir.glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
        if '"type":"admin"' in line
    ]
    forcing = applied.json()["content_hash"]
    assert [(a["action"], a["author"]) for a in applies if a["content_hash"] == forcing] == [
        ("apply", "ops")
    ]


async def test_a_target_forced_closed_is_called_whatever_it_returns(gateway_client, data_dirs):
    """`force: closed` on every target, and nothing listening where Triton should be: each
    of twelve requests still tries the primary (backend_error), where the shipped breaker
    would have opened after five failures (breaker_open)."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    text = policy.read_text()
    assert "    breaker: &breaker\n" in text
    policy.write_text(
        text.replace("    breaker: &breaker\n", "    breaker: &breaker\n      force: closed\n")
    )
    nowhere = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    reasons = []
    async with gateway_client(env=nowhere, root=data_dirs) as client:
        for n in range(12):
            request = {
                **CHURN_REQUEST,
                "features": {**CHURN_REQUEST["features"], "customer_id": f"closed-{n}"},
            }
            reasons.append(
                (await client.post("/v1/predictions", json=request)).json()["fallback_reason"]
            )
    assert reasons == ["backend_error"] * 12
