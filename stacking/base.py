"""The one estimator interface every blend and stacker shares.

Level-2 inputs are one float array ``X`` (n, M*K + F): the M stacked
models' probability matrices side by side (model-major: model 0's K class
columns, then model 1's, ...), then F optional per-clip features (e.g. MFCC
statistics). :class:`Level2Layout` says which column is which; every learner
is given the layout at construction (``layout=``), so a blend or a
per-model-weight stacker reads each model's (n, K) block from ``X`` by
position instead of from a dict, and scikit-learn can split, clone and
cross-validate it like any classifier: ``fit(X, y, sample_weight=None)``,
``predict_proba(X)``, ``predict(X)``, ``get_params`` / ``clone`` from
``BaseEstimator``. Labels are class indices 0..K-1 (``classes_``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.predictions import EPS  # one epsilon for every probability clip
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin



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


def verified_weights(verified, unverified_weight: float | None) -> np.ndarray | None:
    """Row weights: 1 for verified rows, ``unverified_weight`` for the others
    (noisy labels count less); None (every row weighs the same) when
    ``unverified_weight`` is None."""
    if unverified_weight is None:
        return None
    verified = np.asarray(verified, dtype=bool)
    if verified.ndim != 1:
        raise ValueError(f"verified mask has shape {verified.shape}, expected (n,)")
    w = np.ones(len(verified))
    w[~verified] *= float(unverified_weight)
    return w


def check_sample_weight(sample_weight, n_rows: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n_rows,):
        raise ValueError(f"sample_weight has shape {w.shape}, expected ({n_rows},)")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sample_weight must be finite, >= 0 and not all 0")
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


@dataclass(frozen=True)
class Level2Layout:
    """Column metadata of a level-2 array: ``models`` x ``classes`` probability
    columns (model-major), then the ``extra`` per-clip feature columns."""
    models: tuple[str, ...]
    classes: tuple[str, ...]
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(map(str, self.models)))
        object.__setattr__(self, "classes", tuple(map(str, self.classes)))
        object.__setattr__(self, "extra", tuple(map(str, self.extra)))
        if not self.models:
            raise ValueError("a level-2 layout needs at least one model")
        if not self.classes:
            raise ValueError("a level-2 layout needs at least one class")
        for what, names in (("models", self.models), ("classes", self.classes), ("extra", self.extra)):
            if len(set(names)) != len(names):
                raise ValueError(f"level-2 layout: {what} listed twice: {list(names)}")

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_extra(self) -> int:
        return len(self.extra)

    @property
    def n_probability_columns(self) -> int:
        return self.n_models * self.n_classes

    @property
    def n_columns(self) -> int:
        return self.n_probability_columns + self.n_extra

    @property
    def columns(self) -> list[str]:
        """Column names: ``model:class`` for the probabilities, then the extra features' names."""
        return [f"{m}:{c}" for m in self.models for c in self.classes] + list(self.extra)

    def model_slice(self, model: str) -> slice:
        i = self.models.index(model)
        return slice(i * self.n_classes, (i + 1) * self.n_classes)

    def with_extra(self, names: Sequence[str]) -> "Level2Layout":
        return Level2Layout(self.models, self.classes, tuple(names))

    def check(self, X) -> np.ndarray:
        """``X`` as a float64 (n, n_columns) array, or a ValueError."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_columns:
            raise ValueError(f"level-2 input has shape {X.shape}, expected (n, {self.n_columns}): "
                             f"{self.n_models} model(s) x {self.n_classes} classes + {self.n_extra} extra column(s)")
        return X

    def probabilities(self, X) -> list[np.ndarray]:
        """Each model's (n, K) probability block of ``X`` (contiguous copies, in model order)."""
        X = self.check(X)
        k = self.n_classes
        return [np.ascontiguousarray(X[:, i * k:(i + 1) * k]) for i in range(self.n_models)]

    def extra_features(self, X) -> np.ndarray | None:
        """The (n, F) extra feature columns of ``X``, or None without any."""
        X = self.check(X)
        return np.ascontiguousarray(X[:, self.n_probability_columns:]) if self.n_extra else None

    def join(self, probabilities: Sequence[np.ndarray], extra=None) -> np.ndarray:
        """The level-2 array from the models' (n, K) matrices (in model order) and the extra features."""
        if len(probabilities) != self.n_models:
            raise ValueError(f"{len(probabilities)} probability matrices for {self.n_models} model(s)")
        mats = [np.asarray(p, dtype=np.float64) for p in probabilities]
        n = mats[0].shape[0]
        for m, p in zip(self.models, mats):
            if p.shape != (n, self.n_classes):
                raise ValueError(f"model {m!r}: probabilities have shape {p.shape}, expected ({n}, {self.n_classes})")
        ex = as_extra(extra, n)
        if (0 if ex is None else ex.shape[1]) != self.n_extra:
            raise ValueError(f"{0 if ex is None else ex.shape[1]} extra column(s) for a layout with {self.n_extra}")
        return np.concatenate(mats + ([ex] if ex is not None else []), axis=1)


class Level2Estimator(ClassifierMixin, BaseEstimator):
    """Base of blends and stackers: ``fit(X, y, sample_weight=None)`` and
    ``predict_proba(X)`` on level-2 arrays described by ``self.layout``
    (given at construction). Whether a learner is a blend or a stacker is
    the registry's business (:mod:`stacking.learners`), not the class's."""

    def _layout(self) -> Level2Layout:
        layout = getattr(self, "layout", None)
        if not isinstance(layout, Level2Layout):
            raise ValueError(f"{type(self).__name__} needs layout=Level2Layout(...) (the columns of its input)")
        return layout

    def _check_X(self, X, fitting: bool) -> np.ndarray:
        """``X`` as float64, checked against the layout; fitting records the classes."""
        layout = self._layout()
        if not fitting and getattr(self, "classes_", None) is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit first")
        X = layout.check(X)
        if fitting:
            self.models_ = list(layout.models)
            self.n_classes_ = layout.n_classes
            self.classes_ = np.arange(layout.n_classes)
            self.n_features_in_ = layout.n_columns
        return X

    def _check_y(self, y, n_rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n_rows,):
            raise ValueError(f"y has shape {y.shape}, expected ({n_rows},)")
        y = y.astype(int)
        if y.min() < 0 or y.max() >= self.n_classes_:
            raise ValueError(f"labels must be class indices in [0, {self.n_classes_})")
        return y

    def predict(self, X) -> np.ndarray:
        """The most probable class index per row."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
