"""The contract documents in contracts/, the merged /openapi.json, and what is compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

from gateway.contracts import check_contracts, load_contracts
from gateway.demo.triton_process import free_port
from tests.conftest import CHURN_REQUEST, REPO

CONTRACTS = REPO / "contracts"
CONTRACT_FILES = sorted(p for p in CONTRACTS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
MAIN = "gateway.v1.yaml"


def test_contracts_directory_has_documents() -> None:
    """contracts/ holds at least the v1 document, so the checks below check something."""
    assert MAIN in [p.name for p in CONTRACT_FILES]


@pytest.mark.parametrize("path", CONTRACT_FILES, ids=lambda p: p.name)
def test_contract_document_is_valid_openapi_31(path: Path) -> None:
    """Each document in contracts/ is OpenAPI 3.1 and passes openapi-spec-validator."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert str(document["openapi"]).startswith("3.1")
    validate(document)


def test_repository_contracts_have_no_faults() -> None:
    """check_contracts finds nothing wrong with the repository's own contracts."""
    assert check_contracts(CONTRACTS) == []


async def test_openapi_json_is_the_merged_contract(gateway_client) -> None:
    """GET /openapi.json is valid OpenAPI with /v1/predictions and equals the merged contract."""
    async with gateway_client(env={"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    document = response.json()
    validate(document)
    assert "post" in document["paths"]["/v1/predictions"]
    assert document == load_contracts(CONTRACTS).document


def _replace(old: str, new: str) -> tuple[str, str]:
    """A copy of the v1 contract with one edit (checked to apply)."""
    text = (CONTRACTS / MAIN).read_text(encoding="utf-8")
    assert old in text, old
    return MAIN, text.replace(old, new, 1)


FILE, FOLDER = "file", "folder"
BROKEN = [
    # A bad extra document: its faults name it.
    pytest.param(
        "extra.yaml", "openapi: 3.1.0\ninfo: {title: x}\npaths: {}\n", FILE, id="no-version"
    ),
    pytest.param("extra.yaml", "openapi: [3.1.0\n", FILE, id="yaml-syntax"),
    pytest.param("extra.yaml", "- just\n- a list\n", FILE, id="not-a-mapping"),
    pytest.param("extra.yaml", "", FILE, id="empty-file"),
    pytest.param("extra.yaml", "[" * 50_000 + "]" * 50_000, FILE, id="nested-too-deeply"),
    pytest.param("extra.yaml", b"openapi: 3.1.0\ninfo: \xff\xfe\n", FILE, id="not-utf8"),
    pytest.param(
        "extra.yml",
        'openapi: 3.0.3\ninfo: {title: x, version: "1"}\npaths: {}\n',
        FILE,
        id="openapi-30",
    ),
    pytest.param(
        "extra.json",
        '{"openapi": "3.1.0", "info": {"title": "x", "version": "1"}, "paths": {"x": {}}}',
        FILE,
        id="path-without-slash",
    ),
    pytest.param(
        "extra.yaml",
        'openapi: 3.1.0\ninfo: {title: x, version: "1"}\npaths: 5\n',
        FILE,
        id="paths-not-a-mapping",
    ),
    # The v1 document itself edited: document faults name it; faults found only once the
    # documents are merged and compiled name the contracts folder.
    pytest.param(*_replace('  version: "1.0.0"\n', ""), FILE, id="main-without-version"),
    pytest.param(
        *_replace(
            '$ref: "#/components/schemas/PredictionResponse"',
            '$ref: "#/components/schemas/PredictionResponze"',
        ),
        FILE,
        id="main-dangling-ref",
    ),
    pytest.param(
        *_replace("propertyName: model_id", "propertyName: model"),
        FOLDER,
        id="main-wrong-discriminator",
    ),
    pytest.param(
        *_replace('        features: {$ref: "#/components/schemas/CustomerChurnFeatures"}\n', ""),
        FOLDER,
        id="main-model-without-features",
    ),
]


@pytest.mark.parametrize(("name", "content", "blamed"), BROKEN)
def test_broken_contract_is_reported_not_raised(data_dirs: Path, name, content, blamed) -> None:
    """A broken contract gives fault lines naming its file (or its folder), never a crash."""
    contracts = data_dirs / "contracts"
    assert check_contracts(contracts) == []  # the copy starts out sound
    path = contracts / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    faults = check_contracts(contracts)
    assert faults
    assert all(isinstance(f, str) for f in faults), faults
    where = str(path) if blamed == FILE else str(contracts)
    assert all(f.startswith(where) for f in faults), faults


def test_broken_extra_document_leaves_the_main_one_unblamed(data_dirs: Path) -> None:
    """A fault in one document is reported against it, not against its sound neighbour."""
    contracts = data_dirs / "contracts"
    (contracts / "extra.yaml").write_text("openapi: 3.1.0\ninfo: {title: x}\npaths: {}\n")
    faults = check_contracts(contracts)
    assert faults
    assert all(str(contracts / "extra.yaml") in f for f in faults), faults
    assert not any(MAIN in f for f in faults), faults


CHURN = load_contracts(CONTRACTS).models["customer-churn"]


@pytest.mark.parametrize(
    ("name", "given", "expected", "kind"),
    [
        pytest.param("tenure_months", 24.0, 24, int, id="integer-from-24.0"),
        pytest.param("tenure_months", 24, 24, int, id="integer-stays"),
        pytest.param("monthly_charges", 90, 90.0, float, id="number-from-90"),
        pytest.param("monthly_charges", 89.99, 89.99, float, id="number-stays"),
        pytest.param("monthly_charges", 0, 0.0, float, id="number-from-0"),
        pytest.param("customer_id", "12345", "12345", str, id="string-untouched"),
    ],
)
def test_canonical_features_make_numeric_types_exact(name, given, expected, kind) -> None:
    """canonical_features turns 24.0 into 24 for integers and 90 into 90.0 for numbers."""
    features = {**CHURN_REQUEST["features"], name: given}
    canonical = CHURN.canonical_features(features)
    assert canonical[name] == expected
    assert type(canonical[name]) is kind
    assert set(canonical) == set(features)


def test_customer_churn_pii_features() -> None:
    """Only customer_id is marked x-pii in the customer-churn contract."""
    assert CHURN.pii_features == frozenset({"customer_id"})
