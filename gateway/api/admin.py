"""The admin API under /admin/: read, validate, diff, apply, history and roll back policies.

Served by a separate app on its own address (loopback by default), never on the public
port. Every action that changes something is audited by the PolicyManager.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.api.access import authorize
from gateway.api.responses import json_response
from gateway.body import check_declared_length, check_media_type, parse_json, read_limited
from gateway.policy_manager import PolicyManager
from gateway.policy_store import BUNDLE_SECTIONS, Bundle, BundleError, bundle_diff
from gateway.problems import FieldError, Problem, json_pointer


async def require_admin(request: Request) -> None:
    await authorize(request, "admin")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

MAX_ADMIN_BODY_BYTES = 4 * 1024 * 1024
MAX_AUTHOR_LENGTH = 128


def _manager(request: Request) -> PolicyManager:
    return request.app.state.gateway.state.policy_manager


async def _json_body(request: Request) -> Any:
    check_media_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), MAX_ADMIN_BODY_BYTES)
    return parse_json(await read_limited(request.stream(), MAX_ADMIN_BODY_BYTES), 8)


def _bundle_of(payload: Any) -> Bundle:
    try:
        return Bundle.from_dict(payload.get("bundle") if isinstance(payload, dict) else None)
    except BundleError as error:
        raise _invalid("the bundle is malformed", error.faults, prefix="/bundle") from None


def _author_of(payload: Any) -> str:
    author = payload.get("author") if isinstance(payload, dict) else None
    if not isinstance(author, str) or not 0 < len(author) <= MAX_AUTHOR_LENGTH:
        raise Problem(
            422, "invalid-request", "An author is required",
            errors=[FieldError("/author", f"a name of 1 to {MAX_AUTHOR_LENGTH} characters")],
        )  # fmt: skip
    return author


def _invalid(detail: str, faults: list[str], prefix: str = "") -> Problem:
    errors = [
        FieldError(prefix + f.split(":", 1)[0] if prefix else fault_pointer(f), f)
        for f in faults[:100]
    ]
    return Problem(422, "invalid-policy", "The policy bundle is invalid", detail, errors=errors)


def fault_pointer(fault: str) -> str:
    """Where in the request body a load fault lies: the bundle file it names
    (`policies/customer-churn.yaml: arms.0.weight: ...` → /bundle/policies/customer-churn.yaml),
    else the bundle as a whole."""
    section, _, name = fault.split(":", 1)[0].partition("/")
    if section in BUNDLE_SECTIONS and name and "/" not in name:
        return json_pointer(["bundle", section, name])
    return "/bundle"


@router.get("/policies")
async def current_policies(request: Request) -> Response:
    """The running version and its files."""
    version = _manager(request).history.current
    assert version is not None
    return json_response({**version.summary(), "bundle": version.bundle.to_dict()})


@router.post("/policies/validate")
async def validate_policies(request: Request) -> Response:
    """Check a bundle as a whole without applying it."""
    bundle = _bundle_of(await _json_body(request))
    faults = await _manager(request).validate(bundle)
    if faults:
        raise _invalid(f"{len(faults)} fault(s); the running version is unchanged", faults)
    return json_response({"valid": True, "content_hash": bundle.content_hash})


@router.post("/policies/diff")
async def diff_policies(request: Request) -> Response:
    """A unified diff from the running version to a proposed bundle, and the arms whose
    model it changes (null when the bundle does not load: validate says why)."""
    bundle = _bundle_of(await _json_body(request))
    manager = _manager(request)
    running = manager.history.current
    assert running is not None
    return json_response(
        {
            "diff": bundle_diff(running.bundle, bundle),
            "arm_models_changed": await manager.arm_model_changes(bundle),
        }
    )


@router.post("/policies")
async def apply_policies(request: Request) -> Response:
    """Validate and apply a bundle as a new version, or refuse it and keep the running one."""
    payload = await _json_body(request)
    bundle, author = _bundle_of(payload), _author_of(payload)
    try:
        version = await _manager(request).apply(bundle, author=author)
    except BundleError as error:
        raise _invalid(
            f"{len(error.faults)} fault(s); the running version is unchanged", error.faults
        ) from None
    return json_response(version.summary())


@router.get("/policies/history")
async def policy_history(request: Request) -> Response:
    """Every version applied since start, oldest first."""
    return json_response([v.summary() for v in _manager(request).history.versions])


@router.post("/policies/rollback")
async def rollback_policies(request: Request) -> Response:
    """Apply an earlier version again (recorded as a new version)."""
    payload = await _json_body(request)
    author = _author_of(payload)
    number = payload.get("version")
    if not isinstance(number, int) or isinstance(number, bool):
        raise Problem(
            422, "invalid-request", "A version number is required",
            errors=[FieldError("/version", "an integer from the history")],
        )  # fmt: skip
    try:
        version = await _manager(request).rollback(number, author=author)
    except KeyError:
        raise Problem(404, "unknown-version", "Unknown version", f"no version {number}") from None
    except BundleError as error:
        raise _invalid("that version no longer validates", error.faults) from None
    return json_response(version.summary())
