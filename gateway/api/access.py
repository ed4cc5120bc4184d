"""Who may call what: API key → tenant and permissions, then the tenant's rate limit.

Every protected handler starts with `await authorize(request, permission)`. Without a keys
file (`AIGW_KEYS_FILE` unset) authentication is off: every caller is the tenant `default`
with every permission, and the gateway warns about it at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request

from gateway.auth import PERMISSIONS, Principal, TenantLimits, presented_key
from gateway.problems import Problem

ANONYMOUS = Principal(key_id="anonymous", tenant="default", permissions=frozenset(PERMISSIONS))
DEFAULT_LIMITS = TenantLimits()


async def authorize(request: Request, permission: str) -> Principal:
    """The caller, allowed `permission` and within its tenant's rate; else 401/403/429."""
    gateway = getattr(request.app.state, "gateway", request.app)  # the admin app's gateway
    return await authorize_headers(gateway.state.runtime, request.headers, permission)


async def authorize_headers(runtime: Any, headers: Mapping[str, str], permission: str) -> Principal:
    """`authorize` for a handler that has the request's headers but no Request object."""
    store = runtime.key_store
    if store is None:
        return ANONYMOUS
    principal = store.authenticate(presented_key(headers))
    if principal is None:
        # The same answer for a missing, malformed, unknown or revoked key: nothing to probe.
        raise Problem(
            401, "unauthenticated", "Authentication required",
            "send a valid API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": 'Bearer realm="aigw"'},
        )  # fmt: skip
    if not principal.may(permission):
        raise Problem(
            403, "forbidden", "Forbidden", f"this key lacks the `{permission}` permission"
        )
    limits = store.tenants.get(principal.tenant, DEFAULT_LIMITS)
    verdict = await runtime.rate_limiter.check(principal.tenant, limits)
    if not verdict.allowed:
        runtime.metrics.rate_limited.labels(principal.tenant).inc()
        raise Problem(
            429, "rate-limited", "Too many requests",
            "this tenant is over its request rate; retry after the time given",
            headers=verdict.headers(),
        )  # fmt: skip
    return principal
