"""1D raw-waveform ConvNet with residual blocks (the DCASE 2018 "1D-ConvNet").

Input ``(N, 1)`` raw samples (a 1-D ``(N,)`` input gets a channel axis).
Architecture (paper): Conv1D k=80 s=4 48 ch -> MaxPool 4 -> 2 residual blocks
at 48 -> MaxPool 4 -> 2 at 96 -> MaxPool 4 -> 2 at 192 -> MaxPool 4 -> 2 at
384 -> global average pooling -> Dense softmax. Every conv is followed by BN +
ReLU.

Residual block (ResNet-v1 ordering): conv k3 -> BN -> ReLU -> conv k3 -> BN ->
add(shortcut) -> ReLU; the block's Add layer is named ``res_block_<w>_<i>``
(e.g. ``res_block_96_1``), so a model has ``len(widths) * blocks_per_width``
layers matching ``^res_block_\\d+_\\d+$``. The first conv of the first block at
a new width maps the previous width to the new one; its shortcut then needs a
1x1 conv projection (+ BN) to match channels. Pooling uses 'same' padding so
short test inputs never collapse.

Parameter count at the defaults with 41 classes: 2,190,569 (7,200 of them BN
moving statistics; the input length does not matter) vs. the paper's "2.1 M"
(+4 %). The paper does not say how its shortcuts handle the width changes;
the 3 1x1 projection shortcuts used here (48->96, 96->192, 192->384) with their
BN add 99,456 weights. Without them the count is 2,091,113, i.e. exactly the
paper's figure, so the paper most likely used identity / zero-padded shortcuts
(or no shortcut) at the transitions. BN/ReLU ordering inside the block and
the placement of pooling do not change the count.

Hyperparameters (defaults = the paper's settings):
    widths=(48, 96, 192, 384)  -- channels of each stage of residual blocks
    blocks_per_width=2         -- residual blocks per stage
    first_kernel=80            -- kernel size of the first (strided) conv
    first_stride=4             -- stride of the first conv
    pool=4                     -- max-pool size/stride before every stage
    dropout=0.0                -- dropout before the classifier (paper: none)
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import make_input, softmax_head

def _conv_bn(x, filters, kernel, name, strides=1, relu=True):
    x = layers.Conv1D(filters, kernel, strides=strides, padding="same",
                      use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x

def _res_block(x, width, name):
    shortcut = x
    if x.shape[-1] != width:
        # Width changes (e.g. 48 -> 96): the identity shortcut cannot be added
        # to a wider tensor, so project it with a 1x1 conv (+ BN).
        shortcut = _conv_bn(x, width, 1, f"{name}_proj", relu=False)
    y = _conv_bn(x, width, 3, f"{name}_a")
    y = _conv_bn(y, width, 3, f"{name}_b", relu=False)
    y = layers.Add(name=name)([y, shortcut])
    return layers.Activation("relu", name=f"{name}_relu")(y)

def build(input_shape, n_classes, widths=(48, 96, 192, 384), blocks_per_width=2,
          first_kernel=80, first_stride=4, pool=4, dropout=0.0) -> keras.Model:
    """Build the 1D ConvNet; output = class probabilities (batch, n_classes)."""
    inputs, x = make_input(input_shape, min_rank=2)
    x = _conv_bn(x, int(widths[0]), int(first_kernel), "stem", strides=int(first_stride))
    for w in widths:
        w = int(w)
        x = layers.MaxPooling1D(int(pool), padding="same", name=f"pool_{w}")(x)
        for i in range(1, int(blocks_per_width) + 1):
            x = _res_block(x, w, f"res_block_{w}_{i}")
    x = layers.GlobalAveragePooling1D(name="global_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = softmax_head(x, n_classes)
    return keras.Model(inputs, outputs, name="wave1d")
