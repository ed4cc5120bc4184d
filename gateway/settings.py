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
    # Set by the supervisor in each worker process, never by operators: which worker this is
    # and the directory the workers share (metrics files, the current policy version).
    worker_index: int | None = Field(default=None, ge=0)
    workers_dir: Path | None = None

    # The admin API listens apart from the public API, on loopback unless told otherwise.
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8081, ge=0, le=65535)
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
    # Share policy versions across replicas through `redis_url`: an apply on one reaches all.
    share_policies: bool = False

    # The audit trail: rotated JSONL files with a hash chain, one record per answer.
    audit_dir: Path = Path("audit")
    audit_rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Key of the keyed hash that pseudonymises `x-pii` features, and key of the rotation
    # checkpoints' MAC. Unset: a random key per process (pseudonyms then differ across
    # restarts and checkpoints can only be checked by this process): set both in production.
    # Redis URL of a stream (`aigw:audit`) to which the local log is shipped; the local log is
    # the spill while that Redis is down. Unset: records stay in local files only.
    audit_stream_url: str | None = None
    audit_key: SecretStr | None = None
    audit_checkpoint_key: SecretStr | None = None

    # Tracing: `none` makes and propagates trace ids without exporting them.
    trace_exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "aigw"

    log_level: str = "info"
