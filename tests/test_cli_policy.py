"""`aigw policy diff|apply|history|rollback` against a running gateway, and `simulate`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.demo.triton_process import free_port
from gateway.policy_sync import CHANNEL
from tests.integration.conftest import GatewayProcess


@pytest.fixture
def running_gateway(data_dirs: Path, tmp_path: Path, monkeypatch):
    """`aigw serve` on data_dirs, its admin API on a free loopback port."""
    admin_port = free_port()
    env = {
        "AIGW_TRITON_URL": f"127.0.0.1:{free_port()}",
        "AIGW_CONTRACTS_DIR": str(data_dirs / "contracts"),
        "AIGW_POLICIES_DIR": str(data_dirs / "policies"),
        "AIGW_FALLBACKS_DIR": str(data_dirs / "fallbacks"),
        "AIGW_AUDIT_DIR": str(tmp_path / "audit"),
        "AIGW_ADMIN_PORT": str(admin_port),
        "AIGW_WATCH_POLICIES": "false",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gateway = GatewayProcess(env, tmp_path / "gateway.log")
    gateway.wait_until_live()
    yield f"http://127.0.0.1:{admin_port}"
    gateway.stop()


def proposed_copy(data_dirs: Path, tmp_path: Path) -> Path:
    """A proposed policies directory: the challenger gets 60% of customers."""
    proposed = tmp_path / "proposed"
    shutil.copytree(data_dirs / "policies", proposed)
    policy = proposed / "customer-churn.yaml"
    text = (
        policy.read_text().replace("weight: 90", "weight: 40").replace("weight: 10", "weight: 60")
    )
    policy.write_text(text)
    return proposed


def test_policy_commands_against_a_running_gateway(running_gateway, data_dirs, tmp_path, capsys):
    """diff shows the change, apply makes version 2, history lists both, rollback makes 3."""
    proposed = proposed_copy(data_dirs, tmp_path)
    url = ["--admin-url", running_gateway]
    assert main(["policy", "diff", *url, "--policies", str(proposed)]) == 0
    assert "+    weight: 60" in capsys.readouterr().out
    assert main(["policy", "apply", *url, "--policies", str(proposed), "--author", "ci"]) == 0
    assert "applied version 2" in capsys.readouterr().out
    assert main(["policy", "rollback", *url, "1", "--author", "ci"]) == 0
    assert main(["policy", "history", *url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["1", "2", "3"]
    assert "rollback:1" in lines[-1]


def test_policy_diff_says_which_arms_restart_their_statistics(
    running_gateway, data_dirs, tmp_path, capsys
):
    """A new version behind the challenger: the diff ends by saying its statistics restart."""
    proposed = proposed_copy(data_dirs, tmp_path)
    policy = proposed / "customer-churn.yaml"
    policy.write_text(
        policy.read_text().replace(
            'model: churn_gbm_v2\n    version: "1"', 'model: churn_gbm_v2\n    version: "2"'
        )
    )
    url = ["--admin-url", running_gateway]
    assert main(["policy", "diff", *url, "--policies", str(proposed)]) == 0
    assert (
        "customer-churn/challenger: churn_gbm_v2:1 -> churn_gbm_v2:2: its experiment statistics"
        " start afresh" in capsys.readouterr().out
    )


def test_policy_apply_of_a_broken_directory_fails_with_the_fault(
    running_gateway, data_dirs, tmp_path, capsys
):
    """A broken local policy is refused by the gateway; the CLI prints why and exits 1."""
    proposed = proposed_copy(data_dirs, tmp_path)
    policy = proposed / "customer-churn.yaml"
    policy.write_text(policy.read_text().replace("timeout_ms: 400", "timeout_ms: 0"))
    code = main(["policy", "apply", "--admin-url", running_gateway, "--policies", str(proposed),
                 "--author", "ci"])  # fmt: skip
    assert code == 1
    assert "customer-churn.yaml: timeout_ms:" in capsys.readouterr().err


def test_unreachable_admin_api_is_a_clear_error(capsys):
    """No gateway listening: exit 1 and say which address could not be reached."""
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["policy", "history", "--admin-url", url]) == 1
    assert "cannot reach the admin API" in capsys.readouterr().err


def test_simulate_counts_who_would_change_arm(data_dirs, tmp_path, capsys, monkeypatch):
    """Replaying 2,000 inputs: about half move control -> challenger, none the other way."""
    monkeypatch.setenv("AIGW_CONTRACTS_DIR", str(data_dirs / "contracts"))
    monkeypatch.setenv("AIGW_POLICIES_DIR", str(data_dirs / "policies"))
    proposed = proposed_copy(data_dirs, tmp_path)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(
        "\n".join(
            json.dumps({"model_id": "customer-churn", "features": {
                "customer_id": f"sim-{i}", "tenure_months": i % 60, "monthly_charges": 50.0}})
            for i in range(2000)
        ) + "\n" + json.dumps({"model_id": "unknown", "features": {}}) + "\n"
    )  # fmt: skip
    assert main(["policy", "simulate", str(proposed), "--inputs", str(inputs)]) == 0
    report = json.loads(capsys.readouterr().out)
    changes = report["models"]["customer-churn"]
    assert report["inputs"] == 2001 and report["skipped"] == 1
    assert set(changes["moves"]) == {"control -> challenger"}
    assert 0.47 * 2000 <= changes["arm_changed"] <= 0.53 * 2000
    assert changes["target_changed"] == changes["arm_changed"]


def test_apply_on_one_gateway_process_reaches_another_through_redis(
    data_dirs, tmp_path, redis_server, monkeypatch
):
    """Two `aigw serve` processes share a redis-server: B serves A's apply within 1 s."""
    import httpx
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    common = {
        "AIGW_TRITON_URL": f"127.0.0.1:{free_port()}",
        "AIGW_CONTRACTS_DIR": str(data_dirs / "contracts"),
        "AIGW_POLICIES_DIR": str(data_dirs / "policies"),
        "AIGW_FALLBACKS_DIR": str(data_dirs / "fallbacks"),
        "AIGW_REDIS_URL": redis_server.url,
        "AIGW_SHARE_POLICIES": "true",
        "AIGW_WATCH_POLICIES": "false",
    }
    admin_a = free_port()
    already = redis_server.subscribers(CHANNEL)  # before either process starts
    a = GatewayProcess({**common, "AIGW_ADMIN_PORT": str(admin_a),
                        "AIGW_AUDIT_DIR": str(tmp_path / "a")}, tmp_path / "a.log")  # fmt: skip
    b = GatewayProcess({**common, "AIGW_ADMIN_PORT": str(free_port()),
                        "AIGW_AUDIT_DIR": str(tmp_path / "b")}, tmp_path / "b.log")  # fmt: skip
    try:
        a.wait_until_live()
        b.wait_until_live()
        redis_server.wait_for_subscribers(CHANNEL, already + 2)
        before = httpx.get(b.base_url + "/readyz").json()["checks"]["policies"]
        proposed = proposed_copy(data_dirs, tmp_path)
        args = ["--admin-url", f"http://127.0.0.1:{admin_a}", "--policies", str(proposed)]
        assert main(["policy", "apply", *args, "--author", "ci"]) == 0
        applied_at = time.monotonic()
        seen = before
        while seen == before and time.monotonic() - applied_at < 1.0:
            seen = httpx.get(b.base_url + "/readyz").json()["checks"]["policies"]
        after_a = httpx.get(a.base_url + "/readyz").json()["checks"]["policies"]
    finally:
        a.stop()
        b.stop()
    assert seen == after_a != before


