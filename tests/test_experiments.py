"""Experiment statistics per arm, the feedback ledger, and the feedback and report endpoints."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager

from gateway.api.feedback import decision_in_record
from gateway.app import create_app
from gateway.audit import find_record, segment_files, verify
from gateway.confidence_sequences import difference_sequence
from gateway.demo.triton_process import free_port
from gateway.experiments import (
    UNRECORDED_MODEL,
    ArmStats,
    Decision,
    Experiments,
    difference_interval,
    verdict,
    wilson_interval,
)
from gateway.runtime import audit_log
from tests.conftest import CHURN_REQUEST, settings_for

MODEL = "customer-churn"
CONTROL_CHAIN = ["churn-gbm", "churn-logreg", "rules", "stale-cache", "default"]
CHALLENGER_CHAIN = ["churn-gbm-v2", "churn-logreg", "rules", "stale-cache", "default"]
PROBLEM = "application/problem+json"
PREMIUM = {"x-customer-tier": "premium"}

# --- Wilson score intervals -------------------------------------------------------------------

# Reference values from scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson"),
# an implementation independent of gateway.experiments.
WILSON_95 = [
    (0, 10, 0.0, 0.27753279986288926),
    (5, 10, 0.236593090512564, 0.7634069094874361),
    (10, 10, 0.7224672001371109, 1.0),
    (50, 100, 0.4038315303659956, 0.5961684696340044),
    (1, 3, 0.06149194472039626, 0.7923403991979523),
    (0, 1, 0.0, 0.7934506856227626),
    (95, 100, 0.8882495307680809, 0.978456320845632),
    (1, 1000, 0.00017654637062607809, 0.0056425585979579355),
]


@pytest.mark.parametrize(("successes", "trials", "low", "high"), WILSON_95)
def test_wilson_interval_matches_reference_values(successes, trials, low, high):
    """The 95% Wilson interval agrees with an independent implementation to 1e-6."""
    interval = wilson_interval(successes, trials)
    assert interval is not None
    assert interval == pytest.approx((low, high), abs=1e-6)


@pytest.mark.parametrize(
    ("successes", "trials"),
    [(k, n) for n in (1, 4, 10, 100, 1000) for k in (0, n // 2, n)],
)
def test_wilson_interval_contains_the_observed_proportion(successes, trials):
    """0 ≤ low ≤ successes/trials ≤ high ≤ 1, exactly, also at 0 and at every trial a success."""
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0


@pytest.mark.parametrize("trials", [0, -1])
def test_wilson_interval_without_trials_is_none(trials):
    """No trials, no interval."""
    assert wilson_interval(0, trials) is None


def test_wilson_interval_narrows_with_more_trials():
    """The same proportion over more trials gives a narrower interval."""
    widths = [hi - lo for lo, hi in (wilson_interval(n // 2, n) for n in (10, 100, 1000))]
    assert widths == sorted(widths, reverse=True)


# --- differences between two arms ------------------------------------------------------------

# Reference values from statsmodels' confint_proportions_2indep(k1, n1, k2, n2,
# method="newcomb", compare="diff"), an implementation independent of gateway.experiments; the
# first two are also in Newcombe (1998), Table II, method 10: (0.0524, 0.3339), (0.1705, 0.8090).
NEWCOMBE_95 = [
    (56, 70, 48, 80, 0.05243147240236498, 0.33387265403690614),
    (9, 10, 3, 10, 0.1705227239345029, 0.809017973535488),
    (6, 7, 2, 7, 0.05822792748231209, 0.8062496375242278),
    (5, 56, 0, 29, -0.038137147903536936, 0.19256001385511165),
    (0, 10, 0, 20, -0.1611251580528194, 0.27753279986288926),
    (10, 10, 0, 20, 0.6790860371419145, 1.0),
    (30, 100, 10, 40, -0.12220608236589223, 0.1944949278235626),
    (95, 100, 90, 100, -0.026272869479874825, 0.12962420365148347),
    (1, 1, 0, 1, -0.12210872068194178, 1.0),
]


@pytest.mark.parametrize(("k1", "n1", "k2", "n2", "low", "high"), NEWCOMBE_95)
def test_difference_interval_matches_reference_values(k1, n1, k2, n2, low, high):
    assert difference_interval(k1, n1, k2, n2) == pytest.approx((low, high), abs=1e-7)


@pytest.mark.parametrize(("n1", "n2"), [(0, 10), (10, 0), (0, 0)])
def test_difference_interval_needs_trials_on_both_sides(n1, n2):
    assert difference_interval(0, n1, 0, n2) is None


@pytest.mark.parametrize(
    ("interval", "expected"),
    [((0.01, 0.2), "higher"), ((-0.2, -0.01), "lower"), ((-0.1, 0.1), "not_shown"),
     ((0.0, 0.3), "not_shown"), (None, "not_shown")],
)  # fmt: skip
def test_a_difference_is_shown_only_when_its_interval_excludes_zero(interval, expected):
    assert verdict(interval) == expected


# --- Experiments ------------------------------------------------------------------------------


# What each arm asks first in policies/customer-churn.yaml, as the report names it.
ARM_MODELS = {"control": "churn_gbm:1", "challenger": "churn_gbm_v2:1"}


def decision(arm: str = "control", prediction: str = "stay", arm_model: str = "") -> Decision:
    return Decision(
        model_id=MODEL, arm=arm, prediction=prediction, tenant="default",
        arm_model=arm_model or ARM_MODELS[arm],
    )  # fmt: skip


def arm_reports(
    experiments: Experiments, siblings: tuple = (), arm_models: dict | None = None
) -> dict:
    return experiments.report(MODEL, arm_models or ARM_MODELS, siblings)


def answer(
    experiments: Experiments,
    prediction_id: str,
    arm: str = "control",
    prediction: str = "stay",
    latency_ms: float = 10.0,
    degraded: bool = False,
    cached: bool = False,
    arm_model: str = "",
) -> None:
    experiments.record_answer(
        prediction_id, decision(arm, prediction, arm_model), latency_ms, degraded, cached
    )


def test_report_counts_requests_latency_fallbacks_and_cache_hits_per_arm():
    """Each arm reports its own requests, cached answers, mean and max latency, fallback rate."""
    experiments = Experiments()
    answer(experiments, "p1", latency_ms=10.0)
    answer(experiments, "p2", latency_ms=30.0, degraded=True)
    answer(experiments, "p3", latency_ms=2.0, cached=True)
    answer(experiments, "p4", latency_ms=20.0)
    answer(experiments, "p5", arm="challenger", latency_ms=50.0, degraded=True)
    report = arm_reports(experiments)
    assert sorted(report) == ["challenger", "control"]
    control, challenger = report["control"], report["challenger"]
    assert (control["requests"], control["cached"]) == (4, 1)
    assert control["latency_ms_mean"] == 15.5
    assert control["latency_ms_max"] == 30.0
    assert control["fallback_rate"] == 0.25
    assert control["fallback_rate_ci95"] == pytest.approx(wilson_interval(1, 4))
    assert (challenger["requests"], challenger["fallback_rate"]) == (1, 1.0)


def test_report_without_feedback_has_no_rates():
    """Before any outcome arrives, outcome rate and accuracy are None, not 0."""
    experiments = Experiments()
    answer(experiments, "p1")
    control = arm_reports(experiments)["control"]
    assert control["feedback"] == 0
    assert (control["outcome_rate"], control["outcome_rate_ci95"]) == (None, None)
    assert (control["accuracy"], control["accuracy_ci95"]) == (None, None)
    assert control["shadows"] == {}


def test_an_arm_without_traffic_reports_its_model_and_zero_requests():
    """Every arm the policy names is reported, before its first answer too: its model, zero
    requests, no rates, no earlier models."""
    control = arm_reports(Experiments())["control"]
    assert (control["model"], control["requests"], control["earlier_models"]) == (
        "churn_gbm:1", 0, {},
    )  # fmt: skip
    assert (control["fallback_rate"], control["accuracy"], control["latency_ms_mean"]) == (
        None, None, None,
    )  # fmt: skip


def test_outcomes_give_outcome_rate_and_accuracy_per_arm():
    """Outcomes count toward the arm that answered: positive share and share predicted right."""
    experiments = Experiments()
    answers = [("p1", "churn"), ("p2", "stay"), ("p3", "stay"), ("p4", "churn")]
    outcomes = ["churn", "stay", "churn", "stay"]
    for (prediction_id, prediction), outcome in zip(answers, outcomes, strict=True):
        answer(experiments, prediction_id, prediction=prediction)
        assert experiments.record_outcome(prediction_id, outcome, "churn") == "recorded"
    answer(experiments, "q1", arm="challenger", prediction="churn")
    assert experiments.record_outcome("q1", "churn", "churn") == "recorded"

    report = arm_reports(experiments)
    control, challenger = report["control"], report["challenger"]
    assert (control["feedback"], control["outcome_rate"], control["accuracy"]) == (4, 0.5, 0.5)
    assert control["accuracy_ci95"] == pytest.approx(wilson_interval(2, 4))
    assert (challenger["feedback"], challenger["outcome_rate"], challenger["accuracy"]) == (
        1, 1.0, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("prediction_id", "expected"),
    [("p1", "duplicate"), ("never-seen", "unknown")],
)
def test_record_outcome_statuses(prediction_id, expected):
    """A second outcome for one prediction is `duplicate`, an id not in the ledger `unknown`;
    neither is counted."""
    experiments = Experiments()
    answer(experiments, "p1")
    assert experiments.record_outcome("p1", "churn", "churn") == "recorded"
    assert experiments.record_outcome(prediction_id, "stay", "churn") == expected
    control = arm_reports(experiments)["control"]
    assert (control["feedback"], control["outcome_rate"]) == (1, 1.0)


def test_ledger_is_bounded_and_forgets_the_oldest():
    """With ledger_size=3, a fourth answer pushes out the first: its outcome is `unknown`."""
    experiments = Experiments(ledger_size=3)
    for prediction_id in ("p1", "p2", "p3", "p4"):
        answer(experiments, prediction_id)
    assert experiments.decision("p1") is None
    assert experiments.record_outcome("p1", "churn", "churn") == "unknown"
    assert [experiments.record_outcome(p, "churn", "churn") for p in ("p2", "p3", "p4")] == [
        "recorded"
    ] * 3
    assert arm_reports(experiments)["control"]["requests"] == 4  # statistics keep counting


def test_judged_ids_are_bounded_like_the_ledger():
    """The judged ids are the latest `ledger_size`: a judged id that left the ledger is still
    a duplicate until later outcomes push it out, and the set does not grow past that."""
    experiments = Experiments(ledger_size=2)
    answer(experiments, "p1")
    assert experiments.record_outcome("p1", "churn", "churn") == "recorded"
    answer(experiments, "p2")
    answer(experiments, "p3")
    assert experiments.decision("p1") is None
    p1 = Decision(MODEL, "control", "stay", "t")  # as the audit trail would give it
    assert experiments.record_outcome("p1", "churn", "churn", p1) == "duplicate"
    for prediction_id in ("p2", "p3"):
        assert experiments.record_outcome(prediction_id, "churn", "churn") == "recorded"
    assert list(experiments._judged) == ["p2", "p3"]


def test_a_decision_found_elsewhere_is_judged_once_under_its_arm():
    """An id the ledger never held is judged by the decision handed in (from the audit
    trail): counted once, under that decision's arm, against its prediction."""
    experiments = Experiments()
    elsewhere = Decision(MODEL, "challenger", "stay", "t", "churn-gbm-v2:1", 0.2, "churn_gbm_v2:1")
    assert experiments.record_outcome("p9", "churn", "churn", elsewhere) == "recorded"
    assert experiments.record_outcome("p9", "stay", "churn", elsewhere) == "duplicate"
    challenger = arm_reports(experiments)["challenger"]
    assert (challenger["requests"], challenger["feedback"]) == (0, 1)
    assert (challenger["outcome_rate"], challenger["accuracy"]) == (1.0, 0.0)


