"""Load from a separate process: wrk (Debian package ``wrk``), driven by the Lua scripts in wrk/.

wrk is C with one epoll loop per thread; one thread keeps 64 connections busy at tens of
thousands of requests per second on one core, far above anything measured here, so it is
not the bottleneck (its own CPU time is measured and reported with every row).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from bench.procfs import die_with_parent

WRK_DIR = Path(__file__).resolve().parent / "wrk"
MARKER = "BENCH_JSON "


@dataclass(frozen=True)
class Load:
    """What wrk sends: a Lua script from wrk/ and its settings (passed as environment)."""

    url: str  # scheme://host:port/path
    script: str  # "static.lua" or "vary.lua"
    env: dict[str, str]


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_s: float  # user + system CPU of the wrk process
    raw: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "rps": round(self.rps, 1),
            "errors": self.errors,
            "latency_ms": self.latency_ms,
            "wrk_cpu_s": round(self.cpu_s, 3),
        }


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    return path


def wrk_version() -> str:
    try:
        out = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True, timeout=5)
    except (OSError, RuntimeError):
        return "not installed"
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


class WrkRun:
    """One wrk process; ``start()`` returns at once, ``wait()`` collects its result."""

    def __init__(self, load: Load, clients: int, duration_s: float, threads: int = 1) -> None:
        self.load = load
        self.clients = clients
        self.duration_s = duration_s
        self.threads = max(1, min(threads, clients))
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in wait()
        self._proc: subprocess.Popen[bytes] | None = None
        self._timer: threading.Timer | None = None

    def command(self) -> list[str]:
        return [
            wrk_path(),
            f"-t{self.threads}",
            f"-c{self.clients}",
            f"-d{max(1, round(self.duration_s))}s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_DIR / self.load.script),
            self.load.url,
        ]

    def start(self) -> None:
        env = {**os.environ, "BENCH_WRK_DIR": str(WRK_DIR), **self.load.env}
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
        # A wrk that does not finish on its own (it always should) is killed.
        self._timer = threading.Timer(self.duration_s + 30, self.kill)
        self._timer.daemon = True
        self._timer.start()

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)

    def wait(self) -> WrkResult:
        assert self._proc is not None
        try:
            # wait4 gives the child's own rusage: the load generator's CPU time.
            _, status, usage = os.wait4(self._proc.pid, 0)
            self._proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:  # interrupted: never leave wrk running
            self.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._proc.pid, 0)
            self._proc.returncode = -9
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
        self._out.seek(0)
        raw = self._out.read().decode(errors="replace")
        self._out.close()
        line = next((ln for ln in raw.splitlines() if ln.startswith(MARKER)), None)
        if self._proc.returncode != 0 or line is None:
            raise RuntimeError(
                f"wrk failed ({self._proc.returncode}): {' '.join(self.command())}\n{raw[-2000:]}"
            )
        data = json.loads(line[len(MARKER) :])
        lat = {k: round(v / 1000, 3) for k, v in data["latency_us"].items()}
        return WrkResult(
            requests=data["requests"],
            duration_s=data["duration_us"] / 1e6,
            errors=data["errors"],
            latency_ms=lat,
            cpu_s=usage.ru_utime + usage.ru_stime,
            raw=raw,
        )


def run_wrk(load: Load, clients: int, duration_s: float) -> WrkResult:
    """Run wrk for ``duration_s`` at ``clients`` connections and return its summary."""
    run = WrkRun(load, clients, duration_s)
    run.start()
    return run.wait()
