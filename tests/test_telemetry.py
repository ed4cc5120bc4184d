"""/metrics: the gateway's Prometheus metrics, with bounded label sets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_answers_fallbacks_cache_breakers_and_audit(gateway_client):
    """After traffic without Triton: answers, fallbacks, cache, breakers, audit are counted."""
    async with gateway_client(env={"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}) as client:
        for _ in range(7):
            await client.post("/v1/predictions", json=CHURN_REQUEST)
        await client.post(
            "/v1/predictions", content=b"{", headers={"content-type": "application/json"}
        )
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)
    degraded = dict(
        model="customer-churn", arm="control", served_by="default", degraded="true", cached="false"
    )
    assert value(m, "aigw_requests_total", **degraded) == 7
    assert (
        value(
            m,
            "aigw_fallbacks_total",
            model="customer-churn",
            served_by="default",
            reason="backend_error",
        )
        >= 1
    )
    assert (
        value(
            m,
            "aigw_fallbacks_total",
            model="customer-churn",
            served_by="default",
            reason="breaker_open",
        )
        >= 1
    )
    assert value(m, "aigw_cache_events_total", event="miss") == 7  # degraded answers are not cached
    assert value(m, "aigw_breaker_state", target="customer-churn/churn-gbm") == 2
    assert value(m, "aigw_breaker_state", target="customer-churn/churn-gbm-v2") == 0
    assert value(m, "aigw_audit_records_written_total") == 7
    assert value(m, "aigw_rejected_requests_total", status="400") == 1
    assert value(m, "aigw_request_duration_seconds_count", model="customer-churn") == 7
    assert value(m, "aigw_ready") == 0


async def test_metric_labels_never_carry_request_data(gateway_client):
    """No prediction id, request id or feature value appears anywhere in /metrics."""
    features = {"customer_id": "cust-ZQX", "tenure_months": 7, "monthly_charges": 77.125}
    request = {"model_id": "customer-churn", "features": features}
    async with gateway_client(env={"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}) as client:
        answer = (await client.post("/v1/predictions", json=request)).json()
        text = (await client.get("/metrics")).text
    assert answer["prediction_id"] not in text
    assert "cust-ZQX" not in text
    assert "77.125" not in text
