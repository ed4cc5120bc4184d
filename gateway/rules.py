"""Rule sets and static defaults from `fallbacks/`: the answers that need no model.

Each file holds an ordered list of CEL rules for one logical model and its static default.
Every expression is compiled at load and tried against a sample input shaped like the
contract's features, so a broken or ill-typed rule fails the load, naming file, rule and
position, and never a request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contracts import ContractSet
from gateway.expressions import compile_condition, holds, sample_features
from gateway.policy import Labels, PolicySet, validation_lines, yaml_fault
from gateway.problems import FaultsError
from gateway.yaml_files import read_yaml


class FallbackError(FaultsError):
    """One or more fallback files are invalid; `faults` holds `file: where: message` lines."""


class _Strict(BaseModel):
    # A NaN probability would load and then answer with a number that is no probability.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StaticAnswer(_Strict):
    """A prediction that needs no model."""

    prediction: str = Field(min_length=1)
    probability: float = Field(ge=0, le=1)


class RuleSpec(StaticAnswer):
    """One rule as written: a CEL condition and the answer it gives."""

    name: str = Field(min_length=1, max_length=64)
    when: str = Field(min_length=1, max_length=4096)


class FallbackFile(_Strict):
    model_id: str
    rules: list[RuleSpec] = []
    default: StaticAnswer


@dataclass(frozen=True)
class Rule:
    name: str
    program: Any
    answer: StaticAnswer


@dataclass(frozen=True)
class RuleMatch:
    """Which rule answered, kept so the decision can be explained later."""

    rule: str
    answer: StaticAnswer


@dataclass(frozen=True)
class Fallbacks:
    """One model's compiled rules and default, with a hash that versions them."""

    model_id: str
    rules: tuple[Rule, ...]
    default: StaticAnswer
    version: str

    def first_match(self, features: Mapping[str, Any]) -> RuleMatch | None:
        """The first rule whose condition holds for `features`, or None.

        A rule that errors at run time (say, a feature it reads is absent) does not match;
        load-time checks make that rare, and a rule must never fail a request.
        """
        context = {"features": dict(features)}
        for rule in self.rules:
            if holds(rule.program, context):
                return RuleMatch(rule=rule.name, answer=rule.answer)
        return None


def load_fallbacks(
    directory: Path, contracts: ContractSet, labels: Mapping[str, Labels] | None = None
) -> dict[str, Fallbacks]:
    """Read, compile and check every fallback file; raise FallbackError listing every fault.

    With `labels` (each model's policy labels), every answer must be one of its model's labels:
    a typo would otherwise be served as a prediction the model never makes."""
    faults: list[str] = []
    result: dict[str, Fallbacks] = {}
    if not directory.is_dir():
        raise FallbackError([f"{directory}: fallbacks directory not found"])
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml")):
        fallbacks = _load_one(path, contracts, faults)
        if fallbacks is None:
            continue
        if labels is not None and fallbacks.model_id in labels:
            faults.extend(
                f"{path}: {fault}" for fault in label_faults(fallbacks, labels[fallbacks.model_id])
            )
        if fallbacks.model_id in result:
            # As for policies: a leftover copy must not silently replace the model's rules.
            faults.append(f"{path}: model_id: {fallbacks.model_id} is defined by another file too")
            continue
        result[fallbacks.model_id] = fallbacks
    faults.extend(
        f"{directory}: model {m} has no fallback file (its chain needs a default)"
        for m in contracts.models
        if m not in result
    )
    if faults:
        raise FallbackError(faults)
    return result


def labels_of(policies: PolicySet) -> dict[str, Labels]:
    """Each model's labels: what its fallback answers must predict."""
    return {model_id: policy.labels for model_id, policy in policies.policies.items()}


def label_faults(fallbacks: Fallbacks, labels: Labels) -> list[str]:
    """Answers whose prediction is not one of the policy's labels, at their field paths."""
    known = (labels.positive, labels.negative)
    answers = [
        (f"rules.{i} ({rule.name}): prediction", rule.answer)
        for i, rule in enumerate(fallbacks.rules)
    ]
    answers.append(("default.prediction", fallbacks.default))
    return [
        f"{where}: {answer.prediction} is not a label of the policy ({' or '.join(known)})"
        for where, answer in answers
        if answer.prediction not in known
    ]


def compile_rule(spec: RuleSpec, sample: Mapping[str, Any]) -> Rule:
    """Compile one rule and try it on `sample`; ValueError says what is wrong and where."""
    program = compile_condition(spec.when, ("features",), {"features": dict(sample)})
    return Rule(name=spec.name, program=program, answer=StaticAnswer(**_answer_of(spec)))


def _load_one(path: Path, contracts: ContractSet, faults: list[str]) -> Fallbacks | None:
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
        spec = FallbackFile.model_validate(raw)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        faults.append(yaml_fault(path, error))
        return None
    except ValidationError as error:
        faults.extend(f"{path}: {line}" for line in validation_lines(error))
        return None
    model = contracts.models.get(spec.model_id)
    if model is None:
        faults.append(f"{path}: model_id: {spec.model_id} is not a model of the contract")
        return None
    if spec.model_id != path.stem:
        faults.append(f"{path}: model_id: {spec.model_id} must match the file name")
        return None
    sample = sample_features(model.feature_types)
    rules = []
    for index, rule_spec in enumerate(spec.rules):
        try:
            rules.append(compile_rule(rule_spec, sample))
        except ValueError as error:
            faults.append(f"{path}: rules.{index} ({rule_spec.name}): when: {error}")
    return Fallbacks(
        model_id=spec.model_id,
        rules=tuple(rules),
        default=spec.default,
        version=_content_hash(spec),
    )


def _answer_of(spec: RuleSpec) -> dict[str, Any]:
    return {"prediction": spec.prediction, "probability": spec.probability}


def _content_hash(spec: FallbackFile) -> str:
    digest = hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS))
    return "rules-" + digest.hexdigest()[:12]
