"""Signed callbacks: signatures, the retry schedule, URL checks, and delivery to a real receiver."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import callbacks
from gateway.callbacks import (
    CALLBACK_URL_PATTERN,
    MAX_URL_LENGTH,
    CallbackSender,
    allowed_hosts,
    callback_url_error,
    host_allowed,
    is_public_address,
    is_retryable,
    retry_after_s,
    retry_delay,
    sign,
    signed_headers,
    verify,
)
from gateway.contracts import load_contracts
from gateway.demo.triton_process import free_port
from tests.callback_receiver import Receiver
from tests.conftest import REPO

KEY = b"callback-test-key"
BODY = b'{"prediction":"stay","prediction_id":"p-1"}'
NOW = 1_700_000_000
GOOD = sign(KEY, NOW, BODY)

# ---- signatures ------------------------------------------------------------------------------


def test_a_signature_is_the_hmac_of_timestamp_dot_body():
    """The documented recipe, recomputed with the standard library, gives the header value."""
    import hashlib
    import hmac

    expected = hmac.new(KEY, f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(KEY, NOW, BODY) == f"sha256={expected}"


@pytest.mark.parametrize(
    ("key", "body", "timestamp", "signature", "now", "ok"),
    [
        pytest.param(KEY, BODY, str(NOW), GOOD, NOW, True, id="valid"),
        pytest.param(KEY, BODY, str(NOW), GOOD, NOW + 299, True, id="valid-within-tolerance"),
        pytest.param(KEY, BODY, str(NOW), f" {GOOD} ", NOW, True, id="surrounding-spaces"),
        pytest.param(b"other-key", BODY, str(NOW), GOOD, NOW, False, id="wrong-key"),
        pytest.param(KEY, BODY + b" ", str(NOW), GOOD, NOW, False, id="body-changed"),
        pytest.param(KEY, BODY, str(NOW + 1), GOOD, NOW, False, id="timestamp-changed"),
        pytest.param(KEY, BODY, str(NOW), GOOD, NOW + 301, False, id="replayed-too-late"),
        pytest.param(KEY, BODY, str(NOW), GOOD, NOW - 301, False, id="from-the-future"),
        pytest.param(KEY, BODY, None, GOOD, NOW, False, id="no-timestamp"),
        pytest.param(KEY, BODY, str(NOW), None, NOW, False, id="no-signature"),
        pytest.param(KEY, BODY, "", GOOD, NOW, False, id="empty-timestamp"),
        pytest.param(KEY, BODY, "-5", GOOD, NOW, False, id="negative-timestamp"),
        pytest.param(KEY, BODY, "1e9", GOOD, NOW, False, id="float-timestamp"),
        pytest.param(KEY, BODY, "١٢٣", GOOD, NOW, False, id="non-ascii-digits"),
        pytest.param(KEY, BODY, str(NOW), GOOD.removeprefix("sha256="), NOW, False, id="no-scheme"),
        pytest.param(KEY, BODY, str(NOW), GOOD.upper(), NOW, False, id="upper-case"),
        pytest.param(KEY, BODY, str(NOW), "sha1=" + GOOD[7:], NOW, False, id="other-scheme"),
        pytest.param(KEY, BODY, str(NOW), GOOD[:-1], NOW, False, id="truncated"),
    ],
)
def test_verify_accepts_only_fresh_untampered_deliveries(key, body, timestamp, signature, now, ok):
    """A receiver's check refuses any change to key, body or time, and stale timestamps."""
    assert verify(key, body, timestamp, signature, now=now) is ok


def test_signed_headers_verify_and_name_the_prediction():
    """The headers one attempt carries are exactly what `verify` needs."""
    headers = signed_headers(KEY, "p-1", BODY, NOW + 0.7)
    assert headers["X-AIGW-Timestamp"] == str(NOW)
    assert headers["X-AIGW-Prediction-Id"] == "p-1"
    assert headers["Content-Type"] == "application/json"
    ok = verify(KEY, BODY, headers["X-AIGW-Timestamp"], headers["X-AIGW-Signature"], now=NOW)
    assert ok


