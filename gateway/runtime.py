"""The gateway's loaded world: contracts, policies, fallbacks and a guarded backend per target.

Built once at start-up from Settings (all files validated as a whole before anything
serves) and closed at shutdown. Request handlers read it; they never load files.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pybreaker
from pydantic import SecretStr

from gateway.audit import AuditLocked, AuditLog, check_no_other_writer, worker_log_directory
from gateway.audit_forwarder import STREAM, AuditForwarder
from gateway.auth import KeyStore
from gateway.backends.triton import TritonBackend
from gateway.cache import MemoryCache, PredictionCache, RedisCache, SingleFlight
from gateway.contracts import ContractSet, load_contracts
from gateway.experiments import Experiments
from gateway.fallback import TargetGuard
from gateway.judged_predictions import JudgedPredictions
from gateway.monitoring import Baseline, Monitor, load_baselines
from gateway.policy import Policy, PolicySet, TritonTarget, load_policies
from gateway.problems import FaultsError
from gateway.rate_limit import MemoryRateLimiter, RedisRateLimiter, SharedRateLimiter
from gateway.replica_statistics import ReplicaStatistics
from gateway.resilience import Breaker, Bulkhead, RetryBudget, TripHook
from gateway.routing import RouteTable, compile_routes
from gateway.rules import Fallbacks, labels_of, load_fallbacks
from gateway.settings import Settings
from gateway.shadow import ShadowRunner
from gateway.shared_decisions import SharedDecisions
from gateway.shared_statistics import SharedStatistics
from gateway.telemetry import BREAKER_STATES, Metrics
from gateway.tracing import Tracing, tracing_from

log = logging.getLogger("gateway.runtime")


class _BreakerLog(pybreaker.CircuitBreakerListener):
    """Every breaker state change is an event operators want to see."""

    def state_change(self, cb, old_state, new_state) -> None:  # type: ignore[no-untyped-def]
        log.warning(
            "breaker state changed",
            extra={
                "target": cb.name,
                "from": getattr(old_state, "name", None),
                "to": new_state.name,
            },
        )


@dataclass(frozen=True)
class Configuration:
    """Every operator-edited file, loaded and checked as a whole."""

    contracts: ContractSet
    policies: PolicySet
    fallbacks: Mapping[str, Fallbacks]


def load_configuration(settings: Settings, env: Mapping[str, str]) -> Configuration:
    """Load contracts, policies and fallbacks; raise ContractError, PolicyError or
    FallbackError listing every fault, so nothing is ever half-loaded."""
    contracts = load_contracts(settings.contracts_dir)
    policies = load_policies(settings.policies_dir, contracts, env)
    return Configuration(
        contracts=contracts,
        policies=policies,
        fallbacks=load_fallbacks(settings.fallbacks_dir, contracts, labels_of(policies)),
    )


@dataclass
class ModelRuntime:
    """One logical model's live parts: serving guards, shadows and routes."""

    guards: dict[str, TargetGuard]
    routes: RouteTable
    shadows: ShadowRunner
    answer_specs: dict[str, str]  # target → Policy.answer_spec, for cache keys


@dataclass(frozen=True)
class Snapshot:
    """A configuration and the live parts built from it: what one request runs on.

    A reload builds a new snapshot and swaps it in with one assignment; a request keeps the
    snapshot it started with, so it finishes on the configuration it began under.
    """

    config: Configuration
    models: Mapping[str, ModelRuntime]

    @property
    def contracts(self) -> ContractSet:
        return self.config.contracts

    @property
    def policies(self) -> PolicySet:
        return self.config.policies

    @property
    def fallbacks(self) -> Mapping[str, Fallbacks]:
        return self.config.fallbacks


