"""Handcrafted per-clip statistics for the LightGBM meta-learner.

The 1st-public-LB stacker added, to the out-of-fold probabilities, the max,
min, variance and skewness over time of each MFCC coefficient: cheap clip
descriptors that let the trees tell apart clips where the level-1 models
disagree.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pipeline.cache import FeatureStore

log = logging.getLogger("stacking")

STATS = ("max", "min", "var", "skew")


def mfcc_statistic_names(n_mfcc: int) -> list[str]:
    return [f"mfcc{i}_{s}" for s in STATS for i in range(n_mfcc)]


def clip_statistics(arr: np.ndarray) -> np.ndarray:
    """(T, n_mfcc) -> (4 * n_mfcc,): max, min, variance, skewness over time
    (skewness of a constant coefficient is 0)."""
    a = np.asarray(arr, dtype=np.float64)
    centred = a - a.mean(axis=0)
    m2 = (centred ** 2).mean(axis=0)
    m3 = (centred ** 3).mean(axis=0)
    # (biased) sample skewness; a (numerically) constant coefficient has none
    flat = m2 <= 1e-12 * np.maximum(1.0, np.abs(a).max(axis=0)) ** 2
    sk = np.where(flat, 0.0, m3 / np.where(flat, 1.0, m2) ** 1.5)
    return np.concatenate([a.max(axis=0), a.min(axis=0), m2, sk])


def mfcc_statistics(store: FeatureStore, split: str, fnames: Sequence[str]) -> np.ndarray:
    """(n, 4 * n_mfcc) statistics of each clip's cached MFCC (T, n_mfcc).

    A clip whose feature is missing, marked bad, empty, non-finite or of the
    wrong width gets a NaN row (LightGBM treats NaN as missing), so a few bad
    clips never stop the stage.
    """
    n_mfcc = int(store.spec.get("n_mfcc", 20))
    rows: list[np.ndarray | None] = []
    bad = 0
    for fname in fnames:
        try:
            arr = np.asarray(store.load(split, fname))
        except (FileNotFoundError, ValueError, OSError):
            arr = None
        if arr is None or arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != n_mfcc \
                or not np.isfinite(arr).all():
            rows.append(None)
            bad += 1
            continue
        rows.append(clip_statistics(arr))
    if bad:
        log.info("%s: %d of %d %s clip(s) have no usable MFCC: NaN statistics", store.name, bad, len(fnames), split)
    out = np.full((len(fnames), 4 * n_mfcc), np.nan)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return out
