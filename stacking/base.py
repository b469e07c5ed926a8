"""The one estimator interface every blend and stacker shares.

Level-2 inputs are several models' probability matrices, so ``X`` is a dict
``model -> (n, K)`` rather than one array: blends need the matrices apart,
and a stacker must see the same models, in the same order, at fit and
predict time. Optional per-clip features (e.g. MFCC statistics) travel as
``extra`` (array or DataFrame, one row per clip), the verification mask as
``verified`` — both keyword-only, so every caller passes them the same way.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

EPS = 1e-7


def as_extra(extra, n_rows: int) -> np.ndarray | None:
    """``extra`` as a float (n, F) array (None stays None); DataFrames keep column order."""
    if extra is None:
        return None
    arr = extra.to_numpy(dtype=np.float64) if isinstance(extra, pd.DataFrame) else np.asarray(extra, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n_rows:
        raise ValueError(f"extra features have shape {arr.shape}, expected ({n_rows}, F)")
    return arr


def row_weights(n_rows: int, sample_weight=None, verified=None, unverified_weight: float | None = None) -> np.ndarray | None:
    """Sample weights, with non-verified rows scaled by ``unverified_weight``
    (noisy labels count less). None when every row weighs the same."""
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).copy()
    if unverified_weight is not None and verified is not None:
        verified = np.asarray(verified, dtype=bool)
        if verified.shape != (n_rows,):
            raise ValueError(f"verified mask has shape {verified.shape}, expected ({n_rows},)")
        if w is None:
            w = np.ones(n_rows)
        w[~verified] *= float(unverified_weight)
    if w is not None and w.shape != (n_rows,):
        raise ValueError(f"sample_weight has shape {w.shape}, expected ({n_rows},)")
    return w


def expand_proba(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """Map a learner's columns (the classes it saw in training) onto all K
    classes; unseen classes get a tiny probability so every row still sums
    to 1 and log-based blending of the result stays finite."""
    seen = np.asarray(seen, dtype=int)
    if len(seen) == n_classes and np.array_equal(seen, np.arange(n_classes)):
        return np.asarray(proba, dtype=np.float64)
    out = np.full((proba.shape[0], n_classes), EPS)
    out[:, seen] = proba
    return out / out.sum(axis=1, keepdims=True)


class Level2Estimator(BaseEstimator):
    """Base of blends and stackers: ``fit(X_models, y, sample_weight=None, *,
    extra=None, verified=None)`` and ``predict_proba(X_models, *, extra=None)``.
    ``kind`` is how the score table lists it: ``blend`` or ``stacker``."""

    kind = "stacker"

    def _check_models(self, X_models: Mapping[str, np.ndarray], fitting: bool) -> list[np.ndarray]:
        """The models' matrices as float arrays, in the order fixed at fit time."""
        if not X_models:
            raise ValueError("X_models is empty: at least one model's probabilities are needed")
        names = list(X_models)
        if fitting:
            self.models_ = names
        else:
            fitted = getattr(self, "models_", None)
            if fitted is None:
                raise ValueError(f"{type(self).__name__} is not fitted: call fit first")
            if set(names) != set(fitted):
                raise ValueError(f"{type(self).__name__} was fit on models {fitted}, got {names}")
            names = fitted
        mats = [np.asarray(X_models[m], dtype=np.float64) for m in names]
        n, k = mats[0].shape if mats[0].ndim == 2 else (None, None)
        for m, a in zip(names, mats):
            if a.ndim != 2 or a.shape != (n, k):
                raise ValueError(f"model {m!r}: probabilities have shape {a.shape}, expected ({n}, {k})")
        if fitting:
            self.n_classes_ = k
            self.classes_ = np.arange(k)
        elif k != self.n_classes_:
            raise ValueError(f"{type(self).__name__} was fit with {self.n_classes_} classes, got {k}")
        return mats

    def _check_y(self, y, n_rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n_rows,):
            raise ValueError(f"y has shape {y.shape}, expected ({n_rows},)")
        y = y.astype(int)
        if y.min() < 0 or y.max() >= self.n_classes_:
            raise ValueError(f"labels must be class indices in [0, {self.n_classes_})")
        return y
