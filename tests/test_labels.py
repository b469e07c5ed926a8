"""Training labels and per-row smoothing epsilons ("given" and "pseudo" sources)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.fingerprints import table_hash
from pipeline.labels import labels_json, training_labels
from pipeline.workdir import WorkDir, atomic_write_json

FOLDS = pd.DataFrame({
    "fname": ["a.wav", "b.wav", "c.wav", "d.wav"],
    "label": ["Bark", "Cello", "Bark", "Drum"],
    "manually_verified": [1, 0, 0, 1],
    "fold": [0, 1, 2, 0],
})
TRAINING = {"smoothing_verified": 0.05, "smoothing_unverified": 0.3}


@pytest.fixture
def work(tmp_path):
    return WorkDir(tmp_path / "work")


def test_given_labels_eps_by_status(work):
    table = training_labels({"training": TRAINING, "labels": {"source": "given"}}, work, FOLDS)
    assert list(table.columns) == ["fname", "label", "epsilon", "verified"]
    assert table["fname"].tolist() == FOLDS["fname"].tolist()
    assert table["label"].tolist() == FOLDS["label"].tolist()
    np.testing.assert_allclose(table["epsilon"], [0.05, 0.3, 0.3, 0.05])
    assert table["verified"].tolist() == [1, 0, 0, 1]


def test_given_labels_follow_the_config(work):
    cfg = {"training": {"smoothing_verified": 0.0, "smoothing_unverified": 0.2}, "labels": {"source": "given"}}
    np.testing.assert_allclose(training_labels(cfg, work, FOLDS)["epsilon"], [0.0, 0.2, 0.2, 0.0])
    # a model's own train section (train_cfg) wins over the shared training section
    table = training_labels(cfg, work, FOLDS, train_cfg={"smoothing_verified": 0.1, "smoothing_unverified": None})
    np.testing.assert_allclose(table["epsilon"], [0.1, 0.0, 0.0, 0.1])
    # defaults when the preset says nothing
    np.testing.assert_allclose(training_labels({"labels": {"source": "given"}}, work, FOLDS)["epsilon"], [0.05, 0.3, 0.3, 0.05])


def test_unknown_source(work):
    with pytest.raises(ValueError, match="labels.source"):
        training_labels({"labels": {"source": "oracle"}}, work, FOLDS)


PSEUDO = {"labels": {"source": "pseudo"}, "training": TRAINING}


def _write_labels(work, text, folds=FOLDS):
    """labels.csv as the pseudo-label stage writes it, made for ``folds``."""
    work.labels_csv.write_text(text)
    atomic_write_json({"folds": table_hash(folds)}, labels_json(work))


def test_pseudo_labels_read_from_labels_csv(work):
    # rows in another order than folds.csv, one relabelled, one unresolved
    _write_labels(work, "fname,label,status,epsilon\n"
                        "d.wav,Drum,accepted,0.05\n"
                        "b.wav,Bark,relabelled,0.1\n"
                        "a.wav,Bark,accepted,0.05\n"
                        "c.wav,Bark,unresolved,0.4\n")
    table = training_labels(PSEUDO, work, FOLDS)
    assert table["fname"].tolist() == FOLDS["fname"].tolist()
    assert table["label"].tolist() == ["Bark", "Bark", "Bark", "Drum"]
    np.testing.assert_allclose(table["epsilon"], [0.05, 0.1, 0.4, 0.05])
    assert table["verified"].tolist() == [1, 1, 0, 1]


def test_pseudo_labels_missing_file(work):
    with pytest.raises(FileNotFoundError) as info:
        training_labels(PSEUDO, work, FOLDS)
    assert str(work.labels_csv) in str(info.value) and "pseudo_label" in str(info.value)


def test_pseudo_labels_missing_rows(work):
    _write_labels(work, "fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nd.wav,Drum,accepted,0.05\n")
    with pytest.raises(ValueError) as info:
        training_labels(PSEUDO, work, FOLDS)
    msg = str(info.value)
    assert str(work.labels_csv) in msg and "2 clip(s)" in msg and "b.wav" in msg


@pytest.mark.parametrize("text", [
    # no epsilon column
    "fname,label,status\na.wav,Bark,accepted\nb.wav,Cello,accepted\nc.wav,Bark,accepted\nd.wav,Drum,accepted\n",
    # blank epsilon on one row (silently becomes NaN today)
    "fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nb.wav,Cello,accepted,\n"
    "c.wav,Bark,accepted,0.3\nd.wav,Drum,accepted,0.05\n",
    # blank label on one row (silently becomes NaN today)
    "fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nb.wav,,accepted,0.3\n"
    "c.wav,Bark,accepted,0.3\nd.wav,Drum,accepted,0.05\n",
    # a duplicated fname
    "fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nb.wav,Cello,accepted,0.3\nb.wav,Cello,accepted,0.3\n"
    "c.wav,Bark,accepted,0.3\nd.wav,Drum,accepted,0.05\n",
], ids=["no-epsilon-column", "blank-epsilon", "blank-label", "duplicate-fname"])
def test_pseudo_labels_incomplete_fail_clearly(work, text):
    _write_labels(work, text)
    with pytest.raises(ValueError) as info:
        training_labels(PSEUDO, work, FOLDS)
    assert str(work.labels_csv) in str(info.value)


def test_table_hash_tracks_content(work):
    t = training_labels({"labels": {"source": "given"}}, work, FOLDS)
    assert table_hash(t) == table_hash(t.copy())
    t2 = t.copy()
    t2.loc[1, "epsilon"] = 0.2
    assert table_hash(t2) != table_hash(t)


def test_pseudo_labels_made_for_other_folds_are_refused(work):
    """Issue 9: labels.csv made before train.csv changed must not train the final models."""
    text = ("fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nb.wav,Cello,accepted,0.3\n"
            "c.wav,Bark,accepted,0.3\nd.wav,Drum,accepted,0.05\n")
    old = FOLDS.assign(label=["Bark", "Cello", "Drum", "Drum"])  # c.wav relabelled in train.csv since
    _write_labels(work, text, folds=old)
    with pytest.raises(FileNotFoundError, match="pipeline.pseudo_label"):
        training_labels(PSEUDO, work, FOLDS)


def test_pseudo_labels_with_extra_rows_are_refused(work):
    text = ("fname,label,status,epsilon\na.wav,Bark,accepted,0.05\nb.wav,Cello,accepted,0.3\n"
            "c.wav,Bark,accepted,0.3\nd.wav,Drum,accepted,0.05\ne.wav,Drum,accepted,0.05\n")
    _write_labels(work, text)
    with pytest.raises(ValueError, match="1 clip"):
        training_labels(PSEUDO, work, FOLDS)
