"""Serve the demo churn models with PyTriton: ``python -m gateway.demo.triton_server``.

Models (version 1 each): ``churn_gbm``, ``churn_gbm_v2`` (its challenger) and
``churn_logreg``. Input ``features`` FP32 ``[-1, 2]`` (tenure_months, monthly_charges),
output ``probability`` FP32 ``[-1, 1]``; batching on with max_batch_size 64 and dynamic
batching with a 200 µs queue delay.

Every port is bound to 127.0.0.1 only. PyTriton 0.7 protects the admin APIs (model repository,
statistics, trace, logging, shared memory) with a random per-run token; health, metadata and
inference stay open, which is all the gateway needs.

Fault injection: with ``--control-file PATH`` each inference call reads that JSON file, e.g.
``{"mode": "error", "delay_ms": 0, "models": ["churn_gbm"]}`` (``models`` omitted = all).
``ok`` serves normally, ``slow`` sleeps ``delay_ms`` first, ``error`` raises so Triton returns an
error to the client (after ``delay_ms`` if given). A missing file means ``ok``; an unreadable or
half-written one keeps the last good setting.

Prints ``READY http=<port> grpc=<port>`` once serving; SIGTERM or SIGINT stop Triton cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.demo.models import (
    ChurnModels,
    ProbabilisticClassifier,
    churn_probability,
    train_churn_models,
)
from gateway.demo.triton_process import (
    LOOPBACK,
    env_with_libpython_first,
    remove_triton_model_folders,
)

if TYPE_CHECKING:
    from pytriton.triton import Triton

LOGGER = logging.getLogger("gateway.demo.triton_server")

MAX_BATCH_SIZE = 64
MAX_QUEUE_DELAY_US = 200
VALID_MODES = ("ok", "error", "slow")


class InjectedFaultError(RuntimeError):
    """Raised from an infer function when the control file says ``error``.

    A plain exception (not PyTritonUnrecoverableError) so PyTriton reports it to the client and
    keeps the model serving.
    """


@dataclass(frozen=True)
class ControlState:
    """One parsed control-file setting."""

    mode: str = "ok"
    delay_ms: int = 0
    models: frozenset[str] | None = None  # None = every model

    def applies_to(self, model_name: str) -> bool:
        """Return True if this setting targets ``model_name``."""
        return self.models is None or model_name in self.models


class ControlFile:
    """Reads the fault-injection file on every call, so tests can flip behaviour live."""

    def __init__(self, path: Path | None) -> None:
        """``path=None`` disables fault injection entirely."""
        self._path = path
        self._last_good = ControlState()

    def read(self) -> ControlState:
        """Return the current setting (cheap: one small file read)."""
        if self._path is None:
            return self._last_good
        try:
            raw = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._last_good = ControlState()  # removing the file is the way back to normal
            return self._last_good
        except OSError as exc:
            LOGGER.warning("control file %s unreadable (%s); keeping last setting", self._path, exc)
            return self._last_good
        try:
            state = self._parse(raw)
        except (ValueError, TypeError) as exc:
            # Most likely caught mid-write by a non-atomic writer; the next call will see it.
            LOGGER.warning("control file %s invalid (%s); keeping last setting", self._path, exc)
            return self._last_good
        self._last_good = state
        return state

    @staticmethod
    def _parse(raw: str) -> ControlState:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("control file must hold a JSON object")
        mode = data.get("mode", "ok")
        if mode not in VALID_MODES:
            raise ValueError(f"mode must be one of {VALID_MODES}, got {mode!r}")
        delay_ms = int(data.get("delay_ms", 0))
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        models = data.get("models")
        if models is not None:
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise TypeError("models must be a list of model names")
            models = frozenset(models)
        return ControlState(mode=mode, delay_ms=delay_ms, models=models)


def make_infer_fn(
    model_name: str,
    model: ProbabilisticClassifier,
    control: ControlFile,
    received_log: Path | None = None,
) -> Callable[..., list[dict[str, np.ndarray]]]:
    """Build the infer function PyTriton binds for one model.

    It takes the dynamic batcher's requests itself (not `@batch`) so it can see each one's
    forwarded `traceparent` header: with `received_log`, one line per request is appended,
    `<model> <traceparent or ->`, which is how tests see what Triton received.
    """

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        state = control.read()
        if state.mode != "ok" and state.applies_to(model_name):
            if state.delay_ms > 0:
                # Blocks this model's handler thread, like a genuinely slow model would: queued
                # requests wait (and get batched) behind it.
                time.sleep(state.delay_ms / 1000.0)
            if state.mode == "error":
                raise InjectedFaultError(f"injected failure for {model_name} (control file)")
        if received_log is not None:
            _record_received(received_log, model_name, requests)
        sizes = [len(request["features"]) for request in requests]
        probabilities = churn_probability(
            model, np.concatenate([request["features"] for request in requests])
        )
        answers, start = [], 0
        for size in sizes:
            answers.append({"probability": probabilities[start : start + size]})
            start += size
        return answers

    return infer


def _record_received(path: Path, model_name: str, requests: list[Any]) -> None:
    lines = "".join(
        f"{model_name} {(getattr(r, 'parameters', None) or {}).get('traceparent', '-')}\n"
        for r in requests
    )
    with path.open("a", encoding="utf-8") as log:
        log.write(lines)


def build_triton(
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    workspace: Path,
    models: ChurnModels,
    control: ControlFile,
    received_log: Path | None = None,
) -> Triton:
    """Create the (not yet started) PyTriton server with both models bound."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address=LOOPBACK,
        grpc_address=LOOPBACK,
        metrics_address=LOOPBACK,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        exit_timeout_secs=2,
        # Forward the W3C trace context to the model as a request parameter.
        http_header_forward_pattern="traceparent",
        allow_gpu_metrics=False,  # CPU-only demo; avoids NVML probing noise
        # Readiness must mean "all models loaded", which is what the launcher polls for.
        strict_readiness=True,
    )
    triton = Triton(config=config, workspace=workspace)
    model_config = ModelConfig(
        batching=True,
        max_batch_size=MAX_BATCH_SIZE,
        batcher=DynamicBatcher(max_queue_delay_microseconds=MAX_QUEUE_DELAY_US),
    )
    # PyTriton binds one version per model name, so the challenger version has its own name.
    served = (
        ("churn_gbm", models.gbm),
        ("churn_gbm_v2", models.gbm_v2),
        ("churn_logreg", models.logreg),
    )
    for name, model in served:
        triton.bind(
            model_name=name,
            model_version=1,
            infer_func=make_infer_fn(name, model, control, received_log),
            inputs=[Tensor(name="features", dtype=np.float32, shape=(2,))],
            outputs=[Tensor(name="probability", dtype=np.float32, shape=(1,))],
            config=model_config,
        )
    return triton


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.triton_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--control-file", type=Path, default=None)
    parser.add_argument(
        "--received-log", type=Path, default=None,
        help="append `<model> <traceparent>` per request received (for tests)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="existing directory for PyTriton's workspace (default: a fresh temp dir)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="shut down if the launching process dies (used by TritonProcess)",
    )
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


