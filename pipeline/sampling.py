"""Which training clips go into which batch (the ``batch_policy`` train option).

- ``unbalanced`` (default): random clips, every clip once per pass (the
  shared trainer's own order);
- ``balanced``: one clip of every class in every batch, as in the VGGish
  fine-tune paper ("balanced: one clip of every class per batch"), so the
  batch size is the number of classes present in the training rows and
  ``batch_size`` is ignored. Within a class, clips are drawn from repeated
  random permutations, so every clip of a class is used before any repeats.
- ``pairs``: ``batch_size // 2`` classes with two different clips each, what
  the triplet loss needs (every row has a positive from another clip); the
  trainer picks it for ``loss: triplet`` when the policy is null/unbalanced.
  Classes with a single clip cannot form a pair and are never drawn (they
  still count for ``balanced``). See :func:`pairs_order`.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import ConfigError

BATCH_POLICIES = ("unbalanced", "balanced", "pairs")


def check_batch_policy(policy: str | None) -> str:
    """The policy name (``None`` -> ``"unbalanced"``); unknown names raise."""
    policy = policy or "unbalanced"
    if policy not in BATCH_POLICIES:
        raise ValueError(f"batch_policy must be one of {', '.join(BATCH_POLICIES)}, got {policy!r}")
    return policy


def policy_for_loss(policy: str | None, loss: str) -> str:
    """The policy a fold trains with: :func:`check_batch_policy`'s, except that the triplet loss
    trains on ``pairs`` when the policy is null/unbalanced (a random batch may hold no two clips
    of a class, i.e. no positive) and refuses ``balanced`` (one clip per class: never a positive)."""
    policy = check_batch_policy(policy)
    if loss == "triplet":
        if policy == "balanced":
            raise ConfigError("training.batch_policy: balanced puts one clip of each class in a batch, so the "
                              "triplet loss would never see a positive; use pairs (or null, which means pairs "
                              "for the triplet loss)")
        if policy == "unbalanced":
            return "pairs"
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


def pairable_classes(labels: np.ndarray) -> np.ndarray:
    """The classes with at least two clips (rows), the only ones ``pairs`` can draw."""
    classes, counts = np.unique(np.asarray(labels, dtype=int), return_counts=True)
    return classes[counts >= 2]


def pairs_batch_size(labels: np.ndarray, batch_size: int) -> int:
    """Rows per ``pairs`` batch: two per class, ``batch_size // 2`` classes, fewer when fewer classes
    have two clips. Needs two such classes at least (a triplet needs a negative)."""
    n_pairable = len(pairable_classes(labels))
    if n_pairable < 2:
        raise ConfigError(f"training.batch_policy: pairs needs two classes with two clips or more among the "
                          f"training rows, found {n_pairable}")
    if int(batch_size) < 4:
        raise ConfigError(f"training.batch_size: the pairs policy needs batch_size >= 4 (two classes x two "
                          f"clips), got {batch_size}")
    return 2 * min(int(batch_size) // 2, n_pairable)


def pairs_order(labels: np.ndarray, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices for ``steps`` ``pairs`` batches, flattened: batch ``b`` is ``order[b * n:(b + 1) * n]``
    with ``n = pairs_batch_size(labels, batch_size)``; it holds ``n // 2`` distinct classes with two
    different rows each (in random order).

    Classes with a single row are skipped (they have no partner). The classes of a batch are the
    least drawn so far (ties broken at random), so over an epoch every pairable class is drawn
    equally often, give or take one. Within a class, rows come from repeated random permutations
    (every row is used before any repeats); a pair never repeats a row, also across a permutation's
    end. Everything is drawn from ``rng``.
    """
    labels = np.asarray(labels, dtype=int)
    n = pairs_batch_size(labels, batch_size)
    classes = pairable_classes(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    queues: list[list[int]] = [[] for _ in classes]
    drawn = np.zeros(len(classes), dtype=np.int64)

    def two_rows(k: int) -> list[int]:
        queue = queues[k]
        if not queue:
            queue.extend(rng.permutation(members[k]).tolist())
        first = queue.pop()
        if not queue:
            queue.extend(rng.permutation(members[k]).tolist())
            if queue[-1] == first:  # the next permutation starts with the same row: take another
                queue[0], queue[-1] = queue[-1], queue[0]
        return [first, queue.pop()]

    batches = []
    for _ in range(int(steps)):
        picked = np.argsort(drawn + rng.random(len(classes)), kind="stable")[: n // 2]
        drawn[picked] += 1
        rows = np.array([r for k in picked for r in two_rows(int(k))], dtype=np.int64)
        batches.append(rows[rng.permutation(len(rows))])
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
