"""Triton (KServe v2) backend: contract features in, a probability out.

One long-lived `KServeClient` (kserve_http.py) per target, created at start-up and closed at
shutdown, with binary tensors both ways. Each call is bounded by `asyncio.timeout` with the
request's remaining budget, and the same budget is passed to Triton as the server-side
queue timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gateway.backends import (
    BackendError,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.backends.kserve_http import NUMPY_DTYPES, KServeClient, KServeError
from gateway.batching import MicroBatcher
from gateway.policy import TritonTarget

_OVERLOAD_STATUSES = {429, 503}
_MODEL_NOT_FOUND = 404


def build_tensors(target: TritonTarget, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each input tensor as a batch of one row: features in policy order, scaled."""
    return {
        tensor.name: np.array(
            [[float(features[f.feature]) * f.scale + f.offset for f in tensor.features]],
            dtype=NUMPY_DTYPES[tensor.dtype],
        )
        for tensor in target.inputs
    }


def read_probability(output: np.ndarray | None, target: TritonTarget) -> float:
    """The positive-class probability from the output tensor, checked to be one."""
    if output is None:
        raise BackendError(f"output {target.output.name!r} missing from the answer")
    flat = np.asarray(output).reshape(-1)
    if flat.size <= target.output.index:
        raise BackendError(f"output {target.output.name!r} has no element {target.output.index}")
    value = round(float(flat[target.output.index]), 6)
    if not 0.0 <= value <= 1.0:
        raise BackendError(f"output {target.output.name!r} is not a probability")
    return value


class TritonBackend:
    """Calls one pinned model version on one Triton server."""

    def __init__(self, name: str, target: TritonTarget, gather_s: float = 0.0) -> None:
        """`gather_s` > 0 (shadow copies): with batching on, rows always gather this long
        before a call, instead of `batching.max_delay_ms` while a call is in flight; so do
        a serving target's rows when its policy sets `batching.gather_ms`."""
        self.name = name
        self.target = target
        self.gather_s = gather_s  # the caller's (runtime.py reuses guards by it)
        self._client = KServeClient(target.url, max_connections=target.max_concurrency)
        batching = target.batching
        gather = gather_s or (batching.gather_ms / 1000 if batching is not None else 0.0)
        self._batcher = (
            MicroBatcher(
                self._infer,
                batching.max_batch,
                gather or batching.max_delay_ms / 1000,
                max_in_flight=batching.max_in_flight,
                gather_first=gather > 0,
            )
            if batching is not None
            else None
        )

    def report_batches(self, observe: Callable[[str, int], None]) -> None:
        """Have every micro-batched call's row count reported as `observe(name, rows)`."""
        if self._batcher is not None:
            self._batcher.on_batch = lambda rows: observe(self.name, rows)

    async def predict(
        self,
        features: Mapping[str, Any],
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> float:
        """Probability for one input, or a BackendError subclass saying what went wrong."""
        rows = build_tensors(self.target, features)
        if self._batcher is not None:
            output = await self._batcher.submit(rows, timeout_s, headers)
        else:
            output = await self._infer(rows, timeout_s, headers)
        return read_probability(output, self.target)

    async def _infer(
        self, arrays: Mapping[str, np.ndarray], timeout_s: float, headers: Mapping[str, str] | None
    ) -> np.ndarray:
        """One Triton call for a batch of rows; the output tensor, one row per input row."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.infer(
                    self.target.model,
                    self.target.version,
                    arrays,
                    self.target.output.name,
                    timeout_us=max(1, int(timeout_s * 1_000_000)),
                    headers=headers,
                )
        except TimeoutError:
            raise BackendTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None
        except KServeError as error:
            raise _translate(error) from None
        except OSError as error:  # refused, reset, or an answer that could not be read
            raise BackendUnavailable(type(error).__name__) from None
        except ValueError as error:  # the request could not be formed: a mapping fault
            raise BackendRejected(str(error)) from None

    async def is_ready(self, timeout_s: float = 1.0) -> bool:
        """Whether Triton reports the pinned model version ready to serve."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.is_model_ready(self.target.model, self.target.version)
        except (TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        await self._client.close()


def _translate(error: KServeError) -> BackendError:
    message = f"triton {error.status}"
    if error.status in _OVERLOAD_STATUSES:
        return BackendOverloaded(message)
    if error.status == _MODEL_NOT_FOUND:
        # Triton's 404 is "unknown model" or "version is not found": the pinned model is not
        # loaded there (unloaded, or a server without it). That is the target's ill health,
        # counted against its breaker, not a malformed request to be ignored.
        return BackendError(f"{message}: the pinned model version is not loaded")
    if 400 <= error.status < 500:
        return BackendRejected(message)
    return BackendError(message)
