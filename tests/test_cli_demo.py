"""`aigw demo`, run as a user runs it: a real Triton, the gateway, the README's curl, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.demo.triton_process import free_port, port_is_open, process_group_members

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[1]
README_REQUEST = {
    "model_id": "customer-churn",
    "features": {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99},
}


def wait_for_ready(base_url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "aigw demo exited early"
        try:
            if httpx.get(base_url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail("aigw demo did not become ready")


def answer_later(base_url: str, auth: dict[str, str]) -> dict:
    """Submit the README's request asynchronously and poll its status URL until answered."""
    accepted = httpx.post(
        base_url + "/v1/predictions:async", json=README_REQUEST, headers=auth, timeout=5
    )
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        polled = httpx.get(base_url + accepted.json()["status_url"], headers=auth, timeout=5)
        if polled.status_code == 200:
            return polled.json()
        assert polled.status_code == 202, polled.text
        time.sleep(0.1)
    pytest.fail("the asynchronous prediction was never answered")


class Demo:
    """`aigw demo` in its own session, as a user starts it; `interrupt()` is their Ctrl-C."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.triton_port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "demo.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in interrupt()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo", "--port", str(self.port),
             "--triton-http-port", str(self.triton_port)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            # Its own admin port too: the default (8081) may be another process's.
            env={**os.environ, "AIGW_ADMIN_PORT": str(free_port()), **(env or {})},
        )  # fmt: skip
        self.exit_code: int | None = None

    def __enter__(self) -> Demo:
        wait_for_ready(self.base_url, self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.process.send_signal(signal.SIGINT)
                self.exit_code = self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self._log.close()

    @property
    def output(self) -> str:
        return self.log_path.read_text()


def test_demo_answers_the_readme_call_and_stops_cleanly_on_ctrl_c(tmp_path: Path):
    """`aigw demo` serves the README's request from the primary and Ctrl-C stops all of it."""
    auth = {"Authorization": "Bearer demo-key"}
    with Demo(tmp_path) as demo:
        answers = [
            httpx.post(
                demo.base_url + "/v1/predictions", json=README_REQUEST, headers=auth, timeout=5
            )
            for _ in range(3)
        ]
        anonymous = httpx.post(demo.base_url + "/v1/predictions", json=README_REQUEST, timeout=5)
        later = answer_later(demo.base_url, auth)
    output = demo.output

    first = answers[0].json()
    assert answers[0].status_code == 200, output[-2000:]
    assert first["served_by"] == "churn-gbm"
    assert first["degraded"] is False
    assert set(first) >= {
        "prediction", "probability", "model_version", "latency_ms",
        "prediction_id", "served_by", "degraded", "arm",
    }  # fmt: skip
    assert len({(a.json()["prediction"], a.json()["probability"]) for a in answers}) == 1
    assert "curl -s localhost:" in output and "Bearer demo-key" in output
    assert anonymous.status_code == 401  # the demo runs with authentication on
    assert later["served_by"] == "churn-gbm"  # asynchronous jobs, answered in process
    assert demo.exit_code == 0
    assert not port_is_open(demo.port) and not port_is_open(demo.triton_port)
    assert not process_group_members(demo.process.pid), "Triton outlived the demo"


def test_demo_with_redis_starts_a_stream_worker_that_answers_jobs(tmp_path: Path, redis_server):
    """With AIGW_REDIS_URL the demo's jobs go through Redis streams to its own `aigw worker`,
    which audits into its own chain; Ctrl-C stops the worker too."""
    audit_dir = tmp_path / "audit"
    env = {"AIGW_REDIS_URL": redis_server.url, "AIGW_AUDIT_DIR": str(audit_dir)}
    with Demo(tmp_path, env) as demo:
        later = answer_later(demo.base_url, {"Authorization": "Bearer demo-key"})
    assert later["served_by"] == "churn-gbm", demo.output[-2000:]
    assert "stream worker on" in demo.output
    written_by_worker = (audit_dir / "worker-streams").glob("audit-*.jsonl")
    assert any(later["prediction_id"] in f.read_text() for f in written_by_worker)
    assert demo.exit_code == 0
    assert not process_group_members(demo.process.pid), (
        "the stream worker or Triton outlived the demo"
    )
