"""MAP@3 as Kaggle's FSDKaggle2018 competition defines it (hand-computed)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import (accuracy, average_precision_at_k, map_at_3, map_at_k_labels,
                              per_class_map_at_3, precision_at_rank, top_k_indices)


def kaggle_apk(actual, predicted, k=3):
    """The competition's reference implementation (ml_metrics.apk), for cross-checks."""
    if len(predicted) > k:
        predicted = predicted[:k]
    score, hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            hits += 1.0
            score += hits / (i + 1.0)
    return score / min(len(actual), k)


@pytest.mark.parametrize("predicted, expected", [
    (["a", "b", "c"], 1.0),
    (["b", "a", "c"], 0.5),
    (["b", "c", "a"], 1.0 / 3.0),
    (["b", "c", "d", "a"], 0.0),     # 4th place is outside the top 3
    (["b", "c", "d"], 0.0),
])
def test_ap_rank(predicted, expected):
    assert average_precision_at_k("a", predicted) == pytest.approx(expected)
    assert average_precision_at_k("a", predicted) == pytest.approx(kaggle_apk(["a"], predicted))


def test_ap_fewer_than_three_predictions():
    assert average_precision_at_k("a", ["a"]) == 1.0
    assert average_precision_at_k("a", ["b", "a"]) == 0.5
    assert average_precision_at_k("a", ["b"]) == 0.0
    assert average_precision_at_k("a", []) == 0.0


def test_ap_duplicates_count_at_first_position_only():
    assert average_precision_at_k("a", ["a", "a", "a"]) == 1.0          # not 1 + 1/2 + 1/3
    assert average_precision_at_k("a", ["b", "a", "a"]) == 0.5
    # a duplicate still occupies its rank: "b" is 3rd here
    assert average_precision_at_k("b", ["a", "a", "b"]) == pytest.approx(1 / 3)
    assert average_precision_at_k("b", ["a", "a", "b"]) == pytest.approx(kaggle_apk(["b"], ["a", "a", "b"]))
    assert average_precision_at_k("c", ["a", "a", "b", "c"]) == 0.0


def test_ap_k_parameter():
    assert average_precision_at_k("a", ["b", "c", "d", "a"], k=4) == 0.25
    assert average_precision_at_k("a", ["b", "a"], k=1) == 0.0


def test_map_at_k_labels_mean_and_errors():
    actual = ["a", "b", "c", "d"]
    predicted = [["a", "x", "y"], ["x", "b", "y"], ["x", "y", "c"], ["x", "y", "z"]]
    assert map_at_k_labels(actual, predicted) == pytest.approx((1 + 0.5 + 1 / 3 + 0) / 4)
    with pytest.raises(ValueError):
        map_at_k_labels(["a"], [["a"], ["b"]])
    assert math.isnan(map_at_k_labels([], []))


def test_map_at_3_from_probabilities():
    probs = np.array([
        [0.7, 0.2, 0.1, 0.0],   # true 0 at rank 1 -> 1
        [0.5, 0.3, 0.15, 0.05],  # true 1 at rank 2 -> 1/2
        [0.5, 0.3, 0.15, 0.05],  # true 2 at rank 3 -> 1/3
        [0.5, 0.3, 0.15, 0.05],  # true 3 at rank 4 -> 0
    ])
    y = np.array([0, 1, 2, 3])
    np.testing.assert_allclose(precision_at_rank(y, probs), [1, 0.5, 1 / 3, 0])
    assert map_at_3(y, probs) == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert accuracy(y, probs) == pytest.approx(0.25)


def test_map_at_3_agrees_with_label_version():
    rng = np.random.default_rng(0)
    probs = rng.random((50, 6))
    y = rng.integers(0, 6, 50)
    classes = list("abcdef")
    top = top_k_indices(probs, 3)
    labels = [[classes[i] for i in row] for row in top]
    assert map_at_3(y, probs) == pytest.approx(map_at_k_labels([classes[i] for i in y], labels))


def test_ties_break_towards_lower_class_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25],
                      [0.1, 0.3, 0.3, 0.3],
                      [0.0, 0.5, 0.0, 0.5]])
    np.testing.assert_array_equal(top_k_indices(probs, 3), [[0, 1, 2], [1, 2, 3], [1, 3, 0]])
    assert map_at_3(np.array([3, 3, 0]), probs) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    assert map_at_3(np.array([0, 1, 1]), probs) == pytest.approx((1 + 1 + 1) / 3)
    assert accuracy(np.array([1, 1, 1]), probs) == pytest.approx(2 / 3)


def test_fewer_than_three_classes():
    probs = np.array([[0.4, 0.6], [0.9, 0.1]])
    assert top_k_indices(probs, 3).shape == (2, 2)
    assert map_at_3(np.array([0, 0]), probs) == pytest.approx((0.5 + 1) / 2)


def test_empty_input():
    assert math.isnan(map_at_3(np.array([], dtype=int), np.zeros((0, 4))))
    assert math.isnan(accuracy(np.array([], dtype=int), np.zeros((0, 4))))


def test_per_class_table():
    classes = ["cat", "dog", "owl"]
    probs = np.array([
        [0.6, 0.3, 0.1],   # cat, rank 1
        [0.3, 0.6, 0.1],   # cat, rank 2
        [0.2, 0.7, 0.1],   # dog, rank 1
        [0.1, 0.2, 0.7],   # dog, rank 2
        [0.5, 0.4, 0.1],   # dog, rank 2
    ])
    y = np.array([0, 0, 1, 1, 1])
    table = per_class_map_at_3(y, probs, classes)
    assert list(table.columns) == ["class", "clips", "map3", "accuracy"]
    assert table["class"].tolist() == classes
    assert table["clips"].tolist() == [2, 3, 0]
    assert table.loc[0, "map3"] == pytest.approx((1 + 0.5) / 2)
    assert table.loc[1, "map3"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert table.loc[0, "accuracy"] == pytest.approx(0.5)
    assert table.loc[1, "accuracy"] == pytest.approx(1 / 3)
    assert pd.isna(table.loc[2, "map3"]) and pd.isna(table.loc[2, "accuracy"])
    # the clip-weighted mean of the per-class values is the overall score
    overall = (table["map3"].fillna(0) * table["clips"]).sum() / table["clips"].sum()
    assert overall == pytest.approx(map_at_3(y, probs))
