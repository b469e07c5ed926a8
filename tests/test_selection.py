"""Tests of the final-learner choice under noise (issue 10): scores with
their standard errors, paired differences to the default learner, the
switch rule, forcing a learner, the learned-weight blend and inner-CV
regularisation. Tables of a few hundred rows; LightGBM with n_jobs=1."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.metrics import map_at_3
from pipeline.reporting import Scores, stacking_score_table, stacking_selection_lines
from pipeline.summary import summary_lines
from stacking import level2, selection
from stacking.base import Level2Estimator
from stacking.blends import GeometricMeanBlend, LearnedGeometricBlend, MeanBlend
from stacking.evaluate import (cross_validated_predictions, evaluate, fold_standard_error, paired_difference,
                               row_standard_error)
from stacking.learners import LightGBMStacker, LogisticFusion
from tests.test_stacking import make_inputs, make_stage_dirs, restore_logging, signal_probs  # noqa: F401

N, K = 300, 6


class Lookup(Level2Estimator):
    """Predicts fixed probabilities for the rows whose ids come in the last
    (extra) column: a level-2 'learner' with a known score, run through the
    real cross-validation."""

    def __init__(self, layout=None, table=None):
        self.layout = layout
        self.table = table

    def fit(self, X, y, sample_weight=None):
        self._check_X(X, fitting=True)
        return self

    def predict_proba(self, X):
        return self.table[self._check_X(X, fitting=False)[:, -1].astype(int)]


def one_hot_ranked(y, correct):
    """Probabilities that put the true class first on rows where ``correct``,
    and last on the others (AP@3 exactly 1 or 0 per row)."""
    p = np.full((len(y), K), 0.1)
    p[np.arange(len(y)), (y + 1) % K] = 0.3
    p[np.arange(len(y)), (y + 2) % K] = 0.25
    p[np.arange(len(y)), (y + 3) % K] = 0.2
    p[correct, y[correct]] = 0.6
    p[~correct, y[~correct]] = 0.01
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def lookup_case():
    """A default learner right on 80% of rows; 'noisy_win' differs from it on
    5 rows (3 won, 2 lost: a higher CV score by 1 clip, well inside the
    noise); 'clear_win' wins 40 rows and loses 2."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, N)
    base_ok = rng.random(N) < 0.8
    wrong, right = np.flatnonzero(~base_ok), np.flatnonzero(base_ok)

    def variant(n_won, n_lost):
        ok = base_ok.copy()
        ok[wrong[:n_won]] = True
        ok[right[:n_lost]] = False
        return ok

    inputs = make_inputs({"m1": signal_probs(rng, y, K, 1.0), "m2": signal_probs(rng, y, K, 1.0)}, y, seed=3)
    inputs = inputs.with_extra(np.arange(N)[:, None], names=["row_id"])
    tables = {"default": one_hot_ranked(y, base_ok), "noisy_win": one_hot_ranked(y, variant(3, 2)),
              "clear_win": one_hot_ranked(y, variant(40, 2))}
    return inputs, tables


def _evaluate(inputs, tables, names, reference="default", **kw):
    return evaluate(inputs, {n: Lookup(inputs.layout, tables[n]) for n in names}, with_test=False,
                    reference=reference, kinds={"default": "blend"}, **kw)


def test_rule_keeps_default_when_the_lead_is_noise(lookup_case):
    inputs, tables = lookup_case
    ev = _evaluate(inputs, tables, ["default", "noisy_win"])
    s = ev.scores.set_index("name")
    assert s.loc["noisy_win", "map3_all"] > s.loc["default", "map3_all"]  # the old argmax rule switches ...
    assert selection.choose_final(ev, "best") == "noisy_win"
    assert s.loc["noisy_win", "diff_vs_default"] == pytest.approx(1 / N)
    assert s.loc["noisy_win", "diff_vs_default"] < s.loc["noisy_win", "diff_se"]
    sel = selection.select_final(ev, "auto", "default", switch_margin_se=1.0)  # ... the rule does not
    assert sel.final == "default" and not sel.switched and sel.candidate == "noisy_win"
    assert sel.candidate_diff == pytest.approx(1 / N) and sel.candidate_diff_se > 1 / N
    assert "kept the default" in sel.sentence() and "noisy_win +0.0033" in sel.sentence()
    # k = 0: any positive lead switches
    assert selection.choose_final(ev, "auto", "default", switch_margin_se=0.0) == "noisy_win"


