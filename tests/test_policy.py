"""Policy files: the shipped ones load, broken ones fail with `file: field: message` faults."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.contracts import ContractSet, load_contracts
from gateway.policy import (
    Policy,
    PolicyError,
    arm_model_changes,
    expand_environment,
    load_policies,
)

REPO = Path(__file__).resolve().parents[1]
CHURN = "customer-churn.yaml"


@pytest.fixture(scope="module")
def contracts() -> ContractSet:
    return load_contracts(REPO / "contracts")


def shipped_policy() -> dict[str, Any]:
    """The shipped churn policy as plain data, with its YAML anchors unshared."""
    return json.loads(json.dumps(yaml.safe_load((REPO / "policies" / CHURN).read_text())))


def faults_of(directory: Path, contracts: ContractSet, env: dict[str, str] | None = None):
    with pytest.raises(PolicyError) as caught:
        load_policies(directory, contracts, env or {})
    assert str(caught.value) == "\n".join(caught.value.faults)
    return caught.value.faults


def assert_fault(faults: list[str], path: Path, field: str, fragment: str) -> None:
    prefix = f"{path}: {field}: " if field else f"{path}: "
    matching = [f for f in faults if f.startswith(prefix) and fragment in f]
    assert matching, f"no fault starting {prefix!r} containing {fragment!r} in:\n" + "\n".join(
        faults
    )


# --- the shipped policies ---------------------------------------------------------------------


def test_shipped_policies_load(contracts):
    """policies/ loads against contracts/, with the documented defaults and chain."""
    policy_set = load_policies(REPO / "policies", contracts, {})
    policy = policy_set.get("customer-churn")
    assert policy is not None
    assert set(policy_set.policies) == set(contracts.models)
    assert policy.primary == "churn-gbm"
    control, challenger = policy.arm_list
    assert (control.name, control.weight, challenger.name, challenger.weight) == (
        "control", 90, "challenger", 10,
    )  # fmt: skip
    assert control.chain == ["churn-gbm", "churn-logreg", "rules", "stale-cache", "default"]
    assert challenger.primary == "churn-gbm-v2"
    assert policy.sticky_by == "customer_id"
    assert policy.timeout_ms == 400
    assert policy.targets["churn-gbm"].url == "127.0.0.1:8000"  # ${AIGW_TRITON_URL:-...}
    assert [f.feature for f in policy.targets["churn-gbm"].inputs[0].features] == [
        "tenure_months",
        "monthly_charges",
    ]
    assert policy.targets["churn-logreg"].breaker == policy.targets["churn-gbm"].breaker
    assert len(policy_set.version_hash) == 16
    assert policy_set.get("no-such-model") is None


def test_policy_version_hash_follows_content(contracts):
    """The version hash is stable for the same content and changes with it (here via the env)."""
    first = load_policies(REPO / "policies", contracts, {})
    again = load_policies(REPO / "policies", contracts, {})
    moved = load_policies(REPO / "policies", contracts, {"AIGW_TRITON_URL": "triton:9000"})
    assert first.version_hash == again.version_hash
    assert moved.get("customer-churn").targets["churn-gbm"].url == "triton:9000"
    assert moved.version_hash != first.version_hash


# --- broken policy files ----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def setting(*keys: str, value: Any) -> Mutation:
    """A mutation setting doc[k1][k2]...[kn] = value."""

    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


def both(first: Mutation, second: Mutation) -> Mutation:
    """Two mutations, one after the other."""

    def mutate(doc: dict[str, Any]) -> None:
        first(doc)
        second(doc)

    return mutate


def removing(key: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        del doc[key]

    return mutate


def shipped_text_with(old: str, new: str) -> str:
    """The shipped churn policy's text with `old` replaced by `new` (anchors kept)."""
    text = (REPO / "policies" / CHURN).read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


