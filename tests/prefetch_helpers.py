"""Producers and stores for tests/test_prefetch.py that worker processes unpickle: this module imports
no Keras (a worker imports what a pickle names; the test module would bring TensorFlow along)."""
from __future__ import annotations

import os
import time

import numpy as np

from pipeline.prefetch import ClipError


class Slow:
    """A picklable producer for worker processes: ``task`` -> an array; fails on ``bad``."""

    def __init__(self, delay: float = 0.0, bad: int | None = None):
        self.delay, self.bad = delay, bad

    def __call__(self, task):
        time.sleep(self.delay)
        if task == self.bad:
            raise ClipError(f"clip clip{task}.wav (train): unreadable", f"clip{task}.wav", "train")
        return np.full((64, 8), task, dtype=np.float32)


class FailingStore:
    """A feature store whose clip ``bad`` fails to read once ``trigger`` exists (picklable, for worker
    processes)."""

    def __init__(self, store, bad: str, trigger: str):
        self.store, self.bad, self.trigger = store, bad, trigger
        self.kind = store.kind

    def load(self, split, fname):
        if fname == self.bad and os.path.exists(self.trigger):
            raise OSError(5, "Input/output error")
        return self.store.load(split, fname)

    def length(self, split, fname):
        return self.store.length(split, fname)

    def stats(self):
        return self.store.stats()
