"""Serving the apps with uvicorn: the public API and, on its own address, the admin API.

One process (`aigw serve`) or one worker of several (`aigw serve --workers N`, which hands
each worker its own listening socket of the public address) runs the same way: both listeners in
one event loop, the public app's lifespan building the runtime they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from gateway.garbage import settle_startup_heap
from gateway.logs import configure_logging
from gateway.problems import FaultsError
from gateway.settings import Settings

GRACEFUL_SHUTDOWN_S = 10
T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run `main` to completion on the loop the settings name.

    `aigw serve` runs its own loop (both listeners share it), so uvicorn's `loop=` option
    never applies: the choice is made here, for every process the gateway starts.
    """
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, or None for asyncio's default."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


class _PublicServer(uvicorn.Server):
    """The public listener; once the app is started, what start-up built leaves the cyclic
    collector's sight (garbage.py: full collections otherwise walk it every second or two)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            settle_startup_heap()


class _AdminServer(uvicorn.Server):
    """The admin listener; the public server owns signal handling and stops it."""

    def capture_signals(self):  # type: ignore[no-untyped-def]
        return contextlib.nullcontext()


async def serve_apps(
    app: FastAPI,
    admin_app: FastAPI | None,
    settings: Settings,
    public_socket: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; `public_socket`, when given, is already listening (a
    worker's own socket of the public address, from the supervisor)."""
    public = _PublicServer(server_config(app, settings.host, settings.port))
    if admin_app is None:
        await public.serve(sockets=[public_socket] if public_socket else None)
        return
    admin = _AdminServer(server_config(admin_app, settings.admin_host, settings.admin_port))
    admin.config.lifespan = "off"  # the public app's lifespan builds the shared runtime
    admin_task = asyncio.create_task(admin.serve())
    try:
        await public.serve(sockets=[public_socket] if public_socket else None)
    finally:
        admin.should_exit = True
        await admin_task


def server_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",  # the loop is run_event_loop's (uvicorn's choice applies only to .run())
        http="httptools",
        # The gateway never reads the client's address (limits and audit go by tenant and key),
        # so uvicorn's X-Forwarded-* rewriting would be one more layer on every request.
        proxy_headers=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )


def run_worker(settings: Settings, env: Mapping[str, str], public_socket: socket.socket) -> None:
    """One worker process of `aigw serve --workers N` (the supervisor's spawn target).

    The supervisor checked every file before starting workers; a file broken since then
    fails this worker's start with its faults, and the supervisor keeps the others running.
    """
    from gateway.app import create_admin_app, create_app

    configure_logging(settings.log_level)
    try:
        app = create_app(settings, env)
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        raise SystemExit(1) from None
    # One admin API per gateway: worker 0 serves it; its applies reach the siblings
    # through the workers' shared directory (policy_sync.PolicyFileSync).
    admin_app = create_admin_app(app) if settings.worker_index == 0 else None
    run_event_loop(serve_apps(app, admin_app, settings, public_socket), settings)
