"""Several worker processes behind one public address: `aigw serve --workers N`.

The supervisor checks every file, takes the public address and starts N workers (fresh
interpreters, `spawn`), each accepting on a listening socket of its own; the sockets form one
`SO_REUSEPORT` group, so the kernel spreads new connections evenly over the workers (by a
hash of the client's address and port). Each worker has its own event loop, runtime and
audit directory (`AIGW_AUDIT_DIR/worker-N`: a log has one writer); worker 0 also serves the
admin API, and its applies reach the others through the shared workers directory. Metrics use
prometheus-client's multiprocess mode in that directory, so any worker's /metrics reports
the totals of all.

A worker that dies is started again in its place, with a growing pause if it keeps dying;
its live gauges are dropped, its counters kept. Its socket is closed at once, so that new
connections go to its siblings while it is down (connections the kernel had queued for it
and it never accepted are reset, unless `net.ipv4.tcp_migrate_req` hands them over), and its
replacement gets a new socket in the group. SIGTERM or SIGINT stops every worker
gracefully (each drains its requests and flushes its audit log), then the supervisor.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead
from pydantic import SecretStr

from gateway.problems import FaultsError
from gateway.runtime import baselines_of, load_configuration
from gateway.server import GRACEFUL_SHUTDOWN_S, run_worker
from gateway.settings import Settings
from gateway.telemetry import MULTIPROCESS_ENV

log = logging.getLogger("gateway.supervisor")

FIRST_RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
STABLE_AFTER_S = 30.0  # a worker that lived this long is healthy: its next restart is quick


WATCH_TICK_S = 0.5  # the longest the watch waits: how soon a stop signal is noticed


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    started_at: float
    pause_s: float = FIRST_RESTART_PAUSE_S
    restart_at: float | None = None  # once it is dead and buried: when its replacement is due


def next_restart_pause(previous_s: float, lived_s: float) -> float:
    """How long to wait before starting a dead worker again: quick after a long life,
    doubling (capped) while it keeps dying at start, so a crash loop does not spin."""
    if lived_s >= STABLE_AFTER_S:
        return FIRST_RESTART_PAUSE_S
    return min(MAX_RESTART_PAUSE_S, previous_s * 2)


def run_audit_keys(settings: Settings) -> dict[str, SecretStr]:
    """Audit keys left unset are made once for the whole run, not once per worker: every
    worker then gives a customer the same pseudonym, and checkpoints verify with one key."""
    keys = {}
    for name in ("audit_key", "audit_checkpoint_key"):
        value = getattr(settings, name)
        if not (value and value.get_secret_value()):
            keys[name] = SecretStr(secrets.token_hex(32))
    return keys


def bind_public_socket(
    host: str, port: int, *, reuse_address: bool = True, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound to the address. `reuse_port` joins (or starts) the address's
    `SO_REUSEPORT` group, which only sockets of this user that ask for it can join;
    `reuse_address` lets it bind beside connections left in TIME_WAIT, and beside sockets that
    are bound but not listening, which is why the address holder goes without it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every small answer waits out the client's delayed ACK (about 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class PublicAddress:
    """The public address, held for the whole run, and one listening socket per worker.

    One socket shared by every worker let whichever worker woke first accept a whole burst
    of new connections: 62 of a load generator's 64 went to one of two workers, which then
    served them alone on one core. Sockets of one `SO_REUSEPORT` group are chosen by the
    kernel per connection, by a hash of its addresses, so each worker gets its share.

    The address is first bound without `SO_REUSEPORT`, so that an address in use by anyone,
    another gateway included, is refused as before; then a bound socket that never listens
    holds it while workers come and go."""

    def __init__(self, host: str, port: int) -> None:
        bind_public_socket(host, port).close()  # OSError (address in use) before anything
        self._holder = bind_public_socket(host, port, reuse_address=False, reuse_port=True)
        self.host = host
        self.port = self._holder.getsockname()[1]  # the port the kernel chose for port 0
        self._listening: dict[int, socket.socket] = {}

    def socket_for(self, index: int) -> socket.socket:
        """The listening socket of worker `index`, made when it has none."""
        sock = self._listening.get(index)
        if sock is None:
            sock = bind_public_socket(self.host, self.port, reuse_port=True)
            sock.listen(2048)
            sock.set_inheritable(True)
            self._listening[index] = sock
        return sock

    def release(self, index: int) -> None:
        """Close a dead worker's socket: the kernel stops choosing it for new connections."""
        sock = self._listening.pop(index, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for index in list(self._listening):
            self.release(index)
        self._holder.close()


def prepare_workers_dir(env: Mapping[str, str]) -> tuple[Path, Path, bool]:
    """(workers dir, metrics dir, made here): the operator's `PROMETHEUS_MULTIPROC_DIR`
    emptied of an earlier run's files (they would add old counts), else a new temp dir."""
    given = env.get(MULTIPROCESS_ENV)
    if given:
        metrics = Path(given)
        metrics.mkdir(parents=True, exist_ok=True)
        for stale in metrics.glob("*.db"):
            stale.unlink()
        shared = metrics / "shared"
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir()
        return shared, metrics, False
    root = Path(tempfile.mkdtemp(prefix="aigw-workers-"))
    (root / "metrics").mkdir()
    return root, root / "metrics", True


class Supervisor:
    """Starts, watches and stops the worker processes of one gateway."""

    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self.settings = settings
        self.env = dict(env)
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._run_keys = run_audit_keys(settings)

    def run(self) -> int:
        """Serve until a signal; 1 when the files are invalid or the address is taken."""
        try:
            load_configuration(self.settings, self.env)
            baselines_of(self.settings)
        except FaultsError as error:
            for fault in error.faults:
                print(fault, file=sys.stderr)
            return 1
        try:
            address = PublicAddress(self.settings.host, self.settings.port)
        except OSError as error:
            print(f"{self.settings.host}:{self.settings.port}: {error.strerror}", file=sys.stderr)
            return 1
        workers_dir, metrics_dir, made_here = prepare_workers_dir(os.environ)
        # Children read it when they import prometheus_client: set before any is started.
        os.environ[MULTIPROCESS_ENV] = str(metrics_dir)
        self.env[MULTIPROCESS_ENV] = str(metrics_dir)
        previous_handlers = self._catch_stop_signals()
        try:
            for index in range(self.settings.workers):
                self._start(index, workers_dir, address)
            log.warning(
                "workers started",
                extra={"workers": self.settings.workers, "port": self.settings.port},
            )
            self._watch(workers_dir, address)
        finally:
            self._stop_all()
            address.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if made_here:
                shutil.rmtree(workers_dir, ignore_errors=True)
        return 0

    def _catch_stop_signals(self) -> dict[int, object]:
        def stop(signum: int, frame: object) -> None:
            self._stopping = True

        return {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def _start(self, index: int, workers_dir: Path, address: PublicAddress) -> None:
        settings = self.settings.model_copy(
            update={"worker_index": index, "workers_dir": workers_dir, **self._run_keys}
        )
        process = self._context.Process(
            target=run_worker,
            args=(settings, self.env, address.socket_for(index)),
            name=f"aigw-worker-{index}",
        )
        process.start()
        previous = self._workers.get(index)
        pause = previous.pause_s if previous else FIRST_RESTART_PAUSE_S
        self._workers[index] = _Worker(index, process, time.monotonic(), pause)

    def _watch(self, workers_dir: Path, address: PublicAddress) -> None:
        """Bury every worker that died as soon as it dies, and start replacements when due.

        Restarts are scheduled, never waited for here: while one crash-looping worker's
        pause runs (up to 30 s), a sibling that dies must lose its socket and be reaped at
        once, or the kernel keeps handing its socket new connections that nobody accepts."""
        while not self._stopping:
            wait(self._live_sentinels(), timeout=self._wait_s(time.monotonic()))
            for worker in self._newly_dead():
                self._bury(worker, address)
            now = time.monotonic()
            for worker in self._due_restarts(now):
                if self._stopping:
                    return
                self._start(worker.index, workers_dir, address)

    def _live_sentinels(self) -> list[int]:
        return [w.process.sentinel for w in self._workers.values() if w.restart_at is None]

    def _wait_s(self, now: float) -> float:
        """Until the next replacement is due, at most a tick (a stop must be noticed)."""
        due = [w.restart_at for w in self._workers.values() if w.restart_at is not None]
        return max(0.0, min([WATCH_TICK_S, *(at - now for at in due)]))

    def _newly_dead(self) -> list[_Worker]:
        return [
            w for w in self._workers.values()
            if w.restart_at is None and not w.process.is_alive()  # is_alive() reaps it
        ]  # fmt: skip

    def _due_restarts(self, now: float) -> list[_Worker]:
        return [
            w for w in self._workers.values() if w.restart_at is not None and w.restart_at <= now
        ]

    def _bury(self, worker: _Worker, address: PublicAddress) -> None:
        """A dead worker's socket and gauges go at once; its replacement is due after a pause."""
        address.release(worker.index)
        pid, code = worker.process.pid, worker.process.exitcode
        mark_process_dead(pid, str(os.environ[MULTIPROCESS_ENV]))
        now = time.monotonic()
        worker.pause_s = next_restart_pause(worker.pause_s, now - worker.started_at)
        worker.restart_at = now + worker.pause_s
        log.error(
            "worker died; starting another",
            extra={"worker": worker.index, "pid": pid, "exit_code": code,
                   "pause_s": worker.pause_s},
        )  # fmt: skip

    def _stop_all(self) -> None:
        """SIGTERM to each worker, time to drain, then SIGKILL for any that hangs."""
        for worker in self._workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S + 5
        for worker in self._workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker did not stop; killing it", extra={"worker": worker.index})
                worker.process.kill()
                worker.process.join(5)
