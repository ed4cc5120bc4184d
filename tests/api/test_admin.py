"""The admin API: validate, diff, apply, history, roll back; file watching; all audited."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.api.admin import fault_pointer
from gateway.app import create_admin_app, create_app
from gateway.demo.triton_process import free_port
from gateway.policy_store import read_bundle
from tests.conftest import CHURN_REQUEST, settings_for

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


@asynccontextmanager
async def gateway_and_admin(
    root: Path, env: dict[str, str] = NOWHERE, **settings: object
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, Path]]:
    audit_dir = root / "audit"
    app = create_app(settings_for(root, audit_dir=audit_dir, **settings), env=env)
    admin_app = create_admin_app(app)
    async with LifespanManager(app) as manager:
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=admin_app), base_url="http://a")
        async with public, admin:
            yield public, admin, audit_dir


def bundle_with(root: Path, old: str, new: str) -> dict:
    bundle = read_bundle(root / "policies", root / "fallbacks").to_dict()
    text = bundle["policies"]["customer-churn.yaml"]
    assert old in text
    bundle["policies"]["customer-churn.yaml"] = text.replace(old, new)
    return bundle


ALL_TO_CHALLENGER = ("weight: 90", "weight: 0")
BROKEN_CHAIN = ("chain: [churn-gbm, churn-logreg", "chain: [churn-gbm, churn-nope")
CHALLENGER_TO_V2 = (
    'model: churn_gbm_v2\n    version: "1"',
    'model: churn_gbm_v2\n    version: "2"',
)
PREMIUM = {"x-customer-tier": "premium"}  # routed to the challenger arm


async def test_apply_then_rollback_restores_the_previous_behaviour(data_dirs):
    """An applied weight change moves traffic; rolling back restores the same arms exactly."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (public, admin, audit_dir):
        before = (await public.post("/v1/predictions", json=CHURN_REQUEST)).json()
        applied = await admin.post(
            "/admin/policies",
            json={"author": "ops@example", "bundle": bundle_with(data_dirs, *ALL_TO_CHALLENGER)},
        )
        during = (await public.post("/v1/predictions", json=CHURN_REQUEST)).json()
        rolled = await admin.post(
            "/admin/policies/rollback", json={"author": "ops@example", "version": 1}
        )
        after = (await public.post("/v1/predictions", json=CHURN_REQUEST)).json()
        history = (await admin.get("/admin/policies/history")).json()
    assert applied.status_code == 200 and applied.json()["version"] == 2
    assert (before["arm"], during["arm"], after["arm"]) == ("control", "challenger", "control")
    assert (after["prediction"], after["probability"]) == (
        before["prediction"],
        before["probability"],
    )
    assert rolled.json()["version"] == 3
    assert [v["content_hash"] for v in history][2] == history[0]["content_hash"]
    assert [v["author"] for v in history] == ["startup", "ops@example", "ops@example"]
    admin_records = [
        json.loads(line)
        for path in audit_dir.glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
        if '"type":"admin"' in line
    ]
    assert [r["action"] for r in admin_records] == ["apply", "apply"]


async def test_invalid_bundle_is_refused_with_its_faults_and_changes_nothing(data_dirs):
    """Validate and apply both name the fault by file and field; the running version stays."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (public, admin, _):
        broken = bundle_with(data_dirs, *BROKEN_CHAIN)
        validated = await admin.post("/admin/policies/validate", json={"bundle": broken})
        applied = await admin.post("/admin/policies", json={"author": "ops", "bundle": broken})
        current = (await admin.get("/admin/policies")).json()
        still = await public.post("/v1/predictions", json=CHURN_REQUEST)
        metrics = (await public.get("/metrics")).text
    for response in (validated, applied):
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert (
            "policies/customer-churn.yaml: arms.0.chain: chain names unknown steps: churn-nope"
            in response.text
        )
        pointers = {error["pointer"] for error in response.json()["errors"]}
        assert pointers == {"/bundle/policies/customer-churn.yaml"}  # the file at fault
    assert current["version"] == 1
    assert still.status_code == 200
    assert 'aigw_policy_reloads_total{outcome="refused"} 1.0' in metrics


async def test_diff_shows_the_proposed_change(data_dirs):
    """The diff names the file and shows the changed line."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (_, admin, _):
        response = await admin.post(
            "/admin/policies/diff", json={"bundle": bundle_with(data_dirs, *ALL_TO_CHALLENGER)}
        )
    diff = response.json()["diff"]
    assert "proposed/policies/customer-churn.yaml" in diff
    assert "-    weight: 90" in diff and "+    weight: 0" in diff
    assert response.json()["arm_models_changed"] == []  # weights only: no arm's model


