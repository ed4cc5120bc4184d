"""`aigw serve --workers 2` in front of a real Triton: one port, two worker processes.

Metrics are the totals of every worker whichever answers the scrape (prometheus-client
multiprocess mode), new connections are spread over the workers, each worker keeps its own
audit chain, a worker killed with SIGKILL is
replaced without losing its counts, an apply through the admin API reaches both, and
feedback reaches the decision it judges whichever worker answered it, and every worker
reports the experiment statistics and model health of all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit import find_record, log_directories, segment_files
from gateway.auth import add_key
from gateway.cli import main
from gateway.demo.triton_process import TritonProcess, free_port
from gateway.policy_store import read_bundle
from tests.conftest import REPO
from tests.integration.conftest import GatewayProcess, restored

pytestmark = pytest.mark.triton


def churn(customer: str) -> dict:
    features = {"customer_id": customer, "tenure_months": 12, "monthly_charges": 42.5}
    return {"model_id": "customer-churn", "features": features}


class Workers:
    def __init__(self, process: GatewayProcess, admin_url: str, audit_dir: Path) -> None:
        self.process, self.admin_url, self.audit_dir = process, admin_url, audit_dir

    def predict(self, customer: str) -> httpx.Response:
        # A new connection each time, so the kernel may hand it to either worker.
        return httpx.post(f"{self.process.base_url}/v1/predictions", json=churn(customer))

    def predict_many(self, prefix: str, count: int) -> list[httpx.Response]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(self.predict, (f"{prefix}-{i}" for i in range(count))))

    def scrape(self) -> dict[str, float]:
        """Sum of each metric's samples (over labels), as one scrape reports them."""
        text = httpx.get(f"{self.process.base_url}/metrics").text
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def admin_is_up(self) -> bool:
        """Worker 0 serves the admin API: up once the worker in its place has started."""
        try:
            return httpx.get(f"{self.admin_url}/admin/policies").status_code == 200
        except httpx.HTTPError:
            return False

    def worker_pids(self) -> set[int]:
        """The supervisor's worker children (not multiprocessing's resource tracker)."""
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and b"spawn_main" in cmdline:
                pids.add(int(stat.parent.name))
        return pids


