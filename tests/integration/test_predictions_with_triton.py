"""The gateway in front of a real Triton: the contract's envelope, answered by the primary."""

from __future__ import annotations

import asyncio

import jsonschema_rs
import pytest

from gateway.demo.triton_process import TritonProcess
from tests.conftest import CHURN_REQUEST

pytestmark = pytest.mark.triton


def response_validator(document: dict) -> jsonschema_rs.Draft202012Validator:
    root = {"$ref": "#/components/schemas/PredictionResponse", **document}
    return jsonschema_rs.Draft202012Validator(root)


async def test_primary_model_answers_with_full_envelope(gateway_client, triton: TritonProcess):
    """A valid request is answered by the primary Triton model, not degraded, in the envelope."""
    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}) as client:
        response = await client.post("/v1/predictions", json=CHURN_REQUEST)
        document = (await client.get("/openapi.json")).json()
    assert response.status_code == 200
    body = response.json()
    response_validator(document).validate(body)
    assert body["served_by"] == "churn-gbm"
    assert body["degraded"] is False
    assert body["fallback_reason"] is None
    assert body["model_version"] == "1"
    assert body["prediction"] in ("churn", "stay")
    assert 0.0 <= body["probability"] <= 1.0
    assert response.headers["x-request-id"]


async def test_same_input_gets_same_answer(gateway_client, triton: TritonProcess):
    """Deterministic models: repeated identical requests get identical probabilities."""
    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}) as client:
        answers = [
            (await client.post("/v1/predictions", json=CHURN_REQUEST)).json() for _ in range(5)
        ]
    assert len({(a["prediction"], a["probability"]) for a in answers}) == 1
    assert len({a["prediction_id"] for a in answers}) == 5


@pytest.mark.parametrize(
    ("tenure", "charges", "expected"),
    [(1, 110.0, "churn"), (70, 20.0, "stay")],
)
async def test_model_separates_obvious_cases(
    gateway_client, triton: TritonProcess, tenure: int, charges: float, expected: str
):
    """Features reach the model in the policy's order: clear churners and stayers differ."""
    request = {
        "model_id": "customer-churn",
        "features": {"customer_id": "c", "tenure_months": tenure, "monthly_charges": charges},
    }
    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}) as client:
        body = (await client.post("/v1/predictions", json=request)).json()
    assert body["served_by"] == "churn-gbm"
    assert body["prediction"] == expected


async def test_readiness_reports_each_backend(gateway_client, triton: TritonProcess):
    """/readyz is 200 with every target ok when Triton serves the pinned versions."""
    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}) as client:
        response = await client.get("/readyz")
        live = await client.get("/healthz")
    assert response.status_code == 200
    checks = response.json()["checks"]
    assert checks["customer-churn/churn-gbm"] == "ok"
    assert checks["customer-churn/churn-logreg"] == "ok"
    assert live.status_code == 200


async def test_readiness_fails_but_answers_continue_without_triton(gateway_client):
    """With no Triton, /readyz is 503 yet predictions still get a degraded answer."""
    from gateway.demo.triton_process import free_port

    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    async with gateway_client(env=env) as client:
        ready = await client.get("/readyz")
        response = await client.post("/v1/predictions", json=CHURN_REQUEST)
    assert ready.status_code == 503
    assert ready.json()["checks"]["customer-churn/churn-gbm"] == "unavailable"
    assert response.status_code == 200
    assert response.json()["degraded"] is True
    assert response.json()["served_by"] in ("rules", "default")


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    gateway_client, triton: TritonProcess
):
    """Forty requests at once reach Triton in fewer calls (micro-batching), and every caller
    gets the probability its own features have when asked alone."""

    def request(i: int, run: str) -> dict:
        features = {
            "customer_id": f"batch-{run}-{i}",
            "tenure_months": 1 + i,
            "monthly_charges": 20.0 + 2 * i,
        }
        return {**CHURN_REQUEST, "features": {**CHURN_REQUEST["features"], **features}}

    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}) as client:
        together = await asyncio.gather(
            *(client.post("/v1/predictions", json=request(i, "together")) for i in range(40))
        )
        alone = [await client.post("/v1/predictions", json=request(i, "alone")) for i in range(40)]
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in (*together, *alone))
    pairs = [(t.json(), a.json()) for t, a in zip(together, alone, strict=True)]
    same_model = [(t, a) for t, a in pairs if t["served_by"] == a["served_by"] == "churn-gbm"]
    assert len(same_model) >= 20  # the 90% arm, on both runs, for most of these customers
    assert all(t["probability"] == a["probability"] for t, a in same_model)
    calls = sample(metrics, 'aigw_backend_batch_rows_count{target="churn-gbm"}')
    rows = sample(metrics, 'aigw_backend_batch_rows_sum{target="churn-gbm"}')
    served = sum(1 for r in (*together, *alone) if r.json()["served_by"] == "churn-gbm")
    assert rows >= served
    assert calls < rows  # at least one call carried several rows


def sample(exposition: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed")


async def test_a_low_traffic_target_gathers_rows_even_when_idle(
    gateway_client, triton: TritonProcess, data_dirs
):
    """The challenger's target sets `batching.gather_ms` (10 ms here): two requests 2 ms
    apart at an idle target go as one Triton call of two rows, each answered as if alone.
    (Without it the first goes at once and the second in a call of its own.)"""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    text = policy.read_text()
    assert "gather_ms: 5.0" in text
    policy.write_text(text.replace("gather_ms: 5.0", "gather_ms: 10.0"))
    premium = {"x-customer-tier": "premium"}  # routed to the challenger
    no_cache = {**premium, "cache-control": "no-cache"}

    def request(i: int) -> dict:
        features = {"customer_id": f"gather-{i}", "tenure_months": 3 + i}
        return {**CHURN_REQUEST, "features": {**CHURN_REQUEST["features"], **features}}

    async with gateway_client(env={"AIGW_TRITON_URL": triton.http_url}, root=data_dirs) as client:

        async def second_after_2_ms():  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.002)
            return await client.post("/v1/predictions", json=request(1), headers=premium)

        first, second = await asyncio.gather(
            client.post("/v1/predictions", json=request(0), headers=premium), second_after_2_ms()
        )
        metrics = (await client.get("/metrics")).text
        alone = [  # asked again, one at a time
            (await client.post("/v1/predictions", json=request(i), headers=no_cache)).json()
            for i in (0, 1)
        ]
    answers = [first.json(), second.json()]
    assert [a["served_by"] for a in answers] == ["churn-gbm-v2", "churn-gbm-v2"]
    assert sample(metrics, 'aigw_backend_batch_rows_count{target="churn-gbm-v2"}') == 1
    assert sample(metrics, 'aigw_backend_batch_rows_sum{target="churn-gbm-v2"}') == 2
    assert [a["probability"] for a in answers] == [a["probability"] for a in alone]