# ---- the retry schedule and what is retried ------------------------------------------------


def test_backoff_doubles_from_half_to_all_of_each_step_and_is_capped():
    """Equal jitter: each wait lies between half and all of base·2^(n-1), never above the cap."""
    low = [retry_delay(n, 0.5, 4.0, 0.0) for n in range(1, 7)]
    high = [retry_delay(n, 0.5, 4.0, 0.999999) for n in range(1, 7)]
    assert low == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert high == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0], rel=1e-5)
    assert retry_delay(3, 0.5, 4.0, 0.5) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("status", "retry"),
    [(None, True), (500, True), (502, True), (503, True), (504, True), (429, True),
     (400, False), (401, False), (403, False), (404, False), (410, False), (422, False),
     (301, False), (302, False)],
)  # fmt: skip
def test_connection_errors_5xx_and_429_are_retried_other_statuses_are_final(status, retry):
    """Only failures that may pass are tried again; a redirect is never followed or retried."""
    assert is_retryable(status) is retry


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("3", 3.0), (" 7 ", 7.0), ("999", 30.0), ("soon", None), ("1.5", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-1", None)],
)  # fmt: skip
def test_retry_after_is_read_in_seconds_and_capped(header, seconds):
    """A receiver may ask for more time, within the backoff cap; other forms are ignored."""
    assert retry_after_s(header, 30.0) == seconds


# ---- which URLs are accepted ---------------------------------------------------------------


def test_allowed_hosts_parse_a_comma_list():
    """Spaces and empty items are ignored and names are lower-cased; empty means any host."""
    assert allowed_hosts(" Hooks.Example.com, ,.corp.internal ,") == {
        "hooks.example.com",
        ".corp.internal",
    }
    assert allowed_hosts("") == frozenset()


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("anything.example", (), True),
        ("hooks.example.com", ("hooks.example.com",), True),
        ("HOOKS.example.com", ("hooks.example.com",), True),
        ("evil.example.com", ("hooks.example.com",), False),
        ("hooks.example.com.evil.net", ("hooks.example.com",), False),
        ("a.corp.internal", (".corp.internal",), True),
        ("corp.internal", (".corp.internal",), False),
        ("evilcorp.internal", (".corp.internal",), False),
        ("169.254.169.254", ("hooks.example.com",), False),
    ],
)
def test_hosts_must_be_listed_or_under_a_listed_domain(host, allowed, ok):
    """Exact names, or `.suffix` domains; a look-alike or a metadata address is refused."""
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize(
    ("value", "enabled", "allowed", "error"),
    [
        ("https://hooks.example.com/aigw?x=1", True, (), None),
        ("http://127.0.0.1:8443/cb", True, (), "not public"),
        ("http://127.0.0.1:8443/cb", True, ("127.0.0.1",), None),
        ("http://10.0.0.5/hook", True, (), "not public"),
        ("http://169.254.169.254/latest", True, (), "not public"),  # cloud metadata
        ("http://8.8.8.8/hook", True, (), None),
        ("http://localhost/cb", True, (), None),  # a name: checked where it resolves, at delivery
        ("https://hooks.example.com/cb", True, ("hooks.example.com",), None),
        ("https://evil.example.net/cb", True, ("hooks.example.com",), "not allowed"),
        ("https://hooks.example.com/cb", False, (), "not enabled"),
        (None, True, (), "must be a string"),
        (42, True, (), "must be a string"),
        (["http://a.example"], True, (), "must be a string"),
        ("ftp://files.example.com/x", True, (), "http or https"),
        ("javascript:alert(1)", True, (), "http or https"),
        ("file:///etc/passwd", True, (), "http or https"),
        ("HTTP://upper.example", True, (), "http or https"),
        ("http://", True, (), "http or https"),
        ("http://user:pass@hooks.example.com/", True, (), "http or https"),
        ("http://hooks.example.com@evil.net/", True, (), "http or https"),
        ("http://[::1]/cb", True, (), "http or https"),
        ("http://999.999.999.999/", True, (), "http or https"),
        ("http://10.0.0.1:0/", True, (), "http or https"),
        ("http://hooks.example.com:65536/", True, (), "http or https"),
        ("http://hooks.example.com/a b", True, (), "http or https"),
        ("http://hooks.example.com/\n", True, (), "http or https"),
        ("http://hooks.example.com/ü", True, (), "http or https"),
        ("http://bücher.example/", True, (), "http or https"),
        ("http://-bad.example/", True, (), "http or https"),
        ("http://xn--a.com/cb", True, (), "valid host name"),  # an A-label that is no punycode
        (" http://lead.example/", True, (), "http or https"),
        ("http://hooks.example.com/" + "a" * MAX_URL_LENGTH, True, (), "at most"),
    ],
)
def test_callback_urls_are_checked_at_submit(value, enabled, allowed, error):
    """Only plain http(s) URLs to allowed hosts pass, and only when callbacks are signed."""
    found = callback_url_error(value, enabled=enabled, allowed=allowed)
    if error is None:
        assert found is None
    else:
        assert found is not None and found.pointer == "/callback_url"
        assert error in found.detail