def wait_for(condition, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def workers(
    breakable_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    triton = restored(breakable_triton)  # slowed down by one test, to see jobs pending
    root = tmp_path_factory.mktemp("workers")
    admin_port = free_port()
    env = {
        "AIGW_TRITON_URL": triton.http_url,
        "AIGW_AUDIT_DIR": str(root / "audit"),
        "AIGW_ADMIN_PORT": str(admin_port),
        "AIGW_WATCH_POLICIES": "false",
    }
    process = GatewayProcess(env, root / "gateway.log", args=("--workers", "2"))
    process.wait_until_live(timeout=60)
    gateway = Workers(process, f"http://127.0.0.1:{admin_port}", root / "audit")
    assert wait_for(lambda: len(gateway.worker_pids()) == 2)
    yield gateway
    process.stop()


def test_every_scrape_reports_the_answers_of_both_workers(workers: Workers):
    """Whichever worker answers /metrics, it counts every answer and every audit record."""
    before = workers.scrape().get("aigw_requests_total", 0.0)
    answers = workers.predict_many("scrape", 80)
    assert [a.status_code for a in answers] == [200] * 80
    expected = before + 80
    scrapes = [workers.scrape() for _ in range(10)]
    assert [s["aigw_requests_total"] for s in scrapes] == [expected] * 10
    # Scrape-time totals are copied into the shared files every second by each worker.
    assert wait_for(lambda: workers.scrape()["aigw_audit_records_written_total"] >= expected)
    assert workers.scrape()["aigw_audit_records_written_total"] == expected


def test_each_worker_keeps_its_own_verified_audit_chain(workers: Workers, capsys):
    """Records land in worker-0/ and worker-1/, both chains verify, any record is found."""
    answers = workers.predict_many("audit", 40)
    directories = log_directories(workers.audit_dir)
    assert [d.name for d in directories] == ["worker-0", "worker-1"]
    assert all(segment_files(d) for d in directories)
    assert main(["audit", "verify", str(workers.audit_dir)]) == 0
    out = capsys.readouterr().out
    assert "worker-0:" in out and "worker-1:" in out
    ids = [a.json()["prediction_id"] for a in answers]
    found = [find_record(workers.audit_dir, i) for i in ids]
    assert all(r is not None and r["prediction_id"] == i for r, i in zip(found, ids, strict=True))


def test_a_burst_of_new_connections_is_spread_over_both_workers(workers: Workers):
    """64 connections opened at once, then one request on each: each worker accepts on its
    own socket of the address and the kernel picks one per connection, so both answer a fair
    share. On one shared socket the first worker awake accepted most of such a burst."""
    url = httpx.URL(workers.process.base_url)
    clients = [socket.create_connection((url.host, url.port), timeout=10) for _ in range(64)]
    try:
        ids = [prediction_id_over(client, f"burst-{n}") for n, client in enumerate(clients)]
    finally:
        for client in clients:
            client.close()
    answered = {
        directory.name: sum(find_record(directory, i) is not None for i in ids)
        for directory in log_directories(workers.audit_dir)
    }
    assert sum(answered.values()) == 64
    # Binomial(64, 1/2): fewer than 12 for either worker is about one chance in 3 million.
    assert min(answered.values()) >= 12, answered


def prediction_id_over(client: socket.socket, customer: str) -> str:
    """One prediction on an open connection (HTTP/1.1 by hand); its prediction_id."""
    body = json.dumps(churn(customer)).encode()
    head = b"POST /v1/predictions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json"
    client.sendall(b"%s\r\nContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
    answer = b""
    while not answer.endswith(b"}"):  # the envelope is one JSON object, the body's last byte
        chunk = client.recv(65536)
        assert chunk, f"the connection closed after {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return json.loads(answer.partition(b"\r\n\r\n")[2])["prediction_id"]


def test_a_killed_worker_is_replaced_and_its_counts_are_kept(workers: Workers):
    """SIGKILL of one worker: a new one takes its place, and no counted answer is lost."""
    workers.predict_many("before-kill", 20)
    counted = wait_for(lambda: workers.scrape()["aigw_requests_total"])
    victim = min(workers.worker_pids())  # the first started: worker 0, the admin API's
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: len(workers.worker_pids() - {victim}) == 2, timeout_s=30)
    assert replaced, "the killed worker was not replaced"
    assert wait_for(workers.admin_is_up, timeout_s=30), "worker 0 (the admin API) is not back"
    answers = workers.predict_many("after-kill", 20)
    assert [a.status_code for a in answers] == [200] * 20
    assert workers.scrape()["aigw_requests_total"] == counted + 20


def test_an_apply_through_the_admin_api_reaches_every_worker(workers: Workers):
    """Worker 0 serves the admin API; within two seconds every worker runs the new version."""
    bundle = read_bundle(REPO / "policies", REPO / "fallbacks").to_dict()
    text = bundle["policies"]["customer-churn.yaml"]
    bundle["policies"]["customer-churn.yaml"] = text.replace("weight: 90", "weight: 0")
    applied = httpx.post(
        f"{workers.admin_url}/admin/policies", json={"author": "ops", "bundle": bundle}
    )
    assert applied.status_code == 200, applied.text
    version = str(applied.json()["version"])

    def every_connection_runs_it() -> bool:
        checks = [
            httpx.get(f"{workers.process.base_url}/readyz").json()["checks"] for _ in range(20)
        ]
        return all(c.get("policy_version") == version for c in checks)

    assert wait_for(every_connection_runs_it, timeout_s=2.0)
    arms = {a.json()["arm"] for a in workers.predict_many("applied", 20)}
    assert arms == {"challenger"}


def test_an_asynchronous_job_is_never_unknown_to_a_sibling_worker(
    workers: Workers, breakable_triton: TritonProcess
):
    """Polled on any worker, a job is pending or answered, never 404, and ends answered."""
    base = workers.process.base_url
    breakable_triton.set_control("slow", delay_ms=250)  # jobs stay pending a while

    def submit_and_poll(customer: str) -> tuple[int, int]:
        accepted = httpx.post(f"{base}/v1/predictions:async", json=churn(customer))
        first = httpx.get(base + accepted.json()["status_url"])  # a new connection
        final = wait_for(
            lambda: httpx.get(base + accepted.json()["status_url"]).status_code == 200, 10
        )
        return first.status_code, 200 if final else 0

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(submit_and_poll, (f"async-{i}" for i in range(40))))
    finally:
        breakable_triton.set_control("ok")
    assert {first for first, _ in results} <= {200, 202}
    assert 202 in {first for first, _ in results}  # some were seen pending
    assert [final for _, final in results] == [200] * 40


def test_feedback_is_recorded_whichever_worker_answered(workers: Workers):
    """Forty answers from both workers, then feedback on each over a new connection: every
    one is recorded, though about half reach the worker that did not answer it (its ledger
    does not hold the decision; the audit trail of the machine's workers does)."""
    ids = [a.json()["prediction_id"] for a in workers.predict_many("feedback", 40)]
    answered = [
        sum(find_record(directory, i) is not None for i in ids)
        for directory in log_directories(workers.audit_dir)
    ]
    assert sum(answered) == 40 and min(answered) > 0, answered  # both workers answered some

    def judge(prediction_id: str) -> int:
        outcome = {"prediction_id": prediction_id, "outcome": "stay"}
        return httpx.post(f"{workers.process.base_url}/v1/feedback", json=outcome).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(judge, ids)) == [202] * 40


