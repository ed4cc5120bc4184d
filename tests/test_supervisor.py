"""`aigw serve --workers N` without servers: restart pauses, shared run keys, the workers
directory, metrics combined across real worker processes (prometheus multiprocess), and the
public address's sockets (one per worker, real sockets on loopback)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import Settings
from gateway.supervisor import (
    FIRST_RESTART_PAUSE_S,
    MAX_RESTART_PAUSE_S,
    STABLE_AFTER_S,
    PublicAddress,
    bind_public_socket,
    next_restart_pause,
    prepare_workers_dir,
    run_audit_keys,
)
from gateway.telemetry import MULTIPROCESS_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("previous_s", "lived_s", "expected_s"),
    [
        (FIRST_RESTART_PAUSE_S, 0.1, FIRST_RESTART_PAUSE_S * 2),  # died at start: back off
        (4.0, 1.0, 8.0),
        (MAX_RESTART_PAUSE_S, 1.0, MAX_RESTART_PAUSE_S),  # capped
        (20.0, 25.0, MAX_RESTART_PAUSE_S),  # still under the stable age
        (MAX_RESTART_PAUSE_S, STABLE_AFTER_S, FIRST_RESTART_PAUSE_S),  # lived well: quick
        (8.0, 3600.0, FIRST_RESTART_PAUSE_S),
    ],
)
def test_restart_pause_grows_while_a_worker_keeps_dying(previous_s, lived_s, expected_s):
    """A crash loop backs off (doubling, capped); a worker that lived long restarts quickly."""
    assert next_restart_pause(previous_s, lived_s) == expected_s


def test_unset_audit_keys_are_made_once_for_every_worker():
    """Workers share one pseudonym key and one checkpoint key when operators set none."""
    keys = run_audit_keys(Settings(audit_key=None, audit_checkpoint_key=None))
    assert set(keys) == {"audit_key", "audit_checkpoint_key"}
    assert keys["audit_key"].get_secret_value() != keys["audit_checkpoint_key"].get_secret_value()
    assert len(keys["audit_key"].get_secret_value()) == 64


def test_operator_audit_keys_are_kept():
    """Keys the operator set are never replaced."""
    assert run_audit_keys(Settings(audit_key="k1", audit_checkpoint_key="k2")) == {}


def test_an_operator_metrics_dir_is_emptied_of_an_earlier_run(tmp_path):
    """Stale metric files would add an old run's counts: they are removed at start."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_123.db").write_bytes(b"old")
    (metrics / "notes.txt").write_text("kept")
    workers_dir, metrics_dir, made_here = prepare_workers_dir({MULTIPROCESS_ENV: str(metrics)})
    assert (metrics_dir, made_here) == (metrics, False)
    assert not list(metrics.glob("*.db"))
    assert (metrics / "notes.txt").exists()
    assert workers_dir.is_dir()


def test_without_an_operator_dir_a_private_one_is_made():
    """No PROMETHEUS_MULTIPROC_DIR: a new temporary directory, removed by the supervisor."""
    workers_dir, metrics_dir, made_here = prepare_workers_dir({})
    try:
        assert made_here
        assert metrics_dir.is_dir() and metrics_dir.parent == workers_dir
        assert not list(metrics_dir.iterdir())
    finally:
        import shutil

        shutil.rmtree(workers_dir)


# A worker process in miniature: SharedValues publishing what a runtime collector yields.
# prometheus-client picks its multiprocess value class at import, so this must be its own
# interpreter with PROMETHEUS_MULTIPROC_DIR set, as every real worker is.
_PUBLISHER = """
import json, os, sys
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from gateway.telemetry import SharedValues

class Collector:
    def __init__(self):
        self.families = []
    def collect(self):
        for kind, name, labels, value in self.families:
            if kind == "counter":
                yield CounterMetricFamily(name, "doc", value=value)
            else:
                family = GaugeMetricFamily(name, "doc", labels=list(labels))
                family.add_metric(list(labels.values()), value)
                yield family

collector = Collector()
shared = SharedValues(collector)
for step in json.loads(sys.argv[1]):
    collector.families = step
    shared.publish()
print(os.getpid())
"""


