"""Idempotency keys: a submit retried with the same `Idempotency-Key` is one job, not two.

A caller whose `POST /v1/predictions:async` got no answer (a timeout, a lost 202, a 503 whose
outcome Redis could not tell) cannot know whether its job was queued. Retrying with the same
`Idempotency-Key` header is always safe: the first submit to claim the key queues the job,
and every later submit with that key, of the same tenant and the same request, is answered
the first one's 202 (same prediction id, `Idempotent-Replayed: true`) and queues nothing.
The same key with a different request is a 422: the caller reused a key by mistake.

Keys are scoped by tenant (two tenants' keys never meet) and stored as a digest, never as
sent. A claimed key is kept as long as the job's outcome is (`AIGW_JOBS_KEEP_S` in memory,
the result TTL with Redis). Where the claim lives is the jobs backend's business: Redis
claims it in the same script that queues the job (gateway/streams.py); the memory backend
uses `KeptClaims` in one process, or `SharedClaims` (one SQLite file) across the workers of
`aigw serve --workers N`, since a retry may reach any of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway.expiring_map import ExpiringMap
from gateway.problems import FieldError, Problem
from gateway.sqlite_wal import enable_write_ahead_log

log = logging.getLogger("gateway.jobs")

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
_KEY_RULE = f"1 to {MAX_KEY_CHARS} printable ASCII characters (a UUID is a good key)"


@dataclass(frozen=True)
class IdempotencyKey:
    """One caller's key, as stored: `scope` names it (tenant and key, digested) and
    `fingerprint` names the request it was first used for."""

    scope: str
    fingerprint: str


@dataclass(frozen=True)
class Claim:
    """Who holds a key: the prediction id of the job it was first used for, and that
    request's fingerprint."""

    prediction_id: str
    fingerprint: str

    def to_text(self) -> str:
        return f"{self.prediction_id} {self.fingerprint}"

    @classmethod
    def from_text(cls, text: str) -> Claim:
        prediction_id, _, fingerprint = text.partition(" ")
        return cls(prediction_id, fingerprint)


class IdempotencyKeyReused(Exception):
    """The key was first used for another request: nothing was queued."""


@dataclass(frozen=True)
class Submitted:
    """What a submit did: queued `prediction_id`, or (`replayed`) found the key already
    claimed by the job `prediction_id` and queued nothing."""

    prediction_id: str
    replayed: bool = False
    entry_id: str | None = None  # the Redis stream entry of a job queued there


def key_from_header(raw: str | None) -> str | None:
    """The caller's `Idempotency-Key`, None without the header, or 400 naming the header
    when it is not a usable key."""
    if raw is None:
        return None
    key = _unquoted(raw.strip())
    if not (1 <= len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable()):
        raise Problem(
            400, "invalid-header", "Invalid header",
            f"{KEY_HEADER} must be {_KEY_RULE}",
            errors=[FieldError("", _KEY_RULE, header=KEY_HEADER)],
        )  # fmt: skip
    return key


def idempotency_key(key: str, *, tenant: str, request: Mapping[str, Any]) -> IdempotencyKey:
    """A tenant's `key`, used for `request` (what the caller asked for, as plain data)."""
    return IdempotencyKey(scope=key_scope(tenant, key), fingerprint=request_fingerprint(request))


def _unquoted(key: str) -> str:
    # The header is a Structured Field string in the IETF draft ("…"); plain tokens, as most
    # APIs take them, are accepted too ('""' is then a two-character key, not an empty one).
    if len(key) >= 3 and key[0] == key[-1] == '"':
        return key[1:-1]
    return key


def key_scope(tenant: str, key: str) -> str:
    """The stored name of a tenant's key: a digest, so a key is never a path or Redis key
    as sent, and two tenants' equal keys are different keys."""
    return hashlib.sha256(f"{tenant}\x00{key}".encode()).hexdigest()


def request_fingerprint(request: Mapping[str, Any]) -> str:
    """A digest of what the caller asked for (model, canonical features, callback): equal for
    a retry of the same request, different when the key is reused for another one."""
    return hashlib.sha256(orjson.dumps(dict(request), option=orjson.OPT_SORT_KEYS)).hexdigest()


def resolve(key: IdempotencyKey, holder: Claim) -> Submitted:
    """A submit that found `key` claimed by `holder`: a replay of its job, or a reused key."""
    if holder.fingerprint != key.fingerprint:
        raise IdempotencyKeyReused(holder.prediction_id)
    return Submitted(holder.prediction_id, replayed=True)


