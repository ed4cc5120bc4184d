"""Policy versions shared by replicas through a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from gateway.app import create_admin_app, create_app
from gateway.demo.triton_process import free_port
from gateway.policy_store import read_bundle
from tests.conftest import CHURN_REQUEST, settings_for

NOWHERE = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


@asynccontextmanager
async def replica(root: Path, redis_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    settings = settings_for(root, redis_url=redis_url, share_policies=True, watch_policies=False)
    app = create_app(settings, env=NOWHERE)
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(LifespanManager(app))
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://g"
        )
        admin_app = create_admin_app(app)
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=admin_app), base_url="http://a")
        await stack.enter_async_context(public)
        await stack.enter_async_context(admin)
        yield public, admin


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
    async with (
        replica(data_dirs, redis_server.url) as (public_a, admin_a),
        replica(data_dirs, redis_server.url) as (public_b, _),
    ):
        await asyncio.sleep(0.3)  # both subscribed
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
