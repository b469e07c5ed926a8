"""Tests of ``stacking/``: blends, level-2 learners, honest cross-validated
scoring, input refusals and the stage end to end.

Kept light for a 2-core machine: LightGBM with n_jobs=1 and few trees,
tables of a few hundred rows.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.cache import FeatureStore
from pipeline.config import load_config
from pipeline.metrics import map_at_3
from pipeline.predictions import probs_frame, write_table
from pipeline.submission import validate_submission
from pipeline.workdir import WorkDir
from stacking.base import Level2Estimator, Level2Layout
from stacking.blends import GeometricMeanBlend, MeanBlend, RankBlend
from stacking.evaluate import cross_validated_predictions, evaluate
from stacking.features import mfcc_statistics
from stacking.inputs import level2_inputs, load_level2_inputs
from stacking.learners import LightGBMStacker, LogisticFusion
from stacking import level2, stack

CHANCE_10 = (1 + 1 / 2 + 1 / 3) / 10  # MAP@3 of a random ranking over 10 classes


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def signal_probs(rng, y, n_classes, strength, noise=1.0):
    """Probabilities whose logit for the true class is raised by ``strength``
    (negative: an 'inverted' model that ranks the truth low)."""
    logits = rng.normal(0, noise, (len(y), n_classes))
    logits[np.arange(len(y)), y] += strength
    return softmax(logits)


def make_inputs(oof, y, n_folds=5, seed=0, verified=None, **kw):
    """Level-2 inputs from model -> (n, K) matrices, random shared folds and
    verified flags; ``kw`` goes to :func:`level2_inputs` (test tables, extra
    features, unverified_weight)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    folds = np.arange(n) % n_folds
    rng.shuffle(folds)
    k = next(iter(oof.values())).shape[1]
    return level2_inputs(oof, y=np.asarray(y), folds=folds, classes=[f"c{j}" for j in range(k)],
                         fnames=[f"clip{i:04d}.wav" for i in range(n)],
                         verified=rng.random(n) < 0.5 if verified is None else verified, **kw)


def as_level2(X_models, extra=None):
    """(layout, array) of a dict model -> (n, K) probabilities (and extra columns)."""
    k = next(iter(X_models.values())).shape[1]
    n_extra = 0 if extra is None else np.asarray(extra).reshape(len(next(iter(X_models.values()))), -1).shape[1]
    layout = Level2Layout(tuple(X_models), tuple(f"c{j}" for j in range(k)), tuple(f"f{j}" for j in range(n_extra)))
    return layout, layout.join(list(X_models.values()), extra)


def fast_lgbm(layout=None, **kw):
    return LightGBMStacker(layout, n_estimators=kw.pop("n_estimators", 30), n_jobs=1, **kw)


# ---------------------------------------------------------------------------
# leakage: honest CV stays at chance on noise, a leaky evaluation does not
@pytest.fixture(scope="module")
def noise_inputs():
    rng = np.random.default_rng(42)
    n, k = 600, 10
    oof = {f"noise{i}": rng.dirichlet(np.ones(k), n) for i in range(3)}
    return make_inputs(oof, rng.integers(0, k, n), seed=1, unverified_weight=0.6)


@pytest.mark.parametrize("make", [MeanBlend, GeometricMeanBlend, RankBlend, LogisticFusion,
                                  lambda layout: LogisticFusion(layout, per_model_weights=True, class_bias=True),
                                  fast_lgbm], ids=["mean", "geomean", "rank", "logreg", "logreg_w", "lightgbm"])
def test_cross_validated_score_of_noise_is_chance(noise_inputs, make):
    proba = cross_validated_predictions(make(noise_inputs.layout), noise_inputs)
    assert proba.shape == (600, 10) and np.allclose(proba.sum(axis=1), 1)
    assert map_at_3(noise_inputs.y, proba) < 0.25, "stacker scored well above chance on pure noise: leakage"


@pytest.mark.parametrize("make, floor", [(LogisticFusion, 0.30), (fast_lgbm, 0.50)], ids=["logreg", "lightgbm"])
def test_leaky_evaluation_would_be_caught(noise_inputs, make, floor):
    """Fit and score on the same rows (what evaluate never does): the score
    jumps well above chance, so the chance-level check above can fail."""
    learner = make(noise_inputs.layout)
    learner.fit(noise_inputs.X_oof, noise_inputs.y)
    leaky = map_at_3(noise_inputs.y, learner.predict_proba(noise_inputs.X_oof))
    assert CHANCE_10 < 0.2 and leaky > floor


