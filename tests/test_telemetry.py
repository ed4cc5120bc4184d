"""/metrics: the gateway's Prometheus metrics, with bounded label sets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway import telemetry
from gateway.auth import add_key
from gateway.demo.triton_process import free_port
from gateway.experiments import Experiments
from gateway.monitoring import Monitor, load_baselines
from gateway.shared_statistics import SharedStatistics
from gateway.telemetry import MULTIPROCESS_ENV, Metrics
from tests.conftest import CHURN_REQUEST

REPO = Path(__file__).resolve().parents[1]
MODEL = "customer-churn"
BATCH_ROWS = "aigw_backend_batch_rows"


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
    # One request after another: a write call each (inline, once the writer thread is up).
    assert 1 <= value(m, "aigw_audit_write_calls_total") <= 7
    assert ("aigw_audit_inline_writes_total", ()) in m
    assert value(m, "aigw_audit_inline_writes_total") <= 7
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


# --- Cached label children and the micro-batch histogram ---------------------------------


def answer_like(degraded: bool, cached: bool, served_by: str = "churn-gbm") -> SimpleNamespace:
    """The fields of a pipeline Answer that `observe_answer` reads."""
    reason = "backend_error" if degraded else None
    return SimpleNamespace(
        arm="control", served_by=served_by, degraded=degraded, cached=cached,
        fallback_reason=reason, latency_ms=3.5,
    )  # fmt: skip


def traffic(metrics: Metrics) -> None:
    """Every per-request and per-event update, each label set seen more than once."""
    for _ in range(3):
        metrics.observe_answer("customer-churn", answer_like(degraded=False, cached=True))
        metrics.observe_answer("customer-churn", answer_like(True, False, served_by="default"))
        metrics.observe_cache("hit")
        metrics.observe_cache("miss")
        metrics.observe_backend_call("customer-churn/churn-gbm", "ok", 0.004)
        metrics.observe_backend_call("customer-churn/churn-gbm", "timeout", 0.3)
        metrics.observe_batch("customer-churn/churn-gbm", 5)
        metrics.observe_shadow("customer-churn", "customer-churn/churn-gbm-v2", True)
        metrics.observe_shadow("customer-churn", "customer-churn/churn-gbm-v2", None)
        metrics.observe_stream_job("customer-churn", "dead")
        metrics.observe_stream_backlog("customer-churn", 4, 2)
        metrics.observe_callback("delivered")
        metrics.observe_breaker_change("customer-churn/churn-gbm", "open")


def without_created(exposition: bytes) -> list[str]:
    """The exposition's lines but the `_created` timestamps, which differ per instance."""
    return [line for line in exposition.decode().splitlines() if "_created" not in line]


def count_labels_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of prometheus-client's `labels()` from now on (in calls[0])."""
    calls = [0]
    original = MetricWrapperBase.labels

    def counting(self, *values, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self, *values, **kwargs)

    monkeypatch.setattr(MetricWrapperBase, "labels", counting)
    return calls


def test_cached_children_give_the_exposition_labels_gives(monkeypatch):
    """The same traffic with the cache and without it (every update through `labels()`)
    exports the same text, and the cache calls `labels()` once per label set."""
    calls = count_labels_calls(monkeypatch)
    cached = Metrics()
    traffic(cached)
    cached_calls, calls[0] = calls[0], 0

    def uncached(children, *values):  # type: ignore[no-untyped-def]
        return children._metric.labels(*values)

    monkeypatch.setattr(telemetry._Children, "__call__", uncached)
    plain = Metrics()
    traffic(plain)
    assert without_created(cached.exposition()) == without_created(plain.exposition())
    assert 0 < cached_calls < calls[0]
    assert cached_calls == 18  # the distinct label sets `traffic` updates


def test_re_created_metrics_start_from_zero():
    """Each instance has its own registry and its own cache: none sees another's counts."""
    first = Metrics()
    traffic(first)
    second = Metrics()
    second.observe_cache("hit")
    m = samples(second.exposition().decode())
    assert value(m, "aigw_cache_events_total", event="hit") == 1
    assert value(samples(first.exposition().decode()), "aigw_cache_events_total", event="hit") == 3


def test_the_children_cache_is_bounded(monkeypatch):
    """A label that carried unbounded values would empty the cache, not grow it; counts stay
    right because the children themselves belong to prometheus-client."""
    monkeypatch.setattr(telemetry, "MAX_CACHED_CHILDREN", 4)
    metrics = Metrics()
    for _ in range(2):
        for n in range(10):
            metrics.observe_cache(f"event-{n}")
    assert len(metrics._cache) <= 4
    m = samples(metrics.exposition().decode())
    assert all(value(m, "aigw_cache_events_total", event=f"event-{n}") == 2 for n in range(10))


