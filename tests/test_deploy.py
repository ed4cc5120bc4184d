"""The deployment files in deploy/, checked offline with the real tools where they run here.

- Prometheus: `promtool check rules`, `promtool test rules` (the alerts' unit tests) and
  `promtool check config`. promtool and prometheus come from Debian's `prometheus` package; a
  missing one fails these tests rather than skipping them.
- Grafana and the rules against real data, once with one process and once with two workers
  (whose combined metrics must say the same): a real `aigw serve` (its Triton address a closed
  port, so every answer is a degraded fallback, and its audit stream a closed Redis port, so
  the spill grows) gets a few hundred requests, including invalid ones, and a refused policy
  change; a real `prometheus` scrapes it every second and evaluates the rules. Then every
  dashboard panel's expression and every rule's expression goes through Prometheus'
  /api/v1/query: each must be accepted, the Overview's core panels must return data, and the
  alerts a Triton-less gateway should raise must match.
- Kubernetes: the manifests are parsed and checked in Python (kinds, probes, resources,
  graceful shutdown, selectors, ConfigMaps, every file listed); `kubectl kustomize` builds them
  when kubectl is installed.
- docker compose and the Dockerfile: parsed and checked in Python (no container engine here).
- Stream workers (`aigw worker`): both deployments run one, with /metrics off loopback, its own
  audit directory, and scraped under the job name the rules select; a real worker answering
  real stream entries is scraped by a real Prometheus, which must raise none of the gateway's
  alerts for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.backends import BackendError
from gateway.cli import _parser as aigw_parser
from gateway.server import GRACEFUL_SHUTDOWN_S
from gateway.settings import Settings
from gateway.worker import STOP_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"

# Grafana's variables, as a query with every model selected would expand them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${model}": ".*",
    "$model": ".*",
}
# Panels of the Overview that must show data for a gateway with traffic.
OVERVIEW_CORE_PANELS = {
    "Requests / s",
    "Degraded ratio",
    "Error ratio (5xx)",
    "Client error ratio (4xx)",
    "p99 latency",
    "Traffic by model and answering step",
    "Latency p50 / p95 / p99",
    "Degraded ratio by model",
}
# The Prometheus job names of `aigw serve` and `aigw worker`: the compose scrape config and the
# Kubernetes Services the ServiceMonitors select must both produce them (the rules select them).
GATEWAY_JOB, WORKER_JOB = "aigw", "aigw-worker"
# Settings read from the environment that are not Settings fields: the policy's ${VAR}.
POLICY_VARIABLES = {"AIGW_TRITON_URL"}
DASHBOARD_PROVIDER_PATH = "/var/lib/grafana/dashboards/aigw"


def tool(name: str) -> str:
    """The path of a required binary; its absence fails the test (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: `apt-get install -y prometheus` (Debian) provides "
            "prometheus and promtool; the Makefile's APT_PACKAGES should list it",
            pytrace=False,
        )
    return path


