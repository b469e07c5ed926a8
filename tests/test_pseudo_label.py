"""Tests of the pseudo-label verification stage (``pipeline/pseudo_label.py`` over
``pipeline/labelling.py``, ``verification.py`` and ``verifiers.py``).

Most tests run the real loop and fold runner with the fold trainer replaced
by a fake (monkeypatch) that records what every "model" trained on and what
it predicted, and answers from a hand-made oracle -- no Keras training. One
small real run (tiny synthetic dataset, 1 epoch, tiny CNN) takes ~15 s.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import config as cfgmod
from pipeline import labelling as lab
from pipeline import pseudo_label as pl
from pipeline import verification as ver
from pipeline import verifiers
from pipeline.config import load_config
from pipeline.labels import training_labels
from pipeline.predictions import geometric_mean, probs_frame, read_table
from pipeline.workdir import WorkDir, read_json

CLASSES = ["c0", "c1", "c2", "c3"]


def peaked(top: int, p: float, n: int = len(CLASSES), second: int | None = None, p2: float = 0.0) -> np.ndarray:
    """A probability row with ``p`` on ``top`` (and ``p2`` on ``second``), the rest spread evenly."""
    row = np.zeros(n)
    row[top] = p
    rest = [c for c in range(n) if c != top and c != second]
    if second is not None:
        row[second] = p2
    row[rest] = (1.0 - p - p2) / len(rest)
    return row


# -- a made-up problem with planted wrong labels ----------------------------
def make_world(n_folds: int = 3):
    """Per class: 6 verified rows; non-verified: 3 easy + 2 medium + 1 hard
    correct rows, 1 wrong row the oracle fixes, 1 wrong row it cannot."""
    rows, truth, kind = [], {}, {}
    i = 0
    for c, name in enumerate(CLASSES):
        other = CLASSES[(c + 1) % len(CLASSES)]
        for k in ["verified"] * 6 + ["easy"] * 3 + ["medium"] * 2 + ["hard", "wrong_fixable", "wrong_ambiguous"]:
            fname = f"clip{i:03d}.wav"
            given = other if k.startswith("wrong") else name
            rows.append({"fname": fname, "label": given, "manually_verified": int(k == "verified")})
            truth[fname], kind[fname] = name, k
            i += 1
    folds = pd.DataFrame(rows)
    # spread every (class, kind) group over the folds
    folds["fold"] = folds.groupby([folds["fname"].map(truth), folds["fname"].map(kind)]).cumcount() % n_folds
    return folds, truth, kind


def oracle_row(fname: str, truth: dict, kind: dict, given: str, n_train: int, verifier: str) -> np.ndarray:
    t, g = CLASSES.index(truth[fname]), CLASSES.index(given)
    k = kind[fname]
    others = [c for c in range(len(CLASSES)) if c not in (t, g)]
    if k in ("verified", "easy"):
        row = peaked(t, 0.9)
    elif k == "medium":  # becomes confident once the training set has grown
        row = peaked(t, 0.7 if n_train > 20 else 0.4)
    elif k == "hard":
        row = peaked(t, 0.3)
    elif k == "wrong_fixable":  # the truth on top, the given label 2nd
        row = np.full(len(CLASSES), 0.05)
        row[t], row[g] = 0.8, 0.1
    else:  # wrong_ambiguous: the truth on top but not confidently, the given label last
        row = np.zeros(len(CLASSES))
        row[t], row[g], row[others[0]], row[others[1]] = 0.35, 0.01, 0.33, 0.31
    if verifier == "b":  # a second verifier that is a little less sure
        row = 0.9 * row + 0.1 / len(row)
    return row / row.sum()


class FakeTrainer:
    """Stands in for ``pipeline.trainer.train_fold``; records every call."""

    def __init__(self, folds, truth, kind):
        self.folds = folds.set_index("fname")
        self.truth, self.kind = truth, kind
        self.calls = []

    def __call__(self, spec, store, rows, val_fnames, val_labels, test_fnames, n_classes, out_dir, seed, fold,
                 fingerprint, progress=True, val_split="train", test_split="test", model_cache=None):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "best.keras").write_text("fake")
        self.calls.append({"verifier": spec["name"], "fold": fold, "rows": list(rows.fnames),
                           "labels": list(rows.labels), "eps": np.asarray(rows.epsilon).tolist(),
                           "val": list(val_fnames), "test": list(test_fnames), "out_dir": out_dir,
                           "test_split": test_split, "val_split": val_split})
        n_train = len(rows.fnames)

        def predict(fnames):
            if not fnames:
                return np.zeros((0, n_classes))
            return np.stack([oracle_row(f, self.truth, self.kind, self.folds.loc[f, "label"], n_train, spec["name"])
                             for f in fnames])

        return types.SimpleNamespace(oof=predict(list(val_fnames)), test=predict(list(test_fnames)) if test_fnames
                                     else None, summary={"fold": fold, "val_map3": 1.0})


def make_cfg(**pl_overrides):
    cfg = load_config("quick")
    cfg["pseudo_label"] = {
        "enabled": True, "mode": "verify", "verifiers": ["a", "b"],
        "models": {"a": {"builder": "cnn_ref", "feature": "logmel", "window": 16, "params": {"filters": [4]}},
                   "b": {"builder": "cnn_ref", "feature": "logmel", "window": 24, "params": {"filters": [4]}}},
        "train": {"epochs": 1}, "max_iterations": 5, "guard": False,
    }
    cfg["pseudo_label"].update(pl_overrides)
    cfg["labels"] = {"source": "given"}  # these tests set labels.source themselves where it matters
    return cfg


@pytest.fixture
def fake(monkeypatch):
    folds, truth, kind = make_world()
    trainer = FakeTrainer(folds, truth, kind)
    monkeypatch.setattr(verifiers, "train_fold", trainer)
    monkeypatch.setattr(verifiers, "verifier_input", lambda cfg, work, spec: types.SimpleNamespace(
        key="fake-store", train_split=lambda k: "train"))
    return types.SimpleNamespace(folds=folds, truth=truth, kind=kind, trainer=trainer)


def clean_table(truth):
    return pd.DataFrame({"fname": list(truth), "label": list(truth.values())})


# -- the loop with a fake trainer -------------------------------------------
def test_a_verifier_reads_the_split_its_fold_trains_on(fake, tmp_path, monkeypatch):
    """A verifier on per-fold embeddings (fold k's extractor space) reads fold k's split, never a shared one."""
    monkeypatch.setattr(verifiers, "verifier_input", lambda cfg, work, spec: types.SimpleNamespace(
        key="fake-store", train_split=lambda k: f"train-fold{k}"))
    lab.pseudo_label_stage(make_cfg(max_iterations=1), WorkDir(tmp_path / "work"), fake.folds, CLASSES,
                           progress=False)
    assert fake.trainer.calls
    for call in fake.trainer.calls:
        assert call["val_split"] == call["test_split"] == f"train-fold{call['fold']}"


def test_no_model_scores_a_row_it_trained_on(fake, tmp_path):
    work = WorkDir(tmp_path / "work")
    cfg = make_cfg()
    lab.pseudo_label_stage(cfg, work, fake.folds, CLASSES, clean_table(fake.truth), progress=False)
    folds = fake.folds.set_index("fname")
    calls = fake.trainer.calls
    assert calls, "the trainer was never called"
    by_iter = {}
    for call in calls:
        it = int(call["out_dir"].parent.parent.name.removeprefix("iter"))
        by_iter.setdefault((it, call["verifier"]), []).append(call)
        k = call["fold"]
        assert call["out_dir"] == work.pseudo_dir / f"iter{it}" / call["verifier"] / f"fold{k}"
        assert call["test_split"] == "train" and call["val_split"] == "train"
        trained = set(call["rows"])
        assert not trained & set(call["test"]), "a model predicted a row it trained on"
        assert not trained & set(call["val"])
        assert (folds.loc[call["rows"], "fold"] != k).all()
        assert (folds.loc[call["val"], "fold"] == k).all()
        assert (folds.loc[call["test"], "fold"] == k).all()
        assert (folds.loc[call["test"], "manually_verified"] == 0).all()
        assert np.allclose(call["eps"], cfg["training"]["smoothing_verified"])
        if it == 0:  # iteration 0: verified rows only
            assert (folds.loc[call["rows"] + call["val"], "manually_verified"] == 1).all()
    nonver = set(fake.folds.loc[fake.folds.manually_verified == 0, "fname"])
    for (it, verifier), group in by_iter.items():
        assert sorted(c["fold"] for c in group) == [0, 1, 2]
        predicted = [f for c in group for f in c["test"]]
        assert sorted(predicted) == sorted(nonver), "every non-verified row predicted exactly once per iteration"
        train_set = {f for c in group for f in c["rows"] + c["val"]}
        if it > 0:  # later iterations train on verified + rows accepted before
            labels = pd.read_csv(work.pseudo_dir / f"iter{it - 1}" / "decisions.csv", dtype={"fname": str})
            accepted_before = set(labels.loc[labels.decision.isin(["accepted", "accepted_before"]), "fname"])
            assert train_set == set(fake.folds.loc[fake.folds.manually_verified == 1, "fname"]) | accepted_before
    # the ensemble is the geometric mean of the two verifiers
    a = read_table(work.pseudo_dir / "iter0" / "a" / "predictions.csv", CLASSES)
    b = read_table(work.pseudo_dir / "iter0" / "b" / "predictions.csv", CLASSES)
    ens = read_table(work.pseudo_dir / "iter0" / "predictions.csv", CLASSES)
    assert np.allclose(ens[CLASSES].to_numpy(), geometric_mean([a[CLASSES].to_numpy(), b[CLASSES].to_numpy()]),
                       atol=1e-5)


def test_outcome_on_planted_labels(fake, tmp_path):
    work = WorkDir(tmp_path / "work")
    summary = lab.pseudo_label_stage(make_cfg(), work, fake.folds, CLASSES, clean_table(fake.truth), progress=False)
    labels = pd.read_csv(work.labels_csv, dtype={"fname": str, "label": str})
    assert list(labels.columns) == ["fname", "label", "status", "epsilon"]
    assert list(labels.fname) == list(fake.folds.fname)
    status = labels.set_index("fname")["status"]
    final = labels.set_index("fname")["label"]
    expected = {"verified": "verified", "easy": "accepted@0", "medium": "accepted@1", "hard": "accepted@1",
                "wrong_fixable": "relabelled@1", "wrong_ambiguous": "unresolved"}
    for fname, kind in fake.kind.items():
        assert status[fname] == expected[kind], (fname, kind)
        if kind != "wrong_ambiguous":
            assert final[fname] == fake.truth[fname]
    # iteration 1 accepts the medium rows but disagrees as often as iteration 0: plateau, so it is final
    table = pd.read_csv(work.pseudo_dir / "iterations.csv")
    assert list(table.columns) == ver.TABLE_COLUMNS
    assert table["iteration"].tolist() == [0, 1]
    assert table["train_rows"].tolist() == [24, 36]
    assert table["newly_accepted"].tolist() == [12, 12]
    assert table["disagree"].tolist() == [4, 4]  # the ambiguous rows rank their given label last
    assert table["remaining_unverified"].tolist() == [20, 4]
    assert (table[["agree_rank1", "agree_rank2", "agree_rank3", "disagree"]].sum(axis=1) == 32).all()
    assert summary["final_iteration"] == 1 and summary["relabelled"] == 4
    quality = read_json(work.pseudo_dir / "quality.json")
    assert quality["accepted_precision"] == 1.0 and quality["accepted_recall"] == 1.0
    assert quality["relabelled_precision"] == 1.0 and quality["relabelled_recall"] == 0.5
    assert quality["unresolved"] == 4 and quality["wrong_given"] == 8
    # the trainer reads it back
    cfg = make_cfg()
    cfg["labels"] = {"source": "pseudo"}
    back = training_labels(cfg, work, fake.folds)
    assert list(back["label"]) == list(labels["label"])
    assert np.allclose(back["epsilon"], labels["epsilon"])
    assert list(back["verified"]) == list((labels["status"] != "unresolved").astype(int))


def test_rerun_resumes_without_training(fake, tmp_path):
    work = WorkDir(tmp_path / "work")
    lab.pseudo_label_stage(make_cfg(), work, fake.folds, CLASSES, progress=False)
    first = work.labels_csv.read_text()
    n_calls = len(fake.trainer.calls)
    # a half-finished iteration: its state is gone, its fold folders are still there
    (work.pseudo_dir / "iter1" / "state.json").unlink()
    lab.pseudo_label_stage(make_cfg(), work, fake.folds, CLASSES, progress=False)
    assert len(fake.trainer.calls) == n_calls, "finished iterations and folds must not retrain"
    assert work.labels_csv.read_text() == first
    # changed thresholds: decided again from the stored predictions, nothing retrains
    lab.pseudo_label_stage(make_cfg(accept_threshold=0.95), work, fake.folds, CLASSES, progress=False)
    assert len(fake.trainer.calls) == n_calls
    table = pd.read_csv(work.pseudo_dir / "iterations.csv")
    assert table["iteration"].tolist() == [0]  # nothing passes 0.95: iteration 0 is the last
    # changed verifier settings retrain every fold of every iteration
    lab.pseudo_label_stage(make_cfg(train={"epochs": 2}), work, fake.folds, CLASSES, progress=False)
    assert len(fake.trainer.calls) == 2 * n_calls
    assert work.labels_csv.read_text() == first


def test_self_verify_caps_accepted_rows_per_class(fake, monkeypatch, tmp_path):
    crop_calls = []

    def fake_crops(model_path, spec, store, fnames, n_crops, seed, n_classes, split, chunk=64):
        crop_calls.append((Path(model_path), list(fnames)))
        folds = fake.folds.set_index("fname")
        out = np.zeros((len(fnames), n_crops, n_classes))
        for i, f in enumerate(fnames):
            t = CLASSES.index(fake.truth[f])
            out[i] = peaked(t, 0.99 if fake.kind[f] in ("easy", "medium") else 0.6)
            if fake.kind[f] == "medium" and folds.loc[f, "label"] == "c0":
                out[i, 0] = peaked((t + 1) % n_classes, 0.9)  # one crop disagrees: never accepted
        return out

    monkeypatch.setattr(verifiers, "predict_crops", fake_crops)
    work = WorkDir(tmp_path / "work")
    cfg = make_cfg(mode="self_verify", verifiers=["a"], crops=5, per_class_cap=2, max_iterations=3)
    lab.pseudo_label_stage(cfg, work, fake.folds, CLASSES, progress=False)
    for path, fnames in crop_calls:
        assert path.name == "best.keras"
        k = int(path.parent.name.removeprefix("fold"))
        assert (fake.folds.set_index("fname").loc[fnames, "fold"] == k).all()
    labels = pd.read_csv(work.labels_csv, dtype={"fname": str, "label": str})
    acc = labels[labels.status.str.startswith("accepted")]
    per_round = acc.groupby(["status", "label"]).size()
    assert per_round.max() <= 2
    assert (labels.status.str.startswith("relabelled")).sum() == 0  # no relabelling in self-verification
    kinds = labels.fname.map(fake.kind)
    assert set(kinds[labels.status.str.startswith("accepted")]) <= {"easy", "medium"}
    assert (labels.status[kinds.isin(["hard", "wrong_fixable", "wrong_ambiguous"])] == "unresolved").all()
    # eligible per class: 3 easy + 2 medium rows (c0: its medium rows have a disagreeing crop);
    # 2 per class per round; iteration 1 disagrees as often as iteration 0 (plateau), so it is the last
    assert per_round.xs("accepted@0", level="status").tolist() == [2, 2, 2, 2]
    assert per_round.xs("accepted@1", level="status").tolist() == [1, 2, 2, 2]
    assert pd.read_csv(work.pseudo_dir / "iterations.csv")["newly_accepted"].tolist() == [8, 7]


def test_self_verify_rule():
    n = 6
    crops = np.tile(peaked(0, 0.99, 3), (n, 4, 1))
    given = np.zeros(n, dtype=int)
    crops[1, :, 0] = 0.97; crops[1, :, 1] = 0.02; crops[1, :, 2] = 0.01  # less sure, still accepted
    crops[2, 3] = peaked(1, 0.9, 3)           # one crop disagrees -> rejected despite a high mean
    crops[3, :] = peaked(0, 0.9, 3)           # mean 0.9 < 0.95 -> rejected
    candidates = np.array([1, 1, 1, 1, 0, 1], dtype=bool)  # row 4 was accepted before
    got = ver.self_verify_mask(crops, given, candidates, 0.95, per_class_cap=40)
    assert got.tolist() == [True, True, False, False, False, True]
    capped = ver.self_verify_mask(crops, given, candidates, 0.95, per_class_cap=2)
    assert capped.tolist() == [True, False, False, False, False, True]  # the most confident two
    # the cap is per class
    crops2 = np.concatenate([crops, np.tile(peaked(2, 0.99, 3), (3, 4, 1))])
    given2 = np.concatenate([given, [2, 2, 2]])
    got2 = ver.self_verify_mask(crops2, given2, np.ones(9, dtype=bool), 0.95, per_class_cap=2)
    assert got2[given2 == 0].sum() == 2 and got2[given2 == 2].sum() == 2


# -- the pure rules on hand-made tables -------------------------------------
def test_accept_and_relabel_rules():
    probs = np.array([
        peaked(0, 0.6, 5),    # 0: agrees, 0.6 > 0.5 -> accepted
        peaked(0, 0.5, 5),    # 1: agrees at exactly 0.5 -> not accepted (strictly above)
        peaked(0, 0.3, 5),    # 2: agrees weakly -> accepted only at the final iteration (> 0.1)
        peaked(1, 0.7, 5),    # 3: another class at 0.7 -> relabelled at the final iteration
        peaked(1, 0.45, 5),   # 4: another class but not sure enough -> left
        peaked(0, 0.9, 5),    # 5: not a candidate (accepted before)
    ])
    given = np.zeros(6, dtype=int)
    remaining = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    acc, rel = ver.decide(probs, given, remaining, final=False)
    assert acc.tolist() == [True, False, False, False, False, False]
    assert (rel == -1).all()
    acc, rel = ver.decide(probs, given, remaining, final=True)
    assert acc.tolist() == [True, True, True, False, False, False]
    assert rel.tolist() == [-1, -1, -1, 1, -1, -1]
    acc, rel = ver.decide(probs, given, remaining, final=True, final_accept_threshold=0.55, relabel_threshold=0.8)
    assert acc.tolist() == [True, False, False, False, False, False] and (rel == -1).all()
    assert ver.label_ranks(probs, np.array([0, 0, 0, 0, 2, 1])).tolist() == [1, 1, 1, 2, 3, 2]


def test_plateau():
    assert not ver.is_plateau([5])
    assert not ver.is_plateau([5, 4])
    assert ver.is_plateau([5, 4, 4])
    assert ver.is_plateau([5, 6])


class ScriptedRunner:
    """Hand-made probability tables, one per iteration."""
    fingerprint = "scripted"

    def __init__(self, tables):
        self.tables, self.train_sizes = tables, []

    def __call__(self, iteration, train_df, pool_df, iter_dir):
        self.train_sizes.append(len(train_df))
        return self.tables[iteration], None


def scripted_problem():
    """5 classes, 2 verified rows + 8 non-verified rows (all given class 0)."""
    folds = pd.DataFrame({"fname": [f"v{i}" for i in range(2)] + [f"u{i}" for i in range(8)],
                          "label": ["c0"] * 10, "manually_verified": [1, 1] + [0] * 8, "fold": [0, 1] * 5})
    classes = [f"c{i}" for i in range(5)]
    last = peaked(1, 0.4, 5, second=2, p2=0.3)
    last[[0, 3, 4]] = [0.05, 0.15, 0.1]  # the given label (0) ranked last: disagreeing
    it0 = np.array([peaked(0, 0.9, 5)] + [last] * 3 + [peaked(1, 0.4, 5, second=0, p2=0.3)] * 4)
    it1 = it0.copy()
    it1[1] = peaked(0, 0.8, 5)
    it2 = it1.copy()
    it2[4] = peaked(0, 0.6, 5)
    it2[5] = peaked(0, 0.3, 5)
    it2[2] = peaked(3, 0.7, 5)  # now a confident other class
    return folds, classes, [it0, it1, it2, it2, it2]


def test_loop_stops_at_plateau_and_applies_final_thresholds_there(tmp_path):
    folds, classes, tables = scripted_problem()
    runner = ScriptedRunner(tables)
    res = ver.verification_loop(folds, classes, lab.settings({"pseudo_label": {"max_iterations": 10}}), runner,
                               tmp_path)
    # disagreeing rows fall 3 -> 2 -> 1, then stay at 1: iteration 3 is the plateau and the final one
    assert res.table["disagree"].tolist() == [3, 2, 1, 1]
    assert res.final_iteration == 3
    assert runner.train_sizes == [2, 3, 4, 5]
    status = dict(zip(folds.fname, res.status))
    assert status["v0"] == "verified"
    assert status["u0"] == "accepted@0" and status["u1"] == "accepted@1" and status["u4"] == "accepted@2"
    assert status["u5"] == "accepted@3"      # 0.3 only passes the final threshold 0.1
    assert status["u2"] == "relabelled@3" and classes[res.final_labels[folds.fname.tolist().index("u2")]] == "c3"
    assert status["u3"] == "unresolved" and status["u6"] == "unresolved"
    assert res.table["newly_accepted"].tolist() == [1, 1, 1, 1]
    assert res.table["remaining_unverified"].tolist() == [7, 6, 5, 3]
    assert res.relabelled == 1


def test_loop_stops_at_the_iteration_cap(tmp_path):
    folds, classes, tables = scripted_problem()
    runner = ScriptedRunner(tables)
    res = ver.verification_loop(folds, classes, lab.settings({"pseudo_label": {"max_iterations": 2}}), runner, tmp_path)
    assert res.final_iteration == 1 and len(runner.train_sizes) == 2
    status = dict(zip(folds.fname, res.status))
    assert status["u1"] == "accepted@1"
    assert status["u4"] == "unresolved"  # 0.3 on the given label but ranked 2nd: not accepted
    assert res.relabelled == 0


def test_loop_ends_when_nothing_new_is_accepted(tmp_path):
    folds, classes, tables = scripted_problem()
    it1 = tables[0].copy()
    it1[1] = peaked(0, 0.4, 5)  # agrees now (fewer disagreeing rows) but below 0.5
    runner = ScriptedRunner([tables[0], it1, it1])
    res = ver.verification_loop(folds, classes, lab.settings({}), runner, tmp_path)
    assert res.table["disagree"].tolist() == [3, 2]  # no plateau, but the training set would not change
    assert res.final_iteration == 1 and len(runner.train_sizes) == 2
    assert dict(zip(folds.fname, res.status))["u1"] == "accepted@1"  # by the final threshold


def test_epsilon_assignment():
    status = np.array(["verified", "accepted@0", "relabelled@2", "unresolved", "unresolved", "accepted@1"] * 50)
    eps = ver.assign_epsilon(status, 0.05, 0.1, 0.3, seed=7)
    unres = status == "unresolved"
    assert np.allclose(eps[~unres], 0.05)
    assert ((eps[unres] >= 0.1) & (eps[unres] <= 0.3)).all()
    assert len(np.unique(eps[unres])) == unres.sum()  # drawn per row
    assert np.array_equal(eps, ver.assign_epsilon(status, 0.05, 0.1, 0.3, seed=7))  # seeded
    assert not np.array_equal(eps, ver.assign_epsilon(status, 0.05, 0.1, 0.3, seed=8))
    # a row's epsilon does not depend on the other rows' status
    status2 = status.copy()
    status2[3] = "accepted@0"
    eps2 = ver.assign_epsilon(status2, 0.05, 0.1, 0.3, seed=7)
    assert np.array_equal(eps2[4:], eps[4:])


def test_labels_table_round_trip(tmp_path):
    work = WorkDir(tmp_path)
    folds = pd.DataFrame({"fname": ["a.wav", "b.wav", "c.wav", "d.wav"], "label": ["x", "y", "x", "z"],
                          "manually_verified": [1, 0, 0, 0], "fold": [0, 1, 0, 1]})
    classes = ["x", "y", "z"]
    status = ["verified", "accepted@0", "relabelled@1", "unresolved"]
    eps = ver.assign_epsilon(status, 0.05, seed=1)
    table = ver.labels_table(folds, classes, np.array([0, 1, 2, 2]), status, eps)
    lab.write_labels_table(work, table, folds)
    cfg = {"labels": {"source": "pseudo"}, "training": {"smoothing_verified": 0.05}}
    back = training_labels(cfg, work, folds)
    assert back["label"].tolist() == ["x", "y", "z", "z"]
    assert np.allclose(back["epsilon"], eps)
    assert back["verified"].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("mode", ["smoothing", "loss_masking"])
def test_modes_without_verification_leave_labels_alone(mode, fake, tmp_path):
    work = WorkDir(tmp_path)
    cfg = make_cfg(mode=mode)
    cfg["training"]["loss_masking"] = 0.8 if mode == "loss_masking" else None
    lab.pseudo_label_stage(cfg, work, fake.folds, CLASSES, progress=False)
    assert not fake.trainer.calls
    labels = pd.read_csv(work.labels_csv, dtype={"fname": str, "label": str})
    assert labels["label"].tolist() == fake.folds["label"].tolist()
    ver = fake.folds["manually_verified"].to_numpy() == 1
    assert np.allclose(labels["epsilon"][ver], 0.05) and np.allclose(labels["epsilon"][~ver], 0.3)
    assert (labels["status"][ver] == "verified").all() and (labels["status"][~ver] == "unresolved").all()
    cfg["labels"] = {"source": "pseudo"}
    given = training_labels({**cfg, "labels": {"source": "given"}}, work, fake.folds)
    pd.testing.assert_frame_equal(training_labels(cfg, work, fake.folds), given)  # same as the given labels


def test_skipped_stage(fake, tmp_path, capsys):
    work = WorkDir(tmp_path)
    cfg = make_cfg(enabled=False)
    assert lab.pseudo_label_stage(cfg, work, fake.folds, CLASSES)["skipped"]
    assert not work.labels_csv.exists() and "skipped" in capsys.readouterr().out
    cfg["labels"] = {"source": "pseudo"}
    lab.pseudo_label_stage(cfg, work, fake.folds, CLASSES)
    assert pd.read_csv(work.labels_csv)["label"].tolist() == fake.folds["label"].tolist()
    all_verified = fake.folds.assign(manually_verified=1)
    work2 = WorkDir(tmp_path / "w2")
    assert "non-verified" in lab.pseudo_label_stage(make_cfg(), work2, all_verified, CLASSES)["skipped"]
    assert not fake.trainer.calls


def test_bad_settings_are_refused():
    with pytest.raises(cfgmod.ConfigError):
        lab.settings({"pseudo_label": {"mode": "vote"}})
    with pytest.raises(cfgmod.ConfigError):
        lab.settings({"pseudo_label": {"accept_threshold": 1.5}})
    with pytest.raises(cfgmod.ConfigError):
        lab.settings({"pseudo_label": {"max_iterations": 0}})
    assert lab.settings(load_config("quick"))["mode"] in ver.MODES


# -- one small real run -------------------------------------------------------
def _tiny_dataset(root: Path, per_class: int = 10, test_per_class: int = 2, seed: int = 0) -> Path:
    """Three tone classes; 40 % of train rows non-verified, a quarter of those mislabelled."""
    import soundfile as sf
    rng = np.random.default_rng(seed)
    classes = {"low": 300.0, "mid": 1200.0, "high": 3200.0}
    sr = 16000
    (root / "audio_train").mkdir(parents=True)
    (root / "audio_test").mkdir()
    train, clean, test = [], [], []
    names = list(classes)
    for split, n, out in (("train", per_class, train), ("test", test_per_class, test)):
        for name, freq in classes.items():
            for i in range(n):
                fname = f"{split}_{name}_{i}.wav"
                t = np.arange(int(sr * rng.uniform(0.5, 0.9))) / sr
                y = 0.5 * np.sin(2 * np.pi * freq * rng.uniform(0.9, 1.1) * t) + 0.05 * rng.normal(size=len(t))
                sf.write(root / f"audio_{split}" / fname, y.astype(np.float32), sr)
                out.append((fname, name, i))
    rows = []
    for fname, name, i in train:
        verified = int(i < 6)
        label = names[(names.index(name) + 1) % 3] if i == 9 else name
        rows.append({"fname": fname, "label": label, "manually_verified": verified})
        clean.append({"fname": fname, "label": name})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame(clean).to_csv(root / "train_clean_labels.csv", index=False)
    pd.DataFrame({"fname": [f for f, _, _ in test], "label": "low mid high"}).to_csv(
        root / "sample_submission.csv", index=False)
    return root


def test_real_run_on_a_tiny_dataset(tmp_path):
    from pipeline.extraction import run_features
    from pipeline.cv import run_folds
    data = _tiny_dataset(tmp_path / "data")
    sets = ["run.models=[]", "stacking.mfcc_feature=null", "feature_extraction.n_jobs=1", "features.logmel.n_mels=16",
            "folds.n_folds=2", "models.cnn_ref.window=16", "models.cnn_ref.params.filters=[4,8]",
            "pseudo_label.enabled=true", "pseudo_label.mode=verify", "pseudo_label.verifiers=[cnn_ref]",
            "pseudo_label.max_iterations=2", "pseudo_label.train.epochs=1", "pseudo_label.train.batch_size=8"]
    cfg = load_config("quick", sets)
    work = WorkDir(tmp_path / "work")
    run_features(cfg, data, work, progress=False)
    run_folds(cfg, data, work)
    argv = ["--config", "quick", "--data", str(data), "--work", str(work.root)] + \
        [a for s in sets for a in ("--set", s)]
    assert pl.main(argv) is None
    folds = pd.read_csv(work.folds_csv, dtype={"fname": str})
    labels = pd.read_csv(work.labels_csv, dtype={"fname": str, "label": str})
    assert labels["fname"].tolist() == folds["fname"].tolist()
    assert labels["status"].str.match(r"^(verified|accepted@\d+|relabelled@\d+|unresolved)$").all()
    table = pd.read_csv(work.pseudo_dir / "iterations.csv")
    assert list(table.columns) == ver.TABLE_COLUMNS and 1 <= len(table) <= 2
    assert (work.pseudo_dir / "iter0" / "cnn_ref" / "fold0" / "best.keras").exists()
    assert (work.pseudo_dir / "iter0" / "cnn_ref" / "fold1" / "summary.json").exists()
    assert (work.pseudo_dir / "quality.json").exists()
    cfg["labels"] = {"source": "pseudo"}
    back = training_labels(cfg, work, folds)
    assert back["label"].tolist() == labels["label"].tolist()
    # a re-run trains nothing and gives the same table
    stamp = (work.pseudo_dir / "iter0" / "cnn_ref" / "fold0" / "best.keras").stat().st_mtime_ns
    before = work.labels_csv.read_text()
    assert pl.main(argv) is None
    assert work.labels_csv.read_text() == before
    assert (work.pseudo_dir / "iter0" / "cnn_ref" / "fold0" / "best.keras").stat().st_mtime_ns == stamp


# -- the guard (issue 10: verification must not hurt) --------------------------------
def test_calibrated_threshold_by_hand():
    # top-class probabilities 0.9, 0.8, 0.7, 0.6, 0.5 (classes 0..4 of 5); right, right, wrong, right, wrong
    probs = np.stack([peaked(i, p, 5) for i, p in enumerate([0.9, 0.8, 0.7, 0.6, 0.5])])
    labels = np.array([0, 1, 0, 3, 0])
    # prefixes by confidence: precision 1, 1, 2/3, 3/4, 3/5
    t = ver.calibrated_threshold(probs, labels, precision=0.75, min_support=1)
    assert 0.59 < t < 0.6                      # keeps the 0.6 row: 3 of 4 right
    assert 0.79 < ver.calibrated_threshold(probs, labels, precision=1.0, min_support=1) < 0.8
    assert ver.calibrated_threshold(probs, labels, precision=1.0, min_support=3) is None
    assert ver.calibrated_threshold(probs, labels, precision=0.5, min_support=6) is None   # too few rows


class CalibratedRunner(ScriptedRunner):
    """ScriptedRunner that also reports out-of-fold predictions of the training rows."""

    def __init__(self, tables, calib_right):
        super().__init__(tables)
        self.calib_right = calib_right   # per iteration: is the top class of verified rows right?

    def __call__(self, iteration, train_df, pool_df, iter_dir):
        right = self.calib_right[iteration]
        rows = [peaked(0, 0.9, 5) if right else peaked(1, 0.9, 5) for _ in range(len(train_df))]
        self.calibration = probs_frame(train_df["fname"], np.stack(rows), [f"c{i}" for i in range(5)])
        return super().__call__(iteration, train_df, pool_df, iter_dir)


def test_guard_switches_off_decisions_its_record_does_not_support(tmp_path):
    folds, classes, tables = scripted_problem()
    s = lab.settings({"pseudo_label": {"guard": True, "min_support": 1, "max_iterations": 3}})
    # the verifiers get every verified row wrong: no confidence is precise enough
    result = ver.verification_loop(folds, classes, s, CalibratedRunner(tables, [False, False, False]), tmp_path)
    assert result.guard["relabel_threshold"] == 1.0 and result.guard["accept_threshold"] == 1.0
    assert result.relabelled == 0 and set(result.status[2:]) == {ver.UNRESOLVED}
    assert (tmp_path / "iter0" / "calibration.csv").exists()
    # without the guard the same tables accept and relabel rows
    plain = ver.verification_loop(folds, classes, lab.settings({"pseudo_label": {"max_iterations": 3,
                                                                                "guard": False}}),
                                 ScriptedRunner(tables), tmp_path / "plain")
    assert plain.relabelled > 0 or any(str(st).startswith("accepted") for st in plain.status)


def test_a_guard_that_decides_nothing_gives_exactly_the_fixed_smoothing_labels(tmp_path):
    folds, classes, tables = scripted_problem()
    cfg = load_config("quick")
    cfg["pseudo_label"].update(guard=True, min_support=1, max_iterations=3)
    work = WorkDir(tmp_path / "work")
    lab.pseudo_label_stage(cfg, work, folds, classes, progress=False,
                           runner=CalibratedRunner(tables, [False, False, False]))
    got = pd.read_csv(work.labels_csv, dtype=str, keep_default_na=False)
    want = ver.given_labels_table(folds, cfg["training"]["smoothing_verified"],
                                  cfg["training"]["smoothing_unverified"])
    assert got["label"].tolist() == want["label"].tolist() and got["status"].tolist() == want["status"].tolist()
    np.testing.assert_allclose(got["epsilon"].astype(float), want["epsilon"])


def test_guard_falls_back_when_accepted_rows_hurt(tmp_path):
    folds, classes, tables = scripted_problem()
    s = lab.settings({"pseudo_label": {"guard": True, "min_support": 1, "max_iterations": 3}})
    # right on the verified rows at iteration 0, wrong once accepted rows joined the training set
    result = ver.verification_loop(folds, classes, s, CalibratedRunner(tables, [True, False, False]), tmp_path)
    assert "fell from" in result.guard["fallback"]
    assert result.relabelled == 0 and set(result.status[2:]) == {ver.UNRESOLVED}


def test_handcrafted_verifier_with_the_guard_on_a_tiny_dataset(tmp_path):
    """A handcrafted model verifies (no Keras), the guard records its thresholds,
    and labels.csv is written for every row of folds.csv."""
    from pipeline.extraction import run_features
    from pipeline.cv import run_folds
    data = _tiny_dataset(tmp_path / "data", per_class=12)
    sets = ["run.models=[]", "stacking.mfcc_feature=null", "feature_extraction.n_jobs=1", "folds.n_folds=2",
            "pseudo_label.enabled=true", "pseudo_label.verifiers=[stats_lr]", "pseudo_label.max_iterations=2",
            "pseudo_label.guard=true", "pseudo_label.min_support=5", "labels.source=pseudo"]
    cfg = load_config("quick", sets)
    work = WorkDir(tmp_path / "work")
    run_features(cfg, data, work, progress=False)
    run_folds(cfg, data, work)
    from pipeline.dataset import load_dataset
    folds = pd.read_csv(work.folds_csv, dtype={"fname": str, "label": str})
    summary = lab.pseudo_label_stage(cfg, work, folds, load_dataset(data).classes, progress=False)
    guard = summary["guard"]
    assert guard["calibration_rows"] > 0 and 0.0 <= guard["relabel_threshold"] <= 1.0
    assert (work.pseudo_dir / "iter0" / "stats_lr" / "fold0" / "model.joblib").exists()
    labels = pd.read_csv(work.labels_csv, dtype={"fname": str, "label": str})
    assert labels["fname"].tolist() == folds["fname"].tolist()
