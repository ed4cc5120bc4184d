"""What each arm of an experiment did: traffic, latency, fallbacks, outcomes, shadow agreement.

Statistics are kept per arm *and arm model*, the Triton `model:version` the arm asks first
(`Policy.arm_model`): when an apply changes the model behind an arm (challenger v2 → v3),
the new model's counts start afresh, and the report shows the earlier model's apart,
instead of one accuracy mixing two models.

Kept in memory per process (a replica reports its own traffic; the workers of one
`aigw serve --workers N` report all of theirs, through shared_statistics.py); the ledger of recent
decisions lets `POST /v1/feedback` tie a real outcome to the arm and answer it judges. A
decision the ledger does not hold (answered by a sibling worker, before a restart, or too
long ago) is read from the audit trail by the feedback route and handed to `record_outcome`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gateway.confidence_sequences import difference_sequence

Z_95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion, or None without trials."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # p lies inside the interval in exact arithmetic; keep it inside despite rounding.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def difference_interval(
    successes: int, trials: int, reference_successes: int, reference_trials: int, z: float = Z_95
) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval of p − p_reference (his method 10, from the two
    Wilson intervals), or None while either side has no trials. Unlike a z-test on the
    difference it keeps its coverage near 0 and 1, where accuracies often lie."""
    own = wilson_interval(successes, trials, z)
    reference = wilson_interval(reference_successes, reference_trials, z)
    if own is None or reference is None:
        return None
    p, q = successes / trials, reference_successes / reference_trials
    below = math.hypot(p - own[0], reference[1] - q)
    above = math.hypot(own[1] - p, q - reference[0])
    return (max(-1.0, p - q - below), min(1.0, p - q + above))


def verdict(interval: tuple[float, float] | None) -> str:
    """`higher` or `lower` when the interval of a difference excludes zero, else `not_shown`."""
    if interval is not None and interval[0] > 0:
        return "higher"
    if interval is not None and interval[1] < 0:
        return "lower"
    return "not_shown"


@dataclass
class ShadowStats:
    compared: int = 0
    agreed: int = 0
    failed: int = 0


