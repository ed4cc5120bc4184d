"""The demo's monitoring baseline, computed from its own training data.

``python -m gateway.demo.baseline [--out baselines/customer-churn.json]``

Features are binned at the deciles of ``make_churn_dataset(seed=7)``, the data every demo model
is trained on; each served target's predicted probabilities on the same rows are binned the
same way. The ``*`` entry holds the features alone: an answer from any other version (or from
the rules) still says whether the traffic has moved, but there is no prediction to compare.

The output is deterministic (seeded data and models, values rounded to six decimals), so the
committed file can be checked against a fresh run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gateway.demo.data import FEATURE_ORDER, make_churn_dataset
from gateway.demo.models import ChurnModels, churn_probability, train_churn_models
from gateway.monitoring import ANY_VERSION, version_key

MODEL_ID = "customer-churn"
SEED = 7
BINS = 10
DEFAULT_OUT = Path("baselines") / f"{MODEL_ID}.json"

# Served target (as named in policies/customer-churn.yaml) and version → the fitted model.
TARGET_MODELS = {
    version_key("churn-gbm", "1"): "gbm",
    version_key("churn-gbm-v2", "1"): "gbm_v2",
    version_key("churn-logreg", "1"): "logreg",
}


def decile_bins(values: np.ndarray, bins: int = BINS) -> dict:
    """Interior cut points at the quantiles (ties merged) and the share of values in each bin."""
    # float32 data read back as the decimals a caller sends (28.19, not 28.1899986).
    values = np.round(np.asarray(values, dtype=np.float64).ravel(), 6)
    cuts = np.unique(np.round(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]), 6))
    # side="right" is bisect_right, the rule gateway.monitoring counts live traffic with.
    counts = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
    return {
        "edges": [float(c) for c in cuts],
        "proportions": [round(int(c) / len(values), 6) for c in counts],
    }


def feature_baselines(features: np.ndarray) -> dict[str, dict]:
    return {
        name: {"kind": "numeric", **decile_bins(features[:, column])}
        for column, name in enumerate(FEATURE_ORDER)
    }


def churn_baseline(models: ChurnModels, seed: int = SEED) -> dict:
    """The baseline document for `customer-churn`, as plain JSON-ready data."""
    features, _ = make_churn_dataset(seed=seed)
    binned_features = feature_baselines(features)
    versions: dict[str, dict] = {
        ANY_VERSION: {"sample_size": len(features), "features": binned_features}
    }
    for key, attribute in TARGET_MODELS.items():
        probabilities = churn_probability(getattr(models, attribute), features)
        versions[key] = {
            "sample_size": len(features),
            "features": binned_features,
            "prediction": decile_bins(probabilities),
        }
    return {
        "model_id": MODEL_ID,
        "description": (
            f"Deciles of make_churn_dataset(seed={seed}), the demo models' training data, "
            "and of each model's churn probability on it. Edges are interior cut points; "
            "bin i holds edges[i-1] <= x < edges[i]."
        ),
        "versions": versions,
    }


def render(baseline: dict) -> str:
    return json.dumps(baseline, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    text = render(churn_baseline(train_churn_models(SEED)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
