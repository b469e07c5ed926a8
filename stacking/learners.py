"""Level-2 learners fit on out-of-fold probabilities (scikit-learn style).

``fit(X_models, y, sample_weight=None, *, extra=None, verified=None)`` /
``predict_proba(X_models, *, extra=None)``, with ``X_models`` a dict
model -> (n, K) probabilities (see :mod:`stacking.base`). They must only ever
be fit on out-of-fold predictions; :mod:`stacking.evaluate` is the one place
that fits and scores them, always on disjoint rows.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from stacking.base import EPS, Level2Estimator, as_extra, expand_proba, row_weights


class LogisticFusion(Level2Estimator):
    """Logistic-regression score fusion on per-model standardised log-probabilities.

    Each model's log-probabilities are standardised by one mean and one std
    (over all its entries on the training rows only), so models with sharp
    and flat outputs enter on the same scale.

    ``per_model_weights=False`` (default): a full multinomial
    ``LogisticRegression`` over all K x M standardised log-probabilities
    (``Pipeline(StandardScaler, LogisticRegression(C))``) — it can learn
    class-specific trust in each model and cross-class evidence, at the cost
    of K * (K*M + 1) parameters.

    ``per_model_weights=True``: the paper's restricted form, one weight per
    model: score(c) = sum_m w_m * z_m(c) (+ a per-class bias when
    ``class_bias``), fit by L-BFGS on the weighted multinomial log-loss with
    an L2 penalty ||w||^2 / (2C). The paper's single global bias is a no-op
    under a softmax over classes, so it is left out.

    ``unverified_weight``: weight of non-verified rows (when ``verified`` is
    passed to fit); None weighs every row 1.
    """

    def __init__(self, C: float = 1.0, per_model_weights: bool = False, class_bias: bool = False,
                 unverified_weight: float | None = None, max_iter: int = 1000):
        self.C = C
        self.per_model_weights = per_model_weights
        self.class_bias = class_bias
        self.unverified_weight = unverified_weight
        self.max_iter = max_iter

    # -- features ------------------------------------------------------------
    def _standardised(self, mats: list[np.ndarray], fitting: bool) -> list[np.ndarray]:
        logs = [np.log(np.clip(p, EPS, 1.0)) for p in mats]
        if fitting:
            self.log_mean_ = np.array([lp.mean() for lp in logs])
            self.log_std_ = np.array([max(float(lp.std()), 1e-6) for lp in logs])
        return [(lp - mu) / sd for lp, mu, sd in zip(logs, self.log_mean_, self.log_std_)]

    # -- fitting -------------------------------------------------------------
    def fit(self, X_models, y, sample_weight=None, *, extra=None, verified=None):
        mats = self._check_models(X_models, fitting=True)
        n = mats[0].shape[0]
        y = self._check_y(y, n)
        w = row_weights(n, sample_weight, verified, self.unverified_weight)
        Z = self._standardised(mats, fitting=True)
        if self.per_model_weights:
            self._fit_restricted(np.stack(Z), y, w)
        else:
            self.pipeline_ = Pipeline([
                ("scale", StandardScaler()),
                ("lr", LogisticRegression(C=self.C, max_iter=self.max_iter)),
            ])
            params = {} if w is None else {"lr__sample_weight": w}
            self.pipeline_.fit(np.concatenate(Z, axis=1), y, **params)
        return self

    def _fit_restricted(self, Z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        """Convex problem in (w_m, b_c): weighted mean log-loss + L2 / (2 C sum(w))."""
        M, n, K = Z.shape
        sw = np.ones(n) if w is None else w
        total = sw.sum()
        onehot = np.zeros((n, K))
        onehot[np.arange(n), y] = 1.0
        reg = 1.0 / (self.C * total)

        def loss_grad(theta):
            wm = theta[:M]
            b = theta[M:] if self.class_bias else 0.0
            logp = log_softmax(np.tensordot(wm, Z, axes=1) + b, axis=1)
            loss = -(sw * logp[np.arange(n), y]).sum() / total + 0.5 * reg * (theta @ theta)
            g = (np.exp(logp) - onehot) * (sw / total)[:, None]
            grad = np.einsum("mnk,nk->m", Z, g)
            if self.class_bias:
                grad = np.concatenate([grad, g.sum(axis=0)])
            return loss, grad + reg * theta

        theta0 = np.zeros(M + (K if self.class_bias else 0))
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.coef_ = res.x[:M]
        self.intercept_ = res.x[M:] if self.class_bias else np.zeros(K)
        self.model_weights_ = dict(zip(self.models_, map(float, self.coef_)))

    def predict_proba(self, X_models, *, extra=None) -> np.ndarray:
        Z = self._standardised(self._check_models(X_models, fitting=False), fitting=False)
        if self.per_model_weights:
            return np.exp(log_softmax(np.tensordot(self.coef_, np.stack(Z), axes=1) + self.intercept_, axis=1))
        proba = self.pipeline_.predict_proba(np.concatenate(Z, axis=1))
        return expand_proba(proba, self.pipeline_.classes_, self.n_classes_)


class LightGBMStacker(Level2Estimator):
    """Gradient-boosted shallow trees on the concatenated out-of-fold
    probabilities plus optional per-clip features (``extra``, e.g. MFCC
    statistics; NaN allowed for clips without them) — the meta-learner of the
    1st public LB system. Non-verified rows weigh ``unverified_weight`` (None:
    all rows weigh 1). Deterministic for a given ``random_state``."""

    def __init__(self, n_estimators: int = 200, learning_rate: float = 0.05, max_depth: int = 3,
                 num_leaves: int = 8, min_child_samples: int = 20, reg_lambda: float = 1.0,
                 colsample_bytree: float = 1.0, unverified_weight: float | None = 0.6,
                 n_jobs: int = 1, random_state: int = 2018):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.colsample_bytree = colsample_bytree
        self.unverified_weight = unverified_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _design(self, mats: list[np.ndarray], extra, fitting: bool) -> np.ndarray:
        n = mats[0].shape[0]
        ex = as_extra(extra, n)
        width = 0 if ex is None else ex.shape[1]
        if fitting:
            self.n_extra_ = width
        elif width != self.n_extra_:
            raise ValueError(f"LightGBMStacker was fit with {self.n_extra_} extra feature(s), got {width}")
        return np.concatenate(mats + ([ex] if ex is not None else []), axis=1)

    def fit(self, X_models, y, sample_weight=None, *, extra=None, verified=None):
        import lightgbm as lgb

        if self.num_leaves > 2 ** self.max_depth:
            raise ValueError(f"num_leaves={self.num_leaves} exceeds 2**max_depth={2 ** self.max_depth}")
        mats = self._check_models(X_models, fitting=True)
        X = self._design(mats, extra, fitting=True)
        y = self._check_y(y, X.shape[0])
        w = row_weights(X.shape[0], sample_weight, verified, self.unverified_weight)
        self.booster_ = lgb.LGBMClassifier(
            objective="multiclass", n_estimators=self.n_estimators, learning_rate=self.learning_rate,
            max_depth=self.max_depth, num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
            reg_lambda=self.reg_lambda, colsample_bytree=self.colsample_bytree, n_jobs=self.n_jobs,
            random_state=self.random_state, deterministic=True, force_col_wise=True, verbose=-1)
        self.booster_.fit(X, y, sample_weight=w)
        return self

    def predict_proba(self, X_models, *, extra=None) -> np.ndarray:
        mats = self._check_models(X_models, fitting=False)
        proba = self.booster_.predict_proba(self._design(mats, extra, fitting=False))
        return expand_proba(proba, self.booster_.classes_, self.n_classes_)


LEARNERS = {"logreg": LogisticFusion, "lightgbm": LightGBMStacker}