def run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- Prometheus rules and configuration --------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [
        rule for path in RULES for group in load_yaml(path)["groups"] for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_rule_files_pass_promtool_check() -> None:
    assert RULES, "no rule files in deploy/prometheus/rules"
    result = run(tool("promtool"), "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    result = run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert {rule["alert"] for rule in alerts()} <= tested


def test_prometheus_config_passes_promtool_check() -> None:
    result = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def compose_scrape_jobs() -> dict[str, set[str]]:
    """Job name -> the `host:port` targets of deploy/prometheus/prometheus.yml."""
    return {
        job["job_name"]: {
            *(t for c in job.get("static_configs", []) for t in c["targets"]),
            *(f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]),
        }
        for job in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
    }


def k8s_scrape_jobs() -> set[str]:
    """The job label each ServiceMonitor gives its targets: the selected Service's name."""
    docs = manifests()
    services = [d for d in docs if d["kind"] == "Service"]
    jobs = set()
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert "jobLabel" not in monitor["spec"], "the job would no longer be the Service's name"
        selected = [
            svc
            for svc in services
            if selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        ]
        assert len(selected) == 1, (
            f"ServiceMonitor {monitor['metadata']['name']} selects {selected}"
        )
        jobs.add(selected[0]["metadata"]["name"])
    return jobs


def job_selectors(text: str) -> set[str]:
    """Job names matched by `job="..."` (or `job=~"a|b"`) in PromQL, JSON-escaped or not."""
    found = re.findall(r'\bjob\s*=~?\s*\\?"([^"\\]*)\\?"', text)
    return {name for value in found for name in value.split("|")}


def test_rules_and_dashboards_select_jobs_that_both_deployments_scrape() -> None:
    """A `job` matcher naming a job nobody scrapes selects nothing: an alert that never fires."""
    texts = [path.read_text(encoding="utf-8") for path in [*RULES, *DASHBOARDS]]
    texts.append((K8S / "prometheusrule.yaml").read_text(encoding="utf-8"))
    used = {job for text in texts for job in job_selectors(text)}
    assert {GATEWAY_JOB, WORKER_JOB} <= used, used
    compose, k8s = set(compose_scrape_jobs()), k8s_scrape_jobs()
    assert used <= compose, f"not scraped by compose's Prometheus: {used - compose}"
    assert used <= k8s, f"no ServiceMonitor gives these jobs: {used - k8s}"
    assert k8s == {GATEWAY_JOB, WORKER_JOB}


def test_gateway_only_metrics_are_selected_by_the_gateways_job() -> None:
    """`aigw worker` probes no backend, so its aigw_ready is always 0: every use of the
    gauge in rules and dashboards must keep to `aigw serve` (job aigw), or every scraped
    worker reads as a gateway that is not ready."""
    exprs = [rule["expr"] for rule in rules()] + [expr for _, _, expr in panel_queries()]
    uses = [m for expr in exprs for m in re.finditer(r"\baigw_ready\b(\{[^}]*\})?", expr)]
    assert uses
    for use in uses:
        assert job_selectors(use.group(1) or "") == {GATEWAY_JOB}, use.group(0)


def test_alerts_have_severity_summary_description_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9_ -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        anchor = re.match(r"deploy/README\.md#([a-z0-9-]+): \S", notes["runbook"])
        assert anchor, f"{rule['alert']}: runbook must be 'deploy/README.md#anchor: hint'"
        assert anchor[1] in headings, f"{rule['alert']}: no section #{anchor[1]} in README"


def test_prometheus_operator_rules_match_the_rule_files() -> None:
    (rule_doc,) = load_yaml_all(K8S / "prometheusrule.yaml")
    groups = [group for path in RULES for group in load_yaml(path)["groups"]]
    assert rule_doc["kind"] == "PrometheusRule"
    assert rule_doc["spec"]["groups"] == groups, "copy the rules' groups to prometheusrule.yaml"


def test_metric_names_are_ones_the_gateway_exports() -> None:
    """Every aigw_ name in rules and dashboards is declared in gateway/telemetry.py."""
    source = (REPO / "gateway" / "telemetry.py").read_text(encoding="utf-8")
    declared = set(re.findall(r'"(aigw_[a-z_]+)"', source))
    assert "aigw_requests" in declared
    texts = [path.read_text(encoding="utf-8") for path in [*RULES, *DASHBOARDS]]
    used = {name for text in texts for name in re.findall(r"\baigw_[a-z_]+", text)}
    suffixes = ("_total", "_created", "_bucket", "_sum", "_count")
    for name in sorted(used):
        base = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
        assert name in declared or base in declared, f"{name} is not exported by the gateway"


# --- Grafana dashboards ------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in DASHBOARDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL) for every query of every panel."""
    return [
        (board["title"], panel["title"], target["expr"])
        for board in dashboards().values()
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboards_parse_with_unique_uids_titles_and_panel_ids() -> None:
    boards = dashboards()
    titles = {board["title"] for board in boards.values()}
    uids = {board["uid"] for board in boards.values()}
    assert len(titles) == len(uids) == len(boards) >= 5
    assert {"overview", "resilience", "experiments", "cache", "audit"} <= {
        name.removesuffix(".json") for name in boards
    }
    for name, board in boards.items():
        assert board["uid"] and len(board["uid"]) <= 40, name
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels(board):
            assert panel.get("title"), f"{name}: a panel without a title"
            if panel["type"] not in ("row", "text"):
                assert panel["targets"], f"{name}: {panel['title']} has no query"


def test_dashboard_queries_use_the_provisioned_datasource() -> None:
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[
        "datasources"
    ]
    for board in dashboards().values():
        for panel in panels(board):
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == source["uid"], panel["title"]
                assert target["expr"].strip(), panel["title"]
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/aigw.yaml")["providers"]
    assert provider["options"]["path"] == DASHBOARD_PROVIDER_PATH


def backend_call_outcomes() -> set[str]:
    """What `aigw_backend_duration_seconds{outcome}` can hold: success, or a failure's reason."""

    def subclasses(cls: type) -> list[type]:
        return [cls, *(sub for direct in cls.__subclasses__() for sub in subclasses(direct))]

    return {"success"} | {error.reason for error in subclasses(BackendError)}


def test_dashboards_match_backend_call_outcomes_the_gateway_records() -> None:
    """A matcher on an outcome the gateway never records selects nothing (or, negated,
    everything): a panel of errors that counted every success as one."""
    outcomes = backend_call_outcomes()
    found = 0
    for board, panel, expr in panel_queries():
        for metric in re.finditer(r"aigw_backend_duration_seconds\w*\{([^}]*)\}", expr):
            for value in re.findall(r'outcome\s*!?=~?\s*"([^"]*)"', metric.group(1)):
                found += 1
                assert set(value.split("|")) <= outcomes, f"{board}: {panel}: {value!r}"
    assert found, "no dashboard query matches on a backend call's outcome"


def test_dashboard_model_variable_is_matched_as_a_regex() -> None:
    """A multi-value variable expands to `a|b`: only `=~` matches it."""
    for board, panel, expr in panel_queries():
        for match in re.finditer(r'(\w+)\s*(=~|!~|=|!=)\s*"\$\{?model\}?"', expr):
            assert match[2] == "=~", f'{board} / {panel}: use model=~"$model"'


# --- A real gateway scraped by a real Prometheus ------------------------------------------


class LivePrometheus:
    def __init__(self, url: str, sent: dict[str, int]) -> None:
        self.url = url
        self.sent = sent

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
        return body["data"]

    def series(self, expr: str) -> list[dict[str, Any]]:
        return self.query(expr)["result"]


def _wait(condition, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as error:
            last = error
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drive_traffic(gateway: str, admin: str) -> dict[str, int]:
    """Answers (all degraded), refused requests and a refused policy change."""
    sent = {"answers": 0, "rejected": 0}
    with httpx.Client(base_url=gateway, timeout=5) as client:
        for batch in range(3):
            for i in range(100):
                features = {
                    "customer_id": f"c-{batch}-{i}",
                    "tenure_months": i % 60,
                    "monthly_charges": 20.0 + i,
                }
                headers = {"X-Customer-Tier": "premium"} if i % 10 == 0 else {}
                response = client.post(
                    "/v1/predictions",
                    json={"model_id": "customer-churn", "features": features},
                    headers=headers,
                )
                assert response.status_code == 200, response.text
                sent["answers"] += 1
            # Refused: a contract violation and a malformed body, in every batch (a counter
            # series is born at its first increment: rates need the later ones).
            invalid = client.post(
                "/v1/predictions", json={"model_id": "customer-churn", "features": {}}
            )
            malformed = client.post(
                "/v1/predictions", content=b"{", headers={"Content-Type": "application/json"}
            )
            assert (invalid.status_code, malformed.status_code) == (422, 400)
            sent["rejected"] += 2
            time.sleep(1.0)  # spread over several scrapes, so rates have points
        same = {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99}
        for _ in range(2):  # the second would be a cache hit if Triton had answered the first
            response = client.post(
                "/v1/predictions", json={"model_id": "customer-churn", "features": same}
            )
            assert response.status_code == 200, response.text
            sent["answers"] += 1
    with httpx.Client(base_url=admin, timeout=10) as client:
        running = client.get("/admin/policies")
        assert running.status_code == 200, running.text
        bundle = running.json()["bundle"]
        bundle["policies"]["zz-broken.yaml"] = "model_id: [unclosed\n"
        refused = client.post("/admin/policies", json={"author": "test", "bundle": bundle})
        assert refused.status_code == 422, refused.text
        sent["rejected"] += 1  # the admin API's problems are counted too
    return sent


@pytest.fixture(scope="module")
def lives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, LivePrometheus]]:
    """Both set-ups of `live`, started at once: most of each is waiting for scrapes."""
    starts = {
        workers: _live_gateway(workers, tmp_path_factory.mktemp(f"deploy-live-{workers}"))
        for workers in (1, 2)
    }
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {workers: pool.submit(start.__enter__) for workers, start in starts.items()}
    started, failure = {}, None
    for workers, future in futures.items():
        try:
            started[workers] = future.result()
        except BaseException as error:  # re-raised below, after the cleanup
            failure = failure or error
    try:
        if failure is not None:
            raise failure
        yield started
    finally:
        for workers in started:
            starts[workers].__exit__(None, None, None)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def live(request: pytest.FixtureRequest, lives: dict[int, LivePrometheus]) -> LivePrometheus:
    """`aigw serve` without Triton, scraped every second by a real Prometheus with the rules;
    once as one process, once as two workers whose /metrics must report the same totals."""
    return lives[request.param]


@contextlib.contextmanager
def _live_gateway(workers: int, root: Path) -> Iterator[LivePrometheus]:
    """`aigw serve --workers N` and a Prometheus scraping it, once it has scraped traffic."""
    prometheus_bin = tool("prometheus")
    port, admin_port, prometheus_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}
    env.update(
        AIGW_TRITON_URL=f"127.0.0.1:{free_port()}",  # nothing listens: fallbacks answer
        AIGW_AUDIT_STREAM_URL=f"redis://127.0.0.1:{free_port()}/0",  # down: the spill grows
        AIGW_AUDIT_DIR=str(root / "audit"),
        AIGW_ADMIN_PORT=str(admin_port),
        AIGW_WATCH_POLICIES="false",
        AIGW_READINESS_INTERVAL_S="0.5",
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULES],
        "scrape_configs": [
            {"job_name": "aigw", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    started: list[subprocess.Popen] = []
    try:
        with open(root / "gateway.log", "wb") as log:
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gateway.cli",
                        "serve",
                        "--port",
                        str(port),
                        "--workers",
                        str(workers),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        with open(root / "prometheus.log", "wb") as log:
            started.append(
                subprocess.Popen(
                    [
                        prometheus_bin,
                        f"--config.file={root / 'prometheus.yml'}",
                        f"--storage.tsdb.path={root / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                        "--log.level=warn",
                    ],
                    cwd=root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        gateway = f"http://127.0.0.1:{port}"
        url = f"http://127.0.0.1:{prometheus_port}"

        def gateway_live() -> bool:
            if started[0].poll() is not None:
                log = (root / "gateway.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"aigw serve exited with {started[0].returncode}:\n{log}")
            return httpx.get(f"{gateway}/healthz", timeout=1).status_code == 200

        _wait(gateway_live, "aigw serve", 30)
        live = LivePrometheus(url, {})
        # Prometheus applies new targets up to 5 s after start: traffic starts once it scrapes.
        _wait(lambda: live.series('up{job="aigw"} == 1'), "the first scrape", 20)
        live.sent.update(_drive_traffic(gateway, f"http://127.0.0.1:{admin_port}"))

        def scraped_everything() -> bool:
            (answers,) = live.series("sum(aigw_requests_total)")
            (refused,) = live.series('aigw_policy_reloads_total{outcome="refused"}')
            (rejected,) = live.series("sum(aigw_rejected_requests_total)")
            (samples,) = live.series("count_over_time(aigw_ready[1m])")
            # the recording rules have run on the scraped data too
            assert live.series("aigw:request_latency_slo_errors:ratio_rate5m")
            seen = {
                "answers": float(answers["value"][1]),
                "refused policies": float(refused["value"][1]),
                "rejected": float(rejected["value"][1]),
                "samples": float(samples["value"][1]),
            }
            expected = {**live.sent, "refused policies": 1, "samples": seen["samples"]}
            assert seen == expected and seen["samples"] >= 6, seen
            return True

        _wait(scraped_everything, "Prometheus to scrape every answer", 20)
        yield live
    finally:
        for process in reversed(started):
            _stop(process)


def test_every_dashboard_query_is_accepted_by_prometheus(live: LivePrometheus) -> None:
    queries = panel_queries()
    assert len(queries) > 40
    for board, panel, expr in queries:
        try:
            live.query(substitute(expr))
        except AssertionError as error:
            raise AssertionError(f"{board} / {panel}: {error}") from None


def test_dashboard_variable_queries_return_values(live: LivePrometheus) -> None:
    for board in dashboards().values():
        for variable in board["templating"]["list"]:
            found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert found, f"{board['title']}: ${variable['name']}: use label_values(metric, label)"
            values = live.series(f"group by ({found[2]}) ({found[1]})")
            assert [v["metric"][found[2]] for v in values] == ["customer-churn"]


def test_overview_core_panels_show_data(live: LivePrometheus) -> None:
    overview = next(board for board in dashboards().values() if board["uid"] == "aigw-overview")
    shown = {panel["title"]: panel for panel in panels(overview)}
    assert set(shown) >= OVERVIEW_CORE_PANELS
    for title in sorted(OVERVIEW_CORE_PANELS):
        for target in shown[title]["targets"]:
            result = live.series(substitute(target["expr"]))
            assert result, f"Overview / {title}: no data for {target['expr']!r}"
    (degraded,) = live.series(substitute(shown["Degraded ratio"]["targets"][0]["expr"]))
    assert float(degraded["value"][1]) == 1.0  # Triton is down: every answer is a fallback
    (client_errors,) = live.series(
        substitute(shown["Client error ratio (4xx)"]["targets"][0]["expr"])
    )
    assert 0 < float(client_errors["value"][1]) < 0.05  # 6 of ~300 requests


def test_every_rule_expression_is_accepted_and_evaluates(live: LivePrometheus) -> None:
    for rule in rules():
        live.query(rule["expr"])
    body = httpx.get(f"{live.url}/api/v1/rules", timeout=10).json()
    loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert len(loaded) == len(rules())
    for rule in loaded:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_alerts_match_what_a_gateway_without_triton_shows(live: LivePrometheus) -> None:
    """Each alert's condition (before its `for`) against the real gateway's metrics."""
    matching = {rule["alert"]: live.series(rule["expr"]) for rule in alerts()}
    labels = {name: [s["metric"] for s in series] for name, series in matching.items()}
    assert labels["AigwDegradedRatioHigh"] == [{"model": "customer-churn"}]
    assert len(labels["AigwGatewayNotReady"]) == 1
    assert {"target": "customer-churn/churn-gbm"} in labels["AigwBreakerOpenTooLong"]
    assert len(labels["AigwPolicyReloadRefused"]) == 1  # first refusal: a series new in 15 min
    assert len(labels["AigwAuditSpillGrowing"]) == 1  # the stream's Redis is down
    for healthy in (
        "AigwGatewayDown",
        "AigwWorkerDown",  # no worker scraped here
        "AigwAuditWriteErrors",
        "AigwAuditRefusingAnswers",
        "AigwLatencySLOFastBurn",
        "AigwLatencySLOSlowBurn",
        "AigwJobsFailed",
        "AigwStreamBacklogGrowing",
        "AigwCallbacksFailing",
    ):
        assert labels[healthy] == [], healthy
    (slo,) = live.series("aigw:request_latency_slo_errors:ratio_rate5m")
    assert slo["metric"]["model"] == "customer-churn"
    assert float(slo["value"][1]) == 0  # fallbacks answer in milliseconds


def test_a_scraped_worker_raises_none_of_the_gateways_alerts(
    redis_server: Any, tmp_path: Path
) -> None:
    """A real `aigw worker` answers real stream entries and dead-letters a bad one, scraped by
    a real Prometheus under the shipped config's worker job with the rules loaded: the stream
    series arrive under that job, its own alerts fire, and none of the gateway's does."""
    import redis

    prometheus_bin = tool("prometheus")
    metrics_port, prometheus_port = free_port(), free_port()
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/13"  # a database of its own
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}
    env.update(
        AIGW_REDIS_URL=redis_url,
        AIGW_TRITON_URL=f"127.0.0.1:{free_port()}",  # nothing listens: fallbacks answer
        AIGW_AUDIT_DIR=str(tmp_path / "worker-audit"),
        AIGW_WATCH_POLICIES="false",
    )
    (shipped,) = [
        job
        for job in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
        if any("worker" in c["names"] for c in job.get("dns_sd_configs", []))
    ]
    job = {key: value for key, value in shipped.items() if key != "dns_sd_configs"}
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULES],
        "scrape_configs": [job],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    started: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "worker.log", "wb") as log:
            command = [sys.executable, "-m", "gateway.cli", "worker"]
            started.append(
                subprocess.Popen(
                    [*command, "--metrics-port", str(metrics_port)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        with open(tmp_path / "prometheus.log", "wb") as log:
            started.append(
                subprocess.Popen(
                    [
                        prometheus_bin,
                        f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                        "--log.level=warn",
                    ],
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        live = LivePrometheus(f"http://127.0.0.1:{prometheus_port}", {})

        def worker_scraped() -> bool:
            if started[0].poll() is not None:
                log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"aigw worker exited with {started[0].returncode}:\n{log}")
            return bool(live.series(f'up{{job="{WORKER_JOB}"}} == 1'))

        _wait(worker_scraped, "the worker's first scrape", 30)
        stream = "aigw:requests:customer-churn"
        for i in range(3):
            features = {"customer_id": f"w-{i}", "tenure_months": i, "monthly_charges": 50.0}
            request = {"model_id": "customer-churn", "features": features}
            client.xadd(stream, {"request": json.dumps(request)})
        # off the contract: a dead letter at once
        client.xadd(stream, {"request": json.dumps({"model_id": "customer-churn", "features": {}})})

        def scraped_every_job() -> bool:
            (answered,) = live.series(
                f'sum(aigw_stream_jobs_total{{job="{WORKER_JOB}", outcome="answered"}})'
            )
            (dead,) = live.series(f'sum(aigw_stream_dead_letters_total{{job="{WORKER_JOB}"}})')
            assert (float(answered["value"][1]), float(dead["value"][1])) == (3, 1)
            return True

        _wait(scraped_every_job, "Prometheus to scrape the worker's jobs", 30)
        # What makes the job matters: a worker's aigw_ready is 0, always.
        (ready,) = live.series(f'aigw_ready{{job="{WORKER_JOB}"}}')
        assert float(ready["value"][1]) == 0
        matching = {rule["alert"]: live.series(rule["expr"]) for rule in alerts()}
        labels = {name: [s["metric"] for s in series] for name, series in matching.items()}
        assert [m["job"] for m in labels["AigwJobsFailed"]] == [WORKER_JOB]  # the dead letter
        for quiet in (
            "AigwGatewayDown",
            "AigwGatewayNotReady",
            "AigwWorkerDown",
            "AigwStreamBacklogGrowing",
            "AigwAuditWriteErrors",
            "AigwAuditRefusingAnswers",
            "AigwCallbacksFailing",
        ):
            assert labels[quiet] == [], quiet
    finally:
        for process in reversed(started):
            _stop(process)
        client.flushdb()
        client.close()


# --- Kubernetes --------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


def manifests() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load_yaml_all(K8S / name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "aigw")


def worker_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "aigw-worker")


def worker_metrics_address(command: list[str]) -> tuple[str, int | None]:
    """Where `aigw worker` serves /metrics, read from its command by the CLI's own parser."""
    assert command[0] == "aigw", command
    args = aigw_parser().parse_args(command[1:])
    assert command[1] == "worker" and args.handler.__name__ == "_worker", command
    return args.metrics_host, args.metrics_port


def assert_off_loopback(host: str, where: str) -> None:
    """A scrape from another pod or container reaches only a non-loopback listener."""
    assert host != "localhost", f"{where}: /metrics on loopback cannot be scraped"
    address = ipaddress.ip_address(host)
    assert not address.is_loopback, f"{where}: /metrics on {host} cannot be scraped"


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_lists_every_file() -> None:
    k = kustomization()
    listed = set(k["resources"])
    generated = {
        entry: generator["name"]
        for generator in k["configMapGenerator"]
        for entry in [*generator.get("files", []), *generator.get("envs", [])]
    }
    sources = {entry.split("=", 1)[-1] for entry in generated}
    on_disk = {p.name for p in K8S.iterdir() if p.is_file()} - {"kustomization.yaml"}
    local_sources = {s for s in sources if "/" not in s}
    assert on_disk == listed | local_sources, "every file in deploy/k8s is listed, and exists"
    for source in sources:
        assert (K8S / source).is_file(), f"{source} does not exist"
    for folder, configmap in (
        ("policies", "aigw-policies"),
        ("contracts", "aigw-contracts"),
        ("fallbacks", "aigw-fallbacks"),
    ):
        expected = {f"{p.name}=../../{folder}/{p.name}" for p in (REPO / folder).glob("*.y*ml")}
        entries = {e for e, name in generated.items() if name == configmap}
        assert entries == expected, f"{configmap} must hold every file of {folder}/"


def test_manifests_have_kinds_api_versions_and_names() -> None:
    docs = manifests()
    expected = {
        ("Namespace", "v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("PodDisruptionBudget", "policy/v1"),
        ("StatefulSet", "apps/v1"),
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
        ("PrometheusRule", "monitoring.coreos.com/v1"),
    }
    assert {(d["kind"], d["apiVersion"]) for d in docs} == expected
    for doc in docs:
        assert doc["metadata"]["name"], doc["kind"]
        assert doc["kind"] in ("Namespace",) or "spec" in doc, doc["kind"]


def test_deployment_probes_resources_and_graceful_shutdown() -> None:
    deployment = gateway_deployment(manifests())
    spec = deployment["spec"]
    assert selects(spec["selector"]["matchLabels"], pod_labels(deployment))
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["aigw", "serve"]  # one worker per pod
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8080), probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = GRACEFUL_SHUTDOWN_S  # uvicorn's timeout_graceful_shutdown (gateway/server.py)
    assert drain_s == 10
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain_s + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_deployment_volumes_and_settings_exist() -> None:
    docs = manifests()
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    generators = {g["name"] for g in kustomization()["configMapGenerator"]}
    config_maps = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    config_maps |= {e["configMapRef"]["name"] for e in container["envFrom"]}
    assert config_maps == generators
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    settings = dict(
        line.split("=", 1)
        for line in (K8S / "gateway.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for folder in ("policies", "contracts", "fallbacks"):
        assert mounts[folder] == settings[f"AIGW_{folder.upper()}_DIR"]
    assert mounts["audit"] == settings["AIGW_AUDIT_DIR"]
    assert settings["AIGW_KEYS_FILE"].startswith(mounts["keys"] + "/")
    assert settings["AIGW_HOST"] == "0.0.0.0" and settings["AIGW_PORT"] == "8080"
    # Secrets are made by the operator, never committed: the README says how.
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])}
    readme = README.read_text(encoding="utf-8")
    for secret in secrets:
        assert f"create secret generic {secret}" in readme, secret
    assert_known_settings([*settings, *(e["name"] for e in container.get("env", []))], "deploy/k8s")
    # The Redis the settings name is the one deployed.
    redis = one(docs, "Service", "aigw-redis")
    assert settings["AIGW_REDIS_URL"].startswith(f"redis://{redis['metadata']['name']}:6379")


def assert_known_settings(names: list[str], where: str) -> None:
    known = {f"AIGW_{field.upper()}" for field in Settings.model_fields} | POLICY_VARIABLES
    unknown = sorted(set(names) - known)
    assert not unknown, f"{where}: settings the gateway does not read: {unknown}"


def test_service_hpa_pdb_and_service_monitor_match_the_pods() -> None:
    docs = manifests()
    deployment = gateway_deployment(docs)
    labels = pod_labels(deployment)
    service = one(docs, "Service", "aigw")
    assert selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"  # needs the container's cpu request
    pdb = one(docs, "PodDisruptionBudget", "aigw")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")
    monitor = one(docs, "ServiceMonitor", "aigw")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The job label is the Service's name: the alert rules' up{job="aigw"}.
    assert service["metadata"]["name"] == "aigw"
    # Nothing but the gateway's pods is selected by the gateway's selectors.
    redis = one(docs, "StatefulSet", "aigw-redis")
    assert not selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert not selects(selector, pod_labels(worker_deployment(docs)))
    assert selects(
        one(docs, "Service", "aigw-redis")["spec"]["selector"],
        redis["spec"]["template"]["metadata"]["labels"],
    )


def test_every_manifest_parses_and_every_selector_finds_its_pods() -> None:
    """Each object of every resource file is named, unique, and a Service, PDB or
    ServiceMonitor selects exactly one workload (and a port that workload has)."""
    docs = manifests()
    for name in kustomization()["resources"]:
        for doc in load_yaml_all(K8S / name):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), name
            assert doc["metadata"]["name"], name
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "a kind and name twice"
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]

    def selected(selector: dict[str, str]) -> dict[str, Any]:
        (workload,) = [w for w in workloads if selects(selector, pod_labels(w))]
        return workload

    for doc in docs:
        if doc["kind"] == "Service":
            pods = selected(doc["spec"]["selector"])["spec"]["template"]["spec"]
            named = {p["name"] for c in pods["containers"] for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in named, f"{doc['metadata']['name']}: {port}"
        elif doc["kind"] == "PodDisruptionBudget":
            selected(doc["spec"]["selector"]["matchLabels"])
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        (service,) = [
            svc
            for svc in services.values()
            if selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        ]
        ports = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports, monitor["metadata"]["name"]


def test_worker_deployment_runs_aigw_worker_scraped_off_loopback() -> None:
    docs = manifests()
    worker, gateway = worker_deployment(docs), gateway_deployment(docs)
    spec = worker["spec"]
    assert selects(spec["selector"]["matchLabels"], pod_labels(worker))
    assert not selects(spec["selector"]["matchLabels"], pod_labels(gateway))
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == gateway["spec"]["template"]["spec"]["containers"][0]["image"]
    host, port = worker_metrics_address(container["command"])
    assert_off_loopback(host, "deploy/k8s/worker.yaml")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    # No /healthz in a worker: its probes can only ask its /metrics listener.
    for probe in ("startupProbe", "livenessProbe"):
        check = container[probe].get("httpGet") or container[probe]["tcpSocket"]
        assert check["port"] in ("metrics", port), probe
        assert check.get("path", "/metrics") == "/metrics", probe
    assert "readinessProbe" not in container  # no traffic through a Service
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # The jobs in flight get STOP_TIMEOUT_S to finish, then the audit log is flushed.
    assert pod["terminationGracePeriodSeconds"] >= STOP_TIMEOUT_S + 10
    # Scraped under the job the rules select: the Service's name, through a ServiceMonitor.
    service = one(docs, "Service", WORKER_JOB)
    assert selects(service["spec"]["selector"], pod_labels(worker))
    assert not selects(service["spec"]["selector"], pod_labels(gateway))
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "metrics" and service_port["port"] == port
    monitor = one(docs, "ServiceMonitor", "aigw-worker")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert not selects(
        monitor["spec"]["selector"]["matchLabels"],
        one(docs, "Service", "aigw")["metadata"]["labels"],
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # With two replicas, one down at a time in a drain; never a budget that blocks drains.
    pdb = one(docs, "PodDisruptionBudget", "aigw-worker")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(worker))
    assert spec["replicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1


def test_worker_pod_is_secured_and_configured_as_the_gateways() -> None:
    docs = manifests()
    worker = worker_deployment(docs)["spec"]["template"]["spec"]
    gateway = gateway_deployment(docs)["spec"]["template"]["spec"]
    (w,), (g,) = worker["containers"], gateway["containers"]
    assert worker["securityContext"] == gateway["securityContext"]
    assert w["securityContext"] == g["securityContext"]
    assert w["securityContext"]["readOnlyRootFilesystem"] is True
    assert worker["automountServiceAccountToken"] is False
    assert w["envFrom"] == g["envFrom"]  # the same aigw-config
    secrets = {e["name"]: e["valueFrom"] for e in g["env"] if "valueFrom" in e}
    assert {e["name"]: e["valueFrom"] for e in w["env"] if "valueFrom" in e} == secrets
    assert_known_settings([e["name"] for e in w["env"]], "deploy/k8s/worker.yaml")

    def mounted(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        return {
            m["mountPath"]: (
                m["name"],
                {k: v for k, v in volumes[m["name"]].items() if k != "name"},
            )
            for m in container["volumeMounts"]
        }

    worker_mounts, gateway_mounts = mounted(worker, w), mounted(gateway, g)
    for folder in ("/app/policies", "/app/contracts", "/app/fallbacks"):
        assert worker_mounts[folder] == gateway_mounts[folder], folder
    assert worker_mounts["/tmp"][1].get("emptyDir") is not None
    # `aigw worker` loads every file its settings name (the API keys too: a missing
    # AIGW_KEYS_FILE stops it at start), so each must be in a volume of its pod.
    settings = dict(
        line.split("=", 1)
        for line in (K8S / "gateway.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name, path in settings.items():
        if name.endswith("_FILE"):
            holders = [m for m in worker_mounts if path.startswith(m.rstrip("/") + "/")]
            assert holders, f"{name}={path}: not in a volume of the worker's pod"
            assert worker_mounts[holders[0]] == gateway_mounts[holders[0]], name


def test_worker_audits_into_a_directory_of_its_own() -> None:
    """One writer per audit directory: a worker on the gateway's log is refused at start."""
    docs = manifests()
    settings = dict(
        line.split("=", 1)
        for line in (K8S / "gateway.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    worker = worker_deployment(docs)["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    audit_dir = env.get("AIGW_AUDIT_DIR") or settings["AIGW_AUDIT_DIR"]  # env wins over envFrom
    assert audit_dir != settings["AIGW_AUDIT_DIR"], "the gateway's audit directory"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == audit_dir]
    assert not mount.get("readOnly")
    (volume,) = [v for v in worker["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume, "the audit volume must be each pod's own, never shared"


def test_kustomize_builds_offline() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: only the Python checks of deploy/k8s ran")
    refused = run(kubectl, "kustomize", str(K8S))
    assert refused.returncode != 0, "files outside deploy/k8s load without the flag?"
    assert "--load-restrictor LoadRestrictionsNone" in README.read_text(encoding="utf-8")
    built = run(kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(K8S))
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for doc in docs:
        assert doc["metadata"].get("namespace", "aigw") == "aigw"
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    referenced = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    referenced |= {e["configMapRef"]["name"] for e in pod["containers"][0]["envFrom"]}
    assert referenced == set(config_maps)  # names with their content hash, rewritten
    policies = next(cm for name, cm in config_maps.items() if name.startswith("aigw-policies-"))
    shipped = (REPO / "policies" / "customer-churn.yaml").read_text(encoding="utf-8")
    assert policies["data"]["customer-churn.yaml"] == shipped


def test_manifests_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate as validate  # a test dependency: the API schemas, offline

    for doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in the package
        validate.validate(doc, "1.30.0", strict=True)


# --- docker compose and the image -------------------------------------------------------


def test_compose_stack_services_healthchecks_and_dependencies() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"gateway", "worker", "triton", "redis", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published}"
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["triton"]["condition"] == "service_started"
    assert "prometheus" in services["grafana"]["depends_on"]
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    env = gateway["environment"]
    assert_known_settings(list(env), "deploy/compose.yaml")
    assert env["AIGW_TRITON_URL"] == "triton:8000" and env["AIGW_HOST"] == "0.0.0.0"
    assert env["AIGW_REDIS_URL"].startswith("redis://redis:6379")
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", source)
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} does not exist"
    scraped = {
        target
        for job in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
        for target in [
            *(t for c in job.get("static_configs", []) for t in c["targets"]),
            *(f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]),
        ]
    }
    assert {"gateway:8080", "triton:8002"} <= scraped
    mounts = services["grafana"]["volumes"]
    assert f"./grafana/dashboards:{DASHBOARD_PROVIDER_PATH}:ro" in mounts


def compose_volume_at(service: dict[str, Any], path: str) -> str:
    """The source of the volume a compose service mounts at `path` (or at a parent of it)."""
    mounts = [v.split(":")[:2] for v in service.get("volumes", [])]
    found = [src for src, dst in mounts if path == dst or path.startswith(dst.rstrip("/") + "/")]
    assert len(found) == 1, f"nothing (or several) mounted at {path}: {mounts}"
    return found[0]


def test_compose_runs_a_stream_worker_that_prometheus_scrapes() -> None:
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    worker, gateway = services["worker"], services["gateway"]
    assert worker["image"] == gateway["image"] and worker["build"] == gateway["build"]
    host, port = worker_metrics_address(worker["command"])
    assert_off_loopback(host, "deploy/compose.yaml")
    env = worker["environment"]
    assert_known_settings(list(env), "deploy/compose.yaml: worker")
    for shared in ("AIGW_REDIS_URL", "AIGW_TRITON_URL", "AIGW_AUDIT_STREAM_URL"):
        assert env[shared] == gateway["environment"][shared], shared
    assert env.get("AIGW_SHARE_POLICIES") == "true"  # follows changes applied on the gateway
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["env_file"] == gateway["env_file"]  # the same audit keys
    assert worker["read_only"] is True and "/tmp" in worker["tmpfs"]
    assert not worker.get("ports"), "a worker publishes nothing"
    # The image's HEALTHCHECK asks :8080/healthz, which a worker does not serve.
    assert f"127.0.0.1:{port}/metrics" in " ".join(worker["healthcheck"]["test"])
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace[1]) >= STOP_TIMEOUT_S + 10
    # Scraped by the compose Prometheus under the job the rules select.
    jobs = compose_scrape_jobs()
    assert jobs[WORKER_JOB] == {f"worker:{port}"}
    assert jobs[GATEWAY_JOB] == {"gateway:8080"}


def test_compose_worker_audits_into_a_directory_and_volume_of_its_own() -> None:
    """One writer per audit directory: a worker on the gateway's log is refused at start."""
    compose = load_yaml(DEPLOY / "compose.yaml")
    worker, gateway = compose["services"]["worker"], compose["services"]["gateway"]
    worker_dir = worker["environment"]["AIGW_AUDIT_DIR"]
    gateway_dir = gateway["environment"]["AIGW_AUDIT_DIR"]
    assert worker_dir != gateway_dir
    volume = compose_volume_at(worker, worker_dir)
    assert volume in compose["volumes"], "a named volume"
    assert volume != compose_volume_at(gateway, gateway_dir)
    # A named volume mounted where the image has no directory starts owned by root: the image
    # must make the worker's directory, owned by its user, as it does the gateway's.
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (made,) = re.findall(r"mkdir -p ([^\\\n&]+)", dockerfile)
    assert worker_dir in made.split() and gateway_dir in made.split()
    assert re.search(r"chown -R aigw:aigw /var/lib/aigw\b", dockerfile)
    assert worker_dir.startswith("/var/lib/aigw/")


def test_dockerfile_runs_aigw_serve_as_a_non_root_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    (user,) = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(r'^CMD \["aigw", "serve"\]', dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