def test_rule_switches_to_a_clearly_better_learner(lookup_case):
    inputs, tables = lookup_case
    ev = _evaluate(inputs, tables, ["default", "noisy_win", "clear_win"])
    sel = selection.select_final(ev, "auto", "default", switch_margin_se=1.0)
    assert sel.final == "clear_win" and sel.switched
    d = ev.difference("clear_win", "default")
    assert d.diff == pytest.approx(38 / N) and d.diff > 3 * d.se("max")
    assert sel.final_diff == pytest.approx(38 / N) and "switched to clear_win" in sel.sentence()
    # an extreme margin keeps the default even then
    assert selection.choose_final(ev, "auto", "default", switch_margin_se=50.0) == "default"


def test_final_can_be_forced_by_name(lookup_case):
    inputs, tables = lookup_case
    ev = _evaluate(inputs, tables, ["default", "noisy_win", "clear_win"])
    sel = selection.select_final(ev, "noisy_win", "default")
    assert sel.final == "noisy_win" and sel.rule == "forced" and sel.default == "default"
    assert "forced" in sel.sentence()
    assert selection.choose_final(ev, "m1", "default") == "m1"  # a single model can be forced too
    with pytest.raises(ConfigError, match="zzz"):
        selection.choose_final(ev, "zzz", "default")


def test_a_model_never_switched_to_on_noise_either(lookup_case):
    """Single models are candidates too, under the same rule."""
    inputs, tables = lookup_case
    ev = _evaluate(inputs, tables, ["default"])
    assert selection.select_final(ev, "auto", "default").final == "default"


# ---------------------------------------------------------------------------
# standard errors
def test_standard_errors_on_a_hand_made_case():
    folds = np.repeat([0, 1, 2, 3], 5)
    values = np.repeat([1.0, 1.0, 0.0, 0.0], 5)  # per-fold means 1, 1, 0, 0
    assert fold_standard_error(values, folds) == pytest.approx(np.std([1, 1, 0, 0], ddof=1) / 2)
    assert row_standard_error(values) == pytest.approx(np.sqrt(20 * 0.25 / 19) / np.sqrt(20))
    same = paired_difference(values, values, folds)
    assert same.diff == 0 and same.se_rows == 0 and same.se_folds == 0 and same.n_rows_differ == 0
    other = values.copy()
    other[[0, 5]] = 0.0  # two rows lost, in folds 0 and 1
    d = paired_difference(other, values, folds)
    assert d.diff == pytest.approx(-2 / 20)
    assert d.se_rows == pytest.approx(np.std(other - values, ddof=1) / np.sqrt(20))
    assert d.se_folds == pytest.approx(np.std([-0.2, -0.2, 0, 0], ddof=1) / 2)
    assert d.se("max") == max(d.se_rows, d.se_folds) and d.n_rows_differ == 2


def test_score_columns_present_and_sane():
    rng = np.random.default_rng(1)
    y = rng.integers(0, K, N)
    oof = {"good": signal_probs(rng, y, K, 2.0), "weak": signal_probs(rng, y, K, 0.5)}
    test_y = rng.integers(0, K, 50)
    test = {"good": signal_probs(rng, test_y, K, 2.0), "weak": signal_probs(rng, test_y, K, 0.5)}
    inputs = make_inputs(oof, y, n_folds=4, test=test, test_fnames=[f"t{i}" for i in range(50)])
    ev = evaluate(inputs, {"geomean": GeometricMeanBlend(inputs.layout), "mean": MeanBlend(inputs.layout)},
                  test_y=test_y, reference="geomean")
    s = ev.scores.set_index("name")
    for col in ("map3_all_se", "map3_all_se_rows", "map3_verified_se", "diff_se", "diff_se_rows",
                "diff_se_folds", "map3_test_se", "diff_test_se"):
        assert s[col].notna().all() and (s[col] >= 0).all() and (s[col] < 0.1).all(), col
    assert s.loc["geomean", ["diff_vs_default", "diff_se", "diff_test_vs_default"]].tolist() == [0, 0, 0]
    ap = ev.ap3["good"]
    per_fold = [ap[inputs.folds == f].mean() for f in range(4)]
    assert s.loc["good", "map3_all_se"] == pytest.approx(np.std(per_fold, ddof=1) / 2)
    assert s.loc["good", "diff_vs_default"] == pytest.approx(s.loc["good", "map3_all"] - s.loc["geomean", "map3_all"])
    # paired: the two blends' shared noise cancels, so their difference is far surer than either score
    assert s.loc["mean", "diff_se_rows"] < 0.75 * s.loc["mean", "map3_all_se_rows"]
    assert s.loc["good", "map3_test"] == pytest.approx(map_at_3(test_y, inputs.test("good")))


