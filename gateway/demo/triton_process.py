"""Run the demo Triton server (``gateway.demo.triton_server``) as a supervised child process.

The child gets its own session, so it and everything it spawns (``tritonserver``, the Python
backend stubs, PyTriton's shared-memory manager) form one process group that can be frozen,
thawed, terminated or killed together. Tests use that to simulate slow, hung and dead backends.

Only the standard library is imported here, so a test process pays nothing for PyTriton.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Literal

import gateway

MODEL_NAMES: tuple[str, ...] = ("churn_gbm", "churn_gbm_v2", "churn_logreg")
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 15.0
SHM_DIR = Path("/dev/shm")  # POSIX shared memory on Linux
TRITON_TMP_DIR = Path("/tmp")  # hard-coded in libtritonserver, see remove_triton_model_folders

ControlMode = Literal["ok", "error", "slow"]

# Readiness probes must never go through an HTTP(S)_PROXY from the environment: an empty
# ProxyHandler disables proxies for this opener only.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def env_with_libpython_first(env: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of ``env`` whose LD_LIBRARY_PATH starts with this interpreter's LIBDIR.

    The Triton Python-backend stub is linked against ``libpython3.X.so``. With a shared-library
    build outside the system prefix (pyenv), the loader would otherwise pick the distro's
    libpython of the same soname but an older patch level, and the model fails to load with
    ``'_thread.RLock' object has no attribute '_recursion_count'``.
    """
    out = dict(env)
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return out
    current = [p for p in out.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if current[:1] != [libdir]:
        out["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *(p for p in current if p != libdir)])
    return out


def write_control_file(
    path: Path,
    mode: ControlMode = "ok",
    delay_ms: int = 0,
    models: Iterable[str] | None = None,
) -> None:
    """Atomically write the fault-injection file read by the server on every inference call.

    ``models=None`` means all models. The write goes through a temp file and ``os.replace`` so
    the server never reads a half-written file.
    """
    if mode not in ("ok", "error", "slow"):
        raise ValueError(f"unknown mode {mode!r}")
    payload: dict[str, object] = {"mode": mode, "delay_ms": int(delay_ms)}
    if models is not None:
        payload["models"] = list(models)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)


def remove_triton_model_folders(workspace: Path) -> list[Path]:
    """Delete ``/tmp/folderXXXXXX`` model copies a dead tritonserver left for ``workspace``.

    Models loaded through Triton's repository API (which PyTriton uses) are written to
    ``/tmp/folderXXXXXX``; the path is hard-coded in libtritonserver (TMPDIR is ignored) and the
    folder survives if the server exits before the unload finishes. Each config.pbtxt names the
    PyTriton workspace, which is unique per run, so only this run's folders match. Call it only
    after the server is gone.
    """
    marker = f'"{Path(workspace).resolve()}'
    removed = []
    for folder in TRITON_TMP_DIR.glob("folder??????"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            config = (folder / "config.pbtxt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if marker in config:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _read_proc_stat(pid: int) -> tuple[str, str, int] | None:
    """Return ``(comm, state, pgid)`` of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may itself contain spaces or parentheses: split on the last ')'.
    lpar, rpar = raw.find("("), raw.rfind(")")
    fields = raw[rpar + 2 :].split()
    return raw[lpar + 1 : rpar], fields[0], int(fields[2])


def process_group_members(pgid: int) -> list[tuple[int, str]]:
    """Return ``(pid, comm)`` of live (non-zombie) processes in process group ``pgid``.

    Zombies are left out: they are already dead, merely not reaped yet (PID 1 in a container
    does not always reap orphans).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _read_proc_stat(int(entry.name))
        if info is not None and info[2] == pgid and info[1] not in ("Z", "X"):
            members.append((int(entry.name), info[0]))
    return sorted(members)


def _shm_files_of(pids: Iterable[int]) -> set[Path]:
    """Return /dev/shm files mapped or held open by ``pids`` (best effort, Linux only)."""
    found: set[Path] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                idx = line.find(f"{SHM_DIR}/")
                if idx >= 0:
                    found.add(Path(line[idx:].removesuffix(" (deleted)")))
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(f"{SHM_DIR}/"):
                        found.add(Path(target.removesuffix(" (deleted)")))
    return found


class TritonProcess:
    """A demo Triton server (models ``churn_gbm`` and ``churn_logreg``) in its own process group.

    Typical use::

        with TritonProcess(control_file=tmp_path / "control.json") as triton:
            client = tritonclient.http.InferenceServerClient(triton.http_url)
            ...
    """

    _live: ClassVar[set[TritonProcess]] = set()
    _atexit_registered: ClassVar[bool] = False

    def __init__(
        self,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        control_file: Path | None = None,
        log_path: Path | None = None,
        received_log: Path | None = None,
    ) -> None:
        """Pick free loopback ports for any port left as None; nothing is started yet."""
        taken: set[int] = set()

        def _pick(port: int | None) -> int:
            # Retry so the three auto-picked ports never collide with each other.
            while port is None or port in taken:
                port = free_port()
            taken.add(port)
            return port

        self.http_port = _pick(http_port)
        self.grpc_port = _pick(grpc_port)
        self.metrics_port = _pick(metrics_port)
        self.control_file = Path(control_file) if control_file is not None else None
        # Each request the models receive appends `<model> <traceparent>` here, when set.
        self.received_log = Path(received_log) if received_log is not None else None
        # Without log_path, a temp log is made at start() and deleted by stop() (kept by kill(),
        # so a crashed run can still be inspected before restart() or stop()).
        self._log_path: Path | None = Path(log_path) if log_path is not None else None
        self._log_is_temp = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._workdir: Path | None = None
        self._frozen = False
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- addresses

    @property
    def http_url(self) -> str:
        """``127.0.0.1:<http_port>``: the form ``tritonclient.http`` expects (no scheme)."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def http_base_url(self) -> str:
        """``http://127.0.0.1:<http_port>`` for plain HTTP clients."""
        return f"http://{self.http_url}"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:<grpc_port>``: the form ``tritonclient.grpc`` expects."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics endpoint of this Triton."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """PID of the server process (also the process-group id), None if never started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File receiving the child's stdout and stderr (appended across restarts)."""
        return self._log_path

    @property
    def workdir(self) -> Path | None:
        """Per-run temp directory (PyTriton workspace inside); None when not running."""
        return self._workdir

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return self._frozen

    def is_running(self) -> bool:
        """Return True if the server process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def group_processes(self) -> list[tuple[int, str]]:
        """Return ``(pid, comm)`` of live processes in the server's process group."""
        return process_group_members(self._proc.pid) if self._proc is not None else []

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Return the end of the child's log, for error messages."""
        if self._log_path is None:
            return "<no log yet>"
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"<log unavailable: {exc}>"

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 90) -> None:
        """Spawn the server and block until Triton and both models report ready.

        Raises RuntimeError (with the log tail) if the child exits or is not ready in time; the
        process group is killed and cleaned up before raising.
        """
        with self._lock:
            if self.is_running():
                raise RuntimeError(f"Triton demo server already running (pid={self.pid})")
            self._cleanup()  # leftovers of a previous run that died on its own
            self._workdir = Path(tempfile.mkdtemp(prefix="triton-demo-"))
            if self._log_path is None:
                fd, name = tempfile.mkstemp(prefix="triton-demo-", suffix=".log")
                os.close(fd)
                self._log_path = Path(name)
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the child
            self._log_file.write(f"--- starting demo Triton at {time.ctime()} ---\n".encode())
            self._log_file.flush()
            cmd = [
                sys.executable,
                "-m",
                "gateway.demo.triton_server",
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
                "--workdir",
                str(self._workdir),
                "--exit-with-parent",
            ]
            if self.control_file is not None:
                cmd += ["--control-file", str(self.control_file)]
            if self.received_log is not None:
                cmd += ["--received-log", str(self.received_log)]
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                start_new_session=True,  # own session => own process group, pgid == pid
                close_fds=True,
            )
            self._frozen = False
            TritonProcess._register_live(self)

        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.kill()  # reap stragglers and clean temp files
                raise RuntimeError(
                    f"Triton demo server exited with code {code} before becoming ready; "
                    f"log tail ({self._log_path}):\n{self.log_tail()}"
                )
            if self._all_ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"Triton demo server not ready after {timeout:.0f}s; "
                    f"log tail ({self._log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def restart(self, timeout: float = 90) -> None:
        """Start again on the same ports (stopping first if still running)."""
        self.stop()
        self.start(timeout=timeout)

    def freeze(self) -> None:
        """SIGSTOP the tritonserver process: its ports stay open, nothing answers.

        PyTriton's own Python process (which runs the model functions) is left running:
        stopped under load, its inference handler threads do not survive a thaw and it shuts
        the server down, which is a harness artefact, not the hung backend being simulated.
        """
        with self._lock:
            if self.is_running() and not self._frozen:
                for pid, comm in self.group_processes():
                    if comm == "tritonserver":
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGSTOP)
                        _wait_until_stopped(pid)
                self._frozen = True

    def thaw(self) -> None:
        """SIGCONT the whole group after :meth:`freeze`."""
        with self._lock:
            if self._proc is not None and self._frozen:
                self._signal_group(signal.SIGCONT)
            self._frozen = False

    def kill(self) -> None:
        """SIGKILL the whole group (a crashed backend), wait for it and clean up temp files."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is not None and not self.group_processes():
                # Already dead: do not signal a pgid the kernel may since have reused.
                self._cleanup()
                return
            shm = _shm_files_of(pid for pid, _ in self.group_processes())
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
            self._wait_group_gone(5.0)
            self._frozen = False
            self._cleanup(shm)

    def stop(self) -> None:
        """SIGTERM the group, wait up to 15 s, then SIGKILL; idempotent, thaws first if frozen."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is not None and not self.group_processes():
                self._cleanup()
                self._drop_temp_log()
                return
            self.thaw()  # a stopped process would not act on SIGTERM until continued
            shm = _shm_files_of(pid for pid, _ in self.group_processes())
            deadline = time.monotonic() + STOP_GRACE_S
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if not self._wait_group_gone(max(0.0, deadline - time.monotonic())):
                self._signal_group(signal.SIGKILL)
                self._proc.wait()
                self._wait_group_gone(5.0)
            self._cleanup(shm)
            self._drop_temp_log()

    def set_control(
        self, mode: ControlMode = "ok", delay_ms: int = 0, models: Iterable[str] | None = None
    ) -> None:
        """Write this server's control file (see :func:`write_control_file`)."""
        if self.control_file is None:
            raise RuntimeError("TritonProcess was created without control_file")
        write_control_file(self.control_file, mode=mode, delay_ms=delay_ms, models=models)

    def __enter__(self) -> TritonProcess:
        """Start the server (blocking until ready)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    # ----------------------------------------------------------------- internals

    def _child_env(self) -> dict[str, str]:
        env = env_with_libpython_first(os.environ)
        # Make `-m gateway.demo.triton_server` importable whatever the caller's cwd is.
        root = str(Path(gateway.__file__).resolve().parent.parent)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([root, *paths])
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
        return env

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _wait_group_gone(self, timeout: float) -> bool:
        """Wait until no live process is left in the group; return True if it emptied."""
        deadline = time.monotonic() + timeout
        while self.group_processes():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _all_ready(self) -> bool:
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in MODEL_NAMES)]
        for path in paths:
            try:
                with _NO_PROXY_OPENER.open(self.http_base_url + path, timeout=2) as resp:
                    if resp.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    def _cleanup(self, shm_files: Iterable[Path] = ()) -> None:
        """Remove the workdir and shared-memory files a dead group may have left behind."""
        if self._proc is not None and self._proc.poll() is not None:
            # PyTriton's Python-backend regions are named after the server pid; catch those
            # even if the snapshot before signalling missed them.
            shm_files = {*shm_files, *SHM_DIR.glob(f"pytrtion{self._proc.pid}-*")}
        for path in shm_files:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._workdir is not None:
            remove_triton_model_folders(self._workdir)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        TritonProcess._live.discard(self)

    def _drop_temp_log(self) -> None:
        if self._log_is_temp and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    @classmethod
    def _register_live(cls, proc: TritonProcess) -> None:
        # A test run that forgets stop() (or crashes) must not leave tritonserver behind: the
        # group lives in its own session, so nothing else would signal it.
        cls._live.add(proc)
        if not cls._atexit_registered:
            atexit.register(cls._stop_all)
            cls._atexit_registered = True

    @classmethod
    def _stop_all(cls) -> None:
        for proc in list(cls._live):
            with contextlib.suppress(Exception):
                proc.stop()


def _wait_until_stopped(pid: int, timeout_s: float = 2.0) -> None:
    """Until the kernel reports `pid` stopped: SIGSTOP is delivered asynchronously, and a
    request sent in between could still be answered by the process about to freeze."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return  # gone: nothing left to answer
        if stat.rpartition(")")[2].split()[0] in ("T", "t"):
            return
        time.sleep(0.005)
