"""Routing policies: what operators edit in `policies/`, validated as a whole at load.

One YAML file per logical model says which Triton targets serve it, how contract features
become input tensors and output tensors become an answer, how long a request may take,
how each target's breaker behaves, and the fallback chain. A loaded `PolicySet` is an
immutable snapshot: a request keeps the snapshot it started with.

String values may name environment variables as `${NAME}` or `${NAME:-default}`, so one
policy file serves every environment (the demo points it at its own Triton this way).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.contracts import ContractSet
from gateway.problems import FaultsError
from gateway.yaml_files import read_yaml

RULES_STEP = "rules"
STALE_CACHE_STEP = "stale-cache"
DEFAULT_STEP = "default"
BUILTIN_STEPS = (RULES_STEP, STALE_CACHE_STEP, DEFAULT_STEP)
NUMERIC_FEATURE_TYPES = ("integer", "number", "boolean")

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_HOST_PORT = r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$"


class PolicyError(FaultsError):
    """One or more policy files are invalid; `faults` holds `file: field: message` lines."""


# Upper bounds of numeric fields. Each is far above any sensible setting, and keeps every
# number finite and within 64 bits: content hashing (orjson) refuses bigger integers, a sum of
# weights near the float maximum overflows to inf (sending all traffic to one arm), and an
# infinite TTL or timeout cannot become the integer milliseconds Redis and timers take.
MAX_COUNT = 10_000  # breaker counts, as `window`
MAX_CONCURRENCY = 100_000
MAX_CACHE_ENTRIES = 100_000_000
MAX_TTL_S = 366 * 86_400  # a year
MAX_RESET_TIMEOUT_S = 86_400  # a day
MAX_CALL_MS = 600_000  # as `timeout_ms`: no call lasts longer
MAX_WEIGHT = 1_000_000
MAX_SCALE = 1e9  # |scale| and |offset|: a float32 tensor still holds any sensible feature
MAX_OUTPUT_INDEX = 1_000_000
MAX_PORT = 65_535


class _Strict(BaseModel):
    # No NaN or infinity in any float: each would load and then behave unlike what the file
    # says (a NaN scale sends NaN tensors, an infinite weight takes every request).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FeatureInput(_Strict):
    """One contract feature placed in an input tensor, as `value * scale + offset`."""

    feature: str
    scale: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE)
    offset: float = Field(default=0.0, ge=-MAX_SCALE, le=MAX_SCALE)


class TensorInput(_Strict):
    """One Triton input tensor, built from contract features in the order given."""

    name: str
    dtype: Literal["FP32", "FP64", "INT32", "INT64"] = "FP32"
    features: list[FeatureInput] = Field(min_length=1)

    @field_validator("features", mode="before")
    @classmethod
    def _plain_names_allowed(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"feature": v} if isinstance(v, str) else v for v in value]
        return value


class TensorOutput(_Strict):
    """Where the positive-class probability is in Triton's answer."""

    name: str = "probability"
    index: int = Field(default=0, ge=0, le=MAX_OUTPUT_INDEX)


class Labels(_Strict):
    """How a probability becomes the `prediction` label."""

    threshold: float = Field(default=0.5, ge=0, le=1)
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)

    def label(self, probability: float) -> str:
        return self.positive if probability >= self.threshold else self.negative


