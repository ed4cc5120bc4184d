"""Monitoring: PSI, drift and quality windows, health statuses, baselines and the demo's file."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.demo.baseline import TARGET_MODELS, churn_baseline, render
from gateway.demo.data import make_churn_dataset
from gateway.demo.models import ChurnModels, churn_probability, train_churn_models
from gateway.monitoring import (
    Baseline,
    BaselineError,
    DriftWindow,
    Monitor,
    QualityWindow,
    VersionBaseline,
    load_baselines,
    psi,
)
from tests.conftest import REPO

MODEL = "customer-churn"
BASELINE_FILE = REPO / "baselines" / f"{MODEL}.json"
WINDOW_S = 300.0


@pytest.fixture(scope="module")
def models() -> ChurnModels:
    return train_churn_models(seed=7)


@pytest.fixture(scope="module")
def churn() -> Baseline:
    return load_baselines(BASELINE_FILE.parent)[MODEL]


def churn_traffic(
    models: ChurnModels, key: str, seed: int, n: int, charges_factor: float = 1.0
) -> Iterator[tuple[dict, float]]:
    """Requests as the gateway sees them: contract features and the served model's probability."""
    features, _ = make_churn_dataset(n=n, seed=seed)
    features[:, 1] *= charges_factor
    probabilities = churn_probability(getattr(models, TARGET_MODELS[key]), features).ravel()
    for (tenure, charges), probability in zip(
        features.tolist(), probabilities.tolist(), strict=True
    ):
        row = {
            "customer_id": "c",
            "tenure_months": int(tenure),
            "monthly_charges": round(charges, 2),
        }
        yield row, round(probability, 6)


def observe_spread(monitor: Monitor, key: str, traffic: list, start: float, arm="control") -> None:
    """Observe `traffic` evenly over one drift window starting at `start`."""
    step = WINDOW_S / len(traffic)
    for i, (features, probability) in enumerate(traffic):
        monitor.observe_prediction(MODEL, key, arm, features, probability, start + i * step)


# --- PSI ---------------------------------------------------------------------------------------

PSI_CASES = [
    # identical distributions
    ([0.5, 0.5], [50, 50], 0.0),
    ([0.1] * 10, [7] * 10, 0.0),
    # (0.6 − 0.5)·ln(0.6/0.5) + (0.4 − 0.5)·ln(0.4/0.5) = 0.1·ln 1.2 + 0.1·ln 1.25
    ([0.5, 0.5], [60, 40], 0.040546510810816),
    # an empty bin counts as 1e-4: (1e-4 − 0.25)·ln(1e-4/0.25) + (0.5 − 0.25)·ln 2
    ([0.25] * 4, [0, 50, 25, 25], 2.128515893252974),
    # a bin empty in both is floored on both sides and contributes nothing
    ([0.0, 1.0], [0, 10], 0.0),
]


@pytest.mark.parametrize(("expected", "counts", "value"), PSI_CASES)
def test_psi_matches_hand_computed_values(expected, counts, value):
    """PSI is 0 for identical shares, Σ (a − e)·ln(a/e) otherwise, with empty bins floored."""
    assert psi(expected, counts) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize(
    ("expected", "counts", "message"),
    [([0.5, 0.5], [1, 2, 3], "2 expected shares but 3 counts"), ([0.5, 0.5], [0, 0], "no obs")],
)
def test_psi_refuses_mismatched_or_empty_counts(expected, counts, message):
    """PSI needs one count per bin and at least one observation."""
    with pytest.raises(ValueError, match=message):
        psi(expected, counts)


# --- Drift on the demo models ------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(TARGET_MODELS))
@pytest.mark.parametrize("seed", [11, 12])
def test_training_distribution_keeps_every_psi_under_watch(models, churn, key, seed):
    """Traffic drawn like the training data keeps every feature's and the prediction's PSI < 0.1."""
    monitor = Monitor({MODEL: churn})
    observe_spread(monitor, key, list(churn_traffic(models, key, seed, n=1000)), start=0.0)
    stream = monitor.health(MODEL, now=WINDOW_S - 1)["versions"][key]["control"]
    drift = stream["drift"]
    assert drift["sample_size"] == 1000
    values = [e["psi"] for e in drift["features"].values()] + [drift["prediction"]["psi"]]
    assert all(v is not None and v < 0.1 for v in values), drift
    assert (stream["status"], stream["baseline"]) == ("ok", key)