# ---------------------------------------------------------------------------
# the learned-weight blend
def test_learned_blend_scores_chance_on_noise():
    rng = np.random.default_rng(42)
    n, k = 600, 10
    inputs = make_inputs({f"noise{i}": rng.dirichlet(np.ones(k), n) for i in range(3)}, rng.integers(0, k, n), seed=1)
    proba = cross_validated_predictions(LearnedGeometricBlend(inputs.layout), inputs)
    assert map_at_3(inputs.y, proba) < 0.25, "learned blend scored above chance on pure noise: leakage"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_blend_gives_noise_a_near_zero_weight(seed):
    rng = np.random.default_rng(seed)
    n, k = 400, 8
    y = rng.integers(0, k, n)
    X = {"good": signal_probs(rng, y, k, 2.0), "noise": rng.dirichlet(np.ones(k), n),
         "weak": signal_probs(rng, y, k, 0.7)}
    inputs = make_inputs(X, y)
    blend = LearnedGeometricBlend(inputs.layout).fit(inputs.X_oof, y)
    assert blend.weights_["noise"] < 0.05
    assert blend.weights_["good"] > blend.weights_["weak"] > blend.weights_["noise"]
    assert sum(blend.weights_.values()) == pytest.approx(1.0)
    learned = map_at_3(y, cross_validated_predictions(LearnedGeometricBlend(inputs.layout), inputs))
    equal = map_at_3(y, cross_validated_predictions(GeometricMeanBlend(inputs.layout), inputs))
    assert learned > equal + 0.02  # the noise model's equal vote costs the plain blend


# ---------------------------------------------------------------------------
# regularisation chosen by inner cross-validation
def test_inner_cv_stackers_stay_at_chance_on_noise():
    rng = np.random.default_rng(7)
    n, k = 450, 10
    inputs = make_inputs({f"noise{i}": rng.dirichlet(np.ones(k), n) for i in range(3)}, rng.integers(0, k, n), seed=2)
    layout = inputs.layout
    for learner in (LogisticFusion(layout, C=[0.01, 1.0, 100.0]),
                    LogisticFusion(layout, C=[0.01, 1.0, 100.0], per_model_weights=True),
                    LightGBMStacker(layout, n_estimators=60, num_leaves=[4, 8], min_child_samples=20, inner_folds=3)):
        assert map_at_3(inputs.y, cross_validated_predictions(learner, inputs)) < 0.25
    # on noise the inner CV picks the strongest regularisation / the fewest trees
    lr = LogisticFusion(layout, C=[0.001, 1.0, 100.0]).fit(inputs.X_oof, inputs.y)
    assert lr.C_ == 0.001 and set(lr.inner_scores_) == {0.001, 1.0, 100.0}
    gbm = LightGBMStacker(layout, n_estimators=60, num_leaves=[4, 8], inner_folds=3).fit(inputs.X_oof, inputs.y)
    assert gbm.best_params_["n_estimators"] < 15 and len(gbm.inner_scores_) == 2


def test_inner_cv_keeps_trees_when_there_is_signal():
    rng = np.random.default_rng(8)
    n, k = 400, 4
    y = rng.integers(0, k, n)
    inputs = make_inputs({"inverted": signal_probs(rng, y, k, -3.0), "noise": rng.dirichlet(np.ones(k), n)}, y)
    layout, X = inputs.layout, inputs.X_oof
    gbm = LightGBMStacker(layout, n_estimators=80, num_leaves=[4, 8], inner_folds=3, learning_rate=0.1).fit(X, y)
    assert gbm.best_params_["n_estimators"] > 20
    lr = LogisticFusion(layout, C=[0.001, 0.1, 10.0], per_model_weights=True).fit(X, y)
    assert lr.C_ > 0.001 and lr.model_weights_["inverted"] < -1.0
    with pytest.raises(ValueError, match="inner_folds"):
        LightGBMStacker(layout, num_leaves=[4, 8], inner_folds=0).fit(X, y)