def alias_bomb(levels: int) -> str:
    """Each level a list of ten aliases of the previous one: a few hundred bytes of text,
    ten to the power `levels` values once the aliases are followed."""
    lines = ["bomb0: &bomb0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"bomb{i}: &bomb{i} [{', '.join([f'*bomb{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


GBM = ("targets", "churn-gbm")
GBM_BREAKER = (*GBM, "breaker")
GBM_FEATURES = (*GBM, "inputs", 0, "features")

# (file name, the policy as data changed by a mutation, or raw text; field; message fragment)
BROKEN_POLICIES = [
    pytest.param(
        CHURN,
        setting("chain", value=["churn-gbm", "churn-xgb", "default"]),
        "chain",
        "chain names unknown steps: churn-xgb",
        id="unknown-chain-step",
    ),
    pytest.param(
        CHURN,
        setting("chain", value=["churn-gbm", "churn-logreg", "rules"]),
        "chain",
        "chain must end with `default`",
        id="chain-not-ending-in-default",
    ),
    pytest.param(
        CHURN,
        setting("chain", value=["churn-gbm", "rules", "churn-gbm", "default"]),
        "chain",
        "chain lists a step twice",
        id="duplicate-chain-step",
    ),
    pytest.param(
        CHURN,
        setting("chain", value=[]),
        "chain",
        "at least 1 item",
        id="empty-chain",
    ),
    pytest.param(
        CHURN,
        setting("timeout_ms", value=0),
        "timeout_ms",
        "greater than or equal to 1",
        id="timeout-zero",
    ),
    pytest.param(
        CHURN,
        setting("timeout_ms", value="fast"),
        "timeout_ms",
        "valid integer",
        id="timeout-not-a-number",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "version", value="v1"),
        "targets.churn-gbm.version",
        "should match pattern",
        id="version-v1",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "model", value="churn gbm\r\nX-Injected: 1"),
        "targets.churn-gbm.model",
        "should match pattern",
        id="model-name-that-would-split-the-request-line",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "model", value="../churn_gbm"),
        "targets.churn-gbm.model",
        "should match pattern",
        id="model-name-with-a-path",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "batching", "max_in_flight", value=0),
        "targets.churn-gbm.batching.max_in_flight",
        "greater than or equal to 1",
        id="batching-with-no-call-in-flight",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "url", value="http://triton:8000"),
        "targets.churn-gbm.url",
        "should match pattern",
        id="url-with-scheme",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "url", value="triton"),
        "targets.churn-gbm.url",
        "should match pattern",
        id="url-without-port",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "url", value="${NOT_SET_ANYWHERE}"),
        "targets.churn-gbm.url",
        "should match pattern",
        id="url-from-unset-variable",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "min_calls", value=30),
        "targets.churn-gbm.breaker",
        "min_calls must be <= window",
        id="min-calls-over-window",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "max_reset_timeout_s", value=0.5),
        "targets.churn-gbm.breaker",
        "max_reset_timeout_s must be >= reset_timeout_s",
        id="max-reset-under-reset",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "failure_rate", value=0),
        "targets.churn-gbm.breaker.failure_rate",
        "greater than 0",
        id="failure-rate-zero",
    ),
    pytest.param(
        CHURN,
        setting("timeout_msec", value=400),
        "timeout_msec",
        "Extra inputs are not permitted",
        id="typo-top-level-key",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "failure_treshold", value=5),
        "targets.churn-gbm.breaker.failure_treshold",
        "Extra inputs are not permitted",
        id="typo-nested-key",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "inputs", 0, "dtype", value="FP16"),
        "targets.churn-gbm.inputs.0.dtype",
        "'FP32', 'FP64', 'INT32' or 'INT64'",
        id="unknown-dtype",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_FEATURES, value=["tenure_months", "monthly_charge"]),
        "targets.churn-gbm.inputs.0.features.1",
        "monthly_charge is not a feature of the contract",
        id="feature-not-in-contract",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_FEATURES, value=["customer_id", "tenure_months"]),
        "targets.churn-gbm.inputs.0.features.0",
        "customer_id is a string, not a number",
        id="non-numeric-feature-in-tensor",
    ),
    pytest.param(
        CHURN,
        setting("model_id", value="churn"),
        "model_id",
        "churn must match the file name",
        id="model-id-not-file-name",
    ),
    pytest.param(
        "fraud-score.yaml",
        setting("model_id", value="fraud-score"),
        "model_id",
        "fraud-score is not a model of the contract",
        id="model-not-in-contract",
    ),
    pytest.param(
        CHURN,
        removing("labels"),
        "labels",
        "Field required",
        id="missing-labels",
    ),
    pytest.param(
        CHURN,
        setting("labels", "threshold", value=1.5),
        "labels.threshold",
        "less than or equal to 1",
        id="threshold-over-one",
    ),
    pytest.param(
        CHURN,
        setting("shadow_batch_window_ms", value=400),
        "shadow_batch_window_ms",
        "must be below timeout_ms (400)",
        id="shadow-window-not-below-the-timeout",
    ),
    pytest.param(
        CHURN,
        setting("shadow_batch_window_ms", value=-1),
        "shadow_batch_window_ms",
        "greater than or equal to 0",
        id="shadow-window-negative",
    ),
    pytest.param(
        CHURN,
        both(setting("timeout_ms", value=4), setting(*GBM, "batching", "gather_ms", value=5)),
        "targets.churn-gbm.batching.gather_ms",
        "must be below timeout_ms (4)",
        id="gather-not-below-the-timeout",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "batching", "gather_ms", value=11),
        "targets.churn-gbm.batching.gather_ms",
        "less than or equal to 10",
        id="gather-over-ten-ms",
    ),
    pytest.param(
        CHURN,
        "model_id: customer-churn\ntimeout_ms: [400,\n",
        "",
        "line 3",
        id="yaml-syntax-error",
    ),
    pytest.param(
        CHURN,
        "- model_id: customer-churn\n- timeout_ms: 400\n",
        "",
        "the file must hold a mapping",
        id="file-is-a-list",
    ),
    pytest.param(CHURN, "", "", "the file must hold a mapping", id="file-is-empty"),
    pytest.param(
        CHURN,
        "[" * 50_000 + "]" * 50_000,
        "line 1, column 65",
        "cannot be read: nested too deeply (more than 64 levels)",
        id="nested-too-deeply",
    ),
    pytest.param(
        CHURN,
        "model_id: customer-churn\nx: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
        "line 2, column 253",
        "cannot be read: nested too deeply (more than 64 levels)",
        id="mappings-nested-too-deeply",
    ),
    pytest.param(
        CHURN,
        "a: &a [" + "[" * 40 + "]" * 40 + "]\nb: &b [" + "[" * 30 + "*a" + "]" * 30 + "]\n",
        "line 2, column 14",
        "cannot be read: nested too deeply once aliases are followed",
        id="nested-too-deeply-through-aliases",
    ),
    pytest.param(
        CHURN,
        "model_id: customer-churn\nloop: &loop [*loop]\n",
        "line 2, column 7",
        "cannot be read: an alias refers to itself",
        id="alias-containing-itself",
    ),
    pytest.param(
        CHURN,
        shipped_text_with("timeout_ms: 400\n", "timeout_ms: 400\ntimeout_ms: 5\n"),
        "line 7, column 1",
        "cannot be read: key 'timeout_ms' appears twice",
        id="top-level-key-twice",
    ),
    pytest.param(
        CHURN,
        shipped_text_with("    weight: 90\n", "    weight: 90\n    weight: 0\n"),
        "line 20, column 5",
        "cannot be read: key 'weight' appears twice",
        id="arm-weight-twice",
    ),
    pytest.param(
        CHURN,
        shipped_text_with(
            "breaker: *breaker", "breaker: {<<: *breaker, force: open, force: closed}"
        ),
        "line 95, column 42",
        "cannot be read: key 'force' appears twice",
        id="key-twice-beside-a-merge",
    ),
    pytest.param(
        CHURN,
        shipped_text_with("\ncache:", "\n" + alias_bomb(8) + "cache:"),
        "line 44, column 8",
        "cannot be read: more than 100000 values once aliases are followed",
        id="alias-bomb",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "url", value="127.0.0.1:99999"),
        "targets.churn-gbm.url",
        "port 99999 is not a TCP port (1-65535)",
        id="url-port-above-65535",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "url", value="127.0.0.1:0"),
        "targets.churn-gbm.url",
        "port 0 is not a TCP port",
        id="url-port-zero",
    ),
    pytest.param(
        CHURN,
        setting("cache", "max_entries", value=10**26),
        "cache.max_entries",
        "less than or equal to 100000000",
        id="max-entries-beyond-64-bits",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "max_concurrency", value=10**23),
        "targets.churn-gbm.max_concurrency",
        "less than or equal to 100000",
        id="max-concurrency-beyond-64-bits",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "failure_threshold", value=10**23),
        "targets.churn-gbm.breaker.failure_threshold",
        "less than or equal to 10000",
        id="failure-threshold-beyond-64-bits",
    ),
    pytest.param(
        CHURN,
        setting(*GBM, "output", "index", value=2**64),
        "targets.churn-gbm.output.index",
        "less than or equal to 1000000",
        id="output-index-beyond-64-bits",
    ),
    pytest.param(
        CHURN,
        setting("cache", "ttl_s", value=float("inf")),
        "cache.ttl_s",
        "finite number",
        id="cache-ttl-infinite",
    ),
    pytest.param(
        CHURN,
        setting("cache", "stale_ttl_s", value=float("inf")),
        "cache.stale_ttl_s",
        "finite number",
        id="stale-ttl-infinite",
    ),
    pytest.param(
        CHURN,
        setting("cache", "ttl_s", value=1e12),
        "cache.ttl_s",
        "less than or equal to 31622400",
        id="cache-ttl-beyond-a-year",
    ),
    pytest.param(
        CHURN,
        setting(*GBM_BREAKER, "slow_call_ms", value=float("inf")),
        "targets.churn-gbm.breaker.slow_call_ms",
        "finite number",
        id="slow-call-infinite",
    ),
    pytest.param(
        CHURN,
        both(
            setting(*GBM_BREAKER, "reset_timeout_s", value=float("inf")),
            setting(*GBM_BREAKER, "max_reset_timeout_s", value=float("inf")),
        ),
        "targets.churn-gbm.breaker.reset_timeout_s",
        "finite number",
        id="reset-timeout-infinite",
    ),
    pytest.param(
        CHURN,
        setting(
            *GBM_FEATURES,
            value=[{"feature": "tenure_months", "scale": float("nan")}, "monthly_charges"],
        ),
        "targets.churn-gbm.inputs.0.features.0.scale",
        "finite number",
        id="scale-nan",
    ),
    pytest.param(
        CHURN,
        setting(
            *GBM_FEATURES,
            value=[{"feature": "tenure_months", "offset": float("-inf")}, "monthly_charges"],
        ),
        "targets.churn-gbm.inputs.0.features.0.offset",
        "finite number",
        id="offset-minus-infinity",
    ),
    pytest.param(
        CHURN,
        setting("arms", 0, "weight", value=float("inf")),
        "arms.0.weight",
        "finite number",
        id="weight-infinite",
    ),
    pytest.param(
        CHURN,
        setting("arms", 0, "weight", value=float("nan")),
        "arms.0.weight",
        "finite number",
        id="weight-nan",
    ),
    pytest.param(
        CHURN,
        both(setting("arms", 0, "weight", value=1e308), setting("arms", 1, "weight", value=1e308)),
        "arms.0.weight",
        "less than or equal to 1000000",
        id="weights-whose-sum-overflows",
    ),
    pytest.param(
        CHURN,
        setting("labels", "threshold", value=float("nan")),
        "labels.threshold",
        "finite number",
        id="threshold-nan",
    ),
]


