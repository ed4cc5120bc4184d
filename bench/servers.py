"""The servers under test, each in its own process group on 127.0.0.1, always stopped again.

Triton is the demo's (``gateway.demo.triton_process.TritonProcess``); nginx and the gateway are
started here. Every child also gets ``PR_SET_PDEATHSIG`` so that a benchmark killed with
SIGKILL does not leave them behind (Triton's own ``--exit-with-parent`` does the same).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.procfs import die_with_parent
from gateway.demo.triton_process import (
    LOOPBACK,
    TritonProcess,
    free_port,
    port_is_open,
    process_group_members,
)

REPO = Path(__file__).resolve().parent.parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment; ``(0, b"")`` when nothing answers."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def http_post(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """POST a JSON body without any proxy from the environment."""
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class _Group:
    """A child started in its own session; stopping signals the whole process group."""

    name = "process"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def pids(self) -> list[int]:
        """Live processes of the group (the server and the workers it forked)."""
        return [pid for pid, _ in process_group_members(self.pid)] if self.proc else []

    def _spawn(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,  # servers start before any thread
            )

    def _check_alive(self, log: Path) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left; idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None or process_group_members(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while process_group_members(pgid) and time.monotonic() < deadline:
                self.proc.poll()
                time.sleep(0.05)
            if process_group_members(pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class Nginx(_Group):
    """nginx as a plain reverse proxy to Triton: one worker, upstream keep-alive, no logs."""

    name = "nginx"

    def __init__(self, upstream_port: int, workers: int = 1) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.workers = workers
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aigw-bench-nginx-"))
        self.log = self.dir / "error.log"

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config(self) -> str:
        d = self.dir
        return f"""
worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream triton {{
        server {LOOPBACK}:{self.upstream_port};
        keepalive 128;
    }}
    server {{
        listen {LOOPBACK}:{self.port};
        location / {{
            proxy_pass http://triton;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise RuntimeError("nginx not found: apt-get install -y nginx-light")
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        cmd = [
            nginx,
            "-p",
            str(self.dir),
            "-c",
            str(conf),
            "-e",
            str(self.log),
            "-g",
            "daemon off;",
        ]
        self._spawn(cmd, self.dir / "stdout.log")
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            self._check_alive(self.log)
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not listening after {timeout:.0f}s")
            time.sleep(0.05)

    def stop(self, grace_s: float = 10.0) -> None:
        super().stop(grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def version() -> str:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        try:
            out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=5)
        except OSError:
            return "not installed"
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


class Gateway(_Group):
    """``python -m gateway.cli serve`` in front of a Triton, auth off, audit to a temp dir."""

    name = "gateway"

    def __init__(
        self,
        triton_url: str,
        event_loop: str = "uvloop",
        heap_census: bool = False,
        workers: int = 1,
        policies: Path | None = None,
        repo: Path = REPO,
    ) -> None:
        super().__init__()
        self.repo = repo  # another checkout's gateway code: a code what-if (one_client.py)
        self.policies = policies or REPO / "policies"  # another directory: a policy what-if
        self.triton_url = triton_url
        self.workers = workers  # `aigw serve --workers N`: CPU and RSS count the whole group
        self.event_loop = event_loop  # AIGW_EVENT_LOOP: asyncio is the what-if
        self.heap_census_enabled = heap_census
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aigw-bench-gateway-"))
        self.log = self.dir / "gateway.log"

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        # No AIGW_* from the caller's shell (a keys file, Redis...): the same gateway every run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}
        paths = [str(self.repo), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env.update(
            PYTHONPATH=os.pathsep.join(paths),
            AIGW_TRITON_URL=self.triton_url,
            AIGW_ADMIN_PORT=str(self.admin_port),
            AIGW_AUDIT_DIR=str(self.dir / "audit"),
            AIGW_WATCH_POLICIES="false",
            AIGW_CONTRACTS_DIR=str(REPO / "contracts"),
            AIGW_POLICIES_DIR=str(self.policies),
            AIGW_FALLBACKS_DIR=str(REPO / "fallbacks"),
            AIGW_LOG_LEVEL="warning",
            AIGW_EVENT_LOOP=self.event_loop,
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        if self.heap_census_enabled:
            launcher = [str(Path(__file__).resolve().parent / "launch_gateway.py")]
            launcher += ["--heap-census", str(self.heap_file)]
        else:
            launcher = ["-m", "gateway.cli"]
        cmd = [sys.executable, *launcher, "serve", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers)] if self.workers > 1 else []
        self._spawn(cmd, self.log, env=self.env(), cwd=self.repo)
        deadline = time.monotonic() + timeout
        while http_get(self.base_url + "/readyz", timeout=1)[0] != 200:
            self._check_alive(self.log)
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready after {timeout:.0f}s; log: {self.log}")
            time.sleep(0.1)

    @property
    def heap_file(self) -> Path:
        return self.dir / "heap-census.json"

    def heap_census(self, timeout: float = 20.0) -> dict[str, object] | None:
        """Ask the gateway (SIGUSR1) for its object counts; None if it was not started for it."""
        if not self.heap_census_enabled or self.proc is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            self.heap_file.unlink()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return json.loads(self.heap_file.read_text())
            time.sleep(0.05)
        return None

    def metrics(self) -> str:
        status, body = http_get(self.base_url + "/metrics", timeout=5)
        return body.decode() if status == 200 else ""

    def stop(self, grace_s: float = 12.0) -> None:
        super().stop(grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)


class Triton:
    """The demo Triton (three churn models) with a control file for fault injection."""

    name = "triton"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aigw-bench-triton-"))
        self.process = TritonProcess(control_file=self.dir / "control.json")

    @property
    def http_url(self) -> str:
        return self.process.http_url

    @property
    def base_url(self) -> str:
        return self.process.http_base_url

    @property
    def http_port(self) -> int:
        return self.process.http_port

    def pids(self) -> list[int]:
        return [pid for pid, _ in self.process.group_processes()]

    def start(self) -> None:
        self.process.start()

    def set_control(self, mode: str, models: list[str] | None = None) -> None:
        self.process.set_control(mode, models=models)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
