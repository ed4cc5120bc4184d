"""Prometheus metrics (prefix `aigw_`), with label sets bounded by configuration.

Labels take only values the operator configured (model ids, arm and target names, chain
steps, a fixed set of reasons and events), never a request's id or features, so the number
of series is fixed by the policies. Hot-path updates are single counter increments; totals
the gateway already keeps (audit records written, cache errors) are read
at scrape time by a collector instead of being counted twice. The hot path looks label
children up in a small per-metric dict (`_Children`) rather than through `labels()`.

Each app has its own registry, so several apps in one process (tests) do not collide.

Several workers (`aigw serve --workers N`): prometheus-client's multiprocess mode, switched
on by `PROMETHEUS_MULTIPROC_DIR` (the supervisor sets it before any worker starts). Counters
and histograms then live in per-process files that every worker's /metrics sums, so any
worker answers a scrape with the totals of all, and a worker that dies keeps its counts.
Scrape-time values (audit totals, readiness, drift) are copied into those files by each
worker every second (`SharedValues`); each gauge says how workers combine (`GAUGE_MODES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pybreaker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.monitoring import Monitor
    from gateway.pipeline import Answer
    from gateway.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Rows per micro-batched Triton call: powers of two up to the largest batch a target allows.
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Label sets a `_Children` keeps per metric. Configuration gives far fewer (models x arms x
# steps x outcomes); past this a label is carrying unbounded values (a bug), and the cache
# is emptied rather than grown. prometheus-client keeps its own children regardless.
MAX_CACHED_CHILDREN = 1024
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How several workers' values of a gauge combine into one series (live: dead workers drop
# out). A breaker is as bad as its worst worker; the gateway is ready when every worker is.
# Drift and accuracy: every worker measures the windows of all (its own and its siblings',
# shared_statistics.py), so their values agree up to a second's lag: the highest is exported,
# sample sizes included (summing them would count each answer once per worker).
GAUGE_MODES = {
    "aigw_breaker_state": "livemax",
    "aigw_ready": "livemin",
    "aigw_policy_version_info": "livemax",
    "aigw_audit_spill_bytes": "livesum",
    "aigw_shared_state_connected": "livemin",  # 0 while any worker is cut off
}
DEFAULT_GAUGE_MODE = "livemax"
# With several workers, a gauge series that no longer exists is written as GONE (NaN) and
# left out of the exposition; these families say "no" with 0 instead.
GONE = math.nan
ZERO_WHEN_GONE = frozenset({"aigw_policy_version_info"})


def multiprocess_mode() -> bool:
    """Whether this process is one of several workers sharing metrics files."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class _Children(Generic[MetricT]):
    """One metric's label children by label values, for the per-request path.

    `labels()` takes the metric's lock, str()s every value into a new tuple and re-checks
    the label count on every call; a dict hit skips all that. The cached object is the very
    child `labels()` returns, in multiprocess mode too (its value is the per-process mmap
    file, which prometheus-client re-opens in place after a fork). A cached child would go
    stale if its label set were removed from the metric (`remove`): whoever removes one
    `forget`s it here too. Dict reads
    and writes are atomic, so threads may share it: a race only makes a second `labels()`
    call, which returns the same child.
    """

    __slots__ = ("_by_values", "_metric")

    def __init__(self, metric: MetricT) -> None:
        self._metric = metric
        self._by_values: dict[tuple[str, ...], MetricT] = {}

    def __call__(self, *values: str) -> MetricT:
        child = self._by_values.get(values)
        return child if child is not None else self._add(values)

    def __len__(self) -> int:
        return len(self._by_values)

    def forget(self, *values: str) -> None:
        """Drop the cached child of a label set the metric no longer has."""
        self._by_values.pop(values, None)

    def _add(self, values: tuple[str, ...]) -> MetricT:
        if len(self._by_values) >= MAX_CACHED_CHILDREN:
            self._by_values.clear()  # bounded: a leaking label costs lookups, not memory
        child = self._metric.labels(*values)
        self._by_values[values] = child
        return child