@dataclass
class Runtime:
    """Everything a request needs: the current snapshot, and what outlives snapshots."""

    settings: Settings
    snapshot: Snapshot
    cache: PredictionCache
    single_flight: SingleFlight = field(default_factory=SingleFlight)
    experiments: Experiments = field(default_factory=Experiments)
    readiness: dict[str, str] = field(default_factory=dict)
    audit: AuditLog | None = None
    metrics: Metrics = field(default_factory=Metrics)
    key_store: KeyStore | None = None
    audit_forwarder: Any = None  # AuditForwarder when the audit log is shipped to a stream
    # What this process shares with other replicas through Redis, by component (`breakers`,
    # `policies`, `statistics`): objects whose `connected` says whether it reaches Redis now.
    shared_state: dict[str, Any] = field(default_factory=dict)
    tracing: Tracing = field(default_factory=lambda: tracing_from(Settings()))
    monitor: Monitor = field(default_factory=lambda: Monitor({}))
    rate_limiter: MemoryRateLimiter | RedisRateLimiter | SharedRateLimiter = field(
        default_factory=MemoryRateLimiter
    )
    # With several workers or replicas: the others' statistics, for reports of all the traffic.
    shared_statistics: SharedStatistics | ReplicaStatistics | None = None
    # With several workers: which predictions any of them judged (one outcome each).
    judged: JudgedPredictions | None = None
    # With the audit stream: every replica's decisions, for feedback that reaches this one.
    shared_decisions: SharedDecisions | None = None
    _retired: list[ModelRuntime] = field(default_factory=list)
    _trip_hooks: list[TripHook] = field(default_factory=list)
    _new_breaker_hooks: list[Callable[[Breaker], object]] = field(default_factory=list)

    @property
    def config(self) -> Configuration:
        return self.snapshot.config

    @property
    def models(self) -> Mapping[str, ModelRuntime]:
        return self.snapshot.models

    @property
    def contracts(self) -> ContractSet:
        return self.snapshot.contracts

    @property
    def policies(self) -> PolicySet:
        return self.snapshot.policies

    @property
    def fallbacks(self) -> Mapping[str, Fallbacks]:
        return self.snapshot.fallbacks

    @property
    def guards(self) -> dict[str, dict[str, TargetGuard]]:
        return {model_id: model.guards for model_id, model in self.models.items()}

    @property
    def backends(self) -> list[TritonBackend]:
        return [g.backend for model in self.models.values() for g in model.guards.values()]

    @property
    def breakers(self) -> dict[str, Breaker]:
        return {
            g.breaker.name: g.breaker
            for model in self.models.values()
            for g in model.guards.values()
        }

    async def start_shipping_audit(self, replica: str) -> None:
        """With an audit stream configured, ship this process's log to it as `replica`."""
        self.audit_forwarder = audit_forwarder(self.settings, replica)
        if self.audit_forwarder is not None:
            await self.audit_forwarder.start()

    def start_publishing_statistics(self) -> asyncio.Task | None:
        """With other workers or replicas to share with, publish this process's experiment
        and health statistics once a second (the task sends the last counts as it stops)."""
        if self.shared_statistics is None:
            return None
        publishing = self.shared_statistics.publish_forever(
            lambda: (self.experiments, self.monitor)
        )
        return asyncio.create_task(publishing, name="statistics-publish")

    def on_breaker_trip(self, hook: TripHook) -> None:
        """Call `hook(breaker, open_for_s)` when any serving breaker opens on its own
        evidence: today's breakers and those of every policy applied later."""
        self._trip_hooks.append(hook)
        for breaker in self.breakers.values():
            breaker.on_trip(hook)

    def on_new_breaker(self, hook: Callable[[Breaker], object]) -> None:
        """Call `hook(breaker)` for each serving breaker a later policy apply creates (not
        for today's, nor for those an apply keeps)."""
        self._new_breaker_hooks.append(hook)

    def swap(self, config: Configuration) -> None:
        """Serve `config` from now on; targets whose spec is unchanged keep their breakers."""
        previous = self.snapshot
        self.snapshot = build_snapshot(config, self.metrics, previous)
        if isinstance(self.cache, MemoryCache):  # an apply may resize it, as a start would
            self.cache.resize(memory_cache_size(config))
        for breaker in _new_breakers(previous, self.snapshot):  # kept ones have their hooks
            for trip_hook in self._trip_hooks:
                breaker.on_trip(trip_hook)
            for hook in self._new_breaker_hooks:
                hook(breaker)
        for name in _breaker_names(previous) - _breaker_names(self.snapshot):
            self.metrics.forget_breaker(name)
        kept = {id(g) for m in self.models.values() for g in _all_guards(m)}
        retired = [m for m in previous.models.values() if not _all_kept(m, kept)]
        self._retired.extend(retired)  # closed at shutdown if still open then
        # Requests that started on the old snapshot may still use retired clients: close
        # them only after the longest request budget has passed. Each swap closes what it
        # retired itself, judged by what it kept: a second swap within the grace retires
        # parts the first one kept, which the first one's close must leave alone.
        grace_s = max((p.timeout_ms for p in previous.policies.policies.values()), default=0)
        asyncio.get_running_loop().call_later(
            grace_s / 1000 + 1.0,
            lambda: asyncio.ensure_future(self._close_retired(retired, kept)),
        )

    async def _close_retired(self, retired: list[ModelRuntime], kept: set[int]) -> None:
        closing = {id(m) for m in retired}
        self._retired = [m for m in self._retired if id(m) not in closing]
        backends = [g.backend for m in retired for g in _all_guards(m) if id(g) not in kept]
        await asyncio.gather(*(m.shadows.close() for m in retired), return_exceptions=True)
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)

    async def refresh_readiness(self) -> None:
        """Ask every backend whether its pinned model is ready; record it for /readyz."""
        names = [f"{m}/{t}" for m, model in self.models.items() for t in model.guards]
        results = await asyncio.gather(*(b.is_ready() for b in self.backends))
        self.readiness = {
            n: ("ok" if ok else "unavailable") for n, ok in zip(names, results, strict=True)
        }

    @property
    def backends_ready(self) -> bool:
        return bool(self.readiness) and all(v == "ok" for v in self.readiness.values())

    @property
    def ready(self) -> bool:
        """Ready to take traffic: policies are loaded, and backends too where settings ask."""
        return self.backends_ready or not self.settings.readiness_requires_backends

    async def close(self) -> None:
        models = [*self.models.values(), *self._retired]
        await asyncio.gather(*(m.shadows.close() for m in models))
        backends = {id(g.backend): g.backend for m in models for g in _all_guards(m)}
        await asyncio.gather(*(b.close() for b in backends.values()), return_exceptions=True)
        await self.cache.close()
        await self.rate_limiter.close()
        if self.shared_decisions is not None:
            await self.shared_decisions.close()
        if self.audit is not None:
            await self.audit.close()  # flushes and fsyncs every record


