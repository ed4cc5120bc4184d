"""What a proposed policy would do to recorded traffic, without calling any model.

Each recorded input is routed by the running policy and by the proposed one; the report
counts how many requests would change arm, primary target or chain. Inputs are prediction
requests or audit records. In audit records `x-pii` features are pseudonymised; a
pseudonym is as stable as the value it replaces, so the sticky assignment it yields
differs from the real one, but identically under both policies: the comparison holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.routing import RouteTable


@dataclass
class ModelChanges:
    requests: int = 0
    arm_changed: int = 0
    target_changed: int = 0
    chain_changed: int = 0
    moves: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "arm_changed": self.arm_changed,
            "target_changed": self.target_changed,
            "chain_changed": self.chain_changed,
            "moves": dict(sorted(self.moves.items())),
        }


@dataclass
class SimulationReport:
    inputs: int = 0
    skipped: int = 0
    models: dict[str, ModelChanges] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "skipped": self.skipped,
            "models": {m: c.to_dict() for m, c in sorted(self.models.items())},
        }


def simulate(
    running: Mapping[str, RouteTable],
    proposed: Mapping[str, RouteTable],
    inputs: Iterable[Mapping[str, Any]],
) -> SimulationReport:
    """Route every input under both policies and count what would change."""
    report = SimulationReport()
    for index, item in enumerate(inputs):
        report.inputs += 1
        model_id, features = item.get("model_id"), item.get("features")
        if model_id not in running or model_id not in proposed or not isinstance(features, dict):
            report.skipped += 1
            continue
        headers = item.get("headers") if isinstance(item.get("headers"), dict) else {}
        tenant = str(item.get("tenant", "default"))
        request_id = str(item.get("prediction_id", index))
        before = running[model_id].assign(features, headers, tenant, request_id)
        after = proposed[model_id].assign(features, headers, tenant, request_id)
        changes = report.models.setdefault(model_id, ModelChanges())
        changes.requests += 1
        if before.arm.name != after.arm.name:
            changes.arm_changed += 1
            move = f"{before.arm.name} -> {after.arm.name}"
            changes.moves[move] = changes.moves.get(move, 0) + 1
        changes.target_changed += before.arm.primary != after.arm.primary
        changes.chain_changed += before.arm.chain != after.arm.chain
    return report