class SpyLearner(Level2Estimator):
    """Records which rows (ids in the last, extra column) it fit and predicted."""
    log: list = []

    def __init__(self, layout=None):
        self.layout = layout

    def fit(self, X, y, sample_weight=None):
        X = self._check_X(X, fitting=True)
        self.seen_ = set(X[:, -1].astype(int))
        return self

    def predict_proba(self, X):
        ids = set(self._check_X(X, fitting=False)[:, -1].astype(int))
        SpyLearner.log.append((self.seen_, ids))
        return np.full((len(ids), self.n_classes_), 1.0 / self.n_classes_)


def test_cross_validation_never_predicts_rows_it_fit(noise_inputs):
    inputs = noise_inputs.with_extra(np.arange(600)[:, None], names=["row_id"])
    SpyLearner.log.clear()
    cross_validated_predictions(SpyLearner(inputs.layout), inputs)
    assert len(SpyLearner.log) == 5
    predicted = set()
    for fit_rows, pred_rows in SpyLearner.log:
        assert not fit_rows & pred_rows
        assert fit_rows | pred_rows == set(range(600))
        predicted |= pred_rows
    assert predicted == set(range(600))


# ---------------------------------------------------------------------------
# blends and stackers on hand-made tables
def test_mean_blend_flips_ranking_and_weights():
    a = np.array([[0.5, 0.35, 0.15]])
    b = np.array([[0.1, 0.4, 0.5]])
    layout, X = as_level2({"a": a, "b": b})
    mean = MeanBlend(layout).fit(X).predict_proba(X)
    assert np.allclose(mean, [[0.3, 0.375, 0.325]])
    assert list(np.argsort(-mean[0])) == [1, 2, 0]  # class 1 is first, though second for both models
    weighted = MeanBlend(layout, weights={"a": 3, "b": 1}).fit(X).predict_proba(X)
    assert np.allclose(weighted, [[0.4, 0.3625, 0.2375]])
    assert list(np.argsort(-weighted[0])) == [0, 1, 2]


def test_geometric_and_arithmetic_mean_differ():
    layout, X = as_level2({"a": np.array([[0.9, 0.05, 0.05]]), "b": np.array([[0.01, 0.5, 0.49]])})
    arith = MeanBlend(layout).fit(X).predict_proba(X)
    geo = GeometricMeanBlend(layout).fit(X).predict_proba(X)
    assert np.allclose(arith, [[0.455, 0.275, 0.27]])
    raw = np.sqrt([0.9 * 0.01, 0.05 * 0.5, 0.05 * 0.49])  # 0.0949, 0.1581, 0.1565
    assert np.allclose(geo, [raw / raw.sum()], atol=1e-6)
    assert arith[0].argmax() == 0 and geo[0].argmax() == 1  # a veto by model b under the geometric mean


def test_rank_average_on_tiny_table():
    layout, X = as_level2({"a": np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]),
                           "b": np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])})
    # class 0 ranks: a [3,2,1], b [2,3,1] -> mean [2.5,2.5,1]; class 1: a [1,2,3], b [2,1,3] -> [1.5,1.5,3]
    out = RankBlend(layout).fit(X).predict_proba(X)
    assert np.allclose(out, [[0.625, 0.375], [0.625, 0.375], [0.25, 0.75]])


def test_blend_refuses_unknown_weight_and_other_layouts():
    layout, X = as_level2({"a": np.full((2, 2), 0.5)})
    with pytest.raises(ValueError, match="zzz"):
        MeanBlend(layout, weights={"zzz": 1}).fit(X)
    blend = MeanBlend(layout).fit(X)
    with pytest.raises(ValueError, match="expected \\(n, 2\\)"):
        blend.predict_proba(np.full((2, 4), 0.5))  # two models' columns for a one-model layout
    with pytest.raises(ValueError, match="layout"):
        MeanBlend().fit(X)


