"""The dataset contract: every failure names the file and the 1-based CSV
line (header = line 1)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tiny_dataset
from pipeline.dataset import DatasetError, load_dataset


@pytest.fixture
def ds(tmp_path):
    return make_tiny_dataset(tmp_path / "data", n_classes=3, clips_per_class=4, n_test=3, hard_cases=False)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _error(root) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    return str(info.value)


def _assert_names(msg: str, path: Path, line: int | None = None) -> None:
    assert str(path) in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), msg


# -- valid folders -----------------------------------------------------------

def test_valid_folder(ds):
    d = load_dataset(ds.root)
    assert d.classes == ds.classes == sorted(ds.classes)
    assert d.train["fname"].tolist() == ds.train_fnames
    assert d.train["label"].tolist() == [r["label"] for r in ds.train]
    assert d.train["manually_verified"].tolist() == [r["manually_verified"] for r in ds.train]
    assert d.train["manually_verified"].dtype.kind == "i"
    assert d.test_fnames == ds.test_fnames
    assert d.test_labels is not None
    assert dict(zip(d.test_labels["fname"], d.test_labels["label"])) == ds.test_labels
    assert d.audio_path("train", ds.train_fnames[0]) == ds.root / "audio_train" / ds.train_fnames[0]
    assert d.class_index == {c: i for i, c in enumerate(ds.classes)}
    np.testing.assert_allclose(d.class_prior(), [1 / 3] * 3)


def test_manually_verified_absent_means_all_verified(ds):
    path = ds.root / "train.csv"
    _write_lines(path, ["fname,label"] + [f"{r['fname']},{r['label']}" for r in ds.train])
    d = load_dataset(ds.root)
    assert d.train["manually_verified"].tolist() == [1] * len(ds.train)
    assert list(d.train.columns) == ["fname", "label", "manually_verified"]


def test_test_labels_optional(ds):
    (ds.root / "test_labels.csv").unlink()
    assert load_dataset(ds.root).test_labels is None


def test_check_files_false_skips_audio(ds):
    (ds.root / "audio_train" / ds.train_fnames[0]).unlink()
    assert len(load_dataset(ds.root, check_files=False).train) == len(ds.train)


# -- failures, each naming the file and the line -----------------------------

def test_missing_column_names_file(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    _write_lines(path, ["fname,manually_verified"] + [",".join(np.array(l.split(","))[[0, 2]]) for l in lines[1:]])
    msg = _error(ds.root)
    _assert_names(msg, path)
    assert "label" in msg


def test_missing_column_names_line(ds):
    path = ds.root / "sample_submission.csv"
    _write_lines(path, ["name,label"] + _lines(path)[1:])
    _assert_names(_error(ds.root), path, line=1)


def test_empty_csv_zero_bytes_names_file(ds):
    path = ds.root / "train.csv"
    path.write_bytes(b"")
    msg = _error(ds.root)
    _assert_names(msg, path)
    assert "empty" in msg


def test_empty_csv_zero_bytes_names_line(ds):
    path = ds.root / "train.csv"
    path.write_bytes(b"")
    _assert_names(_error(ds.root), path, line=1)


def test_header_only_csv_names_file(ds):
    path = ds.root / "sample_submission.csv"
    _write_lines(path, ["fname,label"])
    msg = _error(ds.root)
    _assert_names(msg, path)
    assert "no data rows" in msg


def test_header_only_csv_names_line(ds):
    path = ds.root / "train.csv"
    _write_lines(path, ["fname,label,manually_verified"])
    _assert_names(_error(ds.root), path, line=2)


def test_duplicate_fname(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    dup = lines[2].split(",")[0]                      # the fname on line 3
    lines[5] = ",".join([dup] + lines[5].split(",")[1:])   # repeated on line 6
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=6)
    assert dup in msg and "line 3" in msg and "duplicate" in msg


def test_duplicate_fname_in_sample_submission(ds):
    path = ds.root / "sample_submission.csv"
    lines = _lines(path)
    lines.append(lines[1])
    _write_lines(path, lines)
    _assert_names(_error(ds.root), path, line=len(lines))


def test_listed_train_file_missing(ds):
    gone = ds.train_fnames[4]                          # line 6
    (ds.root / "audio_train" / gone).unlink()
    msg = _error(ds.root)
    _assert_names(msg, ds.root / "train.csv", line=6)
    assert gone in msg and "audio_train" in msg


def test_listed_test_file_missing(ds):
    gone = ds.test_fnames[1]                           # line 3
    (ds.root / "audio_test" / gone).unlink()
    msg = _error(ds.root)
    _assert_names(msg, ds.root / "sample_submission.csv", line=3)
    assert gone in msg and "audio_test" in msg


def test_test_label_never_seen_in_training(ds):
    path = ds.root / "test_labels.csv"
    lines = _lines(path)
    lines[3] = lines[3].split(",")[0] + ",Didgeridoo"  # line 4
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=4)
    assert "Didgeridoo" in msg


@pytest.mark.parametrize("value", ["yes", "2", "", "-1", "1.0"])
def test_bad_manually_verified(ds, value):
    path = ds.root / "train.csv"
    lines = _lines(path)
    parts = lines[3].split(",")                        # line 4
    lines[3] = ",".join(parts[:2] + [value])
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=4)
    assert "manually_verified" in msg


def test_empty_label(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    parts = lines[6].split(",")                        # line 7
    lines[6] = ",".join([parts[0], "", parts[2]])
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=7)
    assert "empty label" in msg


def test_single_class_rejected(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    _write_lines(path, [lines[0]] + [",".join([l.split(",")[0], "noise", l.split(",")[2]]) for l in lines[1:]])
    path_tl = ds.root / "test_labels.csv"
    path_tl.unlink()
    _assert_names(_error(ds.root), path)


def test_missing_folder_and_train_csv(ds, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    (ds.root / "train.csv").unlink()
    _assert_names(_error(ds.root), ds.root / "train.csv")


def test_line_numbers_survive_blank_lines(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    parts = lines[3].split(",")
    lines[3] = ",".join([parts[0], "", parts[2]])     # empty label on line 4 ...
    lines.insert(2, "")                                # ... which a blank line 3 pushes to line 5
    _write_lines(path, lines)
    _assert_names(_error(ds.root), path, line=5)


# -- layout fields, partial ground truth -------------------------------------

def test_layout_fields_and_audio_dirs(ds):
    d = load_dataset(ds.root)
    assert d.layout == "kaggle"
    assert d.train_audio_dir == ds.root / "audio_train" and d.test_audio_dir == ds.root / "audio_test"
    assert d.audio_path("test", ds.test_fnames[0]) == ds.root / "audio_test" / ds.test_fnames[0]
    assert d.train_csv == ds.root / "train.csv" and d.test_csv == ds.root / "sample_submission.csv"
    assert d.test_labels_csv == ds.root / "test_labels.csv"
    with pytest.raises(ValueError, match="train.*test"):
        d.audio_path("valid", ds.test_fnames[0])


def test_full_test_labels_indices(ds):
    d = load_dataset(ds.root)
    assert d.n_test_labelled == len(ds.test_fnames)
    idx = d.test_label_indices()
    assert idx.dtype.kind == "i"
    assert idx.tolist() == [d.class_index[ds.test_labels[f]] for f in ds.test_fnames]


def test_partial_test_labels(ds):
    path = ds.root / "test_labels.csv"
    lines = _lines(path)
    # keep the labels of test clips 2 and 0 only, in another order than the test set
    _write_lines(path, [lines[0], lines[3], lines[1]])
    d = load_dataset(ds.root)
    assert len(d.test_labels) == 2
    assert d.n_test_labelled == 2
    idx = d.test_label_indices()
    assert idx.shape == (len(ds.test_fnames),)
    cidx = d.class_index
    assert idx.tolist() == [cidx[ds.test_labels[ds.test_fnames[0]]], -1, cidx[ds.test_labels[ds.test_fnames[2]]]]


def test_no_test_labels_indices_none(ds):
    (ds.root / "test_labels.csv").unlink()
    d = load_dataset(ds.root)
    assert d.test_label_indices() is None
    assert d.n_test_labelled == 0
    assert d.test_labels_csv is None


def test_test_labels_usage_column_optional(ds):
    path = ds.root / "test_labels.csv"
    lines = _lines(path)
    _write_lines(path, [lines[0] + ",usage"] + [l + (",Public" if i % 2 else ",Private") for i, l in enumerate(lines[1:])])
    d = load_dataset(ds.root)
    assert d.test_usage.to_dict() == {f: ("Public" if i % 2 else "Private") for i, f in enumerate(ds.test_fnames)}


def test_labelled_fname_not_in_test_set(ds):
    path = ds.root / "test_labels.csv"
    lines = _lines(path)
    lines[2] = "stranger.wav," + lines[2].split(",")[1]   # line 3
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=3)
    assert "stranger.wav" in msg and "sample_submission.csv" in msg and "not a test clip" in msg


# -- labels a submission cannot carry ----------------------------------------

def test_train_label_with_space(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    parts = lines[4].split(",")                        # line 5
    lines[4] = ",".join([parts[0], "Acoustic guitar", parts[2]])
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=5)
    assert "whitespace" in msg and "'Acoustic guitar'" in msg and "Acoustic_guitar" in msg


def test_test_label_with_space(ds):
    path = ds.root / "test_labels.csv"
    lines = _lines(path)
    lines[2] = lines[2].split(",")[0] + ",Acoustic\tguitar"   # line 3, a tab
    _write_lines(path, lines)
    msg = _error(ds.root)
    _assert_names(msg, path, line=3)
    assert "whitespace" in msg


def test_two_classes_rejected(ds):
    path = ds.root / "train.csv"
    lines = _lines(path)
    keep = [l for l in lines[1:] if l.split(",")[1] != ds.classes[2]]
    _write_lines(path, [lines[0]] + keep)
    (ds.root / "test_labels.csv").unlink()
    msg = _error(ds.root)
    _assert_names(msg, path)
    assert "at least 3 classes" in msg and "found 2" in msg


# -- encodings ---------------------------------------------------------------

@pytest.mark.parametrize("name,line", [("train.csv", 4), ("test_labels.csv", 3), ("sample_submission.csv", 2)])
def test_latin1_csv(ds, name, line):
    path = ds.root / name
    raw = path.read_bytes().split(b"\n")
    raw[line - 1] = raw[line - 1] + "\u00e9t\u00e9".encode("latin-1")
    path.write_bytes(b"\n".join(raw))
    msg = _error(ds.root)
    _assert_names(msg, path, line=line)
    assert "UTF-8" in msg and "re-save" in msg


def test_bom_kept_working_and_line_numbers_count_from_it(ds):
    path = ds.root / "train.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    d = load_dataset(ds.root)
    assert list(d.train.columns) == ["fname", "label", "manually_verified"]
    assert d.train["fname"].tolist() == ds.train_fnames
    raw = path.read_bytes().split(b"\n")
    raw[2] += b"\xff"                                  # line 3
    path.write_bytes(b"\n".join(raw))
    _assert_names(_error(ds.root), path, line=3)


# -- letter case -------------------------------------------------------------

def test_case_only_mismatch(ds):
    fname = ds.train_fnames[2]                         # line 4
    on_disk = fname.upper()
    (ds.root / "audio_train" / fname).rename(ds.root / "audio_train" / on_disk)
    msg = _error(ds.root)
    _assert_names(msg, ds.root / "train.csv", line=4)
    assert "case" in msg and repr(on_disk) in msg and repr(fname) in msg


def test_audio_folder_case_mismatch(ds):
    (ds.root / "audio_test").rename(ds.root / "Audio_Test")
    msg = _error(ds.root)
    assert str(ds.root / "audio_test") in msg and "Audio_Test" in msg and "case" in msg
