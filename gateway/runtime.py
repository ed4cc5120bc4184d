"""The gateway's loaded world: contracts, policies, fallbacks and a guarded backend per target.

Built once at start-up from Settings (all files validated as a whole before anything
serves) and closed at shutdown. Request handlers read it; they never load files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import pybreaker

from gateway.backends.triton import TritonBackend
from gateway.contracts import ContractSet, load_contracts
from gateway.fallback import TargetGuard
from gateway.policy import PolicySet, load_policies
from gateway.resilience import Breaker, Bulkhead, RetryBudget
from gateway.rules import Fallbacks, load_fallbacks
from gateway.settings import Settings

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
class Runtime:
    """Everything a request needs: the configuration and a guarded backend per target."""

    settings: Settings
    config: Configuration
    guards: dict[str, dict[str, TargetGuard]]
    readiness: dict[str, str] = field(default_factory=dict)

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
    def backends(self) -> list[TritonBackend]:
        return [g.backend for by_target in self.guards.values() for g in by_target.values()]

    @property
    def breakers(self) -> dict[str, Breaker]:
        return {
            g.breaker.name: g.breaker
            for by_target in self.guards.values()
            for g in by_target.values()
        }

    async def refresh_readiness(self) -> None:
        """Ask every backend whether its pinned model is ready; record it for /readyz."""
        names = [f"{m}/{t}" for m, by_target in self.guards.items() for t in by_target]
        results = await asyncio.gather(*(b.is_ready() for b in self.backends))
        self.readiness = {
            n: ("ok" if ok else "unavailable") for n, ok in zip(names, results, strict=True)
        }

    @property
    def ready(self) -> bool:
        return bool(self.readiness) and all(v == "ok" for v in self.readiness.values())

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)


def start_runtime(settings: Settings, config: Configuration) -> Runtime:
    """One guarded backend per policy target; call inside the event loop (clients bind to it)."""
    listener = _BreakerLog()
    guards: dict[str, dict[str, TargetGuard]] = {}
    for model_id, policy in config.policies.policies.items():
        retry_ratio = policy.retry.budget_ratio if policy.retry.max_retries else 0.0
        guards[model_id] = {}
        for name, target in policy.targets.items():
            breaker = Breaker(f"{model_id}/{name}", target.breaker)
            breaker.add_listener(listener)
            guards[model_id][name] = TargetGuard(
                backend=TritonBackend(name, target),
                breaker=breaker,
                bulkhead=Bulkhead(target.max_concurrency),
                retry_budget=RetryBudget(retry_ratio),
                model_version=target.version,
            )
    return Runtime(settings, config, guards)
