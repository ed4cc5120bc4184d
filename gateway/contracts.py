"""The stable API contract: OpenAPI 3.1 documents in `contracts/`, checked and compiled once.

The contract is the source of truth. The gateway serves it as `/openapi.json` and
validates every prediction request with validators compiled from it at start-up, so what
integrators read is exactly what is enforced.

Per-model feature schemas come from the `model_id` discriminator of the
`PredictionRequest` schema: each mapping entry names one logical model's request schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator

from gateway.problems import FaultsError, FieldError, json_pointer
from gateway.yaml_files import read_yaml

PREDICTIONS_PATH = "/v1/predictions"
FEEDBACK_SCHEMA = "#/components/schemas/FeedbackRequest"


def _same(value: Any) -> Any:
    return value


_CANONICAL_TYPES = {"integer": int, "number": float}
CONTRACT_SUFFIXES = (".yaml", ".yml", ".json")


class ContractError(FaultsError):
    """A contract document is missing, unreadable or not valid OpenAPI 3.1."""


@dataclass(frozen=True)
class ModelContract:
    """One logical model's slice of the contract: its compiled validator and feature types."""

    model_id: str
    validator: Any
    feature_types: dict[str, str]
    pii_features: frozenset[str]

    def canonical_features(self, features: dict[str, Any]) -> dict[str, Any]:
        """Features with the contract's numeric types made exact: 24.0 for an integer is 24,
        and 90 for a number is 90.0, so rules, cache keys and tensors see one form."""
        return {
            name: _CANONICAL_TYPES.get(self.feature_types.get(name, ""), _same)(value)
            for name, value in features.items()
        }

    def violations(self, payload: Any) -> list[FieldError]:
        return [f for e in self.validator.iter_errors(payload) for f in _field_errors(e)]


@dataclass(frozen=True)
class ContractSet:
    """Every contract document, merged for `/openapi.json`, plus per-model validators."""

    version: str
    document: dict
    models: dict[str, ModelContract]
    feedback_validator: Any = None

    def feedback_violations(self, payload: Any) -> list[FieldError]:
        """Every way `payload` breaks the FeedbackRequest schema, by JSON pointer."""
        if self.feedback_validator is None:
            return [FieldError("", "this contract declares no feedback")]
        return [f for e in self.feedback_validator.iter_errors(payload) for f in _field_errors(e)]

    def violations(self, payload: Any) -> list[FieldError]:
        """Every way `payload` breaks the prediction request schema, by JSON pointer."""
        if not isinstance(payload, dict):
            return [FieldError("", "the request body must be a JSON object")]
        model_id = payload.get("model_id")
        if model_id is None:
            # The rest of the body cannot be checked without knowing its model.
            return [FieldError("/model_id", "is a required property")]
        if not isinstance(model_id, str):
            return [FieldError("/model_id", "must be a string")]
        model = self.models.get(model_id)
        if model is None:
            known = ", ".join(sorted(self.models))
            return [FieldError("/model_id", f"unknown model; known models: {known}")]
        return model.violations(payload)


def load_contracts(directory: Path) -> ContractSet:
    """Read, check and compile every contract in `directory`; raise ContractError listing faults."""
    documents = _read_documents(directory)
    faults = [fault for path, doc in documents for fault in document_faults(path, doc)]
    if faults:
        raise ContractError(faults)
    merged = _merge(doc for _, doc in documents)
    try:
        models = _compile_models(merged)
    except ContractError as error:
        raise ContractError([f"{directory}: {f}" for f in error.faults]) from None
    return ContractSet(
        version=merged["info"]["version"],
        document=merged,
        models=models,
        feedback_validator=_optional_validator(merged, FEEDBACK_SCHEMA),
    )


def check_contracts(directory: Path) -> list[str]:
    """Every fault in every document of `directory`, as `file: where: message` lines."""
    try:
        load_contracts(directory)
    except ContractError as error:
        return error.faults
    return []


def document_faults(path: Path, document: Any) -> list[str]:
    """Faults of one OpenAPI 3.1 document according to openapi-spec-validator."""
    if not isinstance(document, dict):
        return [f"{path}: the document must be a mapping"]
    if not str(document.get("openapi", "")).startswith("3.1"):
        return [f"{path}: /openapi: must be an OpenAPI 3.1 document"]
    faults: list[str] = []
    try:
        for e in OpenAPIV31SpecValidator(document).iter_errors():
            message = e.message.split("\n", 1)[0]  # the rest repeats the schema and instance
            faults.append(f"{path}: {json_pointer(list(e.absolute_path)) or '/'}: {message}")
    except Exception as error:
        # The validator itself trips over some broken documents (a dangling `$ref`, `paths: 5`).
        reason = _bounded(f"{type(error).__name__}: {error}")
        faults.append(f"{path}: /: cannot be checked: {reason}")
    return faults


