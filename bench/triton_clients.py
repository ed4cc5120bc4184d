"""Which client should call Triton: the gateway's KServe HTTP client, or Triton's own, HTTP or gRPC.

    python bench/triton_clients.py                 # 6 rounds, 1 and 16 calls in flight
    python bench/triton_clients.py --rounds 10 --calls 2000

DESIGN.md asks for both of Triton's protocols to be measured before one is chosen. Each side
calls the demo Triton's `churn_gbm` (one row of two FP32 features, binary tensors both ways)
from this one process on uvloop, as the gateway does (`--loop asyncio`: the standard loop);
one Triton serves every side, and the sides alternate in rotating order within each round,
so Triton's drift hits them alike:

- `gateway-http`: `gateway.backends.kserve_http.KServeClient`, the gateway's own;
- `tritonclient-http`: `tritonclient.http.aio` (aiohttp), with `Accept-Encoding: identity`
  as the gateway would have to send (Round 2: otherwise Triton gzips every answer);
- `tritonclient-grpc`: `tritonclient.grpc.aio` (grpcio's asyncio stack).

Per side and load: the calls' p50 and p99 latency, and this process's CPU per call
(`time.process_time`): the client's own cost, which on the gateway's hot path competes with
everything else the gateway does. Reported as the median over rounds, to stdout and
bench/results/triton-clients-<ts>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import uvloop

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import RESULTS, environment
from bench.servers import Triton
from gateway.backends.kserve_http import KServeClient

MODEL, VERSION, INPUT, OUTPUT = "churn_gbm", "1", "features", "probability"
ROW = np.array([[24.0, 70.5]], dtype=np.float32)

Call = Callable[[], Awaitable[float]]


async def gateway_http(triton: Triton, in_flight: int) -> tuple[Call, Callable[[], Awaitable]]:
    client = KServeClient(triton.http_url, max_connections=in_flight)

    async def call() -> float:
        output = await client.infer(MODEL, VERSION, {INPUT: ROW}, OUTPUT)
        return float(output.reshape(-1)[0])

    return call, client.close


async def tritonclient_http(triton: Triton, in_flight: int) -> tuple[Call, Callable[[], Awaitable]]:
    import tritonclient.http.aio as triton_http

    client = triton_http.InferenceServerClient(triton.http_url, conn_limit=in_flight)
    requested = [triton_http.InferRequestedOutput(OUTPUT, binary_data=True)]
    identity = {"Accept-Encoding": "identity"}

    async def call() -> float:
        tensor = triton_http.InferInput(INPUT, list(ROW.shape), "FP32")
        tensor.set_data_from_numpy(ROW, binary_data=True)
        result = await client.infer(
            MODEL, [tensor], model_version=VERSION, outputs=requested, headers=identity
        )
        return float(result.as_numpy(OUTPUT).reshape(-1)[0])

    return call, client.close


async def tritonclient_grpc(triton: Triton, in_flight: int) -> tuple[Call, Callable[[], Awaitable]]:
    import tritonclient.grpc.aio as triton_grpc

    client = triton_grpc.InferenceServerClient(triton.process.grpc_url)
    requested = [triton_grpc.InferRequestedOutput(OUTPUT)]

    async def call() -> float:
        tensor = triton_grpc.InferInput(INPUT, list(ROW.shape), "FP32")
        tensor.set_data_from_numpy(ROW)
        result = await client.infer(MODEL, [tensor], model_version=VERSION, outputs=requested)
        return float(result.as_numpy(OUTPUT).reshape(-1)[0])

    return call, client.close


SIDES = {
    "gateway-http": gateway_http,
    "tritonclient-http": tritonclient_http,
    "tritonclient-grpc": tritonclient_grpc,
}


async def measure(call: Call, calls: int, in_flight: int) -> dict[str, float]:
    """`calls` calls, `in_flight` at a time: latency percentiles, rate and CPU per call."""
    latencies: list[float] = []
    remaining = calls

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "req_per_s": calls / wall,
        "cpu_ms_per_call": 1000 * cpu / calls,
    }


async def one_side(name: str, triton: Triton, calls: int, in_flight: int) -> dict[str, float]:
    call, close = await SIDES[name](triton, in_flight)
    try:
        await measure(call, max(50, calls // 10), in_flight)  # connect and warm up
        return await measure(call, calls, in_flight)
    finally:
        await close()


def median_of(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(row[key] for row in rows), 3) for key in rows[0]}


def run(triton: Triton, rounds: int, calls: int, loads: list[int], loop: str) -> dict[str, object]:
    loop_factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    names = list(SIDES)
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for in_flight in loads:
            for name in order:
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    row = runner.run(one_side(name, triton, calls, in_flight))
                rows.setdefault((name, in_flight), []).append(row)
                print(f"round {round_index + 1} {name:18} in flight {in_flight:3}: {row}")
    return {
        f"{name} @ {in_flight}": median_of(result) for (name, in_flight), result in rows.items()
    }


def markdown(medians: dict[str, dict[str, float]]) -> str:
    lines = [
        "| client @ calls in flight | p50 ms | p99 ms | calls/s | client CPU ms/call |",
        "|---|--:|--:|--:|--:|",
    ]
    for side, row in medians.items():
        lines.append(
            f"| {side} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['req_per_s']:,.0f} "
            f"| {row['cpu_ms_per_call']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=1500, help="calls per side, load and round")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the gateway runs uvloop"
    )
    args = parser.parse_args()
    triton = Triton()
    triton.start()
    try:
        medians = run(triton, args.rounds, args.calls, args.in_flight, args.loop)
    finally:
        triton.stop()
    table = markdown(medians)
    print(f"\nmedians over {args.rounds} rounds of {args.calls} calls:\n{table}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"triton-clients-{stamp}.json"
    report = {"environment": environment({}), "args": vars(args), "medians": medians}
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
