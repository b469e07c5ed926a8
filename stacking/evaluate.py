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
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import clone

from pipeline.metrics import accuracy, map_at_3, precision_at_rank
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


def learner_kind(learner: Level2Estimator) -> str:
    """``blend`` or ``stacker`` (the estimator's ``kind``; Blend subclasses are blends)."""
    return getattr(learner, "kind", None) or ("blend" if isinstance(learner, Blend) else "stacker")


def fit_final(learner_factory: LearnerFactory, inputs: StackInputs, return_learner: bool = False):
    """Test probabilities (n_test, K) of a learner fit on ALL OOF rows
    (and the fitted learner with ``return_learner``)."""
    if not inputs.test:
        raise ValueError("no test tables loaded")
    learner = _new_learner(learner_factory)
    learner.fit(inputs.oof, inputs.y, extra=inputs.extra, verified=inputs.verified)
    proba = learner.predict_proba(inputs.test, extra=inputs.test_extra)
    proba = _checked(proba, len(inputs.test_fnames), len(inputs.classes), f"{type(learner).__name__} (test)")
    return (proba, learner) if return_learner else proba


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


def evaluate(inputs: StackInputs, learners: Mapping[str, LearnerFactory], test_y: np.ndarray | None = None,
             with_test: bool = True, reference: str | None = None, se_kind: str = "max") -> Evaluation:
    """Score every single model, then every blend/stacker in ``learners``
    (name -> factory or unfitted estimator), all on cross-validated OOF rows;
    with ``with_test`` also produce each one's test probabilities (and score
    them when ``test_y`` is given).

    Columns of ``scores``: name, kind, map3_all, map3_all_se (fold-level SE),
    map3_verified, map3_verified_se, accuracy_all, map3_all_se_rows (row-level
    SE); with ``reference`` the paired columns of :func:`add_differences`;
    with ``test_y`` map3_test and map3_test_se (row-level) last."""
    clash = sorted(set(learners) & set(inputs.oof))
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

    for model, proba in inputs.oof.items():
        add(model, "model", proba, inputs.test[model] if with_test else None)
    for name, factory in learners.items():
        start = time.time()
        kind = learner_kind(_new_learner(factory))
        proba = cross_validated_predictions(factory, inputs)
        test_proba = None
        if with_test:
            test_proba, ev.fitted[name] = fit_final(factory, inputs, return_learner=True)
        add(name, kind, proba, test_proba)
        log.info("%s (%s): cv MAP@3 %.4f +- %.4f (%.1f s)", name, kind, rows[-1]["map3_all"],
                 rows[-1]["map3_all_se"], time.time() - start)
    cols = ["name", "kind", "map3_all", "map3_all_se", "map3_verified", "map3_verified_se", "accuracy_all",
            "map3_all_se_rows"] + (["map3_test", "map3_test_se"] if test_y is not None else [])
    ev.scores = pd.DataFrame(rows, columns=cols)
    if reference is not None:
        add_differences(ev, reference, se_kind)
    return ev
