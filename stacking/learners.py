"""Level-2 stackers fit on out-of-fold probabilities, and the learner registry.

Stackers are scikit-learn classifiers on the level-2 array (see
:mod:`stacking.base`): ``fit(X, y, sample_weight=None)`` / ``predict_proba(X)``,
with the array's columns described by the ``layout`` they are constructed
with. They must only ever be fit on out-of-fold predictions;
:mod:`stacking.evaluate` is the one place that fits and scores them, always
on disjoint rows.

:data:`REGISTRY` is the one list of level-2 learners the stage knows: name ->
:class:`LearnerSpec` (kind, and a factory that builds the unfitted estimator
from the resolved ``stacking`` settings, the layout and the seed). The
stage scores the registered learners (those ``stacking.learners`` names
when given, else all, in registration order); adding a learner is one
:func:`register` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from stacking.base import EPS, Level2Estimator, Level2Layout, check_sample_weight, expand_proba
from stacking.blends import GeometricMeanBlend, LearnedGeometricBlend, MeanBlend, RankBlend


def inner_splits(y: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner cross-validation folds over a learner's OWN training rows
    (stratified when every class has at least ``n_splits`` rows), used to
    choose regularisation; the outer evaluation's held-out rows never enter."""
    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    splitter = (StratifiedKFold(n_splits, shuffle=True, random_state=seed) if counts.min() >= n_splits
                else KFold(n_splits, shuffle=True, random_state=seed))
    return list(splitter.split(np.zeros(len(y)), y))


def weighted_log_loss(y: np.ndarray, proba: np.ndarray, w: np.ndarray | None) -> float:
    p = np.clip(np.asarray(proba)[np.arange(len(y)), y], EPS, 1.0)
    return float(np.average(-np.log(p), weights=w))


def _grid(value) -> list:
    """A setting that is a number or a list of candidates (a list: chosen by inner CV)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if not values:
            raise ValueError("an empty list of candidates")
        return values
    return [value]


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

    ``C``: the inverse L2 strength, a number, or a list of candidates chosen
    by inner cross-validation (``inner_folds`` folds of the TRAINING rows
    only, lowest row-weighted held-out log-loss), then refit on all training
    rows with the chosen ``C_``; ``inner_scores_`` holds C -> inner log-loss.

    ``sample_weight`` (fit) weighs the rows' log-losses, in the inner CV too.
    Extra feature columns of the layout are ignored.
    """

    def __init__(self, layout: Level2Layout | None = None, C: float | Sequence[float] = 1.0,
                 per_model_weights: bool = False, class_bias: bool = False, max_iter: int = 1000,
                 inner_folds: int = 3, random_state: int = 0):
        self.layout = layout
        self.C = C
        self.per_model_weights = per_model_weights
        self.class_bias = class_bias
        self.max_iter = max_iter
        self.inner_folds = inner_folds
        self.random_state = random_state

    # -- features ------------------------------------------------------------
    def _standardised(self, mats: list[np.ndarray], fitting: bool) -> list[np.ndarray]:
        logs = [np.log(np.clip(p, EPS, 1.0)) for p in mats]
        if fitting:
            self.log_mean_ = np.array([lp.mean() for lp in logs])
            self.log_std_ = np.array([max(float(lp.std()), 1e-6) for lp in logs])
        return [(lp - mu) / sd for lp, mu, sd in zip(logs, self.log_mean_, self.log_std_)]

    # -- fitting -------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        mats = self.layout.probabilities(self._check_X(X, fitting=True))
        n = mats[0].shape[0]
        y = self._check_y(y, n)
        w = check_sample_weight(sample_weight, n)
        Z = np.stack(self._standardised(mats, fitting=True))  # (M, n, K)
        Cs = [float(c) for c in _grid(self.C)]
        if any(not np.isfinite(c) or c <= 0 for c in Cs):
            raise ValueError(f"C must be > 0, got {self.C}")
        self.inner_scores_ = {}
        if len(Cs) > 1:
            if self.inner_folds < 2:
                raise ValueError(f"choosing C from {Cs} needs inner_folds >= 2, got {self.inner_folds}")
            splits = inner_splits(y, self.inner_folds, self.random_state)
            for C in Cs:
                losses = []
                for tr, va in splits:
                    state = self._fit_once(Z[:, tr], y[tr], None if w is None else w[tr], C)
                    losses.append(weighted_log_loss(y[va], self._predict_once(state, Z[:, va]),
                                                    None if w is None else w[va]))
                self.inner_scores_[C] = float(np.mean(losses))
            self.C_ = min(self.inner_scores_, key=self.inner_scores_.get)
        else:
            self.C_ = Cs[0]
        self._state = self._fit_once(Z, y, w, self.C_)
        if self.per_model_weights:
            self.coef_, self.intercept_ = self._state
            self.model_weights_ = dict(zip(self.models_, map(float, self.coef_)))
        else:
            self.pipeline_ = self._state
        return self

    def _fit_once(self, Z: np.ndarray, y: np.ndarray, w: np.ndarray | None, C: float):
        if self.per_model_weights:
            return self._fit_restricted(Z, y, w, C)
        pipe = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(C=C, max_iter=self.max_iter))])
        params = {} if w is None else {"lr__sample_weight": w}
        pipe.fit(np.concatenate(list(Z), axis=1), y, **params)
        return pipe

    def _predict_once(self, state, Z: np.ndarray) -> np.ndarray:
        if self.per_model_weights:
            coef, intercept = state
            return np.exp(log_softmax(np.tensordot(coef, Z, axes=1) + intercept, axis=1))
        proba = state.predict_proba(np.concatenate(list(Z), axis=1))
        return expand_proba(proba, state.classes_, self.n_classes_)

    def _fit_restricted(self, Z: np.ndarray, y: np.ndarray, w: np.ndarray | None, C: float):
        """Convex problem in (w_m, b_c): weighted mean log-loss + L2 / (2 C sum(w))."""
        M, n, K = Z.shape
        sw = np.ones(n) if w is None else w
        total = sw.sum()
        onehot = np.zeros((n, K))
        onehot[np.arange(n), y] = 1.0
        reg = 1.0 / (C * total)

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
        return res.x[:M], (res.x[M:] if self.class_bias else np.zeros(K))

    def predict_proba(self, X) -> np.ndarray:
        Z = self._standardised(self.layout.probabilities(self._check_X(X, fitting=False)), fitting=False)
        return self._predict_once(self._state, np.stack(Z))


