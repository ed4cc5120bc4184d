"""Idempotency keys: the header, the request fingerprint, and where claims are kept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.idempotency import (
    Claim,
    IdempotencyKey,
    IdempotencyKeyReused,
    KeptClaims,
    SharedClaims,
    Submitted,
    idempotency_key,
    key_from_header,
    key_scope,
    request_fingerprint,
    resolve,
)
from gateway.problems import Problem

ASKED = {"model_id": "m", "features": {"a": 1, "b": "x"}, "callback_url": None}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (None, None),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        ('"quoted-as-a-structured-field"', "quoted-as-a-structured-field"),
        ("  padded  ", "padded"),
        ("k" * 255, "k" * 255),
        ("with inner space", "with inner space"),
        ('""', '""'),  # not an empty quoted string: a two-character key
    ],
)
def test_usable_keys_are_taken_as_sent(raw, key):
    assert key_from_header(raw) == key


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "k" * 256, "clé", "tab\tinside", "nul\x00", "bell\x07", "\u2028"],
    ids=["empty", "blank", "too-long", "non-ascii", "tab", "nul", "bell", "ls"],
)
def test_unusable_keys_are_400_naming_the_header(raw):
    with pytest.raises(Problem) as refused:
        key_from_header(raw)
    problem = refused.value
    assert (problem.status, problem.slug) == (400, "invalid-header")
    assert [e.to_dict()["header"] for e in problem.errors] == ["Idempotency-Key"]


def test_a_key_is_scoped_by_tenant_and_stored_as_a_digest():
    """Two tenants' equal keys are different keys; no key is stored as sent."""
    acme, globex = key_scope("acme", "k-1"), key_scope("globex", "k-1")
    assert acme != globex
    assert acme == key_scope("acme", "k-1")
    assert "k-1" not in acme and len(acme) == 64
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert key_scope("ab", "c") != key_scope("a", "bc")


def test_the_fingerprint_reads_what_was_asked_not_how_it_was_written():
    """Feature order does not matter; any change to model, a feature or the callback does."""
    reordered = {"callback_url": None, "features": {"b": "x", "a": 1}, "model_id": "m"}
    assert request_fingerprint(reordered) == request_fingerprint(ASKED)
    changed = [
        {**ASKED, "model_id": "n"},
        {**ASKED, "features": {"a": 2, "b": "x"}},
        {**ASKED, "features": {"a": 1}},
        {**ASKED, "callback_url": "https://hooks.example/x"},
    ]
    fingerprints = {request_fingerprint(asked) for asked in changed}
    assert len(fingerprints) == 4 and request_fingerprint(ASKED) not in fingerprints


def test_a_claimed_key_replays_its_job_for_the_same_request_and_refuses_another():
    key = idempotency_key("k", tenant="acme", request=ASKED)
    assert resolve(key, Claim("p-1", key.fingerprint)) == Submitted("p-1", replayed=True)
    with pytest.raises(IdempotencyKeyReused):
        resolve(key, Claim("p-1", request_fingerprint({**ASKED, "model_id": "n"})))


def test_a_claim_reads_back_from_its_text():
    """As Redis stores it: the id, then the fingerprint."""
    claim = Claim("0f8fad5b-d9cb-469f-a165-70867728950e", "ab" * 32)
    assert Claim.from_text(claim.to_text()) == claim


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_kept_claims_go_to_the_first_claimer_for_the_keep_time():
    clock = Clock()
    claims = KeptClaims(limit=10, keep_s=60, clock=clock)
    first, second = Claim("p-1", "f"), Claim("p-2", "f")
    assert await claims.holder("s") is None
    assert await claims.claim("s", first) == first
    assert await claims.claim("s", second) == first
    clock.now = 59.9
    assert await claims.holder("s") == first
    clock.now = 60.0
    assert await claims.holder("s") is None  # expired: the key is free again
    assert await claims.claim("s", second) == second


async def test_kept_claims_are_bounded_and_released_only_by_their_holder():
    claims = KeptClaims(limit=3, keep_s=60, clock=Clock())
    for n in range(5):
        await claims.claim(f"s{n}", Claim(f"p-{n}", "f"))
    assert len(claims) == 3
    assert await claims.holder("s0") is None and await claims.holder("s4") is not None
    await claims.release("s4", Claim("p-other", "f"))  # not its holder: kept
    assert await claims.holder("s4") == Claim("p-4", "f")
    await claims.release("s4", Claim("p-4", "f"))
    assert await claims.holder("s4") is None


async def test_shared_claims_go_to_the_first_claimer_across_instances(tmp_path):
    """Two workers' views of one file: one claim, read the same by both."""
    one, two = SharedClaims(tmp_path, 100, 60), SharedClaims(tmp_path, 100, 60)
    first = Claim("p-1", "f1")
    assert await one.holder("s") is None
    assert await one.claim("s", first) == first
    assert await two.claim("s", Claim("p-2", "f2")) == first
    assert await two.holder("s") == first
    await two.release("s", Claim("p-2", "f2"))  # not its holder: kept
    assert await one.holder("s") == first
    await one.release("s", first)
    assert await two.holder("s") is None


async def test_an_expired_shared_claim_is_replaced(tmp_path):
    expired = SharedClaims(tmp_path, 100, keep_s=-1)  # every claim it makes is already old
    await expired.claim("s", Claim("p-old", "f"))
    live = SharedClaims(tmp_path, 100, keep_s=60)
    assert await live.holder("s") is None
    assert await live.claim("s", Claim("p-new", "f")) == Claim("p-new", "f")


async def test_shared_claims_trim_expired_and_excess_rows(tmp_path, monkeypatch):
    """The file stays bounded: every TRIM_EVERY claims, expired rows and all but `keep` go."""
    import gateway.idempotency as idempotency

    monkeypatch.setattr(idempotency, "TRIM_EVERY", 10)
    claims = SharedClaims(tmp_path, keep=5, keep_s=60)
    for n in range(10):
        await claims.claim(f"s{n}", Claim(f"p-{n}", "f"))
    rows = claims._connection().execute("SELECT scope FROM claims ORDER BY rowid").fetchall()
    assert [scope for (scope,) in rows] == [f"s{n}" for n in range(5, 10)]


RACE = """
import asyncio, sys
from pathlib import Path
from gateway.idempotency import Claim, SharedClaims
claims = SharedClaims(Path(sys.argv[1]), 100, 60)
print(asyncio.run(claims.claim("race", Claim(sys.argv[2], "f"))).prediction_id)
"""


def test_processes_racing_for_one_key_agree_on_one_holder(tmp_path):
    """Eight processes claim one key at once (as workers of one gateway would): one wins, and
    every one of them reads that one as the holder."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), f"p-{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    holders = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    assert len(holders) == 1 and holders <= {f"p-{n}" for n in range(8)}


def test_an_idempotency_key_names_scope_and_fingerprint():
    key = idempotency_key("k", tenant="acme", request=ASKED)
    assert key == IdempotencyKey(key_scope("acme", "k"), request_fingerprint(ASKED))