def test_one_outcome_per_prediction_whichever_workers_take_it(workers: Workers):
    """The same outcome sent ten times at once over new connections (a caller retrying): it
    reaches both workers, yet exactly one is recorded and the others are 409."""
    [answer] = workers.predict_many("retried-feedback", 1)
    outcome = {"prediction_id": answer.json()["prediction_id"], "outcome": "churn"}

    def send(_: int) -> int:
        return httpx.post(f"{workers.process.base_url}/v1/feedback", json=outcome).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = sorted(pool.map(send, range(10)))
    assert statuses == [202] + [409] * 9


def test_every_worker_reports_the_experiment_and_health_of_all(workers: Workers):
    """`GET /v1/experiments` and `GET /v1/models/.../health` on any worker count the answers
    of both (within about a second): the reports agree, and forty new answers add forty,
    whichever worker gave them; so do the drift gauges any worker's /metrics exports."""
    base = workers.process.base_url

    def reported() -> set[tuple[int, int]]:  # ten of each report, each over a new connection
        counts = set()
        for _ in range(10):
            arms = httpx.get(f"{base}/v1/experiments/customer-churn").json()["arms"]
            health = httpx.get(f"{base}/v1/models/customer-churn/health").json()
            drift = sum(
                stream["drift"]["sample_size"]
                for arms_of_version in health["versions"].values()
                for stream in arms_of_version.values()
                if stream["drift"] is not None
            )
            counts.add((sum(arm.get("requests", 0) for arm in arms.values()), drift))
        return counts

    agreed = wait_for(lambda: len(reported()) == 1 and reported())
    assert agreed, reported()
    [(requests, drift)] = agreed
    answers = workers.predict_many("experiment", 40)
    assert [a.status_code for a in answers] == [200] * 40
    after = {(requests + 40, drift + 40)}
    assert wait_for(lambda: reported() == after), (requests, drift, reported())
    # The drift gauges too: every worker exports the windows of all, the highest is kept.
    scraped = wait_for(lambda: workers.scrape().get("aigw_model_drift_sample_size") == drift + 40)
    assert scraped, (drift + 40, workers.scrape().get("aigw_model_drift_sample_size"))


