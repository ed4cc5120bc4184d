"""The gateway's loaded world: contracts, policies, fallbacks and a guarded backend per target.

Built once at start-up from Settings (all files validated as a whole before anything
serves) and closed at shutdown. Request handlers read it; they never load files.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import pybreaker
from pydantic import SecretStr

from gateway.audit import AuditLog
from gateway.backends.triton import TritonBackend
from gateway.cache import MemoryCache, PredictionCache, RedisCache, SingleFlight
from gateway.contracts import ContractSet, load_contracts
from gateway.experiments import Experiments
from gateway.fallback import TargetGuard
from gateway.policy import Policy, PolicySet, load_policies
from gateway.resilience import Breaker, Bulkhead, RetryBudget
from gateway.routing import RouteTable, compile_routes
from gateway.rules import Fallbacks, load_fallbacks
from gateway.settings import Settings
from gateway.shadow import ShadowRunner
from gateway.telemetry import Metrics

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
    return Configuration(
        contracts=contracts,
        policies=load_policies(settings.policies_dir, contracts, env),
        fallbacks=load_fallbacks(settings.fallbacks_dir, contracts),
    )


@dataclass
class ModelRuntime:
    """One logical model's live parts: serving guards, shadows and routes."""

    guards: dict[str, TargetGuard]
    routes: RouteTable
    shadows: ShadowRunner


@dataclass
class Runtime:
    """Everything a request needs: the configuration and the live parts built from it."""

    settings: Settings
    config: Configuration
    models: dict[str, ModelRuntime]
    cache: PredictionCache
    single_flight: SingleFlight = field(default_factory=SingleFlight)
    experiments: Experiments = field(default_factory=Experiments)
    readiness: dict[str, str] = field(default_factory=dict)
    audit: AuditLog | None = None
    metrics: Metrics = field(default_factory=Metrics)
    _shadow_backends: list[TritonBackend] = field(default_factory=list)

    @property
    def contracts(self) -> ContractSet:
        return self.config.contracts

    @property
    def policies(self) -> PolicySet:
        return self.config.policies

    @property
    def fallbacks(self) -> Mapping[str, Fallbacks]:
        return self.config.fallbacks

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

    async def refresh_readiness(self) -> None:
        """Ask every backend whether its pinned model is ready; record it for /readyz."""
        names = [f"{m}/{t}" for m, model in self.models.items() for t in model.guards]
        results = await asyncio.gather(*(b.is_ready() for b in self.backends))
        self.readiness = {
            n: ("ok" if ok else "unavailable") for n, ok in zip(names, results, strict=True)
        }

    @property
    def ready(self) -> bool:
        return bool(self.readiness) and all(v == "ok" for v in self.readiness.values())

    async def close(self) -> None:
        await asyncio.gather(*(m.shadows.close() for m in self.models.values()))
        backends = self.backends + self._shadow_backends
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)
        await self.cache.close()
        if self.audit is not None:
            await self.audit.close()  # flushes and fsyncs every record


def start_runtime(
    settings: Settings, config: Configuration, metrics: Metrics | None = None
) -> Runtime:
    """Build the live parts; call inside the event loop (clients bind to it)."""
    metrics = metrics or Metrics()
    listeners = (_BreakerLog(), metrics.breaker_listener())
    models: dict[str, ModelRuntime] = {}
    shadow_backends: list[TritonBackend] = []
    for model_id, policy in config.policies.policies.items():
        guards = _guards(model_id, policy, listeners)
        for guard in guards.values():
            metrics.breaker_state.labels(guard.breaker.name).set(0)
        # Shadows get clients and breakers of their own: they must not touch serving's.
        shadow_guards = _guards(f"{model_id}/shadow", policy, listeners, only=_shadow_names(policy))
        shadow_backends.extend(g.backend for g in shadow_guards.values())  # type: ignore[misc]
        feature_types = config.contracts.models[model_id].feature_types
        models[model_id] = ModelRuntime(
            guards=guards,
            routes=compile_routes(policy, feature_types),
            shadows=ShadowRunner(
                shadow_guards, policy.shadow_max_concurrency, policy.timeout_ms / 1000
            ),
        )
    runtime = Runtime(settings, config, models, cache=_cache(settings, config), metrics=metrics)
    runtime._shadow_backends = shadow_backends
    return runtime


def audit_log(settings: Settings) -> AuditLog:
    """The embedded audit sink; keys from settings, else random for this process only."""
    key, checkpoint_key = settings.audit_key, settings.audit_checkpoint_key
    if key is None or checkpoint_key is None:
        log.warning("audit keys not set: using random keys valid for this process only")
    return AuditLog(
        settings.audit_dir,
        key=_key_bytes(key),
        checkpoint_key=_key_bytes(checkpoint_key),
        rotate_bytes=settings.audit_rotate_bytes,
    )


def _key_bytes(secret: SecretStr | None) -> bytes:
    return secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32)


def _shadow_names(policy: Policy) -> set[str]:
    return {shadow.target for shadow in policy.shadows}


def _guards(
    prefix: str,
    policy: Policy,
    listeners: tuple[pybreaker.CircuitBreakerListener, ...],
    only: set | None = None,
) -> dict[str, TargetGuard]:
    retry_ratio = policy.retry.budget_ratio if policy.retry.max_retries else 0.0
    guards = {}
    for name, target in policy.targets.items():
        if only is not None and name not in only:
            continue
        breaker = Breaker(f"{prefix}/{name}", target.breaker)
        for listener in listeners:
            breaker.add_listener(listener)
        guards[name] = TargetGuard(
            backend=TritonBackend(name, target),
            breaker=breaker,
            bulkhead=Bulkhead(target.max_concurrency),
            retry_budget=RetryBudget(retry_ratio),
            model_version=target.version,
        )
    return guards


def _cache(settings: Settings, config: Configuration) -> PredictionCache:
    if settings.cache_backend == "redis":
        if not settings.redis_url:
            raise ValueError("AIGW_CACHE_BACKEND=redis needs AIGW_REDIS_URL")
        return RedisCache(settings.redis_url)
    largest = max((p.cache.max_entries for p in config.policies.policies.values()), default=1)
    return MemoryCache(max_entries=largest)
