"""Feedback from any replica: decisions kept in the audit stream's Redis (a real redis-server).

Replicas here are in-process gateways with audit directories of their own, as pods have, and
one Redis: the stream their audit forwarders ship to.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.api.feedback import decision_in_record
from gateway.audit import canonical_json, chained
from gateway.demo.triton_process import free_port
from gateway.shared_decisions import (
    DECISION_PREFIX,
    SharedDecisions,
    SharedDecisionsUnavailable,
    decision_entry,
    decision_of,
    entry_of,
    with_entry,
)
from tests.conftest import CHURN_REQUEST, RedisServer

PREDICTION = {
    "type": "prediction",
    "prediction_id": "p-1",
    "model_id": "customer-churn",
    "arm": "control",
    "arm_model": "churn_gbm:1",
    "prediction": "churn",
    "probability": 0.8,
    "tenant": "acme",
    "served_by": "churn-gbm",
    "model_version": "1",
    "features": {"customer_id": "pseudonym", "tenure_months": 3},
    "chain": [{"step": "churn-gbm", "outcome": "ok"}],
}


KEPT = ["control", "customer-churn", "1", "churn", 0.8, "churn-gbm", "acme", "churn_gbm:1"]


@pytest.mark.parametrize(
    ("record", "kept"),
    [
        (PREDICTION, [*KEPT]),
        # written before records named the arm's model: kept as `unrecorded`
        ({k: v for k, v in PREDICTION.items() if k != "arm_model"}, [*KEPT[:-1], "unrecorded"]),
        ({**PREDICTION, "type": "policy_applied"}, None),
        ({k: v for k, v in PREDICTION.items() if k != "arm"}, None),
        ({"type": "checkpoint", "seq": 3}, None),
        ({k: v for k, v in PREDICTION.items() if k != "prediction_id"}, None),
        ({**PREDICTION, "prediction_id": 7}, None),
    ],
)  # fmt: skip
def test_what_is_kept_of_a_record_is_the_decision_without_its_features(record, kept):
    entry = decision_entry(record)
    if kept is None:
        assert entry is None
        return
    assert entry is not None
    prediction_id, value = entry
    assert prediction_id == "p-1"
    assert orjson.loads(value) == kept
    restored = decision_of(value)
    assert restored is not None
    assert decision_in_record(restored) == decision_in_record(record) is not None


@pytest.mark.parametrize("value", [b"{not json", b"[1, 2]", b'{"arm": "control"}', b"7"])
def test_a_damaged_value_is_no_decision(value):
    assert decision_of(value) is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("1765140000000-0", "1765140000000-0"),
        ("-", None),
        ("+", None),
        ("1765140000000", None),
        ("abc-1", None),
        ("1-2 3-4", None),
        (17, None),
    ],
)
def test_only_a_well_formed_stream_entry_is_asked_for(entry, expected):
    assert entry_of(orjson.dumps([*KEPT, entry])) == expected
    assert entry_of(orjson.dumps(KEPT)) is None  # a decision kept before entries were named


def test_a_decision_kept_before_arm_models_reads_as_unrecorded_with_its_entry():
    """A value a gateway wrote before it kept `arm_model` (seven fields and the entry id)
    still gives its decision and its entry, the arm model `unrecorded`, not the entry id."""
    older = orjson.dumps([*KEPT[:-1], "1765140000000-7"])
    assert decision_of(older)["arm_model"] == "unrecorded"
    assert decision_of(older)["tenant"] == "acme"
    assert entry_of(older) == "1765140000000-7"
    assert entry_of(orjson.dumps(KEPT)) is None  # today's fields without an entry


async def test_a_prediction_is_judged_once_across_replicas(redis_server):
    """Ten replicas asking at once for the same prediction: exactly one is first."""
    prediction_id = uuid.uuid4().hex
    replicas = [SharedDecisions(redis_server.url, ttl_s=60) for _ in range(10)]
    try:
        firsts = await asyncio.gather(*(r.first_judgement(prediction_id) for r in replicas))
        assert await replicas[0].find(prediction_id) is None  # judged is not a decision
    finally:
        await asyncio.gather(*(r.close() for r in replicas))
    assert sorted(firsts) == [False] * 9 + [True]


async def test_a_released_judgement_is_the_first_again(redis_server):
    """An outcome that could not be audited is released: its retry, at any replica, is taken."""
    prediction_id = uuid.uuid4().hex
    here, there = SharedDecisions(redis_server.url, 60), SharedDecisions(redis_server.url, 60)
    try:
        assert await here.first_judgement(prediction_id) is True
        await here.release(prediction_id)
        assert await there.first_judgement(prediction_id) is True
        assert await here.first_judgement(prediction_id) is False
    finally:
        await here.close()
        await there.close()


async def test_a_decision_is_found_as_kept_and_a_damaged_one_is_none(redis_server):
    prediction_id = uuid.uuid4().hex
    redis = aioredis.from_url(redis_server.url)
    shared = SharedDecisions(redis_server.url, ttl_s=60)
    try:
        _, value = decision_entry(PREDICTION)  # type: ignore[misc]
        await redis.set(DECISION_PREFIX + prediction_id, value)
        assert await shared.find(prediction_id) == decision_of(value)
        await redis.set(DECISION_PREFIX + prediction_id, b"[1, 2]")
        assert await shared.find(prediction_id) is None
    finally:
        await shared.close()
        await redis.aclose()


async def test_an_unreachable_redis_is_said_so_not_taken_for_unknown(unreachable_redis_url):
    shared = SharedDecisions(unreachable_redis_url, ttl_s=60)
    try:
        with pytest.raises(SharedDecisionsUnavailable):
            await shared.find("p-1")
        with pytest.raises(SharedDecisionsUnavailable):
            await shared.first_judgement("p-1")
    finally:
        await shared.close()


# --- replicas --------------------------------------------------------------------------------


def closed_triton() -> dict[str, str]:
    """Nothing listens: the rules answer, and the answer is audited like any other."""
    return {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


async def feedback(client: httpx.AsyncClient, prediction_id: str, outcome: str = "churn"):  # type: ignore[no-untyped-def]
    return await client.post(
        "/v1/feedback", json={"prediction_id": prediction_id, "outcome": outcome}
    )


async def until_shared(redis_url: str, prediction_id: str, within_s: float = 10.0) -> None:
    """Until the answering replica's forwarder has kept the decision (it polls every 0.2 s)."""
    redis = aioredis.from_url(redis_url)
    deadline = time.monotonic() + within_s
    try:
        while not await redis.exists(DECISION_PREFIX + prediction_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"{prediction_id} was not shared within {within_s} s")
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


