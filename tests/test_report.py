"""Tests of ``pipeline/report.py``: the report stage on a synthetic work
directory (every table the other stages write, made up here, so no training
runs), with and without the optional parts. Its library,
``pipeline/reporting/``, has unit tests in tests/test_reporting.py.

``make_run`` is also used by tests/test_notebooks.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pipeline import report, reporting
from pipeline.cli import run_main
from pipeline.dataset import load_dataset
from pipeline.metrics import map_at_3, map_at_k_labels, per_class_map_at_3
from pipeline.predictions import probs_frame, write_table
from pipeline.submission import write_submission
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json

CLASSES = ["Bark", "Cello", "Knock"]
TONES = {"Bark": 440.0, "Cello": 220.0, "Knock": 1200.0}
N_PER_CLASS = 8
N_TEST = 6
N_FOLDS = 3
SR = 16000
BAD_TRAIN = "bad_train.wav"   # unreadable: its bytes are not audio
BAD_TEST = "silent_test.wav"  # all zeros: rejected as silent
MODELS = ["cnn_a", "cnn_b"]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _probs(rng, y, strength):
    logits = rng.normal(0, 1.0, (len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += strength
    return _softmax(logits)


def make_dataset(root: Path, test_labels: bool = True, audio: bool = True) -> Path:
    """A tiny FSDKaggle2018-layout folder: 3 classes x 8 train clips (one
    unreadable), 6 test clips (one silent), short sine tones."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "audio_train").mkdir(exist_ok=True)
    (root / "audio_test").mkdir(exist_ok=True)
    rows = []
    for c in CLASSES:
        for i in range(N_PER_CLASS):
            rows.append({"fname": f"{c.lower()}_{i}.wav", "label": c, "manually_verified": int(i % 3 != 2)})
    rows[-1]["fname"] = BAD_TRAIN
    train = pd.DataFrame(rows)
    train.to_csv(root / "train.csv", index=False)
    test = [f"test_{i}.wav" for i in range(N_TEST - 1)] + [BAD_TEST]
    pd.DataFrame({"fname": test, "label": "Bark Cello Knock"}).to_csv(root / "sample_submission.csv", index=False)
    if test_labels:
        pd.DataFrame({"fname": test, "label": [CLASSES[i % 3] for i in range(N_TEST)]}).to_csv(
            root / "test_labels.csv", index=False)

    def tone(label, seconds):
        t = np.arange(int(seconds * SR)) / SR
        return (0.5 * np.sin(2 * np.pi * TONES[label] * t) + 0.01 * rng.normal(size=len(t))).astype(np.float32)

    if audio:
        for r in rows:
            path = root / "audio_train" / r["fname"]
            if r["fname"] == BAD_TRAIN:
                path.write_bytes(b"this is not a wav file")
            else:
                sf.write(path, tone(r["label"], 0.3 + 0.1 * (len(r["fname"]) % 5)), SR)
        for i, f in enumerate(test):
            data = np.zeros(SR // 2, np.float32) if f == BAD_TEST else tone(CLASSES[i % 3], 0.5)
            sf.write(root / "audio_test" / f, data, SR)
    return root


def make_run(tmp: Path, stacking: bool = True, pseudo: bool = True, test_labels: bool = True,
             audio: bool = True) -> tuple[Path, Path]:
    """(dataset folder, work folder) of a finished synthetic run."""
    data = make_dataset(tmp / "data", test_labels=test_labels, audio=audio)
    ds = load_dataset(data, check_files=False)
    work = WorkDir(tmp / "work")
    rng = np.random.default_rng(1)

    clips = []
    for split, fnames in (("train", ds.train["fname"]), ("test", ds.test_fnames)):
        for i, f in enumerate(fnames):
            status, error = "ok", ""
            if f == BAD_TRAIN:
                status, error = "unreadable", "Format not recognised."
            elif f == BAD_TEST:
                status, error = "silent", "peak below 0.0001"
            clips.append({"fname": f, "split": split, "status": status,
                          "duration_s": float("nan") if status == "unreadable" else 0.5 + 0.25 * (i % 3),
                          "channels": 0 if status == "unreadable" else 1,
                          "sample_rate": 0 if status == "unreadable" else SR, "error": error})
    atomic_write_csv(pd.DataFrame(clips), work.clips_csv)

    folds = ds.train[ds.train["fname"] != BAD_TRAIN].reset_index(drop=True).copy()
    folds["fold"] = np.arange(len(folds)) % N_FOLDS
    atomic_write_csv(folds, work.folds_csv)
    y = folds["label"].map(ds.class_index).to_numpy()
    ver = folds["manually_verified"].to_numpy() == 1
    test_y = np.array([i % 3 for i in range(N_TEST)])

    oofs, tests = {}, {}
    for m, strength, params in zip(MODELS, (2.0, 0.8), (12345, 678)):
        oof, test = _probs(rng, y, strength), _probs(rng, test_y, strength)
        oofs[m], tests[m] = oof, test
        write_table(probs_frame(folds["fname"], oof, CLASSES, folds["fold"]), work.oof_csv(m))
        write_table(probs_frame(ds.test_fnames, test, CLASSES), work.test_csv(m))
        summary = {"model": m, "oof_map3": map_at_3(y, oof), "oof_map3_verified": map_at_3(y[ver], oof[ver]),
                   "folds": N_FOLDS, "train_seconds": 42.5 if m == "cnn_a" else 10.0,
                   "samples_per_second": 321.0 if m == "cnn_a" else 99.5, "params": params,
                   "input_shape": [64, 48, 3]}
        if test_labels:
            summary["test_map3"] = map_at_3(test_y, test)
        atomic_write_json(summary, work.model_dir(m) / "summary.json")
        for k in range(N_FOLDS):
            hist = pd.DataFrame({"epoch": [1, 2, 3], "loss": [1.0, 0.8, 0.7],
                                 "val_map3": [0.4 + 0.1 * k, 0.5 + 0.1 * k, 0.55 + 0.1 * k],
                                 "val_acc": [0.3, 0.4, 0.5], "lr": [1e-3] * 3})
            atomic_write_csv(hist, work.fold_dir(m, k) / "history.csv")

    timings = {"features": 12.5, "folds": 0.3, "train:cnn_a": 42.5, "train:cnn_b": 10.0}
    if stacking:
        mean = (oofs["cnn_a"] + oofs["cnn_b"]) / 2
        logreg = _probs(rng, y, 2.5)
        mean_t, logreg_t = (tests["cnn_a"] + tests["cnn_b"]) / 2, _probs(rng, test_y, 2.5)
        rows = []
        for name, kind, p, pt in (("cnn_a", "model", oofs["cnn_a"], tests["cnn_a"]),
                                  ("cnn_b", "model", oofs["cnn_b"], tests["cnn_b"]),
                                  ("mean", "blend", mean, mean_t), ("logreg", "stacker", logreg, logreg_t)):
            row = {"name": name, "kind": kind, "map3_all": map_at_3(y, p), "map3_verified": map_at_3(y[ver], p[ver]),
                   "accuracy_all": float((p.argmax(1) == y).mean())}
            if test_labels:
                row["map3_test"] = map_at_3(test_y, pt)
            rows.append(row)
        d = work.stacking_dir
        atomic_write_csv(pd.DataFrame(rows), d / "scores.csv")
        for name, p in (("mean", mean), ("logreg", logreg)):
            write_table(probs_frame(folds["fname"], p, CLASSES, folds["fold"]), d / f"{name}_oof.csv")
        write_table(probs_frame(ds.test_fnames, logreg_t, CLASSES), d / "final_test.csv")
        write_submission(work.submission_csv, ds.test_fnames, logreg_t, CLASSES)
        final_row = rows[-1]
        atomic_write_json({"final": "logreg", "final_kind": "stacker", "cv_map3_all": final_row["map3_all"],
                           "cv_map3_verified": final_row["map3_verified"],
                           "test_map3": final_row.get("map3_test"), "models": MODELS,
                           "learners": ["mean", "logreg"], "names": MODELS + ["mean", "logreg"],
                           "submission": str(work.submission_csv)}, d / "summary.json")
        timings["stacking"] = 3.0
    if pseudo:
        work.pseudo_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"iteration": [1, 2], "train_rows": [18, 21], "newly_accepted": [3, 1],
                      "agree_rank1": [2, 1], "agree_rank2": [1, 0], "agree_rank3": [0, 0], "disagree": [4, 2],
                      "remaining_unverified": [4, 3], "map3_vs_given": [0.8125, 0.8333]}).to_csv(
            work.pseudo_dir / "iterations.csv", index=False)
    atomic_write_json(timings, work.timings_json)
    return data, work.root


