"""One client's added latency, by alternating short wrk rows against the same Triton.

    python bench/one_client.py                          # 10 rounds of 2 s rows
    python bench/one_client.py --rounds 20 --seconds 3
    python bench/one_client.py --baseline-repo ../old   # the same rows for another checkout's
                                                        # gateway too, alternating: a code A/B

The 1-client rows of `run.py` come minutes apart, and the demo Triton's own 1-client latency
drifts by more than the goal being checked (a cache miss within 1 ms of direct Triton). Here
one Triton serves every row, and each round runs, one after another, a short wrk row at one
connection against direct Triton and against each gateway; the order of the rows rotates from
round to round, so no side always follows another. Every gateway uses the one-model policy of
`run.py`'s case (f) (the shipped policy's first arm at weight 100, no routes, no shadows):
exactly one model's calls on Triton, as direct Triton has. `--policies DIR` gives another.

Unlike `paired.py`, the client is wrk sending back to back, as run.py's rows do: no idle gap
before a request, so what is compared is the steady one-client latency the goal speaks of.
The report is, per side, the median over rounds of each row's p50, and the median over rounds
of (gateway p50 - direct p50) within the round. Written to bench/results/one-client-<ts>.*.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import Load, run_wrk
from bench.run import (
    GATEWAY_BODY,
    PREDICT_PATH,
    RESULTS,
    TRITON_BODY,
    TRITON_PATH,
    environment,
    one_model_policies,
)
from bench.servers import REPO, Gateway, Triton


def direct_load(triton: Triton) -> Load:
    return Load(
        triton.base_url, "static.lua", {"BENCH_PATH": TRITON_PATH, "BENCH_BODY": TRITON_BODY}
    )


def miss_load(gateway: Gateway, tag: str) -> Load:
    """A new customer every request (vary.lua), with a prefix no other row uses."""
    prefix = f"one-{tag}-{time.time_ns()}"
    return Load(gateway.base_url, "vary.lua", {"BENCH_PREFIX": prefix, "BENCH_TENURE": "24"})


def hit_load(gateway: Gateway) -> Load:
    return Load(
        gateway.base_url, "static.lua", {"BENCH_PATH": PREDICT_PATH, "BENCH_BODY": GATEWAY_BODY}
    )


@contextlib.contextmanager
def gateways(
    triton: Triton, policies: Path, repos: dict[str, Path]
) -> Iterator[dict[str, Gateway]]:
    started: dict[str, Gateway] = {}
    try:
        for name, repo in repos.items():
            started[name] = Gateway(triton.http_url, policies=policies, repo=repo)
            started[name].start()
        yield started
    finally:
        for gateway in started.values():
            with contextlib.suppress(Exception):
                gateway.stop()


def rotated(sides: list[str], round_no: int) -> list[str]:
    """The round's order: each side leads in turn, so none always follows another."""
    k = round_no % len(sides)
    return sides[k:] + sides[:k]


def run_rounds(
    loads: dict[str, Callable[[], Load]], rounds: int, seconds: float, log: bool = True
) -> dict[str, list[dict[str, float]]]:
    """Each round, one wrk row per side at one client (each side's load made anew, so a miss
    never repeats a customer); every row's latency summary."""
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in loads}
    sides = list(loads)
    for round_no in range(rounds):
        for side in rotated(sides, round_no):
            result = run_wrk(loads[side](), 1, seconds)
            if result.errors.get("status") or result.requests == 0:
                raise RuntimeError(f"{side}: {result.errors} in {result.requests} requests")
            rows[side].append({**result.latency_ms, "rps": round(result.rps, 1)})
            if log:
                print(
                    f"round {round_no + 1:>2} {side:<10} p50 {result.latency_ms['p50']:6.3f} ms"
                    f"  {result.rps:7.1f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def summary(rows: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Medians over rounds: each side's p50, p90 and req/s, and its p50 minus direct's."""
    direct = [r["p50"] for r in rows["direct"]]
    sides: dict[str, object] = {}
    for side, side_rows in rows.items():
        p50s = [r["p50"] for r in side_rows]
        entry: dict[str, object] = {
            "p50_ms": round(statistics.median(p50s), 3),
            "p90_ms": round(statistics.median(r["p90"] for r in side_rows), 3),
            "rps": round(statistics.median(r["rps"] for r in side_rows), 1),
            "p50_per_round_ms": p50s,
        }
        if side != "direct":
            diffs = [g - d for g, d in zip(p50s, direct, strict=True)]
            entry["p50_minus_direct_ms"] = round(statistics.median(diffs), 3)
            entry["p50_minus_direct_range_ms"] = [round(min(diffs), 3), round(max(diffs), 3)]
        sides[side] = entry
    return sides


def markdown(report: dict[str, object]) -> str:
    lines = [
        f"# One client, alternating rows ({report['time']})",
        "",
        f"{report['rounds']} rounds of {report['seconds']} s rows at one wrk connection; "
        f"policies: {report['policies']}; commit {report['environment']['git_commit']}.",  # type: ignore[index]
        "",
        "| side | p50 ms (median of rounds) | p90 ms | req/s | p50 − direct, median | range |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for side, s in report["sides"].items():  # type: ignore[union-attr]
        diff = s.get("p50_minus_direct_ms", "–")
        span = s.get("p50_minus_direct_range_ms")
        lines.append(
            f"| {side} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['rps']:.0f} | {diff} | "
            f"{'–' if span is None else f'{span[0]} to {span[1]}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each wrk row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load per side first")
    parser.add_argument(
        "--baseline-repo", type=Path, help="another checkout whose gateway runs alongside"
    )
    parser.add_argument("--policies", type=Path, help="instead of the one-model policy")
    parser.add_argument("--hits", action="store_true", help="also a cache-hit row per gateway")
    args = parser.parse_args(argv)

    repos = {"gateway": REPO}
    if args.baseline_repo is not None:
        repos["baseline"] = args.baseline_repo.resolve()
    triton = Triton()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-one-client-") as tmp:
        policies = args.policies or one_model_policies(REPO / "policies", Path(tmp))
        try:
            triton.start()
            with gateways(triton, policies, repos) as started:
                loads: dict[str, Callable[[], Load]] = {"direct": lambda: direct_load(triton)}
                for name, gateway in started.items():
                    loads[name] = lambda g=gateway, n=name: miss_load(g, n)
                    if args.hits:
                        loads[f"{name}-hit"] = lambda g=gateway: hit_load(g)
                if args.warmup > 0:
                    run_rounds(loads, 1, args.warmup, log=False)
                rows = run_rounds(loads, args.rounds, args.seconds)
        finally:
            triton.stop()
    report = {
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "policies": "one-model (case f)" if args.policies is None else str(args.policies),
        "repos": {k: str(v) for k, v in repos.items()},
        "environment": environment({}),
        "sides": summary(rows),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"one-client-{report['time'].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
