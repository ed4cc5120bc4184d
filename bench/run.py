"""Side-by-side benchmark of the gateway against the demo's real Triton.

    python bench/run.py --quick            # about 90 s: every case at 1 and 64 clients
    python bench/run.py                    # 15 s per measurement
    python bench/run.py --soak 300         # 5-minute soak: RSS and open fds of the gateway
    python bench/run.py --quick --profile  # plus py-spy profiles of the gateway under load

Cases, each at every --clients value, load from wrk in its own process:
  (a) direct Triton        POST /v2/models/churn_gbm/infer (KServe v2 JSON)
  (b) nginx -> Triton      the same request through nginx (upstream keep-alive)
  (c) gateway, cache miss  POST /v1/predictions, a new customer_id every request
  (f) gateway, cache miss, one model   as (c), on a second gateway whose policy sends every
                           request to churn_gbm alone (no 90/10 split, no shadows): like for
                           like with (a)
  (d) gateway, cache hit   the same body every request
  (e) gateway, degraded    every model errors, breakers open, the CEL rules answer

Writes bench/results/<timestamp>.json and .md, and bench/results/latest.md (see README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procfs, promtext
from bench.load import Load, WrkRun, run_wrk, wrk_version
from bench.profile_summary import summarise, to_text
from bench.servers import REPO, Gateway, Nginx, Triton, http_post

RESULTS = Path(__file__).resolve().parent / "results"
TRITON_PATH = "/v2/models/churn_gbm/infer"
TRITON_BODY = json.dumps(
    {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [24, 89.99]}]}
)
PREDICT_PATH = "/v1/predictions"
GATEWAY_BODY = json.dumps(
    {
        "model_id": "customer-churn",
        "features": {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99},
    }
)
DEGRADED_TENURE = 3  # tenure < 6 (or < 12 with a high bill): a CEL rule always matches
LEDGER_SIZE = 100_000  # gateway.experiments.Experiments(ledger_size=...) default
BREAKER_OPEN = 2.0  # aigw_breaker_state: 0 closed, 1 half-open, 2 open


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    rss_of: str  # whose peak RSS the row reports: "triton", "nginx" or "gateway"


CASES = (
    Case("a", "direct Triton", "triton"),
    Case("b", "nginx → Triton", "nginx"),
    Case("c", "gateway, cache miss", "gateway"),
    Case("f", "gateway, miss, one model", "gateway"),
    Case("d", "gateway, cache hit", "gateway"),
    Case("e", "gateway, degraded (rules)", "gateway"),
)


class Log:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# ----------------------------------------------------------------------------- the stack


class Stack:
    """Triton, nginx and the gateway; stop() stops whatever was started, in reverse."""

    def __init__(
        self,
        with_nginx: bool = True,
        nginx_workers: int = 1,
        gateway_event_loop: str = "uvloop",
        heap_census: bool = False,
        gateway_workers: int = 1,
        policies: Path | None = None,
    ) -> None:
        self.policies = policies
        self.with_nginx = with_nginx
        self.nginx_workers = nginx_workers
        self.gateway_event_loop = gateway_event_loop
        self.heap_census = heap_census
        self.gateway_workers = gateway_workers
        self.triton: Triton | None = None
        self.nginx: Nginx | None = None
        self.gateway: Gateway | None = None

    def start(self, log: Log) -> None:
        self.triton = Triton()
        log("starting Triton (demo churn models)...")
        self.triton.start()
        log(f"Triton ready at {self.triton.http_url}")
        if self.with_nginx:
            self.nginx = Nginx(self.triton.http_port, workers=self.nginx_workers)
            self.nginx.start()
            log(f"nginx ready at {self.nginx.base_url}")
        self.gateway = Gateway(
            self.triton.http_url,
            event_loop=self.gateway_event_loop,
            heap_census=self.heap_census,
            workers=self.gateway_workers,
            policies=self.policies,
        )
        self.gateway.start()
        log(f"gateway ready at {self.gateway.base_url}")

    def stop(self) -> None:
        for server in (self.gateway, self.nginx, self.triton):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()

    @contextlib.contextmanager
    def one_model_gateway(self, log: Log) -> Iterator[None]:
        """For case (f): a second gateway, started as the first, whose policy sends every
        request to the primary model alone; `self.gateway` is it until the block ends."""
        assert self.triton is not None
        with tempfile.TemporaryDirectory(prefix="aigw-bench-one-model-") as tmp:
            policies = one_model_policies(self.policies or REPO / "policies", Path(tmp))
            second = Gateway(
                self.triton.http_url,
                event_loop=self.gateway_event_loop,
                workers=self.gateway_workers,
                policies=policies,
            )
            first, self.gateway = self.gateway, second
            try:
                second.start()
                log(f"one-model gateway ready at {second.base_url}")
                yield
            finally:
                self.gateway = first
                with contextlib.suppress(Exception):
                    second.stop()


def one_model_policies(source: Path, into: Path) -> Path:
    """A copy of the policy directory where each logical model's first arm takes all traffic
    and nothing is shadowed, so the gateway puts exactly one model's calls on Triton, as (a)
    does. The other arms stay (routes may name them) with weight 0."""
    for path in sorted(source.glob("*.y*ml")):
        policy = yaml.safe_load(path.read_text())
        for n, arm in enumerate(policy.get("arms", [])):
            arm["weight"] = 100 if n == 0 else 0
        policy["routes"] = []
        policy["shadows"] = []
        (into / path.name).write_text(yaml.safe_dump(policy, sort_keys=False))
    return into


@contextlib.contextmanager
def running(stack: Stack, log: Log) -> Iterator[Stack]:
    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stack.start(log)
        yield stack
    finally:
        log("stopping every server...")
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log("stopped")


# ----------------------------------------------------------------------------- the cases


def load_for(case: Case, stack: Stack, clients: int, tag: str) -> Load:
    assert stack.triton is not None and stack.gateway is not None
    if case.key == "a":
        return Load(
            stack.triton.base_url,
            "static.lua",
            {"BENCH_PATH": TRITON_PATH, "BENCH_BODY": TRITON_BODY},
        )
    if case.key == "b":
        assert stack.nginx is not None
        return Load(
            stack.nginx.base_url,
            "static.lua",
            {"BENCH_PATH": TRITON_PATH, "BENCH_BODY": TRITON_BODY},
        )
    if case.key == "d":
        return Load(
            stack.gateway.base_url,
            "static.lua",
            {"BENCH_PATH": PREDICT_PATH, "BENCH_BODY": GATEWAY_BODY},
        )
    tenure = DEGRADED_TENURE if case.key == "e" else 24  # (c) and (f): a model answers
    # A prefix unique to this run, case, concurrency and phase: no request ever repeats one.
    prefix = f"{case.key}{clients}-{tag}-{os.getpid()}-{int(time.time())}"
    return Load(
        stack.gateway.base_url, "vary.lua", {"BENCH_PREFIX": prefix, "BENCH_TENURE": str(tenure)}
    )


def server_pids(stack: Stack, which: str) -> list[int]:
    server = {"triton": stack.triton, "nginx": stack.nginx, "gateway": stack.gateway}[which]
    return server.pids() if server is not None else []


def open_breakers(stack: Stack, log: Log, timeout_s: float = 20.0) -> dict[str, float]:
    """Make every model error, then send requests until every target's breaker is open."""
    assert stack.triton is not None and stack.gateway is not None
    stack.triton.set_control("error")
    url = stack.gateway.base_url + PREDICT_PATH
    deadline = time.monotonic() + timeout_s
    states: dict[str, float] = {}
    i = 0
    while time.monotonic() < deadline:
        for headers in ({}, {"X-Customer-Tier": "premium"}):  # control and challenger arms
            body = json.dumps(
                {
                    "model_id": "customer-churn",
                    "features": {
                        "customer_id": f"open-{os.getpid()}-{i}",
                        "tenure_months": DEGRADED_TENURE,
                        "monthly_charges": 50.0,
                    },
                }
            )
            http_post(url, body.encode(), headers)
            i += 1
        states = promtext.gauge(
            promtext.parse(stack.gateway.metrics()), "aigw_breaker_state", "target"
        )
        if states and all(v == BREAKER_OPEN for v in states.values()):
            log(f"breakers open after {i} requests: {sorted(states)}")
            return states
        time.sleep(0.02)
    raise RuntimeError(f"breakers did not all open within {timeout_s:.0f}s: {states}")