def test_the_contract_declares_the_pattern_the_gateway_enforces():
    """`CallbackUrl` in the contract is this module's pattern and length: one rule, two readers."""
    schema = load_contracts(REPO / "contracts").document["components"]["schemas"]["CallbackUrl"]
    assert schema["pattern"] == CALLBACK_URL_PATTERN
    assert schema["maxLength"] == MAX_URL_LENGTH


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.from_regex(CALLBACK_URL_PATTERN, fullmatch=True).filter(lambda u: len(u) <= 2048))
def test_every_url_the_contract_allows_is_accepted_and_parses(url):
    """No URL the contract accepts is refused at submit to a host the operator allows (an
    address literal must also be public unless listed), or unreadable for the HTTP client."""
    assert callback_url_error(url, enabled=True, allowed=(httpx.URL(url).host,)) is None


# ---- delivery to a real receiver ---------------------------------------------------------------


class Recorder:
    """Stands in for asyncio.sleep and the metric: records instead of waiting or counting."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.outcomes: list[str] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def observe(self, outcome: str) -> None:
        self.outcomes.append(outcome)


def sender(recorder: Recorder, **options: object) -> CallbackSender:
    # The receivers listen on loopback, which only a listed host may reach.
    defaults: dict[str, object] = {
        "max_attempts": 4, "timeout_s": 2.0, "backoff_s": 0.5, "allowed": ("127.0.0.1",),
    }  # fmt: skip
    return CallbackSender(
        KEY,
        sleep=recorder.sleep,
        observe=recorder.observe,
        jitter=lambda: 0.0,
        **{**defaults, **options},  # type: ignore[arg-type]
    )


async def test_a_callback_refused_twice_with_503_arrives_once_accepted_and_verifies():
    """503, 503, then 200: three signed attempts, backoff between them, delivered once."""
    recorder = Recorder()
    async with Receiver([503, 503]) as receiver:
        callbacks = sender(recorder)
        delivery = await callbacks.deliver("p-1", receiver.url, BODY)
        await callbacks.close()
    assert (delivery.outcome, delivery.attempts, delivery.status) == ("delivered", 3, 200)
    assert len(receiver.received) == 3
    assert [r.headers["X-AIGW-Attempt"] for r in receiver.received] == ["1", "2", "3"]
    accepted = receiver.received[-1]
    assert accepted.body == BODY
    assert accepted.headers["X-AIGW-Prediction-Id"] == "p-1"
    timestamp = accepted.headers["X-AIGW-Timestamp"]
    assert verify(KEY, accepted.body, timestamp, accepted.headers["X-AIGW-Signature"],
                  now=int(timestamp))  # fmt: skip
    assert recorder.waits == [0.25, 0.5]
    assert recorder.outcomes == ["retry", "retry", "delivered"]


async def test_a_client_error_is_not_retried():
    """A 4xx other than 429 means the receiver will never take it: one attempt, rejected."""
    recorder = Recorder()
    async with Receiver([400]) as receiver:
        callbacks = sender(recorder)
        delivery = await callbacks.deliver("p-2", receiver.url, BODY)
        await callbacks.close()
    assert (delivery.outcome, delivery.attempts, delivery.status) == ("rejected", 1, 400)
    assert len(receiver.received) == 1
    assert recorder.waits == [] and recorder.outcomes == ["rejected"]


async def test_429_waits_at_least_the_receivers_retry_after():
    """A receiver's Retry-After lengthens the wait beyond the backoff step."""
    recorder = Recorder()
    async with Receiver([429], retry_after="3") as receiver:
        callbacks = sender(recorder)
        delivery = await callbacks.deliver("p-3", receiver.url, BODY)
        await callbacks.close()
    assert delivery.outcome == "delivered" and delivery.attempts == 2
    assert recorder.waits == [3.0]


