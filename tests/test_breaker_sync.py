"""Breaker openings shared across replicas through a real redis-server, and across the
workers of one machine through files in their directory."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.app import create_admin_app, create_app
from gateway.breaker_sync import CHANNEL, BreakerFileSync, BreakerSync, remaining_open_s
from gateway.demo.triton_process import free_port
from gateway.policy import BreakerConfig
from gateway.policy_store import read_bundle
from gateway.resilience import CLOSED, OPEN, Breaker, Outcome
from tests.conftest import CHURN_REQUEST, settings_for

CONFIG = BreakerConfig(failure_threshold=2, reset_timeout_s=3, max_reset_timeout_s=3)
NAME = "customer-churn/churn-gbm"


def replica_breakers() -> dict[str, Breaker]:
    return {NAME: Breaker(NAME, CONFIG, jitter=lambda: 0.0)}


def redis_sync(url: str, breakers: dict[str, Breaker], **options) -> BreakerSync:  # type: ignore[no-untyped-def]
    """A sync over `breakers`, told of their trips as the runtime tells it."""
    sync = BreakerSync(url, lambda: breakers, **options)
    for breaker in breakers.values():
        breaker.on_trip(sync.share)
    return sync


def file_sync(directory, breakers: dict[str, Breaker], **options) -> BreakerFileSync:  # type: ignore[no-untyped-def]
    sync = BreakerFileSync(directory, lambda: breakers, **options)
    for breaker in breakers.values():
        breaker.on_trip(sync.share)
    return sync


def trip(breaker: Breaker) -> None:
    now = time.monotonic()
    for _ in range(CONFIG.failure_threshold):
        permit = breaker.try_acquire(now)
        assert permit is not None
        breaker.record(permit, Outcome.FAILURE, 0.01, now)
    assert breaker.state == OPEN


def assert_open_until_the_same_moment(tripped: Breaker, adopter: Breaker) -> None:
    """The adopter ends its opening when the breaker that tripped does, however long the
    opening took to arrive (it travels as a moment, not a duration)."""
    now = time.monotonic()
    assert tripped.open_remaining(now) > 0
    assert abs(adopter.open_remaining(now) - tripped.open_remaining(now)) < 0.05


async def until(condition, within_s: float = 1.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"breaker": NAME, "until": 110.0, "replica": "peer"}, 10.0),
        ({"breaker": NAME, "until": 110.0, "replica": "me"}, None),
        ({"breaker": NAME, "until": 90.0, "replica": "peer"}, None),
        ({"breaker": NAME, "until": "soon", "replica": "peer"}, None),
        ({"breaker": NAME, "until": True, "replica": "peer"}, None),
        ({"breaker": NAME, "replica": "peer"}, None),
        ([], None),
    ],
)
def test_remaining_open_time_of_a_peer_message(message, expected):
    """Only a peer's opening that still lies in the future applies; junk is ignored."""
    assert remaining_open_s(message, "me", wall_now=100.0) == expected


async def test_an_opening_on_one_replica_opens_the_breaker_on_the_others(redis_server):
    """Replica A trips; replica B opens the same breaker within a second, C on joining."""
    a, b = replica_breakers(), replica_breakers()
    sync_a, sync_b = redis_sync(redis_server.url, a), redis_sync(redis_server.url, b)
    await sync_a.start()
    await sync_b.start()
    try:
        assert await until(lambda: sync_a.connected and sync_b.connected)
        trip(a[NAME])
        assert await until(lambda: b[NAME].state == OPEN)
        assert_open_until_the_same_moment(a[NAME], b[NAME])

        c = replica_breakers()
        sync_c = redis_sync(redis_server.url, c)
        await sync_c.start()
        try:
            assert await until(lambda: c[NAME].state == OPEN)
        finally:
            await sync_c.stop()
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_unknown_breakers_and_own_messages_are_not_adopted(redis_server):
    """A peer's opening of a breaker this replica lacks, or its own echo, changes nothing."""
    breakers = replica_breakers()
    sync = redis_sync(redis_server.url, breakers, replica_id="me")
    try:
        far = time.time() + 10
        assert not sync.adopt({"breaker": "other/target", "until": far, "replica": "peer"})
        assert not sync.adopt({"breaker": NAME, "until": far, "replica": "me"})
        assert breakers[NAME].state == CLOSED
    finally:
        await sync.stop()


async def test_unreachable_redis_leaves_local_breakers_working(unreachable_redis_url):
    """With Redis down, a replica's breakers still trip and recover on their own."""
    breakers = replica_breakers()
    sync = redis_sync(unreachable_redis_url, breakers)
    await sync.start()
    try:
        trip(breakers[NAME])
        await asyncio.sleep(0.3)  # let the publisher try and fail
        assert not sync.connected
        assert breakers[NAME].state == OPEN
    finally:
        await sync.stop()