class BreakerConfig(_Strict):
    """When a target's breaker opens, how long it stays open and how it closes again.

    It opens on `failure_threshold` failures in a row, or once `min_calls` calls are in the
    window, on a failure rate or a slow-call rate at or above the configured share.
    """

    failure_threshold: int = Field(default=5, ge=1, le=MAX_COUNT)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    slow_call_ms: float = Field(default=1000, gt=0, le=MAX_CALL_MS)
    slow_call_rate: float = Field(default=1.0, gt=0, le=1)
    window: int = Field(default=20, ge=1, le=MAX_COUNT)
    min_calls: int = Field(default=10, ge=1, le=MAX_COUNT)
    reset_timeout_s: float = Field(default=5.0, gt=0, le=MAX_RESET_TIMEOUT_S)
    max_reset_timeout_s: float = Field(default=60.0, gt=0, le=MAX_RESET_TIMEOUT_S)
    success_threshold: int = Field(default=2, ge=1, le=MAX_COUNT)
    half_open_max_calls: int = Field(default=1, ge=1, le=MAX_COUNT)
    # An operator's override. `open`: no call goes to the target, every chain goes on to its
    # next step (reason `breaker_open`): the kill switch for a model answering wrongly with
    # 200s, which no breaker would catch. `closed`: calls always go, whatever they return.
    # Unset: the breaker decides. Set, applied and rolled back as any policy change (validated,
    # audited, reaching every worker and replica).
    force: Literal["open", "closed"] | None = None

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> BreakerConfig:
        if self.max_reset_timeout_s < self.reset_timeout_s:
            raise ValueError("max_reset_timeout_s must be >= reset_timeout_s")
        if self.min_calls > self.window:
            raise ValueError("min_calls must be <= window")
        return self


class BatchingConfig(_Strict):
    """Micro-batching: rows arriving while a batch is in flight go together as the next batch,
    at most `max_delay_ms` after the first of them; a row at an idle target goes at once.
    At most `max_in_flight` batches are on their way to the target at once; past that, rows
    wait for one to return and go in the next (larger) batch.

    With `gather_ms`, a row waits that long for others even at an idle target (as Triton's
    own `max_queue_delay`): for a target with little traffic (a 10% arm), whose calls would
    otherwise carry one row each and cost the backend as much as a full batch."""

    max_delay_ms: float = Field(default=1.0, gt=0, le=10)
    max_batch: int = Field(default=32, ge=2, le=1024)
    max_in_flight: int = Field(default=1, ge=1, le=1024)
    gather_ms: float = Field(default=0.0, ge=0, le=10)


class TritonTarget(_Strict):
    """One model on one Triton server, pinned to a version."""

    kind: Literal["triton"] = "triton"
    url: str = Field(pattern=_HOST_PORT, description="host:port of Triton HTTP")
    # The name goes into the request line to Triton: no spaces, slashes or control characters.
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    version: str = Field(pattern=r"^[0-9]+$")
    inputs: list[TensorInput] = Field(min_length=1)
    output: TensorOutput = TensorOutput()
    max_concurrency: int = Field(default=64, ge=1, le=MAX_CONCURRENCY)
    breaker: BreakerConfig = BreakerConfig()
    batching: BatchingConfig | None = None

    @field_validator("url")
    @classmethod
    def _port_is_a_port(cls, url: str) -> str:
        # Five digits pass the pattern; a port above 65535 would load, then fail every call.
        port = int(url.rsplit(":", 1)[1])
        if not 1 <= port <= MAX_PORT:
            raise ValueError(f"port {port} is not a TCP port (1-{MAX_PORT})")
        return url


class RetryConfig(_Strict):
    """At most one retry of a transient error, and only while retries stay within budget."""

    max_retries: int = Field(default=1, ge=0, le=1)
    budget_ratio: float = Field(default=0.2, ge=0, le=1)


class Arm(_Strict):
    """One arm of an experiment: a share of traffic and the chain that serves it."""

    name: str = Field(pattern=_NAME)
    weight: float = Field(ge=0, le=MAX_WEIGHT)
    chain: list[str] = Field(min_length=1)

    @property
    def primary(self) -> str:
        return self.chain[0]


class Route(_Strict):
    """A CEL condition over `features`, `headers` and `tenant` that sends a request to an arm."""

    name: str = Field(pattern=_NAME)
    when: str = Field(min_length=1, max_length=4096)
    arm: str


class Shadow(_Strict):
    """A target that gets a copy of a share of requests; its answers are compared, never served."""

    target: str
    sample_rate: float = Field(default=1.0, ge=0, le=1)


