"""Live parts built from a configuration: what a policy reload keeps and what it rebuilds.

No Triton is called: building a snapshot creates clients but connects nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.backends.triton import TritonBackend
from gateway.resilience import OPEN, Breaker, Outcome
from gateway.runtime import (
    Configuration,
    Snapshot,
    build_snapshot,
    load_configuration,
    start_runtime,
)
from gateway.telemetry import Metrics
from tests.conftest import settings_for

MODEL = "customer-churn"
WINDOW = "shadow_batch_window_ms: 50"


def configuration(root: Path, replace: tuple[str, str] | None = None) -> Configuration:
    policy = root / "policies" / f"{MODEL}.yaml"
    if replace is not None:
        text = policy.read_text()
        assert replace[0] in text
        policy.write_text(text.replace(*replace))
    return load_configuration(settings_for(root), {})


def serving_guards(snapshot: Snapshot) -> dict:
    return dict(snapshot.models[MODEL].guards)


def shadow_guards(snapshot: Snapshot) -> dict:
    return dict(snapshot.models[MODEL].shadows.guards)


def identities(guards: dict) -> dict[str, int]:
    return {name: id(guard) for name, guard in guards.items()}


def test_shadow_guards_gather_for_the_policys_window_and_serving_guards_as_their_target(
    data_dirs,
):
    """Shadow copies wait the policy's window (batching.py's `gather_first`); serving rows
    keep the target's own batching: at once at an idle target, unless the target sets
    `gather_ms` (the challenger's, in the shipped policy: 5 ms)."""
    snapshot = build_snapshot(configuration(data_dirs), Metrics())
    [shadow] = shadow_guards(snapshot).values()
    assert isinstance(shadow.backend, TritonBackend)
    assert shadow.backend.gather_s == 0.05
    assert shadow.backend._batcher.gather_first and shadow.backend._batcher.max_delay_s == 0.05
    batchers = {name: guard.backend._batcher for name, guard in serving_guards(snapshot).items()}
    gathering = {name for name, batcher in batchers.items() if batcher.gather_first}
    assert gathering == {"churn-gbm-v2"} and batchers["churn-gbm-v2"].max_delay_s == 0.005
    for name, batcher in batchers.items():
        if name not in gathering:
            assert batcher.max_delay_s == 0.001  # the target's own batching


def test_a_reload_keeps_unchanged_guards_and_rebuilds_those_whose_window_changed(data_dirs):
    """Same policy: every guard (breaker state, connection pool) is kept. A new shadow window:
    the shadow's guard is new, the serving guards are still the same objects."""
    first = build_snapshot(configuration(data_dirs), Metrics())
    again = build_snapshot(configuration(data_dirs), Metrics(), previous=first)
    assert identities(serving_guards(again)) == identities(serving_guards(first))
    assert identities(shadow_guards(again)) == identities(shadow_guards(first))

    changed = configuration(data_dirs, (WINDOW, "shadow_batch_window_ms: 20"))
    after = build_snapshot(changed, Metrics(), previous=again)
    assert identities(serving_guards(after)) == identities(serving_guards(first))
    [(name, shadow)] = shadow_guards(after).items()
    assert shadow is not shadow_guards(first)[name]
    assert shadow.backend.gather_s == 0.02


def trip(breaker: Breaker) -> None:
    for _ in range(breaker.config.failure_threshold):
        permit = breaker.try_acquire(0.0)
        assert permit is not None
        breaker.record(permit, Outcome.FAILURE, 0.01, 0.0)
    assert breaker.state == OPEN


async def test_trip_hooks_hear_the_breakers_of_every_later_policy_once(data_dirs):
    """Openings are shared through a trip hook (breaker_sync.py): a hook given at start must
    hear the breakers a later apply creates, and a kept breaker must not tell it twice."""
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), Metrics())
    heard: list[str] = []
    runtime.on_breaker_trip(lambda breaker, open_for_s: heard.append(breaker.name))
    try:
        first = runtime.breakers
        runtime.swap(configuration(data_dirs))  # unchanged: the same breakers are kept
        assert runtime.breakers == first
        kept = first[f"{MODEL}/churn-gbm"]
        trip(kept)
        assert heard == [kept.name]
        heard.clear()
        runtime.swap(configuration(data_dirs, ("reset_timeout_s: 1.0", "reset_timeout_s: 2.0")))
        replaced = runtime.breakers
        assert not [name for name in replaced if replaced[name] is first[name]]
        for breaker in replaced.values():
            trip(breaker)
        assert sorted(heard) == sorted(replaced)
    finally:
        await runtime.close()


