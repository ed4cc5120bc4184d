"""An answer's audit record, wherever it was written: this machine's trail, else the stream.

`GET /v1/predictions/{id}` and its explanation read the record of an answer. Each replica
writes a trail of its own; with the audit stream, the record of another replica's answer is
read from the stream, through the decision its forwarder kept (shared_decisions.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.audit import find_record
from gateway.problems import Problem
from gateway.runtime import Runtime
from gateway.shared_decisions import SharedDecisionsUnavailable


async def answer_record(runtime: Runtime, prediction_id: str) -> dict[str, Any] | None:
    """The audit record of `prediction_id`, or None when no trail holds it.

    The local trail is read off the event loop (it may scan files); the stream is asked only
    when the local trail does not hold the record. 503 while the stream cannot be asked: the
    record may well exist, so "unknown" would be false."""
    record = await asyncio.to_thread(find_record, runtime.settings.audit_dir, prediction_id)
    if record is not None or runtime.shared_decisions is None:
        return record
    try:
        return await runtime.shared_decisions.record(prediction_id)
    except SharedDecisionsUnavailable:
        raise Problem(
            503, "audit-stream-unavailable", "Audit stream unavailable",
            "the record may be another replica's, in a stream that cannot be reached now; "
            "retry later",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
