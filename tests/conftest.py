"""Shared fixtures: the repository's data folders, in-process gateway clients, a real Triton."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.app import create_app
from gateway.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dirs(tmp_path: Path) -> Path:
    """A private copy of contracts/, policies/ and fallbacks/ that a test may edit."""
    for name in ("contracts", "policies", "fallbacks"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def settings_for(root: Path, **overrides: object) -> Settings:
    """Settings on `root`'s data folders, auditing into a fresh temporary directory."""
    overrides.setdefault("audit_dir", Path(tempfile.mkdtemp(prefix="aigw-audit-")))
    overrides.setdefault("baselines_dir", REPO / "baselines")
    return Settings(
        contracts_dir=root / "contracts",
        policies_dir=root / "policies",
        fallbacks_dir=root / "fallbacks",
        **overrides,
    )


GatewayClient = Callable[..., "asynccontextmanager[httpx.AsyncClient]"]


@pytest.fixture
def gateway_client() -> GatewayClient:
    """Open an in-process gateway (lifespan run) and an httpx client on it.

    `async with gateway_client(env={"AIGW_TRITON_URL": ...}) as client:`; with no
    Triton URL the policy's default address answers nothing, so only fallbacks serve.
    """

    @asynccontextmanager
    async def open_client(
        env: Mapping[str, str] | None = None, root: Path = REPO, **settings: object
    ) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings_for(root, **settings), env=dict(env or {}))
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield client

    return open_client


# CEL conditions that compile and hold on the sample input at load, and raise on a request
# with tenure_months 2 (or any tenure past the list's end): routes and rules must not hold.
CONDITIONS_RAISING_AT_RUN_TIME = [
    pytest.param("1 / (features.tenure_months - 2) > 0", id="division-by-zero"),
    pytest.param("[1, 2][features.tenure_months] == 1", id="index-out-of-range"),
    pytest.param("features.tenure_months * 9223372036854775807 > 0", id="overflow"),
]

CHURN_REQUEST = {
    "model_id": "customer-churn",
    "features": {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99},
}


class RedisServer:
    """A private `redis-server` on a free loopback port, persisting nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def subscribers(self, channel: str) -> int:
        """How many connections are subscribed to `channel` (PUBSUB NUMSUB)."""
        import redis

        with redis.Redis.from_url(self.url) as client:
            [(_, count)] = client.pubsub_numsub(channel)
        return int(count)

    def wait_for_subscribers(self, channel: str, count: int, within_s: float = 10.0) -> None:
        """Until `count` connections listen on `channel`: a replica that publishes before its
        peers subscribed would be heard by nobody (a fixed sleep is a guess at how long)."""
        deadline = time.monotonic() + within_s
        while self.subscribers(channel) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} subscribers on {channel!r}")
            time.sleep(0.02)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as in a network partition."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.thaw()
            self._process.terminate()
            self._process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests use their own keys or flush."""
    from gateway.demo.triton_process import free_port

    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unreachable_redis_url() -> str:
    """A Redis URL where nothing listens."""
    from gateway.demo.triton_process import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
async def offline_runtime():
    """The repository's policies with Triton nowhere (a free port): a job that runs is
    answered by the chain's default, at once."""
    from gateway.demo.triton_process import free_port
    from gateway.runtime import audit_log, load_configuration, start_runtime

    settings = settings_for(REPO)
    env = {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}
    runtime = start_runtime(settings, load_configuration(settings, env), baselines={})
    runtime.audit = audit_log(settings)
    await runtime.audit.open()
    yield runtime
    await runtime.close()
