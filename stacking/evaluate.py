"""Honest scores for single models, blends and stackers.

A stacker scored on rows it was fit on looks far better than it is, so this
module offers no "fit, then score the same rows" path: blends and stackers
are only ever scored through :func:`cross_validated_predictions`, which is
scikit-learn's ``cross_val_predict`` over ``PredefinedSplit(folds)``: a clone
of the learner is fit on the shared folds' other folds (with their rows'
sample weights) and predicts the held-out fold, for every fold. Any inner
cross-validation (regularisation) happens inside the learner's ``fit``, on
its training rows only. Single models are scored on their own OOF tables
(no fitting). Test predictions come from :func:`fit_final` (fit on all OOF
rows, applied to the test tables: different clips).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import PredefinedSplit, cross_val_predict

from pipeline.metrics import accuracy, map_at_3, precision_at_rank
from pipeline.predictions import normalize_rows
from stacking.base import Level2Estimator
from stacking.inputs import Level2Inputs

log = logging.getLogger("stacking")


def _checked(proba, n_rows: int, n_classes: int, what: str) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (n_rows, n_classes) or not np.isfinite(proba).all():
        raise ValueError(f"{what}: predicted probabilities of shape {proba.shape} (finite: "
                         f"{np.isfinite(proba).all()}), expected finite ({n_rows}, {n_classes})")
    return normalize_rows(proba)


def _check_learner(learner) -> Level2Estimator:
    if not isinstance(learner, Level2Estimator):
        raise TypeError(f"a level-2 learner must be an unfitted Level2Estimator, got {type(learner).__name__}")
    return learner


def _fit_params(inputs: Level2Inputs) -> dict:
    return {} if inputs.sample_weight is None else {"sample_weight": inputs.sample_weight}


def cross_validated_predictions(learner: Level2Estimator, inputs: Level2Inputs) -> np.ndarray:
    """Level-2 OOF probabilities (n, K) by ``cross_val_predict`` over
    ``PredefinedSplit(folds)``: for each fold k of ``folds.csv`` a clone of
    ``learner`` is fit on the rows with fold != k (and their sample weights)
    and predicts the rows with fold == k, so no row is ever predicted by a
    learner that saw its label."""
    _check_learner(learner)
    n, k = len(inputs.y), len(inputs.classes)
    folds = np.asarray(inputs.folds)
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-validation needs at least 2 folds in folds.csv")
    if (folds < 0).any():
        raise ValueError("every row needs a fold >= 0 (each row is predicted once, from its own fold)")
    # cross_val_predict label-encodes y before fitting: the class indices pass
    # unchanged only when every class is among the labels
    missing = np.setdiff1d(np.arange(k), inputs.y)
    if len(missing):
        raise ValueError(f"class(es) {[inputs.classes[i] for i in missing]} have no row in the level-2 "
                         "inputs: a level-2 learner cannot be cross-validated without them")
    proba = cross_val_predict(learner, inputs.X_oof, inputs.y, cv=PredefinedSplit(folds),
                              method="predict_proba", params=_fit_params(inputs))
    return _checked(proba, n, k, f"{type(learner).__name__} (cross-validated)")


def fit_final(learner: Level2Estimator, inputs: Level2Inputs, return_learner: bool = False):
    """Test probabilities (n_test, K) of a clone of ``learner`` fit on ALL OOF
    rows (and the fitted clone with ``return_learner``)."""
    if inputs.X_test is None:
        raise ValueError("no test tables loaded")
    fitted = clone(_check_learner(learner)).fit(inputs.X_oof, inputs.y, **_fit_params(inputs))
    proba = _checked(fitted.predict_proba(inputs.X_test), len(inputs.test_fnames), len(inputs.classes),
                     f"{type(learner).__name__} (test)")
    return (proba, fitted) if return_learner else proba


def label_indices_for_test(test_fnames: Sequence[str], test_labels: pd.DataFrame | None,
                       classes: Sequence[str]) -> np.ndarray | None:
    """(n_test,) class index per test clip, -1 where unlabelled; None without labels."""
    if test_labels is None:
        return None
    index = {c: i for i, c in enumerate(classes)}
    lab = dict(zip(test_labels["fname"], test_labels["label"]))
    return np.array([index.get(lab.get(f), -1) for f in test_fnames], dtype=int)


def fold_standard_error(values: np.ndarray, folds: np.ndarray) -> float:
    """Standard error of the mean of per-row ``values`` from the folds: the
    std (ddof=1) of the K per-fold means over sqrt(K). It sees fold-to-fold
    variation (a level-2 learner is refit per fold) that a row-level SE
    cannot; NaN with fewer than 2 folds."""
    values, folds = np.asarray(values, dtype=np.float64), np.asarray(folds)
    means = np.array([values[folds == f].mean() for f in np.unique(folds)])
    return float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) >= 2 else float("nan")


def row_standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of per-row ``values``: std (ddof=1) / sqrt(n)
    (the analytic form of a bootstrap over rows); NaN with fewer than 2 rows."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else float("nan")


@dataclass(frozen=True)
class PairedDifference:
    """MAP@3(a) - MAP@3(b) on the same rows, with two standard errors of it."""
    diff: float
    se_rows: float    # SE of the mean of the per-row AP@3 differences
    se_folds: float   # SE from the K per-fold MAP@3 differences
    n_rows_differ: int

    def se(self, kind: str = "max") -> float:
        """``rows``, ``folds`` or ``max`` (the larger, the cautious choice)."""
        if kind == "rows":
            return self.se_rows
        if kind == "folds":
            return self.se_folds
        if kind == "max":
            return float(np.nanmax([self.se_rows, self.se_folds]))
        raise ValueError(f"unknown standard error {kind!r} (rows, folds or max)")


def paired_difference(ap_a: np.ndarray, ap_b: np.ndarray, folds: np.ndarray) -> PairedDifference:
    """Paired comparison of two learners' per-row AP@3 on the same rows:
    the noise shared by both (hard clips, label noise) cancels, so the SE of
    the difference is far smaller than either score's own SE."""
    d = np.asarray(ap_a, dtype=np.float64) - np.asarray(ap_b, dtype=np.float64)
    return PairedDifference(diff=float(d.mean()), se_rows=row_standard_error(d),
                            se_folds=fold_standard_error(d, folds), n_rows_differ=int((d != 0).sum()))


