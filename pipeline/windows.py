"""Cutting model inputs out of whole clips.

Training draws one random-offset window per clip and epoch; inference
slides windows over the whole clip. Clips shorter than a window are
repeated (never zero-padded), as in the papers.
"""
from __future__ import annotations

import numpy as np

from pipeline.audio import repeat_to_length


def random_window(arr: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    n = arr.shape[0]
    if n <= window:
        return repeat_to_length(np.asarray(arr), window)
    start = int(rng.integers(0, n - window + 1))
    return np.asarray(arr[start:start + window])


def window_starts(length: int, window: int, hop: int) -> np.ndarray:
    """Start offsets covering the whole clip; the last window is aligned to
    the clip's end so no tail is left unseen."""
    if length <= window:
        return np.zeros(1, dtype=int)
    starts = np.arange(0, length - window + 1, max(1, hop))
    if starts[-1] != length - window:
        starts = np.append(starts, length - window)
    return starts


def sliding_windows(arr: np.ndarray, window: int, hop: int) -> np.ndarray:
    """(n_windows, window, ...) covering the clip."""
    arr = np.asarray(arr)
    if arr.shape[0] <= window:
        return repeat_to_length(arr, window)[None]
    starts = window_starts(arr.shape[0], window, hop)
    idx = starts[:, None] + np.arange(window)[None, :]
    return arr[idx]
