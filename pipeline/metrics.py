"""MAP@3 exactly as Kaggle's FSDKaggle2018 competition scores it.

Per clip: 1 if the true label is ranked first, 1/2 if second, 1/3 if third,
else 0 (a label repeated in the prediction list only counts at its first
position); the score is the mean over clips.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def average_precision_at_k(actual: str, predicted: Sequence[str], k: int = 3) -> float:
    """Kaggle's AP@k for a single-label clip; ``predicted`` may hold < k labels."""
    seen = set()
    for rank, label in enumerate(list(predicted)[:k], start=1):
        if label in seen:
            continue
        seen.add(label)
        if label == actual:
            return 1.0 / rank
    return 0.0


def map_at_k_labels(actual: Sequence[str], predicted: Sequence[Sequence[str]], k: int = 3) -> float:
    """MAP@k over label lists (the submission's view)."""
    if len(actual) != len(predicted):
        raise ValueError(f"{len(actual)} true labels but {len(predicted)} predictions")
    if len(actual) == 0:
        return float("nan")
    return float(np.mean([average_precision_at_k(a, p, k) for a, p in zip(actual, predicted)]))


def top_k_indices(probs: np.ndarray, k: int = 3) -> np.ndarray:
    """Class indices by descending probability; ties break towards the lower
    class index (a stable sort), so the ranking is deterministic."""
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
    return order[:, :k]


def precision_at_rank(y_true: np.ndarray, probs: np.ndarray, k: int = 3) -> np.ndarray:
    """Per-clip AP@k from integer labels and a probability matrix."""
    y_true = np.asarray(y_true)
    top = top_k_indices(probs, k)
    hits = top == y_true[:, None]
    weights = 1.0 / np.arange(1, top.shape[1] + 1)
    return (hits * weights).sum(axis=1)


def map_at_3(y_true: np.ndarray, probs: np.ndarray) -> float:
    """MAP@3 from integer labels (n,) and probabilities (n, n_classes)."""
    if len(y_true) == 0:
        return float("nan")
    return float(precision_at_rank(y_true, probs, 3).mean())


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    if len(y_true) == 0:
        return float("nan")
    return float((top_k_indices(probs, 1)[:, 0] == np.asarray(y_true)).mean())


def per_class_map_at_3(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: clip count, MAP@3 and accuracy of its clips."""
    y_true = np.asarray(y_true)
    ap = precision_at_rank(y_true, probs, 3)
    top1 = top_k_indices(probs, 1)[:, 0] == y_true
    rows = []
    for idx, name in enumerate(classes):
        mask = y_true == idx
        rows.append({
            "class": name,
            "clips": int(mask.sum()),
            "map3": float(ap[mask].mean()) if mask.any() else float("nan"),
            "accuracy": float(top1[mask].mean()) if mask.any() else float("nan"),
        })
    return pd.DataFrame(rows)


def scope_text(labelled: int | None, total: int | None) -> str:
    """" (1,600 of 9,400 test clips labelled)" when a score covers only part of
    the test set; empty when it covers all of it."""
    if labelled is None or total is None or labelled == total:
        return ""
    return f" (on {labelled:,} of {total:,} test clips)"
