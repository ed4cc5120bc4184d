"""`aigw worker`'s own parts that need no stream: its metrics listener."""

from __future__ import annotations

import httpx
import pytest

from gateway.demo.triton_process import free_port
from gateway.runtime import start_runtime
from gateway.telemetry import Metrics
from gateway.worker import serve_metrics
from tests.conftest import settings_for
from tests.test_runtime import configuration


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
async def test_the_worker_serves_its_metrics_on_the_address_it_is_given(data_dirs, host):
    """Loopback by default; another address (0.0.0.0 in a pod Prometheus scrapes) when
    given. Here 127.0.0.2: listening there, and not on 127.0.0.1, shows the address is used."""
    runtime = start_runtime(settings_for(data_dirs), configuration(data_dirs), Metrics())
    port = free_port()
    server, _ = serve_metrics(runtime, port, host)
    try:
        text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
        if host != "127.0.0.1":
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
        await runtime.close()
    assert "aigw_policy_version_info" in text