def test_every_arm_but_the_first_is_compared_with_the_first():
    """The challenger against the control (the policy's first arm): differences of accuracy
    and fallback rate with their intervals, and whether each shows a difference."""
    experiments = Experiments()
    for n in range(40):  # control: right 20 times in 40, one fallback in 4
        answer(experiments, f"c{n}", "control", "churn", degraded=n % 4 == 0)
        experiments.record_outcome(f"c{n}", "churn" if n % 2 else "stay", "churn")
    for n in range(40):  # challenger: right 36 times in 40, never a fallback
        answer(experiments, f"h{n}", "challenger", "churn")
        experiments.record_outcome(f"h{n}", "churn" if n % 10 else "stay", "churn")
    reports = arm_reports(experiments)
    assert "versus" not in reports["control"]
    versus = reports["challenger"]["versus"]
    assert versus["arm"] == "control"
    assert versus["accuracy_difference"] == 0.4
    assert versus["accuracy_difference_ci95"] == pytest.approx(difference_interval(36, 40, 20, 40))
    assert (versus["accuracy"], versus["fallback_rate_difference"]) == ("higher", -0.25)
    assert versus["fallback_rate"] == "lower"
    # Valid at any look, the sequence is wider: 40 outcomes a side show neither gap yet.
    assert versus["accuracy_difference_anytime95"] == pytest.approx(
        difference_sequence(36, 40, 20, 40)
    )
    assert (versus["accuracy_anytime"], versus["fallback_rate_anytime"]) == ("not_shown",) * 2


