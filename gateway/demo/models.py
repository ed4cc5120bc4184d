"""Two small churn classifiers trained on the synthetic data: gradient boosting and logistic.

They are deliberately different (trees capture the interaction in the data, the linear model
cannot), so tests can tell which backend model answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from gateway.demo.data import FEATURE_ORDER, make_churn_dataset


class ProbabilisticClassifier(Protocol):
    """Anything with scikit-learn's ``classes_`` and ``predict_proba``."""

    classes_: np.ndarray

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Return class probabilities ``[batch, n_classes]``."""
        ...


@dataclass(frozen=True)
class ChurnModels:
    """The fitted demo models: the primary, its next version (a challenger), the simple one."""

    gbm: GradientBoostingClassifier
    logreg: Pipeline
    gbm_v2: GradientBoostingClassifier


def train_churn_models(seed: int = 7) -> ChurnModels:
    """Fit both models on ``make_churn_dataset(seed=seed)``; deterministic for a given seed."""
    features, labels = make_churn_dataset(seed=seed)
    # Small ensemble: fits in well under a second on one core, still clearly non-linear.
    gbm = GradientBoostingClassifier(
        n_estimators=60, max_depth=3, learning_rate=0.1, random_state=seed
    )
    gbm.fit(features, labels)
    # Features have very different scales (months vs dollars); scale so lbfgs converges fast.
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200))
    logreg.fit(features, labels)
    # The challenger: the primary's next version, more trees and a slower learning rate.
    gbm_v2 = GradientBoostingClassifier(
        n_estimators=120, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=seed
    )
    gbm_v2.fit(features, labels)
    return ChurnModels(gbm=gbm, logreg=logreg, gbm_v2=gbm_v2)


def churn_probability(model: ProbabilisticClassifier, features: np.ndarray) -> np.ndarray:
    """Return the churn (class 1) probability as float32 ``[batch, 1]``.

    ``features`` is ``[batch, 2]`` in FEATURE_ORDER (a single row ``[2]`` is also accepted).
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != len(FEATURE_ORDER):
        raise ValueError(f"features must have shape [batch, {len(FEATURE_ORDER)}], got {x.shape}")
    # Look the positive class up instead of assuming column 1, so label order can never flip it.
    positive_column = int(np.flatnonzero(model.classes_ == 1)[0])
    proba = model.predict_proba(x)[:, positive_column]
    return proba.astype(np.float32).reshape(-1, 1)