async def test_an_unreachable_receiver_is_tried_a_bounded_number_of_times():
    """Connection refused every time: max_attempts tries, then the delivery is given up."""
    recorder = Recorder()
    callbacks = sender(recorder, max_attempts=3)
    delivery = await callbacks.deliver("p-4", f"http://127.0.0.1:{free_port()}/hook", BODY)
    await callbacks.close()
    assert (delivery.outcome, delivery.attempts, delivery.status) == ("exhausted", 3, None)
    assert recorder.waits == [0.25, 0.5]
    assert recorder.outcomes == ["retry", "retry", "exhausted"]


async def test_deliveries_beyond_the_bound_are_dropped_and_counted():
    """schedule never waits: past max_pending in flight, a delivery is dropped, not queued."""
    recorder = Recorder()
    async with Receiver() as receiver:
        callbacks = sender(recorder, max_pending=1)
        assert callbacks.schedule("p-5", receiver.url, {"prediction_id": "p-5"}) is True
        assert callbacks.schedule("p-6", receiver.url, {"prediction_id": "p-6"}) is False
        await receiver.wait_accepted()
        await callbacks.close()
    assert [r.headers["X-AIGW-Prediction-Id"] for r in receiver.received] == ["p-5"]
    assert sorted(recorder.outcomes) == ["delivered", "dropped"]


async def test_close_cancels_deliveries_still_retrying():
    """Shutdown does not wait out a receiver's outage: a delivery between attempts is dropped."""
    import asyncio

    recorder = Recorder()

    async def long_sleep(seconds: float) -> None:
        await asyncio.sleep(60)

    async with Receiver([503] * 10) as receiver:
        callbacks = CallbackSender(
            KEY, sleep=long_sleep, observe=recorder.observe, allowed=("127.0.0.1",)
        )
        callbacks.schedule("p-7", receiver.url, {"prediction_id": "p-7"})
        for _ in range(200):
            if receiver.received:
                break
            await asyncio.sleep(0.01)
        await callbacks.close(timeout_s=0.1)
    assert callbacks.pending == 0
    assert recorder.outcomes == ["retry", "dropped"]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True),
        ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False),
        ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space (CGNAT)
        ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False), ("ff02::1", False), ("240.0.0.1", False),
        # IPv6 carrying an IPv4 address, judged by that IPv4: NAT64 (well-known prefix), 6to4
        # (bits 16-48), IPv4-compatible, IPv4-translated (SIIT)
        ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::10.0.0.1", False), ("64:ff9b::8.8.8.8", True),
        ("2002:a9fe:a9fe::1", False), ("2002:7f00:1::1", False), ("2002:808:808::1", True),
        ("::a9fe:a9fe", False), ("::10.0.0.1", False), ("::8.8.8.8", True),
        ("::ffff:0:7f00:1", False), ("::ffff:0:a9fe:a9fe", False), ("::ffff:0:808:808", True),
        # local-use NAT64 and deprecated site-local: a network's own, whatever they carry
        ("64:ff9b:1::808:808", False), ("64:ff9b:1:ffff::1", False), ("fec0::1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("not-an-address", False), ("", False),
    ],
)  # fmt: skip
def test_which_addresses_count_as_public(address, public):
    assert is_public_address(address) is public


