"""Traffic routing: sticky buckets, the weighted split, canary ramps, routes and shadow sampling."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.contracts import ContractSet, load_contracts
from gateway.policy import Arm, Policy, PolicyError, Route, Shadow, load_policies
from gateway.routing import (
    BUCKETS,
    RouteTable,
    arm_for_bucket,
    bucket_of,
    compile_routes,
)
from tests.conftest import CONDITIONS_RAISING_AT_RUN_TIME, REPO

MODEL = "customer-churn"
CHURN = "customer-churn.yaml"
CUSTOMERS = [f"customer-{i}" for i in range(10_000)]
PREMIUM = {"x-customer-tier": "premium"}


@pytest.fixture(scope="module")
def contracts() -> ContractSet:
    return load_contracts(REPO / "contracts")


@pytest.fixture(scope="module")
def feature_types(contracts: ContractSet) -> dict[str, str]:
    return dict(contracts.models[MODEL].feature_types)


@pytest.fixture(scope="module")
def policy(contracts: ContractSet) -> Policy:
    """The shipped churn policy: control 90 / challenger 10, premium route, logreg shadow."""
    return load_policies(REPO / "policies", contracts, {}).policies[MODEL]


@pytest.fixture(scope="module")
def table(policy: Policy, feature_types: dict[str, str]) -> RouteTable:
    return compile_routes(policy, feature_types)


def variant(policy: Policy, **update: Any) -> Policy:
    """The policy with some fields replaced (no re-validation: the test owns the values)."""
    return policy.model_copy(update=update)


def split(policy: Policy, control: float, challenger: float) -> Policy:
    """The policy with the arms re-weighted and no routes, so only the split decides."""
    arms = [
        arm.model_copy(update={"weight": w})
        for arm, w in zip(policy.arm_list, (control, challenger), strict=True)
    ]
    return variant(policy, arms=arms, routes=[])


def assign(table: RouteTable, customer_id: str | None, headers: dict[str, str] | None = None):
    features: dict[str, Any] = {"tenure_months": 24, "monthly_charges": 89.99}
    if customer_id is not None:
        features["customer_id"] = customer_id
    return table.assign(features, headers or {}, "default", request_id=f"req-{customer_id}")


def arms_of(table: RouteTable, customers: list[str]) -> dict[str, str]:
    return {c: assign(table, c).arm.name for c in customers}


# --- buckets ----------------------------------------------------------------------------------


def test_bucket_of_is_stable_and_in_range():
    """The same (model, value) always gets the same bucket, and every bucket is in [0, BUCKETS)."""
    first = [bucket_of(MODEL, c) for c in CUSTOMERS]
    assert first == [bucket_of(MODEL, c) for c in CUSTOMERS]
    assert all(0 <= b < BUCKETS for b in first)
    assert len(set(first)) > BUCKETS * 0.6  # spread over the range, not a handful of buckets


@pytest.mark.parametrize(
    ("model_id", "sticky_value", "bucket"),
    [
        (MODEL, "12345", 5794),
        (MODEL, "alice", 7389),
        (MODEL, "customer-0", 5610),
        (MODEL, "", 1254),
    ],
)
def test_bucket_of_is_the_same_in_every_process(model_id, sticky_value, bucket):
    """Buckets are fixed values (no per-process hash seed): replicas and restarts agree."""
    assert bucket_of(model_id, sticky_value) == bucket


def test_bucket_of_depends_on_the_model():
    """Two models bucket the same customer independently."""
    same = sum(bucket_of(MODEL, c) == bucket_of("other-model", c) for c in CUSTOMERS[:1000])
    assert same < 20


# --- the weighted split -----------------------------------------------------------------------


def test_shipped_split_is_90_10_within_two_points(policy, table):
    """10,000 distinct customers split between control and challenger 90/10 (±2 points)."""
    assert [(a.name, a.weight) for a in policy.arm_list] == [("control", 90), ("challenger", 10)]
    assigned = [assign(table, c) for c in CUSTOMERS]
    share = sum(a.arm.name == "challenger" for a in assigned) / len(CUSTOMERS)
    assert 0.08 <= share <= 0.12
    assert all(a.route is None for a in assigned)


def test_customers_keep_their_arm_on_repeat_and_after_a_restart(contracts, feature_types, table):
    """Every customer gets the same arm again, and from a freshly loaded and compiled table."""
    first = arms_of(table, CUSTOMERS)
    assert first == arms_of(table, CUSTOMERS)
    reloaded = load_policies(REPO / "policies", contracts, {}).policies[MODEL]
    restarted = compile_routes(reloaded, feature_types)
    assert first == arms_of(restarted, CUSTOMERS)


RAMP = [(99, 1), (95, 5), (75, 25), (50, 50)]


@pytest.mark.parametrize(("before", "after"), list(pairwise(RAMP)), ids=lambda w: f"{w[0]}/{w[1]}")
def test_canary_ramp_moves_only_control_customers_to_challenger(
    policy, feature_types, before, after
):
    """Raising the challenger's weight moves customers only control → challenger, as many as
    the weight change (±1 point)."""
    old = arms_of(compile_routes(split(policy, *before), feature_types), CUSTOMERS)
    new = arms_of(compile_routes(split(policy, *after), feature_types), CUSTOMERS)
    moved = [c for c in CUSTOMERS if old[c] != new[c]]
    assert all((old[c], new[c]) == ("control", "challenger") for c in moved)
    expected = (after[1] - before[1]) / 100
    assert abs(len(moved) / len(CUSTOMERS) - expected) <= 0.01


def arms(*weights: float) -> list[Arm]:
    return [Arm(name=f"arm-{i}", weight=w, chain=["default"]) for i, w in enumerate(weights)]


@pytest.mark.parametrize(
    ("weights", "bucket", "expected"),
    [
        ((90, 10), 0, "arm-0"),
        ((90, 10), 8999, "arm-0"),
        ((90, 10), 9000, "arm-1"),
        ((90, 10), BUCKETS - 1, "arm-1"),
        ((0, 100), 0, "arm-1"),
        ((100, 0), BUCKETS - 1, "arm-0"),
        ((50, 0, 50), 4999, "arm-0"),
        ((50, 0, 50), 5000, "arm-2"),
        ((1, 1, 1), BUCKETS - 1, "arm-2"),
        ((0.1, 0.2, 0.7), BUCKETS - 1, "arm-2"),
        ((1,), 0, "arm-0"),
        ((1,), BUCKETS - 1, "arm-0"),
    ],
)
def test_arm_for_bucket_edges(weights, bucket, expected):
    """The first and last buckets and range boundaries land in the arm the weights say."""
    assert arm_for_bucket(arms(*weights), bucket).name == expected


@pytest.mark.parametrize("weights", [(0, 100), (100, 0), (50, 0, 50), (0, 0, 1), (1, 0, 0)])
def test_zero_weight_arm_is_never_chosen(weights):
    """An arm of weight 0 owns no bucket at all, at either end or in the middle."""
    chosen = {arm_for_bucket(arms(*weights), b).name for b in range(BUCKETS)}
    assert chosen == {f"arm-{i}" for i, w in enumerate(weights) if w > 0}


# --- routes -----------------------------------------------------------------------------------


def test_premium_route_sends_premium_customers_to_challenger_whatever_the_bucket(table):
    """`x-customer-tier: premium` goes to challenger by the premium-tier route, in any bucket."""
    by_split = arms_of(table, CUSTOMERS[:500])
    assert set(by_split.values()) == {"control", "challenger"}  # both arms' buckets are tried
    for customer in by_split:
        assignment = assign(table, customer, PREMIUM)
        assert (assignment.arm.name, assignment.route) == ("challenger", "premium-tier")
        assert assignment.bucket == bucket_of(MODEL, customer)


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-customer-tier": "basic"}, {"x-customer-tier": "Premium"}, {"x-tier": "premium"}],
    ids=["no-header", "basic", "wrong-case", "other-header"],
)
def test_non_matching_header_falls_back_to_the_split(table, headers):
    """Without a matching header the sticky split decides, and no route is named."""
    for customer in CUSTOMERS[:500]:
        assignment = assign(table, customer, headers)
        assert assignment.route is None
        assert assignment.arm == arm_for_bucket(table.policy.arm_list, bucket_of(MODEL, customer))


@pytest.mark.parametrize(
    ("headers", "tenant", "route"),
    [
        ({}, "default", "no-beta"),
        ({"x-beta": "1"}, "acme", "tenant"),
        ({"x-o": "1"}, "t", "no-beta"),
    ],
    ids=["no-headers", "header-present", "other-header"],
)
def test_header_only_routes_hold_as_their_condition_says(
    policy, feature_types, headers, tenant, route
):
    """A route over headers alone holds without any header when its condition says so (its
    verdict for no headers is settled at load), and is evaluated when headers come."""
    no_beta = Route(name="no-beta", when='!("x-beta" in headers)', arm="challenger")
    by_tenant = Route(name="tenant", when='tenant == "acme"', arm="control")
    table = compile_routes(variant(policy, routes=[no_beta, by_tenant]), feature_types)
    features = {"customer_id": "c", "tenure_months": 60, "monthly_charges": 10.0}
    assert table.assign(features, headers, tenant, "r1").route == route


def test_first_matching_route_wins(policy, feature_types):
    """Routes are tried in order: the first whose condition holds names the arm."""
    routes = [
        Route(name="loyal", when="features.tenure_months >= 48", arm="control"),
        Route(name="everyone", when="true", arm="challenger"),
    ]
    table = compile_routes(variant(policy, routes=routes), feature_types)
    features = {"customer_id": "c", "tenure_months": 60, "monthly_charges": 10.0}
    loyal = table.assign(features, {}, "default", "r1")
    newer = table.assign({**features, "tenure_months": 3}, {}, "default", "r2")
    assert (loyal.arm.name, loyal.route) == ("control", "loyal")
    assert (newer.arm.name, newer.route) == ("challenger", "everyone")


@pytest.mark.parametrize("when", CONDITIONS_RAISING_AT_RUN_TIME)
def test_route_failing_at_run_time_does_not_hold(policy, feature_types, when):
    """A route whose condition errors for one request (whatever CEL raises) does not hold:
    the next route or the split decides, and the request is served."""
    routes = [
        Route(name="fragile", when=when, arm="challenger"),
        Route(name="everyone", when="true", arm="control"),
    ]
    table = compile_routes(variant(policy, routes=routes), feature_types)
    features = {"customer_id": "c", "tenure_months": 2, "monthly_charges": 10.0}
    assert table.assign(features, {}, "default", "r1").route == "everyone"


# --- sticky values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sticky_by", "features", "expected"),
    [
        ("customer_id", {"customer_id": "c-42", "tenure_months": 3}, "c-42"),
        ("tenure_months", {"customer_id": "c-42", "tenure_months": 3}, "3"),
        ("customer_id", {"tenure_months": 3}, "req-1"),
        ("customer_id", {"customer_id": None}, "req-1"),
        (None, {"customer_id": "c-42"}, "req-1"),
    ],
    ids=["feature", "numeric-feature", "feature-missing", "feature-null", "no-sticky-by"],
)
def test_sticky_value_is_the_feature_else_the_request_id(
    policy, feature_types, sticky_by, features, expected
):
    """The sticky feature as text when present; otherwise the request id (no stickiness)."""
    table = compile_routes(variant(policy, sticky_by=sticky_by), feature_types)
    assert table.sticky_value(features, "req-1") == expected
    assert table.assign(features, {}, "default", "req-1").sticky_value == expected


# --- shadows ----------------------------------------------------------------------------------


def shadowed(policy: Policy, feature_types, rate: float, customers: list[str]) -> set[str]:
    """The customers whose requests get a churn-logreg shadow copy at `rate`."""
    shadows = [Shadow(target="churn-logreg", sample_rate=rate)]
    table = compile_routes(variant(policy, shadows=shadows), feature_types)
    return {
        c for c in customers if table.shadows_for(assign(table, c), "churn-gbm") == ["churn-logreg"]
    }


@pytest.mark.parametrize(
    ("rate", "low", "high"), [(0.0, 0, 0), (1.0, 10_000, 10_000), (0.25, 2_300, 2_700)]
)
def test_shadows_for_respects_the_sample_rate(policy, feature_types, rate, low, high):
    """0 → no request is shadowed, 1 → every one, 0.25 → about a quarter of 10,000 customers."""
    assert low <= len(shadowed(policy, feature_types, rate, CUSTOMERS)) <= high


def test_shadow_sampling_is_stable_per_customer_and_independent_of_the_arm(policy, feature_types):
    """The same customers are shadowed every time, and the sample cuts across both arms."""
    once = shadowed(policy, feature_types, 0.25, CUSTOMERS)
    assert once == shadowed(policy, feature_types, 0.25, CUSTOMERS)
    table = compile_routes(policy, feature_types)
    arms_shadowed = {assign(table, c).arm.name for c in once}
    assert arms_shadowed == {"control", "challenger"}


@pytest.mark.parametrize(
    ("served_by", "expected"),
    [
        ("churn-gbm", ["churn-logreg"]),
        ("churn-gbm-v2", ["churn-logreg"]),
        ("rules", ["churn-logreg"]),
        ("churn-logreg", []),
    ],
)
def test_shadows_leave_out_the_target_that_served(policy, feature_types, served_by, expected):
    """A shadow is never the target that already answered the request."""
    table = compile_routes(variant(policy, shadows=[Shadow(target="churn-logreg")]), feature_types)
    assert table.shadows_for(assign(table, "c-1"), served_by) == expected


# --- compiling route conditions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "fragments"),
    [
        ("features.tenure_months >", ("does not compile", "<input>:1:25")),
        ('request.ip == "10.0.0.1"', ("refers to unknown variables: request",)),
        ("features.tenure_months + 1", ("must be a boolean condition, gives int",)),
        ('headers["x-tier"]', ("fails on a valid input",)),
        ("[1][features.tenure_months] == 1", ("fails on a valid input",)),
        ("features.tenure_months + 9223372036854775807 > 0", ("fails on a valid input",)),
        (
            "[1].all(a, [1].all(b, [1].exists(c, tenant == 'x')))",
            ("nests comprehensions (all, exists, exists_one, map, filter) 3 deep; at most 2",),
        ),
    ],
    ids=[
        "syntax-error",
        "unknown-variable",
        "not-boolean",
        "fails-on-sample",
        "index-out-of-range-on-sample",
        "overflow-on-sample",
        "comprehensions-three-deep",
    ],
)
def test_compile_routes_refuses_a_broken_condition_naming_the_route(
    policy, feature_types, when, fragments
):
    """A bad `when:` fails compile_routes with `routes.N (name): when: ...` and CEL's reason."""
    routes = [*policy.routes, Route(name="broken", when=when, arm="control")]
    with pytest.raises(ValueError) as caught:
        compile_routes(variant(policy, routes=routes), feature_types)
    message = str(caught.value)
    assert message.startswith("routes.1 (broken): when: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "when",
    [
        'headers.exists(name, name.startsWith("x-customer"))',
        "[1, 2].all(n, n < features.tenure_months + 5)",
        '[3, 4].map(n, n * 2).exists(m, m > 7) && tenant != ""',
        '"x.exists(q, q)" != "" && [1].exists(n, n == 1)',  # a macro inside a string binds none
    ],
)
def test_a_condition_may_use_the_variables_its_comprehensions_bind(policy, feature_types, when):
    """A macro's iteration variable is bound by the macro, not an unknown name."""
    routes = [*policy.routes, Route(name="iterating", when=when, arm="control")]
    compile_routes(variant(policy, routes=routes), feature_types)


