"""Every answer is audited before it leaves, explainable by its id, and PII never in clear."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.app import create_app
from gateway.audit import AuditUnavailable, verify
from gateway.cli import main
from gateway.demo.triton_process import free_port
from gateway.problems import FaultsError
from tests.conftest import CHURN_REQUEST, REPO, settings_for


def nowhere() -> dict[str, str]:
    return {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


def audit_lines(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def churn_request(customer_id: str, tenure: int) -> dict:
    features = {"customer_id": customer_id, "tenure_months": tenure, "monthly_charges": 95.0}
    return {"model_id": "customer-churn", "features": features}


async def test_each_answer_has_one_record_that_explains_it(gateway_client, tmp_path):
    """One record per answer, with arm, steps tried and why, the rule, the answer."""
    async with gateway_client(env=nowhere(), audit_dir=tmp_path) as client:
        answers = [
            (await client.post("/v1/predictions", json=churn_request(f"c-{i}", 3))).json()
            for i in range(5)
        ]
        explained = await client.get(f"/v1/predictions/{answers[0]['prediction_id']}/explanation")
    records = [r for r in audit_lines(tmp_path) if r.get("type") == "prediction"]
    assert [r["prediction_id"] for r in records] == [a["prediction_id"] for a in answers]
    assert explained.status_code == 200
    record = explained.json()
    assert record["served_by"] == "rules" == answers[0]["served_by"]
    assert record["rule"] == "new-customer-high-bill"
    assert record["arm"] == answers[0]["arm"]
    assert record["fallback_reason"] == "backend_error"
    steps = [(s["step"], s["outcome"]) for s in record["steps"]]
    assert steps[0] == (record["steps"][0]["step"], "failed")
    assert steps[-1] == ("rules", "answered")
    assert record["policy_version"] and record["contract_version"] == "1.0.0"
    assert verify(tmp_path).ok


async def test_pii_features_are_never_written_in_clear(gateway_client, tmp_path):
    """`customer_id` (x-pii in the contract) appears only as a keyed hash."""
    secret_id = "CUSTOMER-SECRET-4711"
    async with gateway_client(env=nowhere(), audit_dir=tmp_path) as client:
        await client.post("/v1/predictions", json=churn_request(secret_id, 30))
    everything = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert secret_id.encode() not in everything
    (record,) = [r for r in audit_lines(tmp_path) if r.get("type") == "prediction"]
    assert record["features"]["customer_id"].startswith("hmac-sha256:")
    assert record["features"]["tenure_months"] == 30


async def test_unknown_prediction_ids_are_404(gateway_client, tmp_path):
    """Asking about a prediction that was never made gives a problem, not an error."""
    async with gateway_client(env=nowhere(), audit_dir=tmp_path) as client:
        unknown = await client.get(
            "/v1/predictions/00000000-0000-0000-0000-000000000000/explanation"
        )
        malformed = await client.get("/v1/predictions/../../etc/passwd/explanation")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert malformed.status_code == 404


async def test_no_answer_leaves_when_its_record_cannot_be_written(tmp_path):
    """A failing audit log turns answers into 503s: nothing is served unaudited."""
    app = create_app(settings_for(REPO, audit_dir=tmp_path), env=nowhere())
    async with LifespanManager(app) as manager:

        async def disk_failure(*args, **kwargs):
            # Stands in for a disk error; real write failures are pinned in tests/test_audit.py.
            raise AuditUnavailable("disk full")

        app.state.runtime.audit.append = disk_failure
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.post("/v1/predictions", json=CHURN_REQUEST)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "tamper",
    ["flip", "delete", "swap"],
)
async def test_aigw_audit_verify_names_the_place_of_tampering(
    gateway_client, tmp_path, capsys, tamper: str
):
    """`aigw audit verify` passes an intact log and names file:line of a tampered one."""
    async with gateway_client(env=nowhere(), audit_dir=tmp_path) as client:
        for i in range(6):
            await client.post("/v1/predictions", json=churn_request(f"v-{i}", i))
    assert main(["audit", "verify", str(tmp_path)]) == 0
    (segment,) = sorted(tmp_path.glob("audit-*.jsonl"))
    lines = segment.read_text().splitlines(keepends=True)
    if tamper == "flip":
        assert '"tenant":"default"' in lines[2]
        lines[2] = lines[2].replace('"tenant":"default"', '"tenant":"defaulT"')  # one character
    elif tamper == "delete":
        del lines[2]
    else:
        lines[2], lines[3] = lines[3], lines[2]
    segment.write_text("".join(lines))
    capsys.readouterr()
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert f"{segment.name}:3:" in capsys.readouterr().err


async def test_aigw_audit_verify_prints_the_head_and_checks_an_anchor(
    gateway_client, tmp_path, capsys
):
    """verify prints each log's head (`SEQ:HASH`) to keep elsewhere; `--anchor` with it
    fails once the log's tail was cut back past it, which the chain alone cannot show."""
    async with gateway_client(env=nowhere(), audit_dir=tmp_path) as client:
        for i in range(4):
            await client.post("/v1/predictions", json=churn_request(f"a-{i}", i))
    capsys.readouterr()
    assert main(["audit", "verify", str(tmp_path)]) == 0
    head = capsys.readouterr().out.rsplit("head ", 1)[1].strip()
    seq, digest = head.split(":")
    assert (int(seq), digest) == (verify(tmp_path).last_seq, verify(tmp_path).last_hash)
    assert main(["audit", "verify", str(tmp_path), "--anchor", head]) == 0
    (segment,) = sorted(tmp_path.glob("audit-*.jsonl"))
    segment.write_text("".join(segment.read_text().splitlines(keepends=True)[:-1]))
    assert main(["audit", "verify", str(tmp_path)]) == 0  # alone, a cut tail looks whole
    assert main(["audit", "verify", str(tmp_path), "--anchor", head]) == 1
    assert "records were cut off" in capsys.readouterr().err