def test_a_comparison_without_outcomes_shows_nothing():
    """Before feedback on both sides there is no accuracy difference to show."""
    experiments = Experiments()
    answer(experiments, "h1", "challenger", "churn")
    versus = arm_reports(experiments)["challenger"]["versus"]
    assert (versus["accuracy_difference"], versus["accuracy_difference_ci95"]) == (None, None)
    assert (versus["accuracy"], versus["fallback_rate"]) == ("not_shown", "not_shown")
    assert (versus["accuracy_difference_anytime95"], versus["accuracy_anytime"]) == (
        None, "not_shown",
    )  # fmt: skip


def test_a_new_model_behind_an_arm_starts_its_counts_afresh():
    """The challenger's model moves from v2 to v3: v3 reports its own answers and accuracy,
    v2's are reported apart, and an outcome for a v2 answer that arrives after the move is
    counted for v2, never in v3's accuracy."""
    experiments = Experiments()
    for n in range(3):
        answer(experiments, f"v2-{n}", "challenger", "churn", arm_model="churn_gbm_v2:1")
    assert experiments.record_outcome("v2-0", "churn", "churn") == "recorded"
    answer(experiments, "v3-0", "challenger", "stay", arm_model="churn_gbm_v3:1")
    assert experiments.record_outcome("v3-0", "stay", "churn") == "recorded"
    assert experiments.record_outcome("v2-1", "stay", "churn") == "recorded"  # after the move

    moved = {**ARM_MODELS, "challenger": "churn_gbm_v3:1"}
    challenger = arm_reports(experiments, arm_models=moved)["challenger"]
    assert challenger["model"] == "churn_gbm_v3:1"
    assert (challenger["requests"], challenger["feedback"], challenger["accuracy"]) == (1, 1, 1.0)
    v2 = challenger["earlier_models"]["churn_gbm_v2:1"]
    assert (v2["requests"], v2["feedback"], v2["accuracy"]) == (3, 2, 0.5)
    assert list(challenger["earlier_models"]) == ["churn_gbm_v2:1"]