async def test_an_opening_in_one_worker_opens_the_breaker_in_its_siblings(tmp_path):
    """Worker A trips; worker B opens the same breaker within a poll, C on starting."""
    a, b = replica_breakers(), replica_breakers()
    sync_a = file_sync(tmp_path, a, replica_id="a", interval_s=0.05)
    sync_b = file_sync(tmp_path, b, replica_id="b", interval_s=0.05)
    await sync_a.start()
    await sync_b.start()
    try:
        trip(a[NAME])
        assert await until(lambda: b[NAME].state == OPEN)
        assert_open_until_the_same_moment(a[NAME], b[NAME])

        c = replica_breakers()
        sync_c = file_sync(tmp_path, c, replica_id="c", interval_s=60)
        await sync_c.start()  # adopts what is open before it serves, not at its first poll
        await sync_c.stop()
        assert c[NAME].state == OPEN
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_an_opening_reaches_the_breaker_a_policy_apply_put_in_place(tmp_path):
    """The sibling looks its breakers up when an opening comes, so one that replaced the
    breaker it started with (a policy apply) is the one opened."""
    a, live = replica_breakers(), replica_breakers()
    started_with = live[NAME]
    sync_a = file_sync(tmp_path, a, replica_id="a")
    sync_b = BreakerFileSync(tmp_path, lambda: live, replica_id="b", interval_s=60)
    await sync_a.start()
    await sync_b.start()
    try:
        live[NAME] = Breaker(NAME, CONFIG, jitter=lambda: 0.0)
        trip(a[NAME])
        assert await until(lambda: sync_b.poll() == 1)
        assert live[NAME].state == OPEN
        assert started_with.state == CLOSED
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_a_breaker_created_after_a_peers_opening_takes_it_up(tmp_path):
    """Worker B has no such breaker when A's opening arrives (its policy lacks the target);
    an apply then creates it: it opens until A's moment, not at A's next trip. An opening
    that has ended, or B's own, opens nothing."""
    a, live = replica_breakers(), {}
    sync_a = file_sync(tmp_path, a, replica_id="a")
    sync_b = BreakerFileSync(tmp_path, lambda: live, replica_id="b", interval_s=60)
    await sync_a.start()
    await sync_b.start()
    try:
        trip(a[NAME])
        assert await until(lambda: (tmp_path / "customer-churn%2Fchurn-gbm.json").exists())
        assert sync_b.poll() == 0  # read, nothing to open yet
        created = Breaker(NAME, CONFIG, jitter=lambda: 0.0)
        assert sync_b.adopt_latest(created) is True
        assert_open_until_the_same_moment(a[NAME], created)
        assert sync_a.adopt_latest(Breaker(NAME, CONFIG)) is False  # its own opening
        assert sync_b.adopt_latest(Breaker("customer-churn/other", CONFIG)) is False
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_an_ended_opening_is_not_taken_up_by_a_new_breaker(tmp_path):
    wall = [1000.0]
    sync = BreakerFileSync(tmp_path, dict, replica_id="b", wall_clock=lambda: wall[0])
    assert sync.adopt({"breaker": NAME, "until": 1005.0, "replica": "a"}) is False  # none yet
    wall[0] = 1006.0
    created = Breaker(NAME, CONFIG)
    assert sync.adopt_latest(created) is False
    assert created.state == CLOSED


FAR = time.time() + 3600


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not an object"),
        (b'{"breaker": "other/target", "until": %d, "replica": "a"}' % FAR, "unknown breaker"),
        (b'{"breaker": "%s", "until": %d, "replica": "me"}' % (NAME.encode(), FAR), "own"),
        (b'{"breaker": "%s", "until": 1, "replica": "a"}' % NAME.encode(), "ended"),
        (b'{"breaker": "%s", "until": "later", "replica": "a"}' % NAME.encode(), "bad time"),
    ],
)
async def test_files_that_hold_no_current_opening_of_a_peer_open_nothing(tmp_path, content, why):
    breakers = replica_breakers()
    sync = file_sync(tmp_path, breakers, replica_id="me", interval_s=60)
    await sync.start()
    try:
        (tmp_path / "some-breaker.json").write_bytes(content)
        assert sync.poll() == 0, why
        assert breakers[NAME].state == CLOSED, why
    finally:
        await sync.stop()


async def test_an_opening_file_is_read_once_until_it_changes(tmp_path):
    breakers = replica_breakers()
    sync = file_sync(tmp_path, breakers, replica_id="me", interval_s=60)
    await sync.start()
    opening = tmp_path / "x.json"
    try:
        opening.write_bytes(
            b'{"breaker": "%s", "until": %d, "replica": "a"}' % (NAME.encode(), FAR)
        )
        assert sync.poll() == 1
        assert sync.poll() == 0
        opening.write_bytes(
            b'{"breaker": "%s", "until": %d, "replica": "b"}' % (NAME.encode(), FAR)
        )
        assert sync.poll() == 1
    finally:
        await sync.stop()