def test_sigterm_stops_every_worker_and_the_supervisor(workers: Workers):
    """A clean stop: the supervisor exits 0 and leaves no worker behind."""
    pids = workers.worker_pids()
    assert len(pids) == 2
    assert workers.process.stop() == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_tenants_rate_limit_holds_across_workers(tmp_path: Path):
    """Two workers, one bucket: a burst of 12 lets 12 requests through in all, not 24."""
    keys = tmp_path / "keys.yaml"
    add_key(keys, "warm", ["predict"], key="warm_rate_key_0123456789")
    add_key(keys, "acme", ["predict"], key="acme_rate_key_0123456789")
    document = yaml.safe_load(keys.read_text())
    document["tenants"]["acme"] = {"rate_per_s": 0.01, "burst": 12}
    keys.write_text(yaml.safe_dump(document))
    env = {
        "AIGW_TRITON_URL": f"127.0.0.1:{free_port()}",  # nothing listens: the rules answer
        "AIGW_KEYS_FILE": str(keys),
        "AIGW_AUDIT_DIR": str(tmp_path / "audit"),
        "AIGW_WATCH_POLICIES": "false",
    }
    process = GatewayProcess(env, tmp_path / "gateway.log", args=("--workers", "2"))

    def predict_as(tenant: str, count: int) -> list[int]:
        headers = {"Authorization": f"Bearer {tenant}_rate_key_0123456789"}

        def predict(i: int) -> int:  # a new connection each time: either worker may take it
            url = f"{process.base_url}/v1/predictions"
            return httpx.post(url, json=churn(f"{tenant}-{i}"), headers=headers).status_code

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(predict, range(count)))

    def both_workers_answer() -> bool:
        predict_as("warm", 16)
        answers = [predictions_in(d, "warm") for d in log_directories(tmp_path / "audit")]
        return len(answers) == 2 and all(answers)

    try:
        process.wait_until_live(timeout=60)
        # Both workers serving first (a worker still starting takes no connection), so the
        # limited requests below are spread over both.
        assert wait_for(both_workers_answer, 30), "one worker never took a connection"
        statuses = predict_as("acme", 60)
    finally:
        process.stop()
    assert sorted(statuses) == [200] * 12 + [429] * 48
    answered = [predictions_in(d, "acme") for d in log_directories(tmp_path / "audit")]
    assert sum(answered) == 12


def test_a_breaker_opened_by_one_worker_is_open_in_the_other(tmp_path: Path):
    """No Redis: worker A finds Triton dead and opens its breaker; requests that then land
    on worker B are answered `breaker_open` at once, not after B's own five failures."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    churn_policy = policies / "customer-churn.yaml"
    text = churn_policy.read_text()
    assert "reset_timeout_s: 1.0" in text and "max_reset_timeout_s: 4.0" in text
    assert "weight: 10" in text
    # Open for a minute, not a second: no probe may go out while the test looks. One arm:
    # the challenger's model has a breaker of its own, which the trip below does not open.
    text = text.replace("max_reset_timeout_s: 4.0", "max_reset_timeout_s: 60.0")
    text = text.replace("weight: 10", "weight: 0").replace("weight: 90", "weight: 100")
    churn_policy.write_text(text.replace("reset_timeout_s: 1.0", "reset_timeout_s: 60.0"))
    env = {
        "AIGW_POLICIES_DIR": str(policies),
        "AIGW_TRITON_URL": f"127.0.0.1:{free_port()}",  # nothing listens: calls fail at once
        "AIGW_AUDIT_DIR": str(tmp_path / "audit"),
        "AIGW_WATCH_POLICIES": "false",
    }
    process = GatewayProcess(env, tmp_path / "gateway.log", args=("--workers", "2"))
    try:
        process.wait_until_live(timeout=60)
        url = f"{process.base_url}/v1/predictions"
        with httpx.Client() as one_connection:  # one keep-alive connection: one worker
            reasons = [
                one_connection.post(url, json=churn(f"trip-{i}")).json()["fallback_reason"]
                for i in range(8)
            ]
        assert reasons[-1] == "breaker_open", reasons
        time.sleep(0.5)  # two polls of the breakers' directory
        with ThreadPoolExecutor(4) as pool:  # new connections: the kernel spreads them
            answers = list(pool.map(lambda i: httpx.post(url, json=churn(f"after-{i}")), range(30)))
        bodies = [answer.json() for answer in answers]
        directories = log_directories(tmp_path / "audit")

        def answered_by() -> list[int]:
            """How many of the 30 each worker's audit log holds."""
            ids = [body["prediction_id"] for body in bodies]
            return [sum(find_record(d, i) is not None for i in ids) for d in directories]

        by_worker = wait_for(lambda: sum(answered_by()) == 30 and answered_by())
    finally:
        process.stop()
    assert by_worker and len(by_worker) == 2 and min(by_worker) > 0, by_worker
    assert [body["fallback_reason"] for body in bodies] == ["breaker_open"] * 30


def predictions_in(directory: Path, tenant: str) -> int:
    """Prediction records of `tenant` in one worker's audit log."""
    marks = (b'"type":"prediction"', f'"tenant":"{tenant}"'.encode())
    return sum(
        all(mark in line for mark in marks)
        for _, segment in segment_files(directory)
        for line in segment.read_bytes().splitlines()
    )
