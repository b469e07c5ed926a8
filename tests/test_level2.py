"""Tests of the level-2 plumbing (issue 11, item 4): the learner registry
the stage iterates, the array inputs with their column layout, and the
out-of-fold evaluation by scikit-learn's ``cross_val_predict`` over
``PredefinedSplit`` (same OOF as a hand loop over the folds; a learner never
sees its held-out fold's rows). Small tables; LightGBM with n_jobs=1."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from pipeline.config import load_config
from pipeline.predictions import normalize_rows
from stacking import learners as learners_mod
from stacking import level2
from stacking.base import Level2Estimator, Level2Layout
from stacking.blends import LearnedGeometricBlend, RankBlend
from stacking.evaluate import cross_validated_predictions, fit_final
from stacking.learners import REGISTRY, LightGBMStacker, LogisticFusion, register, registered_learners
from tests.test_stacking import make_inputs, make_stage_dirs, restore_logging, signal_probs  # noqa: F401

BUILT_IN = ["mean", "geomean", "rank", "learned", "logreg", "lightgbm"]


class ClassPrior(Level2Estimator):
    """A stacker that ignores its input: the (weighted) class frequencies of its training rows."""

    def __init__(self, layout=None, smoothing: float = 1.0):
        self.layout = layout
        self.smoothing = smoothing

    def fit(self, X, y, sample_weight=None):
        self._check_X(X, fitting=True)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight)
        self.prior_ = normalize_rows(np.bincount(y, weights=w, minlength=self.n_classes_) + self.smoothing)
        return self

    def predict_proba(self, X):
        X = self._check_X(X, fitting=False)
        return np.tile(self.prior_, (X.shape[0], 1))


@pytest.fixture()
def prior_learner():
    """'prior' registered for one test (and removed after it)."""
    seen = []

    def factory(settings, layout, seed):
        seen.append((layout, seed))
        return ClassPrior(layout)

    spec = register("prior", "stacker", factory)
    yield spec, seen
    REGISTRY.pop("prior", None)


# ---------------------------------------------------------------------------
# the registry
def test_registry_holds_each_learner_once_and_settings_follow_it():
    assert registered_learners() == BUILT_IN
    assert {n: s.kind for n, s in REGISTRY.items()} == {"mean": "blend", "geomean": "blend", "rank": "blend",
                                                        "learned": "blend", "logreg": "stacker",
                                                        "lightgbm": "stacker"}
    assert [n for n, s in REGISTRY.items() if s.extra_features] == ["lightgbm"]
    assert level2.stacking_settings({})["learners"] == BUILT_IN
    with pytest.raises(ValueError, match="already registered"):
        register("mean", "blend", lambda s, layout, seed: None)
    with pytest.raises(ValueError, match="kind"):
        register("zzz", "booster", lambda s, layout, seed: None)
    assert "zzz" not in REGISTRY


def test_registered_learners_build_from_settings_and_clone():
    settings = level2.stacking_settings({"stacking": {"weights": {"a": 2.0, "gone": 1.0}}})
    layout = Level2Layout(("a", "b"), ("x", "y", "z"))
    built = level2.build_learners(settings, layout, seed=7)
    assert list(built) == BUILT_IN
    assert built["mean"].weights == {"a": 2.0}  # weights of models that are not stacked are dropped
    assert built["logreg"].random_state == 7 and built["logreg"].C == settings["logreg"]["C"]
    assert built["lightgbm"].n_estimators == settings["lightgbm"]["n_estimators"]
    for name, learner in built.items():
        assert learner.layout == layout
        twin = clone(learner)
        assert twin is not learner and twin.get_params() == learner.get_params(), name


def test_the_stage_scores_what_is_registered(tmp_path, restore_logging, prior_learner):
    spec, seen = prior_learner
    data, work, cfg_path, _ = make_stage_dirs(tmp_path, with_mfcc=False)
    cfg = load_config(str(cfg_path))
    assert level2.stacking_settings(cfg)["learners"] == BUILT_IN + ["prior"]
    # stacking.learners not given: every registered learner is scored, in registration order
    cfg["stacking"].update(lightgbm={"n_estimators": 10, "inner_folds": 0}, logreg={"C": 1.0})
    level2.run_stacking(cfg, data, work)
    scores = pd.read_csv(work.stacking_dir / "scores.csv")
    assert list(scores["name"]) == ["good", "noise"] + BUILT_IN + ["prior"]
    assert scores.set_index("name").loc["prior", "kind"] == "stacker"
    assert (work.stacking_dir / "prior_oof.csv").exists()
    assert seen and seen[-1] == (Level2Layout(("good", "noise"), tuple("abcde")), 1)
    # given: only those, in the order given
    cfg["stacking"]["learners"] = ["prior", "mean"]
    out = level2.run_stacking(cfg, data, work)
    scores = pd.read_csv(work.stacking_dir / "scores.csv")
    assert list(scores["name"]) == ["good", "noise", "prior", "mean"]
    assert list(scores["kind"]) == ["model", "model", "stacker", "blend"]
    assert json.loads((work.stacking_dir / "summary.json").read_text())["learners"] == ["prior", "mean"]
    assert out["default"] == "prior"  # 'learned' is not scored: the first configured learner


# ---------------------------------------------------------------------------
# the inputs
def test_level2_inputs_are_arrays_with_column_metadata():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 3
    oof = {"m1": rng.dirichlet(np.ones(3), 40), "m2": rng.dirichlet(np.ones(3), 40)}
    test = {"m1": rng.dirichlet(np.ones(3), 5), "m2": rng.dirichlet(np.ones(3), 5)}
    inputs = make_inputs(oof, y, test=test, unverified_weight=0.25)
    assert inputs.X_oof.shape == (40, 6) and inputs.X_test.shape == (5, 6)
    assert inputs.columns == ["m1:c0", "m1:c1", "m1:c2", "m2:c0", "m2:c1", "m2:c2"]
    assert np.array_equal(inputs.oof("m2"), oof["m2"]) and np.array_equal(inputs.test("m1"), test["m1"])
    assert np.array_equal(inputs.sample_weight, np.where(inputs.verified, 1.0, 0.25))
    extra = inputs.with_extra(np.arange(40.0)[:, None], np.full((5, 1), -1.0), names=["row_id"])
    assert extra.columns[-1] == "row_id" and extra.X_oof.shape == (40, 7) and extra.layout.n_extra == 1
    assert np.array_equal(extra.layout.probabilities(extra.X_oof)[1], oof["m2"])
    assert np.array_equal(extra.layout.extra_features(extra.X_test), np.full((5, 1), -1.0))
    with pytest.raises(ValueError, match="test_extra"):
        inputs.with_extra(np.zeros((40, 2)))
    with pytest.raises(ValueError, match="expected \\(n, 6\\)"):
        inputs.layout.check(np.zeros((3, 5)))


def test_cross_validation_refuses_a_class_without_rows():
    rng = np.random.default_rng(1)
    y = np.arange(50) % 3  # class c3 has no row
    inputs = make_inputs({"m": rng.dirichlet(np.ones(4), 50)}, y)
    with pytest.raises(ValueError, match="c3"):
        cross_validated_predictions(ClassPrior(inputs.layout), inputs)


# ---------------------------------------------------------------------------
# cross_val_predict over the shared folds
def _hand_loop(learner, inputs):
    """The OOF of fitting a clone per fold by hand: the reference cross_val_predict must equal."""
    out = np.full((len(inputs.y), len(inputs.classes)), np.nan)
    for fold in np.unique(inputs.folds):
        fit, held = inputs.folds != fold, inputs.folds == fold
        w = None if inputs.sample_weight is None else inputs.sample_weight[fit]
        est = clone(learner).fit(inputs.X_oof[fit], inputs.y[fit], sample_weight=w)
        out[held] = normalize_rows(est.predict_proba(inputs.X_oof[held]))
    return out


@pytest.fixture(scope="module")
def small_problem():
    rng = np.random.default_rng(3)
    n, k = 150, 4
    y = rng.integers(0, k, n)
    oof = {"good": signal_probs(rng, y, k, 1.5), "weak": signal_probs(rng, y, k, 0.5),
           "noise": rng.dirichlet(np.ones(k), n)}
    inputs = make_inputs(oof, y, n_folds=4, seed=5, unverified_weight=0.6)
    return inputs.with_extra(rng.normal(size=(n, 2)), names=["f0", "f1"])


@pytest.mark.parametrize("make", [
    lambda layout: RankBlend(layout, weights={"good": 2.0, "weak": 1.0}),
    lambda layout: LearnedGeometricBlend(layout, l2=0.1),
    lambda layout: LogisticFusion(layout, C=[0.1, 1.0], per_model_weights=True, class_bias=True),
    lambda layout: LogisticFusion(layout, C=0.5),
    lambda layout: LightGBMStacker(layout, n_estimators=25, inner_folds=3, n_jobs=1),
    ClassPrior,
], ids=["rank", "learned", "logreg_w", "logreg_full", "lightgbm", "prior"])
def test_cross_val_predict_equals_fitting_each_fold_by_hand(small_problem, make):
    learner = make(small_problem.layout)
    proba = cross_validated_predictions(learner, small_problem)
    assert np.array_equal(proba, _hand_loop(learner, small_problem))
    assert not hasattr(learner, "classes_"), "the learner given is cloned, never fit itself"
    # the sample weights reach fit: ignoring them changes a weighted learner's OOF
    if isinstance(learner, (ClassPrior, LearnedGeometricBlend)):
        unweighted = small_problem.with_unverified_weight(None)
        assert not np.allclose(proba, cross_validated_predictions(learner, unweighted))


class FitSpy(Level2Estimator):
    """Records, per fit, the row ids (the last column) and sample weights it was
    given, and per predict the row ids it predicted."""
    calls: list = []

    def __init__(self, layout=None):
        self.layout = layout

    def fit(self, X, y, sample_weight=None):
        X = self._check_X(X, fitting=True)
        self.fit_rows_ = X[:, -1].astype(int)
        FitSpy.calls.append(("fit", self.fit_rows_, None if sample_weight is None else np.asarray(sample_weight)))
        return self

    def predict_proba(self, X):
        rows = self._check_X(X, fitting=False)[:, -1].astype(int)
        FitSpy.calls.append(("predict", rows, self.fit_rows_))
        return np.full((len(rows), self.n_classes_), 1.0 / self.n_classes_)


def test_a_learner_never_fits_on_its_held_out_fold(small_problem):
    n = len(small_problem.y)
    test = {m: np.full((3, 4), 0.25) for m in small_problem.model_names}
    inputs = make_inputs({m: small_problem.oof(m) for m in small_problem.model_names}, small_problem.y,
                         n_folds=4, seed=5, unverified_weight=0.6, test=test,
                         extra=np.arange(n)[:, None], test_extra=np.full((3, 1), -1), extra_names=["row_id"])
    FitSpy.calls.clear()
    cross_validated_predictions(FitSpy(inputs.layout), inputs)
    fits = [c for c in FitSpy.calls if c[0] == "fit"]
    predicts = [c for c in FitSpy.calls if c[0] == "predict"]
    assert len(fits) == len(predicts) == 4
    for (_, fit_rows, weights), (_, held_rows, fitted_on) in zip(fits, predicts):
        fold = inputs.folds[held_rows[0]]
        assert np.array_equal(held_rows, np.flatnonzero(inputs.folds == fold))
        assert np.array_equal(fit_rows, np.flatnonzero(inputs.folds != fold))
        assert not set(fit_rows) & set(held_rows) and np.array_equal(fitted_on, fit_rows)
        assert np.array_equal(weights, inputs.sample_weight[fit_rows])
    assert sorted(np.concatenate([p[1] for p in predicts])) == list(range(n))
    # the final learner is fit on every OOF row and predicts only the test clips
    FitSpy.calls.clear()
    fit_final(FitSpy(inputs.layout), inputs)
    assert np.array_equal(FitSpy.calls[0][1], np.arange(n)) and set(FitSpy.calls[1][1]) == {-1}


def test_inner_cross_validation_only_sees_the_training_rows(small_problem, monkeypatch):
    """The regularisation search runs inside fit, on the outer training rows."""
    sizes = []
    real = learners_mod.inner_splits

    def recording(y, n_splits, seed):
        sizes.append(len(y))
        return real(y, n_splits, seed)

    monkeypatch.setattr(learners_mod, "inner_splits", recording)
    for learner in (LogisticFusion(small_problem.layout, C=[0.1, 1.0]),
                    LightGBMStacker(small_problem.layout, n_estimators=10, inner_folds=3, n_jobs=1)):
        sizes.clear()
        cross_validated_predictions(learner, small_problem)
        assert sizes == [int((small_problem.folds != f).sum()) for f in np.unique(small_problem.folds)]