async def test_new_breaker_hooks_hear_only_the_breakers_an_apply_creates(data_dirs):
    """A breaker an apply creates must take up a peer's current opening (breaker_sync.py):
    the hook hears each new serving breaker once, and none that an apply kept."""
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), Metrics())
    created: list[Breaker] = []
    runtime.on_new_breaker(created.append)
    try:
        runtime.swap(configuration(data_dirs))  # unchanged: every breaker kept
        assert created == []
        runtime.swap(configuration(data_dirs, ("reset_timeout_s: 1.0", "reset_timeout_s: 2.0")))
        assert sorted(b.name for b in created) == sorted(runtime.breakers)
        assert all(runtime.breakers[b.name] is b for b in created)
    finally:
        await runtime.close()


async def test_two_swaps_within_the_grace_close_every_backend_they_retired(data_dirs, monkeypatch):
    """v1 → v2, then v2 → v3 before v1's clients were closed: once each grace has passed,
    the clients of v1 and of v2 are both closed, and only v3's stay open."""
    closed: list[int] = []
    close = TritonBackend.close

    async def recording_close(self) -> None:
        closed.append(id(self))
        await close(self)

    monkeypatch.setattr(TritonBackend, "close", recording_close)
    version = ('model: churn_gbm\n    version: "1"', 'model: churn_gbm\n    version: "{}"')
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), Metrics())
    try:
        v1 = runtime.models[MODEL].guards["churn-gbm"].backend
        runtime.swap(configuration(data_dirs, (version[0], version[1].format(2))))
        v2 = runtime.models[MODEL].guards["churn-gbm"].backend
        runtime.swap(configuration(data_dirs, (version[1].format(2), version[1].format(3))))
        v3 = runtime.models[MODEL].guards["churn-gbm"].backend
        await asyncio.sleep(0.4 + 1.0 + 0.3)  # the longest timeout_ms (400 ms) + 1 s, and some
        assert id(v1) in closed and id(v2) in closed
        assert id(v3) not in closed
    finally:
        await runtime.close()


async def test_an_apply_resizes_the_in_memory_cache_to_its_largest_policy(data_dirs):
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), Metrics())
    try:
        assert runtime.cache.max_entries == 100_000
        runtime.swap(configuration(data_dirs, ("max_entries: 100000", "max_entries: 500")))
        assert runtime.cache.max_entries == 500
    finally:
        await runtime.close()


async def test_a_breaker_an_apply_removes_is_no_longer_exported(data_dirs):
    """Left at its last value, a removed breaker that was open would keep the open-too-long
    alert firing until a restart; it goes, and its successor is exported from the start."""
    metrics = Metrics()
    policy = data_dirs / "policies" / f"{MODEL}.yaml"
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), metrics)
    try:
        trip(runtime.breakers[f"{MODEL}/churn-gbm-v2"])
        assert f'target="{MODEL}/churn-gbm-v2"}} 2.0' in metrics.exposition().decode()
        policy.write_text(policy.read_text().replace("churn-gbm-v2", "churn-gbm-v3"))
        runtime.swap(configuration(data_dirs))
        exported = metrics.exposition().decode()
    finally:
        await runtime.close()
    assert f'aigw_breaker_state{{target="{MODEL}/churn-gbm-v2"}}' not in exported
    assert f'aigw_breaker_state{{target="{MODEL}/churn-gbm-v3"}} 0.0' in exported