def test_doubled_monthly_charges_drift_within_one_window(models, churn):
    """A window after monthly_charges doubles, its PSI is over 0.25 while tenure stays under 0.1."""
    key = "churn-gbm:1"
    monitor = Monitor({MODEL: churn})
    observe_spread(monitor, key, list(churn_traffic(models, key, seed=21, n=1000)), start=0.0)
    assert monitor.health(MODEL, now=WINDOW_S - 1)["status"] == "ok"
    doubled = list(churn_traffic(models, key, seed=22, n=1000, charges_factor=2.0))
    observe_spread(monitor, key, doubled, start=WINDOW_S)
    health = monitor.health(MODEL, now=2 * WINDOW_S - 1)
    features = health["versions"][key]["control"]["drift"]["features"]
    assert features["monthly_charges"]["psi"] > 0.25
    assert features["tenure_months"]["psi"] < 0.1
    assert health["status"] == "drifting"


# --- Windows -----------------------------------------------------------------------------------

# One feature split at 0 and a prediction split at 0.5, half and half.
HALVES = {
    "sample_size": 1000,
    "features": {"x": {"kind": "numeric", "edges": [0.0], "proportions": [0.5, 0.5]}},
    "prediction": {"edges": [0.5], "proportions": [0.5, 0.5]},
}


def halves_window(min_sample_size: int = 100) -> DriftWindow:
    return DriftWindow(VersionBaseline.model_validate(HALVES), WINDOW_S, 10, min_sample_size)


@pytest.mark.parametrize(
    ("now", "sample_size"),
    [
        (29.0, 200),  # inside the first sub-window, with only its own traffic
        (299.0, 400),  # both sub-windows are inside the window
        (300.0, 200),  # the first sub-window [0, 30) has aged out
        (329.0, 200),
        (450.0, 0),  # the second [150, 180) too
    ],
)
def test_old_sub_windows_age_out(now, sample_size):
    """The window counts the last ten 30 s sub-windows; older ones stop counting."""
    window = halves_window()
    for i in range(200):
        window.observe({"x": i % 2}, 0.25, now=i * 0.1)
        window.observe({"x": i % 2}, 0.25, now=150.0 + i * 0.1)
    assert window.report(now)["sample_size"] == sample_size


def test_an_observation_older_than_the_window_is_not_counted():
    """Once its sub-window's slot has been reused, a late observation is dropped, not misfiled."""
    window = halves_window()
    window.observe({"x": 1}, 0.25, now=600.0)
    window.observe({"x": 1}, 0.25, now=0.0)
    assert window.report(600.0)["sample_size"] == 1


def test_psi_is_none_below_the_minimum_sample_size():
    """Under `min_sample_size` observations no PSI is given, only the sample size."""
    window = halves_window(min_sample_size=100)
    for i in range(99):
        window.observe({"x": i % 2}, 0.25, now=1.0)
    assert window.report(1.0)["features"]["x"] == {"psi": None, "sample_size": 99}
    window.observe({"x": 1}, 0.25, now=1.0)
    assert window.report(1.0)["features"]["x"]["psi"] is not None


@pytest.mark.parametrize(
    ("features", "x_sample_size"),
    [
        ({"x": 1}, 1),
        ({"x": -2.5}, 1),
        ({}, 0),
        ({"x": None}, 0),
        ({"x": "7"}, 0),
        ({"x": math.nan}, 0),
    ],
)
def test_missing_or_non_numeric_values_are_not_counted(features, x_sample_size):
    """A numeric feature's bins count numbers only; the request itself is still counted."""
    window = halves_window()
    window.observe(features, 0.25, now=1.0)
    report = window.report(1.0)
    assert (report["sample_size"], report["features"]["x"]["sample_size"]) == (1, x_sample_size)


