"""Experiment and health statistics shared by every replica through Redis.

Each replica (and each `aigw worker`) counts its own answers and feedback. With
`AIGW_SHARE_STATISTICS=true`, every process publishes once a second, so that
`GET /v1/experiments/{model_id}` and `GET /v1/models/{model_id}/health` (and the drift
gauges) on any replica report all the traffic:

- **experiment statistics** as increments since its last publish, added to one hash
  (`aigw:statistics:experiments`, a field per model, arm and arm model, and counter) by a
  script that also records the publish's sequence number, so a publish retried after a lost
  reply is not counted twice. The hash is the gateway's totals: a replica that dies or is
  replaced leaves its counts in, and the hash stays the size of the models and arms, whatever
  the replicas;
- **health windows** (drift and quality counters per sub-window) whole, under the
  publisher's name (`aigw:statistics:windows`); a publisher silent for longer than the
  longest window is dropped, its windows no longer in the window anyway.

A report adds the others' latest to this process's live statistics: theirs are at most about
a second old. Redis is never on the request path: with it away, each replica reports its own
statistics and publishes what it counted meanwhile when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.experiments import ArmStats, Experiments, ShadowStats, Totals
from gateway.monitoring import Monitor
from gateway.shared_statistics import PUBLISH_INTERVAL_S, Published

log = logging.getLogger("gateway.statistics")

EXPERIMENTS_KEY = "aigw:statistics:experiments"
WINDOWS_KEY = "aigw:statistics:windows"
APPLIED_KEY = "aigw:statistics:applied"  # publisher → sequence number of its last increments
REDIS_TIMEOUT_S = 0.5
MAXIMUM = "latency_ms_max"  # combined by maximum; every other counter is summed

# KEYS: experiments, applied; ARGV: publisher, sequence, count of sums, then (field, value)
# pairs: the sums first, then the maxima. Applied once per (publisher, sequence).
_APPLY = """
local applied = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if applied >= tonumber(ARGV[2]) then return 0 end
local sums = tonumber(ARGV[3])
local i = 4
for _ = 1, sums do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > current then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

Flat = dict[
    str, float
]  # JSON array [model, arm, counter] or [model, arm, "shadows", target, counter]


def flatten(totals: Totals) -> Flat:
    """Experiment totals as one number per field, the fields named by their path."""
    flat: Flat = {}
    for model, arms in totals.items():
        for arm, plain in arms.items():
            for name, value in plain.items():
                if name == "shadows":
                    for target, counts in value.items():
                        for counter, count in counts.items():
                            flat[_field(model, arm, "shadows", target, counter)] = count
                else:
                    flat[_field(model, arm, name)] = value
    return flat


def unflatten(flat: Mapping[str, float]) -> dict[str, dict[str, dict[str, Any]]]:
    """Totals from fields `flatten` named, every arm complete (absent counters are 0); a
    field of another shape, or a counter this gateway does not keep, is left out."""
    totals: dict[str, dict[str, dict[str, Any]]] = {}
    for name, value in flat.items():
        try:
            path = orjson.loads(name)
        except orjson.JSONDecodeError:
            continue
        if not (isinstance(path, list) and all(isinstance(p, str) for p in path)):
            continue
        count = _number(max(0.0, float(value)))
        if len(path) == 3 and path[2] in _ARM_COUNTERS:
            model, arm, counter = path
            _arm(totals, model, arm)[counter] = count
        elif len(path) == 5 and path[2] == "shadows" and path[4] in _SHADOW_COUNTERS:
            model, arm, _, target, counter = path
            shadows = _arm(totals, model, arm)["shadows"]
            shadows.setdefault(target, dict.fromkeys(_SHADOW_COUNTERS, 0))[counter] = count
    return totals


def increments(current: Flat, published: Flat) -> tuple[Flat, Flat]:
    """What to add to the shared sums, and the maxima to raise, since `published`."""
    sums, maxima = {}, {}
    for name, value in current.items():
        before = published.get(name, 0)
        if _is_maximum(name):
            if value > before:
                maxima[name] = value
        elif value != before:
            sums[name] = value - before
    return sums, maxima


def without(shared: Flat, own: Flat) -> Flat:
    """The shared totals less this publisher's part, never below zero (after a reset of the
    hash); maxima stay: a maximum does not subtract."""
    return {
        name: value if _is_maximum(name) else max(0.0, value - own.get(name, 0))
        for name, value in shared.items()
    }


@dataclass(frozen=True)
class _Publish:
    """One publish's increments, kept until Redis acknowledges them (then `current` is what
    has been published)."""

    sequence: int
    sums: Flat
    maxima: Flat
    current: Flat


