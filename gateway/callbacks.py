"""Signed callbacks: an answered job's envelope POSTed to the caller's `callback_url`.

A receiver verifies a delivery like a Stripe or GitHub webhook: it recomputes
`HMAC-SHA256(key, "<X-AIGW-Timestamp>.<raw body>")` with the shared `AIGW_CALLBACK_KEY`,
compares it in constant time with `X-AIGW-Signature` (`sha256=<hex>`), and refuses
timestamps too far from its clock (a replayed delivery is stale). `verify` does exactly that.

Delivery is at least once: an accepted (2xx) delivery is not sent again, but a receiver whose
2xx was lost in transit sees it twice, so receivers deduplicate on `X-AIGW-Prediction-Id`.
(Jobs on Redis keep that promise across crashes: their callbacks wait in a Redis outbox until
delivered or given up, gateway/callback_outbox.py; this module sends them.)
Connection errors, timeouts, 5xx and 429 are retried with capped exponential backoff and
jitter up to a bound of attempts; any other status is final. Redirects are not followed: a
redirect could lead past the host allow-list.

The URL is the caller's, so it could point anywhere the gateway can reach (SSRF: cloud
metadata addresses, the admin port, internal services). Two checks stand in the way. At
submit, a host outside `AIGW_CALLBACK_ALLOWED_HOSTS` (when set) or an address literal that is
not public is refused, naming the field. At delivery, a host the allow-list does not name is
resolved by the gateway itself and connected to only at a public address, the one checked
(`PublicDestinations`): a name that resolves to loopback, a private network, link-local (the
metadata service) and the like is refused, also when its DNS answer changes between the
submit and the delivery (DNS rebinding). Hosts the operator lists are trusted wherever they
resolve: that is how internal receivers are allowed. Egress rules are still worth having.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import orjson

from gateway.problems import FieldError
from gateway.settings import Settings

log = logging.getLogger("gateway.callbacks")

SIGNATURE_HEADER = "X-AIGW-Signature"
TIMESTAMP_HEADER = "X-AIGW-Timestamp"
PREDICTION_ID_HEADER = "X-AIGW-Prediction-Id"
ATTEMPT_HEADER = "X-AIGW-Attempt"
SIGNATURE_SCHEME = "sha256="
MAX_URL_LENGTH = 2048
DEFAULT_TOLERANCE_S = 300

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# The contract declares this very pattern for `callback_url` (a test keeps them equal): a
# host name whose last label starts with a letter, or a dotted IPv4 address; an optional
# port; then printable ASCII. No user info (credentials in URLs leak into logs), no IPv6
# literals, nothing a URL parser could read two ways.
CALLBACK_URL_PATTERN = (
    rf"^https?://(?:(?:{_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
    rf"|(?:{_OCTET}\.){{3}}{_OCTET})(?::{_PORT})?(?:[/?][!-~]*)?$"
)
_CALLBACK_URL = re.compile(CALLBACK_URL_PATTERN)

# delivered | retry | rejected | refused | exhausted | dropped: the metric's label values
# (refused: the destination is not a public address and the allow-list does not name it).
Outcome = str


# ---- signatures: pure functions ------------------------------------------------------------


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The `X-AIGW-Signature` value of `body` sent at `timestamp` (Unix seconds)."""
    message = str(timestamp).encode() + b"." + body
    return SIGNATURE_SCHEME + hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(
    key: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """What a receiver runs: the signature matches the raw body and the timestamp is fresh."""
    if not timestamp or not signature or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    sent_at = int(timestamp)
    if abs(now - sent_at) > tolerance_s:
        return False  # a replay of an old delivery, or a clock far off
    return hmac.compare_digest(sign(key, sent_at, body), signature.strip())


def signed_headers(key: bytes, prediction_id: str, body: bytes, now: float) -> dict[str, str]:
    """The headers of one delivery attempt; each attempt is signed afresh with its own time."""
    timestamp = int(now)
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(key, timestamp, body),
        TIMESTAMP_HEADER: str(timestamp),
        PREDICTION_ID_HEADER: prediction_id,
    }


