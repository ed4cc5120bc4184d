"""Tenants, API keys and permissions.

Keys live in a YAML file (`AIGW_KEYS_FILE`) as SHA-256 hashes only: a key is shown once,
when `aigw keys create` makes it, and never stored, logged or audited in clear. A presented
key is hashed and compared with every stored hash in constant time. The file is re-read
when it changes, so keys are added and revoked without a restart.

    tenants:
      acme: {rate_per_s: 50, burst: 100}
    keys:
      - id: k-3f9a1c          # names the key in logs and lists; reveals nothing
        tenant: acme
        hash: sha256:...
        permissions: [predict, feedback]
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.policy import validation_lines
from gateway.problems import FaultsError
from gateway.yaml_files import read_yaml

log = logging.getLogger("gateway.auth")

# `audit:read` reads the key's own tenant's records; `models:read` reads the model-wide
# reports (experiments, model health), which count every tenant's traffic.
Permission = Literal["predict", "feedback", "audit:read", "models:read", "admin"]
PERMISSIONS: tuple[Permission, ...] = ("predict", "feedback", "audit:read", "models:read", "admin")
KEY_PREFIX = "aigw_"
_ID = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class KeysFileError(FaultsError):
    """The keys file is unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantLimits(_Strict):
    """A tenant's token bucket: `rate_per_s` requests per second, bursts up to `burst`."""

    rate_per_s: float = Field(default=100.0, gt=0)
    burst: int = Field(default=200, ge=1)


class KeyEntry(_Strict):
    id: str = Field(pattern=_ID)
    tenant: str = Field(pattern=_ID)
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    permissions: list[Permission] = Field(min_length=1)


class KeysFile(_Strict):
    tenants: dict[str, TenantLimits] = {}
    keys: list[KeyEntry] = []


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its tenant and what it may do."""

    key_id: str
    tenant: str
    permissions: frozenset[str]

    def may(self, permission: str) -> bool:
        return permission in self.permissions


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>`, else from `X-API-Key`."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None
    key = headers.get("x-api-key")
    return key.strip() or None if key is not None else None


def parse_keys_file(text: str, source: str) -> KeysFile:
    """A keys file, checked; KeysFileError lists `file: field: message` faults."""
    try:
        raw = read_yaml(text, max_values=None) or {}
        keys = KeysFile.model_validate(raw)
    except yaml.YAMLError as error:
        raise KeysFileError([f"{source}: cannot be read: {' '.join(str(error).split())}"]) from None
    except ValidationError as error:
        raise KeysFileError([f"{source}: {line}" for line in validation_lines(error)]) from None
    ids = [k.id for k in keys.keys]
    if len(set(ids)) != len(ids):
        raise KeysFileError([f"{source}: keys: two keys share an id"])
    return keys


class KeyStore:
    """Keys from a file, re-read when the file changes (checked at most once a second)."""

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self.path = path
        self._recheck_s = recheck_s
        self._checked_at = 0.0
        self._stamp: tuple[int, int] | None = None
        self._keys = self._load()

    @property
    def tenants(self) -> Mapping[str, TenantLimits]:
        self._refresh()
        return self._keys.tenants

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal for `key`, or None; every stored hash is compared, in constant time."""
        self._refresh()
        if not key or len(key) > 256:
            return None
        presented = hash_key(key).encode()
        found: KeyEntry | None = None
        for entry in self._keys.keys:
            if hmac.compare_digest(presented, entry.hash.encode()):
                found = entry
        if found is None:
            return None
        return Principal(found.id, found.tenant, frozenset(found.permissions))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self._recheck_s:
            return
        self._checked_at = now
        try:
            stat = self.path.stat()
        except OSError:
            return  # keep the keys we have; a vanished file is reported by `aigw keys list`
        if (stat.st_mtime_ns, stat.st_size) != self._stamp:
            try:
                self._keys = self._load()
            except (KeysFileError, OSError) as error:
                # A broken edit keeps the last good keys, and says why once per change.
                self._stamp = (stat.st_mtime_ns, stat.st_size)
                log.warning("keys file refused", extra={"faults": getattr(error, "faults", [])})

    def _load(self) -> KeysFile:
        stat = self.path.stat()
        keys = parse_keys_file(self.path.read_text(encoding="utf-8"), str(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return keys


def add_key(
    path: Path, tenant: str, permissions: list[str], key: str | None = None
) -> tuple[str, str]:
    """Create a key for `tenant` in the keys file; returns (key id, key). The key is shown once."""
    keys = _read_or_empty(path)
    key = key or new_key()
    key_id = "k-" + secrets.token_hex(4)
    entry = KeyEntry(id=key_id, tenant=tenant, hash=hash_key(key), permissions=permissions)
    tenants = dict(keys.tenants)
    tenants.setdefault(tenant, TenantLimits())
    _write(path, KeysFile(tenants=tenants, keys=[*keys.keys, entry]))
    return key_id, key


def revoke_key(path: Path, key_id: str) -> bool:
    keys = _read_or_empty(path)
    remaining = [k for k in keys.keys if k.id != key_id]
    if len(remaining) == len(keys.keys):
        return False
    _write(path, KeysFile(tenants=keys.tenants, keys=remaining))
    return True


def list_keys(path: Path) -> list[KeyEntry]:
    return list(_read_or_empty(path).keys)


def _read_or_empty(path: Path) -> KeysFile:
    if not path.exists():
        return KeysFile()
    return parse_keys_file(path.read_text(encoding="utf-8"), str(path))


def _write(path: Path, keys: KeysFile) -> None:
    """Atomically, and readable by its owner only: it holds hashes, not keys, but still."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    text = yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(scratch, path)