class ReplicaStatistics:
    """One process's view of the statistics every replica publishes to Redis."""

    def __init__(
        self,
        redis_url: str,
        publisher: str | None = None,
        stale_after_s: float = 3600.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        # A name per process: a restarted process is a new publisher (its predecessor's
        # counts are in the shared sums already; its windows age out).
        self.publisher = publisher or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.stale_after_s = stale_after_s
        self.connected = False
        self._wall = wall_clock
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._apply = self._redis.register_script(_APPLY)
        self._published: Flat = {}
        self._pending: _Publish | None = None
        self._others: list[Published] = []
        # Microseconds, then one more a publish: above any earlier process of the same name,
        # and exact in Redis's Lua numbers (doubles: nanoseconds would not be).
        self._sequence = time.time_ns() // 1000

    def restore(self, experiments: Experiments, monitor: Monitor) -> Monitor:
        """Nothing to continue: a predecessor's counts are in the shared sums already."""
        return monitor

    def siblings(self) -> list[Published]:
        """Every other publisher's statistics as of the last publish (none before the first,
        or while Redis is away)."""
        return self._others if self.connected else []

    async def publish(self, experiments: Experiments, monitor: Monitor) -> None:
        """Add what this process counted since its last publish; read everyone's back."""
        if self._pending is None:
            current = flatten(experiments.totals())
            sums, maxima = increments(current, self._published)
            self._sequence += 1
            self._pending = _Publish(self._sequence, sums, maxima, current)
        pending = self._pending
        now = self._wall()
        windows = orjson.dumps({"at": now, "windows": monitor.windows()})
        pairs = [*_pairs(pending.sums), *_pairs(pending.maxima)]
        async with self._redis.pipeline(transaction=True) as pipe:
            args = [self.publisher, pending.sequence, len(pending.sums), *pairs]
            await self._apply(keys=[EXPERIMENTS_KEY, APPLIED_KEY], args=args, client=pipe)
            pipe.hset(WINDOWS_KEY, self.publisher, windows)
            pipe.hgetall(EXPERIMENTS_KEY)
            pipe.hgetall(WINDOWS_KEY)
            _, _, shared, everyone = await pipe.execute()
        self._published, self._pending = pending.current, None
        others, stale = self._windows_of_others(everyone, now)
        totals = unflatten(without(_decoded(shared), self._published))
        self._others = [Published(totals, []), *(Published({}, w) for w in others)]
        self.connected = True
        if stale:
            await self._forget(stale)

    async def publish_forever(
        self,
        statistics_of: Callable[[], tuple[Experiments, Monitor]],
        interval_s: float = PUBLISH_INTERVAL_S,
    ) -> None:
        """Publish `statistics_of()` every `interval_s` until cancelled, and once more then."""
        try:
            while True:
                await self._publish_logged(*statistics_of())
                await asyncio.sleep(interval_s)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._publish_logged(*statistics_of()))
            await self._redis.aclose()

    async def _publish_logged(self, experiments: Experiments, monitor: Monitor) -> None:
        try:
            await self.publish(experiments, monitor)
        except (RedisError, OSError, TimeoutError) as error:
            if self.connected:
                log.warning(
                    "statistics not shared with other replicas", extra={"error": repr(error)}
                )
            self.connected = False

    def _windows_of_others(
        self, everyone: Mapping[bytes, bytes], now: float
    ) -> tuple[list[list[dict[str, Any]]], list[bytes]]:
        """Each other publisher's windows, and the publishers gone stale."""
        windows: list[list[dict[str, Any]]] = []
        stale: list[bytes] = []
        for publisher, raw in everyone.items():
            if publisher.decode(errors="replace") == self.publisher:
                continue
            try:
                entry = orjson.loads(raw)
                at, theirs = float(entry["at"]), list(entry["windows"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("unreadable windows of another replica left out")
                continue
            if at < now - self.stale_after_s:
                stale.append(publisher)
            else:
                windows.append(theirs)
        return windows, stale

    async def _forget(self, stale: list[bytes]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hdel(WINDOWS_KEY, *stale)
            pipe.hdel(APPLIED_KEY, *stale)
            await pipe.execute()


def _is_maximum(field: str) -> bool:
    return field.endswith(f'"{MAXIMUM}"]')


def _field(*path: str) -> str:
    return orjson.dumps(list(path)).decode()


_ARM_COUNTERS = tuple(name for name in ArmStats().as_plain() if name != "shadows")
_SHADOW_COUNTERS = tuple(ShadowStats().__dict__)


def _arm(totals: dict, model: str, arm: str) -> dict[str, Any]:
    arms = totals.setdefault(model, {})
    if arm not in arms:
        arms[arm] = {**dict.fromkeys(_ARM_COUNTERS, 0), "shadows": {}}
    return arms[arm]


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _pairs(flat: Flat) -> list[Any]:
    return [item for name, value in flat.items() for item in (name, repr(float(value)))]


def _decoded(fields: Mapping[bytes, bytes]) -> Flat:
    flat: Flat = {}
    for name, raw in fields.items():
        with contextlib.suppress(ValueError):
            flat[name.decode(errors="replace")] = float(raw)
    return flat
