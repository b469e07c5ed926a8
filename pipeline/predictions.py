"""Prediction tables keyed by ``fname`` with one probability column per class.

OOF table: ``fname, fold, <classes...>`` — every usable training clip, each
row predicted only by the fold model that did not train on it.
Test table: ``fname, <classes...>`` — every test clip in sample_submission
order; clips with unusable audio get the training class prior.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.workdir import atomic_write_csv

EPS = 1e-7


def geometric_mean(prob_list: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Normalised geometric mean of probability matrices (the papers' way of
    combining windows, folds and models)."""
    logs = np.stack([np.log(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0)) for p in prob_list])
    w = np.ones(len(prob_list)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = np.tensordot(w / w.sum(), logs, axes=1)
    return normalize_rows(np.exp(mean - mean.max(axis=-1, keepdims=True)))


def normalize_rows(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p / p.sum(axis=-1, keepdims=True)


def probs_frame(fnames: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                folds: Sequence[int] | None = None) -> pd.DataFrame:
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(classes))
    if folds is not None:
        df.insert(0, "fold", np.asarray(folds, dtype=int))
    df.insert(0, "fname", list(fnames))
    return df


def write_table(df: pd.DataFrame, path: Path) -> None:
    atomic_write_csv(df, Path(path), float_format="%.6g")


def read_table(path: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a prediction table; with ``classes``, check the columns are exactly those."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train that model first (python -m pipeline.train)")
    df = pd.read_csv(path, dtype={"fname": str})
    if classes is not None:
        cols = [c for c in df.columns if c not in ("fname", "fold")]
        if cols != list(classes):
            raise ValueError(f"{path}: class columns {cols} differ from the dataset's classes {list(classes)}")
    return df


def class_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("fname", "fold")]


def as_written(probs: np.ndarray) -> np.ndarray:
    """``probs`` as a prediction table holds them: what :func:`read_table` reads
    back after :func:`write_table` wrote them (6 significant digits, parsed by
    pandas). The pipeline's later steps read the tables, not the arrays that
    were written (the folds' test tables are combined, the stacker reads the
    models' tables), so code that must give their numbers for new clips
    (:mod:`pipeline.tagger`) passes its arrays through this at the same points."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected a (rows, classes) matrix, got shape {probs.shape}")
    text = pd.DataFrame(probs).to_csv(index=False, float_format="%.6g")
    return pd.read_csv(io.StringIO(text)).to_numpy(dtype=np.float64).reshape(probs.shape)
