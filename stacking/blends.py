"""Fixed-weight blends of level-1 probabilities.

A blend has no fitted parameters (its weights are given), but it is exposed
through the same estimator interface as the learners so that every entry of
the score table is produced, and scored, the same way (cross-validated on
the shared folds).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import rankdata

from pipeline.predictions import geometric_mean, normalize_rows
from stacking.base import Level2Estimator


class Blend(Level2Estimator):
    """Base of the blends. ``weights``: dict model -> weight (missing models
    weigh 0 and must not all be 0), or None for equal weights."""

    def __init__(self, weights: Mapping[str, float] | None = None):
        self.weights = weights

    def fit(self, X_models, y=None, sample_weight=None, *, extra=None, verified=None):
        """Record the models (and check the weights name them); nothing is learnt."""
        self._check_models(X_models, fitting=True)
        self._weight_vector(self.models_)
        return self

    def _weight_vector(self, names: list[str]) -> np.ndarray:
        if self.weights is None:
            return np.ones(len(names))
        unknown = sorted(set(self.weights) - set(names))
        if unknown:
            raise ValueError(f"blend weights name model(s) {unknown} that are not being blended ({names})")
        w = np.array([float(self.weights.get(m, 0.0)) for m in names])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"blend weights must be finite, >= 0 and not all 0; got {dict(self.weights)}")
        return w

    def predict_proba(self, X_models, *, extra=None) -> np.ndarray:
        mats = self._check_models(X_models, fitting=False)
        return self._combine(mats, self._weight_vector(self.models_))

    def _combine(self, mats: list[np.ndarray], w: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class MeanBlend(Blend):
    """Weighted arithmetic mean of the probabilities."""

    def _combine(self, mats, w):
        return normalize_rows(np.tensordot(w / w.sum(), np.stack(mats), axes=1))


class GeometricMeanBlend(Blend):
    """Weighted geometric mean (the papers' way of combining folds and
    models): a class must be likely under every model to rank high."""

    def _combine(self, mats, w):
        return geometric_mean(mats, w)


class RankBlend(Blend):
    """Rank average: per model and per class, the probabilities are replaced
    by their rank over the clips being predicted (ties share the mean rank,
    scaled to (0, 1]); ranks are averaged over models and rows renormalised.
    Why: it ignores each model's calibration, only its ordering of clips.
    The ranks are taken over the predicted rows themselves (no labels are
    used), so a CV fold's rows are ranked among that fold's rows."""

    def _combine(self, mats, w):
        n = mats[0].shape[0]
        ranks = np.stack([rankdata(p, method="average", axis=0) / n for p in mats])
        return normalize_rows(np.tensordot(w / w.sum(), ranks, axes=1))


BLENDS = {"mean": MeanBlend, "geomean": GeometricMeanBlend, "rank": RankBlend}