@asynccontextmanager
async def answered_elsewhere(gateway_client, redis_url: str):  # type: ignore[no-untyped-def]
    """Two replicas shipping to one stream, and an answer of the first, shared by now:
    yields (first, second, the answer)."""
    shared = {"audit_stream_url": redis_url}
    async with (
        gateway_client(env=closed_triton(), **shared) as a,
        gateway_client(env=closed_triton(), **shared) as b,
    ):
        answer = (await a.post("/v1/predictions", json=CHURN_REQUEST)).json()
        await until_shared(redis_url, answer["prediction_id"])
        yield a, b, answer


async def test_feedback_reaches_the_decision_of_another_replica_once(gateway_client, redis_server):
    """Replica A answers; the outcome reaches replica B, which has neither the answer in its
    ledger nor in its audit log: 202, counted under A's arm; the same outcome again, at A or
    at B, is 409."""
    async with answered_elsewhere(gateway_client, redis_server.url) as (a, b, answer):
        prediction_id = answer["prediction_id"]

        taken = await feedback(b, prediction_id)
        again_at_a, again_at_b = await feedback(a, prediction_id), await feedback(b, prediction_id)
        report = (await b.get("/v1/experiments/customer-churn")).json()
    assert taken.status_code == 202, taken.text
    assert (again_at_a.status_code, again_at_b.status_code) == (409, 409)
    assert report["arms"][answer["arm"]]["feedback"] == 1