def test_statistics_kept_before_arm_models_are_reported_as_unrecorded():
    """Totals from a process that kept arms without their model (a predecessor's file, the
    shared hash) are counted in as `unrecorded`, apart from the current model's."""
    older = {MODEL: {"control": {**ArmStats(requests=2, feedback=1, correct=1).as_plain()}}}
    experiments = Experiments()
    experiments.add_totals(older)
    answer(experiments, "p1")
    control = arm_reports(experiments)["control"]
    assert control["requests"] == 1
    assert control["earlier_models"][UNRECORDED_MODEL]["requests"] == 2


AUDITED = {
    "type": "prediction", "prediction_id": "p1", "tenant": "acme", "model_id": MODEL,
    "arm": "challenger", "served_by": "churn-gbm-v2", "model_version": "1",
    "prediction": "churn", "probability": 0.81,
}  # fmt: skip


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (AUDITED, Decision(MODEL, "challenger", "churn", "acme", "churn-gbm-v2:1", 0.81)),
        ({**AUDITED, "type": "admin"}, None),
        ({k: v for k, v in AUDITED.items() if k != "arm"}, None),
        ({**AUDITED, "probability": "high"}, None),
        ({**AUDITED, "served_by": "rules", "model_version": "2024-06"},
         Decision(MODEL, "challenger", "churn", "acme", "rules:2024-06", 0.81)),
        ({**AUDITED, "arm_model": "churn_gbm_v2:1"},
         Decision(MODEL, "challenger", "churn", "acme", "churn-gbm-v2:1", 0.81, "churn_gbm_v2:1")),
    ],
    ids=["before-arm-models", "admin-record", "no-arm", "bad-probability", "rules", "arm-model"],
)  # fmt: skip
def test_the_decision_an_audit_record_holds(record, expected):
    """A prediction record gives the decision feedback judges; any other record gives none."""
    assert decision_in_record(record) == expected


