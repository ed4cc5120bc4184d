"""Shared fixtures: the repository's data folders, in-process gateway clients, a real Triton."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Mapping
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


CHURN_REQUEST = {
    "model_id": "customer-churn",
    "features": {"customer_id": "12345", "tenure_months": 24, "monthly_charges": 89.99},
}
