"""Small helpers shared by the model builders (backend-agnostic Keras 3 only)."""

from __future__ import annotations

import keras
from keras import layers


def make_input(input_shape, min_rank: int, name: str = "input"):
    """Return ``(inputs, x)``; ``x`` has a trailing channel axis added when the
    given shape has ``min_rank - 1`` axes (e.g. ``(T, n_mfcc)`` -> ``(T, n_mfcc, 1)``)."""
    shape = tuple(int(d) if d is not None else None for d in input_shape)
    inputs = keras.Input(shape=shape, name=name)
    x = inputs
    if len(shape) == min_rank - 1:
        # Reshape (not a Lambda) so saved models load in safe mode; one unknown
        # axis (e.g. a variable time length) is allowed and becomes -1.
        target = tuple(-1 if d is None else d for d in shape) + (1,)
        x = layers.Reshape(target, name="add_channel")(x)
    elif len(shape) != min_rank:
        raise ValueError(
            f"input_shape {shape} must have {min_rank - 1} or {min_rank} axes "
            "(without the batch axis)"
        )
    return inputs, x


def softmax_head(x, n_classes: int, name: str = "predictions"):
    """Dense(n_classes) + softmax, computed in float32 (safe under mixed precision)."""
    x = layers.Dense(int(n_classes), name=f"{name}_dense")(x)
    return layers.Activation("softmax", dtype="float32", name=name)(x)