def test_stackers_learn_from_an_inverted_model():
    """A model that ranks the truth lowest is useless to a blend but gives a
    stacker everything: the restricted LR learns a negative weight, and all
    stackers rank the truth first far more often than the blend."""
    rng = np.random.default_rng(3)
    n, k = 400, 4
    y = rng.integers(0, k, n)
    inputs = make_inputs({"inverted": signal_probs(rng, y, k, -4.0), "noise": rng.dirichlet(np.ones(k), n)}, y)
    blend = map_at_3(y, cross_validated_predictions(MeanBlend(inputs.layout), inputs))
    assert blend < 0.45
    restricted = LogisticFusion(inputs.layout, per_model_weights=True).fit(inputs.X_oof, y)
    assert restricted.model_weights_["inverted"] < -1.0
    assert abs(restricted.model_weights_["noise"]) < 0.3 * abs(restricted.model_weights_["inverted"])
    for learner in (LogisticFusion(inputs.layout), LogisticFusion(inputs.layout, per_model_weights=True),
                    fast_lgbm(inputs.layout)):
        assert map_at_3(y, cross_validated_predictions(learner, inputs)) > 0.9


def test_learners_fill_classes_missing_from_training():
    rng = np.random.default_rng(0)
    layout, X = as_level2({"m": rng.dirichlet(np.ones(5), 50)})
    y = rng.integers(0, 4, 50)  # class 4 never seen
    for learner in (LogisticFusion(layout), fast_lgbm(layout, n_estimators=5)):
        p = learner.fit(X, y).predict_proba(X)
        assert p.shape == (50, 5) and np.allclose(p.sum(axis=1), 1) and (p[:, 4] < 0.01).all()
    # the restricted LR only reweights the models' own scores: every class keeps a share
    p = LogisticFusion(layout, per_model_weights=True).fit(X, y).predict_proba(X)
    assert p.shape == (50, 5) and np.allclose(p.sum(axis=1), 1)


def test_lightgbm_is_deterministic_and_uses_weights_and_extra():
    rng = np.random.default_rng(5)
    n, k = 200, 3
    y = rng.integers(0, k, n)
    probs = {"m": signal_probs(rng, y, k, 1.0)}
    extra = pd.DataFrame({"f0": rng.normal(size=n), "f1": np.where(rng.random(n) < 0.2, np.nan, y)})
    w = np.where(rng.random(n) < 0.5, 1.0, 0.6)
    layout, X = as_level2(probs, extra)
    _, X2 = as_level2(probs, extra.to_numpy())
    p1 = fast_lgbm(layout).fit(X, y, sample_weight=w).predict_proba(X)
    p2 = fast_lgbm(layout).fit(X2, y, sample_weight=w).predict_proba(X2)
    assert np.array_equal(p1, p2)
    p3 = fast_lgbm(layout).fit(X, y).predict_proba(X)
    assert not np.allclose(p1, p3)
    p4 = fast_lgbm(layout.with_extra(())).fit(X[:, :k], y, sample_weight=w).predict_proba(X[:, :k])
    assert not np.allclose(p1, p4)  # the extra columns are used
    with pytest.raises(ValueError, match="extra column"):
        fast_lgbm(layout).fit(X, y).predict_proba(X[:, :k])


def test_evaluate_scores_models_blends_and_stackers():
    rng = np.random.default_rng(7)
    n, k = 300, 5
    y = rng.integers(0, k, n)
    oof = {"good": signal_probs(rng, y, k, 2.0), "noise": rng.dirichlet(np.ones(k), n)}
    test_y = np.array([0, 1, -1, 2])
    test = {"good": signal_probs(rng, np.array([0, 1, 0, 2]), k, 6.0), "noise": rng.dirichlet(np.ones(k), 4)}
    inputs = make_inputs(oof, y, test=test, test_fnames=["t0", "t1", "t2", "t3"])
    ev = evaluate(inputs, {"geomean": GeometricMeanBlend(inputs.layout), "logreg": LogisticFusion(inputs.layout)},
                  test_y=test_y, kinds={"geomean": "blend"})
    assert list(ev.scores.columns) == ["name", "kind", "map3_all", "map3_all_se", "map3_verified",
                                       "map3_verified_se", "accuracy_all", "map3_all_se_rows",
                                       "map3_test", "map3_test_se"]
    assert list(ev.scores["name"]) == ["good", "noise", "geomean", "logreg"]
    assert list(ev.scores["kind"]) == ["model", "model", "blend", "stacker"]
    good = ev.scores.set_index("name").loc["good"]
    assert good["map3_all"] == pytest.approx(map_at_3(y, inputs.oof("good")))
    assert good["map3_test"] == pytest.approx(1.0)
    assert ev.scores.set_index("name").loc["logreg", "map3_all"] > good["map3_all"] - 0.03
    with pytest.raises(ValueError, match="model names"):
        evaluate(inputs, {"good": MeanBlend(inputs.layout)})


