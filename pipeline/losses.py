"""Losses written with keras.ops only, so every backend can train them."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="audio_tagging")
class TaggingCrossEntropy(keras.losses.Loss):
    """Categorical cross-entropy on (smoothed, mixed) soft targets.

    With ``mask_ratio`` set (the 1st-place system's batch-wise loss masking),
    ``y_true`` carries one extra last column, the row's verified flag (0/1):
    unverified rows whose loss exceeds ``mask_ratio`` x the batch's largest
    loss are dropped, since those are most likely wrong labels.
    """

    def __init__(self, mask_ratio: float | None = None, name: str = "tagging_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.mask_ratio = mask_ratio

    def call(self, y_true, y_pred):
        y_pred = ops.clip(y_pred, 1e-7, 1.0)
        if self.mask_ratio is None:
            return -ops.sum(y_true * ops.log(y_pred), axis=-1)
        targets, verified = y_true[:, :-1], y_true[:, -1]
        losses = -ops.sum(targets * ops.log(y_pred), axis=-1)
        threshold = self.mask_ratio * ops.stop_gradient(ops.max(losses))
        keep = ops.logical_or(verified > 0.5, ops.stop_gradient(losses) <= threshold)
        return losses * ops.cast(keep, losses.dtype)

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio}