def write_policy(directory: Path, name: str, content: Mutation | str) -> Path:
    if isinstance(content, str):
        text = content
    else:
        doc = shipped_policy()
        content(doc)
        text = yaml.safe_dump(doc, sort_keys=False)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "content", "field", "fragment"), BROKEN_POLICIES)
def test_broken_policy_is_refused_naming_file_and_field(
    data_dirs, contracts, name, content, field, fragment
):
    """Each broken policy fails the load with a `file: field: message` fault for its field."""
    policies = data_dirs / "policies"
    if name != CHURN:
        (policies / CHURN).unlink()
    path = write_policy(policies, name, content)
    faults = faults_of(policies, contracts)
    assert_fault(faults, path, field, fragment)


def test_a_merge_key_may_override_what_it_merges(data_dirs, contracts):
    """`{<<: *anchor, key: value}` is no repeated key: the merged mapping's key is overridden,
    as the README's kill switch does with `{<<: *breaker, force: open}`."""
    write_policy(
        data_dirs / "policies",
        CHURN,
        shipped_text_with("breaker: *breaker", "breaker: {<<: *breaker, force: open}"),
    )
    targets = load_policies(data_dirs / "policies", contracts, {}).get("customer-churn").targets
    assert targets["churn-gbm-v2"].breaker.force == "open"
    assert targets["churn-gbm-v2"].breaker.reset_timeout_s == 1.0  # merged from the anchor
    assert targets["churn-gbm"].breaker.force is None