# ---------------------------------------------------------------------------
# settings, the stage, the report and the printed summary
def test_settings_defaults_and_refusals():
    s = level2.stacking_settings({})
    assert s["final"] == "auto" and s["default"] == "learned" and s["switch_margin_se"] == 1.0
    assert s["logreg"]["per_model_weights"] and s["logreg"]["class_bias"] and len(s["logreg"]["C"]) > 1
    assert "learned" in s["learners"]
    for bad in ({"switch_margin_se": -1}, {"switch_margin_se": "one"}, {"switch_se": "fold"},
                {"learned": {"temperature": 2}}, {"final": 3}):
        with pytest.raises(ConfigError):
            level2.stacking_settings({"stacking": bad})


def test_stage_records_the_choice_and_forcing_works(tmp_path, restore_logging, capsys):
    data, work, cfg_path, _ = make_stage_dirs(tmp_path, with_mfcc=False)
    cfg = load_config(str(cfg_path))
    cfg["stacking"].update(learners=["geomean", "mean", "learned", "logreg"], switch_margin_se=1.0,
                           default="geomean")
    out = level2.run_stacking(cfg, data, work)
    d = work.stacking_dir
    summary = json.loads((d / "summary.json").read_text())
    scores = pd.read_csv(d / "scores.csv").set_index("name")
    sel = summary["selection"]
    assert summary["default"] == "geomean" and sel["rule"] == "auto" and sel["default_cv"] == pytest.approx(
        scores.loc["geomean", "map3_all"])
    # 'noise' has an equal vote in geomean: the learned blend (noise weight ~0) is clearly better
    assert out["final"] != "geomean" and sel["switched"]
    assert sel["final_diff"] > sel["final_diff_se"] and summary["selection_text"].endswith("exceeds 1 SE)")
    assert summary["fitted"]["learned"]["weights"]["noise"] < 0.1 and "C" in summary["fitted"]["logreg"]
    assert set(summary["fitted"]["logreg"]["model_weights"]) == {"good", "noise"}
    if out["final"] == "learned":
        assert summary["final_details"]["weights"] == summary["fitted"]["learned"]["weights"]

    # the report's stacking part and the printed summary carry the numbers
    rep = Scores(models=pd.DataFrame(), stacking=scores.reset_index(), stacking_summary=summary,
                 final=summary["final"])
    table = stacking_score_table(rep).set_index("name")
    assert table.loc["learned", "± SE"] == pytest.approx(scores.loc["learned", "map3_all_se"])
    assert table.loc["geomean", "default"] == "yes" and table.loc[summary["final"], "final"] == "yes"
    text = " ".join(stacking_selection_lines(summary))
    assert "keep the declared default **geomean**" in text and f"switched to {summary['final']}: +" in text
    lines = "\n".join(summary_lines(cfg, work))
    assert f"{scores.loc['geomean', 'map3_all']:.4f} ± {scores.loc['geomean', 'map3_all_se']:.4f}" in lines
    assert "selection: default geomean" in lines

    # forcing by name; "best" is the old argmax
    cfg["stacking"]["final"] = "mean"
    forced = level2.run_stacking(cfg, data, work)
    assert forced["final"] == "mean" and forced["selection"]["rule"] == "forced"
    assert pd.read_csv(work.submission_csv).equals(pd.read_csv(d / "submissions" / "mean.csv"))
    cfg["stacking"]["final"] = "best"
    best = level2.run_stacking(cfg, data, work)
    assert best["final"] == pd.read_csv(d / "scores.csv").set_index("name")["map3_all"].idxmax()
    # a default that is not scored falls back to the first configured learner
    cfg["stacking"].update(final="auto", default="rank", learners=["mean", "logreg"], switch_margin_se=100.0)
    fallback = level2.run_stacking(cfg, data, work)
    assert fallback["default"] == "mean" and fallback["final"] == "mean"
