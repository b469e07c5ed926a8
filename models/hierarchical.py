"""Two-level DNN classifier on a clip embedding (the hierarchical scene
classification seed system): one DNN classifies the meta-class, one DNN per
meta-class classifies inside it, and

    P(class c) = P(meta m(c)) x P(c | m(c))

which sums to one over the classes (each inner softmax sums to one over its
meta-class). The output is that composed distribution, so the model is an
ordinary classifier to the rest of the pipeline; the meta-class and inner
distributions are recovered from it exactly by :func:`split_posteriors`
(P(m) = the sum of its classes' probabilities, P(c | m) = P(c) / P(m)), which
is how the loss in :mod:`pipeline.losses` trains each DNN on its own
targets. A meta-class of one class needs no DNN (P(c | m) = 1).

Input ``(d,)``: one embedding per clip. Each DNN: [Dense -> ReLU -> Dropout]
per hidden size -> Dense softmax (paper: 256 -> 512 -> 1024 -> 1024 ->
classes, dropout 0.3). Layers are named ``meta_*`` and ``inner_<m>_*``.

Hyperparameters (defaults = the paper's):
    groups=None               -- class indices of each meta-class (a partition of 0..n_classes-1), set per
                                 fold by the trainer (pipeline.hierarchical); None: one meta-class (a flat DNN)
    hidden=(512, 1024, 1024)  -- hidden units of every DNN
    dropout=0.3               -- dropout after every hidden layer
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from models._common import make_input


def check_groups(groups, n_classes: int) -> list[list[int]]:
    """``groups`` as lists of ints, refused unless they partition 0..n_classes-1."""
    out = [[int(c) for c in g] for g in groups]
    flat = sorted(c for g in out for c in g)
    if any(len(g) == 0 for g in out) or flat != list(range(int(n_classes))):
        raise ValueError(f"groups must partition the classes 0..{int(n_classes) - 1} into non-empty meta-classes, "
                         f"got {out}")
    return out


def membership(groups, n_classes: int) -> np.ndarray:
    """(n_classes, n_meta) 0/1 matrix: G[c, m] = 1 when class c is in meta-class m."""
    groups = check_groups(groups, n_classes)
    g = np.zeros((int(n_classes), len(groups)), dtype=np.float32)
    for m, members in enumerate(groups):
        g[members, m] = 1.0
    return g


@keras.saving.register_keras_serializable(package="audio_tagging")
class ComposePosteriors(layers.Layer):
    """[P(meta) (batch, M), P(. | meta 0) (batch, n_0), ...] -> P(class) (batch, C):
    P(c) = P(m(c)) x P(c | m(c)), columns in class order. A meta-class of one
    class has no inner input (its conditional is 1)."""

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = [[int(c) for c in g] for g in groups]
        n_classes = sum(len(g) for g in self.groups)
        self.n_classes = n_classes
        # class c's column in the concatenation [meta-probability-scaled inner probabilities in group order]
        order = [c for g in self.groups for c in g]
        self._gather = np.argsort(np.asarray(order)).astype("int32")

    def call(self, inputs):
        meta, inner = inputs[0], list(inputs[1:])
        parts, it = [], iter(inner)
        for m, members in enumerate(self.groups):
            p_meta = meta[:, m:m + 1]
            parts.append(p_meta if len(members) == 1 else p_meta * next(it))
        joint = ops.concatenate(parts, axis=-1)
        return ops.take(joint, ops.convert_to_tensor(self._gather), axis=-1)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.n_classes)

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups)
        return config


def split_posteriors(probs: np.ndarray, groups) -> tuple[np.ndarray, list[np.ndarray]]:
    """The inverse of the composition: (P(meta) (n, M), [P(. | m) (n, n_m)]) from P(class) (n, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    meta = np.stack([probs[:, g].sum(axis=1) for g in groups], axis=1)
    inner = [probs[:, g] / np.maximum(meta[:, [m]], 1e-30) for m, g in enumerate(groups)]
    return meta, inner


def _dnn(x, n_out: int, hidden, dropout: float, prefix: str):
    for i, units in enumerate(hidden, start=1):
        x = layers.Dense(int(units), name=f"{prefix}_dense{i}")(x)
        x = layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"{prefix}_dropout{i}")(x)
    x = layers.Dense(int(n_out), name=f"{prefix}_logits")(x)
    return layers.Activation("softmax", dtype="float32", name=f"{prefix}_softmax")(x)


def build(input_shape, n_classes, groups=None, hidden=(512, 1024, 1024), dropout=0.3) -> keras.Model:
    """Build the two-level classifier; output = composed class probabilities (batch, n_classes)."""
    groups = check_groups(groups if groups is not None else [list(range(int(n_classes)))], n_classes)
    inputs, x = make_input(input_shape, min_rank=1)
    if len(groups) == 1:  # one meta-class: a flat DNN, its softmax in class order
        outputs = _dnn(x, n_classes, hidden, dropout, "inner_0")
        return keras.Model(inputs, outputs, name="hierarchical")
    meta = _dnn(x, len(groups), hidden, dropout, "meta")
    inner = [_dnn(x, len(g), hidden, dropout, f"inner_{m}") for m, g in enumerate(groups) if len(g) > 1]
    outputs = ComposePosteriors(groups, name="predictions")([meta] + inner)
    return keras.Model(inputs, outputs, name="hierarchical")
