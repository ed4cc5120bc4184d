"""Policy versions shared by replicas through a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import orjson
from asgi_lifespan import LifespanManager

from gateway.app import create_admin_app, create_app
from gateway.demo.triton_process import free_port
from gateway.policy_store import read_bundle
from gateway.policy_sync import CHANNEL
from gateway.settings import Settings
from tests.conftest import CHURN_REQUEST, settings_for

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


@asynccontextmanager
async def public_and_admin(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    """An in-process gateway (lifespan run) and clients on its public and admin APIs."""
    app = create_app(settings, env=NOWHERE)
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(LifespanManager(app))
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(app)), base_url="http://a"
        )
        await stack.enter_async_context(public)
        await stack.enter_async_context(admin)
        yield public, admin


def replica(root: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """A replica sharing policy versions through Redis."""
    return public_and_admin(
        settings_for(root, redis_url=redis_url, share_policies=True, watch_policies=False)
    )


async def policy_hash(client: httpx.AsyncClient) -> str:
    return (await client.get("/readyz")).json()["checks"]["policies"]


async def test_an_apply_on_one_replica_is_served_by_the_other_within_a_second(
    data_dirs, redis_server
):
    """Replica B runs what was applied on replica A within 1 s, and reports it."""
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    bundle = read_bundle(data_dirs / "policies", data_dirs / "fallbacks").to_dict()
    text = bundle["policies"]["customer-churn.yaml"]
    bundle["policies"]["customer-churn.yaml"] = text.replace("weight: 90", "weight: 0")
    already = redis_server.subscribers(CHANNEL)
    async with (
        replica(data_dirs, redis_server.url) as (public_a, admin_a),
        replica(data_dirs, redis_server.url) as (public_b, _),
    ):
        await asyncio.to_thread(redis_server.wait_for_subscribers, CHANNEL, already + 2)
        before = await policy_hash(public_b)
        applied = await admin_a.post("/admin/policies", json={"author": "ops", "bundle": bundle})
        started = time.monotonic()
        while await policy_hash(public_b) == before and time.monotonic() - started < 1.0:
            await asyncio.sleep(0.02)
        waited = time.monotonic() - started
        answer_b = (await public_b.post("/v1/predictions", json=CHURN_REQUEST)).json()
        hashes = (await policy_hash(public_a), await policy_hash(public_b))
    assert applied.status_code == 200
    assert hashes[0] == hashes[1] != before, f"not propagated after {waited:.2f} s"
    assert answer_b["arm"] == "challenger"


def worker(root: Path, workers_dir: Path, index: int):  # type: ignore[no-untyped-def]
    """One worker of `aigw serve --workers N`, in process: its own app, the shared dir."""
    return public_and_admin(
        settings_for(root, worker_index=index, workers_dir=workers_dir, watch_policies=False)
    )


async def wait_for_hash(client: httpx.AsyncClient, unlike: str, within_s: float) -> str:
    deadline = time.monotonic() + within_s
    current = await policy_hash(client)
    while current == unlike and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        current = await policy_hash(client)
    return current


def challenger_only(data_dirs: Path) -> dict:
    bundle = read_bundle(data_dirs / "policies", data_dirs / "fallbacks").to_dict()
    text = bundle["policies"]["customer-churn.yaml"]
    bundle["policies"]["customer-churn.yaml"] = text.replace("weight: 90", "weight: 0")
    return bundle


async def test_an_apply_in_one_worker_is_served_by_its_sibling_without_redis(data_dirs, tmp_path):
    """Worker 1 runs what was applied through worker 0's admin API, through the shared dir."""
    workers_dir = tmp_path / "workers"
    workers_dir.mkdir()
    async with (
        worker(data_dirs, workers_dir, 0) as (public_0, admin_0),
        worker(data_dirs, workers_dir, 1) as (public_1, _),
    ):
        before = await policy_hash(public_1)
        body = {"author": "ops", "bundle": challenger_only(data_dirs)}
        applied = await admin_0.post("/admin/policies", json=body)
        after = await wait_for_hash(public_1, unlike=before, within_s=2.0)
        answer_1 = (await public_1.post("/v1/predictions", json=CHURN_REQUEST)).json()
        ready_1 = (await public_1.get("/readyz")).json()["checks"]
        assert after == await policy_hash(public_0)
    assert applied.status_code == 200
    assert after != before
    assert answer_1["arm"] == "challenger"
    assert ready_1["policy_version"] == "2"


async def test_a_restarted_worker_adopts_what_its_siblings_run_before_serving(data_dirs, tmp_path):
    """A worker started after an apply serves the applied version from its first request."""
    workers_dir = tmp_path / "workers"
    workers_dir.mkdir()
    async with worker(data_dirs, workers_dir, 0) as (public_0, admin_0):
        body = {"author": "ops", "bundle": challenger_only(data_dirs)}
        assert (await admin_0.post("/admin/policies", json=body)).status_code == 200
        applied_hash = await policy_hash(public_0)
        async with worker(data_dirs, workers_dir, 1) as (public_1, _):
            first_hash = await policy_hash(public_1)
    assert first_hash == applied_hash


async def test_a_malformed_shared_version_is_ignored_and_the_next_good_one_adopted(
    data_dirs, tmp_path
):
    """Garbage in the shared file changes nothing, and the follower survives it."""
    workers_dir = tmp_path / "workers"
    workers_dir.mkdir()
    shared = workers_dir / "policy-current.json"
    async with worker(data_dirs, workers_dir, 1) as (public_1, _):
        before = await policy_hash(public_1)
        shared.write_bytes(b'{"origin": "worker-0", "bundle"')
        await asyncio.sleep(0.6)  # a few polls
        after_garbage = await policy_hash(public_1)
        message = {"origin": "worker-0", "author": "ops", "bundle": challenger_only(data_dirs)}
        shared.write_bytes(orjson.dumps(message))
        after_good = await wait_for_hash(public_1, unlike=before, within_s=2.0)
    assert after_garbage == before
    assert after_good != before