def start_runtime(
    settings: Settings,
    config: Configuration,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    baselines: dict[str, Baseline] | None = None,
) -> Runtime:
    """Build the live parts; call inside the event loop (clients bind to it)."""
    metrics = metrics or Metrics()
    snapshot = build_snapshot(config, metrics)
    runtime = Runtime(
        settings, snapshot, cache=_cache(settings, config), metrics=metrics,
        tracing=tracing or tracing_from(settings),
    )  # fmt: skip
    runtime.monitor = Monitor(baselines if baselines is not None else baselines_of(settings))
    if settings.keys_file is not None:
        runtime.key_store = KeyStore(settings.keys_file)
    if settings.rate_limit_backend == "redis":
        if not settings.redis_url:
            raise ValueError("AIGW_RATE_LIMIT_BACKEND=redis needs AIGW_REDIS_URL")
        runtime.rate_limiter = RedisRateLimiter(settings.redis_url)
    elif settings.workers_dir is not None:  # one of several workers: share their buckets
        runtime.rate_limiter = SharedRateLimiter(settings.workers_dir / "rate-limits")
    runtime.shared_statistics = _shared_statistics(settings, runtime.monitor)
    if isinstance(runtime.shared_statistics, ReplicaStatistics):
        runtime.shared_state["statistics"] = runtime.shared_statistics
    if runtime.shared_statistics is not None:
        runtime.monitor = runtime.shared_statistics.restore(runtime.experiments, runtime.monitor)
    if settings.workers_dir is not None and settings.worker_index is not None:
        runtime.judged = JudgedPredictions(settings.workers_dir)
    if settings.audit_stream_url and settings.shared_decisions_ttl_s:
        runtime.shared_decisions = SharedDecisions(
            settings.audit_stream_url, settings.shared_decisions_ttl_s, stream=STREAM
        )
    return runtime