def test_mutations_alone_are_the_fault(data_dirs, contracts):
    """Control for the table: the shipped policy, re-written the same way, loads cleanly."""
    write_policy(data_dirs / "policies", CHURN, lambda doc: None)
    assert load_policies(data_dirs / "policies", contracts, {}).get("customer-churn")


def test_yaml_syntax_fault_is_one_line(data_dirs, contracts):
    """A YAML syntax error is reported on one `file: ...` line that gives the position."""
    path = write_policy(data_dirs / "policies", CHURN, "model_id: customer-churn\n  bad: indent\n")
    faults = faults_of(data_dirs / "policies", contracts)
    assert all("\n" not in fault for fault in faults), faults
    assert_fault(faults, path, "", "line 2")


def test_several_faults_in_one_file_are_all_reported(data_dirs, contracts):
    """Every field fault of one file is listed, not only the first."""

    def break_many(doc: dict[str, Any]) -> None:
        doc["timeout_ms"] = 0
        doc["targets"]["churn-gbm"]["url"] = "http://triton:8000"
        doc["targets"]["churn-logreg"]["version"] = "v1"
        doc["targets"]["churn-logreg"]["breaker"]["min_calls"] = 30
        doc["retry"]["max_retries"] = 3
        doc["labels"]["positve"] = "churn"

    path = write_policy(data_dirs / "policies", CHURN, break_many)
    faults = faults_of(data_dirs / "policies", contracts)
    assert_fault(faults, path, "timeout_ms", "greater than or equal to 1")
    assert_fault(faults, path, "targets.churn-gbm.url", "should match pattern")
    assert_fault(faults, path, "targets.churn-logreg.version", "should match pattern")
    assert_fault(faults, path, "targets.churn-logreg.breaker", "min_calls must be <= window")
    assert_fault(faults, path, "retry.max_retries", "less than or equal to 1")
    assert_fault(faults, path, "labels.positve", "Extra inputs are not permitted")


