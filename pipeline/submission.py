"""Kaggle submissions: ``fname,label`` with the top 3 class names, space
separated, one row per ``sample_submission.csv`` row in the same order.

Every submission is validated before it is written; a wrong one is never
written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.metrics import top_k_indices
from pipeline.workdir import atomic_write_csv


class SubmissionError(ValueError):
    """A submission that would be rejected or scored wrongly."""


def probabilities_to_submission(fnames: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    probs = np.asarray(probs)
    if probs.shape != (len(fnames), len(classes)):
        raise SubmissionError(f"probabilities have shape {probs.shape}, expected ({len(fnames)}, {len(classes)})")
    names = np.asarray(classes)[top_k_indices(probs, 3)]
    return pd.DataFrame({"fname": list(fnames), "label": [" ".join(row) for row in names]})


def validate_submission(sub: pd.DataFrame, test_fnames: Sequence[str], classes: Sequence[str]) -> None:
    """Right columns, one row per test clip in order, exactly 3 distinct known labels each."""
    if list(sub.columns) != ["fname", "label"]:
        raise SubmissionError(f"columns must be fname,label; got {','.join(map(str, sub.columns))}")
    n, m = len(sub), len(test_fnames)
    common = min(n, m)
    mismatch = np.flatnonzero(sub["fname"].to_numpy()[:common] != np.asarray(test_fnames)[:common])
    if len(mismatch):
        i = mismatch[0]
        raise SubmissionError(f"row {i + 1}: fname {sub['fname'].iloc[i]!r}, expected {test_fnames[i]!r} "
                              "(rows must follow sample_submission.csv)")
    if n < m:
        raise SubmissionError(f"row {n + 1}: missing, expected fname {test_fnames[n]!r} "
                              f"({n} rows but the test set has {m} clips)")
    if n > m:
        raise SubmissionError(f"row {m + 1}: extra row with fname {sub['fname'].iloc[m]!r} "
                              f"({n} rows but the test set has {m} clips)")
    known = set(classes)
    for i, label in enumerate(sub["label"]):
        parts = str(label).split()
        if len(parts) != 3 or len(set(parts)) != 3:
            raise SubmissionError(f"row {i + 1} ({sub['fname'].iloc[i]}): expected 3 distinct labels, got {label!r}")
        unknown = [p for p in parts if p not in known]
        if unknown:
            raise SubmissionError(f"row {i + 1} ({sub['fname'].iloc[i]}): unknown label(s) {unknown}")


def write_submission(path: Path, fnames: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    sub = probabilities_to_submission(fnames, probs, classes)
    validate_submission(sub, list(fnames), classes)
    atomic_write_csv(sub, Path(path))
    return sub