# ---- decisions: pure functions -------------------------------------------------------------


def retry_delay(attempt: int, base_s: float, cap_s: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based), before the next.

    Exponential and capped, with "equal jitter": between half and all of the step, so
    receivers coming back from an outage are not hit by every sender at the same instant.
    `jitter` is a uniform draw from [0, 1), passed in so the schedule is testable.
    """
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    return step / 2 + step / 2 * jitter


def is_retryable(status: int | None) -> bool:
    """Connection errors and timeouts (None), 5xx and 429 may pass; other statuses will not."""
    return status is None or status == 429 or status >= 500


def retry_after_s(value: str | None, cap_s: float) -> float | None:
    """A receiver's `Retry-After` in seconds (the delta form), capped; None when absent or odd."""
    if value is None or not (value.isascii() and value.strip().isdigit()):
        return None
    return min(float(value.strip()), cap_s)


def allowed_hosts(raw: str) -> frozenset[str]:
    """`AIGW_CALLBACK_ALLOWED_HOSTS` (a comma list) as lower-case names; empty allows any."""
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    """`host` is listed, or is under a listed `.suffix` (`.example.com` allows `a.example.com`)."""
    if not allowed:
        return True
    host = host.lower()
    return any(host == a or (a.startswith(".") and host.endswith(a)) for a in allowed)