def run_stage(data: Path, work: Path) -> str:
    assert run_main(report.main, ["--config", "quick", "--data", str(data), "--work", str(work)]) == 0
    return (work / "report.md").read_text()


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"section {title!r} missing from the report"
    return m.group(1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    data, work = make_run(tmp_path_factory.mktemp("full"), audio=False)
    return data, work, run_stage(data, work)


def test_full_report_sections_and_numbers(full_run):
    data, work, text = full_run
    wd = WorkDir(work)
    ds = load_dataset(data, check_files=False)
    folds = pd.read_csv(wd.folds_csv)
    y = folds["label"].map(ds.class_index).to_numpy()

    dataset = section(text, "Dataset")
    assert f"clips: {N_PER_CLASS * 3} train, {N_TEST} test" in dataset
    assert "classes: 3" in dataset
    assert "manually verified: 18 of 24 train clips (75.0%)" in dataset
    assert "2 bad file(s) found" in dataset
    assert BAD_TRAIN in dataset and "unreadable" in dataset and "Format not recognised." in dataset
    assert BAD_TEST in dataset and "silent" in dataset
    clips = pd.read_csv(wd.clips_csv)
    train_dur = clips[clips.split == "train"]["duration_s"]
    assert f"median clip {train_dur.median():.2f} s train" in dataset

    scores = section(text, "Scores")
    for m in MODELS:
        s = json.loads((wd.model_dir(m) / "summary.json").read_text())
        line = next(l for l in scores.splitlines() if l.startswith(f"| {m} |"))
        assert f"{s['oof_map3']:.4f}" in line and f"{s['oof_map3_verified']:.4f}" in line
        assert f"{s['test_map3']:.4f}" in line and f"{s['params']:,}" in line
    assert "| cnn_a |" in scores and "321.0" in scores and "42.5 s" in scores
    st = pd.read_csv(wd.stacking_dir / "scores.csv")
    for row in st.itertuples():
        line = next(l for l in scores.splitlines() if l.startswith(f"| {row.name} | {row.kind} |"))
        assert f"{row.map3_all:.4f}" in line and f"{row.map3_verified:.4f}" in line and f"{row.map3_test:.4f}" in line
        assert line.rstrip().endswith("| yes |") == (row.name == "logreg")
    assert "Chosen final learner: **logreg** (stacker)" in scores

    final = section(text, "Final OOF predictions")
    lr = pd.read_csv(wd.stacking_dir / "logreg_oof.csv")
    p = lr[CLASSES].to_numpy()
    assert "Final = **logreg** (stacker, stacking final)" in final
    assert f"OOF MAP@3 {map_at_3(y, p):.4f} on {len(y)} clips" in final
    n_unver = int((folds["manually_verified"] == 0).sum())
    assert f"{n_unver} of them are not manually verified" in final
    per_class = per_class_map_at_3(y, p, CLASSES)
    for row in per_class.itertuples():
        assert re.search(rf"^\| {row._1} \| {row.clips} \| \d+ \| {row.map3:.4f} \|", final, re.M), row
    assert "![per-class MAP@3](plots/per_class_map3.png)" in final
    assert "![confusion matrix](plots/confusion.png)" in final

    training = section(text, "Training curves")
    for m in MODELS:
        assert f"![training {m}](plots/training_{m}.png)" in training
    assert "0: 0.5500, 1: 0.6500, 2: 0.7500" in training

    pseudo = section(text, "Pseudo-labelling")
    assert "| iteration | train_rows | newly_accepted |" in pseudo
    assert "| 2 | 21 | 1 | 1 | 0 | 0 | 2 | 3 | 0.8333 |" in pseudo

    timing = section(text, "Time per stage")
    assert "| train:cnn_a | 42.5 s |" in timing and "| stacking | 3.0 s |" in timing
    assert "| total | 68.3 s | 100.0% |" in timing

    sub = section(text, "Submission")
    truth = pd.read_csv(data / "test_labels.csv")
    submitted = pd.read_csv(wd.submission_csv)
    expected = map_at_k_labels(truth["label"].tolist(), [s.split() for s in submitted["label"]])
    assert str(wd.submission_csv) in sub and "from stacking's final learner logreg" in sub
    assert f"Final test MAP@3: **{expected:.4f}** over {N_TEST} labelled test clips" in sub

    for name in ["per_class_map3.png", "confusion.png"] + [f"training_{m}.png" for m in MODELS]:
        png = work / "plots" / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "report" in json.loads(wd.timings_json.read_text())


def test_report_without_optional_parts(tmp_path):
    data, work = make_run(tmp_path, stacking=False, pseudo=False, test_labels=False, audio=False)
    text = run_stage(data, work)
    assert "Stacking was not run" in section(text, "Scores")
    final = section(text, "Final OOF predictions")
    # best single model by OOF MAP@3 (cnn_a has the stronger signal)
    assert "Final = **cnn_a** (model, best single model)" in final
    assert "Pseudo-labelling was not run" in section(text, "Pseudo-labelling")
    assert "No submission yet" in section(text, "Submission")
    scores = section(text, "Scores")
    line = next(l for l in scores.splitlines() if l.startswith("| cnn_a |"))
    assert "| – |" in line  # no test MAP@3
    for name in ["per_class_map3.png", "confusion.png", "training_cnn_a.png"]:
        assert (work / "plots" / name).exists()


def test_report_of_an_empty_work_dir(tmp_path):
    data = make_dataset(tmp_path / "data", test_labels=False, audio=False)
    text = run_stage(data, tmp_path / "work")
    assert "clips.csv is missing" in section(text, "Dataset")
    assert "No model has been trained" in section(text, "Scores")
    assert "No folds.csv" in section(text, "Final OOF predictions")
    assert "No training history" in section(text, "Training curves")
    # the report stage itself recorded its time before this report was read
    assert "No timings.json" in section(text, "Time per stage")


def test_submission_without_test_labels_and_helpers(tmp_path):
    data, work = make_run(tmp_path, pseudo=False, test_labels=False, audio=False)
    text = run_stage(data, work)
    assert "No test_labels.csv in the dataset" in section(text, "Submission")
    final = reporting.final_oof(work)
    assert final.name == "logreg" and final.classes == CLASSES
    wrong = reporting.most_wrong(final, 5)
    p_given = final.probs[np.arange(len(final.y)), final.y]
    assert np.allclose(wrong["p_given"], np.sort(p_given)[:5])
    assert set(wrong.columns) >= {"fname", "given", "verified", "p_given", "top3"}
    assert all(len(t.split()) == 3 for t in wrong["top3"])
    cm = reporting.confusion_matrix(final)
    assert cm.to_numpy().sum() == len(final.y)
    assert np.array_equal(cm.to_numpy().sum(axis=1), np.bincount(final.y, minlength=3))


def test_guard_lines_say_what_the_guard_decided():
    from pipeline.reporting import guard_lines
    assert guard_lines({}) == []
    text = " ".join(guard_lines({"guard": {"calibration_rows": 120, "verified_map3": [0.9, 0.91],
                                           "accept_threshold": 1.0, "final_accept_threshold": 1.0,
                                           "relabel_threshold": 0.76}}))
    assert "120 verified rows" in text and "accept off" in text and "relabel > 0.760" in text
    fell = " ".join(guard_lines({"guard": {"fallback": "iteration 1: MAP@3 on the verified rows fell"}}))
    assert "fell back to the given labels" in fell and "iteration 1" in fell