def answers_summary(rows: list[tuple[dict[str, str], float]]) -> dict[str, object]:
    """The gateway's own count of what answered, from aigw_requests_total."""
    total = sum(v for _, v in rows)
    served: Counter[str] = Counter()
    arms: Counter[str] = Counter()
    cached = degraded = 0.0
    for labels, v in rows:
        served[labels.get("served_by", "?")] += int(v)
        arms[labels.get("arm", "?")] += int(v)
        cached += v if labels.get("cached") == "true" else 0
        degraded += v if labels.get("degraded") == "true" else 0
    return {
        "answered": int(total),
        "cached_pct": round(100 * cached / total, 2) if total else None,
        "degraded_pct": round(100 * degraded / total, 2) if total else None,
        "served_by": dict(served.most_common()),
        "arms": dict(arms.most_common()),
    }


def batching_summary(
    before: dict[promtext.Sample, float], after: dict[promtext.Sample, float]
) -> tuple[int, float | None]:
    """Triton calls the micro-batchers made during the row, and their mean rows per call."""
    calls = sum(v for _, v in promtext.diff(before, after, "aigw_backend_batch_rows_count"))
    rows = sum(v for _, v in promtext.diff(before, after, "aigw_backend_batch_rows_sum"))
    return int(calls), (round(rows / calls, 2) if calls else None)


