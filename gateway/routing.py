"""Traffic routing: which arm serves a request, and which shadows get a copy.

Assignment is sticky and consistent. A request's sticky value (the feature the policy names
in `sticky_by`, such as `customer_id`) is hashed with the model id into one of 10,000
buckets, and arms own contiguous bucket ranges in policy order. The same customer therefore
lands in the same arm on every replica and after every restart, and moving weight between
arms (a canary ramp: 1 → 5 → 25 → 100) moves only the customers in the buckets that change
hands. Routes, CEL conditions over features, headers and tenant, override the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.expressions import compile_condition, holds, sample_features
from gateway.policy import Arm, Policy

BUCKETS = 10_000
ROUTE_VARIABLES = ("features", "headers", "tenant")
PRIVATE_HEADERS = frozenset({"x-api-key"})  # never offered to route conditions


def routing_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers route conditions may read: `x-` headers, lower-cased, bounded in size.

    `pairs` are (lower-case name, value) in request order; of a repeated header the last one
    counts. A synchronous request, a job submitted over HTTP and a stream entry all carry
    exactly these, so a route picks the same arm for the same request however it came."""
    return {
        name: value[:256]
        for name, value in pairs
        if name.startswith("x-") and len(name) <= 64 and name not in PRIVATE_HEADERS
    }


def bucket_of(model_id: str, sticky_value: str) -> int:
    """A stable bucket in [0, BUCKETS) for one sticky value of one model."""
    digest = hashlib.sha256(f"{model_id}\x00{sticky_value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def arm_for_bucket(arms: Sequence[Arm], bucket: int) -> Arm:
    """The arm whose cumulative-weight range holds `bucket` (arms in policy order)."""
    total = sum(arm.weight for arm in arms)
    upper = 0.0
    for arm in arms:
        upper += arm.weight
        if bucket < upper / total * BUCKETS:
            return arm
    return arms[-1]  # rounding at the very top


def sampled(model_id: str, sticky_value: str, salt: str, rate: float) -> bool:
    """A stable yes/no with probability `rate`, independent of the arm split (`salt`)."""
    if rate >= 1.0:
        return True
    return bucket_of(f"{model_id}\x00{salt}", sticky_value) < rate * BUCKETS


@dataclass(frozen=True)
class Assignment:
    """The arm chosen for a request, and why: a route's name, or the weighted split."""

    arm: Arm
    route: str | None
    bucket: int
    sticky_value: str


@dataclass(frozen=True)
class RouteTable:
    """A policy's arms with its route conditions compiled."""

    policy: Policy
    routes: tuple[tuple[str, Any, Arm], ...]
    # Per route: the variables its condition reads, and its (constant) verdict for a request
    # without routing headers when it reads nothing but `headers` (else None).
    variables: tuple[tuple[str, ...], ...] = field(init=False)
    without_headers: tuple[bool | None, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(
            tuple(v for v in ROUTE_VARIABLES if v in program.variables())
            for _, program, _ in self.routes
        )
        verdicts = tuple(
            holds(program, {"headers": {}}) if read in ((), ("headers",)) else None
            for (_, program, _), read in zip(self.routes, names, strict=True)
        )
        object.__setattr__(self, "variables", names)
        object.__setattr__(self, "without_headers", verdicts)

    def assign(
        self,
        features: Mapping[str, Any],
        headers: Mapping[str, str],
        tenant: str,
        request_id: str,
    ) -> Assignment:
        """Pick the arm: the first route whose condition holds, else the sticky split."""
        sticky_value = self.sticky_value(features, request_id)
        bucket = bucket_of(self.policy.model_id, sticky_value)
        if self.routes:
            route = self._matching_route(features, headers, tenant)
            if route is not None:
                name, _, arm = route
                return Assignment(arm=arm, route=name, bucket=bucket, sticky_value=sticky_value)
        arm = arm_for_bucket(self.policy.arm_list, bucket)
        return Assignment(arm=arm, route=None, bucket=bucket, sticky_value=sticky_value)

    def _matching_route(
        self, features: Mapping[str, Any], headers: Mapping[str, str], tenant: str
    ) -> tuple[str, Any, Arm] | None:
        """The first route whose condition holds. CEL runs only for a route whose verdict
        is not known already, and is given only the variables the condition reads."""
        values = {"features": features, "headers": headers, "tenant": tenant}
        for index, route in enumerate(self.routes):
            verdict = None if headers else self.without_headers[index]
            if verdict is None:
                context = {name: values[name] for name in self.variables[index]}
                verdict = holds(route[1], _plain(context))
            if verdict:
                return route
        return None

    def sticky_value(self, features: Mapping[str, Any], request_id: str) -> str:
        """The policy's sticky feature as text, or the request id (no stickiness) without one."""
        key = self.policy.sticky_by
        if key is not None and features.get(key) is not None:
            return str(features[key])
        return request_id

    def shadows_for(self, assignment: Assignment, served_by: str) -> list[str]:
        """Shadow targets sampled for this request, leaving out the one that answered."""
        return [
            shadow.target
            for shadow in self.policy.shadows
            if shadow.target != served_by
            and sampled(
                self.policy.model_id, assignment.sticky_value, shadow.target, shadow.sample_rate
            )
        ]


def compile_routes(policy: Policy, feature_types: Mapping[str, str]) -> RouteTable:
    """Compile and check every route condition; ValueError names the route at fault."""
    arms = {arm.name: arm for arm in policy.arm_list}
    sample = {"features": sample_features(feature_types), "headers": {}, "tenant": "sample"}
    compiled = []
    for index, route in enumerate(policy.routes):
        try:
            program = compile_condition(route.when, ROUTE_VARIABLES, sample)
        except ValueError as error:
            raise ValueError(f"routes.{index} ({route.name}): when: {error}") from None
        compiled.append((route.name, program, arms[route.arm]))
    return RouteTable(policy=policy, routes=tuple(compiled))


def _plain(context: Mapping[str, Any]) -> dict[str, Any]:
    """The context with plain dicts, the one mapping type CEL takes."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in context.items()}