def publish_in_a_worker(metrics_dir: Path, *steps: list) -> int:
    """Run one short-lived worker process that publishes `steps` in turn; its pid."""
    env = {**os.environ, MULTIPROCESS_ENV: str(metrics_dir), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _PUBLISHER, json.dumps(list(steps))],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(done.stdout.strip())


def combined(metrics_dir: Path) -> dict[tuple[str, tuple], float]:
    """What any worker's /metrics reports: every process's files, combined."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_of_several_workers_add_up_and_outlive_a_worker(tmp_path):
    """Audit totals of two workers sum; a restarted worker adds to the total, never resets it."""
    written = "aigw_audit_records_written"
    publish_in_a_worker(tmp_path, [["counter", written, {}, 3]])
    publish_in_a_worker(tmp_path, [["counter", written, {}, 4]])
    # A worker's running total is published as it grows: only what changed is added.
    publish_in_a_worker(tmp_path, [["counter", written, {}, 2]], [["counter", written, {}, 5]])
    assert combined(tmp_path)[(f"{written}_total", ())] == 12


def test_readiness_is_the_least_ready_live_worker(tmp_path):
    """aigw_ready is 0 while any live worker is unready; a dead worker stops counting."""
    publish_in_a_worker(tmp_path, [["gauge", "aigw_ready", {}, 1]])
    unready = publish_in_a_worker(tmp_path, [["gauge", "aigw_ready", {}, 0]])
    assert combined(tmp_path)[("aigw_ready", ())] == 0
    mark_process_dead(unready, str(tmp_path))
    assert combined(tmp_path)[("aigw_ready", ())] == 1


def test_a_label_set_that_disappears_reads_zero(tmp_path):
    """After a policy change the old version's info series is 0, the new one's 1."""
    info = "aigw_policy_version_info"
    publish_in_a_worker(
        tmp_path,
        [["gauge", info, {"version": "old"}, 1]],
        [["gauge", info, {"version": "new"}, 1]],
    )
    values = combined(tmp_path)
    assert values[(info, (("version", "old"),))] == 0
    assert values[(info, (("version", "new"),))] == 1


def test_spill_bytes_sum_over_workers(tmp_path):
    """Each worker's unshipped audit bytes add up: the spill is the sum."""
    publish_in_a_worker(tmp_path, [["gauge", "aigw_audit_spill_bytes", {}, 100]])
    publish_in_a_worker(tmp_path, [["gauge", "aigw_audit_spill_bytes", {}, 50]])
    assert combined(tmp_path)[("aigw_audit_spill_bytes", ())] == 150


async def test_connections_on_a_workers_socket_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets whose proto says TCP: without it each small
    answer would wait out the client's delayed ACK (about 40 ms a request)."""
    import asyncio

    address = PublicAddress("127.0.0.1", 0)
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        nodelay.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connection, sock=address.socket_for(0))
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", address.port)
        assert await asyncio.wait_for(nodelay, 5) == 1
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
        address.close()


def accepted_by(listening: dict[int, socket.socket], port: int, connections: int) -> Counter:
    """Open `connections` new client connections; how many each worker's socket accepted."""
    counts: Counter = Counter()
    for sock in listening.values():
        sock.settimeout(0)
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            for index, sock in listening.items():
                with contextlib.suppress(BlockingIOError):
                    accepted, _ = sock.accept()
                    accepted.close()
                    counts[index] += 1
    return counts


@pytest.fixture
def address() -> Iterator[PublicAddress]:
    held = PublicAddress("127.0.0.1", 0)
    yield held
    held.close()


def test_each_worker_gets_its_share_of_new_connections(address: PublicAddress):
    """Two workers' sockets of one address: the kernel picks one per connection, so neither
    takes them all (a shared socket gave 62 of 64 to one worker)."""
    sockets = {index: address.socket_for(index) for index in (0, 1)}
    counts = accepted_by(sockets, address.port, 200)
    assert sum(counts.values()) == 200
    # Binomial(200, 1/2): fewer than 60 for either is about one chance in 10 million.
    assert min(counts[0], counts[1]) >= 60, counts


