"""GET /v1/models/{model_id}/health and its gauges: drift measured on the gateway's traffic."""

from __future__ import annotations

import pytest

from gateway.demo.data import make_churn_dataset
from gateway.demo.triton_process import free_port

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


def requests_from_training_distribution(n: int, charges_factor: float = 1.0) -> list[dict]:
    features, _ = make_churn_dataset(n=n, seed=23)
    return [
        {
            "model_id": "customer-churn",
            "features": {
                "customer_id": f"health-{i}",
                "tenure_months": int(row[0]),
                "monthly_charges": round(float(row[1]) * charges_factor, 2),
            },
        }
        for i, row in enumerate(features)
    ]


@pytest.mark.parametrize(
    ("factor", "charges_psi_over", "status"), [(1.0, None, "ok"), (2.0, 0.25, "drifting")]
)
async def test_drift_of_served_traffic_is_reported(
    gateway_client, factor, charges_psi_over, status
):
    """Training-like traffic keeps PSI under 0.1; doubled charges push that feature over 0.25."""
    async with gateway_client(env=NOWHERE) as client:
        for request in requests_from_training_distribution(1000, factor):
            await client.post("/v1/predictions", json=request)
        health = (await client.get("/v1/models/customer-churn/health")).json()
        metrics = (await client.get("/metrics")).text
    streams = [arm for arms in health["versions"].values() for arm in arms.values()]
    measured = [
        s
        for s in streams
        if s["drift"] and s["drift"]["features"]["monthly_charges"]["psi"] is not None
    ]
    assert measured, health
    stream = max(measured, key=lambda s: s["drift"]["sample_size"])
    charges = stream["drift"]["features"]["monthly_charges"]["psi"]
    tenure = stream["drift"]["features"]["tenure_months"]["psi"]
    assert tenure < 0.1
    if charges_psi_over is None:
        assert charges < 0.1
    else:
        assert charges > charges_psi_over
    assert stream["status"] == status
    assert 'aigw_model_feature_psi{arm="control"' in metrics


async def test_health_of_an_unknown_model_is_404(gateway_client):
    """No policy, no health report."""
    async with gateway_client(env=NOWHERE) as client:
        response = await client.get("/v1/models/nope/health")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