def test_a_report_counts_in_the_siblings_statistics():
    """Two workers' statistics: the report adds up counts, takes the larger maximum latency,
    and adds shadow comparisons; an arm only a sibling saw is reported too."""
    mine, theirs = Experiments(), Experiments()
    answer(mine, "p1", latency_ms=10.0)
    answer(theirs, "p2", latency_ms=30.0, degraded=True)
    answer(theirs, "p3", arm="challenger", latency_ms=5.0)
    assert mine.record_outcome("p1", "churn", "churn") == "recorded"
    mine.record_shadow(MODEL, "control", ARM_MODELS["control"], "churn-logreg", True)
    theirs.record_shadow(MODEL, "control", ARM_MODELS["control"], "churn-logreg", False)
    report = arm_reports(mine, [theirs.totals()])
    control = report["control"]
    assert (control["requests"], control["latency_ms_mean"], control["latency_ms_max"]) == (
        2, 20.0, 30.0,
    )  # fmt: skip
    assert (control["fallback_rate"], control["feedback"], control["outcome_rate"]) == (
        0.5, 1, 1.0,
    )  # fmt: skip
    assert control["shadows"]["churn-logreg"]["agreement"] == 0.5
    assert report["challenger"]["requests"] == 1
    assert arm_reports(mine)["control"]["requests"] == 1  # its own, unchanged by reporting


def test_totals_carry_every_statistic_and_add_back_up():
    """`totals` is plain data (JSON-able); `add_totals` counts it in: a worker's successor
    continues from where it stopped."""
    first = Experiments()
    answer(first, "p1", degraded=True, cached=True)
    first.record_outcome("p1", "stay", "churn")
    first.record_shadow(MODEL, "control", ARM_MODELS["control"], "churn-logreg", None)
    successor = Experiments()
    successor.add_totals(orjson.loads(orjson.dumps(first.totals())))
    answer(successor, "p2")
    assert arm_reports(successor)["control"] == {
        **arm_reports(first)["control"],
        "requests": 2, "fallback_rate": 0.5, "fallback_rate_ci95": wilson_interval(1, 2),
    }  # fmt: skip