def check_text(case: Case, row: dict[str, object]) -> str:
    """One line saying the case measured what it claims to, from the servers' own counters."""
    errors = row["errors"]
    non_2xx = errors.get("status", 0)  # type: ignore[union-attr]
    other = sum(v for k, v in errors.items() if k != "status")  # type: ignore[union-attr]
    bad = []
    if non_2xx:
        bad.append(f"{non_2xx} non-2xx")
    if other:
        bad.append(f"{other} socket errors")
    if case.key in ("a", "b"):
        return ", ".join(bad) or "all 200"
    ans = row["answers"]
    served = ans["served_by"]  # type: ignore[index]
    total = ans["answered"] or 1  # type: ignore[index]

    def share(name: str) -> str:
        return f"{100 * served.get(name, 0) / total:.0f}%"

    if case.key in ("c", "f"):
        text = (
            f"{100 - ans['cached_pct']:.1f}% computed, {ans['degraded_pct']:.1f}% degraded;"  # type: ignore[index,operator]
            f" gbm {share('churn-gbm')}, gbm-v2 {share('churn-gbm-v2')}"
        )
        if served.get("churn-logreg"):
            text += f", logreg {share('churn-logreg')}"
        if row.get("rows_per_call"):
            text += f"; {row['rows_per_call']} rows per Triton call"
    elif case.key == "d":
        text = f"{ans['cached_pct']:.1f}% cached"  # type: ignore[index]
    else:
        text = (
            f"{ans['degraded_pct']:.1f}% degraded; rules {share('rules')},"  # type: ignore[index]
            f" default {share('default')}"
        )
    return "; ".join([text, *bad])


def measure(
    case: Case, stack: Stack, clients: int, duration_s: float, warmup_s: float, log: Log
) -> dict[str, object]:
    """Warm up, then one measured wrk run with peak RSS reset and CPU accounted around it."""
    if warmup_s > 0:
        run_wrk(load_for(case, stack, clients, "warm"), clients, warmup_s)
    load = load_for(case, stack, clients, "run")
    under_test = server_pids(stack, case.rss_of)
    triton_pids = server_pids(stack, "triton")
    all_pids = {*under_test, *triton_pids}
    peak_reset = procfs.reset_peak_rss(all_pids)
    metrics_before = promtext.parse(stack.gateway.metrics()) if case.rss_of == "gateway" else {}
    cpu_before = {p: procfs.cpu_ticks([p]) for p in all_pids}
    busy_before = procfs.system_busy_ticks()
    wall_before = time.monotonic()

    result = run_wrk(load, clients, duration_s)

    wall = time.monotonic() - wall_before
    busy = procfs.system_busy_ticks() - busy_before
    cpu_delta = {p: procfs.cpu_ticks([p]) - t for p, t in cpu_before.items()}
    hz = procfs.CLOCK_TICKS

    def cpu_pct(pids: list[int]) -> float:
        return round(100 * sum(cpu_delta.get(p, 0) for p in pids) / hz / wall, 1)

    server_cpu = cpu_pct(under_test) if case.rss_of != "triton" else 0.0
    triton_cpu = cpu_pct(triton_pids)
    wrk_cpu = round(100 * result.cpu_s / wall, 1)
    total_cpu = round(100 * busy / hz / wall, 1)
    row: dict[str, object] = {
        "case": case.key,
        "title": case.title,
        "clients": clients,
        **result.to_dict(),
        "peak_rss_mb": round(procfs.peak_rss_kb(under_test) / 1024, 1),
        "rss_of": case.rss_of,
        "rss_processes": len(under_test),
        "triton_peak_rss_mb": round(procfs.peak_rss_kb(triton_pids) / 1024, 1),
        "peak_rss_reset": peak_reset,
        "cpu_pct": {  # 100 = one core; the machine has procfs.cpu_count() cores
            "server": server_cpu,
            "triton": triton_cpu,
            "wrk": wrk_cpu,
            "machine": total_cpu,
            "other": round(max(0.0, total_cpu - server_cpu - triton_cpu - wrk_cpu), 1),
        },
    }
    if case.rss_of == "gateway":
        after = promtext.parse(stack.gateway.metrics())
        row["answers"] = answers_summary(
            promtext.diff(metrics_before, after, "aigw_requests_total")
        )
        row["fallback_reasons"] = {
            f"{lbl.get('served_by')}/{lbl.get('reason')}": int(v)
            for lbl, v in promtext.diff(metrics_before, after, "aigw_fallbacks_total")
        }
        row["rejected"] = {
            lbl.get("status", "?"): int(v)
            for lbl, v in promtext.diff(metrics_before, after, "aigw_rejected_requests_total")
        }
        row["shadow_comparisons"] = int(
            sum(v for _, v in promtext.diff(metrics_before, after, "aigw_shadow_comparisons_total"))
        )
        row["triton_calls"], row["rows_per_call"] = batching_summary(metrics_before, after)
    # CPU time per answered request: comparable across rows even when the machine is busy.
    own_cpu = triton_cpu if case.rss_of == "triton" else server_cpu
    row["cpu_ms_per_request"] = {
        "server": round(10 * own_cpu / result.rps, 3) if result.rps else None,
        "triton": round(10 * triton_cpu / result.rps, 3) if result.rps else None,
    }
    row["check"] = check_text(case, row)
    lat = result.latency_ms
    log(
        f"({case.key}) {case.title:<26} c={clients:<3} {result.rps:8.1f} req/s  "
        f"p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms  "
        f"RSS {row['peak_rss_mb']} MB  [{row['check']}]"
    )
    return row