class CacheConfig(_Strict):
    """Exact-match caching of primary answers, and how long a stale copy may stand in."""

    enabled: bool = True
    ttl_s: float = Field(default=300, gt=0, le=MAX_TTL_S)
    stale_ttl_s: float = Field(default=86_400, ge=0, le=MAX_TTL_S)
    max_entries: int = Field(default=10_000, ge=1, le=MAX_CACHE_ENTRIES)
    per_tenant: bool = False


class Policy(_Strict):
    """Everything the gateway needs to answer for one logical model.

    Either one `chain` serves all traffic (arm `default`), or `arms` split it by weight,
    sticky by the feature named in `sticky_by`; `routes` may override the split.
    """

    model_id: str
    timeout_ms: int = Field(ge=1, le=600_000)
    labels: Labels
    targets: dict[Annotated[str, Field(pattern=_NAME)], TritonTarget] = Field(min_length=1)
    chain: list[str] | None = Field(default=None, min_length=1)
    arms: list[Arm] | None = Field(default=None, min_length=1)
    sticky_by: str | None = None
    routes: list[Route] = []
    shadows: list[Shadow] = []
    # Copies in flight per model, gathering ones included; beyond that copies are dropped.
    shadow_max_concurrency: int = Field(default=64, ge=1, le=1024)
    # Copies to a target that batches gather this long and go as one call (0: each goes as a
    # serving call would), so shadows take few turns from serving calls on a shared backend.
    shadow_batch_window_ms: float = Field(default=50.0, ge=0, le=10_000)
    cache: CacheConfig = CacheConfig()
    retry: RetryConfig = RetryConfig()

    @field_validator("chain")
    @classmethod
    def _chain_is_answerable(cls, chain: list[str] | None, info: ValidationInfo) -> list[str]:
        # `targets` is declared before `chain`, so it is in info.data once it validated;
        # when it did not, its own faults are reported and unknown steps cannot be judged.
        if chain is None:
            return chain  # type: ignore[return-value]
        problem = chain_problem(chain, info.data.get("targets"))
        if problem:
            raise ValueError(problem)
        return chain

    @model_validator(mode="after")
    def _one_way_to_serve(self) -> Policy:
        if (self.chain is None) == (self.arms is None):
            raise ValueError("give either `chain` (one arm) or `arms`, not both or neither")
        return self

    @property
    def arm_list(self) -> list[Arm]:
        """The arms; a `chain` policy has one, `default` (made once per chain: routing asks
        for the arms on every request)."""
        if self.arms is not None:
            return self.arms
        return _default_arm(tuple(self.chain or [DEFAULT_STEP]))

    @property
    def primary(self) -> str:
        return self.arm_list[0].primary

    def arm_model(self, arm: Arm) -> str:
        """What `arm` asks first, as Triton `model:version` (or a built-in step's name).
        An experiment's statistics are kept per arm and arm model: changing the model behind
        an arm (challenger v2 → v3) starts its counts afresh instead of mixing the two."""
        target = self.targets.get(arm.primary)
        return f"{target.model}:{target.version}" if target is not None else arm.primary

    def answer_spec(self, target_name: str) -> str:
        """A digest of everything that shapes `target_name`'s answer to an input: the model
        and version asked, how features become its input tensors, which output is read and
        how a probability becomes a label. Cached answers are keyed by it, so an apply that
        changes any of these (a threshold, a scale) is never answered from entries made
        before; what does not change an answer (its address, its breaker) keeps them."""
        target = self.targets[target_name]
        material = [
            target.model, target.version, [tensor.model_dump() for tensor in target.inputs],
            target.output.model_dump(), self.labels.model_dump(),
        ]  # fmt: skip
        return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


@lru_cache(maxsize=1024)
def _default_arm(chain: tuple[str, ...]) -> list[Arm]:
    """The one arm of a `chain` policy (shared: callers read it, never change it)."""
    return [Arm(name="default", weight=1, chain=list(chain))]


