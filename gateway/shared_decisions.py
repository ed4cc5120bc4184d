"""Decisions of every replica, found by prediction id, so feedback may reach any replica.

Each replica's audit log is its own, and feedback (an outcome known days later) reaches
whichever replica the load balancer picks. When the audit trail is shipped to a Redis stream
(`AIGW_AUDIT_STREAM_URL`), the audit forwarder, which already reads every record to ship it,
also keeps what feedback needs of each answer, and the id of the stream entry holding its
whole record, under `aigw:decision:<prediction_id>` for `AIGW_SHARED_DECISIONS_TTL_S`, right
after shipping the records. So nothing is added to the request path, a decision is shared
within about the forwarder's poll (0.2 s) of its answer, and while Redis is away the
decisions wait on disk with their records. Memory,
measured: about 280 bytes an answer, so 170 MB for each request per second sustained over
the default 7 days.

Feedback looks a decision up here only after this process's ledger and the machine's audit
trail; a prediction is judged once across replicas by `SET NX` on `aigw:judged:<id>`. Redis
unreachable then is a 503 (retry later): neither a false "unknown prediction" nor an outcome
counted twice. `GET /v1/predictions/{id}` and its explanation read the whole record from the
stream entry the decision names (api/records.py), checking the line's own hash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.audit import carries_its_hash, parse_line
from gateway.experiments import UNRECORDED_MODEL

log = logging.getLogger("gateway.shared_decisions")

DECISION_PREFIX = "aigw:decision:"
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
JUDGED_PREFIX = "aigw:judged:"
REDIS_TIMEOUT_S = 0.5
# What feedback reads of a prediction record (api/feedback.py, `decision_in_record`), kept
# as a JSON array in this order: names would double what each answer costs in memory.
DECISION_FIELDS = (
    "arm", "model_id", "model_version", "prediction", "probability", "served_by", "tenant",
    "arm_model",
)  # fmt: skip
# Fields a record written by an earlier version may lack, and what stands in for them.
_ADDED_LATER = {"arm_model": UNRECORDED_MODEL}


class SharedDecisionsUnavailable(Exception):
    """Redis could not be asked: the caller should retry, not be told 'unknown'."""


def decision_entry(record: Mapping[str, Any]) -> tuple[str, bytes] | None:
    """(prediction id, what feedback needs of it) for a prediction record; None for others."""
    prediction_id = record.get("prediction_id")
    if record.get("type") != "prediction" or not isinstance(prediction_id, str):
        return None
    kept = {**_ADDED_LATER, **record}
    if any(name not in kept for name in DECISION_FIELDS):
        return None  # not a record this gateway writes
    return prediction_id, orjson.dumps([kept[name] for name in DECISION_FIELDS])


def with_entry(value: bytes, entry_id: str) -> bytes:
    """`value` (from `decision_entry`) naming the stream entry that holds the whole record."""
    return orjson.dumps([*orjson.loads(value), entry_id])


def decision_of(value: bytes) -> dict[str, Any] | None:
    """The prediction record's fields kept in `value`, or None when it is not one."""
    kept = _kept(value)
    if kept is None:
        return None
    return {"type": "prediction", **dict(zip(DECISION_FIELDS, kept, strict=False))}


def entry_of(value: bytes) -> str | None:
    """The id of the stream entry holding the whole record, when `value` names one."""
    kept = _kept(value)
    if kept is None or len(kept) == len(DECISION_FIELDS):
        return None
    entry = kept[-1]
    # Only a well-formed id is asked for: Redis answers anything else with an error, which
    # would read as "the stream is unreachable" (503) for what is a damaged value.
    return entry if _is_entry_id(entry) else None


def _kept(value: bytes) -> list[Any] | None:
    try:
        kept = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(kept, list) or len(kept) not in (
        len(DECISION_FIELDS),
        len(DECISION_FIELDS) + 1,
    ):
        return None
    if len(kept) == len(DECISION_FIELDS) and _is_entry_id(kept[-1]):
        # Kept by a gateway that did not keep `arm_model` yet (its fields, then the entry): an
        # arm model (`model:version`, or a step's name) never looks like an entry id.
        return [*kept[:-1], _ADDED_LATER["arm_model"], kept[-1]]
    return kept


def _is_entry_id(value: Any) -> bool:
    return isinstance(value, str) and _ENTRY_ID.fullmatch(value) is not None


class SharedDecisions:
    """Reads the decisions the audit forwarders keep, and marks judged predictions."""

    def __init__(self, redis_url: str, ttl_s: int, stream: str = "aigw:audit") -> None:
        self.ttl_s = ttl_s
        self.stream = stream
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    async def find(self, prediction_id: str) -> dict[str, Any] | None:
        """The decision kept for `prediction_id`, or None when no replica's is (or it expired)."""
        try:
            value = await self._redis.get(DECISION_PREFIX + prediction_id)
        except (RedisError, OSError, TimeoutError) as error:
            raise SharedDecisionsUnavailable(type(error).__name__) from error
        return decision_of(value) if value is not None else None

    async def record(self, prediction_id: str) -> dict[str, Any] | None:
        """The whole audit record of `prediction_id` as another replica shipped it to the
        stream (its decision names the entry), or None. A line whose hash does not match its
        content is no record: the stream's copy was altered."""
        try:
            value = await self._redis.get(DECISION_PREFIX + prediction_id)
            entry = entry_of(value) if value is not None else None
            entries = await self._redis.xrange(self.stream, entry, entry) if entry else []
        except (RedisError, OSError, TimeoutError) as error:
            raise SharedDecisionsUnavailable(type(error).__name__) from error
        for _, fields in entries:
            record = parse_line(fields.get(b"line", b""))
            if (
                record is not None
                and record.get("prediction_id") == prediction_id
                and carries_its_hash(record)
            ):
                return record
        return None

    async def first_judgement(self, prediction_id: str) -> bool:
        """True for the first outcome of `prediction_id` across replicas, False after that."""
        try:
            marked = await self._redis.set(JUDGED_PREFIX + prediction_id, 1, nx=True, ex=self.ttl_s)
        except (RedisError, OSError, TimeoutError) as error:
            raise SharedDecisionsUnavailable(type(error).__name__) from error
        return bool(marked)

    async def release(self, prediction_id: str) -> None:
        """Undo a judgement whose outcome was not counted after all (best effort: with Redis
        away the mark stays, and a retry of that outcome is 409)."""
        try:
            await self._redis.delete(JUDGED_PREFIX + prediction_id)
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("judged mark not released", extra={"error": type(error).__name__})

    async def close(self) -> None:
        await self._redis.aclose()