def test_an_unknown_name_inside_a_comprehension_is_still_refused(policy, feature_types):
    routes = [*policy.routes, Route(name="broken", when="[1].exists(n, n == q)", arm="control")]
    with pytest.raises(ValueError, match="refers to unknown variables: q"):
        compile_routes(variant(policy, routes=routes), feature_types)


# --- policy faults in arms, routes and shadows ------------------------------------------------


def shipped_policy() -> dict[str, Any]:
    """The shipped churn policy as plain data, with its YAML anchors unshared."""
    return json.loads(json.dumps(yaml.safe_load((REPO / "policies" / CHURN).read_text())))


def set_in(doc: dict[str, Any], *path: Any, value: Any) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


TRAFFIC_FAULTS = [
    pytest.param(
        lambda d: set_in(d, "routes", 0, "arm", value="gold"),
        "routes.0.arm: gold is not an arm",
        id="unknown-route-arm",
    ),
    pytest.param(
        lambda d: set_in(d, "shadows", 0, "target", value="churn-xgb"),
        "shadows.0.target: churn-xgb is not a target",
        id="unknown-shadow-target",
    ),
    pytest.param(
        lambda d: set_in(d, "arms", 1, "name", value="control"),
        "arms: two arms share a name",
        id="duplicate-arm-names",
    ),
    pytest.param(
        lambda d: d["shadows"].append(dict(d["shadows"][0])),
        "shadows.1.target: churn-logreg is already shadows.0",
        id="duplicate-shadow-targets",
    ),
    pytest.param(
        lambda d: d["routes"].append({**d["routes"][0], "arm": "control"}),
        "routes.1.name: premium-tier is already routes.0",
        id="duplicate-route-names",
    ),
    pytest.param(
        lambda d: [set_in(d, "arms", i, "weight", value=0) for i in (0, 1)],
        "arms: the weights add up to nothing",
        id="zero-total-weight",
    ),
    pytest.param(
        lambda d: set_in(d, "sticky_by", value="customer_name"),
        "sticky_by: customer_name is not a feature of the contract",
        id="sticky-by-not-a-feature",
    ),
    pytest.param(
        lambda d: set_in(d, "arms", 1, "chain", value=["churn-xgb", "default"]),
        "arms.1.chain: chain names unknown steps: churn-xgb",
        id="unknown-arm-chain-step",
    ),
    pytest.param(
        lambda d: set_in(d, "routes", 0, "when", value="tenant.size > 3 &&"),
        "routes.0 (premium-tier): when: does not compile",
        id="broken-route-condition",
    ),
]


@pytest.mark.parametrize(("mutation", "expected"), TRAFFIC_FAULTS)
def test_traffic_faults_are_refused_as_file_field_message(data_dirs, contracts, mutation, expected):
    """Each broken arm, route, shadow or sticky_by fails the load as `file: field: message`."""
    doc = shipped_policy()
    mutation(doc)
    path = data_dirs / "policies" / CHURN
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policies(data_dirs / "policies", contracts, {})
    faults = caught.value.faults
    assert [f for f in faults if f.startswith(f"{path}: {expected}")], "\n".join(faults)


def test_rewritten_shipped_policy_loads(data_dirs, contracts):
    """Control for the table: the shipped policy re-written unchanged loads without faults."""
    path: Path = data_dirs / "policies" / CHURN
    path.write_text(yaml.safe_dump(shipped_policy(), sort_keys=False), encoding="utf-8")
    assert load_policies(data_dirs / "policies", contracts, {}).get(MODEL) is not None