def test_unseen_categories_count_as_other():
    """A category the baseline never saw lands in `other`, and PSI is computed over categories."""
    plan = {"kind": "categorical", "proportions": {"basic": 0.6, "premium": 0.4, "other": 0.0}}
    baseline = VersionBaseline.model_validate({"sample_size": 10, "features": {"plan": plan}})
    window = DriftWindow(baseline, min_sample_size=1)
    for value in ["basic"] * 5 + ["premium"] * 3 + ["gold"] * 2:
        window.observe({"plan": value}, 0.5, now=1.0)
    report = window.report(1.0)
    # Categories in sorted order: basic, other, premium.
    assert report["features"]["plan"]["psi"] == pytest.approx(psi([0.6, 0.0, 0.4], [5, 2, 3]))
    assert report["prediction"] is None


def counter_list_bytes(monitor: Monitor) -> int:
    """Bytes of every counter list: a list's size depends on its length, not its contents."""
    rings = [s.quality._ring for s in monitor._streams.values()]
    rings += [s.drift._ring for s in monitor._streams.values() if s.drift is not None]
    return sum(sys.getsizeof(slot.counters) for ring in rings for slot in ring._slots)


def test_memory_is_the_same_after_a_million_requests_as_after_a_thousand(churn):
    """1,000,000 observations leave the same streams, counters and counter bytes as 1,000."""
    rng = np.random.default_rng(5)
    rows = [
        {"tenure_months": int(t), "monthly_charges": float(c)}
        for t, c in zip(rng.integers(0, 73, 1000), rng.uniform(18, 240, 1000), strict=True)
    ]
    probabilities = rng.random(1000).tolist()
    monitor = Monitor({MODEL: churn})

    def observe(start: int, stop: int) -> None:
        # A millisecond apart: a million requests span 1,000 s, so every slot is reused.
        for i in range(start, stop):
            p = probabilities[i % 1000]
            monitor.observe_prediction(MODEL, "churn-gbm:1", "control", rows[i % 1000], p, i / 1000)
            if i % 10 == 0:
                now = i / 1000
                monitor.observe_outcome(
                    MODEL, "churn-gbm:1", "control", "churn", "stay", p, "churn", now
                )

    observe(0, 1_000)
    after_thousand = (len(monitor._streams), monitor.counter_cells(), counter_list_bytes(monitor))
    observe(1_000, 1_000_000)
    after_million = (len(monitor._streams), monitor.counter_cells(), counter_list_bytes(monitor))
    assert after_million == after_thousand
    # The window at 1,000 s is the sub-windows from 720 s on: the last 280,000 requests.
    drift = monitor.health(MODEL, now=1000.0)["versions"]["churn-gbm:1"]["control"]["drift"]
    assert drift["sample_size"] == 280_000


# --- Quality -----------------------------------------------------------------------------------

# (predicted positive, outcome positive, probability) per judged answer, then the metrics.
QUALITY_CASES = [
    ([(True, True, 1.0), (False, False, 0.0)], (1.0, 1.0, 1.0, 0.0)),
    # one of each cell; calibration: (|.9 − 1| + |.8 − 0| + |.3 − 1| + |.1 − 0|) / 4
    (
        [(True, True, 0.9), (True, False, 0.8), (False, True, 0.3), (False, False, 0.1)],
        (0.5, 0.5, 0.5, 0.425),
    ),
    # never predicted positive: no precision; both in the 0.2 bin, 1 of 2 positive
    ([(False, False, 0.2), (False, True, 0.2)], (0.5, None, 0.0, 0.3)),
    # never an actual positive: no recall
    ([(True, False, 0.7)], (0.0, 0.0, None, 0.7)),
    # perfectly calibrated at 0.3, though the threshold calls every one negative
    ([(False, i < 3, 0.3) for i in range(10)], (0.7, None, 0.0, 0.0)),
    ([], (None, None, None, None)),
]


@pytest.mark.parametrize(("events", "metrics"), QUALITY_CASES)
def test_quality_metrics(events, metrics):
    """Accuracy, precision, recall and expected calibration error, None without a denominator."""
    window = QualityWindow(window_s=3600.0)
    for predicted, outcome, probability in events:
        window.observe(predicted, outcome, probability, now=5.0)
    report = window.report(5.0)
    got = (report["accuracy"], report["precision"], report["recall"], report["calibration_error"])
    assert got == pytest.approx(metrics, abs=1e-9)
    assert report["sample_size"] == len(events)