class LightGBMStacker(Level2Estimator):
    """Gradient-boosted shallow trees on every column of the level-2 array:
    the concatenated out-of-fold probabilities plus the layout's optional
    per-clip features (e.g. MFCC statistics; NaN allowed for clips without
    them) — the meta-learner of the 1st public LB system. ``sample_weight``
    (fit) weighs the rows. Deterministic for a given ``random_state``.

    ``inner_folds`` >= 2: regularisation chosen by inner cross-validation over
    the TRAINING rows only: for every (``num_leaves``, ``min_child_samples``)
    pair (each may be a list of candidates), ``lightgbm.cv`` on
    ``inner_folds`` folds with early stopping (``early_stopping_rounds``) gives
    the held-out (row-weighted) multi-logloss curve; the pair with the lowest
    inner loss is refit on all training rows (``best_params_``,
    ``inner_scores_``) with its best number of trees scaled by
    inner_folds / (inner_folds - 1) (the refit sees that much more data; at
    most ``n_estimators``) when ``scale_trees``. ``inner_folds`` 0: one fit
    with ``n_estimators`` trees and single values.
    """

    def __init__(self, layout: Level2Layout | None = None, n_estimators: int = 200, learning_rate: float = 0.05,
                 max_depth: int = 3, num_leaves: int | Sequence[int] = 8,
                 min_child_samples: int | Sequence[int] = 20, reg_lambda: float = 1.0,
                 colsample_bytree: float = 1.0, n_jobs: int = 1, random_state: int = 2018, inner_folds: int = 0,
                 early_stopping_rounds: int = 30, scale_trees: bool = True):
        self.layout = layout
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.colsample_bytree = colsample_bytree
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.inner_folds = inner_folds
        self.early_stopping_rounds = early_stopping_rounds
        self.scale_trees = scale_trees

    def _candidates(self) -> list[dict]:
        leaves, mcs = [int(v) for v in _grid(self.num_leaves)], [int(v) for v in _grid(self.min_child_samples)]
        too_many = [v for v in leaves if v > 2 ** self.max_depth]
        if too_many:
            raise ValueError(f"num_leaves={too_many[0]} exceeds 2**max_depth={2 ** self.max_depth}")
        grid = [{"num_leaves": nl, "min_child_samples": m} for nl in leaves for m in mcs]
        if len(grid) > 1 and self.inner_folds < 2:
            raise ValueError("lists of num_leaves/min_child_samples candidates need inner_folds >= 2")
        return grid

    def _inner_cv(self, X, y, w, grid: list[dict]) -> tuple[dict, int]:
        """(params, n_trees) with the lowest inner-CV held-out multi-logloss."""
        import lightgbm as lgb

        classes, y_enc = np.unique(y, return_inverse=True)
        splits = inner_splits(y, self.inner_folds, self.random_state)
        self.inner_scores_ = {}
        best = None
        for cand in grid:
            params = {"objective": "multiclass", "num_class": len(classes), "learning_rate": self.learning_rate,
                      "max_depth": self.max_depth, "num_leaves": cand["num_leaves"],
                      "min_data_in_leaf": cand["min_child_samples"], "lambda_l2": self.reg_lambda,
                      "feature_fraction": self.colsample_bytree, "num_threads": self.n_jobs,
                      "seed": self.random_state, "deterministic": True, "force_col_wise": True,
                      "feature_pre_filter": False, "verbose": -1}
            data = lgb.Dataset(X, label=y_enc, weight=w, params={"verbose": -1, "feature_pre_filter": False},
                               free_raw_data=False)
            res = lgb.cv(params, data, num_boost_round=self.n_estimators, folds=splits, stratified=False,
                         shuffle=False, callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
            curve = np.asarray(res["valid multi_logloss-mean"])
            it = int(np.argmin(curve))
            key = (cand["num_leaves"], cand["min_child_samples"])
            self.inner_scores_[key] = {"logloss": float(curve[it]), "n_estimators": it + 1}
            if best is None or curve[it] < best[0]:
                best = (float(curve[it]), cand, it + 1)
        n_trees = best[2]
        if self.scale_trees:
            n_trees = min(self.n_estimators, int(np.ceil(n_trees * self.inner_folds / (self.inner_folds - 1))))
        return best[1], n_trees

    def fit(self, X, y, sample_weight=None):
        import lightgbm as lgb

        grid = self._candidates()
        X = self._check_X(X, fitting=True)
        y = self._check_y(y, X.shape[0])
        w = check_sample_weight(sample_weight, X.shape[0])
        if self.inner_folds >= 2 and len(np.unique(y)) > 1:
            params, n_trees = self._inner_cv(X, y, w, grid)
        else:
            params, n_trees, self.inner_scores_ = grid[0], self.n_estimators, {}
        self.best_params_ = {**params, "n_estimators": n_trees}
        self.booster_ = lgb.LGBMClassifier(
            objective="multiclass", n_estimators=n_trees, learning_rate=self.learning_rate,
            max_depth=self.max_depth, num_leaves=params["num_leaves"],
            min_child_samples=params["min_child_samples"], reg_lambda=self.reg_lambda,
            colsample_bytree=self.colsample_bytree, n_jobs=self.n_jobs,
            random_state=self.random_state, deterministic=True, force_col_wise=True, verbose=-1)
        self.booster_.fit(X, y, sample_weight=w)
        return self

    def predict_proba(self, X) -> np.ndarray:
        proba = self.booster_.predict_proba(self._check_X(X, fitting=False))
        return expand_proba(proba, self.booster_.classes_, self.n_classes_)


# ---------------------------------------------------------------------------
# the registry
KINDS = ("blend", "stacker")

#: ``factory(settings, layout, seed) -> unfitted estimator``; ``settings`` is the
#: resolved ``stacking`` section (blend ``weights`` already restricted to the stacked models)
LearnerFactory = Callable[[dict, Level2Layout, int], Level2Estimator]


@dataclass(frozen=True)
class LearnerSpec:
    """One registered level-2 learner."""
    name: str
    kind: str                      # blend | stacker (how the score table lists it)
    factory: LearnerFactory
    extra_features: bool = False   # it uses the per-clip features (the stage then loads them)

    def build(self, settings: dict, layout: Level2Layout, seed: int) -> Level2Estimator:
        learner = self.factory(settings, layout, seed)
        if not isinstance(learner, Level2Estimator):
            raise TypeError(f"learner {self.name!r}: factory returned {type(learner).__name__}, "
                            "not a Level2Estimator")
        return learner


REGISTRY: dict[str, LearnerSpec] = {}


def register(name: str, kind: str, factory: LearnerFactory, extra_features: bool = False) -> LearnerSpec:
    """Add a learner to :data:`REGISTRY` (after the ones already there)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a learner needs a non-empty name, got {name!r}")
    if name in REGISTRY:
        raise ValueError(f"learner {name!r} is already registered")
    if kind not in KINDS:
        raise ValueError(f"learner {name!r}: kind must be one of {KINDS}, got {kind!r}")
    spec = LearnerSpec(name, kind, factory, extra_features)
    REGISTRY[name] = spec
    return spec


def registered_learners() -> list[str]:
    """The registered learners' names, in registration order."""
    return list(REGISTRY)


register("mean", "blend", lambda s, layout, seed: MeanBlend(layout, weights=s["weights"] or None))
register("geomean", "blend", lambda s, layout, seed: GeometricMeanBlend(layout, weights=s["weights"] or None))
register("rank", "blend", lambda s, layout, seed: RankBlend(layout, weights=s["weights"] or None))
register("learned", "blend", lambda s, layout, seed: LearnedGeometricBlend(layout, **s["learned"]))
register("logreg", "stacker", lambda s, layout, seed: LogisticFusion(layout, random_state=seed, **s["logreg"]))
register("lightgbm", "stacker", lambda s, layout, seed: LightGBMStacker(layout, random_state=seed, **s["lightgbm"]),
         extra_features=True)
