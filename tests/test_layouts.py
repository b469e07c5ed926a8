"""The two dataset layouts (kaggle, zenodo), detected by ``load_dataset``.

Every failure names the file and, where there is one, the 1-based CSV line
(header = line 1)."""
from __future__ import annotations

import codecs
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import ZENODO_AUDIO, make_tiny_dataset, make_zenodo_layout
from pipeline.dataset import DatasetError, load_dataset

LOGGER = "pipeline.dataset"


@pytest.fixture
def zen(tmp_path):
    return make_zenodo_layout(tmp_path / "FSDKaggle2018", n_classes=3, clips_per_class=4, n_test=4, n_padding=2)


@pytest.fixture
def kag(tmp_path):
    return make_tiny_dataset(tmp_path / "data", n_classes=3, clips_per_class=4, n_test=3, hard_cases=False)


def _error(root, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(root, **kw)
    return str(info.value)


def _assert_names(msg: str, path: Path, line: int | None = None) -> None:
    assert str(path) in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), msg


def _layout_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO
            and "layout" in r.getMessage()]


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# -- detection ---------------------------------------------------------------

def test_kaggle_detected_and_logged(kag, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        d = load_dataset(kag.root)
    assert d.layout == "kaggle"
    assert any("kaggle layout" in m for m in _layout_logged(caplog)), caplog.text
    assert d.train_audio_dir == kag.root / "audio_train"
    assert d.test_audio_dir == kag.root / "audio_test"
    assert d.audio_path("train", kag.train_fnames[0]) == kag.root / "audio_train" / kag.train_fnames[0]
    assert d.audio_path("test", kag.test_fnames[0]) == kag.root / "audio_test" / kag.test_fnames[0]
    assert d.test_usage is None


def test_zenodo_detected_and_logged(zen, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        d = load_dataset(zen.root)
    assert d.layout == "zenodo"
    assert any("zenodo layout" in m for m in _layout_logged(caplog)), caplog.text
    assert d.classes == zen.classes
    assert d.train["fname"].tolist() == zen.train_fnames
    assert d.train["label"].tolist() == [r["label"] for r in zen.train]
    assert d.train["manually_verified"].tolist() == [r["manually_verified"] for r in zen.train]
    assert d.train["manually_verified"].dtype.kind == "i"
    assert list(d.train.columns) == ["fname", "label", "manually_verified"]
    # the test set is the scoring clips, in file order; the unscored padding clips are not in it
    assert d.test_fnames == zen.test_fnames
    assert not set(zen.padding) & set(d.test_fnames)
    np.testing.assert_allclose(d.class_prior(), [1 / 3] * 3)


def test_zenodo_audio_path(zen):
    d = load_dataset(zen.root)
    assert d.train_audio_dir == zen.root / ZENODO_AUDIO["train"]
    assert d.test_audio_dir == zen.root / ZENODO_AUDIO["test"]
    for split, fnames in (("train", zen.train_fnames), ("test", zen.test_fnames)):
        for f in fnames:
            assert d.audio_path(split, f) == zen.path(split, f)
            assert d.audio_path(split, f).is_file()


def test_zenodo_test_labels_and_usage(zen):
    d = load_dataset(zen.root)
    assert d.test_labels is not None
    assert d.test_labels["fname"].tolist() == zen.test_fnames
    assert dict(zip(d.test_labels["fname"], d.test_labels["label"])) == zen.test_labels
    assert d.n_test_labelled == len(zen.test_fnames)
    idx = d.test_label_indices()
    assert idx.shape == (len(zen.test_fnames),)
    assert idx.tolist() == [d.class_index[zen.test_labels[f]] for f in zen.test_fnames]
    assert d.test_usage is not None
    assert d.test_usage.to_dict() == zen.usage
    assert set(d.test_usage) == {"Public", "Private"}
    assert d.test_csv == zen.test_csv and d.test_labels_csv == zen.test_csv and d.train_csv == zen.train_csv


def test_zenodo_with_bom_and_crlf(zen):
    for path in (zen.train_csv, zen.test_csv):
        path.write_bytes(codecs.BOM_UTF8 + path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    d = load_dataset(zen.root)
    assert d.train["fname"].tolist() == zen.train_fnames
    assert d.test_fnames == zen.test_fnames


def test_zenodo_check_files_false_needs_no_audio(zen):
    for folder in ZENODO_AUDIO.values():
        shutil.rmtree(zen.root / folder)
    d = load_dataset(zen.root, check_files=False)
    assert d.layout == "zenodo" and d.test_fnames == zen.test_fnames


def test_nothing_written_into_the_dataset(zen, kag):
    for root in (zen.root, kag.root):
        before = _snapshot(root)
        load_dataset(root)
        load_dataset(root, check_files=False)
        assert _snapshot(root) == before


def test_both_layouts_prefer_kaggle(tmp_path, caplog):
    root = tmp_path / "both"
    zen = make_zenodo_layout(root, n_test=4)
    kag = make_tiny_dataset(root, n_classes=3, clips_per_class=4, n_test=3, hard_cases=False, seed=5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        d = load_dataset(root)
    assert d.layout == "kaggle"
    assert d.test_fnames == kag.test_fnames != zen.test_fnames
    assert any("both" in m and "kaggle" in m for m in _layout_logged(caplog)), caplog.text


def test_neither_layout(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "notes.txt").write_text("not a dataset")
    msg = _error(root)
    assert str(root) in msg
    for looked_for in ("train.csv", "sample_submission.csv", "audio_train", "audio_test",
                       "FSDKaggle2018.meta/train_post_competition.csv",
                       "FSDKaggle2018.meta/test_post_competition_scoring_clips.csv",
                       "FSDKaggle2018.audio_train", "FSDKaggle2018.audio_test"):
        assert looked_for in msg, msg
    assert "kaggle" in msg and "zenodo" in msg


def test_neither_layout_points_at_the_right_folder(zen):
    msg = _error(zen.root.parent)              # one level too high
    assert str(zen.root) in msg and "point at it" in msg, msg
    msg = _error(zen.root / "FSDKaggle2018.meta")   # one level too deep
    assert f"point at its parent {zen.root}" in msg, msg


def test_zenodo_missing_scoring_csv(zen):
    zen.test_csv.unlink()
    _assert_names(_error(zen.root), zen.test_csv)


def test_zenodo_missing_train_audio_folder(zen):
    shutil.rmtree(zen.audio_dir("train"))
    msg = _error(zen.root)
    assert str(zen.audio_dir("train")) in msg and "not found" in msg, msg


# -- zenodo validation, naming file and line ----------------------------------

def test_zenodo_listed_test_file_missing(zen):
    gone = zen.test_fnames[2]                          # line 4
    zen.path("test", gone).unlink()
    msg = _error(zen.root)
    _assert_names(msg, zen.test_csv, line=4)
    assert gone in msg and "FSDKaggle2018.audio_test" in msg


def _set_cell(path: Path, line: int, column: int, value: str) -> None:
    """Put ``value`` in one cell of a CSV (``line`` 1-based, the header being line 1)."""
    def edit(lines):
        parts = lines[line - 1].split(",")
        parts[column] = value
        lines[line - 1] = ",".join(parts)
    _rewrite(path, edit)


@pytest.mark.parametrize("line, column, value, expect", [
    (3, 2, "Hidden", ["usage", "Hidden"]),                                   # bad usage
    (4, 1, "Didgeridoo", ["Didgeridoo", "train_post_competition.csv"]),      # label never seen in training
    (2, 1, "Acoustic guitar", ["whitespace", "Acoustic_guitar"]),            # label with a space
], ids=["bad-usage", "label-never-seen-in-training", "label-with-space"])
def test_zenodo_test_csv_bad_cell(zen, line, column, value, expect):
    _set_cell(zen.test_csv, line, column, value)
    msg = _error(zen.root)
    _assert_names(msg, zen.test_csv, line=line)
    assert all(e in msg for e in expect), msg


def test_zenodo_train_latin1(zen):
    raw = zen.train_csv.read_bytes().split(b"\n")
    parts = raw[4].split(b",")                         # line 5
    parts[1] = "Caf\u00e9".encode("latin-1")
    raw[4] = b",".join(parts)
    zen.train_csv.write_bytes(b"\n".join(raw))
    msg = _error(zen.root)
    _assert_names(msg, zen.train_csv, line=5)
    assert "UTF-8" in msg


def test_zenodo_case_only_mismatch(zen):
    fname = zen.test_fnames[0]                         # line 2
    upper = fname.upper()
    zen.path("test", fname).rename(zen.path("test", upper))
    msg = _error(zen.root)
    _assert_names(msg, zen.test_csv, line=2)
    assert "case" in msg and upper in msg