# ---------------------------------------------------------------------------
# inputs: refusals name the model
CLASSES = ["bark", "meow", "tweet"]


@pytest.fixture()
def small_work(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    folds = pd.DataFrame({"fname": [f"f{i:02d}.wav" for i in range(n)],
                          "label": [CLASSES[i % 3] for i in range(n)],
                          "manually_verified": rng.integers(0, 2, n), "fold": np.arange(n) % 3})
    work = WorkDir(tmp_path / "work")
    folds.to_csv(work.folds_csv, index=False)
    test_fnames = ["t0.wav", "t1.wav"]
    for m in ("ok", "bad"):
        write_table(probs_frame(folds["fname"], rng.dirichlet(np.ones(3), n), CLASSES, folds["fold"]), work.oof_csv(m))
        write_table(probs_frame(test_fnames, rng.dirichlet(np.ones(3), 2), CLASSES), work.test_csv(m))
    return work, folds, test_fnames


def _rewrite_oof(work, edit):
    df = pd.read_csv(work.oof_csv("bad"), dtype={"fname": str})
    edit(df).to_csv(work.oof_csv("bad"), index=False)


def test_inputs_load_and_align(small_work):
    work, folds, test_fnames = small_work
    df = pd.read_csv(work.oof_csv("ok"))
    df.sample(frac=1, random_state=0).to_csv(work.oof_csv("ok"), index=False)  # row order does not matter
    inputs = load_level2_inputs(work, ["ok", "bad"], classes=CLASSES, test_fnames=test_fnames)
    assert inputs.fnames == folds["fname"].tolist()
    assert np.array_equal(inputs.y, np.arange(30) % 3)
    assert np.array_equal(inputs.folds, folds["fold"].to_numpy())
    assert np.allclose(inputs.oof("ok"), df[CLASSES].to_numpy() / df[CLASSES].to_numpy().sum(1, keepdims=True),
                       atol=1e-6)
    assert inputs.test("bad").shape == (2, 3) and inputs.test_fnames == test_fnames
    # one array of both models' columns, model-major, described by the layout
    assert inputs.model_names == ["ok", "bad"] and inputs.classes == CLASSES
    assert inputs.X_oof.shape == (30, 6) and inputs.X_test.shape == (2, 6)
    assert inputs.columns == [f"{m}:{c}" for m in ("ok", "bad") for c in CLASSES]
    assert np.array_equal(inputs.X_oof[:, 3:], inputs.oof("bad")) and inputs.sample_weight is None
    weighted = load_level2_inputs(work, ["ok", "bad"], classes=CLASSES, test_fnames=test_fnames,
                                  unverified_weight=0.5)
    assert np.array_equal(weighted.sample_weight, np.where(folds["manually_verified"] == 1, 1.0, 0.5))


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.iloc[1:], "misses 1 of the 30 clips"),
    (lambda df: pd.concat([df, df.iloc[:1].assign(fname="stranger.wav")]), "not in folds.csv"),
    (lambda df: df.assign(fold=(df["fold"] + 1) % 3), "came from different folds"),
    (lambda df: df.assign(meow=np.where(df.index == 4, np.nan, df["meow"])), "non-finite"),
    (lambda df: df.rename(columns={"tweet": "chirp"}), "class columns differ"),
    (lambda df: df.drop(columns="fold"), "no fold column"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "twice"),
], ids=["missing", "extra", "folds", "nan", "classes", "nofold", "duplicate"])
def test_inputs_refuse_bad_oof_naming_the_model(small_work, edit, message):
    work, _, test_fnames = small_work
    _rewrite_oof(work, edit)
    with pytest.raises(ValueError, match=message) as err:
        load_level2_inputs(work, ["ok", "bad"], classes=CLASSES, test_fnames=test_fnames)
    assert "'bad'" in str(err.value) and "'ok'" not in str(err.value)


def test_inputs_refuse_missing_or_misordered_tables(small_work):
    work, _, test_fnames = small_work
    test = pd.read_csv(work.test_csv("bad"))
    test.iloc[::-1].to_csv(work.test_csv("bad"), index=False)
    with pytest.raises(ValueError, match="'bad'.*order"):
        load_level2_inputs(work, ["ok", "bad"], classes=CLASSES, test_fnames=test_fnames)
    work.oof_csv("bad").unlink()
    with pytest.raises(FileNotFoundError, match="'bad'"):
        load_level2_inputs(work, ["ok", "bad"], classes=CLASSES, test_fnames=test_fnames)


