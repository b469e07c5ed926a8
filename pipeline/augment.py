"""Batch-level augmentation and training targets (numpy, inside the batch
pipeline, so every backend sees the same data).

- label smoothing: target = (1 - eps) * one_hot + eps / K, i.e. the true
  class gets 1 - (K-1)/K * eps and every other class eps/K, with a per-row eps;
- mixup: x = lam * x_i + (1 - lam) * x_j, same for targets, lam ~ Beta(a, a);
- SpecAugment-style time and frequency masks (random erasing) for 2D inputs.
"""
from __future__ import annotations

import numpy as np


def smoothed_targets(labels: np.ndarray, n_classes: int, epsilon: np.ndarray | float) -> np.ndarray:
    labels = np.asarray(labels, dtype=int)
    eps = np.broadcast_to(np.asarray(epsilon, dtype=np.float32), labels.shape)[:, None]
    onehot = np.eye(n_classes, dtype=np.float32)[labels]
    return onehot * (1.0 - eps) + eps / n_classes


def mixup(x: np.ndarray, y: np.ndarray, alpha: float, rng: np.random.Generator,
          extra: np.ndarray | None = None):
    """Mix each row with a random partner from the same batch. ``extra``
    (e.g. a per-row verified flag) is mixed by taking the minimum, so a mix
    with an unverified row counts as unverified."""
    if not alpha or alpha <= 0 or len(x) < 2:
        return x, y, extra
    lam = rng.beta(alpha, alpha, size=len(x)).astype(np.float32)
    partner = rng.permutation(len(x))
    lx = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    x_mixed = lx * x + (1.0 - lx) * x[partner]
    y_mixed = lam[:, None] * y + (1.0 - lam[:, None]) * y[partner]
    if extra is not None:
        extra = np.minimum(extra, extra[partner])
    return x_mixed.astype(x.dtype, copy=False), y_mixed, extra


def spec_augment(x: np.ndarray, rng: np.random.Generator, time_masks: int = 2, time_width: int = 8,
                 freq_masks: int = 2, freq_width: int = 8, value: float = 0.0) -> np.ndarray:
    """Zero (``value``) random time stripes (axis 1) and frequency stripes
    (axis 2) of a batch of (B, T, F[, C]) windows, in place on a copy."""
    x = np.array(x, copy=True)
    batch, n_time, n_freq = x.shape[0], x.shape[1], x.shape[2]
    for _ in range(int(time_masks)):
        widths = rng.integers(0, time_width + 1, size=batch)
        starts = rng.integers(0, np.maximum(1, n_time - widths + 1))
        t = np.arange(n_time)[None, :]
        mask = (t >= starts[:, None]) & (t < (starts + widths)[:, None])
        x[mask] = value
    for _ in range(int(freq_masks)):
        widths = rng.integers(0, freq_width + 1, size=batch)
        starts = rng.integers(0, np.maximum(1, n_freq - widths + 1))
        f = np.arange(n_freq)[None, :]
        mask = (f >= starts[:, None]) & (f < (starts + widths)[:, None])
        x.transpose(0, 2, 1, *range(3, x.ndim))[mask] = value
    return x


def balanced_sample_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn's "balanced" class weights as per-row weights: n / (K * count)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(np.float64)
    weights = len(labels) / (n_classes * np.maximum(counts, 1))
    return weights[np.asarray(labels, dtype=int)].astype(np.float32)