@dataclass
class ArmStats:
    requests: int = 0
    degraded: int = 0
    cached: int = 0
    latency_ms_total: float = 0.0
    latency_ms_max: float = 0.0
    feedback: int = 0
    positive_outcomes: int = 0
    correct: int = 0
    shadows: dict[str, ShadowStats] = field(default_factory=dict)

    def add(self, other: ArmStats) -> None:
        """Count `other`'s traffic in too (another worker's, or a predecessor's)."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_ms_max = max(self.latency_ms_max, other.latency_ms_max)
        for target, theirs in other.shadows.items():
            mine = self.shadows.setdefault(target, ShadowStats())
            mine.compared += theirs.compared
            mine.agreed += theirs.agreed
            mine.failed += theirs.failed

    def as_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> ArmStats:
        """The statistics `as_plain` gave; TypeError or ValueError when they are not such."""
        shadows = {str(t): ShadowStats(**s) for t, s in plain.get("shadows", {}).items()}
        numbers = {name: plain[name] for name in (*_SUMMED, "latency_ms_max")}
        if not all(isinstance(v, int | float) and v >= 0 for v in numbers.values()):
            raise ValueError("statistics must be numbers, none negative")
        return cls(**numbers, shadows=shadows)

    def compared_with(self, reference: ArmStats) -> dict[str, Any]:
        """How this arm differs from `reference` (the policy's first arm): accuracy and
        fallback rate, each difference with its 95% interval for one look and its 95%
        confidence sequence for any number of looks, and whether each shows one."""
        return {
            **_compared("accuracy", self.correct, self.feedback, reference.correct,
                        reference.feedback),
            **_compared("fallback_rate", self.degraded, self.requests, reference.degraded,
                        reference.requests),
        }  # fmt: skip

    def report(self) -> dict:
        return {
            "requests": self.requests,
            "cached": self.cached,
            "latency_ms_mean": round(self.latency_ms_total / self.requests, 3)
            if self.requests
            else None,
            "latency_ms_max": round(self.latency_ms_max, 3),
            "fallback_rate": _rate(self.degraded, self.requests),
            "fallback_rate_ci95": wilson_interval(self.degraded, self.requests),
            "feedback": self.feedback,
            "outcome_rate": _rate(self.positive_outcomes, self.feedback),
            "outcome_rate_ci95": wilson_interval(self.positive_outcomes, self.feedback),
            "accuracy": _rate(self.correct, self.feedback),
            "accuracy_ci95": wilson_interval(self.correct, self.feedback),
            "shadows": {
                target: {
                    "compared": s.compared,
                    "failed": s.failed,
                    "agreement": _rate(s.agreed, s.compared),
                    "agreement_ci95": wilson_interval(s.agreed, s.compared),
                }
                for target, s in sorted(self.shadows.items())
            },
        }


UNRECORDED_MODEL = "unrecorded"  # the arm model of an answer recorded before it was kept


class Decision(NamedTuple):
    """What the ledger keeps of one answer, to judge it when its outcome arrives."""

    model_id: str
    arm: str
    prediction: str
    tenant: str
    version_key: str = ""  # what answered, as `target:version` (for model monitoring)
    probability: float = 0.0
    arm_model: str = UNRECORDED_MODEL  # what the arm asked first, as `model:version`


def arm_key(arm: str, arm_model: str) -> str:
    """Where an arm's statistics for one arm model are kept (and shared between processes)."""
    return f"{arm}@{arm_model}"


def split_arm_key(key: str) -> tuple[str, str]:
    """(arm, arm model) of an `arm_key`; a key kept before arm models were is `unrecorded`."""
    arm, _, arm_model = key.partition("@")  # arm names have no "@" (policy.py)
    return arm, arm_model or UNRECORDED_MODEL


class Experiments:
    """Per-model, per-arm (and arm model) statistics, and a bounded ledger of recent decisions."""

    def __init__(self, ledger_size: int = 100_000) -> None:
        self._stats: dict[str, dict[str, ArmStats]] = {}  # model → arm_key → statistics
        # Decisions as plain tuples, which the cyclic garbage collector stops tracking (a
        # NamedTuple it never does): see gateway/garbage.py.
        self._ledger: OrderedDict[str, tuple[str, str, str, str, str, float, str]] = OrderedDict()
        # Ids already judged, the latest `ledger_size` of them: apart from the ledger, since a
        # judged decision may have come from the audit trail, not from it.
        self._judged: OrderedDict[str, None] = OrderedDict()
        self._ledger_size = ledger_size

    def record_answer(
        self,
        prediction_id: str,
        decision: Decision,
        latency_ms: float,
        degraded: bool,
        cached: bool,
    ) -> None:
        stats = self.arm(decision.model_id, decision.arm, decision.arm_model)
        stats.requests += 1
        stats.degraded += degraded
        stats.cached += cached
        stats.latency_ms_total += latency_ms
        stats.latency_ms_max = max(stats.latency_ms_max, latency_ms)
        self._ledger[prediction_id] = tuple(decision)
        if len(self._ledger) > self._ledger_size:
            self._ledger.popitem(last=False)

    def record_shadow(
        self, model_id: str, arm: str, arm_model: str, target: str, agreed: bool | None
    ) -> None:
        """One shadow comparison: agreed, disagreed, or (None) the shadow failed."""
        shadow = self.arm(model_id, arm, arm_model).shadows.setdefault(target, ShadowStats())
        if agreed is None:
            shadow.failed += 1
            return
        shadow.compared += 1
        shadow.agreed += agreed

    def decision(self, prediction_id: str) -> Decision | None:
        kept = self._ledger.get(prediction_id)
        return Decision._make(kept) if kept is not None else None

    def record_outcome(
        self,
        prediction_id: str,
        outcome: str,
        positive_label: str,
        decision: Decision | None = None,
    ) -> str:
        """Count a real outcome: `recorded`, `unknown` or `duplicate`. The decision judged is
        the ledger's, else `decision` (found elsewhere, in the audit trail)."""
        decision = self.decision(prediction_id) or decision
        if decision is None:
            return "unknown"
        if not self.claim(prediction_id):
            return "duplicate"
        self.count_outcome(decision, outcome, positive_label)
        return "recorded"

    def claim(self, prediction_id: str) -> bool:
        """Mark `prediction_id` judged; False when it was already (one outcome each)."""
        if prediction_id in self._judged:
            return False
        self._judged[prediction_id] = None
        if len(self._judged) > self._ledger_size:
            self._judged.popitem(last=False)
        return True

    def release(self, prediction_id: str) -> None:
        """Undo a claim whose outcome was not counted after all (it could not be audited)."""
        self._judged.pop(prediction_id, None)

    def count_outcome(self, decision: Decision, outcome: str, positive_label: str) -> None:
        """Count an outcome of `decision` under its arm and arm model (claimed first: `claim`)."""
        stats = self.arm(decision.model_id, decision.arm, decision.arm_model)
        stats.feedback += 1
        stats.positive_outcomes += outcome == positive_label
        stats.correct += outcome == decision.prediction

    def arm(self, model_id: str, arm: str, arm_model: str) -> ArmStats:
        return self._stats.setdefault(model_id, {}).setdefault(arm_key(arm, arm_model), ArmStats())

    def totals(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every arm's statistics as plain data (model → arm_key → fields), to share or keep."""
        return {
            model: {arm: stats.as_plain() for arm, stats in arms.items()}
            for model, arms in self._stats.items()
        }

    def add_totals(self, totals: Totals) -> None:
        """Count in statistics `totals` gave (a replaced worker's, so counts continue)."""
        for model, arms in totals.items():
            for key, plain in arms.items():
                self.arm(model, *split_arm_key(key)).add(ArmStats.from_plain(plain))

    def report(
        self, model_id: str, arm_models: Mapping[str, str], siblings: Iterable[Totals] = ()
    ) -> dict[str, dict]:
        """The report of each arm in `arm_models` (arm → the model it asks now, in policy
        order), with the statistics of `siblings` (other workers, replicas) counted in: the
        current arm model's at the top, earlier ones under `earlier_models`. Every arm but
        the first is compared with the first (the control) under `versus`."""
        combined: dict[str, dict[str, ArmStats]] = {}  # arm → arm model → statistics
        own = {key: stats.as_plain() for key, stats in self._stats.get(model_id, {}).items()}
        for totals in (own, *(sibling.get(model_id, {}) for sibling in siblings)):
            for key, plain in totals.items():
                arm, arm_model = split_arm_key(key)
                by_model = combined.setdefault(arm, {})
                by_model.setdefault(arm_model, ArmStats()).add(ArmStats.from_plain(plain))
        current = {arm: combined.get(arm, {}).get(m, ArmStats()) for arm, m in arm_models.items()}
        reference = next(iter(arm_models), None)  # the policy's first arm: the control
        reports = {}
        for arm, arm_model in sorted(arm_models.items()):
            reports[arm] = arm_report(combined.get(arm, {}), arm_model)
            if reference is not None and arm != reference:
                versus = current[arm].compared_with(current[reference])
                reports[arm]["versus"] = {"arm": reference, **versus}
        return reports


def arm_report(by_model: Mapping[str, ArmStats], current: str) -> dict[str, Any]:
    """One arm's report: its current model's statistics (zero before its first answer), and
    each earlier model's apart."""
    earlier = {m: stats.report() for m, stats in sorted(by_model.items()) if m != current}
    return {
        "model": current,
        **by_model.get(current, ArmStats()).report(),
        "earlier_models": earlier,
    }


# Everything an arm counts that adds up across workers (the maximum latency does not).
_SUMMED = (
    "requests", "degraded", "cached", "latency_ms_total", "feedback", "positive_outcomes",
    "correct",
)  # fmt: skip

Totals = Mapping[str, Mapping[str, Mapping[str, Any]]]  # model → arm_key → ArmStats.as_plain()


def _compared(
    name: str, part: int, whole: int, reference_part: int, reference_whole: int
) -> dict[str, Any]:
    """`<name>_difference` (this share less the reference's), its 95% interval for one look
    and `<name>`: whether that interval shows a difference; and the same from the 95%
    confidence sequence, valid however often the report is read (`<name>_anytime`)."""
    interval = difference_interval(part, whole, reference_part, reference_whole)
    sequence = difference_sequence(part, whole, reference_part, reference_whole)
    difference = (
        round(part / whole - reference_part / reference_whole, 6) if interval is not None else None
    )
    return {
        f"{name}_difference": difference,
        f"{name}_difference_ci95": interval,
        name: verdict(interval),
        f"{name}_difference_anytime95": sequence,
        f"{name}_anytime": verdict(sequence),
    }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None
