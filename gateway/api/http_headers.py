"""What every exchange carries, whichever way it is routed: X-Request-ID, the security
headers, and the limit on the size of a request's headers (431).

Used by the app's middleware (app.py) and by the prediction route that answers ahead of it
(api/predictions.py), so both ways give callers the same headers and the same refusals.
"""

from __future__ import annotations

from starlette.types import Message, Send

from gateway.ids import new_hex_id
from gateway.problems import Problem

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]


def caller_request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The caller's request id if it is short and plain; anything else is replaced."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if 0 < len(value) <= 128 and all(c in _REQUEST_ID_CHARS for c in value):
                return value
            return None
    return None


def request_id_for(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The caller's request id, or a new one."""
    return caller_request_id(headers) or new_hex_id()


def with_exchange_headers(headers: list[tuple[bytes, bytes]], request_id: bytes) -> list:
    """A response's headers plus X-Request-ID and the security headers."""
    return [*headers, (REQUEST_ID_HEADER, request_id), *SECURITY_HEADERS]


def sending_exchange_headers(send: Send, request_id: bytes) -> Send:
    """`send`, adding X-Request-ID and the security headers to the response's start."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = with_exchange_headers(message.get("headers", []), request_id)
        await send(message)

    return send_with_headers


def headers_too_large(headers: list[tuple[bytes, bytes]], max_header_bytes: int) -> Problem | None:
    """The 431 problem when the request's headers total more than the limit, else None."""
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size <= max_header_bytes:
        return None
    return Problem(
        431, "headers-too-large", "Request headers too large",
        f"headers may total at most {max_header_bytes} bytes",
    )  # fmt: skip
