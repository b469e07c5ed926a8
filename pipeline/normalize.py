"""Per-channel standardisation of model inputs with a feature's cached statistics.

One class for training batches, held-out/test inference, the embeddings'
extractors and the pseudo-label verifiers, so every path feeds a network
exactly what it was trained on.
"""
from __future__ import annotations

import numpy as np


class Normalizer:
    """``(x - mean) / std`` per channel (the last axis); ``None`` stats: the identity."""

    def __init__(self, stats: dict | None):
        self.mean = np.asarray(stats["mean"], dtype=np.float32) if stats else None
        self.std = np.asarray(stats["std"], dtype=np.float32) if stats else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mean is None:
            return x
        return (x - self.mean) / self.std