@pytest.mark.parametrize(
    "plain",
    [
        {"requests": -1},
        {"requests": "many"},
        {"shadows": {"churn-logreg": {"compared": 1, "unknown": 2}}},
        {"requests": None},
    ],
    ids=["negative", "string", "unknown-shadow-field", "null"],
)
def test_statistics_that_are_not_statistics_are_refused(plain):
    """What a damaged file could hold is refused, never counted in."""
    sound = Experiments()
    answer(sound, "p1")
    totals = sound.totals()
    totals[MODEL]["control@churn_gbm:1"].update(plain)
    with pytest.raises((TypeError, ValueError)):
        Experiments().add_totals(totals)


def test_shadow_agreement_and_failures_per_target():
    """Shadow comparisons give agreement among answered copies; failures are counted apart."""
    experiments = Experiments()
    for agreed in (True, True, False, None, True):
        experiments.record_shadow(MODEL, "control", ARM_MODELS["control"], "churn-logreg", agreed)
    experiments.record_shadow(MODEL, "challenger", ARM_MODELS["challenger"], "churn-logreg", None)
    report = arm_reports(experiments)
    shadow = report["control"]["shadows"]["churn-logreg"]
    assert (shadow["compared"], shadow["failed"], shadow["agreement"]) == (4, 1, 0.75)
    assert shadow["agreement_ci95"] == pytest.approx(wilson_interval(3, 4))
    only_failed = report["challenger"]["shadows"]["churn-logreg"]
    assert (only_failed["compared"], only_failed["failed"], only_failed["agreement"]) == (
        0,
        1,
        None,
    )
    assert report["challenger"]["requests"] == 0


# --- the API ----------------------------------------------------------------------------------


def closed_triton() -> dict[str, str]:
    """A Triton address nothing listens on: every prediction is a (degraded) fallback."""
    return {"AIGW_TRITON_URL": f"127.0.0.1:{free_port()}"}