def chain_problem(chain: list[str], targets: Mapping[str, Any] | None) -> str | None:
    """Why a chain cannot serve, or None: unknown or repeated steps, no final default."""
    if targets is not None:
        unknown = [s for s in chain if s not in targets and s not in BUILTIN_STEPS]
        if unknown:
            return f"chain names unknown steps: {', '.join(unknown)}"
    if len(set(chain)) != len(chain):
        return "chain lists a step twice"
    if chain[-1] != DEFAULT_STEP:
        return "chain must end with `default`, so that every request gets an answer"
    return None


def traffic_faults(policy: Policy) -> list[str]:
    """Faults in arms, routes and shadows, each at its field path."""
    faults = []
    arms = policy.arm_list
    for i, arm in enumerate(policy.arms or []):
        problem = chain_problem(arm.chain, policy.targets)
        if problem:
            faults.append(f"arms.{i}.chain: {problem}")
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        faults.append("arms: two arms share a name")
    if sum(arm.weight for arm in arms) <= 0:
        faults.append("arms: the weights add up to nothing")
    faults.extend(
        f"routes.{i}.arm: {route.arm} is not an arm"
        for i, route in enumerate(policy.routes)
        if route.arm not in names
    )
    faults.extend(
        f"shadows.{i}.target: {shadow.target} is not a target"
        for i, shadow in enumerate(policy.shadows)
        if shadow.target not in policy.targets
    )
    # Named twice, a shadow would be sent two copies of a request and a route be reported
    # (audit records, metrics) under a name that does not say which one decided.
    faults.extend(_repeated("shadows", "target", [s.target for s in policy.shadows]))
    faults.extend(_repeated("routes", "name", [r.name for r in policy.routes]))
    faults.extend(
        f"targets.{name}.batching.gather_ms: {target.batching.gather_ms:g} must be below "
        f"timeout_ms ({policy.timeout_ms}), which bounds each call"
        for name, target in policy.targets.items()
        if target.batching is not None and target.batching.gather_ms >= policy.timeout_ms
    )
    if policy.shadows and policy.shadow_batch_window_ms >= policy.timeout_ms:
        faults.append(
            f"shadow_batch_window_ms: {policy.shadow_batch_window_ms:g} must be below "
            f"timeout_ms ({policy.timeout_ms}), which bounds each shadow copy"
        )
    return faults


def _repeated(section: str, field: str, values: list[str]) -> list[str]:
    """A fault for each entry of `section` whose `field` repeats an earlier entry's."""
    first_at: dict[str, int] = {}
    faults = []
    for i, value in enumerate(values):
        if value in first_at:
            faults.append(f"{section}.{i}.{field}: {value} is already {section}.{first_at[value]}")
        first_at.setdefault(value, i)
    return faults


@dataclass(frozen=True)
class PolicySet:
    """An immutable snapshot of every policy, with a content hash for audit and readiness."""

    policies: Mapping[str, Policy]
    version_hash: str

    def get(self, model_id: str) -> Policy | None:
        return self.policies.get(model_id)


def arm_model_changes(
    running: Mapping[str, Policy], proposed: Mapping[str, Policy]
) -> list[dict[str, str]]:
    """Arms kept by `proposed` whose model changes: their experiment statistics start afresh
    (experiments.py), which an operator should know before applying."""
    changes = []
    for model_id, after in sorted(proposed.items()):
        before = running.get(model_id)
        if before is None:
            continue
        arms_before = {arm.name: before.arm_model(arm) for arm in before.arm_list}
        for arm in after.arm_list:
            was, becomes = arms_before.get(arm.name), after.arm_model(arm)
            if was is not None and was != becomes:
                changes.append({"model_id": model_id, "arm": arm.name, "from": was, "to": becomes})
    return changes


def load_policies(
    directory: Path, contracts: ContractSet, env: Mapping[str, str] | None = None
) -> PolicySet:
    """Read and validate every policy in `directory`; raise PolicyError listing every fault."""
    env = env or {}
    faults: list[str] = []
    policies: dict[str, Policy] = {}
    paths = _policy_files(directory, faults)
    for path in paths:
        policy = _load_one(path, env, faults)
        if policy is None:
            continue
        if policy.model_id in policies:
            faults.append(f"{path}: model_id: {policy.model_id} is defined by another file too")
            continue
        faults.extend(f"{path}: {fault}" for fault in traffic_faults(policy))
        faults.extend(f"{path}: {fault}" for fault in contract_faults(policy, contracts))
        policies[policy.model_id] = policy
    faults.extend(
        f"{directory}: model {m} is in the contract but has no policy"
        for m in contracts.models
        if m not in policies and paths
    )
    if faults:
        raise PolicyError(faults)
    return PolicySet(policies=policies, version_hash=_content_hash(policies))


