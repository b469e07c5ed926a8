"""Multi-level attention model on bags of VGGish embeddings.

Input ``(n_instances, d)`` = 6 consecutive 0.96 s VGGish embeddings of 128
(paper: 6 segments best). Each instance goes through ``levels`` fully
connected levels [Dense(units) -> BN -> ReLU -> Dropout], applied per instance
(Dense on the last axis, weights shared across instances). After every level
an ``AttentionPooling(n_classes)`` layer pools the instances into a
(batch, n_classes) prediction; the level predictions are concatenated and a
final Dense softmax gives the class probabilities. Layers are named
``level_<i>_dense/_bn/_relu/_dropout`` and ``attention_pool_<i>``.

AttentionPooling (per class k, instance i):
    f_k(x_i) = sigmoid(W_f x_i + b_f)_k                     instance-level class score
    a_k(x_i) = sigmoid(W_a x_i + b_a)_k, clipped to [eps, 1 - eps]
    v_k(x_i) = a_k(x_i) / sum_j a_k(x_j)                    normalised over the instances
    y_k      = sum_i v_k(x_i) f_k(x_i)
The paper normalises a sigmoid attention to sum to 1 over the instances (as
in Kong et al.'s attention model); the clip is the small epsilon that keeps
the division finite. ``attention_activation="softmax"`` (softmax over the
instance axis) is offered as the alternative.

Hyperparameters (defaults = the paper's settings):
    units=600                       -- units of each per-instance fully connected level
    levels=3                        -- number of fully connected levels (each with its own attention pooling)
    dropout=0.4                     -- dropout after every level
    attention_activation="sigmoid"  -- "sigmoid" (normalised by the sum over instances) or "softmax"
"""

from __future__ import annotations

import keras
from keras import layers, ops

from models._common import make_input, softmax_head

@keras.saving.register_keras_serializable(package="audio_tagging")
class AttentionPooling(layers.Layer):
    """Attention pooling over the instance axis: (batch, n, d) -> (batch, n_classes).

    ``call(x, return_attention=True)`` returns ``(pooled, attention)`` with the
    attention weights ``v`` of shape (batch, n, n_classes), summing to 1 over n.
    """

    def __init__(self, n_classes, epsilon=1e-7, attention_activation="sigmoid", **kwargs):
        super().__init__(**kwargs)
        if attention_activation not in ("sigmoid", "softmax"):
            raise ValueError("attention_activation must be 'sigmoid' or 'softmax', "
                             f"got {attention_activation!r}")
        self.n_classes = int(n_classes)
        self.epsilon = float(epsilon)
        self.attention_activation = attention_activation
        self.score_dense = layers.Dense(self.n_classes, activation="sigmoid", name="score")
        self.attention_dense = layers.Dense(self.n_classes, activation=None, name="attention")

    def build(self, input_shape):
        self.score_dense.build(input_shape)
        self.attention_dense.build(input_shape)
        self.built = True

    def attention_weights(self, inputs):
        """Attention weights v: (batch, n, n_classes), summing to 1 over the instances."""
        logits = self.attention_dense(inputs)
        if self.attention_activation == "softmax":
            return ops.softmax(logits, axis=1)
        a = ops.clip(ops.sigmoid(logits), self.epsilon, 1.0 - self.epsilon)
        return a / ops.sum(a, axis=1, keepdims=True)

    def call(self, inputs, return_attention=False):
        scores = self.score_dense(inputs)
        weights = self.attention_weights(inputs)
        pooled = ops.sum(weights * scores, axis=1)
        if return_attention:
            return pooled, weights
        return pooled

    def get_config(self):
        config = super().get_config()
        config.update(n_classes=self.n_classes, epsilon=self.epsilon,
                      attention_activation=self.attention_activation)
        return config

def build(input_shape, n_classes, units=600, levels=3, dropout=0.4,
          attention_activation="sigmoid") -> keras.Model:
    """Build the multi-level attention model; output = class probabilities."""
    inputs, x = make_input(input_shape, min_rank=2)
    pooled = []
    for i in range(1, int(levels) + 1):
        x = layers.Dense(int(units), name=f"level_{i}_dense")(x)
        x = layers.BatchNormalization(name=f"level_{i}_bn")(x)
        x = layers.Activation("relu", name=f"level_{i}_relu")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"level_{i}_dropout")(x)
        pooled.append(AttentionPooling(n_classes, attention_activation=attention_activation,
                                       name=f"attention_pool_{i}")(x))
    h = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="levels_concat")(pooled)
    outputs = softmax_head(h, n_classes)
    return keras.Model(inputs, outputs, name="mla")