def key_reused() -> Problem:
    # 422, as the IETF draft says for a key reused with a different payload: the request is
    # well formed, but contradicts what this key already stands for.
    return Problem(
        422, "idempotency-key-reused", "Idempotency key reused",
        f"this {KEY_HEADER} was used for a different request; nothing was queued: use a new key "
        "for a new request",
        errors=[FieldError("", "already used for a different request", header=KEY_HEADER)],
    )  # fmt: skip


class Claims(Protocol):
    """Where the memory backend keeps claimed keys."""

    async def holder(self, scope: str) -> Claim | None:
        """The claim on `scope`, or None when it is free."""

    async def claim(self, scope: str, claim: Claim) -> Claim:
        """Claim `scope` for `claim` unless it is held; returns the holder (`claim` if won)."""

    async def release(self, scope: str, claim: Claim) -> None:
        """Free `scope` if `claim` still holds it (a job that was not queued after all)."""


class KeptClaims:
    """Claims in this process, at most `limit` and none older than `keep_s`."""

    def __init__(self, limit: int, keep_s: float, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._entries: ExpiringMap[str, Claim] = ExpiringMap(limit, keep_s)

    def __len__(self) -> int:
        return len(self._entries)

    async def holder(self, scope: str) -> Claim | None:
        return self._entries.get(scope, self._clock())

    async def claim(self, scope: str, claim: Claim) -> Claim:
        held = await self.holder(scope)
        if held is not None:
            return held
        self._entries.put(scope, claim, self._clock())
        return claim

    async def release(self, scope: str, claim: Claim) -> None:
        if await self.holder(scope) == claim:
            self._entries.pop(scope)


TRIM_EVERY = 1_000  # claims (by this worker) between deletions of expired ones


class SharedClaims:
    """Claims shared by the workers of one gateway, in `directory/idempotency.sqlite`.

    The insert that finds the scope already there has lost: whichever worker claimed first
    holds the key. SQLite runs in a thread, never on the event loop. An error is raised to
    the caller (`sqlite3.Error`): a submit that cannot learn whether its key is free queues
    nothing and says so (503), rather than risk a second job."""

    def __init__(self, directory: Path, keep: int, keep_s: float, timeout_s: float = 2.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "idempotency.sqlite"
        self._keep = keep
        self._keep_s = keep_s
        self._timeout_s = timeout_s
        self._claimed = 0
        self._local = threading.local()

    async def holder(self, scope: str) -> Claim | None:
        return await asyncio.to_thread(self._holder, scope, time.time())

    async def claim(self, scope: str, claim: Claim) -> Claim:
        return await asyncio.to_thread(self._claim, scope, claim)

    async def release(self, scope: str, claim: Claim) -> None:
        await asyncio.to_thread(self._release, scope, claim)

    def _holder(self, scope: str, now: float) -> Claim | None:
        row = (
            self._connection()
            .execute(
                "SELECT prediction_id, fingerprint FROM claims WHERE scope = ? AND expires > ?",
                (scope, now),
            )
            .fetchone()
        )
        return None if row is None else Claim(row[0], row[1])

    def _claim(self, scope: str, claim: Claim) -> Claim:
        connection = self._connection()
        now = time.time()
        with connection:  # one transaction: an expired claim is replaced, a live one kept
            connection.execute("DELETE FROM claims WHERE scope = ? AND expires <= ?", (scope, now))
            inserted = connection.execute(
                "INSERT OR IGNORE INTO claims (scope, prediction_id, fingerprint, expires) "
                "VALUES (?, ?, ?, ?)",
                (scope, claim.prediction_id, claim.fingerprint, now + self._keep_s),
            ).rowcount
        if inserted:
            self._claimed += 1
            if self._claimed % TRIM_EVERY == 0:
                self._trim(connection, now)
            return claim
        held = self._holder(scope, now)
        return held if held is not None else self._claim(scope, claim)  # expired meanwhile

    def _trim(self, connection: sqlite3.Connection, now: float) -> None:
        with connection:
            connection.execute("DELETE FROM claims WHERE expires <= ?", (now,))
            connection.execute(
                "DELETE FROM claims WHERE rowid <= (SELECT max(rowid) FROM claims) - ?",
                (self._keep,),
            )

    def _release(self, scope: str, claim: Claim) -> None:
        with self._connection() as connection:
            connection.execute(
                "DELETE FROM claims WHERE scope = ? AND prediction_id = ?",
                (scope, claim.prediction_id),
            )

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self._timeout_s)
            enable_write_ahead_log(connection, self._timeout_s)
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS claims (scope TEXT PRIMARY KEY, "
                "prediction_id TEXT NOT NULL, fingerprint TEXT NOT NULL, expires REAL NOT NULL)"
            )
            self._local.connection = connection
        return connection