# IPv6 prefixes whose last 32 bits are an IPv4 address that a packet to them reaches through a
# translator or the host's own stack: NAT64's well-known prefix, IPv4-compatible (deprecated)
# and IPv4-translated (SIIT). Python counts them global whatever IPv4 they carry, so
# 64:ff9b::a9fe:a9fe would reach 169.254.169.254 on a NAT64 network: the IPv4 is what counts.
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
# Never public, though Python says global: local-use NAT64 (RFC 8215; the IPv4 may sit at
# several positions, and the prefix is a network's own) and deprecated site-local addresses.
_NEVER_PUBLIC = tuple(ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b:1::/48", "fec0::/10"))


def is_public_address(text: str) -> bool:
    """An address on the public internet: not loopback, private, link-local, shared (CGNAT),
    multicast, reserved or unspecified, also when its IPv4 is carried in IPv6 (mapped,
    NAT64, 6to4, IPv4-compatible or -translated forms)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # a zone index is link-local anyway
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in prefix for prefix in _NEVER_PUBLIC):
            return False
        address = embedded_ipv4(address) or address
    return address.is_global and not address.is_multicast


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to (mapped, 6to4, NAT64, compatible, translated);
    None for a native IPv6 address. (Teredo needs none: its prefix is not global.)"""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_address_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_listed(host: str, allowed: Collection[str]) -> bool:
    """The operator names this host in the allow-list (an empty list names none)."""
    return bool(allowed) and host_allowed(host, allowed)


def callback_url_error(value: Any, *, enabled: bool, allowed: Collection[str]) -> FieldError | None:
    """Why `callback_url` cannot be accepted, naming the field; None when it can."""
    pointer = "/callback_url"
    if not isinstance(value, str):
        return FieldError(pointer, "must be a string")
    if len(value) > MAX_URL_LENGTH:
        return FieldError(pointer, f"must be at most {MAX_URL_LENGTH} characters")
    if not _CALLBACK_URL.fullmatch(value):
        return FieldError(pointer, "must be an http or https URL with a host name, no user info")
    if not enabled:
        return FieldError(pointer, "callbacks are not enabled on this gateway")
    try:
        host = httpx.URL(value).host
    except (httpx.InvalidURL, UnicodeError):  # e.g. an `xn--` label that is no punycode
        return FieldError(pointer, "must be an http or https URL with a valid host name")
    if not host_allowed(host, allowed):
        return FieldError(pointer, "this host is not allowed to receive callbacks")
    if is_address_literal(host) and not is_public_address(host) and not host_listed(host, allowed):
        return FieldError(pointer, "this address is not public; an operator may allow it by name")
    return None


# ---- where a delivery may connect ----------------------------------------------------------


class DestinationRefused(httpcore.ConnectError):
    """The callback host resolved to no public address and the allow-list does not name it."""


class PublicDestinations(httpcore.AsyncNetworkBackend):
    """Connects callbacks only to public addresses, except to hosts the operator listed.

    The gateway resolves the name itself and connects to the very address it checked, so a
    DNS answer cannot change between the check and the connection; TLS still verifies the
    certificate against the host name (httpcore passes the URL's host as server_hostname).
    """

    def __init__(self, listed: Collection[str], inner: httpcore.AsyncNetworkBackend) -> None:
        self._listed = listed
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        if not host_listed(host, self._listed):
            host = await self._public_address(host, port, timeout)
        return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def _public_address(self, host: str, port: int, timeout: float | None) -> str:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as error:
            raise httpcore.ConnectError(f"cannot resolve {host}: {error!r}") from error
        for _family, _type, _proto, _name, sockaddr in found:
            if is_public_address(str(sockaddr[0])):
                return str(sockaddr[0])
        raise DestinationRefused(f"{host} resolves to no public address")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("callbacks go over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport with its connection pool built on `PublicDestinations`."""

    def __init__(self, listed: Collection[str], limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        # httpx (0.18 to 0.28 at least) keeps its httpcore pool here and offers no option for
        # a network backend; tests/test_callbacks.py fails if that ever stops applying. An
        # httpx that keeps it elsewhere would send callbacks unchecked: refuse to start.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError(
                f"httpx {httpx.__version__} keeps no connection pool where the gateway puts "
                "its destination check: callbacks would reach private addresses"
            )
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PublicDestinations(listed, httpcore.AnyIOBackend()),
        )


# ---- delivery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """How one callback ended: its final outcome and the attempts it took."""

    outcome: Outcome
    attempts: int
    status: int | None


class CallbackSender:
    """Delivers signed callbacks as bounded background tasks over one shared HTTP client.

    `schedule` never waits: job workers hand the envelope over and go on. At most
    `max_pending` deliveries are in flight (sending or between attempts); beyond that a
    delivery is dropped and counted, and the caller can still poll its status URL. (That is
    the in-memory jobs backend; jobs on Redis queue their callbacks in a durable outbox whose
    consumer, gateway/callback_outbox.py, calls `send` and keeps to the same bound by taking
    no more entries: nothing is dropped there.)
    """

    def __init__(
        self,
        key: bytes,
        *,
        max_attempts: int = 5,
        timeout_s: float = 5.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_pending: int = 1000,
        observe: Callable[[Outcome], None] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        allowed: Collection[str] = (),
    ) -> None:
        self._key = key
        self._max_attempts = max_attempts
        self._backoff = (backoff_s, backoff_max_s)
        self._max_pending = max_pending
        self._observe = observe or (lambda outcome: None)
        self._sleep, self._clock, self._jitter = sleep, clock, jitter
        # One long-lived client: connections to a receiver are reused across deliveries.
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            transport=_GuardedTransport(allowed, httpx.Limits()),
            headers={"User-Agent": "aigw-callbacks/1"},
            # No proxy or netrc from the environment: a proxy would make the connection the
            # destination check sees (the proxy's), not the receiver's.
            trust_env=False,
        )
        self._tasks: set[asyncio.Task[Delivery]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    @property
    def max_pending(self) -> int:
        return self._max_pending

    @property
    def max_attempts(self) -> int:
        return self._max_attempts

    def schedule(self, prediction_id: str, url: str, envelope: Any) -> bool:
        """Start delivering `envelope` to `url` in the background; False when dropped."""
        if len(self._tasks) >= self._max_pending:
            self._observe("dropped")
            log.warning("callback dropped at the bound", extra={"prediction_id": prediction_id})
            return False
        task = asyncio.create_task(self.deliver(prediction_id, url, orjson.dumps(envelope)))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return True

    def _finished(self, task: asyncio.Task[Delivery]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback delivery crashed", exc_info=task.exception())

    async def deliver(self, prediction_id: str, url: str, body: bytes) -> Delivery:
        """Send until accepted, refused or out of attempts; every attempt is counted, and a
        delivery cancelled by a shutdown counts as dropped (nothing will send it again)."""
        try:
            return await self.send(prediction_id, url, body)
        except asyncio.CancelledError:
            self._observe("dropped")  # shutdown came first
            raise

    async def send(self, prediction_id: str, url: str, body: bytes) -> Delivery:
        """`deliver` for a caller that keeps the callback until it has an outcome (the Redis
        outbox, gateway/callback_outbox.py): a cancelled send is no outcome, and not counted."""
        status: int | None = None
        for attempt in range(1, self._max_attempts + 1):
            try:
                status, wait_hint = await self._attempt(prediction_id, url, body, attempt)
            except DestinationRefused as refused:
                log.warning("callback refused", extra={"prediction_id": prediction_id,
                                                       "reason": str(refused)})  # fmt: skip
                return self._end("refused", attempt, None)
            if status is not None and 200 <= status < 300:
                return self._end("delivered", attempt, status)
            if not is_retryable(status):
                return self._end("rejected", attempt, status)
            if attempt == self._max_attempts:
                break
            self._observe("retry")
            delay = retry_delay(attempt, *self._backoff, self._jitter())
            await self._sleep(max(delay, wait_hint or 0.0))
        return self._end("exhausted", self._max_attempts, status)

    async def _attempt(
        self, prediction_id: str, url: str, body: bytes, attempt: int
    ) -> tuple[int | None, float | None]:
        headers = signed_headers(self._key, prediction_id, body, self._clock())
        headers[ATTEMPT_HEADER] = str(attempt)
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # refused, DNS, timeouts, bad URL
            if isinstance(error.__cause__, DestinationRefused):
                raise error.__cause__ from None  # final: the address will not become public
            log.info("callback attempt failed", extra={"prediction_id": prediction_id,
                                                       "error": type(error).__name__})  # fmt: skip
            return None, None
        hint = retry_after_s(response.headers.get("retry-after"), self._backoff[1])
        return response.status_code, hint

    def conclude(self, outcome: Outcome, attempts: int = 0) -> Delivery:
        """An outcome reached without sending (the outbox gives up on an entry, or its URL is
        not allowed here): counted and logged like any other."""
        return self._end(outcome, attempts, None)

    def _end(self, outcome: Outcome, attempts: int, status: int | None) -> Delivery:
        self._observe(outcome)
        if outcome != "delivered":
            log.warning("callback not delivered", extra={"outcome": outcome, "status": status})
        return Delivery(outcome, attempts, status)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let deliveries in flight finish within `timeout_s`, cancel the rest, close the client."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._client.aclose()


def callback_sender(
    settings: Settings, observe: Callable[[Outcome], None] | None = None
) -> CallbackSender | None:
    """The sender the settings describe, or None when no key is set (callbacks refused)."""
    if settings.callback_key is None:
        return None
    return CallbackSender(
        settings.callback_key.get_secret_value().encode(),
        max_attempts=settings.callback_max_attempts,
        timeout_s=settings.callback_timeout_s,
        backoff_s=settings.callback_backoff_s,
        backoff_max_s=settings.callback_backoff_max_s,
        max_pending=settings.callback_max_pending,
        observe=observe,
        allowed=allowed_hosts(settings.callback_allowed_hosts),
    )