SHIPPED_POLICY = "policies/customer-churn.yaml"


def hostile_copy(data_dirs: Path, old: str, new: str) -> Path:
    """The shipped policy in data_dirs with `old` replaced by `new`; its path."""
    policy = data_dirs / SHIPPED_POLICY
    text = policy.read_text()
    assert old in text
    policy.write_text(text.replace(old, new, 1))
    return policy


@pytest.mark.parametrize(
    ("old", "new", "fault"),
    [
        pytest.param(
            "max_entries: 100000",
            "max_entries: 100000000000000000000000000",
            "cache.max_entries: Input should be less than or equal to 100000000",
            id="integer-beyond-64-bits",
        ),
        pytest.param(
            "timeout_ms: 400\n",
            "timeout_ms: 400\nx: " + "[" * 50_000 + "]" * 50_000 + "\n",
            "line 7, column 67: cannot be read: nested too deeply (more than 64 levels)",
            id="nested-too-deeply",
        ),
        pytest.param(
            "timeout_ms: 400\n",
            "timeout_ms: 400\ntimeout_ms: 5\n",
            "line 7, column 1: cannot be read: key 'timeout_ms' appears twice",
            id="key-twice",
        ),
    ],
)
def test_policy_validate_of_a_hostile_file_is_one_line_per_fault(
    data_dirs, capsys, monkeypatch, old, new, fault
):
    """`aigw policy validate` names the file and the fault, exits 1, prints no traceback."""
    monkeypatch.setenv("AIGW_CONTRACTS_DIR", str(data_dirs / "contracts"))
    monkeypatch.setenv("AIGW_FALLBACKS_DIR", str(data_dirs / "fallbacks"))
    policy = hostile_copy(data_dirs, old, new)
    assert main(["policy", "validate", str(policy.parent)]) == 1
    err = capsys.readouterr().err
    assert f"{policy}: {fault}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("action", ["diff", "apply"])
def test_policy_diff_and_apply_name_a_file_that_cannot_be_read(data_dirs, capsys, action):
    """A file that is not UTF-8 is named, and nothing is sent: exit 1, no traceback."""
    (data_dirs / "policies" / "notes.yaml").write_bytes(b"# caf\xe9\n")
    author = ["--author", "ci"] if action == "apply" else []
    code = main(["policy", action, "--admin-url", f"http://127.0.0.1:{free_port()}",
                 "--policies", str(data_dirs / "policies"), *author])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("policies/notes.yaml: cannot be read: 'utf-8' codec can't decode"), err
    assert "cannot reach the admin API" not in err


@pytest.mark.parametrize(
    ("line", "problem"),
    [("1", "line 2: a int, not a JSON object"), ("[1, 2]", "line 2: a list, not a JSON object")],
    ids=["number", "list"],
)
def test_simulate_names_the_input_line_that_is_not_an_object(
    data_dirs, tmp_path, capsys, monkeypatch, line, problem
):
    """An inputs line that is valid JSON but no object is refused by its number, exit 1."""
    monkeypatch.setenv("AIGW_CONTRACTS_DIR", str(data_dirs / "contracts"))
    monkeypatch.setenv("AIGW_POLICIES_DIR", str(data_dirs / "policies"))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"model_id": "customer-churn", "features": {}}\n' + line + "\n")
    assert main(["policy", "simulate", str(data_dirs / "policies"), "--inputs", str(inputs)]) == 1
    err = capsys.readouterr().err
    assert err == f"{inputs}: cannot be read as JSON lines: {problem}\n"