class Metrics:
    """Every metric the gateway exports, registered in one registry."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_values: SharedValues | None = None
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
        # Rows per call the micro-batcher (gateway/batching.py) sends: 1s mean no batch forms.
        self.batch_rows = Histogram(
            "aigw_backend_batch_rows", "Rows per micro-batched call to a backend target.",
            ["target"], buckets=BATCH_ROWS_BUCKETS, registry=r,
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
            ["target"], registry=r, multiprocess_mode=GAUGE_MODES["aigw_breaker_state"],
        )  # fmt: skip
        self.breaker_transitions = Counter(
            "aigw_breaker_transitions", "Breaker state changes.", ["target", "to"], registry=r
        )
        self.shadows = Counter(
            "aigw_shadow_comparisons", "Shadow answers compared with served ones.",
            ["model", "target", "result"], registry=r,
        )  # fmt: skip
        # A counter of the metrics, not of the shadow runner: a reload replaces every model's
        # runner, and a total read from the live runners would fall back to zero.
        self.shadow_dropped = Counter(
            "aigw_shadow_dropped",
            "Shadow copies never compared: dropped at the bound, or cancelled by a reload or "
            "shutdown.", ["model"], registry=r,
        )  # fmt: skip
        self.policy_reloads = Counter(
            "aigw_policy_reloads", "Policy changes, applied or refused as invalid.",
            ["outcome"], registry=r,
        )  # fmt: skip
        # Callbacks of asynchronous predictions (gateway/callbacks.py), by outcome: delivered,
        # retry (an attempt that will be repeated), rejected, refused (not a public address),
        # exhausted, dropped.
        self.callbacks = Counter(
            "aigw_callback_deliveries", "Callback deliveries and retried attempts, by outcome.",
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
        # Stream workers (gateway/worker.py): the backlog of each model's request stream.
        self.stream_lag = Gauge(
            "aigw_stream_lag", "Request stream entries not yet delivered to the workers.",
            ["model"], registry=r,
        )  # fmt: skip
        self.stream_pending = Gauge(
            "aigw_stream_pending", "Request stream entries delivered and not yet acknowledged.",
            ["model"], registry=r,
        )  # fmt: skip
        self.stream_dead_letters = Counter(
            "aigw_stream_dead_letters", "Request stream entries moved to the dead-letter stream.",
            ["model"], registry=r,
        )  # fmt: skip
        self.stream_jobs = Counter(
            "aigw_stream_jobs", "Stream entries handled by this worker, by outcome.",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        # Jobs of the in-process backend (gateway/job_memory.py) given up on: a bug, since
        # outages are retried. Stream jobs given up on are aigw_stream_dead_letters.
        self.jobs_failed = Counter(
            "aigw_jobs_failed",
            "In-process jobs that failed and will never be answered.",
            registry=r,
        )
        self._cache_children()

    def _cache_children(self) -> None:
        """Cached children of the metrics updated per request or per event; the others are
        touched rarely and keep using `labels()`. Per instance, as the registry is."""
        self._requests = _Children(self.requests)
        self._latency = _Children(self.latency)
        self._backend_latency = _Children(self.backend_latency)
        self._batch_rows = _Children(self.batch_rows)
        self._fallbacks = _Children(self.fallbacks)
        self._cache = _Children(self.cache)
        self._shadows = _Children(self.shadows)
        self._stream_jobs = _Children(self.stream_jobs)
        self._stream_dead_letters = _Children(self.stream_dead_letters)
        self._stream_lag = _Children(self.stream_lag)
        self._stream_pending = _Children(self.stream_pending)
        self._callbacks = _Children(self.callbacks)
        self._breaker_state = _Children(self.breaker_state)
        self._breaker_transitions = _Children(self.breaker_transitions)

    def observe_answer(self, model_id: str, answer: Answer) -> None:
        degraded = "true" if answer.degraded else "false"
        cached = "true" if answer.cached else "false"
        self._requests(model_id, answer.arm, answer.served_by, degraded, cached).inc()
        self._latency(model_id).observe(answer.latency_ms / 1000)
        if answer.degraded:
            reason = answer.fallback_reason or "none"
            self._fallbacks(model_id, answer.served_by, reason).inc()

    def observe_cache(self, event: str) -> None:
        self._cache(event).inc()

    def observe_backend_call(self, target: str, outcome: str, seconds: float) -> None:
        self._backend_latency(target, outcome).observe(seconds)

    def observe_batch(self, target: str, rows: int) -> None:
        """One call of the micro-batcher to `target`, carrying `rows` requests' rows."""
        self._batch_rows(target).observe(rows)

    def observe_shadow(self, model_id: str, target: str, agreed: bool | None) -> None:
        result = "failed" if agreed is None else ("agree" if agreed else "disagree")
        self._shadows(model_id, target, result).inc()

    def shadow_dropped_counter(self, model_id: str) -> Callable[[], None]:
        """What a model's shadow runner calls for each copy it drops."""
        return self.shadow_dropped.labels(model_id).inc

    def observe_stream_job(self, model_id: str, outcome: str) -> None:
        """`outcome` is one of gateway.worker.OUTCOMES (a fixed set)."""
        self._stream_jobs(model_id, outcome).inc()
        if outcome in ("rejected", "dead"):
            self._stream_dead_letters(model_id).inc()

    def observe_stream_backlog(self, model_id: str, lag: int, pending: int) -> None:
        self._stream_lag(model_id).set(lag)
        self._stream_pending(model_id).set(pending)

    def observe_job_failed(self) -> None:
        self.jobs_failed.inc()

    def observe_callback(self, outcome: str) -> None:
        """`outcome` is one of the fixed outcomes of gateway.callbacks."""
        self._callbacks(outcome).inc()

    def observe_breaker_change(self, target: str, state: str) -> None:
        """`state` is a pybreaker state name (closed, half-open, open)."""
        self._breaker_state(target).set(BREAKER_STATES.get(state, 0))
        self._breaker_transitions(target, state).inc()

    def forget_breaker(self, target: str) -> None:
        """A breaker a policy apply removed: its state is no longer exported (left at its
        last value, an open one would fire AigwBreakerOpenTooLong until a restart). With
        several workers a series cannot be removed (prometheus-client's multiprocess mode):
        it is set to GONE, which the exposition leaves out."""
        if self.multiprocess:
            self._breaker_state(target).set(GONE)
            return
        with contextlib.suppress(KeyError):
            self.breaker_state.remove(target)
        self._breaker_state.forget(target)

    def breaker_listener(self) -> pybreaker.CircuitBreakerListener:
        return _BreakerMetrics(self)

    def watch(self, runtime_of: Callable[[], Runtime | None]) -> None:
        """Export totals the runtime keeps itself, read at scrape time (or, with several
        workers, copied into the shared files by `publish_forever`)."""
        collector = _RuntimeCollector(runtime_of)
        if self.multiprocess:
            self.shared_values = SharedValues(collector)
        else:
            self.registry.register(collector)

    async def publish_forever(self, interval_s: float = 1.0) -> None:
        """With several workers: keep this worker's scrape-time values in the shared files."""
        while self.shared_values is not None:
            self.shared_values.publish()
            await asyncio.sleep(interval_s)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        if self.shared_values is not None:
            self.shared_values.publish()  # this worker's freshest; siblings' at most 1 s old
        combined = CollectorRegistry()
        combined.register(_WithoutGoneSeries(MultiProcessCollector(None)))
        return generate_latest(combined)


