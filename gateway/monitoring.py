"""Model monitoring: input and prediction drift against a baseline, and live quality from feedback.

A baseline (`baselines/<model_id>.json`, beside the model's policy) records, per model version,
the distributions the version was trained or validated on: for each numeric feature the bin
edges (deciles of the training data) and the share of rows in each bin, for each categorical
feature the share of each category, and the same bins for the predicted probability.

Live traffic is counted into those same bins, never stored: each stream (model, version, arm)
keeps a ring of sub-windows, each a fixed-length list of counters, so memory is
O(features × bins × sub-windows) whatever the traffic. Recording a prediction is a few bisects
and increments; the population stability index (PSI) is computed only when someone asks for
`health`, off the request path.

Every time is an argument (`now`, seconds on any monotonic clock), so windows are tested
without sleeping.
"""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.experiments import wilson_interval
from gateway.policy import validation_lines
from gateway.problems import FaultsError

log = logging.getLogger("gateway.monitoring")

# The usual reading of PSI: under 0.1 no real change, 0.1-0.25 worth watching, above 0.25 the
# population has moved.
WATCH_PSI = 0.1
DRIFTING_PSI = 0.25
PSI_FLOOR = 1e-4

# A sample drawn from the baseline itself has a PSI of about (bins - 1) / n: with ten bins,
# 100 rows read ≈ 0.09, "watch" by noise alone; 500 rows keep the noise near 0.02.
MIN_SAMPLE_SIZE = 500

OTHER_CATEGORY = "other"
ANY_VERSION = "*"
CALIBRATION_BINS = 10

# Worst first: a model's status is the worst of its streams'.
STATUS_ORDER = ("drifting", "watch", "ok", "insufficient_data", "no_baseline")


def version_key(target: str, version: str) -> str:
    """The key a baseline is stored under: served target and its version, `churn-gbm:1`."""
    return f"{target}:{version}"


# --- Baselines ---------------------------------------------------------------------------------


class BaselineError(FaultsError):
    """One or more baseline files are invalid; `faults` holds `file: field: message` lines."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bins(_Strict):
    """Numeric bins: `edges` are the interior cut points, the ends are -inf and +inf.

    Bin i holds `edges[i-1] <= x < edges[i]`, so there is one more proportion than edges.
    """

    edges: list[float]
    proportions: list[float] = Field(min_length=1)

    @field_validator("edges")
    @classmethod
    def _edges_split_the_line(cls, edges: list[float]) -> list[float]:
        if not all(math.isfinite(e) for e in edges):
            raise ValueError("must be finite (the -inf and +inf ends are implied)")
        if any(b <= a for a, b in pairwise(edges)):
            raise ValueError("must be strictly increasing")
        return edges

    @model_validator(mode="after")
    def _one_proportion_per_bin(self) -> Bins:
        if len(self.proportions) != len(self.edges) + 1:
            raise ValueError(
                f"{len(self.edges)} edges make {len(self.edges) + 1} bins, "
                f"but there are {len(self.proportions)} proportions"
            )
        return self

    @field_validator("proportions")
    @classmethod
    def _shares_of_one_whole(cls, proportions: list[float]) -> list[float]:
        return _checked_proportions(proportions)


class NumericFeature(Bins):
    kind: Literal["numeric"]


class CategoricalFeature(_Strict):
    """The share of each category; values not listed are counted as `other`."""

    kind: Literal["categorical"]
    proportions: dict[str, float]

    @field_validator("proportions")
    @classmethod
    def _other_is_a_category(cls, proportions: dict[str, float]) -> dict[str, float]:
        if OTHER_CATEGORY not in proportions:
            raise ValueError(f"must include {OTHER_CATEGORY!r}, the share of unseen values")
        _checked_proportions(list(proportions.values()))
        return proportions


FeatureBaseline = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="kind")]


class VersionBaseline(_Strict):
    """What one model version saw: its features' distributions and, if known, its predictions'."""

    sample_size: int = Field(ge=1)
    features: dict[str, FeatureBaseline]
    prediction: Bins | None = None


class Baseline(_Strict):
    """One logical model's baselines, by version key; `*` applies to versions not listed."""

    model_id: str
    description: str = ""
    versions: dict[str, VersionBaseline] = Field(min_length=1)

    def for_version(self, key: str) -> tuple[str, VersionBaseline] | None:
        """The baseline that judges `key`, and the key it is stored under; None if none does."""
        for candidate in (key, ANY_VERSION):
            if candidate in self.versions:
                return candidate, self.versions[candidate]
        return None