def _score(y: np.ndarray, verified: np.ndarray, folds: np.ndarray, proba: np.ndarray,
           test_y: np.ndarray | None, test_proba: np.ndarray | None) -> dict:
    ap = precision_at_rank(y, proba, 3)
    row = {"map3_all": float(ap.mean()),
           "map3_all_se": fold_standard_error(ap, folds),
           "map3_all_se_rows": row_standard_error(ap),
           "map3_verified": map_at_3(y[verified], proba[verified]),
           "map3_verified_se": fold_standard_error(ap[verified], folds[verified]),
           "accuracy_all": accuracy(y, proba)}
    if test_y is not None:
        labelled = test_y >= 0
        ok = test_proba is not None and labelled.any()
        test_ap = precision_at_rank(test_y[labelled], test_proba[labelled], 3) if ok else None
        row["map3_test"] = float(test_ap.mean()) if ok else float("nan")
        row["map3_test_se"] = row_standard_error(test_ap) if ok else float("nan")
    return row


DIFF_COLUMNS = ["diff_vs_default", "diff_se", "diff_se_rows", "diff_se_folds"]
TEST_DIFF_COLUMNS = ["diff_test_vs_default", "diff_test_se"]


@dataclass
class Evaluation:
    scores: pd.DataFrame                 # name, kind, map3_all, map3_all_se, ... (see evaluate)
    oof: dict[str, np.ndarray]           # name -> cross-validated OOF probabilities (a model's own OOF)
    test: dict[str, np.ndarray]          # name -> test probabilities (empty if with_test=False)
    kinds: dict[str, str]                # name -> model | blend | stacker
    ap3: dict[str, np.ndarray] = field(default_factory=dict)       # name -> per-row AP@3 (cross-validated)
    test_ap3: dict[str, np.ndarray] = field(default_factory=dict)  # name -> per labelled test row AP@3
    folds: np.ndarray | None = None      # (n,) fold per row, for fold-level standard errors
    reference: str | None = None         # the name diff_vs_default is measured against
    fitted: dict[str, Level2Estimator] = field(default_factory=dict)  # name -> learner fit on all OOF rows

    def difference(self, a: str, b: str) -> PairedDifference:
        """Paired cross-validated MAP@3(a) - MAP@3(b)."""
        return paired_difference(self.ap3[a], self.ap3[b], self.folds)