def test_quality_ages_out_and_judges_labels_against_the_positive_one(churn):
    """Outcomes are compared as labels against the policy's positive label, over a window."""
    monitor = Monitor({MODEL: churn}, quality_window_s=600.0)
    judged = [("churn", "churn", 0.9), ("churn", "stay", 0.6), ("stay", "stay", 0.2)]
    for predicted, outcome, probability in judged:
        monitor.observe_outcome(
            MODEL, "churn-gbm:1", "control", predicted, outcome, probability, "churn", 10.0
        )
    quality = monitor.health(MODEL, now=20.0)["versions"]["churn-gbm:1"]["control"]["quality"]
    assert (quality["sample_size"], quality["accuracy"], quality["precision"]) == (3, 0.666667, 0.5)
    assert quality["recall"] == 1.0
    later = monitor.health(MODEL, now=599.0)["versions"]["churn-gbm:1"]["control"]["quality"]
    assert later["sample_size"] == 3  # still inside the window (its sub-window ends at 600)
    assert monitor.health(MODEL, now=700.0)["versions"] == {}  # aged out, and forgotten


def test_streams_with_nothing_in_their_windows_are_forgotten(churn):
    """Each edit of the fallback rules answers as a new version (`rules-<hash>`): once one
    has nothing left in its windows it leaves the report and the monitor, so the streams (and
    the metric series made from them) stay bounded; a stream still counting stays."""
    monitor = Monitor({MODEL: churn}, drift_window_s=300.0, quality_window_s=600.0)
    for n in range(50):  # fifty rule edits, each answering once, a minute apart
        monitor.observe_outcome(
            MODEL, f"rules-{n:012x}", "control", "stay", "stay", 0.5, "churn", 60.0 * n
        )
    monitor.observe_prediction(MODEL, "churn-gbm:1", "control", {}, 0.3, 60.0 * 49)
    versions = monitor.health(MODEL, now=60.0 * 49)["versions"]
    assert len(versions) == 11  # the ten newest rules (600 s window) and the model
    assert "rules-000000000000" not in versions and "rules-000000000031" in versions
    cells = monitor.counter_cells()
    assert monitor.forget_idle(now=60.0 * 49 + 600.0) == 11  # nothing left anywhere
    assert monitor.health(MODEL, now=60.0 * 49 + 600.0)["versions"] == {}
    assert monitor.counter_cells() == 0 < cells


# --- Health ------------------------------------------------------------------------------------


def halves_baseline(versions: dict[str, dict]) -> Baseline:
    return Baseline.model_validate({"model_id": "m", "versions": versions})


@pytest.mark.parametrize(
    ("above", "total", "status"),
    [
        (0, 0, "insufficient_data"),
        (50, 99, "insufficient_data"),  # under the minimum of 100
        (100, 200, "ok"),
        (120, 200, "ok"),  # 60/40: PSI 0.041
        (140, 200, "watch"),  # 70/30: PSI 0.169
        (180, 200, "drifting"),  # 90/10: PSI 0.879
    ],
)
def test_health_status_follows_the_worst_psi(above, total, status):
    """insufficient_data under the minimum sample, then ok < 0.1 ≤ watch < 0.25 ≤ drifting."""
    monitor = Monitor({"m": halves_baseline({"v:1": HALVES})}, min_sample_size=100)
    for i in range(total):
        # The prediction stays balanced, so the feature alone decides.
        monitor.observe_prediction("m", "v:1", "a", {"x": 1 if i < above else -1}, i % 2, 1.0)
    health = monitor.health("m", now=2.0)
    assert health["status"] == status
    if total:
        assert health["versions"]["v:1"]["a"]["status"] == status


@pytest.mark.parametrize(
    ("versions", "served", "baseline_used", "status"),
    [
        ({"v:1": HALVES}, "v:1", "v:1", "ok"),
        ({"v:1": HALVES, "*": HALVES}, "v:2", "*", "ok"),
        ({"v:1": HALVES}, "v:2", None, "no_baseline"),
    ],
)
def test_health_names_the_baseline_used(versions, served, baseline_used, status):
    """A version is judged by its own baseline, else by `*`, else not at all (no_baseline)."""
    monitor = Monitor({"m": halves_baseline(versions)}, min_sample_size=100)
    for i in range(200):
        monitor.observe_prediction("m", served, "a", {"x": i % 2 - 0.5}, (i % 2) * 0.9, 1.0)
    stream = monitor.health("m", now=2.0)["versions"][served]["a"]
    assert (stream["baseline"], stream["status"]) == (baseline_used, status)


