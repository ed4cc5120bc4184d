"""A real HTTP receiver of callbacks on 127.0.0.1, for tests: answers a script of statuses."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """`async with Receiver([503, 503]) as receiver:` answers 503 twice, then 200 ever after."""

    def __init__(
        self,
        statuses: Sequence[int] = (),
        retry_after: str | None = None,
        tls: ssl.SSLContext | None = None,
        port: int = 0,
        gate: asyncio.Event | None = None,
    ) -> None:
        self._tls = tls  # serve https with this context
        self._port = port  # 0: any free port
        self._gate = gate  # when given, no request is answered before it is set (slow receiver)
        self._statuses = list(statuses)
        self._retry_after = retry_after
        self.received: list[Received] = []
        self.accepted = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read()))
        if self._gate is not None:
            await self._gate.wait()
        status = self._statuses.pop(0) if self._statuses else 200
        headers = {"Retry-After": self._retry_after} if self._retry_after and status >= 400 else {}
        if 200 <= status < 300:
            self.accepted.set()
        return web.Response(status=status, headers=headers)

    async def wait_accepted(self, timeout_s: float = 10) -> None:
        await asyncio.wait_for(self.accepted.wait(), timeout_s)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, ssl_context=self._tls)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self._tls else 'http'}://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
