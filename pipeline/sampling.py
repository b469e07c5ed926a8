"""Which training clips go into which batch (the ``batch_policy`` train option).

- ``unbalanced`` (default): random clips, every clip once per pass (the
  shared trainer's own order);
- ``balanced``: one clip of every class in every batch, as in the VGGish
  fine-tune paper ("balanced: one clip of every class per batch"), so the
  batch size is the number of classes present in the training rows and
  ``batch_size`` is ignored. Within a class, clips are drawn from repeated
  random permutations, so every clip of a class is used before any repeats.
"""
from __future__ import annotations

import numpy as np

BATCH_POLICIES = ("unbalanced", "balanced")


def check_batch_policy(policy: str | None) -> str:
    """The policy name (``None`` -> ``"unbalanced"``); unknown names raise."""
    policy = policy or "unbalanced"
    if policy not in BATCH_POLICIES:
        raise ValueError(f"batch_policy must be one of {', '.join(BATCH_POLICIES)}, got {policy!r}")
    return policy


def balanced_batch_size(labels: np.ndarray) -> int:
    """Batch size of the balanced policy: the number of classes present."""
    return int(len(np.unique(np.asarray(labels, dtype=int))))


def balanced_order(labels: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices for ``steps`` balanced batches, flattened: batch ``b`` is
    ``order[b * n:(b + 1) * n]`` with ``n = balanced_batch_size(labels)`` and
    holds exactly one row of every class present (in random order)."""
    labels = np.asarray(labels, dtype=int)
    steps = int(steps)
    columns = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        reps = -(-steps // len(rows))
        columns.append(np.concatenate([rng.permutation(rows) for _ in range(reps)])[:steps])
    grid = rng.permuted(np.stack(columns, axis=1), axis=1)  # (steps, n_classes present)
    return grid.reshape(-1)