def test_observe_batch_exports_rows_per_call_in_power_of_two_buckets():
    """aigw_backend_batch_rows{target}: buckets 1..128 (and +Inf), cumulative, with sum."""
    metrics = Metrics()
    for rows in (1, 1, 3, 8, 100, 300):
        metrics.observe_batch("customer-churn/churn-gbm", rows)
    text = metrics.exposition().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == BATCH_ROWS]
    assert family.type == "histogram"
    assert family.documentation
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == f"{BATCH_ROWS}_bucket"}
    target = "customer-churn/churn-gbm"
    assert all(
        s.labels["target"] == target for s in family.samples if s.name != f"{BATCH_ROWS}_created"
    )
    expected = {"1.0": 2, "2.0": 2, "4.0": 3, "8.0": 4, "16.0": 4, "32.0": 4, "64.0": 4}
    assert buckets == {**expected, "128.0": 5, "+Inf": 6}
    m = samples(text)
    assert value(m, f"{BATCH_ROWS}_count", target=target) == 6
    assert value(m, f"{BATCH_ROWS}_sum", target=target) == 413


# A worker in miniature: prometheus-client picks its multiprocess value class at import, so
# this is its own interpreter with PROMETHEUS_MULTIPROC_DIR set, as every real worker is. It
# re-creates Metrics, as an app restarted in the same process would.
_WORKER = """
from types import SimpleNamespace
from gateway.telemetry import Metrics

answer = SimpleNamespace(arm="control", served_by="churn-gbm", degraded=False, cached=False,
                         fallback_reason=None, latency_ms=2.0)
for _ in range(2):
    metrics = Metrics()
    assert metrics.multiprocess
    for rows in (1, 6, 6):
        metrics.observe_batch("customer-churn/churn-gbm", rows)
        metrics.observe_answer("customer-churn", answer)
print(metrics.exposition().decode())
"""


def test_cached_children_count_in_multiprocess_mode(tmp_path):
    """With several workers the cached children write the shared files: two workers'
    batch histograms and answer counters add up in any worker's /metrics."""
    env = {**os.environ, MULTIPROCESS_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _WORKER],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    m = samples(done.stdout)  # the second worker's /metrics: both workers' totals
    target = "customer-churn/churn-gbm"
    assert value(m, f"{BATCH_ROWS}_count", target=target) == 12
    assert value(m, f"{BATCH_ROWS}_bucket", target=target, le="4.0") == 4
    assert value(m, f"{BATCH_ROWS}_sum", target=target) == 52
    answered = dict(
        model="customer-churn", arm="control", served_by="churn-gbm", degraded="false",
        cached="false",
    )  # fmt: skip
    assert value(m, "aigw_requests_total", **answered) == 12


def test_model_health_gauges_cover_every_workers_windows(tmp_path):
    """With several workers, a worker's drift gauges are computed over its siblings'
    windows too: the same PSI and sample size as the combined health report."""
    now = time.time()  # the exporter reads the windows at the present

    def monitor_seeing(charges: float, count: int) -> Monitor:
        monitor = Monitor(load_baselines(REPO / "baselines"), min_sample_size=1)
        row = {"tenure_months": 24, "monthly_charges": charges}
        for i in range(count):
            monitor.observe_prediction(MODEL, "churn-gbm:1", "control", row, 0.3, now - i)
        return monitor

    mine, theirs = monitor_seeing(20.0, 30), monitor_seeing(110.0, 50)
    SharedStatistics(tmp_path, 1).publish(Experiments(), theirs)
    runtime = SimpleNamespace(
        policies=SimpleNamespace(policies={MODEL: None}),
        monitor=mine,
        shared_statistics=SharedStatistics(tmp_path, 0),
    )
    exported = {
        (s.name, s.labels.get("feature")): s.value
        for family in telemetry._model_health(runtime)
        for s in family.samples
    }
    combined = mine.combined([theirs.windows()]).health(MODEL, now)
    drift = combined["versions"]["churn-gbm:1"]["control"]["drift"]
    assert exported[("aigw_model_drift_sample_size", None)] == 80 == drift["sample_size"]
    charges_psi = drift["features"]["monthly_charges"]["psi"]
    assert exported[("aigw_model_feature_psi", "monthly_charges")] == charges_psi
    own = mine.health(MODEL, now)["versions"]["churn-gbm:1"]["control"]["drift"]
    assert own["features"]["monthly_charges"]["psi"] != charges_psi  # what one worker saw