def test_several_contract_faults_in_one_file_are_all_reported(data_dirs, contracts):
    """Every tensor feature that does not fit the contract is listed, in every target."""

    def break_features(doc: dict[str, Any]) -> None:
        doc["targets"]["churn-gbm"]["inputs"][0]["features"] = ["customer_id", "tenure"]
        doc["targets"]["churn-logreg"]["inputs"][0]["features"] = ["monthly_charges", "age"]

    path = write_policy(data_dirs / "policies", CHURN, break_features)
    faults = faults_of(data_dirs / "policies", contracts)
    gbm, logreg = "targets.churn-gbm.inputs.0", "targets.churn-logreg.inputs.0"
    assert_fault(faults, path, f"{gbm}.features.0", "customer_id is a string, not a number")
    assert_fault(faults, path, f"{gbm}.features.1", "tenure is not a feature of the contract")
    assert_fault(faults, path, f"{logreg}.features.1", "age is not a feature of the contract")


def test_faults_of_several_files_are_all_reported(data_dirs, contracts):
    """A broken file does not hide the faults of another one."""
    policies = data_dirs / "policies"
    churn = write_policy(policies, CHURN, setting("timeout_ms", value=0))
    other = write_policy(policies, "fraud-score.yaml", setting("model_id", value="fraud-score"))
    faults = faults_of(policies, contracts)
    assert_fault(faults, churn, "timeout_ms", "greater than or equal to 1")
    assert_fault(faults, other, "model_id", "fraud-score is not a model of the contract")


