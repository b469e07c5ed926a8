"""Losses written with keras.ops only, so every backend can train them.

- :class:`TaggingCrossEntropy`: categorical cross-entropy on soft targets.
- :class:`TaggingFocalLoss`: the multi-class focal loss (DCASE 2018 Task 1, multi-scale Xception).
- :func:`triplet_loss` / :class:`EmbeddingTripletLoss`: the triplet loss on an embedding (DCASE 2019
  Task 1, large-margin factorized CNN: CE + gamma x triplet).
- :class:`HierarchicalLoss`: gamma x KL + (1 - gamma) x a triplet in the output space, on the meta-class and the
  within-meta-class distributions of a two-level classifier (hierarchical scene classification seed system).
- :func:`make_losses`: what a trainer needs for ``training.loss``.

Both classification losses share the batch-wise loss masking of :class:`_MaskedRowLoss`.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from pipeline.config import ConfigError, training_settings
from pipeline.predictions import EPS  # the one probability floor: log(clip(p, EPS, 1)) in the losses too
# numpy, so a loader's worker process makes a triplet batch without Keras; re-exported here
from pipeline.batches import draw_negatives, pack_triplet_targets  # noqa: F401


# The loss settings of a training section and their defaults (the papers' values).
TRIPLET_STRATEGIES = ("paper", "batch_all", "batch_hard", "semi_hard")
#: balanced_alpha clips the mean-1 inverse frequencies to this range (a 16x spread at most)
ALPHA_RANGE = (0.25, 4.0)


# --------------------------------------------------------------------------- classification losses

class _MaskedRowLoss(keras.losses.Loss):
    """A per-row loss on soft targets, with the 1st-place system's batch-wise loss masking.

    With ``mask_ratio`` set, ``y_true`` carries one extra last column, the row's verified flag
    (0/1): unverified rows whose loss exceeds ``mask_ratio`` x the batch's largest loss are
    dropped, since those are most likely wrong labels. Subclasses give :meth:`row_losses`.
    """

    def __init__(self, mask_ratio: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mask_ratio = mask_ratio

    def row_losses(self, targets, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        if self.mask_ratio is None:
            return self.row_losses(y_true, y_pred)
        targets, verified = y_true[:, :-1], y_true[:, -1]
        losses = self.row_losses(targets, y_pred)
        threshold = self.mask_ratio * ops.stop_gradient(ops.max(losses))
        keep = ops.logical_or(verified > 0.5, ops.stop_gradient(losses) <= threshold)
        return losses * ops.cast(keep, losses.dtype)

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio}


@keras.saving.register_keras_serializable(package="audio_tagging")
class TaggingCrossEntropy(_MaskedRowLoss):
    """Categorical cross-entropy on (smoothed, mixed) soft targets: -sum_c t_c log(clip(p_c, EPS, 1)).

    With ``mask_ratio`` set (the 1st-place system's batch-wise loss masking),
    ``y_true`` carries one extra last column, the row's verified flag (0/1):
    unverified rows whose loss exceeds ``mask_ratio`` x the batch's largest
    loss are dropped, since those are most likely wrong labels.
    """

    def __init__(self, mask_ratio: float | None = None, name: str = "tagging_crossentropy", **kwargs):
        super().__init__(mask_ratio=mask_ratio, name=name, **kwargs)

    def row_losses(self, targets, y_pred):
        return -ops.sum(targets * ops.log(ops.clip(y_pred, EPS, 1.0)), axis=-1)


@keras.saving.register_keras_serializable(package="audio_tagging")
class TaggingFocalLoss(_MaskedRowLoss):
    """Multi-class focal loss on (smoothed, mixed) soft targets, with the same loss masking as the CE.

    L = -sum_c t_c * alpha_c * (1 - p_c + eps)^gamma * log(p_c), p_c = clip(y_pred_c, eps, 1).
    For a one-hot target this is the paper's -alpha_t (1 - p_t + eps)^gamma log(p_t + eps), except
    that the log uses the CE's clipping instead of "+ eps" (they differ by about eps / p_t), so that
    with gamma = 0 and alpha None the loss *is* :class:`TaggingCrossEntropy`. ``alpha``: None (all 1)
    or one float per class (see :func:`balanced_alpha`).
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None, mask_ratio: float | None = None,
                 eps: float = EPS, name: str = "tagging_focal", **kwargs):
        super().__init__(mask_ratio=mask_ratio, name=name, **kwargs)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else [float(a) for a in alpha]
        self.eps = float(eps)

    def row_losses(self, targets, y_pred):
        p = ops.clip(y_pred, self.eps, 1.0)
        weights = targets
        if self.gamma != 0.0:
            weights = weights * ops.power(1.0 - p + self.eps, self.gamma)
        if self.alpha is not None:
            weights = weights * ops.convert_to_tensor(self.alpha, dtype=p.dtype)
        return -ops.sum(weights * ops.log(p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha, "eps": self.eps}


def _alpha_from_counts(counts: np.ndarray) -> list[float]:
    counts = np.asarray(counts, dtype=np.float64)
    alpha = np.ones(len(counts))
    present = counts > 0
    if present.any():
        inverse = 1.0 / counts[present]
        alpha[present] = np.clip(inverse / inverse.mean(), *ALPHA_RANGE)
    return [float(a) for a in alpha]


def balanced_alpha(labels, n_classes: int) -> list[float]:
    """Per-class focal alpha from the class frequencies of the training rows (pure numpy).

    ``labels``: class indices (1-D), or one-hot / soft targets (2-D; their column sums are the
    counts). alpha_c = (1 / n_c) / mean over present classes of (1 / n_c), so the mean over present
    classes is 1 before clipping to :data:`ALPHA_RANGE` (not renormalised after it); a class with
    no training row gets 1 (it only ever gets label-smoothing mass). The paper's alphas lie in
    0.5-1.0 (max-normalised, hand-set); the mean-1 scale keeps the loss's magnitude that of the CE.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        counts = labels.sum(axis=0)
    else:
        counts = np.bincount(labels.astype(int).ravel(), minlength=n_classes)
    if len(counts) != n_classes:
        raise ValueError(f"labels hold {len(counts)} classes, expected {n_classes}")
    return _alpha_from_counts(counts)


# --------------------------------------------------------------------------- triplet loss

def _class_indices(labels):
    """int32 class indices from indices (N,) or (N, 1), or from one-hot / soft targets (N, C) by argmax."""
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == 2:
        labels = labels[:, 0] if labels.shape[-1] == 1 else ops.argmax(labels, axis=-1)
    if "float" in str(labels.dtype):
        labels = ops.round(labels)
    return ops.cast(labels, "int32")


def pairwise_sq_distances(embeddings):
    """(N, N) squared Euclidean distances between the rows (any trailing shape is flattened)."""
    e = ops.convert_to_tensor(embeddings)
    if len(e.shape) > 2:
        e = ops.reshape(e, (-1, int(np.prod(e.shape[1:]))))
    sq = ops.sum(ops.square(e), axis=1)
    d = ops.expand_dims(sq, 1) - 2.0 * ops.matmul(e, ops.transpose(e)) + ops.expand_dims(sq, 0)
    return ops.maximum(d, 0.0)


def _masked_mean(values, valid):
    """Mean of ``values`` where ``valid``; 0 (with a zero, finite gradient) when nothing is valid."""
    valid = ops.cast(valid, values.dtype)
    return ops.sum(values * valid) / ops.maximum(ops.sum(valid), 1.0)


def triplet_loss(labels, embeddings, margin: float = 0.2, strategy: str = "batch_hard", negatives=None,
                 sources=None, seed=None):
    """Mean triplet hinge max(d(a, p) - d(a, n) + margin, 0) on squared Euclidean distances.

    ``labels``: class indices (N,) or (N, 1), or one-hot / soft targets (N, C), whose argmax is
    taken. A positive is another row (another clip) of the anchor's class and, when ``sources``
    (N ints, e.g. the recording city) is given, of another source; a negative is a row of another
    class. (Pass clip ids as ``sources`` if a batch may hold two windows of one clip.)

    strategy:
      - ``batch_all``: every valid (anchor, positive, negative); mean over all of them.
      - ``paper``: every valid (anchor, positive) pair with one random negative; mean over all pairs
        whose negative is valid (zero-loss ones included, as the paper). ``negatives``: indices (N,)
        per anchor, or (N, N) per pair, e.g. from :func:`draw_negatives`; without them one per pair
        is drawn uniformly among the anchor's negatives with ``keras.random`` (``seed``: int or
        ``keras.random.SeedGenerator``).
      - ``batch_hard``: per anchor, the farthest positive and the nearest negative; mean over the
        anchors that have both.
      - ``semi_hard``: per valid pair, the nearest negative farther than the positive, or, when none
        is, the farthest negative (FaceNet); mean over the pairs whose anchor has a negative.

    Returns a scalar; 0 (not NaN, with a finite gradient) when the batch has no valid triplet.
    """
    if strategy not in TRIPLET_STRATEGIES:
        raise ValueError(f"unknown triplet strategy {strategy!r}; one of {', '.join(TRIPLET_STRATEGIES)}")
    labels = _class_indices(labels)
    d = pairwise_sq_distances(embeddings)
    index = ops.cumsum(ops.ones_like(labels)) - 1          # 0..N-1 on every backend, dynamic N included
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    neg = ops.logical_not(same)
    pos = ops.logical_and(same, ops.not_equal(ops.expand_dims(index, 1), ops.expand_dims(index, 0)))
    if sources is not None:
        src = ops.cast(ops.convert_to_tensor(sources), "int32")
        pos = ops.logical_and(pos, ops.not_equal(ops.expand_dims(src, 1), ops.expand_dims(src, 0)))
    has_neg = ops.any(neg, axis=1)
    # a stand-in distance beyond every real one, for masked minima
    far = ops.stop_gradient(ops.max(d)) + abs(float(margin)) + 1.0

    if strategy == "batch_all":
        hinge = ops.relu(ops.expand_dims(d, 2) - ops.expand_dims(d, 1) + margin)  # [a, p, n]
        valid = ops.logical_and(ops.expand_dims(pos, 2), ops.expand_dims(neg, 1))
        return _masked_mean(hinge, valid)

    if strategy == "batch_hard":
        hardest_pos = ops.max(ops.where(pos, d, 0.0), axis=1)
        hardest_neg = ops.min(ops.where(neg, d, far), axis=1)
        valid = ops.logical_and(ops.any(pos, axis=1), has_neg)
        return _masked_mean(ops.relu(hardest_pos - hardest_neg + margin), valid)

    if strategy == "semi_hard":
        d_ap = ops.expand_dims(d, 2)                         # [a, p, 1]
        d_an = ops.expand_dims(d, 1)                         # [a, 1, n]
        outside = ops.logical_and(ops.expand_dims(neg, 1), d_an > d_ap)
        nearest_outside = ops.min(ops.where(outside, d_an, far), axis=2)
        farthest = ops.max(ops.where(neg, d, 0.0), axis=1, keepdims=True)
        chosen = ops.where(ops.any(outside, axis=2), nearest_outside, farthest)
        valid = ops.logical_and(pos, ops.expand_dims(has_neg, 1))
        return _masked_mean(ops.relu(d - chosen + margin), valid)

    # paper
    if negatives is None:
        n = ops.shape(labels)[0]
        scores = keras.random.uniform((n, n, n), seed=seed)
        negatives = ops.argmax(ops.where(ops.expand_dims(neg, 1), scores, -1.0), axis=2)  # [a, p]
    negatives = ops.cast(ops.convert_to_tensor(negatives), "int32")
    if len(negatives.shape) == 1:
        negatives = ops.expand_dims(negatives, 1)            # one per anchor, for all its pairs
    d_an = ops.take_along_axis(d, negatives, axis=1)
    neg_ok = ops.take_along_axis(ops.cast(neg, "int32"), negatives, axis=1) > 0
    valid = ops.logical_and(pos, neg_ok)
    return _masked_mean(ops.relu(d - d_an + margin), valid)


@keras.saving.register_keras_serializable(package="audio_tagging")
class EmbeddingTripletLoss(keras.losses.Loss):
    """:func:`triplet_loss` as the loss of a model's embedding output (``y_pred`` = the embedding,
    any shape per row; it is flattened).

    ``y_true``: the class index (N,) / (N, 1) or the one-hot / soft target (N, C), then, when
    ``with_sources``, a column of source ids, then, when ``with_negatives``, a column of per-anchor
    negative indices into the batch (:func:`pack_triplet_targets`, :func:`draw_negatives`). For
    ``strategy="paper"`` without ``with_negatives`` the negatives are drawn in the graph from a
    ``SeedGenerator(seed)`` owned by the loss: deterministic under TF and torch; under JAX's jitted
    training the loss's generator is not part of the trained state, so prefer ``with_negatives``
    there. The loss is one scalar per batch: sample weights do not apply.
    """

    def __init__(self, margin: float = 0.2, strategy: str = "paper", with_sources: bool = False,
                 with_negatives: bool = False, seed: int | None = None, normalize: bool = False,
                 name: str = "embedding_triplet", **kwargs):
        super().__init__(name=name, **kwargs)
        if strategy not in TRIPLET_STRATEGIES:
            raise ValueError(f"unknown triplet strategy {strategy!r}; one of {', '.join(TRIPLET_STRATEGIES)}")
        self.margin = float(margin)
        self.strategy = strategy
        self.with_sources = bool(with_sources)
        self.with_negatives = bool(with_negatives)
        self.seed = seed
        self.normalize = bool(normalize)  # L2-normalise the embeddings first (FaceNet): the margin gets a scale
        self._seed_generator = (keras.random.SeedGenerator(seed)
                                if strategy == "paper" and not with_negatives else None)

    def call(self, y_true, y_pred):
        sources = negatives = None
        if self.with_negatives:
            negatives, y_true = y_true[:, -1], y_true[:, :-1]
        if self.with_sources:
            sources, y_true = y_true[:, -1], y_true[:, :-1]
        if sources is not None:
            sources = ops.round(sources)
        if negatives is not None:
            negatives = ops.round(negatives)
        if self.normalize:
            y_pred = y_pred / ops.sqrt(ops.sum(ops.square(y_pred), axis=-1, keepdims=True) + EPS)
        return triplet_loss(y_true, y_pred, margin=self.margin, strategy=self.strategy, negatives=negatives,
                            sources=sources, seed=self._seed_generator)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "strategy": self.strategy,
                "with_sources": self.with_sources, "with_negatives": self.with_negatives, "seed": self.seed,
                "normalize": self.normalize}


# --------------------------------------------------------------------------- factory

# --------------------------------------------------------------------------- the two-level classifier's loss

def kl_divergence_rows(targets, probs):
    """Per-row KL(targets || probs), with the probability floor EPS on both sides."""
    t = ops.clip(targets, EPS, 1.0)
    return ops.sum(targets * (ops.log(t) - ops.log(ops.clip(probs, EPS, 1.0))), axis=-1)


def output_triplet_rows(anchors, positives, negatives_from, valid, margin: float):
    """Per anchor row i: the mean over valid j of max(0, |a_i - p_i|^2 - |a_i - q_j|^2 + margin), q = negatives_from
    (0 for a row with no valid j). The triplet of the hierarchical paper taken in the output space: anchor = a
    sample's target distribution, positive = its prediction, negative = the prediction for a sample of another
    class; every such sample in the batch is a negative (the paper does not say how one is picked)."""
    d_pos = ops.sum(ops.square(anchors - positives), axis=-1)
    sq_a = ops.sum(ops.square(anchors), axis=-1)
    sq_q = ops.sum(ops.square(negatives_from), axis=-1)
    d_neg = ops.expand_dims(sq_a, 1) - 2.0 * ops.matmul(anchors, ops.transpose(negatives_from)) + \
        ops.expand_dims(sq_q, 0)
    valid = ops.cast(valid, d_pos.dtype)
    hinge = ops.relu(ops.expand_dims(d_pos, 1) - d_neg + margin) * valid
    return ops.sum(hinge, axis=1) / ops.maximum(ops.sum(valid, axis=1), 1.0)


@keras.saving.register_keras_serializable(package="audio_tagging")
class HierarchicalLoss(keras.losses.Loss):
    """gamma x KL + (1 - gamma) x output-space triplet, for the meta-class DNN and each meta-class's inner DNN of
    ``models.hierarchical`` (whose output is the composed P(class)).

    From the composed prediction p and the soft target t (both (N, C)), with G the class-to-meta membership:
    the meta level compares t @ G with p @ G (every row); the inner level compares, for row i of meta-class m
    (the argmax of t @ G), t and p restricted to m's classes and renormalised -- which is exactly the inner DNN's
    softmax, so each inner DNN learns only from its own meta-class's rows, as when trained alone. Negatives: rows
    of another meta-class (meta level), rows of the same meta-class and another class (inner level). The row
    loss is the sum of both levels; Keras averages it over the batch (a per-DNN constant factor against separate
    training, which Adam's per-weight scaling absorbs)."""

    def __init__(self, groups, gamma: float = 0.2, margin: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.groups = [[int(c) for c in g] for g in groups]
        self.gamma = float(gamma)
        self.margin = float(margin)
        n_classes = sum(len(g) for g in self.groups)
        member = np.zeros((n_classes, len(self.groups)), dtype="float32")
        for m, g in enumerate(self.groups):
            member[g, m] = 1.0
        self._member = member

    def call(self, y_true, y_pred):
        t = ops.cast(y_true, "float32")
        p = ops.cast(y_pred, "float32")
        member = ops.convert_to_tensor(self._member)
        t_meta, p_meta = ops.matmul(t, member), ops.matmul(p, member)
        meta_id = ops.argmax(t_meta, axis=-1)
        class_id = ops.argmax(t, axis=-1)
        same_meta = ops.equal(ops.expand_dims(meta_id, 1), ops.expand_dims(meta_id, 0))
        other_class = ops.not_equal(ops.expand_dims(class_id, 1), ops.expand_dims(class_id, 0))
        in_meta = ops.matmul(ops.one_hot(meta_id, len(self.groups)), ops.transpose(member))  # (N, C) 0/1
        t_in = t * in_meta / ops.maximum(ops.sum(t * in_meta, axis=-1, keepdims=True), EPS)
        p_in = p * in_meta / ops.maximum(ops.sum(p * in_meta, axis=-1, keepdims=True), EPS)
        kl = kl_divergence_rows(t_meta, p_meta) + kl_divergence_rows(t_in, p_in)
        triplet = (output_triplet_rows(t_meta, p_meta, p_meta, ops.logical_not(same_meta), self.margin)
                   + output_triplet_rows(t_in, p_in, p_in, ops.logical_and(same_meta, other_class), self.margin))
        return self.gamma * kl + (1.0 - self.gamma) * triplet

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "gamma": self.gamma, "margin": self.margin}


def make_losses(train_cfg: dict, n_classes: int, class_counts=None) -> dict:
    """What a trainer needs for ``train_cfg["loss"]`` (the settings, their defaults and docs:
    ``pipeline.settings.Training``; a partial section is filled from there).

    Returns ``{"loss": name, "classification": Loss, "embedding": Loss or None,
    "loss_weights": {"classification": 1.0[, "embedding": triplet_weight]}}``; the classification
    loss masks unverified rows when ``loss_masking`` is set. ``class_counts`` (training rows per
    class) is needed for ``focal_alpha: balanced``.
    """
    train_cfg = training_settings(train_cfg)  # names, ranges and triplet + mixup are refused there

    def setting(key):
        return train_cfg[key]

    name = setting("loss")
    mask_ratio = train_cfg["loss_masking"]
    out = {"loss": name, "embedding": None, "loss_weights": {"classification": 1.0}}
    if name == "crossentropy":
        out["classification"] = TaggingCrossEntropy(mask_ratio=mask_ratio)
    elif name == "focal":
        gamma = float(setting("focal_gamma"))
        alpha = setting("focal_alpha")
        if alpha == "balanced":
            if class_counts is None:
                raise ValueError("focal_alpha: balanced needs the training rows' class counts (class_counts)")
            if len(class_counts) != n_classes:
                raise ValueError(f"class_counts has {len(class_counts)} entries, expected {n_classes}")
            alpha = _alpha_from_counts(np.asarray(class_counts))
        elif alpha is not None and len(alpha) != n_classes:
            raise ConfigError(f"training.focal_alpha has {len(alpha)} values, expected one per class ({n_classes})")
        out["classification"] = TaggingFocalLoss(gamma=gamma, alpha=alpha, mask_ratio=mask_ratio)
    else:
        strategy = setting("triplet_strategy")
        out["classification"] = TaggingCrossEntropy(mask_ratio=mask_ratio)
        out["embedding"] = EmbeddingTripletLoss(margin=float(setting("triplet_margin")), strategy=strategy,
                                                normalize=bool(setting("triplet_normalize")))
        out["loss_weights"]["embedding"] = float(setting("triplet_weight"))
    return out