def test_model_health_series_of_a_version_no_longer_answering_go_away(tmp_path):
    """A version that answered long ago (an old edit of the fallback rules: `rules-<hash>`)
    is exported while its windows hold something, then never again, nor kept by the worker
    (which would publish it to its siblings for good)."""
    now = time.time()
    monitor = Monitor(load_baselines(REPO / "baselines"), quality_window_s=600.0)
    for version, at in (("rules-0123456789ab", now - 700.0), ("rules-ba9876543210", now - 5.0)):
        monitor.observe_outcome(MODEL, version, "control", "stay", "stay", 0.2, "churn", at)
    runtime = SimpleNamespace(
        policies=SimpleNamespace(policies={MODEL: None}),
        monitor=monitor,
        shared_statistics=SharedStatistics(tmp_path, 0),  # one of several workers
    )
    versions = {
        s.labels["version"]
        for family in telemetry._model_health(runtime)
        for s in family.samples
        if s.name == "aigw_model_feedback_sample_size"
    }
    assert versions == {"rules-ba9876543210"}
    assert monitor.forget_idle(now) == 0  # the idle one was dropped at the scrape already


SHARED = {"share_breaker_state": True, "share_policies": True, "share_statistics": True}


def connected(metrics: dict) -> list[float | None]:
    """aigw_shared_state_connected of breakers, policies and statistics (None: absent)."""
    return [
        metrics.get(("aigw_shared_state_connected", (("component", component),)))
        for component in ("breakers", "policies", "statistics")
    ]


async def test_shared_state_says_whether_each_exchange_reaches_redis(gateway_client, redis_server):
    """Breakers, policies and statistics shared through a live Redis: each reports 1."""
    async with gateway_client(redis_url=redis_server.url, **SHARED) as client:
        # Each exchange connects in the background: wait for it (a bound, not a speed check).
        for _ in range(200):
            reported = connected(samples((await client.get("/metrics")).text))
            if reported == [1.0, 1.0, 1.0]:
                break
            await asyncio.sleep(0.05)
        assert reported == [1.0, 1.0, 1.0]


async def test_a_replica_cut_off_from_redis_says_so_and_counts_limits_checked_alone(
    gateway_client, unreachable_redis_url, tmp_path
):
    """Redis away: every exchange reports 0, and each rate-limit check made on the replica's
    own bucket is counted (the limits are loosened meanwhile: AigwRateLimitsLoosened)."""
    keys = tmp_path / "keys.yaml"
    add_key(keys, "acme", ["predict"], key="acme_limited_key_0123456789")
    document = yaml.safe_load(keys.read_text())
    document["tenants"]["acme"] = {"rate_per_s": 100, "burst": 100}
    keys.write_text(yaml.safe_dump(document))
    settings = {"redis_url": unreachable_redis_url, "rate_limit_backend": "redis", **SHARED}
    async with gateway_client(keys_file=keys, **settings) as client:
        headers = {"Authorization": "Bearer acme_limited_key_0123456789"}
        for _ in range(3):
            answer = await client.post("/v1/predictions", json=CHURN_REQUEST, headers=headers)
            assert answer.status_code == 200, answer.text
        metrics = samples((await client.get("/metrics")).text)
    assert connected(metrics) == [0.0, 0.0, 0.0]
    assert value(metrics, "aigw_rate_limit_errors_total") == 3.0


# A worker in miniature again: a gauge family that yields values, then none (a window that
# emptied), and a removed breaker; and the policy version info, whose old version reads 0.
_GONE_WORKER = """
from prometheus_client.core import GaugeMetricFamily
from gateway.telemetry import Metrics, SharedValues

state = {"accuracy": 0.91, "version": "v1"}

class Windows:
    def collect(self):
        accuracy = GaugeMetricFamily("aigw_model_accuracy", "", labels=["model"])
        if state["accuracy"] is not None:
            accuracy.add_metric(["m"], state["accuracy"])
        version = GaugeMetricFamily("aigw_policy_version_info", "", labels=["version"])
        version.add_metric([state["version"]], 1)
        yield accuracy
        yield version

metrics = Metrics()
assert metrics.multiprocess
metrics.shared_values = SharedValues(Windows())
metrics.observe_breaker_change("m/gone", "open")
print(metrics.exposition().decode())
print("-- after --")
state["accuracy"], state["version"] = None, "v2"
metrics.forget_breaker("m/gone")
print(metrics.exposition().decode())
"""


def test_with_several_workers_a_series_that_is_gone_disappears_rather_than_reading_zero(
    tmp_path,
):
    """With one process an emptied window exports no series; with several it did read 0
    (an accuracy of 0%, no drift, for no data) and a removed breaker stayed at its state.
    Both disappear now; an old policy version still reads 0, as its dashboards expect."""
    env = {**os.environ, MULTIPROCESS_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _GONE_WORKER],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    before, after = done.stdout.split("-- after --")
    assert value(samples(before), "aigw_model_accuracy", model="m") == 0.91
    assert value(samples(before), "aigw_breaker_state", target="m/gone") == 2
    assert 'aigw_model_accuracy{model="m"}' not in after
    assert 'aigw_breaker_state{target="m/gone"}' not in after
    assert 'aigw_policy_version_info{version="v1"} 0.0' in after  # present, and 0
    assert value(samples(after), "aigw_policy_version_info", version="v2") == 1