def _checked_proportions(proportions: list[float]) -> list[float]:
    if any(p < 0 or not math.isfinite(p) for p in proportions):
        raise ValueError("must be finite and non-negative")
    # Files round to a few decimals, so the sum is only close to 1.
    if abs(sum(proportions) - 1.0) > 1e-3:
        raise ValueError(f"must sum to 1, not {sum(proportions):.6f}")
    return proportions


def load_baselines(directory: Path) -> dict[str, Baseline]:
    """Read every `*.json` in `directory`, by model_id; raise BaselineError listing every fault."""
    if not directory.is_dir():
        raise BaselineError([f"{directory}: baselines directory not found"])
    faults: list[str] = []
    baselines: dict[str, Baseline] = {}
    for path in sorted(directory.glob("*.json")):
        baseline = _load_one(path, faults)
        if baseline is not None:
            baselines[baseline.model_id] = baseline
    if faults:
        raise BaselineError(faults)
    return baselines


def _load_one(path: Path, faults: list[str]) -> Baseline | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        faults.append(f"{path}: (file): not readable JSON: {error}")
        return None
    try:
        baseline = Baseline.model_validate(raw)
    except ValidationError as error:
        faults.extend(f"{path}: {line}" for line in validation_lines(error))
        return None
    # One file per model, named like its policy, so the two are found together.
    if baseline.model_id != path.stem:
        faults.append(f"{path}: model_id: {baseline.model_id} must match the file name")
        return None
    return baseline


# --- Population stability index -----------------------------------------------------------------


def psi(expected: Sequence[float], actual_counts: Sequence[int], floor: float = PSI_FLOOR) -> float:
    """Σ (a − e) · ln(a / e) over bins, a being the actual shares, e the expected ones.

    An empty bin would make the logarithm infinite; both shares are raised to `floor` first,
    so one empty bin costs a large but finite amount.
    """
    if len(expected) != len(actual_counts):
        raise ValueError(f"{len(expected)} expected shares but {len(actual_counts)} counts")
    total = sum(actual_counts)
    if total <= 0:
        raise ValueError("no observations to compare")
    value = 0.0
    for e, count in zip(expected, actual_counts, strict=True):
        a = max(count / total, floor)
        e = max(e, floor)
        value += (a - e) * math.log(a / e)
    return value


# --- Sliding windows of counters ----------------------------------------------------------------


@dataclass(slots=True)
class _SubWindow:
    epoch: int
    counters: list[float]


