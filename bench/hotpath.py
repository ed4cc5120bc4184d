"""The gateway's own CPU per `POST /v1/predictions`, measured in-process and load-independently.

N requests go straight into the app's ASGI callable, one at a time (no sockets, no HTTP
client, no wrk), so what is counted is the gateway's work alone: the ASGI stack, validation,
the pipeline, tracing and the audit append. It reports the process CPU per request
(`time.process_time`, which counts the audit writer threads too), and with `--profile`
the cProfile self time grouped by layer plus the top functions. Because the request count is
fixed and nothing else shares the loop, the profile's call counts and shares do not depend on
how busy the machine is; the CPU ms move a little with it.

    python bench/hotpath.py --case hit  -n 5000 --profile
    python bench/hotpath.py --case miss -n 2000        # starts the demo Triton
    python bench/hotpath.py --case rules -n 5000       # no Triton: breakers open, rules answer

For instruction counts, which do not depend on the machine's load at all, run it under
callgrind with instrumentation off until the measured loop (hit and rules only: under
valgrind a miss would run out of its time budget):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \
        python bench/hotpath.py --case hit -n 500 --warmup 100 --triton HOST:PORT --callgrind
    callgrind_annotate /tmp/cg.out | head     # "PROGRAM TOTALS" / n = instructions per request
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asgi_lifespan import LifespanManager  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.garbage import settle_startup_heap  # noqa: E402
from gateway.settings import Settings  # noqa: E402

LAYERS = (
    ("uvicorn", "ASGI stack"),
    ("starlette", "ASGI stack"),
    ("fastapi", "ASGI stack"),
    ("opentelemetry", "OpenTelemetry"),
    ("gateway/audit", "audit log"),
    ("gateway/api", "gateway HTTP handlers"),
    ("gateway/app", "gateway HTTP handlers"),
    ("gateway/fast_route", "gateway HTTP handlers"),
    ("gateway/body", "gateway HTTP handlers"),
    ("gateway/tracing", "OpenTelemetry"),
    ("gateway/backends", "Triton call"),
    ("gateway/batching", "Triton call"),
    ("tritonclient", "Triton call"),
    ("aiohttp", "Triton call"),
    ("gateway/", "gateway pipeline"),
    ("prometheus_client", "prometheus_client"),
    ("asyncio", "asyncio"),
    ("uuid", "uuid"),
)


def body_for(case: str, i: int) -> bytes:
    if case == "hit":
        features = {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99}
    elif case == "miss":
        features = {"customer_id": f"c{i}", "tenure_months": 24, "monthly_charges": 50 + i % 97}
    else:
        features = {"customer_id": f"n{i}", "tenure_months": 3, "monthly_charges": 99.5}
    return orjson.dumps({"model_id": "customer-churn", "features": features})


def scope_for(body: bytes) -> dict:
    headers = [
        (b"host", b"gateway"),
        (b"user-agent", b"wrk"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/predictions",
        "raw_path": b"/v1/predictions", "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip


async def one_request(app, body: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    sent = False
    status = 0
    parts: list[bytes] = []

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a client that stays connected
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope_for(body), receive, send)
    return status, b"".join(parts)


async def run(
    case: str,
    n: int,
    warmup: int,
    triton_url: str,
    profile: bool,
    concurrency: int,
    callgrind: bool = False,
    policies: Path = REPO / "policies",
) -> dict:
    audit_dir = Path(tempfile.mkdtemp(prefix="aigw-hotpath-"))
    settings = Settings(
        contracts_dir=REPO / "contracts", policies_dir=policies,
        fallbacks_dir=REPO / "fallbacks", baselines_dir=REPO / "baselines",
        audit_dir=audit_dir, watch_policies=False, log_level="warning",
    )  # fmt: skip
    app = create_app(settings, env={"AIGW_TRITON_URL": triton_url})
    async with LifespanManager(app) as manager:
        asgi = manager.app
        settle_startup_heap()  # as `aigw serve` does once started (gateway/garbage.py)
        for i in range(warmup):
            _, answer = await one_request(asgi, body_for(case, -1 - i))
        check = orjson.loads(answer)
        profiler = cProfile.Profile() if profile else None
        if callgrind:
            _callgrind("on")
        threads0 = thread_cpu_seconds()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        statuses: dict[int, int] = defaultdict(int)
        served: dict[str, int] = defaultdict(int)

        async def client(first: int) -> None:
            for i in range(first, n, concurrency):
                status, answer = await one_request(asgi, body_for(case, i))
                statuses[status] += 1
                if i % 50 == 0:
                    served[orjson.loads(answer).get("served_by", "?")] += 1

        await asyncio.gather(*(client(first) for first in range(concurrency)))
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        threads = {
            name: round((seconds - threads0.get(name, 0.0)) / n * 1000, 4)
            for name, seconds in thread_cpu_seconds().items()
        }
        if callgrind:
            _callgrind("off")
    return {
        "case": case, "n": n, "concurrency": concurrency,
        "cpu_ms_per_req": cpu / n * 1000, "wall_ms_per_req": wall / n * 1000,
        "thread_cpu_ms_per_req": {k: v for k, v in threads.items() if v > 0},
        "statuses": {str(k): v for k, v in statuses.items()}, "served_by_sample": dict(served),
        "last_warmup": check, "profiler": profiler,
    }  # fmt: skip


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of each of this process's threads, by Python thread name.

    Threads Python did not start (the executor's workers keep their names too) are
    keyed by their kernel name, so the main loop's share and the audit threads' shares of a
    request's CPU can be told apart.
    """
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(task.name)) or (task / "comm").read_text().strip()
        seconds[name] += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return dict(seconds)