async def test_without_decisions_kept_feedback_elsewhere_is_unknown(gateway_client, redis_server):
    """`AIGW_SHARED_DECISIONS_TTL_S=0`: the records still ship, no decision is kept, and the
    other replica does not know the answer (what every replica said before decisions were
    shared)."""
    shared = {"audit_stream_url": redis_server.url, "shared_decisions_ttl_s": 0}
    async with (
        gateway_client(env=closed_triton(), **shared) as a,
        gateway_client(env=closed_triton(), **shared) as b,
    ):
        prediction_id = (await a.post("/v1/predictions", json=CHURN_REQUEST)).json()[
            "prediction_id"
        ]
        with pytest.raises(AssertionError, match="not shared"):
            await until_shared(redis_server.url, prediction_id, within_s=1.0)
        elsewhere = await feedback(b, prediction_id)
        here = await feedback(a, prediction_id)
    assert elsewhere.status_code == 404
    assert here.status_code == 202


async def test_feedback_while_the_shared_redis_is_down_is_503_then_taken(gateway_client):
    """The stream's Redis stops: feedback the replica cannot settle is 503 with Retry-After
    (not 404, not counted); once Redis is back the same outcome is taken."""
    redis = RedisServer(free_port())
    redis.start()
    try:
        async with gateway_client(env=closed_triton(), audit_stream_url=redis.url) as client:
            prediction_id = (await client.post("/v1/predictions", json=CHURN_REQUEST)).json()[
                "prediction_id"
            ]
            redis.stop()
            unknown, known = (
                await feedback(client, str(uuid.uuid4())),
                await feedback(client, prediction_id),
            )
            redis.start()
            retried = await feedback(client, prediction_id)
    finally:
        redis.stop()
    for refused in (unknown, known):
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.headers["retry-after"] == "1"
    assert retried.status_code == 202, retried.text


async def test_any_replica_shows_the_answer_and_its_explanation(gateway_client, redis_server):
    """Replica A answers; B, whose own trail lacks it, serves `GET /v1/predictions/{id}`
    (the same envelope) and its explanation (A's audit record, read from the stream)."""
    async with answered_elsewhere(gateway_client, redis_server.url) as (_, b, answer):
        prediction_id = answer["prediction_id"]
        again = await b.get(f"/v1/predictions/{prediction_id}")
        explained = await b.get(f"/v1/predictions/{prediction_id}/explanation")
    assert again.status_code == 200, again.text
    assert {k: v for k, v in again.json().items() if k != "latency_ms"} == {
        k: v for k, v in answer.items() if k != "latency_ms"
    }
    assert explained.status_code == 200, explained.text
    record = explained.json()
    assert (record["type"], record["prediction_id"], record["arm"]) == (
        "prediction", prediction_id, answer["arm"],
    )  # fmt: skip
    assert record["steps"][-1]["step"] == record["served_by"] == answer["served_by"]


async def test_a_stream_line_that_was_altered_is_no_record(redis_server):
    """The decision names a stream entry whose line no longer matches its hash: not found."""
    prediction_id = str(uuid.uuid4())
    stream = f"aigw:audit:test:{uuid.uuid4().hex}"
    redis = aioredis.from_url(redis_server.url)
    shared = SharedDecisions(redis_server.url, ttl_s=60, stream=stream)
    try:
        line = chained({**PREDICTION, "prediction_id": prediction_id}, seq=1, prev="0" * 64)
        honest = await redis.xadd(stream, {"line": canonical_json(line) + b"\n"})
        _, value = decision_entry({**PREDICTION, "prediction_id": prediction_id})  # type: ignore[misc]
        await redis.set(DECISION_PREFIX + prediction_id, with_entry(value, honest.decode()))
        assert (await shared.record(prediction_id))["hash"] == line["hash"]  # type: ignore[index]

        altered = await redis.xadd(
            stream, {"line": canonical_json({**line, "prediction": "stay"}) + b"\n"}
        )
        await redis.set(DECISION_PREFIX + prediction_id, with_entry(value, altered.decode()))
        assert await shared.record(prediction_id) is None
    finally:
        await shared.close()
        await redis.delete(stream, DECISION_PREFIX + prediction_id)
        await redis.aclose()


async def test_with_the_stream_away_another_replicas_answer_is_503_not_unknown(gateway_client):
    async with gateway_client(
        env=closed_triton(), audit_stream_url=f"redis://127.0.0.1:{free_port()}/0"
    ) as b:
        unknown_here = str(uuid.uuid4())
        answer = await b.get(f"/v1/predictions/{unknown_here}")
        explanation = await b.get(f"/v1/predictions/{unknown_here}/explanation")
    for refused in (answer, explanation):
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