class _Ring:
    """Counters over the last `window_s`, as `buckets` sub-windows reused in turn.

    A sub-window is reset in place when its slot comes round again, so the counters never
    grow; the window covers between `window_s − window_s/buckets` and `window_s` of history.
    """

    def __init__(self, cells: int, window_s: float, buckets: int) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("a window needs a positive length and at least one sub-window")
        self.width_s = window_s / buckets
        self._zeros = [0] * cells
        # Epoch -1 marks a sub-window that has never been used.
        self._slots = [_SubWindow(-1, [0] * cells) for _ in range(buckets)]

    def counters_at(self, now: float) -> list[float] | None:
        """The counters to increment for an event at `now`; None if it is too old to count."""
        return self._counters_of(int(now // self.width_s))

    def _counters_of(self, epoch: int) -> list[float] | None:
        slot = self._slots[epoch % len(self._slots)]
        if slot.epoch != epoch:
            if slot.epoch > epoch:
                return None
            slot.epoch = epoch
            slot.counters[:] = self._zeros
        return slot.counters

    def totals(self, now: float) -> list[float]:
        """Every counter summed over the sub-windows still inside the window at `now`."""
        newest = int(now // self.width_s)
        live = [s.counters for s in self._slots if newest - len(self._slots) < s.epoch <= newest]
        if not live:
            return list(self._zeros)
        return [sum(column) for column in zip(*live, strict=True)]

    def counter_cells(self) -> int:
        return sum(len(s.counters) for s in self._slots)

    def is_empty_at(self, now: float) -> bool:
        """Nothing counted in the window at `now` (every sub-window too old, or never used)."""
        newest = int(now // self.width_s)
        return not any(newest - len(self._slots) < s.epoch <= newest for s in self._slots)

    def live_slots(self) -> list[list]:
        """The sub-windows ever used, as plain `[epoch, counters]` pairs (to share)."""
        return [[s.epoch, list(s.counters)] for s in self._slots if s.epoch >= 0]

    def add_slots(self, slots: Iterable[Sequence]) -> None:
        """Count in another ring's sub-windows (same width, same cells: another worker's).
        ValueError or TypeError when they are not such."""
        for epoch, counters in slots:
            if not (isinstance(epoch, int) and epoch >= 0 and len(counters) == len(self._zeros)):
                raise ValueError("sub-windows of another shape")
            if not all(isinstance(value, int | float) and value >= 0 for value in counters):
                raise ValueError("counters must be numbers, none negative")
            mine = self._counters_of(epoch)
            if mine is None:
                continue  # older than what this slot now holds: outside the window anyway
            for i, value in enumerate(counters):
                mine[i] += value


@dataclass(frozen=True)
class _Histogram:
    """Where one feature's (or the prediction's) bins sit in a sub-window's counters."""

    name: str
    start: int
    expected: tuple[float, ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.expected)


class DriftWindow:
    """Binned counts of features and predictions over a sliding window, and their PSI."""

    def __init__(
        self,
        baseline: VersionBaseline,
        window_s: float = 300.0,
        buckets: int = 10,
        min_sample_size: int = MIN_SAMPLE_SIZE,
    ) -> None:
        self.window_s = window_s
        self.min_sample_size = min_sample_size
        # Counter 0 counts observations; each histogram follows in its own slice.
        cursor = 1
        self._numeric: list[tuple[str, list[float], int]] = []
        self._categorical: list[tuple[str, dict[str, int], int]] = []
        self._histograms: list[_Histogram] = []
        for name, feature in sorted(baseline.features.items()):
            if isinstance(feature, NumericFeature):
                self._numeric.append((name, list(feature.edges), cursor))
                expected = tuple(feature.proportions)
            else:
                categories = sorted(feature.proportions)
                cells = {c: cursor + i for i, c in enumerate(categories)}
                self._categorical.append((name, cells, cells[OTHER_CATEGORY]))
                expected = tuple(feature.proportions[c] for c in categories)
            self._histograms.append(_Histogram(name, cursor, expected))
            cursor += len(expected)
        self._prediction: tuple[list[float], int] | None = None
        self._prediction_histogram: _Histogram | None = None
        if baseline.prediction is not None:
            self._prediction = (list(baseline.prediction.edges), cursor)
            self._prediction_histogram = _Histogram(
                "prediction", cursor, tuple(baseline.prediction.proportions)
            )
            cursor += len(baseline.prediction.proportions)
        self._ring = _Ring(cursor, window_s, buckets)

    def observe(self, features: Mapping[str, object], probability: float, now: float) -> None:
        """Count one answered request; features missing or of the wrong type are not counted."""
        counters = self._ring.counters_at(now)
        if counters is None:
            return
        counters[0] += 1
        for name, edges, start in self._numeric:
            value = features.get(name)
            # `value == value` drops NaN, which would otherwise land in the top bin.
            if isinstance(value, (int, float)) and value == value:
                counters[start + bisect_right(edges, value)] += 1
        for name, cells, other in self._categorical:
            value = features.get(name)
            if value is not None:
                counters[cells.get(str(value), other)] += 1
        # NaN means "not this version's own output" (a fallback answered): inputs only.
        if self._prediction is not None and probability == probability:
            edges, start = self._prediction
            counters[start + bisect_right(edges, probability)] += 1

    def report(self, now: float) -> dict:
        """Per feature and for the prediction: PSI (None under `min_sample_size`), sample size."""
        totals = self._ring.totals(now)
        prediction = self._prediction_histogram
        return {
            "sample_size": int(totals[0]),
            "min_sample_size": self.min_sample_size,
            "features": {h.name: self._entry(h, totals) for h in self._histograms},
            "prediction": self._entry(prediction, totals) if prediction else None,
        }

    def counter_cells(self) -> int:
        """How many counters this window holds: fixed by the baseline, never by traffic."""
        return self._ring.counter_cells()

    @property
    def ring(self) -> _Ring:
        return self._ring

    def _entry(self, histogram: _Histogram, totals: list[float]) -> dict:
        counts = [int(c) for c in totals[histogram.start : histogram.stop]]
        size = sum(counts)
        value = psi(histogram.expected, counts) if size >= self.min_sample_size else None
        return {"psi": None if value is None else round(value, 6), "sample_size": size}


# --- Live quality from feedback -----------------------------------------------------------------

# Counters of a quality sub-window, then (count, Σ probability, positives) per calibration bin.
_SEEN, _CORRECT, _TRUE_POS, _FALSE_POS, _FALSE_NEG, _POSITIVES = range(6)
_CALIBRATION_START = 6


class QualityWindow:
    """Accuracy, precision, recall and calibration from outcomes over a sliding window."""

    def __init__(
        self, window_s: float = 3600.0, buckets: int = 10, bins: int = CALIBRATION_BINS
    ) -> None:
        self.window_s = window_s
        self.bins = bins
        self._ring = _Ring(_CALIBRATION_START + 3 * bins, window_s, buckets)

    def observe(
        self, predicted_positive: bool, outcome_positive: bool, probability: float, now: float
    ) -> None:
        """Count one judged answer: what was predicted, what happened, the probability given."""
        counters = self._ring.counters_at(now)
        if counters is None:
            return
        counters[_SEEN] += 1
        counters[_CORRECT] += predicted_positive == outcome_positive
        counters[_POSITIVES] += outcome_positive
        if predicted_positive:
            counters[_TRUE_POS if outcome_positive else _FALSE_POS] += 1
        elif outcome_positive:
            counters[_FALSE_NEG] += 1
        # Equal-width bins on [0, 1]; a probability of exactly 1 belongs to the top bin.
        cell = _CALIBRATION_START + 3 * min(max(int(probability * self.bins), 0), self.bins - 1)
        counters[cell] += 1
        counters[cell + 1] += probability
        counters[cell + 2] += outcome_positive

    def report(self, now: float) -> dict:
        """The metrics over the window at `now`, each None when its denominator is zero."""
        totals = self._ring.totals(now)
        seen = int(totals[_SEEN])
        correct, tp = int(totals[_CORRECT]), int(totals[_TRUE_POS])
        fp, fn = int(totals[_FALSE_POS]), int(totals[_FALSE_NEG])
        return {
            "sample_size": seen,
            "accuracy": _rate(correct, seen),
            "accuracy_ci95": wilson_interval(correct, seen),
            "precision": _rate(tp, tp + fp),
            "recall": _rate(tp, tp + fn),
            "positive_rate": _rate(int(totals[_POSITIVES]), seen),
            "calibration_error": _expected_calibration_error(totals[_CALIBRATION_START:], seen),
        }

    def counter_cells(self) -> int:
        return self._ring.counter_cells()

    @property
    def ring(self) -> _Ring:
        return self._ring


def _expected_calibration_error(cells: Sequence[float], seen: int) -> float | None:
    """Σ over bins of (bin share) · |mean probability − observed positive rate|."""
    if seen == 0:
        return None
    error = 0.0
    for i in range(0, len(cells), 3):
        count, probability_sum, positives = cells[i : i + 3]
        if count:
            error += count / seen * abs(probability_sum / count - positives / count)
    return round(error, 6)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


# --- The monitor ---------------------------------------------------------------------------------


def drift_status(drift: dict | None) -> str:
    """ok, watch (a PSI ≥ 0.1), drifting (≥ 0.25), insufficient_data or no_baseline."""
    if drift is None:
        return "no_baseline"
    entries = [*drift["features"].values(), drift["prediction"]]
    values = [e["psi"] for e in entries if e is not None and e["psi"] is not None]
    if not values:
        return "insufficient_data"
    worst = max(values)
    if worst >= DRIFTING_PSI:
        return "drifting"
    if worst >= WATCH_PSI:
        return "watch"
    return "ok"


def worst_status(statuses: Sequence[str]) -> str:
    """The most alarming of several statuses; insufficient_data when there are none."""
    return min(statuses, key=STATUS_ORDER.index, default="insufficient_data")


@dataclass(frozen=True)
class _Stream:
    """What is watched for one model version in one arm."""

    baseline_key: str | None
    drift: DriftWindow | None
    quality: QualityWindow


def _is_idle(stream: _Stream, now: float) -> bool:
    drift_empty = stream.drift is None or stream.drift.ring.is_empty_at(now)
    return drift_empty and stream.quality.ring.is_empty_at(now)


class Monitor:
    """Drift and quality windows per (model_id, version key, arm), created on first sight.

    A stream with nothing left in its windows is forgotten when health is next read: versions
    and arms a policy no longer names, and the fallback rules' versions (`rules-<hash>`, a new
    one with each edit of the rules), would otherwise be kept, and exported, for good. So the
    streams are bounded by what answered within the windows; each stream's size is fixed.
    """

    def __init__(
        self,
        baselines: Mapping[str, Baseline],
        drift_window_s: float = 300.0,
        quality_window_s: float = 3600.0,
        buckets: int = 10,
        min_sample_size: int = MIN_SAMPLE_SIZE,
    ) -> None:
        self._baselines = dict(baselines)
        self.drift_window_s = drift_window_s
        self.quality_window_s = quality_window_s
        self.buckets = buckets
        self.min_sample_size = min_sample_size
        self._streams: dict[tuple[str, str, str], _Stream] = {}

    def observe_prediction(
        self,
        model_id: str,
        version_key: str,
        arm: str,
        features: Mapping[str, object],
        probability: float,
        now: float,
    ) -> None:
        """Count one answer's features and probability; cheap enough for the request path."""
        drift = self._stream(model_id, version_key, arm).drift
        if drift is not None:
            drift.observe(features, probability, now)

    def observe_outcome(
        self,
        model_id: str,
        version_key: str,
        arm: str,
        predicted: str,
        outcome: str,
        probability: float,
        positive_label: str,
        now: float,
    ) -> None:
        """Count what really happened to an answer, against the label and probability it gave."""
        self._stream(model_id, version_key, arm).quality.observe(
            predicted == positive_label, outcome == positive_label, probability, now
        )

    def health(self, model_id: str, now: float) -> dict:
        """JSON-ready: per version and arm, drift, quality, the baseline used and a status."""
        self.forget_idle(now)
        versions: dict[str, dict[str, dict]] = {}
        statuses = []
        for (model, version, arm), stream in sorted(self._streams.items()):
            if model != model_id:
                continue
            drift = stream.drift.report(now) if stream.drift is not None else None
            status = drift_status(drift)
            statuses.append(status)
            versions.setdefault(version, {})[arm] = {
                "status": status,
                "baseline": stream.baseline_key,
                "drift": drift,
                "quality": stream.quality.report(now),
            }
        return {
            "model_id": model_id,
            "status": worst_status(statuses),
            "drift_window_s": self.drift_window_s,
            "quality_window_s": self.quality_window_s,
            "thresholds": {
                "watch_psi": WATCH_PSI,
                "drifting_psi": DRIFTING_PSI,
                "min_sample_size": self.min_sample_size,
            },
            "versions": versions,
        }

    def forget_idle(self, now: float) -> int:
        """Drop the streams whose windows hold nothing at `now`; how many were dropped."""
        idle = [key for key, stream in self._streams.items() if _is_idle(stream, now)]
        for key in idle:
            del self._streams[key]
        return len(idle)

    def windows(self) -> list[dict]:
        """Every stream's sub-windows as plain data, to share with other workers."""
        shared = []
        for (model, version, arm), stream in self._streams.items():
            drift = stream.drift.ring.live_slots() if stream.drift is not None else None
            shared.append(
                {"model_id": model, "version_key": version, "arm": arm, "drift": drift,
                 "quality": stream.quality.ring.live_slots()}
            )  # fmt: skip
        return shared

    def add_windows(self, windows: Iterable[Mapping]) -> None:
        """Count in another worker's windows (`windows()` of a monitor with the same
        baselines and windows); ValueError, TypeError or KeyError when they are not such."""
        for entry in windows:
            stream = self._stream(
                str(entry["model_id"]), str(entry["version_key"]), str(entry["arm"])
            )
            if stream.drift is not None and entry["drift"] is not None:
                stream.drift.ring.add_slots(entry["drift"])
            stream.quality.ring.add_slots(entry["quality"])

    def combined(self, siblings: Iterable[Iterable[Mapping]]) -> Monitor:
        """A new monitor holding this one's windows and each sibling's that can be read."""
        combined = Monitor(
            self._baselines, self.drift_window_s, self.quality_window_s, self.buckets,
            self.min_sample_size,
        )  # fmt: skip
        combined.add_windows(self.windows())
        for windows in siblings:
            trial = combined.copy()
            try:
                trial.add_windows(windows)
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                log.warning(
                    "a sibling's health windows are unreadable", extra={"error": repr(error)}
                )
                continue
            combined = trial
        return combined

    def copy(self) -> Monitor:
        return self.combined(())

    def counter_cells(self) -> int:
        """How many counters all streams hold; grows with new streams only, never with traffic."""
        cells = 0
        for stream in self._streams.values():
            cells += stream.quality.counter_cells()
            cells += stream.drift.counter_cells() if stream.drift is not None else 0
        return cells

    def _stream(self, model_id: str, version_key: str, arm: str) -> _Stream:
        key = (model_id, version_key, arm)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self._new_stream(model_id, version_key)
        return stream

    def _new_stream(self, model_id: str, version_key: str) -> _Stream:
        quality = QualityWindow(self.quality_window_s, self.buckets)
        baseline = self._baselines.get(model_id)
        found = baseline.for_version(version_key) if baseline is not None else None
        if found is None:
            return _Stream(None, None, quality)
        key, version_baseline = found
        drift = DriftWindow(
            version_baseline, self.drift_window_s, self.buckets, self.min_sample_size
        )
        return _Stream(key, drift, quality)