class _StartupInterruptedError(BaseException):
    """Unwinds ``Triton.run()`` when a stop is needed before serving starts.

    PyTriton holds an internal lock while it waits (up to 120 s) for tritonserver to become
    ready, and its own exit callback needs that lock, so a tritonserver that dies during
    startup, or a SIGTERM then, would otherwise leave the process stuck. A BaseException so
    PyTriton's ``except Exception`` blocks do not swallow it (like KeyboardInterrupt).
    """


def _busy_ports(ports: Sequence[int]) -> list[int]:
    """Return the ports that cannot be bound on 127.0.0.1 right now."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Same option Triton's listeners use, so TIME_WAIT leftovers do not count as busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                busy.append(port)
    return busy


def _watch_startup(triton: Triton, serving: threading.Event, failed: threading.Event) -> None:
    """Until serving, SIGTERM ourselves if tritonserver dies (so ``run()`` unwinds at once).

    Uses PyTriton 0.7's private ``_triton_server`` handle; if that changes, this watchdog does
    nothing and a dead tritonserver is only noticed after PyTriton's 120 s startup timeout.
    """
    seen_alive = False
    while not serving.wait(0.2):
        server = getattr(triton, "_triton_server", None)
        try:
            alive = server is not None and bool(server.is_alive())
        except Exception:  # private API drift: give up watching, never crash the server
            return
        if alive:
            seen_alive = True
        elif seen_alive:
            LOGGER.error("tritonserver exited during startup; see its log above")
            failed.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Train, serve until SIGTERM/SIGINT (or parent death), stop Triton; return exit code."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    busy = _busy_ports([args.http_port, args.grpc_port, args.metrics_port])
    if busy:
        # Fail fast: tritonserver would exit on its own, but PyTriton only notices much later.
        LOGGER.error("port(s) %s on %s already in use", busy, LOOPBACK)
        return 3
    # Only the Python-backend stub (a grandchild) needs this; tritonserver copies os.environ.
    os.environ.update(env_with_libpython_first(os.environ))

    stop_requested = threading.Event()
    serving = threading.Event()  # set once READY is printed (or shutdown has begun)
    startup_failed = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        LOGGER.info("received %s, shutting down", signal.Signals(signum).name)
        stop_requested.set()
        if not serving.is_set():
            serving.set()  # raise at most once
            raise _StartupInterruptedError
        # While serving only set a flag: the main loop does the slow, lock-taking shutdown.

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    parent_pid = os.getppid()

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="triton-demo-")) if own_workdir else args.workdir
    workspace = workdir / "pytriton"  # PyTriton insists on creating this directory itself
    triton = None
    exit_code = 0
    try:
        t0 = time.perf_counter()
        models = train_churn_models(seed=args.seed)
        LOGGER.info("trained churn models in %.2fs", time.perf_counter() - t0)
        control = ControlFile(args.control_file)
        triton = build_triton(
            args.http_port, args.grpc_port, args.metrics_port, workspace, models, control,
            args.received_log,
        )  # fmt: skip
        threading.Thread(
            target=_watch_startup,
            args=(triton, serving, startup_failed),
            name="startup-watch",
            daemon=True,
        ).start()
        triton.run()  # starts tritonserver and loads both models, one after the other
        serving.set()
        if stop_requested.is_set():  # the signal landed just after run() returned
            return exit_code
        print(f"READY http={args.http_port} grpc={args.grpc_port}", flush=True)
        while not stop_requested.wait(0.25):
            if not triton.is_alive():
                LOGGER.error("tritonserver or a model proxy died; exiting")
                exit_code = 1
                break
            if args.exit_with_parent and os.getppid() != parent_pid:
                LOGGER.warning("launcher (pid %d) is gone; exiting", parent_pid)
                own_workdir = True  # nobody else is left to remove it
                break
    except _StartupInterruptedError:
        exit_code = 1 if startup_failed.is_set() else 0
        LOGGER.warning("startup interrupted")
    finally:
        serving.set()  # from here on a signal only sets the flag
        if triton is not None:
            # Stops tritonserver (SIGINT + wait) and removes PyTriton's workspace.
            with contextlib.suppress(Exception):
                triton.stop()
        # tritonserver is gone now, so its leftovers can go too.
        remove_triton_model_folders(workspace)
        shutil.rmtree(workspace if not own_workdir else workdir, ignore_errors=True)
        LOGGER.info("demo Triton stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