async def test_an_unlisted_loopback_receiver_is_refused_without_a_connection():
    """No allow-list: 127.0.0.1 and names resolving to it are refused at once, never retried."""
    recorder = Recorder()
    async with Receiver() as receiver:
        callbacks = sender(recorder, allowed=())
        by_address = await callbacks.deliver("p-8", receiver.url, BODY)
        by_name = await callbacks.deliver(
            "p-9", receiver.url.replace("127.0.0.1", "localhost"), BODY
        )
        await callbacks.close()
    assert (by_address.outcome, by_address.attempts) == ("refused", 1)
    assert (by_name.outcome, by_name.attempts) == ("refused", 1)
    assert receiver.received == [] and recorder.waits == []
    assert recorder.outcomes == ["refused", "refused"]


def test_an_httpx_that_keeps_its_pool_elsewhere_refuses_to_send_callbacks(monkeypatch):
    """The destination check rides on httpx's private `_pool`: were a release to keep it
    elsewhere, callbacks would go out unchecked, so the sender refuses to be built."""
    built = httpx.AsyncHTTPTransport.__init__

    def without_pool(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        built(self, *args, **kwargs)
        self._connections = self.__dict__.pop("_pool")  # as a renamed attribute would be

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "__init__", without_pool)
    with pytest.raises(RuntimeError, match="private addresses"):
        CallbackSender(b"k" * 32)


async def test_a_listed_name_is_trusted_wherever_it_resolves():
    """`localhost` listed: the operator allowed it, so its loopback address is fine."""
    recorder = Recorder()
    async with Receiver() as receiver:
        callbacks = sender(recorder, allowed=("localhost",))
        delivery = await callbacks.deliver(
            "p-10", receiver.url.replace("127.0.0.1", "localhost"), BODY
        )
        await callbacks.close()
    assert delivery.outcome == "delivered" and len(receiver.received) == 1


def certificate_for(directory: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A TLS context serving a certificate for `name` only (no IP in it), and its CA's file."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.ext").write_text(f"subjectAltName=DNS:{name}\n")
    key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=aigw CA")
    openssl("req", *key[:3], "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={name}")
    signed_by_ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
    openssl("x509", "-req", "-in", "server.csr", *signed_by_ca, "-out", "server.pem",
            "-extfile", "san.ext")  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context, directory / "ca.pem"


@pytest.mark.parametrize(("certified", "outcome"), [("localhost", "delivered"),
                                                    ("elsewhere.test", "exhausted")])  # fmt: skip
async def test_https_to_the_checked_address_still_verifies_the_host_name(
    tmp_path, monkeypatch, certified, outcome
):
    """The connection goes to the address the gateway resolved and checked, while TLS checks
    the certificate against the URL's host name (a certificate for the IP would not do)."""
    tls, ca = certificate_for(tmp_path, certified)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # trust the test CA (httpx reads it)
    checked: list[str] = []

    def public_in_this_sandbox(text: str) -> bool:
        # Stands in for a public address: this machine has none but loopback.
        checked.append(text)
        return text == "127.0.0.1"

    monkeypatch.setattr(callbacks, "is_public_address", public_in_this_sandbox)
    recorder = Recorder()
    async with Receiver(tls=tls) as receiver:
        callbacks_sender = sender(recorder, allowed=(), max_attempts=1)
        url = receiver.url.replace("127.0.0.1", "localhost")
        delivery = await callbacks_sender.deliver("p-11", url, BODY)
        await callbacks_sender.close()
    assert delivery.outcome == outcome
    assert "127.0.0.1" in checked  # the name was resolved and its address checked
    if outcome == "delivered":
        assert receiver.received[0].headers["Host"].startswith("localhost:")
    else:
        assert receiver.received == []  # the handshake failed: nothing was sent
