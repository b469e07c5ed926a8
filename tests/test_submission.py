"""Submissions (top-3 names, validated before writing) and prediction tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.predictions import (class_columns, geometric_mean, normalize_rows, probs_frame, read_table,
                                  write_table)
from pipeline.submission import (SubmissionError, probabilities_to_submission, validate_submission,
                                 write_submission)

CLASSES = ["Bark", "Cello", "Drum", "Flute"]
FNAMES = ["t1.wav", "t2.wav", "t3.wav"]
PROBS = np.array([
    [0.1, 0.2, 0.3, 0.4],
    [0.7, 0.1, 0.15, 0.05],
    [0.25, 0.25, 0.25, 0.25],     # ties: lower class index first
])


def _good():
    return pd.DataFrame({"fname": FNAMES, "label": ["Flute Drum Cello", "Bark Drum Cello", "Bark Cello Drum"]})


def test_probabilities_to_submission_top3_best_first():
    sub = probabilities_to_submission(FNAMES, PROBS, CLASSES)
    pd.testing.assert_frame_equal(sub, _good())


def test_probabilities_shape_checked():
    with pytest.raises(SubmissionError, match="shape"):
        probabilities_to_submission(FNAMES, PROBS[:, :3], CLASSES)


def test_validate_accepts_good():
    validate_submission(_good(), FNAMES, CLASSES)


def _reject(sub, match, row=None):
    with pytest.raises(SubmissionError) as info:
        validate_submission(sub, FNAMES, CLASSES)
    msg = str(info.value)
    assert match in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    return msg


def test_rejects_wrong_columns():
    _reject(_good().rename(columns={"label": "labels"}), "fname,label")
    _reject(_good()[["label", "fname"]], "fname,label")
    _reject(_good().assign(extra=1), "fname,label")


def test_rejects_missing_and_extra_rows_by_count():
    _reject(_good().iloc[:2], "2 rows")
    extra = pd.concat([_good(), pd.DataFrame({"fname": ["t4.wav"], "label": ["Bark Cello Drum"]})])
    _reject(extra.reset_index(drop=True), "4 rows")


def test_missing_and_extra_rows_name_the_row():
    msg = _reject(_good().drop(index=1).reset_index(drop=True), "rows")
    assert "t2.wav" in msg or "row 2" in msg, msg
    extra = pd.concat([_good(), pd.DataFrame({"fname": ["t4.wav"], "label": ["Bark Cello Drum"]})])
    msg = _reject(extra.reset_index(drop=True), "rows")
    assert "t4.wav" in msg or "row 4" in msg, msg


def test_rejects_wrong_order():
    msg = _reject(_good().iloc[[0, 2, 1]].reset_index(drop=True), "expected", row=2)
    assert "t3.wav" in msg and "t2.wav" in msg


def test_rejects_fewer_than_three_labels():
    sub = _good()
    sub.loc[2, "label"] = "Bark Cello"
    msg = _reject(sub, "3 distinct labels", row=3)
    assert "t3.wav" in msg


def test_rejects_empty_label():
    sub = _good()
    sub.loc[0, "label"] = ""
    _reject(sub, "3 distinct labels", row=1)


def test_rejects_duplicate_labels():
    sub = _good()
    sub.loc[1, "label"] = "Bark Bark Cello"
    _reject(sub, "distinct", row=2)


def test_rejects_more_than_three_labels():
    sub = _good()
    sub.loc[0, "label"] = "Bark Cello Drum Flute"
    _reject(sub, "3 distinct labels", row=1)


def test_rejects_unknown_labels():
    sub = _good()
    sub.loc[2, "label"] = "Bark Cello Kazoo"
    msg = _reject(sub, "unknown", row=3)
    assert "Kazoo" in msg


def test_write_submission_writes_valid_file(tmp_path):
    path = tmp_path / "out" / "submission.csv"
    sub = write_submission(path, FNAMES, PROBS, CLASSES)
    on_disk = pd.read_csv(path)
    pd.testing.assert_frame_equal(on_disk, sub)
    validate_submission(on_disk, FNAMES, CLASSES)
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_write_submission_never_writes_invalid(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError):
        write_submission(path, FNAMES, PROBS[:, :2], CLASSES[:2])      # only 2 labels per row possible
    with pytest.raises(SubmissionError):
        write_submission(path, FNAMES, PROBS[:2], CLASSES)              # wrong shape
    with pytest.raises(SubmissionError):
        write_submission(path, FNAMES, PROBS, ["Bark", "Bark", "Drum", "Flute"])   # duplicate names
    assert list(tmp_path.iterdir()) == []


def test_write_submission_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, FNAMES, PROBS, CLASSES)
    before = path.read_bytes()
    with pytest.raises(SubmissionError):
        write_submission(path, FNAMES, PROBS[:, :2], CLASSES[:2])
    assert path.read_bytes() == before


# -- prediction tables -----------------------------------------------------------------

def test_geometric_mean_hand_computed():
    a = np.array([[0.5, 0.5], [0.9, 0.1]])
    b = np.array([[0.8, 0.2], [0.1, 0.9]])
    g = geometric_mean([a, b])
    r0 = np.sqrt([0.4, 0.1])
    np.testing.assert_allclose(g[0], r0 / r0.sum())
    np.testing.assert_allclose(g[1], [0.5, 0.5])
    w = geometric_mean([a, b], weights=[3, 1])
    r = np.array([0.5 ** 0.75 * 0.8 ** 0.25, 0.5 ** 0.75 * 0.2 ** 0.25])
    np.testing.assert_allclose(w[0], r / r.sum())
    np.testing.assert_allclose(normalize_rows(np.array([[1.0, 3.0]])), [[0.25, 0.75]])
    # zeros are clipped, not -inf
    assert np.all(np.isfinite(geometric_mean([np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])])))


def test_table_round_trip(tmp_path):
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    df = probs_frame(["a.wav", "b.wav"], probs, ["x", "y", "z"], folds=[1, 0])
    assert list(df.columns) == ["fname", "fold", "x", "y", "z"]
    write_table(df, tmp_path / "oof.csv")
    back = read_table(tmp_path / "oof.csv", ["x", "y", "z"])
    assert class_columns(back) == ["x", "y", "z"]
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy(), probs)
    with pytest.raises(ValueError, match="class columns"):
        read_table(tmp_path / "oof.csv", ["x", "z", "y"])
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.csv")