async def test_diff_names_the_arms_whose_model_an_apply_would_change(data_dirs):
    """A new version behind the challenger restarts its statistics: the diff says so before
    the apply; a bundle that does not load names no arms (null), validate says why."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (_, admin, _):
        version_2 = await admin.post(
            "/admin/policies/diff", json={"bundle": bundle_with(data_dirs, *CHALLENGER_TO_V2)}
        )
        broken = await admin.post(
            "/admin/policies/diff", json={"bundle": bundle_with(data_dirs, *BROKEN_CHAIN)}
        )
    assert version_2.json()["arm_models_changed"] == [
        {"model_id": "customer-churn", "arm": "challenger",
         "from": "churn_gbm_v2:1", "to": "churn_gbm_v2:2"}
    ]  # fmt: skip
    assert broken.status_code == 200 and broken.json()["arm_models_changed"] is None


async def test_malformed_admin_requests_are_problems(data_dirs):
    """Bundles of the wrong shape, hostile file names, a missing author: 4xx problems."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (_, admin, _):
        cases = [
            await admin.post("/admin/policies", json={"author": "ops", "bundle": []}),
            await admin.post(
                "/admin/policies",
                json={"author": "ops", "bundle": {"policies": {"../x.yaml": ""}, "fallbacks": {}}},
            ),
            await admin.post("/admin/policies", json={"bundle": bundle_with(data_dirs, "x", "x")}),
            await admin.post("/admin/policies/rollback", json={"author": "ops", "version": 99}),
            await admin.post("/admin/policies/rollback", json={"author": "ops", "version": "1"}),
            await admin.post(
                "/admin/policies", content=b"{", headers={"content-type": "application/json"}
            ),
        ]
    assert [r.status_code for r in cases] == [422, 422, 422, 404, 422, 400]
    assert all(r.headers["content-type"] == "application/problem+json" for r in cases)


def replace_atomically(path: Path, text: str) -> None:
    """Write as a careful editor or a deploy does: a whole new file renamed over the old one.
    (write_text truncates first: a poll in between reads a half-written file, a second,
    different broken version, and counts a second refusal.)"""
    staged = path.parent.parent / f"{path.name}.staged"  # outside the watched folder
    staged.write_text(text)
    os.replace(staged, path)


async def test_edited_files_are_applied_and_broken_edits_refused(data_dirs):
    """The file watcher applies a valid edit and keeps the running version on a broken one."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    original = policy.read_text()
    async with gateway_and_admin(data_dirs, watch_interval_s=0.05) as (public, admin, _):
        replace_atomically(policy, original.replace(*ALL_TO_CHALLENGER))
        version = await until_version(admin, 2)
        moved = (await public.post("/v1/predictions", json=CHURN_REQUEST)).json()
        replace_atomically(policy, original.replace(*BROKEN_CHAIN))
        # Until the watcher has read and refused the edit (a busy machine may take a while),
        # then a few more polls: the broken edit must never be applied.
        metrics = await until_metric(public, REFUSED_ONCE)
        await asyncio.sleep(0.2)
        kept = (await admin.get("/admin/policies")).json()
    assert version["source"] == "files"
    assert moved["arm"] == "challenger"
    assert kept["version"] == 2
    assert REFUSED_ONCE in metrics


async def test_an_edit_made_while_the_gateway_starts_is_applied_not_taken_for_running(data_dirs):
    """Files are loaded when the app is made and serving starts later: an edit in between
    is not what runs, so version 1 must not claim it; the watcher applies it as version 2."""
    policy = data_dirs / "policies" / "customer-churn.yaml"
    app = create_app(
        settings_for(data_dirs, audit_dir=data_dirs / "audit", watch_interval_s=0.05), env=NOWHERE
    )
    replace_atomically(policy, policy.read_text().replace(*ALL_TO_CHALLENGER))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=create_admin_app(app))
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        async with public, httpx.AsyncClient(transport=transport, base_url="http://a") as admin:
            version = await until_version(admin, 2)
            answer = (await public.post("/v1/predictions", json=CHURN_REQUEST)).json()
    assert version["source"] == "files"
    assert answer["arm"] == "challenger"


REFUSED_ONCE = 'aigw_policy_reloads_total{outcome="refused"} 1.0'


async def test_a_file_that_cannot_be_read_is_refused_and_the_watcher_goes_on(data_dirs):
    """A file that is not UTF-8 is refused once (counted, audited); once it is gone the
    watcher applies the next valid edit: it never stops watching."""
    policies = data_dirs / "policies"
    policy = policies / "customer-churn.yaml"
    original = policy.read_text()
    async with gateway_and_admin(data_dirs, watch_interval_s=0.05) as (public, admin, audit_dir):
        (policies / "notes.yaml").write_bytes(b"# caf\xe9\n")
        metrics = await until_metric(public, REFUSED_ONCE)
        await asyncio.sleep(0.2)  # more polls: still refused once, not once a poll
        again = (await public.get("/metrics")).text
        (policies / "notes.yaml").unlink()
        replace_atomically(policy, original.replace(*ALL_TO_CHALLENGER))
        version = await until_version(admin, 2)
    assert REFUSED_ONCE in metrics and REFUSED_ONCE in again
    assert version["source"] == "files"
    refusals = [
        json.loads(line)
        for path in audit_dir.glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
        if '"action":"refused"' in line
    ]
    assert [r["faults"] for r in refusals] == [
        ["policies/notes.yaml: cannot be read: 'utf-8' codec can't decode byte 0xe9 in position 5: "
         "invalid continuation byte"]
    ]  # fmt: skip


async def until_metric(public: httpx.AsyncClient, line: str, within_s: float = 10.0) -> str:
    """The metrics text once it holds `line`; AssertionError after `within_s`."""
    for _ in range(int(within_s / 0.05)):
        text = (await public.get("/metrics")).text
        if line in text:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{line!r} did not appear within {within_s} s")


async def until_version(admin: httpx.AsyncClient, number: int, within_s: float = 5.0) -> dict:
    for _ in range(int(within_s / 0.05)):
        current = (await admin.get("/admin/policies")).json()
        if current["version"] >= number:
            return current
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {number} was not applied within {within_s} s")


async def test_twenty_reloads_half_invalid_under_load_fail_no_request(data_dirs):
    """20 applies, every other one invalid, during continuous requests: zero failures."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (public, admin, _):
        stop = asyncio.Event()
        statuses: list[int] = []
        versions_seen: set[str] = set()

        async def load() -> None:
            i = 0
            while not stop.is_set():
                features = {**CHURN_REQUEST["features"], "customer_id": f"reload-{i}"}
                response = await public.post(
                    "/v1/predictions", json={"model_id": "customer-churn", "features": features}
                )
                statuses.append(response.status_code)
                i += 1

        async def watch_readiness() -> None:
            while not stop.is_set():
                versions_seen.add((await public.get("/readyz")).json()["checks"]["policies"])
                await asyncio.sleep(0.005)  # a poller, not load: the four clients are the load

        workers = [asyncio.create_task(load()) for _ in range(4)]
        watcher = asyncio.create_task(watch_readiness())
        outcomes = []
        for n in range(20):
            change = ("weight: 90", f"weight: {50 + n}") if n % 2 == 0 else BROKEN_CHAIN
            response = await admin.post(
                "/admin/policies", json={"author": "ops", "bundle": bundle_with(data_dirs, *change)}
            )
            outcomes.append(response.status_code)
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*workers, watcher)
        history = (await admin.get("/admin/policies/history")).json()
    assert outcomes == [200, 422] * 10
    assert len(statuses) > 100 and set(statuses) == {200}
    assert len(history) == 11
    assert len(versions_seen) >= 2  # traffic ran across versions


