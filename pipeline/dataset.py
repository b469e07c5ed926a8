"""The FSDKaggle2018 dataset contract.

A dataset folder holds ``train.csv`` (fname,label[,manually_verified]),
``audio_train/``, ``sample_submission.csv`` (the test fnames, in order) and
``audio_test/``; optionally ``test_labels.csv`` (fname,label) for scoring.
Everything is validated on load, and every failure names the file and the
row (as a 1-based line number in the CSV, the header being line 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset folder breaks the contract; the message says where."""


@dataclass
class Dataset:
    root: Path
    train: pd.DataFrame           # fname, label, manually_verified (0/1)
    test_fnames: list[str]        # sample_submission order
    classes: list[str]            # sorted unique train labels
    test_labels: pd.DataFrame | None = None   # fname, label (optional)

    def audio_path(self, split: str, fname: str) -> Path:
        return self.root / f"audio_{split}" / fname

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def class_prior(self) -> np.ndarray:
        counts = self.train["label"].value_counts()
        prior = np.array([counts.get(c, 0) for c in self.classes], dtype=np.float64)
        return prior / prior.sum()


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: line 1: the file is empty (expected a header with {', '.join(required)})") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{path}: cannot parse CSV: {exc}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: line 1: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    # blank lines stay in the index (dropped here), so index + 2 is still the line number
    df = df[~(df == "").all(axis=1)]
    if df.empty:
        raise DatasetError(f"{path}: line 2: no data rows")
    for col in df.columns:
        df[col] = df[col].str.strip()
    return df


def _line(idx) -> int:
    return int(idx) + 2  # header is line 1


def _check_fnames(df: pd.DataFrame, path: Path, audio_dir: Path | None) -> None:
    blank = df.index[df["fname"] == ""]
    if len(blank):
        raise DatasetError(f"{path}: line {_line(blank[0])}: empty fname")
    dup = df["fname"].duplicated(keep="first")
    if dup.any():
        idx = df.index[dup][0]
        first = df.index[(df["fname"] == df.at[idx, "fname"])][0]
        raise DatasetError(f"{path}: line {_line(idx)}: duplicate fname {df.at[idx, 'fname']!r} "
                           f"(first seen on line {_line(first)})")
    if audio_dir is not None:
        if not audio_dir.is_dir():
            raise DatasetError(f"{audio_dir}: audio folder not found (listed by {path.name})")
        present = set(p.name for p in audio_dir.iterdir())
        absent = ~df["fname"].isin(present)
        if absent.any():
            idx = df.index[absent][0]
            raise DatasetError(f"{path}: line {_line(idx)}: {df.at[idx, 'fname']!r} does not exist in "
                               f"{audio_dir} ({int(absent.sum())} listed file(s) missing)")


def load_dataset(root: str | Path, check_files: bool = True) -> Dataset:
    """Load and validate a dataset folder; raise :class:`DatasetError` on any breach."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    train_csv = root / "train.csv"
    train = _read_csv(train_csv, ["fname", "label"])
    blank = train.index[train["label"] == ""]
    if len(blank):
        raise DatasetError(f"{train_csv}: line {_line(blank[0])}: empty label")
    if "manually_verified" in train.columns:
        bad = ~train["manually_verified"].isin(["0", "1"])
        if bad.any():
            idx = train.index[bad][0]
            raise DatasetError(f"{train_csv}: line {_line(idx)}: manually_verified must be 0 or 1, "
                               f"got {train.at[idx, 'manually_verified']!r}")
        train["manually_verified"] = train["manually_verified"].astype(int)
    else:
        log.info("%s has no manually_verified column: every row counts as verified", train_csv)
        train["manually_verified"] = 1
    _check_fnames(train, train_csv, root / "audio_train" if check_files else None)
    train = train[["fname", "label", "manually_verified"]].reset_index(drop=True)
    classes = sorted(train["label"].unique())
    if len(classes) < 2:
        raise DatasetError(f"{train_csv}: needs at least 2 classes, found {classes}")

    sub_csv = root / "sample_submission.csv"
    sub = _read_csv(sub_csv, ["fname"])
    _check_fnames(sub, sub_csv, root / "audio_test" if check_files else None)

    test_labels = None
    labels_csv = root / "test_labels.csv"
    if labels_csv.is_file():
        test_labels = _read_csv(labels_csv, ["fname", "label"])
        _check_fnames(test_labels, labels_csv, None)
        unknown = ~test_labels["label"].isin(classes)
        if unknown.any():
            idx = test_labels.index[unknown][0]
            raise DatasetError(f"{labels_csv}: line {_line(idx)}: label {test_labels.at[idx, 'label']!r} "
                               f"never seen in {train_csv.name}")
        test_labels = test_labels[["fname", "label"]]
    return Dataset(root=root, train=train, test_fnames=sub["fname"].tolist(), classes=classes,
                   test_labels=test_labels)


def check_labels_known(labels: pd.Series, classes: list[str], source: Path) -> None:
    """Every label in ``labels`` must be a training class."""
    unknown = ~labels.isin(classes)
    if unknown.any():
        idx = labels.index[unknown][0]
        raise DatasetError(f"{source}: line {_line(idx)}: label {labels.loc[idx]!r} never seen in training")