def contract_faults(policy: Policy, contracts: ContractSet) -> list[str]:
    """Faults between a policy and the contract: unknown model, non-numeric tensor features."""
    model = contracts.models.get(policy.model_id)
    if model is None:
        return [f"model_id: {policy.model_id} is not a model of the contract"]
    faults = []
    for target_name, target in policy.targets.items():
        for i, tensor in enumerate(target.inputs):
            for j, item in enumerate(tensor.features):
                kind = model.feature_types.get(item.feature)
                where = f"targets.{target_name}.inputs.{i}.features.{j}"
                if kind is None:
                    faults.append(f"{where}: {item.feature} is not a feature of the contract")
                elif kind not in NUMERIC_FEATURE_TYPES:
                    faults.append(f"{where}: {item.feature} is a {kind}, not a number")
    if policy.sticky_by is not None and policy.sticky_by not in model.feature_types:
        faults.append(f"sticky_by: {policy.sticky_by} is not a feature of the contract")
    faults.extend(_route_faults(policy, model.feature_types))
    return faults


def _route_faults(policy: Policy, feature_types: Mapping[str, str]) -> list[str]:
    from gateway.routing import compile_routes  # routing builds on this module's types

    arm_names = {arm.name for arm in policy.arm_list}
    if any(route.arm not in arm_names for route in policy.routes):
        return []  # traffic_faults names the unknown arm; the conditions wait for a fix
    try:
        compile_routes(policy, feature_types)
    except ValueError as error:
        return [str(error)]
    return []


def expand_environment(value: Any, env: Mapping[str, str]) -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, str):
        return _ENV_REFERENCE.sub(lambda m: _reference_value(m, env), value)
    if isinstance(value, list):
        return [expand_environment(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand_environment(v, env) for k, v in value.items()}
    return value


def _reference_value(match: re.Match[str], env: Mapping[str, str]) -> str:
    """`${NAME}` is NAME's value or ""; `${NAME:-default}` is default when NAME is unset or
    empty, as in POSIX shells and compose files."""
    value = env.get(match.group(1), "")
    if match.group(2) is not None and value == "":
        return match.group(2)
    return value


def yaml_fault(path: Path, error: Exception) -> str:
    """A YAML read error as one `file: line L, column C: problem` line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
    return f"{path}: {where}: cannot be read: {' '.join(str(problem).split())}"


def _policy_files(directory: Path, faults: list[str]) -> list[Path]:
    if not directory.is_dir():
        faults.append(f"{directory}: policies directory not found")
        return []
    paths = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    if not paths:
        faults.append(f"{directory}: no policy files")
    return paths


def _load_one(path: Path, env: Mapping[str, str], faults: list[str]) -> Policy | None:
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        faults.append(yaml_fault(path, error))
        return None
    if not isinstance(raw, dict):
        faults.append(f"{path}: the file must hold a mapping")
        return None
    try:
        policy = Policy.model_validate(expand_environment(raw, env))
    except ValidationError as error:
        faults.extend(f"{path}: {line}" for line in validation_lines(error))
        return None
    if policy.model_id != path.stem:
        faults.append(f"{path}: model_id: {policy.model_id} must match the file name")
        return None
    return policy


def validation_lines(error: ValidationError) -> list[str]:
    """pydantic errors as `field.path: message` lines an operator can act on."""
    return [f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in error.errors()]


def _content_hash(policies: Mapping[str, Policy]) -> str:
    canonical = {k: p.model_dump(mode="json") for k, p in sorted(policies.items())}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