async def test_a_new_model_behind_an_arm_is_reported_apart_after_an_apply(data_dirs):
    """The challenger's model moves from version 1 to 2: the report shows version 2's counts
    from zero and version 1's apart, and an outcome that arrives after the apply for a
    version-1 answer counts for version 1, never in version 2's accuracy."""
    async with gateway_and_admin(data_dirs, watch_policies=False) as (public, admin, _):
        old = await public.post("/v1/predictions", json=CHURN_REQUEST, headers=PREMIUM)
        bundle = bundle_with(data_dirs, *CHALLENGER_TO_V2)
        applied = await admin.post("/admin/policies", json={"author": "ops", "bundle": bundle})
        new = await public.post("/v1/predictions", json=CHURN_REQUEST, headers=PREMIUM)
        for answer in (old, new):
            judged = {"prediction_id": answer.json()["prediction_id"], "outcome": "churn"}
            assert (await public.post("/v1/feedback", json=judged)).status_code == 202
        report = (await public.get("/v1/experiments/customer-churn")).json()
    assert applied.status_code == 200, applied.text
    assert old.json()["arm"] == new.json()["arm"] == "challenger"
    challenger = report["arms"]["challenger"]
    assert (challenger["model"], challenger["requests"], challenger["feedback"]) == (
        "churn_gbm_v2:2", 1, 1,
    )  # fmt: skip
    earlier = challenger["earlier_models"]
    assert list(earlier) == ["churn_gbm_v2:1"]
    assert (earlier["churn_gbm_v2:1"]["requests"], earlier["churn_gbm_v2:1"]["feedback"]) == (1, 1)
    assert report["arms"]["control"]["earlier_models"] == {}  # its model did not change


@pytest.mark.parametrize(
    ("fault", "pointer"),
    [
        ("policies/churn.yaml: arms.0.weight: must be finite", "/bundle/policies/churn.yaml"),
        ("fallbacks/churn.yaml: rules.1.when: does not compile", "/bundle/fallbacks/churn.yaml"),
        ("(bundle): cannot be loaded: TypeError: x", "/bundle"),
        ("contracts/x.yaml: something", "/bundle"),
        ("policies: no file", "/bundle"),
    ],
)  # fmt: skip
def test_a_load_fault_points_at_the_bundle_file_it_names(fault, pointer):
    assert fault_pointer(fault) == pointer
