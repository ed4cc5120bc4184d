"""Process settings: one typed object, read from `AIGW_*` environment variables and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the gateway process needs to start; per-model behaviour lives in policies."""

    model_config = SettingsConfigDict(env_prefix="AIGW_", extra="ignore")

    contracts_dir: Path = Path("contracts")
    policies_dir: Path = Path("policies")
    fallbacks_dir: Path = Path("fallbacks")
    # Per model version, the feature and prediction distributions drift is measured against.
    baselines_dir: Path = Path("baselines")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Worker processes of `aigw serve`, sharing one listening socket. With more than one,
    # metrics use prometheus-client's multiprocess mode and each worker has its own audit
    # directory under `audit_dir` (see the README's "Several workers").
    workers: int = Field(default=1, ge=1, le=64)
    # The event loop the gateway's processes run on: uvloop (libuv, in C) costs less per
    # request than asyncio's own selector loop; `asyncio` is there to rule the loop out.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Set by the supervisor in each worker process, never by operators: which worker this is
    # and the directory the workers share (metrics files, the current policy version).
    worker_index: int | None = Field(default=None, ge=0)
    workers_dir: Path | None = None

    # The admin API listens apart from the public API, on loopback unless told otherwise.
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8081, ge=0, le=65535)
    # /metrics is always on the admin listener; on the public one too unless this is off
    # (its labels name tenants and models: switch it off where callers reach that port).
    public_metrics: bool = True
    # Policy and fallback files are watched and re-applied when they change.
    watch_policies: bool = True
    watch_interval_s: float = Field(default=1.0, gt=0)

    # API keys (hashes only) and tenants' rate limits. Unset: authentication is off.
    keys_file: Path | None = None
    # Where tenants' token buckets live: `memory` (per replica) or `redis` (shared).
    rate_limit_backend: Literal["memory", "redis"] = "memory"

    # Hostile-input limits: checked before any parsing work is spent on a body.
    max_body_bytes: int = Field(default=64 * 1024, ge=256)
    max_json_depth: int = Field(default=32, ge=2)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)

    # Time kept back from a request's budget for the gateway's own work after the
    # last backend call (rules, default, serialisation), so the answer still lands in time.
    response_margin_ms: float = Field(default=5.0, ge=0)

    # Whether /readyz fails while a backend is unreachable. Behind a load balancer that drops
    # unready replicas, set false: the gateway still answers (degraded) without its backends.
    readiness_requires_backends: bool = True
    # Triton servers are probed this often for /readyz, off the request path.
    readiness_interval_s: float = Field(default=2.0, gt=0)

    # Redis, for state shared by replicas. Unset: every replica keeps its own state.
    redis_url: str | None = None
    # Where predictions are cached: `memory` (per process, the default) or `redis`.
    cache_backend: Literal["memory", "redis"] = "memory"
    # Share breaker openings across replicas through `redis_url`.
    share_breaker_state: bool = False
    # Experiment and health statistics of every replica in Redis (replica_statistics.py), so
    # each replica reports all the traffic; needs AIGW_REDIS_URL.
    share_statistics: bool = False
    # Share policy versions across replicas through `redis_url`: an apply on one reaches all.
    share_policies: bool = False

    # Event-driven predictions (Redis streams, `aigw worker`; see gateway/streams.py).
    # A submit is refused (Backpressure) once a model's backlog, entries not yet delivered
    # plus delivered and unacknowledged, reaches this bound: refusing, never trimming.
    stream_max_backlog: int = Field(default=100_000, ge=1)
    # Jobs one worker runs at once, per model.
    worker_concurrency: int = Field(default=32, ge=1, le=4096)
    # An entry delivered and unacknowledged this long is taken over by a live worker.
    worker_claim_idle_ms: int = Field(default=30_000, ge=100)
    # Attempts that fail with an unexpected error before the entry becomes a dead letter.
    worker_max_attempts: int = Field(default=5, ge=1)
    # How long a result (and a pending marker) is kept under `aigw:result:{prediction_id}`.
    result_ttl_s: int = Field(default=86_400, ge=1)
    # Approximate cap of each result stream; results stay readable by id for result_ttl_s.
    result_stream_maxlen: int = Field(default=1_000_000, ge=1000)

    # The audit trail: rotated JSONL files with a hash chain, one record per answer.
    audit_dir: Path = Path("audit")
    audit_rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Key of the keyed hash that pseudonymises `x-pii` features, and key of the rotation
    # checkpoints' MAC. Unset: a random key per process (pseudonyms then differ across
    # restarts and checkpoints can only be checked by this process): set both in production.
    # Redis URL of a stream (`aigw:audit`) to which the local log is shipped; the local log is
    # the spill while that Redis is down. Unset: records stay in local files only.
    audit_stream_url: str | None = None
    # How long the stream keeps each entry (about 1.4 KB an answer, measured): older ones are
    # trimmed as batches are added. 0 keeps everything (a consumer that archives trims).
    audit_stream_retention_s: int = Field(default=24 * 3600, ge=0)
    # With the stream: how long each answer's decision stays findable there by feedback
    # reaching another replica (shared_decisions.py); 0 keeps none (feedback then needs the
    # replica, or the machine, whose audit log holds the answer).
    shared_decisions_ttl_s: int = Field(default=7 * 24 * 3600, ge=0)
    audit_key: SecretStr | None = None
    audit_checkpoint_key: SecretStr | None = None

    # Tracing: `none` makes and propagates trace ids without exporting them.
    trace_exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "aigw"

    # Asynchronous predictions (`POST /v1/predictions:async`): where jobs wait. `memory` keeps
    # them in this process (no Redis needed; lost on a crash); `redis` uses Redis streams
    # through `redis_url` (gateway/streams.py, run by `aigw worker`).
    jobs_backend: Literal["memory", "redis"] = "memory"
    # memory backend: jobs waiting at most (a full queue answers 503), tasks running them,
    # answered outcomes kept for polling (older ones are rebuilt from the audit log), and how
    # long shutdown waits for queued jobs to be answered.
    jobs_queue_max: int = Field(default=1000, ge=1)
    # Jobs one tenant may have waiting (a submit over it answers 429), so one tenant's backlog
    # leaves room for the others; unset: half of jobs_queue_max. Tenants are served in turn.
    jobs_tenant_max: int | None = Field(default=None, ge=1)
    jobs_workers: int = Field(default=4, ge=1, le=256)
    jobs_keep: int = Field(default=10_000, ge=1)
    jobs_keep_s: float = Field(default=3600.0, gt=0)
    jobs_drain_s: float = Field(default=10.0, ge=0)
    # Callbacks: the HMAC key that signs them (unset: `callback_url` is refused), delivery
    # attempts, per-attempt timeout, backoff, deliveries in flight at most, and the hosts
    # that may receive them (comma list, `.example.com` for a domain; empty: any host).
    callback_key: SecretStr | None = None
    callback_max_attempts: int = Field(default=5, ge=1, le=20)
    callback_timeout_s: float = Field(default=5.0, gt=0)
    callback_backoff_s: float = Field(default=0.5, gt=0)
    callback_backoff_max_s: float = Field(default=30.0, gt=0)
    callback_max_pending: int = Field(default=1000, ge=1)
    callback_allowed_hosts: str = ""

    log_level: str = "info"
