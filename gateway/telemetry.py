"""Prometheus metrics (prefix `aigw_`), with label sets bounded by configuration.

Labels take only values the operator configured (model ids, arm and target names, chain
steps, a fixed set of reasons and events), never a request's id or features, so the number
of series is fixed by the policies. Hot-path updates are single counter increments; totals
the gateway already keeps (audit records written, cache errors, shadows dropped) are read
at scrape time by a collector instead of being counted twice.

Each app has its own registry, so several apps in one process (tests) do not collide.
Several uvicorn workers each expose their own /metrics; run one worker per container
(scale with replicas) or scrape each worker. prometheus-client's multiprocess mode is not
wired yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pybreaker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.pipeline import Answer
    from gateway.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Every metric the gateway exports, registered in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aigw_requests", "Answered predictions.",
            ["model", "arm", "served_by", "degraded", "cached"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "aigw_request_duration_seconds", "Time from request to answer, in the gateway.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.backend_latency = Histogram(
            "aigw_backend_duration_seconds", "Duration of calls to a backend target.",
            ["target", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "aigw_fallbacks", "Answers given by a step after the primary, by why.",
            ["model", "served_by", "reason"], registry=r,
        )  # fmt: skip
        self.cache = Counter(
            "aigw_cache_events", "Cache lookups: hit, miss, bypass; coalesced misses.",
            ["event"], registry=r,
        )  # fmt: skip
        self.breaker_state = Gauge(
            "aigw_breaker_state", "Breaker state per target: 0 closed, 1 half-open, 2 open.",
            ["target"], registry=r,
        )  # fmt: skip
        self.breaker_transitions = Counter(
            "aigw_breaker_transitions", "Breaker state changes.", ["target", "to"], registry=r
        )
        self.shadows = Counter(
            "aigw_shadow_comparisons", "Shadow answers compared with served ones.",
            ["model", "target", "result"], registry=r,
        )  # fmt: skip
        self.policy_reloads = Counter(
            "aigw_policy_reloads", "Policy changes, applied or refused as invalid.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "aigw_rate_limited_requests", "Requests refused for a tenant's rate limit.",
            ["tenant"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "aigw_rejected_requests", "Requests refused with a problem, by status.",
            ["status"], registry=r,
        )  # fmt: skip

    def observe_answer(self, model_id: str, answer: Answer) -> None:
        degraded = "true" if answer.degraded else "false"
        cached = "true" if answer.cached else "false"
        self.requests.labels(model_id, answer.arm, answer.served_by, degraded, cached).inc()
        self.latency.labels(model_id).observe(answer.latency_ms / 1000)
        if answer.degraded:
            reason = answer.fallback_reason or "none"
            self.fallbacks.labels(model_id, answer.served_by, reason).inc()

    def observe_cache(self, event: str) -> None:
        self.cache.labels(event).inc()

    def observe_backend_call(self, target: str, outcome: str, seconds: float) -> None:
        self.backend_latency.labels(target, outcome).observe(seconds)

    def observe_shadow(self, model_id: str, target: str, agreed: bool | None) -> None:
        result = "failed" if agreed is None else ("agree" if agreed else "disagree")
        self.shadows.labels(model_id, target, result).inc()

    def breaker_listener(self) -> pybreaker.CircuitBreakerListener:
        return _BreakerMetrics(self)

    def watch(self, runtime_of: Callable[[], Runtime | None]) -> None:
        """Export totals the runtime keeps itself, read at scrape time."""
        self.registry.register(_RuntimeCollector(runtime_of))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _BreakerMetrics(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def state_change(self, cb, old_state, new_state) -> None:  # type: ignore[no-untyped-def]
        # pybreaker notifies before it stores the state: read the new one from `new_state`.
        self._metrics.breaker_state.labels(cb.name).set(BREAKER_STATES.get(new_state.name, 0))
        self._metrics.breaker_transitions.labels(cb.name, new_state.name).inc()


class _RuntimeCollector(Collector):
    def __init__(self, runtime_of: Callable[[], Runtime | None]) -> None:
        self._runtime_of = runtime_of

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        runtime = self._runtime_of()
        if runtime is None:
            return
        yield _gauge("aigw_policy_version_info", "Policy version this replica runs.",
                     {"version": runtime.policies.version_hash}, 1)  # fmt: skip
        yield _gauge(
            "aigw_ready", "1 when every backend is ready.", {}, int(runtime.backends_ready)
        )
        yield _counter("aigw_cache_errors", "Cache store errors (requests served uncached).",
                       getattr(runtime.cache, "errors", 0))  # fmt: skip
        yield _counter("aigw_cache_coalesced", "Misses that shared another's backend call.",
                       runtime.single_flight.coalesced)  # fmt: skip
        dropped = sum(m.shadows.dropped for m in runtime.models.values())
        yield _counter("aigw_shadow_dropped", "Shadow copies dropped at the bound.", dropped)
        audit = runtime.audit
        if audit is not None:
            yield _counter("aigw_audit_records_written", "Audit records written.", audit.written)
            yield _counter("aigw_audit_write_errors", "Audit write failures.", audit.write_errors)
            yield _counter("aigw_audit_refused", "Answers refused: no audit record possible.",
                           getattr(audit, "refused", 0))  # fmt: skip
        yield from _model_health(runtime)
        forwarder = getattr(runtime, "audit_forwarder", None)
        if forwarder is not None:
            yield _counter("aigw_audit_forwarded", "Audit lines shipped to the stream.",
                           forwarder.forwarded)  # fmt: skip
            yield _counter("aigw_audit_forward_errors", "Failed attempts to ship audit lines.",
                           forwarder.errors)  # fmt: skip
            yield _gauge("aigw_audit_spill_bytes", "Audit bytes on local disk not yet shipped.",
                         {}, forwarder.pending_bytes())  # fmt: skip


def _model_health(runtime: Runtime) -> Iterator:
    """Drift and live quality per model version and arm, from the monitor's windows."""
    feature_psi = GaugeMetricFamily(
        "aigw_model_feature_psi", "Population stability index of a feature over the window.",
        labels=["model", "version", "arm", "feature"],
    )  # fmt: skip
    prediction_psi = GaugeMetricFamily(
        "aigw_model_prediction_psi", "Population stability index of the predicted probability.",
        labels=["model", "version", "arm"],
    )  # fmt: skip
    drift_samples = GaugeMetricFamily(
        "aigw_model_drift_sample_size", "Answers in the drift window.",
        labels=["model", "version", "arm"],
    )  # fmt: skip
    accuracy = GaugeMetricFamily(
        "aigw_model_accuracy", "Accuracy from feedback over the quality window.",
        labels=["model", "version", "arm"],
    )  # fmt: skip
    feedback_samples = GaugeMetricFamily(
        "aigw_model_feedback_sample_size", "Outcomes in the quality window.",
        labels=["model", "version", "arm"],
    )  # fmt: skip
    now = time.time()
    for model_id in runtime.policies.policies:
        for version, arms in runtime.monitor.health(model_id, now)["versions"].items():
            for arm, stream in arms.items():
                labels = [model_id, version, arm]
                drift, quality = stream["drift"], stream["quality"]
                if drift is not None:
                    drift_samples.add_metric(labels, drift["sample_size"])
                    for feature, entry in drift["features"].items():
                        if entry["psi"] is not None:
                            feature_psi.add_metric([*labels, feature], entry["psi"])
                    if drift.get("prediction") and drift["prediction"]["psi"] is not None:
                        prediction_psi.add_metric(labels, drift["prediction"]["psi"])
                feedback_samples.add_metric(labels, quality["sample_size"])
                if quality["accuracy"] is not None:
                    accuracy.add_metric(labels, quality["accuracy"])
    yield from (feature_psi, prediction_psi, drift_samples, accuracy, feedback_samples)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, labels: dict[str, str], value: float):  # type: ignore[no-untyped-def]
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family
