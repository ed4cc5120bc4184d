"""Fallback rules: shipped rules load, match first-wins, and broken rules fail the load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.contracts import ContractSet, load_contracts
from gateway.policy import load_policies
from gateway.rules import FallbackError, Fallbacks, StaticAnswer, labels_of, load_fallbacks
from tests.conftest import CONDITIONS_RAISING_AT_RUN_TIME

REPO = Path(__file__).resolve().parents[1]
CHURN = "customer-churn.yaml"


@pytest.fixture(scope="module")
def contracts() -> ContractSet:
    return load_contracts(REPO / "contracts")


@pytest.fixture(scope="module")
def churn(contracts) -> Fallbacks:
    return load_fallbacks(REPO / "fallbacks", contracts)["customer-churn"]


def features(tenure: int, charges: float) -> dict[str, Any]:
    return {"customer_id": "c-1", "tenure_months": tenure, "monthly_charges": charges}


def rule(name: str, when: str, probability: float = 0.5) -> dict[str, Any]:
    return {"name": name, "when": when, "prediction": "churn", "probability": probability}


GOOD_RULE = rule("short-tenure", "features.tenure_months < 6")


def write_fallbacks(directory: Path, rules: list[dict[str, Any]], name: str = CHURN) -> Path:
    doc = {
        "model_id": Path(name).stem,
        "rules": rules,
        "default": {"prediction": "stay", "probability": 0.27},
    }
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def faults_of(directory: Path, contracts: ContractSet) -> list[str]:
    with pytest.raises(FallbackError) as caught:
        load_fallbacks(directory, contracts)
    return caught.value.faults


def only_fault_starting(faults: list[str], prefix: str) -> str:
    matching = [f for f in faults if f.startswith(prefix)]
    assert len(matching) == 1, f"expected one fault starting {prefix!r} in:\n" + "\n".join(faults)
    return matching[0]


# --- the shipped fallbacks ------------------------------------------------------------------------


def test_shipped_fallbacks_load(contracts, churn):
    """fallbacks/ loads: one entry per contract model, rules in file order, and the default."""
    loaded = load_fallbacks(REPO / "fallbacks", contracts)
    assert set(loaded) == set(contracts.models)
    assert [r.name for r in churn.rules] == [
        "new-customer-high-bill",
        "new-customer",
        "loyal-customer",
    ]
    assert churn.default == StaticAnswer(prediction="stay", probability=0.27)
    assert churn.version.startswith("rules-")
    assert load_fallbacks(REPO / "fallbacks", contracts)["customer-churn"].version == churn.version


@pytest.mark.parametrize(
    ("tenure", "charges", "rule_name", "prediction", "probability"),
    [
        # both new-customer rules hold: the first in file order wins
        (3, 80.0, "new-customer-high-bill", "churn", 0.74),
        (11, 70.0, "new-customer-high-bill", "churn", 0.74),
        (3, 70, "new-customer-high-bill", "churn", 0.74),  # an int where a double is declared
        (3, 69.99, "new-customer", "churn", 0.58),
        (0, 0.0, "new-customer", "churn", 0.58),
        (48, 200.0, "loyal-customer", "stay", 0.08),
        (600, 10.0, "loyal-customer", "stay", 0.08),
    ],
)
def test_first_matching_rule_wins(churn, tenure, charges, rule_name, prediction, probability):
    """Rules are tried in file order and the first whose condition holds answers."""
    match = churn.first_match(features(tenure, charges))
    assert match is not None
    assert match.rule == rule_name
    assert match.answer == StaticAnswer(prediction=prediction, probability=probability)


@pytest.mark.parametrize(("tenure", "charges"), [(12, 80.0), (24, 89.99), (47, 5.0), (6, 50.0)])
def test_no_matching_rule_gives_none(churn, tenure, charges):
    """When no condition holds, first_match is None (the chain moves on)."""
    assert churn.first_match(features(tenure, charges)) is None


def test_rule_failing_at_run_time_does_not_match(churn):
    """A rule erroring on an input (a feature missing) is passed over; the next may match."""
    assert churn.first_match({"tenure_months": 3}).rule == "new-customer"
    assert churn.first_match({}) is None


def test_comprehensions_two_deep_are_allowed(data_dirs, contracts):
    """Two levels of comprehensions load and answer; a macro's name inside a string literal
    is text, not a level."""
    fallbacks = data_dirs / "fallbacks"
    when = '[1, 2].exists(a, [3].all(b, features.tenure_months > 2)) && ".all(.all(" != ""'
    write_fallbacks(fallbacks, [rule("two-deep", when), GOOD_RULE])
    loaded = load_fallbacks(fallbacks, contracts)["customer-churn"]
    assert loaded.first_match(features(3, 50.0)).rule == "two-deep"
    assert loaded.first_match(features(1, 50.0)).rule == "short-tenure"


@pytest.mark.parametrize("when", CONDITIONS_RAISING_AT_RUN_TIME)
def test_rule_raising_any_error_at_run_time_does_not_match(data_dirs, contracts, when):
    """Whatever CEL raises for one request, the rule does not match and the next one may."""
    fallbacks = data_dirs / "fallbacks"
    write_fallbacks(fallbacks, [rule("fragile", when), GOOD_RULE])
    loaded = load_fallbacks(fallbacks, contracts)["customer-churn"]
    assert loaded.first_match(features(2, 50.0)).rule == "short-tenure"


# --- broken rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "probability", "where", "fragments"),
    [
        pytest.param(
            "features.tenure_months < ",
            0.5,
            "when: does not compile",
            ["<input>:1:"],
            id="cel-syntax-error",
        ),
        pytest.param(
            "features.tenure_months < 6 &&& true",
            0.5,
            "when: does not compile",
            ["<input>:1:"],
            id="cel-syntax-error-mid-expression",
        ),
        pytest.param(
            "customer.tenure_months < 6",
            0.5,
            "when: refers to unknown variables",
            ["customer"],
            id="unknown-variable",
        ),
        pytest.param(
            "features.customer_id > 3",
            0.5,
            "when: fails on a valid input",
            [],
            id="string-compared-with-number",
        ),
        pytest.param(
            "features.no_such_feature > 3",
            0.5,
            "when: fails on a valid input",
            ["no_such_feature"],
            id="feature-not-in-contract",
        ),
        pytest.param(
            "features.tenure_months + 1",
            0.5,
            "when: must be a boolean condition",
            ["int"],
            id="non-boolean-result",
        ),
        pytest.param(
            "features.customer_id",
            0.5,
            "when: must be a boolean condition",
            ["str"],
            id="string-result",
        ),
        pytest.param(
            "[1][features.tenure_months] == 1",
            0.5,
            "when: fails on a valid input",
            [],
            id="index-out-of-range-on-sample",
        ),
        pytest.param(
            "features.tenure_months + 9223372036854775807 > 0",
            0.5,
            "when: fails on a valid input",
            [],
            id="overflow-on-sample",
        ),
        pytest.param(
            "1 / (features.tenure_months - 1) > 0",
            0.5,
            "when: fails on a valid input",
            [],
            id="division-by-zero-on-sample",
        ),
        pytest.param(
            "[1, 2].all(a, [1, 2].all(b, [1, 2].all(c, features.tenure_months > c)))",
            0.5,
            "when: nests comprehensions (all, exists, exists_one, map, filter) 3 deep; at most 2",
            [],
            id="comprehensions-three-deep",
        ),
        pytest.param(
            "[0,1,2,3,4,5,6,7,8,9].all(v0, [0,1,2,3,4,5,6,7,8,9].exists(v1, "
            "[0,1,2,3,4,5,6,7,8,9].filter(v2, [0,1,2,3,4,5,6,7,8,9].map(v3, v3).size() > 0)"
            ".size() > 0 && features.tenure_months > v1))",
            0.5,
            "when: nests comprehensions (all, exists, exists_one, map, filter) 4 deep",
            [],
            id="comprehensions-four-deep",
        ),
    ],
)
def test_broken_rule_is_refused_naming_file_and_rule(
    data_dirs, contracts, when, probability, where, fragments
):
    """A broken rule fails the load with `file: rules.<i> (<name>): when: ...`."""
    fallbacks = data_dirs / "fallbacks"
    path = write_fallbacks(fallbacks, [GOOD_RULE, rule("broken", when, probability)])
    faults = faults_of(fallbacks, contracts)
    fault = only_fault_starting(faults, f"{path}: rules.1 (broken): {where}")
    assert "\n" not in fault
    for fragment in fragments:
        assert fragment in fault
    assert not [f for f in faults if f.startswith(f"{path}: rules.0")]


def test_cel_syntax_error_gives_its_position(data_dirs, contracts):
    """A CEL syntax error names the line and column where parsing failed."""
    fallbacks = data_dirs / "fallbacks"
    path = write_fallbacks(fallbacks, [rule("broken", "features.tenure_months < ")])
    fault = only_fault_starting(faults_of(fallbacks, contracts), f"{path}: rules.0 (broken): ")
    assert "<input>:1:26" in fault


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        (rule("too-sure", "true", probability=1.5), "probability", "less than or equal to 1"),
        (rule("negative", "true", probability=-0.1), "probability", "greater than or equal to 0"),
        (rule("not-a-number", "true", probability=float("nan")), "probability", "finite number"),
        ({**GOOD_RULE, "prediction": ""}, "prediction", "at least 1 character"),
        ({**GOOD_RULE, "when": ""}, "when", "at least 1 character"),
        ({**GOOD_RULE, "whne": "true"}, "whne", "Extra inputs are not permitted"),
    ],
    ids=[
        "probability-over-one",
        "probability-negative",
        "probability-nan",
        "empty-prediction",
        "empty-when",
        "typo",
    ],
)
def test_bad_rule_answer_is_refused_naming_file_and_rule(
    data_dirs, contracts, spec, field, fragment
):
    """A rule whose answer or shape is invalid fails the load naming file, rule and field."""
    fallbacks = data_dirs / "fallbacks"
    path = write_fallbacks(fallbacks, [GOOD_RULE, spec])
    faults = faults_of(fallbacks, contracts)
    fault = only_fault_starting(faults, f"{path}: rules.1.{field}: ")
    assert fragment in fault


def test_every_broken_rule_of_a_file_is_reported(data_dirs, contracts):
    """All broken rules are listed, not only the first."""
    fallbacks = data_dirs / "fallbacks"
    path = write_fallbacks(
        fallbacks,
        [rule("a", "features.tenure_months <"), GOOD_RULE, rule("c", "features.tenure_months")],
    )
    faults = faults_of(fallbacks, contracts)
    only_fault_starting(faults, f"{path}: rules.0 (a): when: does not compile")
    only_fault_starting(faults, f"{path}: rules.2 (c): when: must be a boolean condition")


def test_model_without_fallback_file_is_a_fault(data_dirs, contracts):
    """Every contract model needs a fallback file: its chain ends in a default."""
    fallbacks = data_dirs / "fallbacks"
    (fallbacks / CHURN).unlink()
    faults = faults_of(fallbacks, contracts)
    assert faults == [
        f"{fallbacks}: model customer-churn has no fallback file (its chain needs a default)"
    ]


def test_fallback_file_for_unknown_model_is_a_fault(data_dirs, contracts):
    """A fallback file for a model the contract does not have is refused."""
    fallbacks = data_dirs / "fallbacks"
    path = write_fallbacks(fallbacks, [GOOD_RULE], name="fraud-score.yaml")
    faults = faults_of(fallbacks, contracts)
    only_fault_starting(faults, f"{path}: model_id: fraud-score is not a model of the contract")


@pytest.mark.parametrize(
    ("copy_name", "fault"),
    [
        ("customer-churn2.yaml", "customer-churn must match the file name"),
        ("customer-churn.yml", "customer-churn is defined by another file too"),
    ],
    ids=["other-name", "other-suffix"],
)
def test_a_second_fallback_file_for_a_model_is_blamed_not_the_original(
    data_dirs, contracts, copy_name, fault
):
    """A copy of a model's fallbacks is refused, and never replaces the rules of the file
    named after the model."""
    fallbacks = data_dirs / "fallbacks"
    copy = fallbacks / copy_name
    copy.write_text(yaml.safe_dump({
        "model_id": "customer-churn", "rules": [],
        "default": {"prediction": "churn", "probability": 0.9},
    }))  # fmt: skip
    faults = faults_of(fallbacks, contracts)
    assert faults == [f"{copy}: model_id: {fault}"]


def test_an_answer_that_is_not_a_label_of_the_policy_is_refused(data_dirs, contracts):
    """Given the policies' labels, every rule's and the default's prediction must be one of
    them: a typo is refused naming the field, not served as a label the model never gives."""
    fallbacks = data_dirs / "fallbacks"
    path = fallbacks / CHURN
    doc = {
        "model_id": "customer-churn",
        "rules": [GOOD_RULE, {**GOOD_RULE, "name": "typo", "prediction": "chrun"}],
        "default": {"prediction": "Stay", "probability": 0.27},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    labels = labels_of(load_policies(REPO / "policies", contracts, {}))
    with pytest.raises(FallbackError) as caught:
        load_fallbacks(fallbacks, contracts, labels)
    assert caught.value.faults == [
        f"{path}: rules.1 (typo): prediction: chrun is not a label of the policy (churn or stay)",
        f"{path}: default.prediction: Stay is not a label of the policy (churn or stay)",
    ]


def test_missing_fallbacks_directory_is_a_fault(data_dirs, contracts):
    """A missing fallbacks directory is a fault naming it."""
    missing = data_dirs / "no-fallbacks"
    assert faults_of(missing, contracts) == [f"{missing}: fallbacks directory not found"]


SHIPPED_TEXT = (REPO / "fallbacks" / CHURN).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(
            "[" * 50_000 + "]" * 50_000,
            "line 1, column 65: cannot be read: nested too deeply (more than 64 levels)",
            id="nested-too-deeply",
        ),
        pytest.param(
            SHIPPED_TEXT.replace("\nrules:", "\nrules: []\nrules:"),
            "line 7, column 1: cannot be read: key 'rules' appears twice",
            id="rules-twice",
        ),
        pytest.param(
            SHIPPED_TEXT.replace(
                "    probability: 0.74\n", "    probability: 0.74\n    prediction: stay\n"
            ),
            "line 11, column 5: cannot be read: key 'prediction' appears twice",
            id="rule-answer-twice",
        ),
        pytest.param(
            SHIPPED_TEXT
            + "bomb0: &b0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]\n" for i in range(1, 8)),
            "cannot be read: more than 100000 values once aliases are followed",
            id="alias-bomb",
        ),
    ],
)
def test_unreadable_fallback_file_is_one_fault_naming_the_line(
    data_dirs, contracts, text, fragment
):
    """A file nested too deeply, with a key written twice or too large once its aliases are
    followed is refused with its line; a repeated key never silently wins."""
    path = data_dirs / "fallbacks" / CHURN
    path.write_text(text, encoding="utf-8")
    fault = only_fault_starting(faults_of(data_dirs / "fallbacks", contracts), f"{path}: ")
    assert fragment in fault


def test_yaml_syntax_fault_is_one_line(data_dirs, contracts):
    """A fallback file that is not YAML is one `file: ...` fault line giving the position."""
    fallbacks = data_dirs / "fallbacks"
    path = fallbacks / CHURN
    path.write_text("model_id: customer-churn\n  rules: []\n", encoding="utf-8")
    fault = only_fault_starting(faults_of(fallbacks, contracts), f"{path}: ")
    assert "line 2" in fault
    assert "\n" not in fault