def _shared_statistics(
    settings: Settings, monitor: Monitor
) -> SharedStatistics | ReplicaStatistics | None:
    """Replicas share through Redis when asked to (the workers of each are replicas too);
    else the workers of one `aigw serve --workers N` share through their directory."""
    if settings.share_statistics:
        if not settings.redis_url:
            raise ValueError("AIGW_SHARE_STATISTICS=true needs AIGW_REDIS_URL")
        longest_window_s = max(monitor.drift_window_s, monitor.quality_window_s)
        return ReplicaStatistics(settings.redis_url, stale_after_s=longest_window_s)
    if settings.workers_dir is not None and settings.worker_index is not None:
        return SharedStatistics(settings.workers_dir, settings.worker_index)
    return None


def build_snapshot(
    config: Configuration,
    metrics: Metrics,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Live parts for `config`, reusing the previous snapshot's guards for unchanged targets."""
    listeners = (_BreakerLog(), metrics.breaker_listener())
    reusable = _reusable_guards(previous)
    models: dict[str, ModelRuntime] = {}
    for model_id, policy in config.policies.policies.items():
        guards = _guards(model_id, policy, listeners, reusable)
        for guard in guards.values():
            metrics.breaker_state.labels(guard.breaker.name).set(
                BREAKER_STATES[guard.breaker.state]
            )
        # Shadows get clients and breakers of their own: they must not touch serving's.
        shadow_guards = _guards(
            f"{model_id}/shadow", policy, listeners, reusable, only=_shadow_names(policy),
            gather_s=policy.shadow_batch_window_ms / 1000,
        )  # fmt: skip
        for guard in (*guards.values(), *shadow_guards.values()):
            if isinstance(guard.backend, TritonBackend):
                guard.backend.report_batches(metrics.observe_batch)
        feature_types = config.contracts.models[model_id].feature_types
        models[model_id] = ModelRuntime(
            guards=guards,
            routes=compile_routes(policy, feature_types),
            shadows=ShadowRunner(
                shadow_guards,
                policy.shadow_max_concurrency,
                policy.timeout_ms / 1000,
                on_drop=metrics.shadow_dropped_counter(model_id),
            ),
            answer_specs={name: policy.answer_spec(name) for name in policy.targets},
        )
    return Snapshot(config=config, models=models)


def _reusable_guards(previous: Snapshot | None) -> dict[tuple, TargetGuard]:
    """Guards by (breaker name, target spec, retry budget ratio) from the previous snapshot."""
    if previous is None:
        return {}
    reusable = {}
    for model in previous.models.values():
        for guard in _all_guards(model):
            backend: TritonBackend = guard.backend  # type: ignore[assignment]
            ratio = guard.retry_budget.ratio
            key = _guard_key(guard.breaker.name, backend.target, ratio, backend.gather_s)
            reusable[key] = guard
    return reusable


def _guard_key(
    breaker_name: str, target: TritonTarget, retry_ratio: float, gather_s: float
) -> tuple:
    return (breaker_name, target.model_dump_json(), retry_ratio, gather_s)


def _new_breakers(previous: Snapshot, current: Snapshot) -> list[Breaker]:
    """The serving breakers `current` has that `previous` had not (an apply created them)."""
    before = {id(g.breaker) for m in previous.models.values() for g in m.guards.values()}
    return [
        g.breaker
        for m in current.models.values()
        for g in m.guards.values()
        if id(g.breaker) not in before
    ]


def _breaker_names(snapshot: Snapshot) -> set[str]:
    """Every breaker of `snapshot`, serving and shadow, by the name its metrics carry."""
    return {g.breaker.name for m in snapshot.models.values() for g in _all_guards(m)}


def _all_guards(model: ModelRuntime) -> list[TargetGuard]:
    return [*model.guards.values(), *model.shadows.guards.values()]


def _all_kept(model: ModelRuntime, kept: set[int]) -> bool:
    return all(id(g) in kept for g in _all_guards(model))


def check_audit_log_free(settings: Settings) -> None:
    """FaultsError naming the directory when another process writes this process's log."""
    try:
        check_no_other_writer(worker_log_directory(settings.audit_dir, settings.worker_index))
    except AuditLocked as error:
        raise FaultsError([f"AIGW_AUDIT_DIR: {error}"]) from None


def audit_log(settings: Settings) -> AuditLog:
    """The embedded audit sink; keys from settings, else random for this process only."""
    key, checkpoint_key = settings.audit_key, settings.audit_checkpoint_key
    if not (
        key and key.get_secret_value() and checkpoint_key and checkpoint_key.get_secret_value()
    ):
        log.warning("audit keys not set: using random keys valid for this process only")
    return AuditLog(
        worker_log_directory(settings.audit_dir, settings.worker_index),
        key=_key_bytes(key),
        checkpoint_key=_key_bytes(checkpoint_key),
        rotate_bytes=settings.audit_rotate_bytes,
    )


def audit_forwarder(settings: Settings, replica: str) -> AuditForwarder | None:
    """The shipper of this process's audit log to the stream, when one is configured.

    `replica` names the log's writer in the stream: one name per log, the same across
    restarts (a consumer rebuilds each writer's chain by it)."""
    if not settings.audit_stream_url:
        return None
    return AuditForwarder(
        worker_log_directory(settings.audit_dir, settings.worker_index),
        settings.audit_stream_url,
        replica=replica,
        retention_s=settings.audit_stream_retention_s,
        decisions_ttl_s=settings.shared_decisions_ttl_s,
    )


def _key_bytes(secret: SecretStr | None) -> bytes:
    """The key's bytes; an unset or empty key gets a random one (an empty HMAC key is no key)."""
    value = secret.get_secret_value() if secret is not None else ""
    return value.encode() if value else secrets.token_bytes(32)


def _shadow_names(policy: Policy) -> set[str]:
    return {shadow.target for shadow in policy.shadows}


def _guards(
    prefix: str,
    policy: Policy,
    listeners: tuple[pybreaker.CircuitBreakerListener, ...],
    reusable: Mapping[tuple, TargetGuard],
    only: set | None = None,
    gather_s: float = 0.0,
) -> dict[str, TargetGuard]:
    retry_ratio = policy.retry.budget_ratio if policy.retry.max_retries else 0.0
    guards = {}
    for name, target in policy.targets.items():
        if only is not None and name not in only:
            continue
        breaker_name = f"{prefix}/{name}"
        kept = reusable.get(_guard_key(breaker_name, target, retry_ratio, gather_s))
        guards[name] = kept or _new_guard(
            breaker_name, name, target, retry_ratio, listeners, gather_s
        )
    return guards


def _new_guard(
    breaker_name: str,
    name: str,
    target: TritonTarget,
    retry_ratio: float,
    listeners: tuple[pybreaker.CircuitBreakerListener, ...],
    gather_s: float,
) -> TargetGuard:
    breaker = Breaker(breaker_name, target.breaker)
    for listener in listeners:
        breaker.add_listener(listener)
    return TargetGuard(
        backend=TritonBackend(name, target, gather_s),
        breaker=breaker,
        bulkhead=Bulkhead(target.max_concurrency),
        retry_budget=RetryBudget(retry_ratio),
        model_version=target.version,
    )


def baselines_of(settings: Settings) -> dict[str, Baseline]:
    """Drift baselines; without the folder, none (monitoring then reports `no_baseline`)."""
    if not settings.baselines_dir.is_dir():
        log.warning(
            "no baselines directory: drift is not measured",
            extra={"dir": str(settings.baselines_dir)},
        )
        return {}
    return load_baselines(settings.baselines_dir)


def _cache(settings: Settings, config: Configuration) -> PredictionCache:
    if settings.cache_backend == "redis":
        if not settings.redis_url:
            raise ValueError("AIGW_CACHE_BACKEND=redis needs AIGW_REDIS_URL")
        return RedisCache(settings.redis_url)
    return MemoryCache(max_entries=memory_cache_size(config))


def memory_cache_size(config: Configuration) -> int:
    """The in-memory cache holds as many entries as the largest policy's `max_entries`."""
    return max((p.cache.max_entries for p in config.policies.policies.values()), default=1)