def test_health_is_per_version_and_arm_and_json_ready(churn):
    """Each (version, arm) gets its own report; the model's status is the worst of them."""
    monitor = Monitor({MODEL: churn}, min_sample_size=1)
    row = {"tenure_months": 24, "monthly_charges": 89.99}
    monitor.observe_prediction(MODEL, "churn-gbm:1", "control", row, 0.26, 1.0)
    monitor.observe_prediction(MODEL, "churn-gbm-v2:1", "challenger", row, 0.3, 1.0)
    monitor.observe_prediction("other-model", "x:1", "default", row, 0.3, 1.0)
    health = json.loads(json.dumps(monitor.health(MODEL, now=2.0)))
    assert {v: sorted(arms) for v, arms in health["versions"].items()} == {
        "churn-gbm-v2:1": ["challenger"],
        "churn-gbm:1": ["control"],
    }
    # One row against ten deciles is far from the baseline.
    assert health["status"] == "drifting"
    assert health["thresholds"] == {"watch_psi": 0.1, "drifting_psi": 0.25, "min_sample_size": 1}


# --- Workers' windows combined ------------------------------------------------------------------

ROW = {"tenure_months": 24, "monthly_charges": 89.99}


def worker_monitor(churn: Baseline, answers: int, start: float, outcomes: int = 0) -> Monitor:
    monitor = Monitor({MODEL: churn}, min_sample_size=1)
    for i in range(answers):
        monitor.observe_prediction(MODEL, "churn-gbm:1", "control", ROW, 0.26, start + i)
    for i in range(outcomes):
        monitor.observe_outcome(
            MODEL, "churn-gbm:1", "control", "stay", "stay", 0.26, "churn", start + i
        )
    return monitor


def control_health(monitor: Monitor, now: float) -> dict:
    return monitor.health(MODEL, now)["versions"]["churn-gbm:1"]["control"]


def test_two_workers_windows_combine_into_the_counts_of_both(churn):
    """Another worker's windows (through JSON, as the file carries them) add to this one's,
    sub-window by sub-window; the monitor combined from is left as it was."""
    mine, theirs = worker_monitor(churn, 30, 0.0, outcomes=2), worker_monitor(churn, 50, 100.0)
    theirs.observe_prediction(MODEL, "churn-gbm-v2:1", "challenger", ROW, 0.3, 120.0)
    shared = json.loads(json.dumps(theirs.windows()))
    combined = mine.combined([shared])
    health = control_health(combined, now=200.0)
    assert health["drift"]["sample_size"] == 80
    assert health["quality"]["sample_size"] == 2
    assert "challenger" in combined.health(MODEL, 200.0)["versions"]["churn-gbm-v2:1"]
    assert control_health(mine, now=200.0)["drift"]["sample_size"] == 30


def test_a_siblings_sub_windows_age_out_like_ones_own(churn):
    """A sibling's sub-windows keep their times: past the window they stop counting."""
    mine, theirs = worker_monitor(churn, 10, 280.0), worker_monitor(churn, 10, 0.0)
    combined = mine.combined([theirs.windows()])
    assert control_health(combined, now=295.0)["drift"]["sample_size"] == 20
    assert control_health(combined, now=320.0)["drift"]["sample_size"] == 10


def damaged(windows: list[dict], edit) -> list[dict]:  # type: ignore[no-untyped-def]
    copy = json.loads(json.dumps(windows))
    edit(copy[0])
    return copy


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: w["drift"][0][1].__setitem__(0, -5),
        lambda w: w["drift"][0][1].append(1),
        lambda w: w["drift"][0].__setitem__(0, "soon"),
        lambda w: w.pop("arm"),
        lambda w: w["drift"][0].__setitem__(0, -1),
    ],
    ids=["negative-counter", "more-cells", "epoch-not-a-number", "no-arm", "negative-epoch"],
)
def test_damaged_sibling_windows_are_left_out(churn, edit):
    """Windows that are not what a monitor shares are skipped whole, never half-counted."""
    mine, theirs = worker_monitor(churn, 3, 0.0), worker_monitor(churn, 5, 0.0)
    good = worker_monitor(churn, 7, 0.0).windows()
    combined = mine.combined([damaged(theirs.windows(), edit), good])
    assert control_health(combined, now=10.0)["drift"]["sample_size"] == 10