def test_a_released_workers_connections_go_to_its_siblings(address: PublicAddress):
    """While a dead worker is down its socket is closed: every new connection reaches the
    others, none waits in a backlog nobody accepts; its replacement gets a new socket."""
    first = address.socket_for(0)
    survivor = address.socket_for(1)
    address.release(0)
    assert first.fileno() == -1  # closed
    assert accepted_by({1: survivor}, address.port, 40) == Counter({1: 40})
    replacement = address.socket_for(0)
    assert replacement is not first
    counts = accepted_by({0: replacement, 1: survivor}, address.port, 100)
    assert sum(counts.values()) == 100 and counts[0] > 0 and counts[1] > 0


def test_an_address_in_use_is_refused_even_to_another_gateway(address: PublicAddress):
    """The group admits only sockets that ask for it, and a gateway asks only after a plain
    bind succeeded: a second gateway on the same address fails at start, as before."""
    address.socket_for(0)
    with pytest.raises(OSError) as refused:
        PublicAddress("127.0.0.1", address.port)
    assert refused.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError):
        bind_public_socket("127.0.0.1", address.port).close()


def test_the_address_stays_held_while_every_worker_is_down(address: PublicAddress):
    """With no worker socket left (all died at once), the supervisor still holds the port:
    nobody else can take it, and a client is refused rather than served by a stranger."""
    address.socket_for(0)
    address.release(0)
    with pytest.raises(OSError):
        bind_public_socket("127.0.0.1", address.port).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", address.port), timeout=5).close()


# ---- the supervisor's watch, with stand-in workers ------------------------------------------


def echo_worker(settings: Settings, env: dict[str, str], sock: socket.socket) -> None:
    """A stand-in for a gateway worker (started by the real Supervisor): it leaves a file
    named for its index and pid, and tells every connection its index."""
    Path(env["PIDS_DIR"], f"{settings.worker_index}-{os.getpid()}").touch()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = sock.accept()
        conn.sendall(f"{settings.worker_index}\n".encode())
        conn.close()


SUPERVISE = """
import sys
import gateway.supervisor as supervisor
from tests.conftest import REPO, settings_for
from tests.test_supervisor import echo_worker
supervisor.run_worker = echo_worker
supervisor.FIRST_RESTART_PAUSE_S = 1.0  # a worker dying at start is replaced 2 s later
settings = settings_for(REPO, workers=3, host="127.0.0.1", port=int(sys.argv[1]))
sys.exit(supervisor.Supervisor(settings, {"PIDS_DIR": sys.argv[2]}).run())
"""


def worker_pid(pids_dir: Path, index: int, besides: int = 0, within_s: float = 10.0) -> int:
    """The pid of worker `index` once it runs (a replacement: other than `besides`)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for started in pids_dir.glob(f"{index}-*"):
            pid = int(started.name.split("-")[1])
            if pid != besides and Path(f"/proc/{pid}").exists():
                return pid
        time.sleep(0.02)
    raise AssertionError(f"worker {index} did not start within {within_s} s")


def reaped_within(pid: int, within_s: float) -> bool:
    """The process is gone, not a zombie: its parent has waited for it."""
    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def answered_by(port: int, connections: int) -> Counter:
    """Which worker answered each new connection ("none": it waited in a dead backlog)."""
    counts: Counter = Counter()
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.settimeout(0.5)
            try:
                counts[conn.recv(16).decode().strip() or "none"] += 1
            except TimeoutError:
                counts["none"] += 1
    return counts


def test_a_worker_dying_during_a_siblings_restart_pause_is_buried_at_once(tmp_path: Path):
    """Worker 0 dies and waits 2 s for its replacement; worker 1 dies meanwhile. Worker 1's
    socket is closed and its process reaped at once, not after worker 0's pause: every new
    connection goes to worker 2 (none waits on a socket nobody accepts), and both are
    replaced when their own pauses end."""
    from gateway.demo.triton_process import free_port

    port = free_port()
    with open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISE, str(port), str(tmp_path)],
            cwd=REPO, stderr=log,
        )  # fmt: skip
    try:
        pids = [worker_pid(tmp_path, index) for index in range(3)]
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.3)  # the supervisor has buried worker 0 and scheduled its restart
        os.kill(pids[1], signal.SIGKILL)
        assert reaped_within(pids[1], 1.0)
        assert answered_by(port, 20) == Counter({"2": 20})
        assert worker_pid(tmp_path, 0, besides=pids[0]) and worker_pid(tmp_path, 1, pids[1])
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(30)