class SharedValues:
    """One worker's scrape-time values, kept in prometheus-client's multiprocess files.

    Counter families become real counters, incremented by what changed since the last
    publish (so a restarted worker adds to the total rather than resetting it); gauge
    families become gauges combined by `GAUGE_MODES`. A label set that disappears (a window
    that emptied, a removed breaker) cannot be removed from the files: it is set to NaN, which
    the exposition leaves out (`_WithoutGoneSeries`), so it disappears as it does with one
    process, instead of reading 0 (an accuracy of 0, no drift) for what has no data.
    `aigw_policy_version_info` is the exception: 0 there says "not the version running".
    """

    def __init__(self, collector: Collector) -> None:
        self._collector = collector
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._counted: dict[tuple[str, tuple[str, ...]], float] = {}
        self._gauge_labels: dict[str, set[tuple[str, ...]]] = {}

    def publish(self) -> None:
        for family in self._collector.collect():
            if family.type == "counter":
                self._publish_counter(family)
            else:
                self._publish_gauge(family)

    def _publish_counter(self, family: Metric) -> None:
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # `_created` samples: the shared counter keeps its own
            labels = tuple(sample.labels.values())
            counter = self._counters.get(family.name)
            if counter is None:
                counter = Counter(family.name, family.documentation, list(sample.labels),
                                  registry=None)  # fmt: skip
                self._counters[family.name] = counter
            previous = self._counted.get((family.name, labels), 0.0)
            if sample.value > previous:
                (counter.labels(*labels) if labels else counter).inc(sample.value - previous)
                self._counted[(family.name, labels)] = sample.value

    def _publish_gauge(self, family: Metric) -> None:
        seen = set()
        for sample in family.samples:
            labels = tuple(sample.labels.values())
            gauge = self._gauge(family, list(sample.labels))
            (gauge.labels(*labels) if labels else gauge).set(sample.value)
            seen.add(labels)
        gone_value = 0.0 if family.name in ZERO_WHEN_GONE else GONE
        for gone in self._gauge_labels.get(family.name, set()) - seen:
            gauge = self._gauges[family.name]
            (gauge.labels(*gone) if gone else gauge).set(gone_value)
        self._gauge_labels[family.name] = seen

    def _gauge(self, family: Metric, label_names: list[str]) -> Gauge:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            mode = GAUGE_MODES.get(family.name, DEFAULT_GAUGE_MODE)
            gauge = Gauge(family.name, family.documentation, label_names, registry=None,
                          multiprocess_mode=mode)  # type: ignore[arg-type]  # fmt: skip
            self._gauges[family.name] = gauge
        return gauge