def _callgrind(state: str) -> None:
    """Switch callgrind's instrumentation of this process on or off (it starts off)."""
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def layer_of(filename: str) -> str:
    for needle, layer in LAYERS:
        if needle in filename:
            return layer
    return "other"


def summarise(profiler: cProfile.Profile, n: int, top: int) -> str:
    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
    by_layer: dict[str, float] = defaultdict(float)
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_layer[layer_of(filename)] += tottime
        short = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
        rows.append((tottime, cumtime, calls, f"{short}:{line} {name}"))
    out = io.StringIO()
    out.write(f"profiled self time: {total * 1000 / n:.3f} ms/request (cProfile inflates it)\n")
    out.write("by layer of the frame (self time):\n")
    for layer, seconds in sorted(by_layer.items(), key=lambda kv: -kv[1]):
        out.write(f"  {layer:24s} {seconds / total * 100:5.1f}%\n")
    out.write(f"top {top} functions by self time (calls per request, self %, cumulative %):\n")
    for tottime, cumtime, calls, label in sorted(rows, reverse=True)[:top]:
        out.write(
            f"  {calls / n:6.1f}  {tottime / total * 100:5.1f}%  {cumtime / total * 100:6.1f}%  "
            f"{label}\n"
        )
    out.write("function calls per request: ")
    out.write(f"{sum(row[1] for row in stats.stats.values()) / n:.0f}\n")  # type: ignore[attr-defined]
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("hit", "miss", "rules"), default="hit")
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--triton", help="a running Triton's host:port (else one is started)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--save", help="also write the raw cProfile stats to this file")
    parser.add_argument(
        "--policies", type=Path, default=REPO / "policies",
        help="the policy directory (default: the repository's): a what-if, as run.py's",
    )  # fmt: skip
    parser.add_argument(
        "--callgrind", action="store_true",
        help="under valgrind --tool=callgrind --instr-atstart=no: count only the measured loop",
    )  # fmt: skip
    args = parser.parse_args()
    triton = None
    url = args.triton
    if args.case == "rules":
        from gateway.demo.triton_process import free_port

        url = f"127.0.0.1:{free_port()}"  # nothing listens: every model fails, breakers open
    elif url is None:
        from gateway.demo.triton_process import TritonProcess

        triton = TritonProcess()
        triton.start()
        url = triton.http_url
    try:
        result = asyncio.run(
            run(
                args.case,
                args.n,
                args.warmup,
                url,
                args.profile,
                args.concurrency,
                args.callgrind,
                args.policies,
            )
        )
    finally:
        if triton is not None:
            triton.stop()
    profiler = result.pop("profiler")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    if profiler is not None:
        print(summarise(profiler, args.n, args.top))
        if args.save:
            profiler.dump_stats(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