# --- Baseline files ----------------------------------------------------------------------------


def write_baseline(directory: Path, document: object, name: str = MODEL) -> Path:
    path = directory / f"{name}.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def broken(edit) -> dict:
    document = json.loads(BASELINE_FILE.read_text())
    edit(document)
    return document


def _gbm(document: dict) -> dict:
    return document["versions"]["churn-gbm:1"]


FEATURE = "versions.churn-gbm:1.features.tenure_months.numeric"
BASELINE_FAULTS = [
    (
        lambda d: _gbm(d)["features"]["tenure_months"]["edges"].reverse(),
        f"{FEATURE}.edges: Value error, must be strictly increasing",
    ),
    (
        lambda d: _gbm(d)["features"]["tenure_months"]["edges"].pop(),
        f"{FEATURE}: Value error, 8 edges make 9 bins, but there are 10 proportions",
    ),
    (
        lambda d: _gbm(d)["prediction"]["proportions"].__setitem__(0, 0.5),
        "versions.churn-gbm:1.prediction.proportions: Value error, must sum to 1",
    ),
    (
        lambda d: _gbm(d)["features"].__setitem__(
            "plan", {"kind": "categorical", "proportions": {"basic": 1.0}}
        ),
        "versions.churn-gbm:1.features.plan.categorical.proportions: Value error, must include",
    ),
    (
        lambda d: _gbm(d)["features"]["tenure_months"].__setitem__("kind", "ordinal"),
        "versions.churn-gbm:1.features.tenure_months: Input tag 'ordinal'",
    ),
    (lambda d: _gbm(d).__setitem__("sample_size", 0), "versions.churn-gbm:1.sample_size:"),
    (lambda d: d.__setitem__("model_id", "churn"), "model_id: churn must match the file name"),
]

BASELINE_FAULT_IDS = [
    "edges-decreasing",
    "bins-without-a-proportion",
    "proportions-not-summing-to-1",
    "categorical-without-other",
    "unknown-kind",
    "sample-size-zero",
    "model-id-not-file-name",
]


@pytest.mark.parametrize(("edit", "fault"), BASELINE_FAULTS, ids=BASELINE_FAULT_IDS)
def test_baseline_faults_name_file_and_field(tmp_path, edit, fault):
    """Each fault is reported as `file: field: message`."""
    path = write_baseline(tmp_path, broken(edit))
    with pytest.raises(BaselineError) as raised:
        load_baselines(tmp_path)
    assert any(f.startswith(f"{path}: {fault}") for f in raised.value.faults), raised.value.faults


def test_unreadable_baselines_are_faults(tmp_path):
    """A file that is not JSON, and a missing directory, are named in the error."""
    path = write_baseline(tmp_path, "{not json")
    with pytest.raises(BaselineError, match=rf"{path}: \(file\): not readable JSON"):
        load_baselines(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(BaselineError, match=f"{missing}: baselines directory not found"):
        load_baselines(missing)


@pytest.mark.parametrize(
    ("served", "stored_under"),
    [("churn-gbm:1", "churn-gbm:1"), ("churn-gbm:2", "*"), ("rules:ab12", "*")],
)
def test_a_version_without_its_own_baseline_uses_the_default(churn, served, stored_under):
    """`*` judges every version the file does not list."""
    found = churn.for_version(served)
    assert found is not None and found[0] == stored_under


def test_committed_baseline_is_what_the_script_generates(models):
    """baselines/customer-churn.json is exactly `python -m gateway.demo.baseline`'s output."""
    assert BASELINE_FILE.read_text(encoding="utf-8") == render(churn_baseline(models))


def test_baseline_script_writes_where_it_is_told(tmp_path, monkeypatch, models):
    """--out picks the file; the document written loads as a baseline."""
    from gateway.demo import baseline as script

    monkeypatch.setattr(script, "train_churn_models", lambda seed: models)
    out = tmp_path / "b" / f"{MODEL}.json"
    assert script.main(["--out", str(out)]) == 0
    loaded = load_baselines(out.parent)[MODEL]
    assert sorted(loaded.versions) == ["*", "churn-gbm-v2:1", "churn-gbm:1", "churn-logreg:1"]
