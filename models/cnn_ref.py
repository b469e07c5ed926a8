"""Small VGG-style reference CNN on log-mel windows.

Input ``(T, n_mels, C)`` (a 2-D ``(T, n_feat)`` input gets a channel axis).
Each block: [Conv2D 3x3 'same' -> BN -> ReLU] x 2 -> MaxPool 2x2 ('same', so a
short axis never collapses) -> Dropout. Then global pooling -> Dropout ->
Dense softmax. Layers of block ``i`` (1-based) are named ``conv_block_<i>_*``;
the block's pooling layer is named ``conv_block_<i>``.

Hyperparameters (defaults = the usual Kaggle 2018 log-mel CNN baseline):
    filters=(32, 64, 128, 256)  -- conv channels of each block (one block per entry)
    dropout=0.2                 -- dropout rate after every block and before the classifier
    pooling="avg"               -- global pooling: "avg", "max" or "avgmax" (concat of both)
    l2=0.0                      -- L2 weight decay on conv/dense kernels (0 = off)
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import make_input, softmax_head

def build(input_shape, n_classes, filters=(32, 64, 128, 256), dropout=0.2,
          pooling="avg", l2=0.0) -> keras.Model:
    """Build the reference CNN; output = class probabilities (batch, n_classes)."""
    reg = keras.regularizers.L2(l2) if l2 else None
    inputs, x = make_input(input_shape, min_rank=3)
    for i, f in enumerate(filters, start=1):
        p = f"conv_block_{i}"
        for j in (1, 2):
            x = layers.Conv2D(int(f), 3, padding="same", use_bias=False,
                              kernel_regularizer=reg, name=f"{p}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"{p}_bn{j}")(x)
            x = layers.Activation("relu", name=f"{p}_relu{j}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=p)(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"{p}_dropout")(x)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    elif pooling == "avgmax":
        x = layers.Concatenate(name="global_pool")([
            layers.GlobalAveragePooling2D(name="global_avg_pool")(x),
            layers.GlobalMaxPooling2D(name="global_max_pool")(x),
        ])
    else:
        raise ValueError(f"pooling must be 'avg', 'max' or 'avgmax', got {pooling!r}")
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = softmax_head(x, n_classes)
    return keras.Model(inputs, outputs, name="cnn_ref")
