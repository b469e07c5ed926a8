"""Blends of level-1 probabilities: fixed-weight and learned-weight.

A fixed blend has no fitted parameters (its weights are given), but it is
exposed through the same estimator interface as the learners so that every
entry of the score table is produced, and scored, the same way
(cross-validated on the shared folds). :class:`LearnedGeometricBlend` fits
one non-negative weight per model on the training rows, and is scored by the
same cross-validation (its weights are refit on the other folds' rows for
every held-out fold).

Every blend reads the models' (n, K) blocks of the level-2 array through
the ``layout`` it is constructed with (:class:`stacking.base.Level2Layout`);
extra feature columns are ignored.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from scipy.stats import rankdata

from pipeline.predictions import geometric_mean, normalize_rows
from stacking.base import EPS, Level2Estimator, Level2Layout, check_sample_weight


class Blend(Level2Estimator):
    """Base of the blends. ``weights``: dict model -> weight (missing models
    weigh 0 and must not all be 0), or None for equal weights."""

    def __init__(self, layout: Level2Layout | None = None, weights: Mapping[str, float] | None = None):
        self.layout = layout
        self.weights = weights

    def fit(self, X, y=None, sample_weight=None):
        """Record the layout (and check the weights name its models); nothing is learnt."""
        self._check_X(X, fitting=True)
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

    def predict_proba(self, X) -> np.ndarray:
        mats = self.layout.probabilities(self._check_X(X, fitting=False))
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


class LearnedGeometricBlend(Level2Estimator):
    """Weighted geometric mean with one non-negative weight per model, fit on
    the training rows: p(c) proportional to exp(sum_m a_m log p_m(c)),
    a_m >= 0, minimising the (row-weighted) multinomial log-loss by L-BFGS-B.

    The problem is convex in ``a`` (a log-sum-exp of a linear function), so
    the optimum is unique and needs no restarts. The sum of the ``a_m`` acts
    as a temperature (calibration); the ranking, hence MAP@3, depends only on
    the normalised weights ``weights_`` (a / sum a), which is what a blend
    weight means. A model that adds nothing gets a weight at or near 0
    instead of an equal vote. M parameters, so it needs no inner CV.

    ``l2``: ridge penalty pulling ``a`` towards equal weights with the same
    sum (0: none). ``sample_weight`` (fit) weighs the rows' log-losses.
    """

    def __init__(self, layout: Level2Layout | None = None, l2: float = 0.0, max_iter: int = 500):
        self.layout = layout
        self.l2 = l2
        self.max_iter = max_iter

    @staticmethod
    def _logs(mats: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.log(np.clip(p, EPS, 1.0)) for p in mats])

    def fit(self, X, y, sample_weight=None):
        L = self._logs(self.layout.probabilities(self._check_X(X, fitting=True)))
        M, n, K = L.shape
        y = self._check_y(y, n)
        w = check_sample_weight(sample_weight, n)
        sw = np.ones(n) if w is None else w
        sw = sw / sw.sum()
        onehot = np.zeros((n, K))
        onehot[np.arange(n), y] = 1.0

        def loss_grad(a):
            logp = log_softmax(np.tensordot(a, L, axes=1), axis=1)
            loss = -(sw * logp[np.arange(n), y]).sum()
            g = (np.exp(logp) - onehot) * sw[:, None]
            grad = np.einsum("mnk,nk->m", L, g)
            if self.l2:
                dev = a - a.mean()
                loss += 0.5 * self.l2 * (dev @ dev)
                grad = grad + self.l2 * dev
            return loss, grad

        a0 = np.full(M, 1.0 / M)
        res = minimize(loss_grad, a0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * M,
                       options={"maxiter": self.max_iter})
        a = np.clip(res.x, 0.0, None)
        if a.sum() <= 1e-12:  # no model helps at all: fall back to the plain geometric mean
            a = a0
        self.coef_ = a
        self.temperature_ = float(a.sum())
        self.weights_ = dict(zip(self.models_, map(float, a / a.sum())))
        return self

    def predict_proba(self, X) -> np.ndarray:
        L = self._logs(self.layout.probabilities(self._check_X(X, fitting=False)))
        return np.exp(log_softmax(np.tensordot(self.coef_, L, axes=1), axis=1))