async def predict(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> dict:
    response = await client.post("/v1/predictions", json=CHURN_REQUEST, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


async def feedback(client: httpx.AsyncClient, prediction_id: Any, outcome: Any) -> httpx.Response:
    return await client.post(
        "/v1/feedback", json={"prediction_id": prediction_id, "outcome": outcome}
    )


def assert_problem(response: httpx.Response, status: int, pointer: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    if pointer is not None:
        assert pointer in [e.get("pointer") for e in body.get("errors", [])], body
    return body


async def test_feedback_is_recorded_under_the_arm_that_answered(gateway_client):
    """Feedback on a prediction just made is 202 and counts in that prediction's arm."""
    async with gateway_client(env=closed_triton()) as client:
        premium = await predict(client, PREMIUM)
        assert premium["arm"] == "challenger"
        response = await feedback(client, premium["prediction_id"], "churn")
        assert response.status_code == 202, response.text
        assert response.json() == {"prediction_id": premium["prediction_id"], "status": "recorded"}

        report = (await client.get(f"/v1/experiments/{MODEL}")).json()
    challenger = report["arms"]["challenger"]
    assert (challenger["requests"], challenger["feedback"]) == (1, 1)
    assert challenger["outcome_rate"] == 1.0
    assert challenger["accuracy"] == (1.0 if premium["prediction"] == "churn" else 0.0)
    assert report["arms"]["control"].get("feedback", 0) == 0


async def test_feedback_counts_in_each_arm_separately(gateway_client):
    """One prediction per arm, each judged: each arm reports exactly its own outcome."""
    async with gateway_client(env=closed_triton()) as client:
        split = await predict(client)  # customer 12345 is in control's buckets
        premium = await predict(client, PREMIUM)
        assert (split["arm"], premium["arm"]) == ("control", "challenger")
        assert (await feedback(client, split["prediction_id"], "stay")).status_code == 202
        assert (await feedback(client, premium["prediction_id"], "churn")).status_code == 202
        arms = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
    assert (arms["control"]["feedback"], arms["control"]["outcome_rate"]) == (1, 0.0)
    assert (arms["challenger"]["feedback"], arms["challenger"]["outcome_rate"]) == (1, 1.0)
    assert arms["control"]["fallback_rate"] == 1.0  # Triton is closed: every answer degraded


async def test_feedback_for_an_unknown_prediction_is_404(gateway_client):
    """A well-formed id the gateway never issued is a 404 problem."""
    async with gateway_client(env=closed_triton()) as client:
        response = await feedback(client, str(uuid.uuid4()), "churn")
    body = assert_problem(response, 404)
    assert body["type"].endswith(":unknown-prediction")


async def test_duplicate_feedback_is_409(gateway_client):
    """A second outcome for the same prediction is refused with 409 and is not counted."""
    async with gateway_client(env=closed_triton()) as client:
        prediction_id = (await predict(client))["prediction_id"]
        assert (await feedback(client, prediction_id, "churn")).status_code == 202
        response = await feedback(client, prediction_id, "stay")
        arms = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
    body = assert_problem(response, 409)
    assert body["type"].endswith(":duplicate-feedback")
    assert (arms["control"]["feedback"], arms["control"]["outcome_rate"]) == (1, 1.0)


async def test_feedback_after_a_restart_is_judged_from_the_audit_trail(gateway_client, tmp_path):
    """The ledger lives in memory; a prediction answered before a restart (or by a sibling
    worker) is read from the audit trail: 202, once, under the arm that answered it."""
    audit = tmp_path / "audit"
    async with gateway_client(env=closed_triton(), audit_dir=audit) as client:
        premium = await predict(client, PREMIUM)
    async with gateway_client(env=closed_triton(), audit_dir=audit) as client:
        response = await feedback(client, premium["prediction_id"], "churn")
        again = await feedback(client, premium["prediction_id"], "stay")
        arms = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
    assert response.status_code == 202, response.text
    assert_problem(again, 409)
    challenger = arms["challenger"]
    assert (challenger.get("requests"), challenger["feedback"]) == (0, 1)  # answered earlier
    assert challenger["outcome_rate"] == 1.0
    assert arms["control"].get("feedback", 0) == 0


async def test_an_outcome_taken_is_in_the_audit_trail_beside_its_prediction(
    gateway_client, tmp_path
):
    """Each outcome counted leaves a record in the hash chain: what it judged, who said it,
    whether the answer was right; the prediction's own record is still the one found by id."""
    audit = tmp_path / "audit"
    async with gateway_client(env=closed_triton(), audit_dir=audit) as client:
        answer = await predict(client)
        assert (await feedback(client, answer["prediction_id"], "churn")).status_code == 202
        assert (await feedback(client, answer["prediction_id"], "churn")).status_code == 409
    entries = [orjson.loads(line) for _, seg in segment_files(audit) for line in seg.open("rb")]
    [record] = [e for e in entries if e.get("type") == "feedback"]  # the 409 left none
    assert record["of_prediction"] == answer["prediction_id"]
    assert (record["arm"], record["prediction"], record["outcome"]) == (
        answer["arm"], answer["prediction"], "churn",
    )  # fmt: skip
    assert record["correct"] is (answer["prediction"] == "churn")
    assert (record["tenant"], record["model_id"]) == ("default", MODEL)  # authentication off
    assert find_record(audit, answer["prediction_id"])["type"] == "prediction"
    assert verify(audit).ok


async def test_an_outcome_the_trail_refuses_is_503_uncounted_and_taken_on_retry(data_dirs):
    """The audit log refuses records: the outcome is 503 with Retry-After and not counted;
    once the log is back the same outcome is taken (its claim was released)."""
    settings = settings_for(data_dirs)
    app = create_app(settings, env=closed_triton())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            runtime = app.state.runtime
            answer = await predict(client)
            await runtime.audit.close()  # a closed log refuses every record, as a full disk does
            refused = await feedback(client, answer["prediction_id"], "churn")
            counted = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
            runtime.audit = audit_log(settings)
            await runtime.audit.open()
            retried = await feedback(client, answer["prediction_id"], "churn")
            recounted = (await client.get(f"/v1/experiments/{MODEL}")).json()["arms"]
    body = assert_problem(refused, 503)
    assert refused.headers["retry-after"] == "1" and body["type"].endswith("audit-unavailable")
    assert counted[answer["arm"]].get("feedback", 0) == 0
    assert retried.status_code == 202, retried.text
    assert recounted[answer["arm"]]["feedback"] == 1


@pytest.mark.parametrize("outcome", ["cancelled", "Churn", "STAY"])
async def test_feedback_outcome_must_be_a_label(gateway_client, outcome):
    """An outcome that is not one of the model's labels is 422 pointing at /outcome."""
    async with gateway_client(env=closed_triton()) as client:
        prediction_id = (await predict(client))["prediction_id"]
        response = await feedback(client, prediction_id, outcome)
        again = await feedback(client, prediction_id, "churn")
    assert_problem(response, 422, "/outcome")
    assert again.status_code == 202  # the refused outcome did not use up the prediction


@pytest.mark.parametrize(
    ("prediction_id", "pointer"),
    [
        ("not-a-uuid", "/prediction_id"),
        ("", "/prediction_id"),
        (12345, "/prediction_id"),
        (str(uuid.uuid4()) + "0", "/prediction_id"),
    ],
    ids=["words", "empty", "number", "too-long"],
)
async def test_malformed_prediction_id_is_422(gateway_client, prediction_id, pointer):
    """A prediction_id that is not a UUID string is 422 pointing at /prediction_id."""
    async with gateway_client(env=closed_triton()) as client:
        response = await feedback(client, prediction_id, "churn")
    assert_problem(response, 422, pointer)


@pytest.mark.parametrize(
    ("payload", "pointer"),
    [
        ({"outcome": "churn"}, "/prediction_id"),
        ({"prediction_id": "00000000-0000-4000-8000-000000000000"}, "/outcome"),
        (
            {"prediction_id": "00000000-0000-4000-8000-000000000000", "outcome": "churn", "x": 1},
            "/x",
        ),
    ],
    ids=["no-prediction-id", "no-outcome", "extra-field"],
)
async def test_feedback_body_must_match_the_contract(gateway_client, payload, pointer):
    """Missing or extra fields in the feedback body are 422 naming each field."""
    async with gateway_client(env=closed_triton()) as client:
        response = await client.post("/v1/feedback", json=payload)
    assert_problem(response, 422, pointer)


async def test_experiment_report_of_an_unknown_model_is_404(gateway_client):
    """A model without a policy has no experiment: 404 problem."""
    async with gateway_client(env=closed_triton()) as client:
        response = await client.get("/v1/experiments/unknown-model")
    body = assert_problem(response, 404)
    assert body["type"].endswith(":unknown-model")


async def test_experiment_report_lists_both_arms_with_weights_and_chains(gateway_client):
    """Before and after traffic, the report names both arms with their weight, chain and the
    model each asks first."""
    async with gateway_client(env=closed_triton()) as client:
        before = (await client.get(f"/v1/experiments/{MODEL}")).json()
        await predict(client)
        after = (await client.get(f"/v1/experiments/{MODEL}")).json()
    for report in (before, after):
        assert report["model_id"] == MODEL
        assert len(report["policy_version"]) == 16
        assert sorted(report["arms"]) == ["challenger", "control"]
        control, challenger = report["arms"]["control"], report["arms"]["challenger"]
        assert (control["weight"], control["chain"]) == (90, CONTROL_CHAIN)
        assert (challenger["weight"], challenger["chain"]) == (10, CHALLENGER_CHAIN)
        assert (control["model"], challenger["model"]) == ("churn_gbm:1", "churn_gbm_v2:1")
    assert after["arms"]["control"]["requests"] == 1
    assert before["arms"]["control"]["requests"] == 0
    assert after["arms"]["challenger"]["versus"]["arm"] == "control"  # the first arm
    assert "versus" not in after["arms"]["control"]
