"""`aigw contracts check` and `aigw policy validate`: exit codes and what they print."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

REPO = Path(__file__).resolve().parents[1]
CHURN = "customer-churn.yaml"


@pytest.fixture
def use_dirs(monkeypatch):
    """Point the AIGW_*_DIR settings at a root holding contracts/, policies/, fallbacks/."""

    def point_at(root: Path) -> None:
        monkeypatch.setenv("AIGW_CONTRACTS_DIR", str(root / "contracts"))
        monkeypatch.setenv("AIGW_POLICIES_DIR", str(root / "policies"))
        monkeypatch.setenv("AIGW_FALLBACKS_DIR", str(root / "fallbacks"))

    monkeypatch.delenv("AIGW_TRITON_URL", raising=False)
    return point_at


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def fault_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line]


# --- contracts check ----------------------------------------------------------------------------


def test_contracts_check_passes_on_the_repo(use_dirs, capsys):
    """`contracts check` exits 0 on the repo's contracts and says so on stdout."""
    use_dirs(REPO)
    assert main(["contracts", "check"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{REPO / 'contracts'}: every contract is valid OpenAPI 3.1"
    assert err == ""


def test_contracts_check_takes_a_directory_argument(use_dirs, data_dirs, capsys):
    """The directory argument overrides AIGW_CONTRACTS_DIR."""
    use_dirs(REPO)
    edit(data_dirs / "contracts" / "gateway.v1.yaml", "openapi: 3.1.0", "openapi: 3.0.3")
    assert main(["contracts", "check", str(data_dirs / "contracts")]) == 1
    _, err = capsys.readouterr()
    contract = data_dirs / "contracts" / "gateway.v1.yaml"
    assert fault_lines(err) == [f"{contract}: /openapi: must be an OpenAPI 3.1 document"]


def test_contracts_check_fails_listing_every_fault(use_dirs, data_dirs, capsys):
    """A broken contract copy exits 1 with one `file: /pointer: message` fault per problem."""
    use_dirs(data_dirs)
    contract = data_dirs / "contracts" / "gateway.v1.yaml"
    edit(contract, "          description: Alive.\n", "")
    edit(contract, "operationId: getReadiness", "operationId: 12")
    assert main(["contracts", "check"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f'{contract}: /paths/~1healthz/get/responses/200: "description" is a required' in err
    assert f"{contract}: /paths/~1readyz/get/operationId: 12 is not of type" in err


def test_contracts_check_prints_one_line_per_fault(use_dirs, data_dirs, capsys):
    """Every stderr line of a failed check is one `file: /pointer: message` fault."""
    use_dirs(data_dirs)
    contract = data_dirs / "contracts" / "gateway.v1.yaml"
    edit(contract, "operationId: getReadiness", "operationId: 12")
    assert main(["contracts", "check"]) == 1
    _, err = capsys.readouterr()
    assert fault_lines(err) == [
        f'{contract}: /paths/~1readyz/get/operationId: 12 is not of type "string"'
    ]


def test_contracts_check_fails_on_a_missing_directory(use_dirs, tmp_path, capsys):
    """A contracts directory that does not exist is a fault, exit 1."""
    use_dirs(tmp_path)
    assert main(["contracts", "check"]) == 1
    _, err = capsys.readouterr()
    assert fault_lines(err) == [f"{tmp_path / 'contracts'}: contracts directory not found"]


# --- policy validate ------------------------------------------------------------------------------


def test_policy_validate_passes_on_the_repo(use_dirs, capsys):
    """`policy validate` exits 0 on the repo and reports the policies' count and version."""
    use_dirs(REPO)
    assert main(["policy", "validate"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{REPO / 'policies'}: 1 policies valid (version ")
    assert err == ""


@pytest.mark.parametrize(
    ("old", "new", "field", "fragment"),
    [
        ("timeout_ms: 400", "timeout_ms: 0", "timeout_ms", "greater than or equal to 1"),
        ('version: "1"', 'version: "v1"', "targets.churn-gbm.version", "should match pattern"),
        ("min_calls: 10", "min_calls: 30", "targets.churn-gbm.breaker", "min_calls must be"),
        ("retry:", "retries:", "retries", "Extra inputs are not permitted"),
        (
            "features: [tenure_months, monthly_charges]",
            "features: [customer_id, monthly_charges]",
            "targets.churn-gbm.inputs.0.features.0",
            "customer_id is a string, not a number",
        ),
    ],
    ids=["timeout", "version", "breaker", "typo", "string-feature"],
)
def test_policy_validate_fails_on_a_broken_policy(
    use_dirs, data_dirs, capsys, old, new, field, fragment
):
    """A broken policy exits 1 with `file: field: message` lines on stderr, nothing on stdout."""
    use_dirs(data_dirs)
    policy = data_dirs / "policies" / CHURN
    edit(policy, old, new)
    assert main(["policy", "validate"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = fault_lines(err)
    assert any(line.startswith(f"{policy}: {field}: ") and fragment in line for line in lines), err


def test_policy_validate_lists_several_faults(use_dirs, data_dirs, capsys):
    """Every fault of a broken policy is printed, one per line."""
    use_dirs(data_dirs)
    policy = data_dirs / "policies" / CHURN
    edit(policy, "timeout_ms: 400", "timeout_ms: 0")
    edit(policy, 'version: "1"', 'version: "v1"')
    assert main(["policy", "validate"]) == 1
    lines = fault_lines(capsys.readouterr().err)
    assert f"{policy}: timeout_ms: Input should be greater than or equal to 1" in lines
    assert f"{policy}: targets.churn-gbm.version: String should match pattern '^[0-9]+$'" in lines


def test_policy_validate_expands_the_environment(use_dirs, monkeypatch, capsys):
    """Policies are validated with the process environment's ${VAR} values."""
    use_dirs(REPO)
    monkeypatch.setenv("AIGW_TRITON_URL", "http://triton:8000")
    assert main(["policy", "validate"]) == 1
    lines = fault_lines(capsys.readouterr().err)
    policy = REPO / "policies" / CHURN
    assert any(line.startswith(f"{policy}: targets.churn-gbm.url: ") for line in lines), lines
    assert any(line.startswith(f"{policy}: targets.churn-logreg.url: ") for line in lines), lines


def test_policy_validate_takes_a_directory_argument(use_dirs, data_dirs, capsys):
    """The directory argument overrides AIGW_POLICIES_DIR."""
    use_dirs(REPO)
    edit(data_dirs / "policies" / CHURN, "timeout_ms: 400", "timeout_ms: 0")
    assert main(["policy", "validate", str(data_dirs / "policies")]) == 1
    assert f"{data_dirs / 'policies' / CHURN}: timeout_ms: " in capsys.readouterr().err


def test_policy_validate_checks_the_fallbacks_too(use_dirs, data_dirs, capsys):
    """A broken fallback rule fails `policy validate`, naming file and rule."""
    use_dirs(data_dirs)
    fallbacks = data_dirs / "fallbacks" / CHURN
    edit(fallbacks, "when: features.tenure_months < 6", "when: features.tenure_months <")
    assert main(["policy", "validate"]) == 1
    lines = fault_lines(capsys.readouterr().err)
    assert any(
        line.startswith(f"{fallbacks}: rules.1 (new-customer): when: does not compile")
        and "<input>:1:" in line
        for line in lines
    ), lines


def test_policy_validate_checks_the_contracts_too(use_dirs, data_dirs, capsys):
    """A broken contract fails `policy validate` before any policy is read."""
    use_dirs(data_dirs)
    contract = data_dirs / "contracts" / "gateway.v1.yaml"
    edit(contract, "openapi: 3.1.0", "openapi: 3.0.3")
    assert main(["policy", "validate"]) == 1
    assert fault_lines(capsys.readouterr().err) == [
        f"{contract}: /openapi: must be an OpenAPI 3.1 document"
    ]


@pytest.mark.parametrize("argv", [[], ["policy"], ["contracts"], ["policy", "check"]])
def test_incomplete_commands_are_usage_errors(argv, capsys):
    """A missing or unknown command is an argparse usage error (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: aigw" in capsys.readouterr().err
