"""The promise to legacy callers, under load: Triton frozen, thawed, then killed.

32 concurrent clients (aiohttp: httpx's pool, not the gateway, saturates first at this
concurrency) call a gateway process (`aigw serve`) in front of a real Triton.
Every request must get a 200 in the contract's envelope; answers while Triton is frozen or
dead are degraded; after the thaw, traffic is back on the primary within the breaker's
reset timeout; and no request takes longer than its deadline allows (p99 under 1.5 s:
this is the deadline guarantee, not a speed claim; speed is measured in bench/).
Load stays on 127.0.0.1 and stops after a fixed schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.conftest import CHURN_REQUEST

pytestmark = pytest.mark.triton

CLIENTS = 32
PHASES = (("healthy", 2.0), ("frozen", 8.0), ("thawed", 6.0), ("killed", 3.0))
MAX_RESET_TIMEOUT_S = 4.0  # policies/customer-churn.yaml: max_reset_timeout_s


@dataclass
class Sample:
    phase: str
    started: float
    status: int
    latency_s: float
    served_by: str | None
    degraded: bool | None


async def run_schedule(
    base_url: str, triton
) -> tuple[list[Sample], dict[str, float], dict[str, float]]:
    """Drive the clients while switching Triton through the phases; return every sample."""
    samples: list[Sample] = []
    phase_started: dict[str, float] = {}  # the switch is done: Triton is in this state
    phase_began: dict[str, float] = {}  # the switch was about to start
    current = {"phase": PHASES[0][0]}
    stop = asyncio.Event()
    body_bytes = orjson.dumps(CHURN_REQUEST)
    # Bypass the cache: every request must go through the chain to exercise the outage.
    headers = {"Content-Type": "application/json", "Cache-Control": "no-cache"}

    async def client_loop(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            phase, started = current["phase"], time.monotonic()
            try:
                async with session.post(
                    "/v1/predictions", data=body_bytes, headers=headers
                ) as response:
                    status = response.status
                    body = orjson.loads(await response.read()) if status == 200 else {}
            except (aiohttp.ClientError, TimeoutError):
                body, status = {}, 0
            samples.append(
                Sample(
                    phase, started, status, time.monotonic() - started,
                    body.get("served_by"), body.get("degraded"),
                )
            )  # fmt: skip

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        workers = [asyncio.create_task(client_loop(session)) for _ in range(CLIENTS)]
        for name, duration in PHASES:
            phase_began[name] = time.monotonic()
            if name == "frozen":
                triton.freeze()
            elif name == "thawed":
                triton.thaw()
            elif name == "killed":
                await asyncio.to_thread(triton.kill)
            current["phase"] = name
            phase_started[name] = time.monotonic()
            await asyncio.sleep(duration)
        stop.set()
        await asyncio.gather(*workers)
    return samples, phase_started, phase_began


def served_by_phase(samples: list[Sample]) -> dict[str, Counter]:
    """Which step answered, per phase: the evidence when an assertion fails."""
    counts: dict[str, Counter] = {}
    for sample in samples:
        counts.setdefault(sample.phase, Counter())[sample.served_by] += 1
    return counts


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@pytest.mark.leaves_triton_dead
def test_outage_under_32_clients_fails_no_request(healthy, gateway_process):
    """Frozen 8 s, thawed, killed: zero failures, degraded while down, primary after thaw."""
    gateway = gateway_process({"AIGW_TRITON_URL": healthy.http_url, "AIGW_LOG_LEVEL": "debug"})
    samples, phase_started, phase_began = asyncio.run(run_schedule(gateway.base_url, healthy))

    failures = [s for s in samples if s.status != 200]
    assert not failures, f"{len(failures)} of {len(samples)} requests failed"

    by_phase = {name: [s for s in samples if s.phase == name] for name, _ in PHASES}
    assert all(by_phase.values()), {k: len(v) for k, v in by_phase.items()}
    before_freeze = [
        s for s in by_phase["healthy"] if s.started + s.latency_s < phase_began["frozen"]
    ]
    assert before_freeze and all(s.served_by == "churn-gbm" for s in before_freeze)
    # Requests made entirely while Triton was down are answered degraded, by another step.
    phase_ends = {"frozen": phase_began["thawed"], "killed": float("inf")}
    for name in ("frozen", "killed"):
        down = [
            s
            for s in by_phase[name]
            if s.started > phase_started[name] and s.started + s.latency_s < phase_ends[name]
        ]
        answered_by_primary = [
            round(s.started - phase_started[name], 3) for s in down if not s.degraded
        ]
        assert down and not answered_by_primary, (name, answered_by_primary[:10])
    # After the thaw the primary is back within the reset timeout (plus one budget).
    back = [s for s in by_phase["thawed"] if s.served_by == "churn-gbm"]
    assert back, f"primary never answered after the thaw: {served_by_phase(samples)}"
    assert back[0].started - phase_started["thawed"] <= MAX_RESET_TIMEOUT_S + 0.5
    killed_at = phase_began["killed"]
    last_second = [
        s
        for s in by_phase["thawed"]
        if killed_at - 1.0 < s.started and s.started + s.latency_s < killed_at
    ]
    not_primary = [
        (round(s.started - killed_at, 3), round(s.latency_s, 3), s.served_by)
        for s in last_second
        if s.served_by != "churn-gbm"
    ]
    assert last_second and not not_primary, not_primary[:10]

    p99 = percentile([s.latency_s for s in samples], 0.99)
    assert p99 < 1.5, f"p99 {p99:.3f} s over {len(samples)} requests"
