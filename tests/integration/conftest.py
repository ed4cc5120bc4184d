"""Real servers for integration tests: Triton (PyTriton on the CPU) and gateway processes.

`triton` is one session-wide server that no test breaks. Tests that kill, freeze or make a
model misbehave use `healthy`: a second session-wide server with a control file, restored
(thawed, behaving, running) before each such test, so modules share it instead of starting
one each (about 11 s a start on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.demo.triton_process import TritonProcess, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """A real Triton serving churn_gbm and churn_logreg; shared, never broken by a test."""
    process = TritonProcess(log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    process.start()
    yield process
    process.kill()  # at the session's end nothing waits for a graceful stop (tested apart)


@pytest.fixture(scope="session")
def breakable_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """A Triton that tests may kill, freeze or make misbehave; take it through `healthy`
    (or `restored`), which undoes what an earlier test left."""
    root = tmp_path_factory.mktemp("breakable-triton")
    process = TritonProcess(
        control_file=root / "control.json",
        log_path=root / "triton.log",
        received_log=root / "received.log",
    )
    process.start()
    yield process
    process.kill()


def restored(triton: TritonProcess) -> TritonProcess:
    """`triton` running and behaving, whatever an earlier test did to it."""
    triton.thaw()
    triton.set_control("ok")
    if not triton.is_running():
        triton.restart()
    return triton


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that leave the breakable Triton dead run last: no later test then waits for its
    restart (about 10 s on 2 cores). The sort is stable: the order is otherwise unchanged."""
    items.sort(key=lambda item: item.get_closest_marker("leaves_triton_dead") is not None)


@pytest.fixture
def healthy(breakable_triton: TritonProcess) -> TritonProcess:
    """The breakable Triton, running and behaving, whatever the previous test did to it."""
    return restored(breakable_triton)


class GatewayProcess:
    """`aigw serve` in a child process, as operators run it."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port), *args],
            cwd=REPO,
            # Its own admin port too: the default (8081) may be another process's.
            env={**os.environ, "AIGW_ADMIN_PORT": str(free_port()), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_until_live(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self._proc.returncode}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("gateway did not come up")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the OOM killer or a node failure strikes."""
        self._proc.kill()
        self._proc.wait()

    def stop(self) -> int:
        if self._proc.poll() is not None:
            self._log.close()
            return self._proc.returncode
        self._proc.send_signal(signal.SIGTERM)
        try:
            code = self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._log.close()
        return code


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator:
    """Start gateway processes with given env; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str]) -> GatewayProcess:
        process = GatewayProcess(env, tmp_path / f"gateway-{len(started)}.log")
        started.append(process)
        process.wait_until_live()
        return process

    yield start
    for process in started:
        process.stop()
