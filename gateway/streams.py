"""Predictions over Redis Streams: the keys, the entry format, and the atomic writes.

Business systems publish prediction requests to a stream per logical model and read the
answers from a result stream; `aigw worker` (gateway/worker.py) consumes them in a group.

Keys, per logical model `M` and prediction `P`:

    aigw:requests:M     requests (the workers' consumer group is `aigw-workers`)
    aigw:results:M      one entry per answered prediction id
    aigw:dead:M         entries that can never be answered, with the reason
    aigw:result:P       the stored outcome (JSON), kept `result_ttl_s`: what `outcome()` reads
    aigw:pending:P      a job submitted through `StreamJobs.submit` and not yet answered
    aigw:failed:P       a job dead-lettered after every attempt failed, kept `result_ttl_s`
    aigw:withdrawn:P    a submit whose reply was lost and that had not run: it never will
    aigw:idempotency:K  the claim of a tenant's idempotency key K (a digest, see
                        gateway/idempotency.py): "<prediction id> <request fingerprint>"
    aigw:callbacks      the callback outbox, one for every model (the workers' consumer group
                        is `aigw-callbacks`; gateway/callback_outbox.py sends from it)

A request entry has either a field `job` (the JSON of a `gateway.jobs.Job`, as `submit`
writes it) or a field `request` (the body of `POST /v1/predictions`, as a business system
publishes it), with optional `prediction_id` (a UUID), `tenant` and `headers` (a JSON object
of the `x-` headers route conditions read, as they would over HTTP). Without a prediction id
one is derived from the stream and the entry id, so a redelivered entry keeps its id.

Delivery is at least once; results are exactly once per prediction id. `STORE_RESULT` writes
the result record and its result-stream entry only if no result exists for the id yet, and
acknowledges the request entry in every case, in one script: a retry of an answered entry only
acknowledges it. A job with a callback URL gets its callback queued in the outbox by the same
script, only when that call stored the result: one callback per prediction id, never one
without its result, never a result whose callback a crash could lose. Dead-lettering adds to
the dead-letter stream and acknowledges in one script.

Backpressure. `SUBMIT` refuses (Backpressure) when a model's backlog, entries not yet
delivered to the group (its lag) plus entries delivered and not yet acknowledged, has reached
`stream_max_backlog`; it never trims unprocessed entries (`XADD MAXLEN` would drop them).
Acknowledged entries are trimmed by the workers (`trim_acknowledged`).

These scripts touch several keys, so they need one Redis node (not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.body import parse_json
from gateway.contracts import ContractSet
from gateway.idempotency import Claim, IdempotencyKey, Submitted, resolve
from gateway.jobs import Backpressure, Job, JobOutcome, JobRejected, job_from_request
from gateway.problems import FieldError, Problem
from gateway.routing import routing_headers
from gateway.runtime import Runtime
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.worker import OnResult, StreamWorker

log = logging.getLogger("gateway.streams")

GROUP = "aigw-workers"
CALLBACK_STREAM = "aigw:callbacks"  # the callback outbox: one stream for every model
CALLBACK_GROUP = "aigw-callbacks"
DEAD_LETTER_MAXLEN = 100_000  # approximate: dead letters are for people to read, not a queue
REDIS_TIMEOUT_S = 5.0  # longer than a blocking read (worker.BLOCK_MS)
# After a submit whose reply was lost: how long finding out whether it was accepted may take
# (the caller waits for it), and how long a submit that never ran is kept from running late.
SETTLE_TIMEOUT_S = 1.0
WITHDRAWN_TTL_S = 3600
_ID_NAMESPACE = uuid.UUID("5b0c1f4e-9a57-4c1e-8f0e-6d2b1a7c3e90")  # for derived prediction ids
_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def request_stream(model_id: str) -> str:
    return f"aigw:requests:{model_id}"


def result_stream(model_id: str) -> str:
    return f"aigw:results:{model_id}"


def dead_stream(model_id: str) -> str:
    return f"aigw:dead:{model_id}"


def result_key(prediction_id: str) -> str:
    return f"aigw:result:{prediction_id}"


def pending_key(prediction_id: str) -> str:
    return f"aigw:pending:{prediction_id}"


def failed_key(prediction_id: str) -> str:
    return f"aigw:failed:{prediction_id}"


def withdrawn_key(prediction_id: str) -> str:
    return f"aigw:withdrawn:{prediction_id}"


def idempotency_claim_key(scope: str) -> str:
    return f"aigw:idempotency:{scope}"


@dataclass(frozen=True)
class StreamConfig:
    """The stream and worker settings (see gateway/settings.py for each one's meaning)."""

    max_backlog: int = 100_000
    concurrency: int = 32
    claim_idle_ms: int = 30_000
    max_attempts: int = 5
    result_ttl_s: int = 86_400
    result_stream_maxlen: int = 1_000_000
    max_entry_bytes: int = 64 * 1024
    max_json_depth: int = 32

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamConfig:
        return cls(
            max_backlog=settings.stream_max_backlog,
            concurrency=settings.worker_concurrency,
            claim_idle_ms=settings.worker_claim_idle_ms,
            max_attempts=settings.worker_max_attempts,
            result_ttl_s=settings.result_ttl_s,
            result_stream_maxlen=settings.result_stream_maxlen,
            max_entry_bytes=settings.max_body_bytes,
            max_json_depth=settings.max_json_depth,
        )


# ---- entries: parsing, pure ----------------------------------------------------------------


def derived_prediction_id(model_id: str, entry_id: str) -> str:
    """The id of a request published without one: the same for every delivery of the entry."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{request_stream(model_id)}/{entry_id}"))


def parse_entry(
    contracts: ContractSet,
    model_id: str,
    entry_id: str,
    fields: Mapping[bytes | str, bytes | str],
    config: StreamConfig = StreamConfig(),
) -> Job:
    """The job an entry of `model_id`'s request stream asks for; JobRejected naming the field.

    Pointers name the entry's fields (`/request`, `/prediction_id`, `/tenant`, `/job`), and
    inside a JSON field the contract's pointer follows (`/request/features/tenure_months`).
    """
    text = _decoded(fields)
    if "job" in text:
        return _job_entry(contracts, model_id, text["job"], config)
    if "request" in text:
        return _request_entry(contracts, model_id, entry_id, text, config)
    raise JobRejected(
        "the entry has neither a `request` nor a `job` field",
        [FieldError("/request", "is a required field")],
    )


def _decoded(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    text = {}
    for name, value in fields.items():
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        try:
            text[key] = value.decode() if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise JobRejected(
                f"entry field `{key}` is not valid UTF-8", [FieldError(f"/{key}", "is not UTF-8")]
            ) from None
    return text


def _request_entry(
    contracts: ContractSet,
    model_id: str,
    entry_id: str,
    text: dict[str, str],
    config: StreamConfig,
) -> Job:
    body = _json_field(text, "request", config)
    given_id = text.get("prediction_id")
    prediction_id = (
        derived_prediction_id(model_id, entry_id)
        if given_id is None
        else _uuid_field(given_id, "/prediction_id")
    )
    tenant = _tenant_field(text.get("tenant", "default"), "/tenant")
    headers: dict[str, str] = {}
    if "headers" in text:  # optional: the x- headers the request would have had over HTTP
        headers = _headers_field(_json_field(text, "headers", config), "/headers")
    job = _validated(
        contracts, body, "/request", prediction_id=prediction_id, tenant=tenant, headers=headers
    )
    _check_model(job, model_id, "/request/model_id")
    return job


def _job_entry(contracts: ContractSet, model_id: str, raw: str, config: StreamConfig) -> Job:
    data = _json_field({"job": raw}, "job", config)
    if not isinstance(data, dict):
        raise JobRejected("entry field `job` is not a JSON object", [_fault("/job", "object")])
    options = {
        "prediction_id": _uuid_field(data.get("prediction_id"), "/job/prediction_id"),
        "tenant": _tenant_field(data.get("tenant", "default"), "/job/tenant"),
        "request_id": _text_option(data, "request_id", ""),
        "trace_id": _text_option(data, "trace_id", None),
        "callback_url": _text_option(data, "callback_url", None),
        "timeout_ms": _timeout(data.get("timeout_ms")),
        "headers": _headers_field(data.get("headers"), "/job/headers"),
    }
    body = {"model_id": data.get("model_id"), "features": data.get("features")}
    job = _validated(contracts, body, "/job", **options)
    _check_model(job, model_id, "/job/model_id")
    submitted_at = data.get("submitted_at")
    if isinstance(submitted_at, int | float) and not isinstance(submitted_at, bool):
        job = dataclasses.replace(job, submitted_at=float(submitted_at))
    return job


def _json_field(text: dict[str, str], name: str, config: StreamConfig) -> Any:
    raw = text[name].encode()
    if len(raw) > config.max_entry_bytes:
        detail = f"is larger than {config.max_entry_bytes} bytes"
        raise JobRejected(f"entry field `{name}` is too large", [FieldError(f"/{name}", detail)])
    try:
        return parse_json(raw, config.max_json_depth)
    except Problem as problem:
        raise JobRejected(
            f"entry field `{name}` is not valid JSON", [FieldError(f"/{name}", problem.detail)]
        ) from None


def _validated(contracts: ContractSet, body: Any, prefix: str, **options: Any) -> Job:
    try:
        return job_from_request(contracts, body, **options)
    except JobRejected as rejected:
        errors = [FieldError(prefix + e.pointer, e.detail, e.header) for e in rejected.errors]
        raise JobRejected(rejected.detail, errors) from None


def _check_model(job: Job, model_id: str, pointer: str) -> None:
    if job.model_id != model_id:
        detail = f"is {job.model_id!r}, but the entry is on the stream of {model_id!r}"
        raise JobRejected("the entry is on another model's stream", [FieldError(pointer, detail)])


def _uuid_field(value: Any, pointer: str) -> str:
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else _refuse(pointer, "a UUID")
    except ValueError:
        return _refuse(pointer, "a UUID")


def _tenant_field(value: Any, pointer: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= 64 and set(value) <= _TENANT_CHARS:
        return value
    return _refuse(pointer, "a tenant name (1 to 64 letters, digits, `.`, `_`, `:`, `-`)")


def _text_option(data: dict, name: str, default: str | None) -> str | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, str) and len(value) <= 2048:
        return value
    return _refuse(f"/job/{name}", "a string of at most 2048 characters, or null")


def _headers_field(value: Any, pointer: str) -> dict[str, str]:
    """An entry's request headers (a JSON object of strings, or absent): those routes read."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return _refuse(pointer, "an object of header names to string values")
    return routing_headers((name.lower(), text) for name, text in value.items())


def _timeout(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    return _refuse("/job/timeout_ms", "a positive integer or null")


def _refuse(pointer: str, what: str) -> Any:
    raise JobRejected("the entry is invalid", [_fault(pointer, what)])


def _fault(pointer: str, what: str) -> FieldError:
    return FieldError(pointer, f"must be {what}")


def entry_copy(fields: Mapping[bytes | str, bytes | str], max_bytes: int) -> bytes:
    """The entry's fields as JSON, for a dead letter: readable, never larger than needed."""
    copy = {}
    for name, value in fields.items():
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        raw = value if isinstance(value, bytes) else str(value).encode()
        copy[key] = raw[:max_bytes].decode("utf-8", "replace")
    return orjson.dumps(copy)


def result_record(job: Job, envelope: Mapping[str, Any], entry_id: str) -> bytes:
    """What `aigw:result:{prediction_id}` holds once the job is answered."""
    return orjson.dumps(
        {
            "prediction_id": job.prediction_id,
            "model_id": job.model_id,
            "tenant": job.tenant,
            "status": "done",
            "envelope": dict(envelope),
            "entry_id": entry_id,
            "completed_at": time.time(),
        }
    )


def outcome_from(
    prediction_id: str, stored: bytes | None, pending: bytes | None, failed: bytes | None = None
) -> JobOutcome | None:
    """The outcome `outcome()` reports from the three keys' values.

    A stored result wins over a failure: a slow worker may still answer an entry after the
    one that claimed it gave up on it."""
    if stored is not None:
        record = orjson.loads(stored)
        return JobOutcome(prediction_id, record["tenant"], "done", record["envelope"])
    if pending is not None:
        return JobOutcome(prediction_id, orjson.loads(pending)["tenant"], "pending")
    if failed is not None:
        record = orjson.loads(failed)
        return JobOutcome(prediction_id, record["tenant"], "failed", reason=record["reason"])
    return None


def failure_record(tenant: str, error: Mapping[str, Any]) -> bytes:
    """What the failed marker keeps: whose job it was, and why it failed (for operators)."""
    return orjson.dumps({"tenant": tenant, "reason": str(error.get("detail", ""))[:2000]})


def stream_id(value: bytes | str) -> tuple[int, int]:
    """`1700000000000-5` as (1700000000000, 5), so ids compare as numbers."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


# ---- the scripts: each one atomic on the Redis server ----------------------------------------

# KEYS: request stream, pending marker, withdrawn marker, [idempotency key].
# ARGV: group, bound, ttl_s, job JSON, marker JSON, [claim].
# Backlog: the group's lag plus its pending entries; without a group (no worker has started)
# every entry is backlog; when Redis cannot tell the lag, XLEN counts (workers trim acked ones).
# A submit the gateway has withdrawn (SETTLE_SUBMIT) adds nothing, however late it arrives.
# With an idempotency key: a key already claimed returns its claim, {claim}, and adds nothing
# (even at the bound: a retry of an accepted job is never refused); else the key is claimed
# in the same step as the job is queued, so a claim always names a queued job.
SUBMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return redis.error_reply('WITHDRAWN') end
if KEYS[4] then
  local held = redis.call('GET', KEYS[4])
  if held then return {held} end
end
local backlog = redis.call('XLEN', KEYS[1])
if backlog > 0 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[1] and info['lag'] then
      backlog = info['lag'] + info['pending']
    end
  end
end
if backlog >= tonumber(ARGV[2]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[3])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[3]) end
return id
"""

# KEYS: pending marker, result record, failed marker, withdrawn marker. ARGV: ttl_s.
# After a SUBMIT whose reply was lost (a timeout: it may or may not have run): 1 when the job
# was accepted (its pending marker, or already its outcome); else 0, and the submit is
# withdrawn, so that if it is still on its way it adds nothing when it lands, and "nothing was
# accepted" stays true. One script: no SUBMIT can run between the look and the withdrawal.
SETTLE_SUBMIT = """
if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) > 0 then return 1 end
redis.call('SET', KEYS[4], '1', 'EX', ARGV[1])
return 0
"""

# KEYS: result record, result stream, request stream, pending marker, [callback outbox].
# ARGV: group, entry id, record JSON, ttl_s, result stream maxlen, prediction id, tenant,
#       envelope JSON, consumer, [callback URL, model id].
# With a callback URL, the callback to send is queued in the outbox in the same step as the
# result is stored: never one without the other, and a second store of the id (which stores
# nothing) queues nothing. Returns 1 when this call stored the result, 0 when one was there.
STORE_RESULT = """
local stored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
             'prediction_id', ARGV[6], 'tenant', ARGV[7], 'status', 'done',
             'envelope', ARGV[8], 'entry_id', ARGV[2], 'consumer', ARGV[9])
  if KEYS[5] then
    redis.call('XADD', KEYS[5], '*', 'prediction_id', ARGV[6], 'url', ARGV[10],
               'body', ARGV[8], 'model_id', ARGV[11], 'tenant', ARGV[7])
  end
  stored = 1
end
redis.call('DEL', KEYS[4])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
return stored
"""

# KEYS: dead-letter stream, request stream, [pending marker, failed marker].
# ARGV: group, entry id, error JSON, entry JSON, attempts, maxlen, consumer, prediction id,
#       [failure record JSON, ttl_s].
# Only an entry still pending is dead-lettered: two workers holding one entry (a slow one and
# the one that claimed it) write one dead letter. The job's pending marker becomes a failed
# one in the same step, so a caller polling its id never finds it unknown. Returns 1 when
# this call wrote it.
DEAD_LETTER = """
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*',
           'entry_id', ARGV[2], 'error', ARGV[3], 'entry', ARGV[4], 'attempts', ARGV[5],
           'consumer', ARGV[7], 'prediction_id', ARGV[8])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[10]) end
return 1
"""

# KEYS: request stream. ARGV: group, entry id, consumer, deliveries.
# A delivery whose attempt ended in a transient failure (the audit log or Redis away) is given
# back: the delivery count then counts attempts that died or failed on the entry itself, which
# is what `max_attempts` bounds, and an outage however long never dead-letters an entry. Only
# while this consumer still holds the entry with that count (nobody claimed it since); its
# idle time is kept, so it is claimable as soon as before. Returns 1 when given back.
GIVE_BACK_DELIVERY = """
local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])[1]
if not row or row[4] ~= tonumber(ARGV[4]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2],
           'IDLE', row[3], 'RETRYCOUNT', row[4] - 1, 'JUSTID')
return 1
"""

# KEYS: request stream. ARGV: group, consumer, entry ids.
# A job still running must not look abandoned: nothing else touches its pending entry while it
# runs, so its worker calls this every third of the claim timeout for the entries it is running.
# XCLAIM with JUSTID restarts an entry's idle time and leaves its delivery count as it is (which
# counts attempts, bounded by `max_attempts`). Only entries this consumer still holds: one
# another consumer has claimed meanwhile stays theirs, one acknowledged stays settled. A worker
# that dies stops calling it, so its entries become claimable after the claim timeout.
# Returns how many entries were held.
HOLD = """
local held = 0
for i = 3, #ARGV do
  if redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held = held + 1
  end
end
return held
"""

# KEYS: request stream. ARGV: group, minimum idle ms, a consumer name to forget regardless of
# idleness ("" for none).
# Consumers are named per process (host-pid), so every restart adds one to the group. This
# deletes those that hold no pending entry: XGROUP DELCONSUMER would drop a consumer's pending
# entries, which must stay claimable, and inside the script no read can hand one an entry
# between the check and the delete. A live consumer deleted here is re-made by its next read.
# Returns the number deleted.
FORGET_CONSUMERS = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  local wanted = info['name'] == ARGV[3] or info['idle'] >= tonumber(ARGV[2])
  if wanted and info['pending'] == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


@dataclass(frozen=True)
class Delivery:
    """One request entry handed to this consumer, and how often it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


class StreamStore:
    """The Redis side of the protocol: every read and write the backend and workers make."""

    def __init__(self, redis_url: str, config: StreamConfig) -> None:
        self.config = config
        # No retries inside redis-py: a failed call fails fast and the caller decides (an entry
        # stays pending, a submit reports the error).
        self.redis = aioredis.from_url(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._submit = self.redis.register_script(SUBMIT)
        self._settle = self.redis.register_script(SETTLE_SUBMIT)
        self._store = self.redis.register_script(STORE_RESULT)
        self._dead = self.redis.register_script(DEAD_LETTER)
        self._forget = self.redis.register_script(FORGET_CONSUMERS)
        self._give_back = self.redis.register_script(GIVE_BACK_DELIVERY)
        self._hold = self.redis.register_script(HOLD)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ensure_group(self, model_id: str) -> None:
        """The consumer group from the stream's start, so entries published earlier count."""
        try:
            await self.redis.xgroup_create(request_stream(model_id), GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def submit(self, job: Job, key: IdempotencyKey | None = None) -> Submitted:
        """Publish the job, or raise Backpressure at the bound; with a `key` already claimed,
        publish nothing and replay the claim's job (IdempotencyKeyReused for another request)."""
        marker = orjson.dumps({"tenant": job.tenant, "model_id": job.model_id})
        keys = [
            request_stream(job.model_id), pending_key(job.prediction_id),
            withdrawn_key(job.prediction_id),
        ]  # fmt: skip
        args = [GROUP, self.config.max_backlog, self.config.result_ttl_s, job.to_json(), marker]
        if key is not None:
            keys.append(idempotency_claim_key(key.scope))
            args.append(Claim(job.prediction_id, key.fingerprint).to_text())
        reply = await self._submit(keys=keys, args=args)
        if reply is None:
            raise Backpressure(
                f"{job.model_id}: {self.config.max_backlog} requests are waiting; retry later"
            )
        if isinstance(reply, list):  # the key's claim: this submit added nothing
            assert key is not None
            return resolve(key, Claim.from_text(_text(reply[0])))
        return Submitted(job.prediction_id, entry_id=_text(reply))

    async def accepted_after_all(self, prediction_id: str) -> bool:
        """After a submit failed with a RedisError: True when it ran and the job is accepted;
        False when it did not, and it is withdrawn so that it never will. Raises (a RedisError,
        TimeoutError) when Redis cannot tell within SETTLE_TIMEOUT_S."""
        keys = [
            pending_key(prediction_id), result_key(prediction_id), failed_key(prediction_id),
            withdrawn_key(prediction_id),
        ]  # fmt: skip
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            return bool(await self._settle(keys=keys, args=[WITHDRAWN_TTL_S]))

    async def outcome(self, prediction_id: str) -> JobOutcome | None:
        stored, pending, failed = await self.redis.mget(
            result_key(prediction_id), pending_key(prediction_id), failed_key(prediction_id)
        )
        return outcome_from(prediction_id, stored, pending, failed)

    async def has_result(self, prediction_id: str) -> bool:
        return bool(await self.redis.exists(result_key(prediction_id)))

    async def ack(self, model_id: str, entry_id: str) -> None:
        await self.redis.xack(request_stream(model_id), GROUP, entry_id)

    async def read(
        self, model_id: str, consumer: str, count: int, block_ms: int | None
    ) -> list[Delivery]:
        """New entries for this consumer (`block_ms` None: do not wait)."""
        reply = await self.redis.xreadgroup(
            GROUP, consumer, {request_stream(model_id): ">"}, count=count, block=block_ms
        )
        return [Delivery(_text(i), f, 1) for _, entries in reply or [] for i, f in entries]

    async def claim(
        self, model_id: str, consumer: str, count: int, cursor: str
    ) -> tuple[str, list[Delivery]]:
        """Entries idle past the claim timeout, taken over, with their delivery counts."""
        return await self._claim_from(
            request_stream(model_id), GROUP, consumer, count, cursor, self.config.concurrency
        )

    async def _claim_from(
        self, stream: str, group: str, consumer: str, count: int, cursor: str, in_flight: int
    ) -> tuple[str, list[Delivery]]:
        idle_ms = self.config.claim_idle_ms
        reply = await self.redis.xautoclaim(stream, group, consumer, idle_ms, cursor, count=count)
        next_cursor, entries = _text(reply[0]), [(i, f) for i, f in reply[1] if f is not None]
        if not entries:
            return next_cursor, []
        ids = [_text(i) for i, _ in entries]
        first, last = min(ids, key=stream_id), max(ids, key=stream_id)
        # Our own in-flight entries can lie in the range too: ask for enough rows.
        rows = await self.redis.xpending_range(
            stream, group, first, last, count + in_flight, consumername=consumer
        )
        counts = {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        deliveries = [Delivery(_text(i), f, counts.get(_text(i), 2)) for i, f in entries]
        return next_cursor, deliveries

    async def store_result(
        self,
        job: Job,
        envelope: Mapping[str, Any],
        entry_id: str,
        consumer: str,
        callback_url: str | None = None,
    ) -> bool:
        """Store the answer unless one is stored for this id, and ack; True if this stored it.

        With `callback_url`, storing the answer also queues its callback in the outbox
        (`CALLBACK_STREAM`), in the same step; a store that finds an answer queues nothing."""
        keys = [
            result_key(job.prediction_id), result_stream(job.model_id),
            request_stream(job.model_id), pending_key(job.prediction_id),
        ]  # fmt: skip
        args = [
            GROUP, entry_id, result_record(job, envelope, entry_id), self.config.result_ttl_s,
            self.config.result_stream_maxlen, job.prediction_id, job.tenant,
            orjson.dumps(dict(envelope)), consumer,
        ]  # fmt: skip
        if callback_url:
            keys.append(CALLBACK_STREAM)
            args += [callback_url, job.model_id]
        return bool(await self._store(keys=keys, args=args))

    async def dead_letter(
        self,
        model_id: str,
        delivery: Delivery,
        error: Mapping[str, Any],
        consumer: str,
        job: Job | None = None,
    ) -> bool:
        """Move the entry to the dead-letter stream with its error, and ack it, at once; the
        job, when the entry parsed as one, is then reported failed for the result TTL.

        False when the entry was no longer pending (another worker had settled it)."""
        keys = [dead_stream(model_id), request_stream(model_id)]
        args = [
            GROUP, delivery.entry_id, orjson.dumps(dict(error)),
            entry_copy(delivery.fields, self.config.max_entry_bytes), delivery.deliveries,
            DEAD_LETTER_MAXLEN, consumer, job.prediction_id if job else "",
        ]  # fmt: skip
        if job is not None:
            keys += [pending_key(job.prediction_id), failed_key(job.prediction_id)]
            args += [failure_record(job.tenant, error), self.config.result_ttl_s]
        return bool(await self._dead(keys=keys, args=args))

    async def give_back_delivery(self, model_id: str, delivery: Delivery, consumer: str) -> bool:
        """Take back the count of a delivery whose attempt failed for a transient reason;
        False when another consumer has claimed the entry since (or it was settled)."""
        args = [GROUP, delivery.entry_id, consumer, delivery.deliveries]
        return bool(await self._give_back(keys=[request_stream(model_id)], args=args))

    async def hold(self, model_id: str, consumer: str, entry_ids: Sequence[str]) -> int:
        """Keep entries this consumer is still running from being claimed for another claim
        timeout, without counting a delivery; how many it still held."""
        return await self._hold_in(request_stream(model_id), GROUP, consumer, entry_ids)

    async def _hold_in(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]
    ) -> int:
        if not entry_ids:
            return 0
        return int(await self._hold(keys=[stream], args=[group, consumer, *entry_ids]))

    async def backlog(self, model_id: str) -> tuple[int, int]:
        """(lag, pending) of the workers' group: not yet delivered, delivered and unacked."""
        return await self._backlog_of(request_stream(model_id), GROUP)

    async def _backlog_of(self, stream: str, name: str) -> tuple[int, int]:
        for group in await self.redis.xinfo_groups(stream):
            if _text(group["name"]) == name:
                pending, lag = int(group["pending"]), group.get("lag")
                if lag is None:  # Redis cannot tell after some deletions: estimate
                    lag = max(0, await self.redis.xlen(stream) - pending)
                return int(lag), pending
        return await self.redis.xlen(stream), 0

    async def trim_acknowledged(self, model_id: str) -> int:
        """Drop entries every group has acknowledged (never one still to be answered)."""
        return await self._trim_acknowledged(request_stream(model_id))

    async def _trim_acknowledged(self, stream: str) -> int:
        floors = []
        for group in await self.redis.xinfo_groups(stream):
            summary = await self.redis.xpending(stream, group["name"])
            oldest = summary.get("min") if summary.get("pending") else None
            floors.append(_text(oldest or group["last-delivered-id"]))
        if not floors:
            return 0
        return await self.redis.xtrim(stream, minid=min(floors, key=stream_id), approximate=True)

    async def forget_consumers(self, model_id: str, idle_ms: int, also: str = "") -> int:
        """Delete the group's consumers idle `idle_ms` or more, and `also`, that hold no
        pending entry; how many were deleted."""
        args = [GROUP, idle_ms, also]
        return int(await self._forget(keys=[request_stream(model_id)], args=args))

    # ---- the callback outbox: `CALLBACK_STREAM`, read by the group `CALLBACK_GROUP` ----------
    # Filled by STORE_RESULT; read by gateway/callback_outbox.py, with the same claim, hold,
    # trim and forget steps as the request streams.

    async def ensure_callback_group(self) -> None:
        """The outbox's consumer group from the stream's start: no callback queued before the
        first worker started is skipped."""
        try:
            await self.redis.xgroup_create(CALLBACK_STREAM, CALLBACK_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read_callbacks(
        self, consumer: str, count: int, block_ms: int | None
    ) -> list[Delivery]:
        """Callbacks not yet handed to any consumer (`block_ms` None: do not wait)."""
        reply = await self.redis.xreadgroup(
            CALLBACK_GROUP, consumer, {CALLBACK_STREAM: ">"}, count=count, block=block_ms
        )
        return [Delivery(_text(i), f, 1) for _, entries in reply or [] for i, f in entries]

    async def claim_callbacks(
        self, consumer: str, count: int, cursor: str, in_flight: int
    ) -> tuple[str, list[Delivery]]:
        """Callbacks idle past the claim timeout (their consumer died), taken over."""
        return await self._claim_from(
            CALLBACK_STREAM, CALLBACK_GROUP, consumer, count, cursor, in_flight
        )

    async def ack_callback(self, entry_id: str) -> int:
        """The callback has its final outcome: nobody sends it again."""
        return int(await self.redis.xack(CALLBACK_STREAM, CALLBACK_GROUP, entry_id))

    async def hold_callbacks(self, consumer: str, entry_ids: Sequence[str]) -> int:
        """Keep callbacks this consumer is still delivering from being claimed (see `hold`)."""
        return await self._hold_in(CALLBACK_STREAM, CALLBACK_GROUP, consumer, entry_ids)

    async def trim_callbacks(self) -> int:
        """Drop callbacks every group has acknowledged; never one still to be delivered."""
        return await self._trim_acknowledged(CALLBACK_STREAM)

    async def callback_backlog(self) -> tuple[int, int]:
        """(lag, pending) of the outbox: callbacks not yet taken, taken and not finished."""
        return await self._backlog_of(CALLBACK_STREAM, CALLBACK_GROUP)

    async def forget_callback_consumers(self, idle_ms: int, also: str = "") -> int:
        """`forget_consumers` for the outbox's group."""
        args = [CALLBACK_GROUP, idle_ms, also]
        return int(await self._forget(keys=[CALLBACK_STREAM], args=args))


def _about(job: Job, error: BaseException) -> dict[str, str]:
    return {"model": job.model_id, "prediction_id": job.prediction_id, "error": repr(error)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ---- the job backend ---------------------------------------------------------------------------


class StreamJobs:
    """`JobBackend` on Redis streams: submit publishes, `aigw worker` processes answer.

    With `run_workers`, this process also runs a worker per model on its own runtime (one
    deployment without separate worker processes); otherwise `aigw worker` must be running.
    """

    def __init__(
        self,
        redis_url: str,
        config: StreamConfig,
        *,
        run_workers: bool = False,
        on_result: OnResult | None = None,
    ) -> None:
        self.store = StreamStore(redis_url, config)
        self._run_workers = run_workers
        self._on_result = on_result  # called once per newly stored result (e.g. callbacks)
        self._workers: list[StreamWorker] = []

    async def start(self, runtime: Runtime) -> None:
        for model_id in runtime.policies.policies:
            await self.store.ensure_group(model_id)
        if self._run_workers:
            from gateway.worker import StreamWorker, default_consumer

            consumer = default_consumer()
            self._workers = [
                StreamWorker(runtime, self.store, model_id, consumer, on_result=self._on_result)
                for model_id in runtime.policies.policies
            ]
            for worker in self._workers:
                await worker.start()

    async def submit(self, job: Job, key: IdempotencyKey | None = None) -> Submitted:
        """Accept the job or raise Backpressure (or a RedisError: nothing was accepted).

        A submit whose reply was lost (a timeout) may have run: the job is then queued and will
        be answered, and a 503 would make the caller's retry a second job. So Redis is asked,
        briefly, which it was; a submit that did not run is withdrawn. Only when that cannot be
        learnt either does the error stand, with its outcome unknown: then a retry with the
        same idempotency key is still one job."""
        try:
            return await self.store.submit(job, key)
        except RedisError as lost:
            if not await self._accepted_after_all(job, lost):
                raise
            return Submitted(job.prediction_id)

    async def _accepted_after_all(self, job: Job, lost: RedisError) -> bool:
        try:
            accepted = await self.store.accepted_after_all(job.prediction_id)
        except (RedisError, TimeoutError):
            log.warning("submit failed and its outcome is unknown", extra=_about(job, lost))
            return False
        if accepted:
            log.warning("submit's reply was lost; the job was accepted", extra=_about(job, lost))
        return accepted

    async def outcome(self, prediction_id: str) -> JobOutcome | None:
        return await self.store.outcome(prediction_id)

    async def close(self) -> None:
        for worker in self._workers:
            await worker.stop()
        await self.store.close()
