"""Batch policies (pipeline.sampling): the pairs policy the triplet loss trains on, and which policy a
loss gets. (The balanced policy's own tests live in tests/test_embeddings.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.sampling import pairable_classes, pairs_batch_size, pairs_order, policy_for_loss

# class 3 has a single clip (never paired), class 4 none; class 1 has exactly two, class 2 an odd count
LABELS = np.array([0] * 7 + [1] * 2 + [2] * 5 + [3] * 1 + [5] * 4)


def _batches(labels, steps, batch_size, seed=0):
    n = pairs_batch_size(labels, batch_size)
    order = pairs_order(labels, steps, batch_size, np.random.default_rng(seed))
    assert len(order) == steps * n
    return order.reshape(steps, n)


@pytest.mark.parametrize("batch_size", [4, 6, 8, 9, 32])
def test_pairs_batches_hold_two_different_clips_of_each_class(batch_size):
    labels = LABELS
    n_classes = min(batch_size // 2, len(pairable_classes(labels)))
    for batch in _batches(labels, 40, batch_size):
        assert len(set(batch.tolist())) == len(batch), "a clip twice in one batch"
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == n_classes and (counts == 2).all()
        assert 3 not in classes  # one clip only: never drawn


def test_pairs_draw_every_class_and_clip_about_equally():
    steps = 60
    batches = _batches(LABELS, steps, 6)  # 3 of the 4 pairable classes per batch
    per_class = np.bincount(LABELS[batches.ravel()], minlength=6)[[0, 1, 2, 5]] // 2
    assert per_class.sum() == steps * 3 and per_class.max() - per_class.min() <= 1
    uses = np.bincount(batches.ravel(), minlength=len(LABELS))
    for c in (0, 1, 2, 5):
        u = uses[LABELS == c]
        assert u.max() - u.min() <= 1, f"class {c}: clips used {u}"


def test_pairs_order_is_seeded():
    a = pairs_order(LABELS, 10, 8, np.random.default_rng([3, 1]))
    b = pairs_order(LABELS, 10, 8, np.random.default_rng([3, 1]))
    c = pairs_order(LABELS, 10, 8, np.random.default_rng([3, 2]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pairs_needs_two_pairable_classes_and_room_for_them():
    with pytest.raises(ConfigError, match="two classes with two clips"):
        pairs_batch_size(np.array([0, 0, 0, 1, 2]), 8)
    with pytest.raises(ConfigError, match="batch_size >= 4"):
        pairs_batch_size(LABELS, 3)
    assert pairs_batch_size(LABELS, 5) == 4 and pairs_batch_size(LABELS, 100) == 8


def test_triplet_loss_trains_on_pairs_and_refuses_balanced():
    assert policy_for_loss(None, "triplet") == "pairs"
    assert policy_for_loss("unbalanced", "triplet") == "pairs"
    assert policy_for_loss("pairs", "triplet") == "pairs"
    assert policy_for_loss(None, "focal") == "unbalanced"
    assert policy_for_loss("balanced", "crossentropy") == "balanced"
    assert policy_for_loss("pairs", "crossentropy") == "pairs"
    with pytest.raises(ConfigError, match=r"training\.batch_policy: balanced .*never see a positive"):
        policy_for_loss("balanced", "triplet")