def _read_documents(directory: Path) -> list[tuple[Path, Any]]:
    if not directory.is_dir():
        raise ContractError([f"{directory}: contracts directory not found"])
    paths = sorted(p for p in directory.iterdir() if p.suffix in CONTRACT_SUFFIXES)
    if not paths:
        raise ContractError([f"{directory}: no contract documents"])
    documents = []
    for path in paths:
        try:
            documents.append((path, read_yaml(path.read_text(encoding="utf-8"), max_values=None)))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ContractError([f"{path}: cannot be read: {error}"]) from None
    return documents


def _merge(documents: Iterator[dict]) -> dict:
    """Union of paths and components; the first document supplies `info`."""
    merged: dict = {}
    for doc in documents:
        if not merged:
            merged = {k: v for k, v in doc.items() if k not in ("paths", "components")}
            merged["paths"], merged["components"] = {}, {}
        merged["paths"].update(doc.get("paths", {}))
        for section, entries in doc.get("components", {}).items():
            merged["components"].setdefault(section, {}).update(entries)
    return merged


def _compile_models(document: dict) -> dict[str, ModelContract]:
    request_schema = _prediction_request_schema(document)
    mapping = request_schema.get("discriminator", {}).get("mapping", {})
    if request_schema.get("discriminator", {}).get("propertyName") != "model_id" or not mapping:
        raise ContractError(["PredictionRequest needs a `model_id` discriminator with a mapping"])
    return {model_id: _compile_model(document, model_id, ref) for model_id, ref in mapping.items()}


def _compile_model(document: dict, model_id: str, ref: str) -> ModelContract:
    root = {"$ref": ref, "components": document["components"]}
    try:
        validator = jsonschema_rs.Draft202012Validator(root)
    except (ValueError, jsonschema_rs.ReferencingError) as error:
        raise ContractError([f"model {model_id}: schema does not compile: {error}"]) from None
    try:
        features = _resolve(document, _resolve(document, ref)["properties"]["features"])
        features["properties"].items()
    except (KeyError, TypeError, AttributeError):
        raise ContractError(
            [f"model {model_id}: {ref} must declare `features` as an object with `properties`"]
        ) from None
    return ModelContract(
        model_id=model_id,
        validator=validator,
        feature_types={name: s.get("type", "any") for name, s in features["properties"].items()},
        pii_features=frozenset(n for n, s in features["properties"].items() if s.get("x-pii")),
    )


def _optional_validator(document: dict, ref: str) -> Any:
    """A validator for `ref` when the contract declares it, else None."""
    name = ref.rsplit("/", 1)[-1]
    if name not in document.get("components", {}).get("schemas", {}):
        return None
    root = {"$ref": ref, "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def _prediction_request_schema(document: dict) -> dict:
    try:
        operation = document["paths"][PREDICTIONS_PATH]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
    except (KeyError, TypeError):
        raise ContractError([f"no POST {PREDICTIONS_PATH} with an application/json body"]) from None
    return _resolve(document, schema)


def _resolve(document: dict, schema_or_ref: dict | str) -> dict:
    """Follow one local `$ref` (a `#/...` pointer); other schemas are returned as they are."""
    ref = schema_or_ref if isinstance(schema_or_ref, str) else schema_or_ref.get("$ref")
    if ref is None:
        return schema_or_ref  # type: ignore[return-value]
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _field_errors(error: jsonschema_rs.ValidationError) -> list[FieldError]:
    """Point at each offending field itself, not at its parent, where the schema names it."""
    path = list(error.instance_path)
    kind = error.kind
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        return [FieldError(json_pointer([*path, kind.property]), "is a required property")]
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
        return [
            FieldError(json_pointer([*path, name]), "is not an allowed property")
            for name in kind.unexpected
        ]
    return [FieldError(json_pointer(path), _bounded(error.message))]


def _bounded(message: str, limit: int = 200) -> str:
    """Validator messages quote the bad value; a hostile value must not make a huge error."""
    return message if len(message) <= limit else message[: limit - 1] + "…"