async def test_a_worker_that_cannot_share_its_opening_keeps_its_breakers_working(tmp_path):
    """The directory gone (replaced by a file): the trip is logged unshared, the local
    breaker still opens, and polling reads nothing instead of failing."""
    directory = tmp_path / "breakers"
    breakers = replica_breakers()
    sync = file_sync(directory, breakers, replica_id="me", interval_s=0.02)
    await sync.start()
    try:
        directory.rmdir()
        directory.write_bytes(b"")
        trip(breakers[NAME])
        await asyncio.sleep(0.1)  # the publisher tries and fails, the follower polls
        assert breakers[NAME].state == OPEN
        assert sync.poll() == 0
        assert all(not task.done() for task in sync._tasks)
    finally:
        await sync.stop()


async def test_workers_of_one_machine_share_breaker_openings(gateway_client, tmp_path):
    """Two workers of one gateway, no Redis: one finds Triton dead, the other skips it
    without trying."""
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    workers_dir = tmp_path / "workers"
    workers_dir.mkdir()  # the supervisor's (`aigw serve --workers N`)
    async with (
        gateway_client(env=env, worker_index=0, workers_dir=workers_dir) as first,
        gateway_client(env=env, worker_index=1, workers_dir=workers_dir) as second,
    ):
        await first_trips_and_second_skips(first, second)


async def test_a_breaker_an_apply_creates_in_a_sibling_is_open_at_once(data_dirs, tmp_path):
    """Worker 0 finds Triton dead; worker 1 adopts the opening, then applies a policy that
    rebuilds its breakers (another reset timeout): the new breaker is open at once, before
    any failure of its own. (Openings last 30 s here, so the apply, however slow a machine
    checks the bundle, comes while the opening holds.)"""
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    workers_dir = tmp_path / "workers"
    workers_dir.mkdir()
    policy = data_dirs / "policies" / "customer-churn.yaml"
    long_openings = {"reset_timeout_s: 1.0": "reset_timeout_s: 30.0",
                     "max_reset_timeout_s: 4.0": "max_reset_timeout_s: 60.0"}  # fmt: skip
    text = policy.read_text()
    for old, new in long_openings.items():
        assert old in text
        text = text.replace(old, new)
    policy.write_text(text)
    apps = [
        create_app(settings_for(data_dirs, worker_index=n, workers_dir=workers_dir,
                                watch_policies=False), env=env)
        for n in (0, 1)
    ]  # fmt: skip
    bundle = read_bundle(data_dirs / "policies", data_dirs / "fallbacks").to_dict()
    text = bundle["policies"]["customer-churn.yaml"]
    bundle["policies"]["customer-churn.yaml"] = text.replace(
        "reset_timeout_s: 30.0", "reset_timeout_s: 31.0"
    )
    async with LifespanManager(apps[0]) as first_app, LifespanManager(apps[1]) as second_app:
        first, second, admin = (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g")
            for app in (first_app.app, second_app.app, create_admin_app(apps[1]))
        )
        async with first, second, admin:
            await first_trips_and_second_skips(first, second)
            applied = await admin.post("/admin/policies", json={"author": "t", "bundle": bundle})
            assert applied.status_code == 200, applied.text
            runtime = apps[1].state.runtime
            rebuilt = runtime.breakers[NAME]
            assert rebuilt.config.reset_timeout_s == 31.0  # a new breaker, not the adopter
            assert rebuilt.state == OPEN
            after = (await second.post("/v1/predictions", json=CHURN_REQUEST)).json()
    assert after["fallback_reason"] == "breaker_open"


async def test_gateways_sharing_redis_share_breaker_openings(gateway_client, redis_server):
    """Two gateway replicas: one finds Triton dead, the other skips it without trying."""
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    shared = {"redis_url": redis_server.url, "share_breaker_state": True}
    already = redis_server.subscribers(CHANNEL)
    async with (
        gateway_client(env=env, **shared) as first,
        gateway_client(env=env, **shared) as second,
    ):
        await asyncio.to_thread(redis_server.wait_for_subscribers, CHANNEL, already + 2)
        await first_trips_and_second_skips(first, second)


async def first_trips_and_second_skips(first, second) -> None:  # type: ignore[no-untyped-def]
    """`first` opens the primary's breaker on its own failures; `second`, which has not
    called it, then answers `breaker_open`: the opening was adopted."""
    for _ in range(6):
        body = (await first.post("/v1/predictions", json=CHURN_REQUEST)).json()
    assert body["fallback_reason"] == "breaker_open"
    await until_breaker_open(second, NAME)  # adopted, not tried: no request has gone there
    other = (await second.post("/v1/predictions", json=CHURN_REQUEST)).json()
    assert other["degraded"] is True
    assert other["fallback_reason"] == "breaker_open"


async def until_breaker_open(client, name: str, within_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Until the gateway behind `client` reports `name`'s breaker open (state 2)."""
    line = f'aigw_breaker_state{{target="{name}"}} 2.0'
    deadline = time.monotonic() + within_s
    while line not in (await client.get("/metrics")).text:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} was not reported open within {within_s} s")
        await asyncio.sleep(0.02)