class _WithoutGoneSeries(Collector):
    """The merged multiprocess metrics without the gauge series written as GONE."""

    def __init__(self, merged: Collector) -> None:
        self._merged = merged

    def collect(self) -> Iterator[Metric]:
        for family in self._merged.collect():
            if family.type == "gauge":
                family.samples = [s for s in family.samples if not math.isnan(s.value)]
            yield family


class _BreakerMetrics(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def state_change(self, cb, old_state, new_state) -> None:  # type: ignore[no-untyped-def]
        # pybreaker notifies before it stores the state: read the new one from `new_state`.
        self._metrics.observe_breaker_change(cb.name, new_state.name)


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
        yield _counter(
            "aigw_rate_limit_errors",
            "Rate-limit checks made on this replica's own bucket because Redis failed "
            "(limits loosened meanwhile).",
            getattr(runtime.rate_limiter, "errors", 0),
        )
        if runtime.shared_state:
            yield _shared_state(runtime.shared_state)
        audit = runtime.audit
        if audit is not None:
            yield _counter("aigw_audit_records_written", "Audit records written.", audit.written)
            yield _counter("aigw_audit_write_errors", "Audit write failures.", audit.write_errors)
            # Records per write call shows group commit at work; inline writes, the idle path.
            yield _counter("aigw_audit_write_calls", "write(2) calls that took audit records.",
                           getattr(audit, "batches", 0))  # fmt: skip
            inline = getattr(audit, "inline_writes", 0)
            yield _counter("aigw_audit_inline_writes", "Audit records written by their own "
                           "request while the writer thread was idle.", inline)  # fmt: skip
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


def _monitor_of_all_workers(runtime: Runtime) -> Monitor:
    """This worker's health windows, with its siblings' when there are several workers (a
    few small files, read once a second by `publish_forever` and at a scrape)."""
    shared = runtime.shared_statistics
    if shared is None:
        return runtime.monitor
    return runtime.monitor.combined(published.windows for published in shared.siblings())


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
    runtime.monitor.forget_idle(now)  # this worker's own streams, which it also publishes
    monitor = _monitor_of_all_workers(runtime)
    for model_id in runtime.policies.policies:
        for version, arms in monitor.health(model_id, now)["versions"].items():
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


def _shared_state(exchanges: Mapping[str, Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "aigw_shared_state_connected",
        "1 while this process reaches the Redis it shares this state with other replicas "
        "through; 0 while it works on its own (local breakers, policies, statistics).",
        labels=["component"],
    )
    for component, exchange in sorted(exchanges.items()):
        family.add_metric([component], int(bool(exchange.connected)))
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, labels: dict[str, str], value: float):  # type: ignore[no-untyped-def]
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family
