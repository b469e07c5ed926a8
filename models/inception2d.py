"""Inception-v3-style 2D ConvNet (the DCASE 2018 "2D-ConvNet", 7.7 M params).

Input ``(H, W, 3)`` (paper: 299x299x3 resized log-mel + deltas; any size >= 1
works because every conv/pool uses 'same' padding, so stride-2 stages give
ceil(H/2) and never collapse below 1; a 2-D input gets a channel axis).

Structure (every conv = Conv2D without bias -> BN (no scale, as Inception-v3)
-> ReLU, named ``<block>_<branch>_conv/_bn/_relu``):
    stem: conv 3x3 s2 32 -> conv 3x3 32 -> conv 3x3 64 -> maxpool 3 s2
    inception_a_1..3   1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool 3->1x1
    reduction_a        3x3 s2 | 1x1->3x3->3x3 s2 | maxpool 3 s2
    inception_b_1      1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool->1x1
    reduction_b        1x1->3x3 s2 | 1x1->1x7->7x1->3x3 s2 | maxpool 3 s2
    inception_c_1..3   1x1 | 1x1->[1x3, 3x1] | 1x1->3x3->[1x3, 3x1] | avgpool->1x1
    global average pooling -> Dense 1024 ReLU -> Dense softmax
Each block's output Concatenate layer carries the block name
(``inception_a_1``, ``reduction_a``, ...), so tests can count blocks.

Branch widths. The paper gives 7.7 M parameters but no widths; the full
Inception-v3 widths with this block layout (A x3, B x1, C x3) would give
~24 M. Here every Inception-v3 branch width is multiplied by
``BASE_SCALE * width`` (BASE_SCALE = 0.55) and rounded to a multiple of 8
(minimum 8); the stem (32, 32, 64) and the Dense 1024 are the paper's and
are scaled by ``width`` only. At width=1.0 (BASE_SCALE 0.55):
    A:   1x1 32 | 1x1 24 -> 5x5 32 | 1x1 32 -> 3x3 56 -> 3x3 56 | pool 16 (a_1), 32 (a_2, a_3)
    RA:  3x3 s2 208 | 1x1 32 -> 3x3 56 -> 3x3 s2 56 | maxpool
    B:   1x1 104 | 1x1 72 -> 1x7 72 -> 7x1 104 | 1x1 72 -> 7x1 72 -> 1x7 72 -> 7x1 72 -> 1x7 104 | pool 104
    RB:  1x1 104 -> 3x3 s2 176 | 1x1 104 -> 1x7 104 -> 7x1 104 -> 3x3 s2 104 | maxpool
    C:   1x1 176 | 1x1 208 -> [1x3 208, 3x1 208] | 1x1 248 -> 3x3 208 -> [1x3 208, 3x1 208] | pool 104
giving 7,796,105 parameters at 299x299x3 with 41 classes (paper: 7.7 M,
+1.2 %; the count does not depend on the input size; BASE_SCALE 0.52 would
give 7.06 M, 0.56 8.09 M, 1.0 = true Inception-v3 widths 24.3 M).
``width`` scales all of these (e.g. width=0.25 for a quick preset). Other
deviations from Inception-v3: no auxiliary classifier, the paper's short stem
(no 1x1 80 / 3x3 192 / second pool), 'same' padding everywhere.

Hyperparameters (defaults = the paper's settings):
    width=1.0          -- channel multiplier for every conv and the Dense layer (1.0 ~ 7.7 M params)
    blocks=(3, 1, 3)   -- number of inception A, B and C blocks
    dense_units=1024   -- units of the hidden Dense layer (scaled by width); 0 = no hidden layer
    dropout=0.0        -- dropout before the hidden Dense and the classifier (paper: none)
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import make_input, softmax_head

BASE_SCALE = 0.55  # Inception-v3 widths x 0.55 gives ~7.7 M params (the paper's size)

def _ch(c, scale):
    """Scale an Inception-v3 channel count and round it to a multiple of 8 (>= 8)."""
    return max(8, int(round(c * scale / 8.0)) * 8)

def _conv(x, filters, kernel, name, strides=1):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same",
                      use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(scale=False, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)

def _avgpool_branch(x, filters, name):
    y = layers.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_avgpool")(x)
    return _conv(y, filters, 1, name)

def _block_a(x, s, pool_features, name):
    b1 = _conv(x, _ch(64, s), 1, f"{name}_b1")
    b5 = _conv(x, _ch(48, s), 1, f"{name}_b5_1")
    b5 = _conv(b5, _ch(64, s), 5, f"{name}_b5_2")
    b3 = _conv(x, _ch(64, s), 1, f"{name}_b3_1")
    b3 = _conv(b3, _ch(96, s), 3, f"{name}_b3_2")
    b3 = _conv(b3, _ch(96, s), 3, f"{name}_b3_3")
    bp = _avgpool_branch(x, _ch(pool_features, s), f"{name}_pool")
    return layers.Concatenate(name=name)([b1, b5, b3, bp])

def _reduction_a(x, s, name="reduction_a"):
    b3 = _conv(x, _ch(384, s), 3, f"{name}_b3", strides=2)
    bd = _conv(x, _ch(64, s), 1, f"{name}_b3dbl_1")
    bd = _conv(bd, _ch(96, s), 3, f"{name}_b3dbl_2")
    bd = _conv(bd, _ch(96, s), 3, f"{name}_b3dbl_3", strides=2)
    bp = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_maxpool")(x)
    return layers.Concatenate(name=name)([b3, bd, bp])

def _block_b(x, s, name, c7=128):
    b1 = _conv(x, _ch(192, s), 1, f"{name}_b1")
    b7 = _conv(x, _ch(c7, s), 1, f"{name}_b7_1")
    b7 = _conv(b7, _ch(c7, s), (1, 7), f"{name}_b7_2")
    b7 = _conv(b7, _ch(192, s), (7, 1), f"{name}_b7_3")
    bd = _conv(x, _ch(c7, s), 1, f"{name}_b7dbl_1")
    bd = _conv(bd, _ch(c7, s), (7, 1), f"{name}_b7dbl_2")
    bd = _conv(bd, _ch(c7, s), (1, 7), f"{name}_b7dbl_3")
    bd = _conv(bd, _ch(c7, s), (7, 1), f"{name}_b7dbl_4")
    bd = _conv(bd, _ch(192, s), (1, 7), f"{name}_b7dbl_5")
    bp = _avgpool_branch(x, _ch(192, s), f"{name}_pool")
    return layers.Concatenate(name=name)([b1, b7, bd, bp])

def _reduction_b(x, s, name="reduction_b"):
    b3 = _conv(x, _ch(192, s), 1, f"{name}_b3_1")
    b3 = _conv(b3, _ch(320, s), 3, f"{name}_b3_2", strides=2)
    b7 = _conv(x, _ch(192, s), 1, f"{name}_b7_1")
    b7 = _conv(b7, _ch(192, s), (1, 7), f"{name}_b7_2")
    b7 = _conv(b7, _ch(192, s), (7, 1), f"{name}_b7_3")
    b7 = _conv(b7, _ch(192, s), 3, f"{name}_b7_4", strides=2)
    bp = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_maxpool")(x)
    return layers.Concatenate(name=name)([b3, b7, bp])

def _block_c(x, s, name):
    b1 = _conv(x, _ch(320, s), 1, f"{name}_b1")
    b3 = _conv(x, _ch(384, s), 1, f"{name}_b3_1")
    b3 = layers.Concatenate(name=f"{name}_b3_concat")([
        _conv(b3, _ch(384, s), (1, 3), f"{name}_b3_2a"),
        _conv(b3, _ch(384, s), (3, 1), f"{name}_b3_2b"),
    ])
    bd = _conv(x, _ch(448, s), 1, f"{name}_b3dbl_1")
    bd = _conv(bd, _ch(384, s), 3, f"{name}_b3dbl_2")
    bd = layers.Concatenate(name=f"{name}_b3dbl_concat")([
        _conv(bd, _ch(384, s), (1, 3), f"{name}_b3dbl_3a"),
        _conv(bd, _ch(384, s), (3, 1), f"{name}_b3dbl_3b"),
    ])
    bp = _avgpool_branch(x, _ch(192, s), f"{name}_pool")
    return layers.Concatenate(name=name)([b1, b3, bd, bp])

def build(input_shape, n_classes, width=1.0, blocks=(3, 1, 3), dense_units=1024,
          dropout=0.0) -> keras.Model:
    """Build the Inception-style 2D ConvNet; output = class probabilities."""
    width = float(width)
    s = BASE_SCALE * width
    n_a, n_b, n_c = (int(b) for b in blocks)
    inputs, x = make_input(input_shape, min_rank=3)
    x = _conv(x, _ch(32 / BASE_SCALE, s), 3, "stem_1", strides=2)
    x = _conv(x, _ch(32 / BASE_SCALE, s), 3, "stem_2")
    x = _conv(x, _ch(64 / BASE_SCALE, s), 3, "stem_3")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for i in range(1, n_a + 1):
        x = _block_a(x, s, 32 if i == 1 else 64, f"inception_a_{i}")
    x = _reduction_a(x, s)
    for i in range(1, n_b + 1):
        x = _block_b(x, s, f"inception_b_{i}")
    x = _reduction_b(x, s)
    for i in range(1, n_c + 1):
        x = _block_c(x, s, f"inception_c_{i}")
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    if dense_units:
        if dropout:
            x = layers.Dropout(dropout, name="dense_dropout")(x)
        units = max(8, int(round(int(dense_units) * width)))
        x = layers.Dense(units, activation="relu", name="dense")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = softmax_head(x, n_classes)
    return keras.Model(inputs, outputs, name="inception2d")
