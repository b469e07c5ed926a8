"""Handcrafted per-clip statistics for the LightGBM meta-learner.

The 1st-public-LB stacker added, to the out-of-fold probabilities, the max,
min, variance and skewness over time of each MFCC coefficient: cheap clip
descriptors that let the trees tell apart clips where the level-1 models
disagree.

The statistics themselves are computed by :mod:`pipeline.handcrafted` (the
repository's one implementation, shared with the ``stats_lgbm`` /
``stats_lr`` level-1 models); this module picks the stacker's four.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.cache import FeatureStore
from pipeline.handcrafted import clip_statistics_matrix, time_statistics

STATS = ("max", "min", "var", "skew")


def mfcc_statistic_names(n_mfcc: int) -> list[str]:
    return [f"mfcc{i}_{s}" for s in STATS for i in range(n_mfcc)]


def clip_statistics(arr: np.ndarray) -> np.ndarray:
    """(T, n_mfcc) -> (4 * n_mfcc,): max, min, variance, skewness over time
    (population moments; skewness of a constant coefficient is 0)."""
    return time_statistics(arr, STATS)


def mfcc_statistics(store: FeatureStore, split: str, fnames: Sequence[str]) -> np.ndarray:
    """(n, 4 * n_mfcc) statistics of each clip's cached MFCC (T, n_mfcc),
    layout :func:`mfcc_statistic_names`.

    A clip whose feature is missing, marked bad, empty, non-finite or of the
    wrong width gets a NaN row (LightGBM treats NaN as missing), so a few bad
    clips never stop the stage.
    """
    return clip_statistics_matrix({store.name: store}, split, fnames, stats=STATS, mfcc_deltas=False,
                                  length=False)