def add_ratios(rows: list[dict[str, object]]) -> None:
    base = {r["clients"]: r for r in rows if r["case"] == "a"}
    for r in rows:
        a = base.get(r["clients"])
        if a and a["rps"]:
            r["rps_ratio_to_a"] = round(r["rps"] / a["rps"], 3)  # type: ignore[operator]
            r["p50_added_ms_vs_a"] = round(
                r["latency_ms"]["p50"] - a["latency_ms"]["p50"],
                3,  # type: ignore[index]
            )


def profile_gateway(
    case: Case, stack: Stack, clients: int, duration_s: float, stamp: str, log: Log
) -> dict[str, object]:
    """An extra, unmeasured wrk run with py-spy sampling the gateway (not in the table)."""
    assert stack.gateway is not None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy not found: pip install py-spy (into this venv)")
    out = RESULTS / f"profile-{case.key}-{clients}-{stamp}.txt"
    seconds = max(3, round(duration_s))
    run = WrkRun(load_for(case, stack, clients, "profile"), clients, seconds + 2)
    run.start()
    time.sleep(1)  # let the load settle before sampling
    spy = subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(stack.gateway.pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--threads",
            "--gil",  # only the thread holding the GIL: where the interpreter's time goes
            "--full-filenames",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    result = run.wait()
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {spy.stderr[-2000:]}")
    summary = summarise(out)
    log(
        f"profile of ({case.key}) at c={clients}: {out.name}, {summary['samples']} samples, "
        f"{result.rps:.0f} req/s while sampled"
    )
    return {
        "case": case.key,
        "clients": clients,
        "file": out.name,
        "rps_while_sampled": round(result.rps, 1),
        **summary,
    }


# ----------------------------------------------------------------------------- reports


def environment(stack_info: dict[str, object]) -> dict[str, object]:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip()
        except OSError:
            return ""

    return {
        "host": platform.node(),
        "cpus": procfs.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version(),
        "nginx": Nginx.version(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len([ln for ln in git("status", "--porcelain").splitlines() if ln]),
        "load_average_at_start": [round(x, 2) for x in procfs.load_average()],
        **stack_info,
    }


def fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(report: dict[str, object]) -> str:
    env = report["environment"]
    cfg = report["config"]
    lines = [
        f"# Gateway benchmark — {report['started']}",
        "",
        f"Mode: {'quick' if cfg['quick'] else 'full'}; {cfg['duration_s']} s measured after "
        f"{cfg['warmup_s']} s warm-up per row; wrk {cfg['wrk_threads']} thread, "
        f"clients = open connections; total run {report['total_s']:.0f} s. "
        f"Machine: {env['cpus']} cores shared by wrk, Triton and the proxy; load average at "
        f"start {env['load_average_at_start']}; commit {env['git_commit']}"
        f"{' (+ uncommitted changes)' if env['git_dirty_files'] else ''}; "
        f"{env['wrk']}; nginx {env['nginx']}; Python {env['python']}; gateway workers "
        f"{cfg.get('gateway_workers', 1)}; policies {cfg.get('policies', 'policies/')}.",
        "",
        "| case | clients | req/s | p50 ms | p99 ms | peak RSS MB | RSS of | req/s ÷ (a) "
        "| server CPU ms/req | CPU % server / Triton / wrk / other | check |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|---|---|",
    ]
    for r in report["rows"]:  # type: ignore[union-attr]
        cpu = r["cpu_pct"]
        server = "–" if r["rss_of"] == "triton" else f"{cpu['server']:.0f}"
        rss_of = {
            "triton": f"Triton ({r['rss_processes']} procs)",
            "nginx": f"nginx ({r['rss_processes']} procs)",
            "gateway": "gateway",
        }[r["rss_of"]]
        lines.append(
            f"| ({r['case']}) {r['title']} | {r['clients']} | {r['rps']:,.0f} "
            f"| {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} "
            f"| {r['peak_rss_mb']:,.1f} | {rss_of} | {fmt(r.get('rps_ratio_to_a'), 2)} "
            f"| {fmt(r['cpu_ms_per_request']['server'], 2)} "
            f"| {server} / {cpu['triton']:.0f} / {cpu['wrk']:.0f} / {cpu['other']:.0f} "
            f"| {r['check']} |"
        )
    lines += [
        "",
        "- req/s: completed requests ÷ measured seconds (closed loop: each client sends its "
        "next request when the last one is answered). p50/p99: wrk's latency percentiles.",
        "- peak RSS: VmHWM of the server under test during this row (reset before it through "
        "/proc/PID/clear_refs); for Triton the sum over its process group (tritonserver, "
        "PyTriton's Python process, one backend stub and two helpers per model), which "
        "counts shared pages more than once. The gateway rows do not include Triton's RSS "
        "(it is in the JSON as triton_peak_rss_mb).",
        "- server CPU ms/req: CPU time of the server under test (Triton's whole group for "
        "(a), nginx for (b), the gateway process alone for (c)-(e)) per completed request.",
        "- CPU %: 100 = one core, measured from /proc over the row; 'other' is everything "
        "else on the machine in the same interval (other users' processes included).",
        "- check: the gateway's own counters (aigw_requests_total) over the row: what "
        "answered, so each case is known to measure what it claims.",
    ]
    if report.get("profiles"):
        lines += ["", "## py-spy profiles of the gateway (extra runs, not in the table)", ""]
        for p in report["profiles"]:  # type: ignore[union-attr]
            lines += [
                f"### ({p['case']}) at {p['clients']} clients — {p['file']}, "
                f"{p['rps_while_sampled']:.0f} req/s while sampled",
                "",
                "```",
                to_text(p),
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, object], stem: str, latest: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = report.pop("_markdown")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)  # type: ignore[arg-type]
    (RESULTS / f"{latest}.md").write_text(md)  # type: ignore[arg-type]
    (RESULTS / f"{latest}.json").write_text(json.dumps(report, indent=2) + "\n")
    return RESULTS / f"{stem}.md"


# ----------------------------------------------------------------------------- the modes


@contextlib.contextmanager
def case_setting(case: Case, stack: Stack, log: Log) -> Iterator[None]:
    """What a case needs around its rows: (e) failing models and open breakers, undone after;
    (f) its own one-model gateway."""
    if case.key == "f":
        with stack.one_model_gateway(log):
            yield
        return
    if case.key != "e":
        yield
        return
    try:
        open_breakers(stack, log)
        yield
    finally:
        assert stack.triton is not None
        stack.triton.set_control("ok")


def compare(args: argparse.Namespace, log: Log) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stack = Stack(
        with_nginx="b" in args.cases,
        nginx_workers=args.nginx_workers,
        gateway_event_loop=args.gateway_event_loop,
        gateway_workers=args.gateway_workers,
        policies=args.policies,
    )
    rows: list[dict[str, object]] = []
    profiles: list[dict[str, object]] = []
    env = environment({})
    selected = [c for c in CASES if c.key in args.cases]
    with running(stack, log):
        for case in selected:
            with case_setting(case, stack, log):
                for clients in args.clients:
                    rows.append(measure(case, stack, clients, args.duration, args.warmup, log))
                    if args.profile and case.rss_of == "gateway" and clients == max(args.clients):
                        try:
                            profiles.append(
                                profile_gateway(case, stack, clients, args.duration, stamp, log)
                            )
                        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                            log(f"profile of ({case.key}) skipped: {exc}")
    add_ratios(rows)
    report: dict[str, object] = {
        "started": stamp,
        "total_s": round(log.elapsed, 1),
        "config": {
            "quick": args.quick,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "clients": args.clients,
            "cases": args.cases,
            "wrk_threads": 1,
            "nginx_workers": args.nginx_workers,
            "gateway_event_loop": args.gateway_event_loop,
            "gateway_workers": args.gateway_workers,
            "policies": str(args.policies or "policies/"),
            "triton_body": json.loads(TRITON_BODY),
            "gateway_body_hit": json.loads(GATEWAY_BODY),
            "degraded": "control file: every model raises; breakers open; CEL rules answer",
        },
        "environment": env,
        "rows": rows,
        "profiles": profiles,
    }
    report["_markdown"] = markdown(report)
    path = write_report(report, stamp, "latest")
    log(f"wrote {path} and {RESULTS / 'latest.md'} (total {log.elapsed:.0f} s)")
    return path


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 60 * sum((t - mx) * (v - my) for t, v in points) / sxx


def soak(args: argparse.Namespace, log: Log) -> Path:
    """The gateway under cache-miss load for args.soak seconds; RSS and fds sampled."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stack = Stack(with_nginx=False, gateway_event_loop=args.gateway_event_loop, heap_census=True)
    clients = max(args.clients)
    interval = args.soak_interval or (5.0 if args.soak >= 60 else 2.0)
    samples: list[dict[str, float]] = []
    census: dict[str, dict[str, object] | None] = {}
    env = environment({})
    with running(stack, log):
        assert stack.gateway is not None and stack.triton is not None
        gw, triton = stack.gateway, stack.triton
        case = next(c for c in CASES if c.key == "c")

        def sample(t: float, phase: str) -> dict[str, float]:
            answered = promtext.total(promtext.parse(gw.metrics()), "aigw_requests_total")
            s = {
                "t_s": round(t, 1),
                "rss_mb": round(procfs.rss_kb([gw.pid]) / 1024, 2),
                "fds": procfs.fd_count(gw.pid),
                "threads": procfs.thread_count(gw.pid),
                "answered": int(answered),
                "triton_rss_mb": round(procfs.rss_kb(triton.pids()) / 1024, 1),
                "phase": phase,
            }
            samples.append(s)  # type: ignore[arg-type]
            return s  # type: ignore[return-value]

        sample(0.0, "idle")
        census["idle"] = gw.heap_census()
        run = WrkRun(load_for(case, stack, clients, "soak"), clients, args.soak)
        run.start()
        t0 = time.monotonic()
        log(
            f"soak: {args.soak:.0f} s of cache-miss load at {clients} clients, "
            f"sampling every {interval:.0f} s"
        )
        faulted = False
        next_log = t0
        while (t := time.monotonic() - t0) < args.soak:
            phase = "load"
            if args.soak_faults:
                # 10 s of every 60 s: every model errors, breakers open, the rules answer.
                want = (t % 60) >= 50
                if want != faulted:
                    triton.set_control("error" if want else "ok")
                    faulted = want
                phase = "faults" if faulted else "load"
            s = sample(t, phase)
            if "steady_start" not in census and s["answered"] >= LEDGER_SIZE:
                census["steady_start"] = gw.heap_census()
                census["steady_start"]["t_s"] = round(t, 1)  # type: ignore[index]
            if time.monotonic() >= next_log:
                log(
                    f"soak t={t:5.0f}s RSS {s['rss_mb']:.1f} MB, fds {s['fds']}, "
                    f"answered {s['answered']}"
                )
                next_log += 30
            time.sleep(max(0.0, min(interval, args.soak - (time.monotonic() - t0))))
        if faulted:
            triton.set_control("ok")
        result = run.wait()
        sample(time.monotonic() - t0, "end")
        census["end"] = gw.heap_census()
        time.sleep(2)
        sample(time.monotonic() - t0, "after")
    report = soak_report(args, stamp, clients, interval, samples, result.to_dict(), env, log)
    report["heap_census"] = heap_summary(census)
    refine_memory_verdict(report, census)
    report["_markdown"] = soak_markdown(report)
    path = write_report(report, f"soak-{stamp}", "latest-soak")
    verdict = report["verdict"]
    log(f"soak: memory {verdict['memory']}: {verdict['memory_text']}")  # type: ignore[index]
    log(
        f"soak: fds {'no leak' if verdict['no_fd_leak'] else 'POSSIBLE LEAK'}: "  # type: ignore[index]
        f"{verdict['fds_text']}"
    )  # type: ignore[index]
    heap = report["heap_census"]
    if heap.get("steady_growth"):  # type: ignore[union-attr]
        log(f"soak: Python heap after the steady start: {heap['steady_growth']}")  # type: ignore[index]
    log(f"wrote {path} and {RESULTS / 'latest-soak.md'}")
    return path


def refine_memory_verdict(
    report: dict[str, object], census: dict[str, dict[str, object] | None]
) -> None:
    """RSS that rose while the Python heap did not is the allocator keeping pages, not a leak."""
    verdict = report["verdict"]
    start, end = census.get("steady_start"), census.get("end")
    if verdict["memory"] != "growing" or not (start and end):  # type: ignore[index]
        return
    blocks = end["allocated_blocks"] / start["allocated_blocks"] - 1  # type: ignore[operator]
    objects = end["gc_objects"] / start["gc_objects"] - 1  # type: ignore[operator]
    steady = [
        p
        for p in report["samples"]  # type: ignore[union-attr]
        if p["phase"] in ("load", "faults") and p["t_s"] >= start["t_s"]  # type: ignore[index]
    ]
    tail = steady[len(steady) * 2 // 3 :]
    tail_slope = slope_per_min([(p["t_s"], p["rss_mb"]) for p in tail])
    rss = report["rss_mb"]["steady"]  # type: ignore[index]
    if blocks <= 0.01 and objects <= 0.01:
        verdict["memory"] = "no leak: Python heap flat"  # type: ignore[index]
        verdict["memory_text"] = (  # type: ignore[index]
            f"the live Python heap did not grow after {LEDGER_SIZE:,} answers (allocated blocks "
            f"{100 * blocks:+.2f}%, gc-tracked objects {100 * objects:+.2f}%), while RSS went "
            f"{rss['first']} -> {rss['last']} MB (slope {rss['slope_per_min']} MB/min over the "
            f"window, {tail_slope if tail_slope is None else round(tail_slope, 3)} MB/min over "
            "its last third): pages the allocator keeps after freeing, not live objects"
        )
    else:
        verdict["memory_text"] += (  # type: ignore[index]
            f"; Python heap over the window: allocated blocks {100 * blocks:+.2f}%, "
            f"gc-tracked objects {100 * objects:+.2f}%"
        )


def heap_summary(census: dict[str, dict[str, object] | None]) -> dict[str, object]:
    """Object counts at idle, at the steady start and at the end; what grew in between."""
    out: dict[str, object] = {
        phase: {k: v for k, v in c.items() if k != "by_type"}
        for phase, c in census.items()
        if c is not None
    }
    start, end = census.get("steady_start"), census.get("end")
    if start and end:
        a, b = start["by_type"], end["by_type"]  # type: ignore[index]
        growth = {t: b.get(t, 0) - a.get(t, 0) for t in {*a, *b}}  # type: ignore[union-attr]
        out["top_type_growth"] = dict(
            sorted(growth.items(), key=lambda kv: -abs(kv[1]))[:10]  # type: ignore[arg-type]
        )
        blocks = end["allocated_blocks"] - start["allocated_blocks"]  # type: ignore[operator]
        objs = end["gc_objects"] - start["gc_objects"]  # type: ignore[operator]
        out["steady_growth"] = (
            f"allocated blocks {start['allocated_blocks']:,} -> {end['allocated_blocks']:,} "
            f"({100 * blocks / start['allocated_blocks']:+.2f}%), gc-tracked objects "
            f"{start['gc_objects']:,} -> {end['gc_objects']:,} "
            f"({100 * objs / start['gc_objects']:+.2f}%)"
        )
    return out


def soak_report(
    args: argparse.Namespace,
    stamp: str,
    clients: int,
    interval: float,
    samples: list[dict[str, float]],
    wrk: dict[str, object],
    env: dict[str, object],
    log: Log,
) -> dict[str, object]:
    loaded = [s for s in samples if s["phase"] in ("load", "faults")]
    idle = next(s for s in samples if s["phase"] == "idle")
    after = samples[-1]
    # Bounded structures fill first: the cache (100k entries, two per answer) and the ledger
    # of recent decisions (100k). Growth until then is by design; after it, it would be a leak.
    full = [s for s in loaded if s["answered"] >= LEDGER_SIZE]
    steady_is_full = len(full) >= 3
    steady = full if steady_is_full else loaded[len(loaded) // 2 :]

    def stats(key: str, points: list[dict[str, float]]) -> dict[str, object]:
        values = [p[key] for p in points]
        slope = slope_per_min([(p["t_s"], p[key]) for p in points])
        return {
            "first": values[0],
            "last": values[-1],
            "min": min(values),
            "max": max(values),
            "slope_per_min": None if slope is None else round(slope, 3),
        }

    rss_all, rss_steady = stats("rss_mb", loaded), stats("rss_mb", steady)
    fds_all, fds_steady = stats("fds", loaded), stats("fds", steady)
    rss_slope = rss_steady["slope_per_min"]
    if not steady_is_full:
        memory = "inconclusive"
        memory_text = (
            f"only {loaded[-1]['answered']:,} answers: the bounded cache and decision ledger "
            f"were still filling (run longer, until well past {LEDGER_SIZE:,} answers); "
            f"second-half slope {rss_slope} MB/min"
        )
    else:
        memory = "flat" if abs(rss_slope) < 1.0 else "growing"  # type: ignore[arg-type]
        memory_text = (
            f"RSS slope {rss_slope} MB/min once {LEDGER_SIZE:,} answers had filled the "
            f"cache and ledger (flat means |slope| < 1 MB/min); whole run "
            f"{rss_all['first']} -> {rss_all['last']} MB"
        )
    half = len(loaded) // 2
    fd_growth = max(s["fds"] for s in loaded[half:]) - max(s["fds"] for s in loaded[:half])
    no_fd_leak = fd_growth <= 4
    return {
        "started": stamp,
        "total_s": round(log.elapsed, 1),
        "config": {
            "seconds": args.soak,
            "clients": clients,
            "interval_s": interval,
            "load": "cache miss (a new customer_id every request)",
            "faults": "10 s of every 60 s all models error" if args.soak_faults else "none",
        },
        "environment": env,
        "wrk": wrk,
        "steady_window": {
            "from_t_s": steady[0]["t_s"],
            "to_t_s": steady[-1]["t_s"],
            "samples": len(steady),
            "why": (
                f"after {LEDGER_SIZE:,} answers (cache and decision ledger full)"
                if steady_is_full
                else "second half of the run (bounded structures not yet full)"
            ),
        },
        "rss_mb": {"whole_run": rss_all, "steady": rss_steady},
        "fds": {
            "whole_run": fds_all,
            "steady": fds_steady,
            "idle_before": idle["fds"],
            "after_load": after["fds"],
        },
        "verdict": {
            "memory": memory,
            "memory_text": memory_text,
            "no_fd_leak": no_fd_leak,
            "fds_text": (
                f"max of the second half minus max of the first half: {fd_growth:+d}; "
                f"{idle['fds']} idle before the load, {fds_all['first']}-{fds_all['max']} "
                f"under load, {after['fds']} two seconds after it (kept-alive connections "
                "to Triton stay open)"
            ),
        },
        "samples": samples,
    }


def heap_markdown(heap: dict[str, object]) -> list[str]:
    if not heap:
        return []
    lines = [
        "Python heap (SIGUSR1 census by bench/launch_gateway.py: `sys.getallocatedblocks()` "
        "and objects tracked by the garbage collector, by type):",
        "",
        "| when | t s | allocated blocks | gc-tracked objects | census pause ms |",
        "|---|--:|--:|--:|--:|",
    ]
    for phase in ("idle", "steady_start", "end"):
        c = heap.get(phase)
        if isinstance(c, dict):
            lines.append(
                f"| {phase.replace('_', ' ')} | {c.get('t_s', '')} | {c['allocated_blocks']:,} "
                f"| {c['gc_objects']:,} | {c['pause_ms']} |"
            )
    if heap.get("steady_growth"):
        growth = ", ".join(f"{k} {v:+,}" for k, v in heap["top_type_growth"].items())  # type: ignore[union-attr]
        lines += ["", f"From the steady start to the end: {heap['steady_growth']}.",
                  f"Largest changes by type: {growth}."]  # fmt: skip
    return [*lines, ""]


def soak_markdown(r: dict[str, object]) -> str:
    cfg, wrk, env = r["config"], r["wrk"], r["environment"]
    v, win = r["verdict"], r["steady_window"]
    lines = [
        f"# Gateway soak — {r['started']}",
        "",
        f"{cfg['seconds']:.0f} s of {cfg['load']} at {cfg['clients']} clients (wrk), faults: "
        f"{cfg['faults']}; {wrk['requests']:,} requests, {wrk['rps']:,.0f} req/s, p50 "
        f"{wrk['latency_ms']['p50']} ms, p99 {wrk['latency_ms']['p99']} ms, errors "
        f"{wrk['errors']}. Gateway sampled every {cfg['interval_s']:.0f} s. "
        f"{env['cpus']} cores, load average at start {env['load_average_at_start']}, "
        f"commit {env['git_commit']}.",
        "",
        "| metric | window | first | last | min | max | slope / min |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for metric, unit in (("rss_mb", "RSS MB"), ("fds", "open fds")):
        for window in ("whole_run", "steady"):
            s = r[metric][window]  # type: ignore[index]
            lines.append(
                f"| {unit} | {window.replace('_', ' ')} | {fmt(s['first'])} "
                f"| {fmt(s['last'])} | {fmt(s['min'])} | {fmt(s['max'])} "
                f"| {fmt(s['slope_per_min'], 3)} |"
            )
    lines += [
        "",
        f"Steady window: t = {win['from_t_s']}–{win['to_t_s']} s ({win['samples']} samples), "
        f"{win['why']}.",
        "",
        f"- memory: **{v['memory']}** — {v['memory_text']}",
        f"- file descriptors: **{'no leak' if v['no_fd_leak'] else 'POSSIBLE LEAK'}** — "
        f"{v['fds_text']}",
        "",
        *heap_markdown(r.get("heap_census") or {}),  # type: ignore[arg-type]
        "| t s | phase | RSS MB | fds | threads | answered | Triton RSS MB |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for s in r["samples"]:  # type: ignore[union-attr]
        lines.append(
            f"| {s['t_s']} | {s['phase']} | {s['rss_mb']} | {s['fds']} "
            f"| {s['threads']} | {s['answered']:,} | {s['triton_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def _clients(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Direct Triton vs nginx vs the gateway (miss, hit, degraded), side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="5 s per row after 1 s warm-up (finishes in under 2 minutes)",
    )
    p.add_argument("--duration", type=float, help="measured seconds per row (default 15, quick 5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per row (default 3, quick 1)")
    p.add_argument(
        "--clients",
        type=_clients,
        default=[1, 64],
        help="concurrent clients (connections), comma-separated (default 1,64)",
    )
    p.add_argument("--cases", default="abcfde", help="which cases to run (default abcfde)")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes")
    p.add_argument(
        "--gateway-event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="AIGW_EVENT_LOOP for the gateway (default uvloop, as in production)",
    )
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="worker processes of the gateway (`aigw serve --workers N`; default 1)",
    )
    p.add_argument(
        "--policies",
        type=Path,
        help="the gateway's policy directory (default: the repository's policies/): a what-if",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile the gateway with py-spy in (c), (d), (e) at max clients",
    )
    p.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="run only the soak: the gateway under cache-miss load for SECONDS",
    )
    p.add_argument("--soak-interval", type=float, help="seconds between samples (default 5)")
    p.add_argument(
        "--soak-faults",
        action="store_true",
        help="during the soak, make every model error 10 s of every 60 s",
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.cases = "".join(c for c in args.cases.lower() if c in "abcdef")
    if "a" not in args.cases:
        args.cases = "a" + args.cases  # every ratio is to (a)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = Log()
    if not sys.platform.startswith("linux"):
        log("needs Linux (/proc)")
        return 2
    run: Callable[[argparse.Namespace, Log], Path] = soak if args.soak else compare
    try:
        run(args, log)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
