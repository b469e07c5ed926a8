"""Honest scores for single models, blends and stackers.

A stacker scored on rows it was fit on looks far better than it is, so this
module offers no "fit, then score the same rows" path: blends and stackers
are only ever scored through :func:`cross_validated_predictions`, which fits
on the shared folds' other folds and predicts the held-out fold, for every
fold. Single models are scored on their own OOF tables (no fitting). Test
predictions come from :func:`fit_final` (fit on all OOF rows, applied to the
test tables: different clips).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import clone

from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import normalize_rows
from stacking.base import Level2Estimator
from stacking.blends import Blend
from stacking.inputs import StackInputs

log = logging.getLogger("stacking")

LearnerFactory = Callable[[], Level2Estimator] | Level2Estimator


def _new_learner(factory: LearnerFactory) -> Level2Estimator:
    """A fresh, unfitted learner: an estimator is cloned, a callable called."""
    learner = clone(factory) if isinstance(factory, Level2Estimator) else factory()
    if not isinstance(learner, Level2Estimator):
        raise TypeError(f"learner factory returned {type(learner).__name__}, not a Level2Estimator")
    return learner


def _rows(X_models: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {m: p[idx] for m, p in X_models.items()}


def _checked(proba, n_rows: int, n_classes: int, what: str) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (n_rows, n_classes) or not np.isfinite(proba).all():
        raise ValueError(f"{what}: predicted probabilities of shape {proba.shape} (finite: "
                         f"{np.isfinite(proba).all()}), expected finite ({n_rows}, {n_classes})")
    return normalize_rows(proba)


def cross_validated_predictions(learner_factory: LearnerFactory, inputs: StackInputs) -> np.ndarray:
    """Level-2 OOF probabilities (n, K): for each fold k of ``folds.csv`` a
    fresh learner is fit on the rows with fold != k and predicts the rows with
    fold == k, so no row is ever predicted by a learner that saw its label."""
    n, k = len(inputs.y), len(inputs.classes)
    folds = np.asarray(inputs.folds)
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-validation needs at least 2 folds in folds.csv")
    out = np.full((n, k), np.nan)
    for fold in np.unique(folds):
        fit_idx, held_idx = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        learner = _new_learner(learner_factory)
        learner.fit(_rows(inputs.oof, fit_idx), inputs.y[fit_idx],
                    extra=None if inputs.extra is None else inputs.extra[fit_idx],
                    verified=inputs.verified[fit_idx])
        proba = learner.predict_proba(_rows(inputs.oof, held_idx),
                                      extra=None if inputs.extra is None else inputs.extra[held_idx])
        out[held_idx] = _checked(proba, len(held_idx), k, f"{type(learner).__name__} fold {fold}")
    return out


def fit_final(learner_factory: LearnerFactory, inputs: StackInputs) -> np.ndarray:
    """Test probabilities (n_test, K) of a learner fit on ALL OOF rows."""
    if not inputs.test:
        raise ValueError("no test tables loaded")
    learner = _new_learner(learner_factory)
    learner.fit(inputs.oof, inputs.y, extra=inputs.extra, verified=inputs.verified)
    proba = learner.predict_proba(inputs.test, extra=inputs.test_extra)
    return _checked(proba, len(inputs.test_fnames), len(inputs.classes), f"{type(learner).__name__} (test)")


def label_indices_for_test(test_fnames: Sequence[str], test_labels: pd.DataFrame | None,
                       classes: Sequence[str]) -> np.ndarray | None:
    """(n_test,) class index per test clip, -1 where unlabelled; None without labels."""
    if test_labels is None:
        return None
    index = {c: i for i, c in enumerate(classes)}
    lab = dict(zip(test_labels["fname"], test_labels["label"]))
    return np.array([index.get(lab.get(f), -1) for f in test_fnames], dtype=int)


def _score(y: np.ndarray, verified: np.ndarray, proba: np.ndarray,
           test_y: np.ndarray | None, test_proba: np.ndarray | None) -> dict:
    row = {"map3_all": map_at_3(y, proba),
           "map3_verified": map_at_3(y[verified], proba[verified]),
           "accuracy_all": accuracy(y, proba)}
    if test_y is not None:
        labelled = test_y >= 0
        row["map3_test"] = (map_at_3(test_y[labelled], test_proba[labelled])
                            if test_proba is not None and labelled.any() else float("nan"))
    return row


@dataclass
class Evaluation:
    scores: pd.DataFrame                 # name, kind, map3_all, map3_verified, accuracy_all[, map3_test]
    oof: dict[str, np.ndarray]           # name -> cross-validated OOF probabilities (a model's own OOF)
    test: dict[str, np.ndarray]          # name -> test probabilities (empty if with_test=False)
    kinds: dict[str, str]                # name -> model | blend | stacker


def evaluate(inputs: StackInputs, learners: Mapping[str, LearnerFactory], test_y: np.ndarray | None = None,
             with_test: bool = True) -> Evaluation:
    """Score every single model, then every blend/stacker in ``learners``
    (name -> factory or unfitted estimator), all on cross-validated OOF rows;
    with ``with_test`` also produce each one's test probabilities (and score
    them when ``test_y`` is given)."""
    clash = sorted(set(learners) & set(inputs.oof))
    if clash:
        raise ValueError(f"learner name(s) {clash} are also model names: rename them")
    if test_y is not None and not with_test:
        raise ValueError("test scores need with_test=True")
    rows, oof, test, kinds = [], {}, {}, {}
    for model, proba in inputs.oof.items():
        oof[model], kinds[model] = proba, "model"
        if with_test:
            test[model] = inputs.test[model]
        rows.append({"name": model, "kind": "model",
                     **_score(inputs.y, inputs.verified, proba, test_y, test.get(model))})
    for name, factory in learners.items():
        start = time.time()
        kind = "blend" if isinstance(_new_learner(factory), Blend) else "stacker"
        oof[name], kinds[name] = cross_validated_predictions(factory, inputs), kind
        if with_test:
            test[name] = fit_final(factory, inputs)
        rows.append({"name": name, "kind": kind,
                     **_score(inputs.y, inputs.verified, oof[name], test_y, test.get(name))})
        log.info("%s (%s): cv MAP@3 %.4f (%.1f s)", name, kind, rows[-1]["map3_all"], time.time() - start)
    return Evaluation(scores=pd.DataFrame(rows), oof=oof, test=test, kinds=kinds)
