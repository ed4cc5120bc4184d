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
"""

from __future__ import annotations

import contextlib
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
from gateway.server import GRACEFUL_SHUTDOWN_S
from gateway.settings import Settings

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
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The job label is the Service's name: the alert rules' up{job="aigw"}.
    assert service["metadata"]["name"] == "aigw"
    # Nothing but the gateway's pods is selected by the gateway's selectors.
    redis = one(docs, "StatefulSet", "aigw-redis")
    assert not selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert selects(
        one(docs, "Service", "aigw-redis")["spec"]["selector"],
        redis["spec"]["template"]["metadata"]["labels"],
    )


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
    assert {"gateway", "triton", "redis", "prometheus", "grafana"} <= set(services)
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


def test_dockerfile_runs_aigw_serve_as_a_non_root_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    (user,) = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(r'^CMD \["aigw", "serve"\]', dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