def add_differences(ev: Evaluation, reference: str, se_kind: str = "max") -> Evaluation:
    """Add each row's paired difference to ``reference`` (usually the default
    final learner) to ``ev.scores``: diff_vs_default (cross-validated MAP@3
    minus the reference's), its SE over rows and over folds, and diff_se
    (the one ``se_kind`` names; ``max`` by default); with test scores also
    diff_test_vs_default and its row SE."""
    if reference not in ev.ap3:
        raise ValueError(f"reference {reference!r} is not among the scored names {list(ev.ap3)}")
    rows = []
    for name in ev.scores["name"]:
        pd_ = ev.difference(name, reference)
        row = {"diff_vs_default": pd_.diff, "diff_se": pd_.se(se_kind), "diff_se_rows": pd_.se_rows,
               "diff_se_folds": pd_.se_folds}
        if name in ev.test_ap3 and reference in ev.test_ap3:
            d = ev.test_ap3[name] - ev.test_ap3[reference]
            row.update(diff_test_vs_default=float(d.mean()) if len(d) else float("nan"),
                       diff_test_se=row_standard_error(d))
        rows.append(row)
    extra = pd.DataFrame(rows, index=ev.scores.index)
    scores = ev.scores.drop(columns=[c for c in extra.columns if c in ev.scores.columns])
    # the paired columns sit after the CV scores, the test columns stay last
    test_cols = [c for c in scores.columns if c.startswith("map3_test")]
    ordered = pd.concat([scores.drop(columns=test_cols), extra[[c for c in DIFF_COLUMNS if c in extra]],
                         scores[test_cols], extra[[c for c in TEST_DIFF_COLUMNS if c in extra]]], axis=1)
    ev.scores, ev.reference = ordered, reference
    return ev


def evaluate(inputs: Level2Inputs, learners: Mapping[str, Level2Estimator], test_y: np.ndarray | None = None,
             with_test: bool = True, reference: str | None = None, se_kind: str = "max",
             kinds: Mapping[str, str] | None = None) -> Evaluation:
    """Score every single model, then every blend/stacker in ``learners``
    (name -> unfitted estimator; ``kinds`` name -> blend | stacker, from the
    registry; unnamed ones are listed as stackers), all on cross-validated
    OOF rows; with ``with_test`` also produce each one's test probabilities
    (and score them when ``test_y`` is given).

    Columns of ``scores``: name, kind, map3_all, map3_all_se (fold-level SE),
    map3_verified, map3_verified_se, accuracy_all, map3_all_se_rows (row-level
    SE); with ``reference`` the paired columns of :func:`add_differences`;
    with ``test_y`` map3_test and map3_test_se (row-level) last."""
    clash = sorted(set(learners) & set(inputs.model_names))
    if clash:
        raise ValueError(f"learner name(s) {clash} are also model names: rename them")
    if test_y is not None and not with_test:
        raise ValueError("test scores need with_test=True")
    folds = np.asarray(inputs.folds)
    labelled = None if test_y is None else np.asarray(test_y) >= 0
    ev = Evaluation(scores=pd.DataFrame(), oof={}, test={}, kinds={}, folds=folds)
    rows = []

    def add(name, kind, proba, test_proba):
        ev.oof[name], ev.kinds[name] = proba, kind
        if test_proba is not None:
            ev.test[name] = test_proba
        ev.ap3[name] = precision_at_rank(inputs.y, proba, 3)
        if labelled is not None and test_proba is not None:
            ev.test_ap3[name] = precision_at_rank(test_y[labelled], test_proba[labelled], 3)
        rows.append({"name": name, "kind": kind,
                     **_score(inputs.y, inputs.verified, folds, proba, test_y, test_proba)})

    kinds = dict(kinds or {})
    for model in inputs.model_names:
        add(model, "model", inputs.oof(model), inputs.test(model) if with_test else None)
    for name, learner in learners.items():
        start = time.time()
        kind = kinds.get(name, "stacker")
        proba = cross_validated_predictions(learner, inputs)
        test_proba = None
        if with_test:
            test_proba, ev.fitted[name] = fit_final(learner, inputs, return_learner=True)
        add(name, kind, proba, test_proba)
        log.info("%s (%s): cv MAP@3 %.4f +- %.4f (%.1f s)", name, kind, rows[-1]["map3_all"],
                 rows[-1]["map3_all_se"], time.time() - start)
    cols = ["name", "kind", "map3_all", "map3_all_se", "map3_verified", "map3_verified_se", "accuracy_all",
            "map3_all_se_rows"] + (["map3_test", "map3_test_se"] if test_y is not None else [])
    ev.scores = pd.DataFrame(rows, columns=cols)
    if reference is not None:
        add_differences(ev, reference, se_kind)
    return ev