# ---------------------------------------------------------------------------
# MFCC statistics
def test_mfcc_statistics_and_bad_clips(tmp_path):
    store = FeatureStore(WorkDir(tmp_path), "mfcc", {"kind": "mfcc", "n_mfcc": 2}, {})
    store.ensure_dir()
    a = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [10.0, 5.0]])
    store.write_shard("train", {"a.wav": a}, {"silent.wav": {"reason": "silent"}})
    store.write_shard("train", {"wide.wav": np.zeros((3, 3))}, {})
    out = mfcc_statistics(store, "train", ["a.wav", "silent.wav", "never.wav", "wide.wav"])
    assert out.shape == (4, 8)
    x = a[:, 0]
    m2, m3 = ((x - x.mean()) ** 2).mean(), ((x - x.mean()) ** 3).mean()
    # layout: max of each coefficient, then min, variance, skewness
    assert np.allclose(out[0], [10, 5, 1, 5, m2, 0, m3 / m2 ** 1.5, 0])
    assert np.isnan(out[1:]).all()


# ---------------------------------------------------------------------------
# the stage end to end
@pytest.fixture()
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def make_stage_dirs(tmp_path, with_mfcc=True):
    rng = np.random.default_rng(11)
    classes = ["a", "b", "c", "d", "e"]
    n, n_test, k = 500, 40, 5
    y = np.arange(n) % k
    rng.shuffle(y)
    y_test = rng.integers(0, k, n_test)
    data = tmp_path / "data"
    data.mkdir()
    train = pd.DataFrame({"fname": [f"tr{i:03d}.wav" for i in range(n)], "label": np.array(classes)[y],
                          "manually_verified": rng.integers(0, 2, n)})
    train.to_csv(data / "train.csv", index=False)
    test_fnames = [f"te{i:03d}.wav" for i in range(n_test)]
    pd.DataFrame({"fname": test_fnames, "label": "a b c"}).to_csv(data / "sample_submission.csv", index=False)
    pd.DataFrame({"fname": test_fnames, "label": np.array(classes)[y_test]}).to_csv(data / "test_labels.csv",
                                                                                    index=False)
    work = WorkDir(tmp_path / "work")
    folds = train.assign(fold=np.arange(n) % 5)
    folds.to_csv(work.folds_csv, index=False)
    tables = {"good": (signal_probs(rng, y, k, 1.5), signal_probs(rng, y_test, k, 1.5)),
              "noise": (rng.dirichlet(np.ones(k), n), rng.dirichlet(np.ones(k), n_test))}
    for m, (oof, test) in tables.items():
        write_table(probs_frame(train["fname"], oof, classes, folds["fold"]), work.oof_csv(m))
        write_table(probs_frame(test_fnames, test, classes), work.test_csv(m))
    cfg_text = ("seed: 1\nfeatures:\n  mfcc: {kind: mfcc, n_mfcc: 3}\n"
                "models: {good: {builder: stats_lr}, noise: {builder: stats_lr}, untrained: {builder: stats_lr}}\n"
                "run:\n  models: [good, noise, untrained]\n"
                "stacking:\n  lightgbm: {n_estimators: 15}\n")
    cfg_path = tmp_path / "preset.yaml"
    cfg_path.write_text(cfg_text)
    if with_mfcc:  # the store the stage will look for: the resolved preset's spec (defaults filled in)
        cfg = load_config(str(cfg_path))
        store = FeatureStore(work, "mfcc", cfg["features"]["mfcc"], cfg.get("audio", {}))
        store.ensure_dir()
        store.write_shard("train", {f: rng.normal(size=(8, 3)) for f in train["fname"][:-3]}, {})
        store.write_shard("test", {f: rng.normal(size=(8, 3)) for f in test_fnames}, {})
    return data, work, cfg_path, test_fnames


