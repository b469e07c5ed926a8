"""Multi-scale Xception (the DCASE 2018 Task 1 acoustic-scene system).

Input ``(T, n_mels, C)`` (paper: 128 log-mel bands, mono; here the cached
log-mel + deltas, C = 3; a 2-D ``(T, n_feat)`` input gets a channel axis).
Any size >= 1 works: every conv/pool uses 'same' padding, so each stride-2
stage gives ceil(n/2) and never collapses below 1 (the total stride is 32).

Structure (Xception, Chollet 2017; ``w(c)`` = ``c * width`` rounded to a
multiple of 8, at least 8). A "separable unit" is SeparableConv2D 3x3 (no
bias) -> BN -> ReLU; in every residual block the last unit's ReLU comes after
the addition (post-activation residual, as ResNet):
    stem:           conv 3x3 s2 w(32) -> BN -> ReLU -> conv 3x3 w(64) -> BN -> ReLU
    entry flow:     entry_block_1..3, widths w(128), w(256), w(728):
                    2 separable units -> maxpool 3 s2, + shortcut conv 1x1 s2 + BN
    middle flow:    middle_block_1..``middle_blocks``, width w(728):
                    3 separable units, + identity shortcut
    exit flow:      exit_block_1: separable w(728), separable w(1024) -> maxpool 3 s2,
                                  + shortcut conv 1x1 s2 + BN
                    exit_block_2: separable w(1536), separable w(2048) (no shortcut,
                                  as Xception's last two convolutions)
    multi-scale:    the outputs of the LAST THREE blocks (default: middle_block_8,
                    exit_block_1, exit_block_2, i.e. two time-frequency resolutions)
                    are each global-average-pooled (``scale_pool_1..3``, widths
                    w(728) + w(1024) + w(2048) = 3800 at width 1) and concatenated
                    (``multi_scale``) -> Dropout -> Dense softmax
Each block's output layer carries the block's name (``entry_block_1``, ...,
``exit_block_2``) and its separable convolutions are ``<block>_sep<j>``, so
tests can count blocks. ``multi_scale=False`` pools only the last block
(``scale_pool_1``, no Concatenate): the single-scale ablation.

``embedding_output=True`` gives a second output, named ``embedding`` (float32,
shape (batch, D)), after the class probabilities (``predictions``): the
concatenated multi-scale pooled vector (D = 3800 at width 1), or the single
pooled vector with ``multi_scale=False``. For a triplet or other metric loss.

The paper's settings (not model parameters, for the trainer): log-mel from a
4096-sample Hamming STFT with 75 % overlap, standardised on the training set;
SGD with Nesterov momentum, lr 0.1 with automatic decay, batch 128; focal loss
(gamma 3 for subtask A, 1 for B; per-class alpha 0.5-1.0). Reported:
multi-scale fusion +2.5 % relative accuracy over the last block alone.

Deviations: the paper's block widths are not given; these are Xception's
(ImageNet) widths, scaled by ``width``. Post-activation residual blocks (BN
then ReLU after each separable conv, the last ReLU after the addition) instead
of Xception's ReLU -> SeparableConv -> BN order. Dropout before the classifier
(Xception on ImageNet: 0.5).

Parameter counts (measured, 3 input channels, 10 classes; they do not depend
on the input's T x n_mels):
    width=1.0,   middle_blocks=8 (paper-like): 20,899,490 (= Keras' Xception
                 without top, 20,861,480, + the Dense 3800 -> 10 classifier)
    width=0.25,  middle_blocks=2 (quick):         741,434 (fused width 952)
    width=0.125, middle_blocks=2 (smaller):       189,842 (fused width 472)

Hyperparameters (defaults = the paper-like Xception settings):
    width=1.0               -- channel multiplier of every convolution
    middle_blocks=8         -- number of middle-flow blocks (0 = none)
    dropout=0.5             -- dropout on the pooled vector, before the classifier
    multi_scale=True        -- pool and concatenate the last three blocks (False: the last only)
    embedding_output=False  -- also output the pooled vector as ``embedding`` (second output)
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import make_input, softmax_head

N_SCALES = 3  # blocks fused by the multi-scale head


def _ch(c, width):
    """``c * width`` rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(c * width / 8.0)) * 8)


def _conv_bn_relu(x, filters, name, strides=1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=name)(x)


def _sep_units(x, widths, name, last_relu=True):
    """Separable units ``<name>_sep<j>`` -> BN -> ReLU; the last one's ReLU is
    left out when ``last_relu`` is False (it follows the residual addition)."""
    for j, f in enumerate(widths, start=1):
        x = layers.SeparableConv2D(f, 3, padding="same", use_bias=False,
                                   name=f"{name}_sep{j}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{j}")(x)
        if last_relu or j < len(widths):
            x = layers.Activation("relu", name=f"{name}_relu{j}")(x)
    return x


def _down_block(x, widths, name):
    """Separable units -> maxpool 3 s2, + projection shortcut (1x1 s2 + BN)."""
    shortcut = layers.Conv2D(widths[-1], 1, strides=2, padding="same", use_bias=False,
                             name=f"{name}_proj_conv")(x)
    shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _sep_units(x, widths, name, last_relu=False)
    y = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=name)(y)


def _middle_block(x, width, name):
    """Three separable units of the input's width, + identity shortcut."""
    y = _sep_units(x, (width,) * 3, name, last_relu=False)
    y = layers.Add(name=f"{name}_add")([y, x])
    return layers.Activation("relu", name=name)(y)


def build(input_shape, n_classes, width=1.0, middle_blocks=8, dropout=0.5,
          multi_scale=True, embedding_output=False) -> keras.Model:
    """Build the multi-scale Xception; output = class probabilities (batch, n_classes),
    plus the pooled ``embedding`` when ``embedding_output`` is True."""
    width = float(width)

    def c(n):
        return _ch(n, width)

    inputs, x = make_input(input_shape, min_rank=3)
    x = _conv_bn_relu(x, c(32), "stem_1", strides=2)
    x = _conv_bn_relu(x, c(64), "stem_2")
    blocks = []
    for i, f in enumerate((128, 256, 728), start=1):
        x = _down_block(x, (c(f), c(f)), f"entry_block_{i}")
        blocks.append(x)
    for i in range(1, int(middle_blocks) + 1):
        x = _middle_block(x, c(728), f"middle_block_{i}")
        blocks.append(x)
    x = _down_block(x, (c(728), c(1024)), "exit_block_1")
    blocks.append(x)
    x = _sep_units(x, (c(1536), c(2048)), "exit_block_2", last_relu=False)
    x = layers.Activation("relu", name="exit_block_2")(x)
    blocks.append(x)

    scales = blocks[-N_SCALES:] if multi_scale else blocks[-1:]
    pooled = [layers.GlobalAveragePooling2D(name=f"scale_pool_{i}")(b)
              for i, b in enumerate(scales, start=1)]
    h = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="multi_scale")(pooled)
    y = layers.Dropout(float(dropout), name="head_dropout")(h) if dropout else h
    probs = softmax_head(y, n_classes)
    if not embedding_output:
        return keras.Model(inputs, probs, name="xception_ms")
    embedding = layers.Activation("linear", dtype="float32", name="embedding")(h)
    return keras.Model(inputs, [probs, embedding], name="xception_ms")