def test_misnamed_copy_is_blamed_not_the_original(data_dirs, contracts):
    """A copy of a policy under another file name is the fault, not the correctly named file."""
    policies = data_dirs / "policies"
    copy = write_policy(policies, "customer-churn-v2.yaml", lambda doc: None)
    faults = faults_of(policies, contracts)
    assert_fault(faults, copy, "model_id", "customer-churn must match the file name")
    assert not [f for f in faults if f.startswith(f"{policies / CHURN}: ")], faults


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda policies: (policies / CHURN).unlink(), "no policy files"),
        (lambda policies: policies.rename(policies.with_name("gone")), "directory not found"),
    ],
    ids=["empty", "missing"],
)
def test_policies_directory_must_hold_policies(data_dirs, contracts, setup, fragment):
    """An empty or missing policies directory is a fault naming the directory."""
    policies = data_dirs / "policies"
    setup(policies)
    faults = faults_of(policies, contracts)
    assert_fault(faults, policies, "", fragment)


# --- ${VAR} expansion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A}", {}, ""),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": "x"}, "x"),
        ("${A:-}", {}, ""),
        ("${AIGW_TRITON_URL:-127.0.0.1:8000}", {}, "127.0.0.1:8000"),
        ("${AIGW_TRITON_URL:-127.0.0.1:8000}", {"AIGW_TRITON_URL": "t:1"}, "t:1"),
        ("http://${H:-localhost}:${P:-8000}/v2", {"P": "9000"}, "http://localhost:9000/v2"),
        ("${A}${A}", {"A": "ab"}, "abab"),
        ("$A and {A} and $(A)", {"A": "x"}, "$A and {A} and $(A)"),  # only ${...} expands
        ("${1A}", {"1A": "x"}, "${1A}"),  # not a variable name
        ("${A}", {"A": "${B}", "B": "x"}, "${B}"),  # one pass: values are not re-expanded
        ("no references", {"A": "x"}, "no references"),
        pytest.param(
            "${A:-d}",
            {"A": ""},
            "d",
            id="empty-variable-takes-default",
        ),
    ],
)
def test_expand_environment_strings(value, env, expected):
    """`${NAME}` and `${NAME:-default}` are replaced in strings as the table says."""
    assert expand_environment(value, env) == expected


def test_expand_environment_walks_lists_and_mappings_and_keeps_other_values():
    """Every string in nested lists and mappings expands; keys and non-strings stay as they are."""
    tree = {"${K}": ["${A}", 1, 2.5, True, None, {"inner": "${B:-z}"}], "n": 3}
    assert expand_environment(tree, {"A": "a", "K": "k"}) == {
        "${K}": ["a", 1, 2.5, True, None, {"inner": "z"}],
        "n": 3,
    }