def test_stage_end_to_end(tmp_path, restore_logging, capsys):
    data, work, cfg_path, test_fnames = make_stage_dirs(tmp_path)
    argv = ["--config", str(cfg_path), "--data", str(data), "--work", str(work.root)]
    assert stack.cli(argv) == 0
    assert str(work.submission_csv) in capsys.readouterr().out
    d = work.stacking_dir
    scores = pd.read_csv(d / "scores.csv")
    names = ["good", "noise", "mean", "geomean", "rank", "learned", "logreg", "lightgbm"]
    assert list(scores["name"]) == names
    assert list(scores.columns) == ["name", "kind", "map3_all", "map3_all_se", "map3_verified", "map3_verified_se",
                                    "accuracy_all", "map3_all_se_rows", "diff_vs_default", "diff_se",
                                    "diff_se_rows", "diff_se_folds", "map3_test", "map3_test_se",
                                    "diff_test_vs_default", "diff_test_se"]
    assert scores.drop(columns=["name", "kind"]).notna().all().all()
    sub = pd.read_csv(work.submission_csv)
    validate_submission(sub, test_fnames, ["a", "b", "c", "d", "e"])
    for name in names:
        validate_submission(pd.read_csv(d / "submissions" / f"{name}.csv"), test_fnames, list("abcde"))
    for name in names[2:]:
        oof = pd.read_csv(d / f"{name}_oof.csv")
        assert len(oof) == 500 and list(oof.columns[:2]) == ["fname", "fold"]
    final_test = pd.read_csv(d / "final_test.csv")
    assert final_test["fname"].tolist() == test_fnames
    summary = pd.read_json(d / "summary.json", typ="series")
    s = scores.set_index("name")
    assert summary["final"] in names and summary["mfcc_statistics"] == "mfcc"
    # the rule: the default (learned blend) unless a learner beats it by more than one SE of the paired difference
    assert summary["default"] == "learned" and summary["selection"]["rule"] == "auto"
    beats = s["diff_vs_default"] > s["diff_se"]
    if beats.any():
        assert summary["final"] == s[beats]["map3_all"].idxmax()
    else:
        assert summary["final"] == "learned"
    assert summary["cv_map3_all"] == pytest.approx(s.loc[summary["final"], "map3_all"])
    assert s.loc["learned", "diff_vs_default"] == 0
    assert summary["cv_map3_all"] >= s.loc["good", "map3_all"] - 0.02
    assert s.loc["logreg", "map3_all"] >= s.loc["good", "map3_all"] - 0.05
    assert s.loc["good", "map3_all"] > s.loc["noise", "map3_all"] + 0.2

    # a rerun with unchanged inputs skips; a changed input table reruns
    mtime = os.stat(d / "scores.csv").st_mtime_ns
    cfg = load_config(str(cfg_path))
    assert level2.run_stacking(cfg, data, work)["skipped"] is True
    assert os.stat(d / "scores.csv").st_mtime_ns == mtime
    os.utime(work.oof_csv("noise"), ns=(1_000_000_000, 1_000_000_000))
    cfg["stacking"]["final"] = "logreg"
    cfg["stacking"]["learners"] = ["geomean", "logreg"]
    again = level2.run_stacking(cfg, data, work)
    assert again["skipped"] is False and again["final"] == "logreg"
    assert pd.read_csv(work.submission_csv).equals(pd.read_csv(d / "submissions" / "logreg.csv"))
    assert sorted(p.name for p in d.glob("*_oof.csv")) == ["geomean_oof.csv", "logreg_oof.csv"]
    assert sorted(p.stem for p in (d / "submissions").glob("*.csv")) == ["geomean", "good", "logreg", "noise"]


def test_stage_refuses_bad_tables_and_runs_without_mfcc(tmp_path, restore_logging, capsys):
    data, work, cfg_path, _ = make_stage_dirs(tmp_path, with_mfcc=False)
    cfg = load_config(str(cfg_path))
    cfg["stacking"]["learners"] = ["lightgbm"]
    out = level2.run_stacking(cfg, data, work)
    assert out["mfcc_statistics"] is None and out["models"] == ["good", "noise"]

    oof = pd.read_csv(work.oof_csv("noise"))
    oof.iloc[5:].to_csv(work.oof_csv("noise"), index=False)
    argv = ["--config", str(cfg_path), "--data", str(data), "--work", str(work.root)]
    assert stack.cli(argv) == 2
    assert "'noise'" in capsys.readouterr().err
    cfg["stacking"]["models"] = ["good", "untrained"]
    with pytest.raises(FileNotFoundError, match="untrained"):
        level2.run_stacking(cfg, data, work)
    cfg["stacking"]["models"] = None
    cfg["stacking"]["learners"] = ["boosting"]
    with pytest.raises(ValueError, match="boosting"):
        level2.run_stacking(cfg, data, work)