@pytest.mark.parametrize("anchor", ["12", "x:" + "0" * 64, "3:" + "0" * 63, "3:" + "G" * 64])
def test_aigw_audit_verify_refuses_an_anchor_it_cannot_read(tmp_path, capsys, anchor):
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "verify", str(tmp_path), "--anchor", anchor])
    assert exit_.value.code == 2
    assert "--anchor: must be SEQ:HASH" in capsys.readouterr().err


async def test_a_gateway_does_not_start_on_a_log_another_process_writes(tmp_path):
    """One writer per log: a second gateway on the same AIGW_AUDIT_DIR stops before serving,
    naming the directory (two writers would interleave two chains in one log)."""
    settings = settings_for(REPO, audit_dir=tmp_path, watch_policies=False)
    first = create_app(settings, env=nowhere())
    async with LifespanManager(first):
        with pytest.raises(FaultsError, match=r"AIGW_AUDIT_DIR: .*another process writes"):
            create_app(settings, env=nowhere())
    create_app(settings, env=nowhere())  # free again once the first has stopped


async def test_records_are_shipped_to_the_redis_stream(gateway_client, tmp_path, redis_server):
    """With AIGW_AUDIT_STREAM_URL, every record reaches the shared stream, in order."""
    import asyncio

    import redis.asyncio as aioredis

    stream = aioredis.from_url(redis_server.url)
    await stream.delete("aigw:audit")
    try:
        async with gateway_client(
            env=nowhere(), audit_dir=tmp_path, audit_stream_url=redis_server.url
        ) as client:
            answers = [
                (await client.post("/v1/predictions", json=churn_request(f"s-{i}", i))).json()
                for i in range(5)
            ]
            for _ in range(100):
                if await stream.xlen("aigw:audit") >= 5:
                    break
                await asyncio.sleep(0.05)
        entries = await stream.xrange("aigw:audit")
    finally:
        await stream.aclose()
    shipped = [json.loads(fields[b"line"])["prediction_id"] for _, fields in entries]
    assert shipped == [a["prediction_id"] for a in answers]