# --- what an apply changes for experiments ---------------------------------------------------


def churn_policy(edit: Callable[[dict[str, Any]], None] | None = None) -> Policy:
    """The shipped churn policy, as parsed, after `edit` of its YAML tree."""
    tree = shipped_policy()
    if edit is not None:
        edit(tree)
    return Policy.model_validate(expand_environment(tree, {}))


def _challenger_version_2(tree: dict[str, Any]) -> None:
    tree["targets"]["churn-gbm-v2"]["version"] = "2"


def _challenger_asks_the_control_model(tree: dict[str, Any]) -> None:
    tree["arms"][1]["chain"][0] = "churn-gbm"


def _weights_only(tree: dict[str, Any]) -> None:
    tree["arms"][0]["weight"], tree["arms"][1]["weight"] = 50, 50


def _a_third_arm(tree: dict[str, Any]) -> None:
    tree["arms"].append({"name": "canary", "weight": 1, "chain": ["churn-logreg", "default"]})


@pytest.mark.parametrize(
    ("edit", "changed"),
    [
        (_challenger_version_2, [("challenger", "churn_gbm_v2:1", "churn_gbm_v2:2")]),
        (_challenger_asks_the_control_model, [("challenger", "churn_gbm_v2:1", "churn_gbm:1")]),
        (_weights_only, []),
        (_a_third_arm, []),  # a new arm has no statistics to restart
    ],
    ids=["new-version", "other-target", "weights", "new-arm"],
)
def test_an_apply_names_the_arms_whose_model_changes(edit, changed):
    running = {"customer-churn": churn_policy()}
    proposed = {"customer-churn": churn_policy(edit)}
    changes = arm_model_changes(running, proposed)
    assert [(c["arm"], c["from"], c["to"]) for c in changes] == changed
    assert all(c["model_id"] == "customer-churn" for c in changes)
    assert arm_model_changes(running, {}) == []  # a model removed has no arms to restart


def test_a_chain_policy_makes_its_one_arm_once():
    """Routing asks for the arms on every request: a `chain` policy's `default` arm is one
    object, not a new model each time."""

    def chain_only(tree: dict[str, Any]) -> None:
        tree["chain"] = tree.pop("arms")[0]["chain"]
        del tree["sticky_by"], tree["routes"]

    policy = churn_policy(chain_only)
    (arm,) = policy.arm_list
    assert (arm.name, arm.weight) == ("default", 1)
    assert policy.arm_list[0] is arm
    assert churn_policy(chain_only).arm_list[0] is arm  # one arm per chain, not per policy


# --- what shapes a target's answer (cache keys) -----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "same"),
    [
        (setting("labels", "threshold", value=0.4), False),
        (setting("labels", "positive", value="leave"), False),
        (setting(*GBM, "model", value="churn_gbm_v3"), False),
        (setting(*GBM, "version", value="2"), False),
        (setting(*GBM_FEATURES, value=[{"feature": "tenure_months", "scale": 2.0},
                                       "monthly_charges"]), False),
        (setting(*GBM, "output", value={"name": "probability", "index": 1}), False),
        (setting(*GBM, "url", value="triton-b:8000"), True),
        (setting(*GBM_BREAKER, "failure_threshold", value=9), True),
        (setting("arms", 0, "weight", value=50), True),
        (setting("cache", "ttl_s", value=60), True),
    ],
    ids=["threshold", "positive-label", "model", "version", "scale", "output-index", "url",
         "breaker", "weight", "ttl"],
)  # fmt: skip
def test_a_targets_answer_spec_changes_with_what_shapes_its_answer_only(edit, same):
    """Cached answers are keyed by it: an apply that changes how an answer is made starts
    from an empty cache for that target; one that changes where or how often it is asked
    keeps the entries."""
    before, after = churn_policy(), churn_policy(edit)
    assert (before.answer_spec("churn-gbm") == after.answer_spec("churn-gbm")) is same
