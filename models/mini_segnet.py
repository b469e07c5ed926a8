"""Mini-SegNet with Mixup Normalization and the event extraction block
(the DCASE 2020 Task 1A acoustic-scene system).

Input ``(T, n_mels, C)`` (paper: 400 frames x 256 mel bins, log-mel + delta +
delta-delta as 3 channels; a 2-D ``(T, n_feat)`` input gets a channel axis).
``k`` = ``kernel_size`` (default 2x3), ``p`` = ``pool_size`` (default 2x3),
both over the input's (T, n_mels) axes; ``w(c)`` = ``c * width`` rounded to a
multiple of 8 (at least 8); "norm" = ``MixupNorm`` (or BN with ``norm="batch"``).

Structure (every conv 'same', stride 1):
    enc_1:   conv k w(64) -> norm -> ReLU -> maxpool p ('same')
    enc_2:   [conv k w(128) -> BN -> ReLU] x 2 -> maxpool p ('same')
    dec_1:   upsample p -> crop to enc_2's input shape -> conv k w(128) -> norm -> ReLU
    dec_2:   upsample p -> crop to enc_1's input shape -> conv k w(64) -> norm -> ReLU
    head:    ``pooling="event"``: EventExtraction(top_k) -> (N, w(64) + top_k)
             ``pooling="gap"``:   global average pooling  -> (N, w(64))
             -> Dense(dense_units) -> ReLU -> Dropout -> Dense(n_classes) softmax
Layers: ``enc_1_conv/_norm/_relu/_pool``, ``enc_2_conv<j>/_bn<j>/_relu<j>``,
``enc_2_pool``, ``dec_<i>_up/_crop/_conv/_norm/_relu``, ``pooled`` (the head's
pooling layer, either kind), ``fc/fc_relu/fc_dropout``, ``predictions``.

Shapes: a 'same' max-pool of size p gives ceil(n / p) per axis (never below
1), the nearest-neighbour upsampling gives p * ceil(n / p) >= n, and
``CropTo`` cuts that back to the matching encoder stage's shape (the first
rows/columns are kept). So the decoder returns to the input's T x n_mels
resolution for ANY input size >= 1 (also an unknown time length: the crop is
read from the reference tensor at run time).

MixupNorm(x) = lam * x + (1 - lam) * IN(x), IN = instance normalisation per
sample and channel: (x - mean) / sqrt(var + eps), mean and var over the two
spatial axes. No learned scale/shift (as PyTorch's InstanceNorm2d default) and
no randomness: the same in training and inference. lam = 0 is plain IN, 1 the
identity; the paper's best lam = 0.1. Computed in float32.

EventExtraction (input (N, F, T, C)): S[f, t] = the channel of the maximum
value at position (f, t) (ties: the lowest channel); count[c] = #positions
with S = c; Y = the ``top_k`` channels with the largest counts, most frequent
first (ties: the lower channel first), divided by C; output = concat(global
average over (F, T) -> C values, Y -> top_k values). Y is made of indices and
carries no gradient (the paper's design); gradients flow through the average.

The paper's settings (not model parameters, for the trainer): 2048-sample
Hann window, hop 1024, 256 mel bins, log-mel + deltas, random crops of 400
frames; SGD momentum 0.9 with warm-restart cosine schedule (max lr 0.1,
restarts after 11, 31, 71, 151, 311 epochs); mixup. Reported: 478 k parameters.

Deviations / choices (the description leaves them open):
  * the second max-pool (after the two 128-channel convs): the decoder's two
    upsamplings mirror two encoder poolings, as in SegNet;
  * nearest-neighbour upsampling (``UpSampling2D``), not SegNet's
    index-based max-unpooling; the crop after it keeps shapes consistent;
  * the decoder convs use the encoder's kernel (2x3); biases only on the convs
    followed by MixupNorm (BN has its own shift);
  * "two dense layers with dropout": Dense(dense_units) + ReLU + Dropout, then
    the Dense softmax classifier; dense_units=512 and dropout=0.3 are our
    choices (the paper's dense widths are not given, so its 478 k parameters
    are not matched exactly).

Parameter counts (measured; they do not depend on T x n_mels):
    width=1.0, 18 classes, 3 channels: 342,482 at 400 x 256 x 3 and at 64 x 48 x 3
                                       (341,906 with the paper's MixupNorm in the decoder too)
    width=1.0, 10 classes:             338,378 (the paper reports 478 k)
    width=1.0, pooling="gap", 18 cl.:  340,434
    width=0.125, dense_units=16, 18 classes (quick tests): 5,498
Compute: about 9.4 G multiply-adds per 400 x 256 example (dec_2's conv at
full resolution alone 5.0 G); inference about 0.16 s per example on the
project's 2-core CPU (TensorFlow, batch 4).

``embedding_output=True`` gives a second output, named ``embedding`` (float32,
(batch, D)), after the class probabilities: the pooled vector (D = w(64) +
top_k for "event", w(64) for "gap").

Hyperparameters (defaults = the paper's settings where it gives them):
    width=1.0               -- channel multiplier of every convolution
    kernel_size=(2, 3)      -- conv kernel over (T, n_mels)
    pool_size=(2, 3)        -- max-pool / upsampling factor over (T, n_mels)
    norm="mixup"            -- norm of enc_1: "mixup" (MixupNorm) or "batch" (BN)
    decoder_norm="batch"    -- norm of the two decoder blocks. Deviation: the paper uses its "norm" there
                               too, but MixupNorm (no learned scale or shift) right before the global
                               pooling leaves each channel's mean near a constant, so the pooled features
                               carry little: on the demo (width 0.5, 8 epochs) test MAP@3 0.27 with
                               MixupNorm in the decoder against 0.75 with BN (README)
    mixup_lambda=0.1        -- MixupNorm's lambda (0 = instance norm, 1 = identity)
    pooling="event"         -- "event" (event extraction block) or "gap" (global average pooling)
    top_k=4                 -- k most frequent max-channels of the event block
    dense_units=512         -- units of the hidden dense layer
    dropout=0.3             -- dropout after the hidden dense layer
    embedding_output=False  -- also output the pooled vector as ``embedding`` (second output)
"""

from __future__ import annotations

import keras
from keras import layers, ops

from models._common import make_input, softmax_head


@keras.saving.register_keras_serializable(package="audio_tagging")
class MixupNorm(layers.Layer):
    """lam * x + (1 - lam) * instance_norm(x) over the spatial axes (1, 2) of
    an (N, H, W, C) tensor; no weights, deterministic."""

    def __init__(self, lam=0.1, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.lam = float(lam)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=(1, 2), keepdims=True)
        normed = (x - mean) / ops.sqrt(var + self.epsilon)
        out = self.lam * x + (1.0 - self.lam) * normed
        return ops.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(lam=self.lam, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="audio_tagging")
class CropTo(layers.Layer):
    """``CropTo()([x, ref])``: x's first ref.shape[1] x ref.shape[2] positions
    (x must be at least that large; channels are x's)."""

    def call(self, inputs):
        x, ref = inputs
        shape = ops.shape(ref)
        return x[:, : shape[1], : shape[2], :]

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="audio_tagging")
class EventExtraction(layers.Layer):
    """(N, F, T, C) -> (N, C + k): concat(mean over (F, T), the k most frequent
    per-position argmax channels / C). See the module docstring."""

    def __init__(self, k=4, **kwargs):
        super().__init__(**kwargs)
        self.k = int(k)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and self.k > channels:
            raise ValueError(f"top_k={self.k} exceeds the {channels} channels")
        self.built = True

    def channel_counts(self, inputs):
        """(N, C) int32: per channel, the number of positions where it is the
        maximum (ties between channels go to the lowest channel)."""
        x = ops.stop_gradient(inputs)
        c = ops.shape(x)[-1]
        idx = ops.arange(c, dtype="int32")
        is_max = ops.equal(x, ops.max(x, axis=-1, keepdims=True))
        s = ops.min(ops.where(is_max, idx, c), axis=-1)  # (N, F, T): argmax, lowest on ties
        one_hot = ops.cast(ops.equal(ops.expand_dims(s, -1), idx), "int32")
        return ops.sum(one_hot, axis=(1, 2))

    def top_channels(self, inputs):
        """(N, k) int32: the k most frequent max-channels, ties to the lower index."""
        counts = self.channel_counts(inputs)
        c = ops.shape(counts)[-1]
        # count * C + (C - 1 - index): unique keys, so top_k is deterministic on
        # every backend and equal counts rank the lower channel first.
        keys = counts * c + (c - 1 - ops.arange(c, dtype="int32"))
        _, top = ops.top_k(keys, k=self.k, sorted=True)
        return top

    def call(self, inputs):
        gap = ops.mean(inputs, axis=(1, 2))
        c = ops.shape(inputs)[-1]
        y = ops.cast(self.top_channels(inputs), gap.dtype) / ops.cast(c, gap.dtype)
        return ops.concatenate([gap, ops.stop_gradient(y)], axis=-1)

    def compute_output_shape(self, input_shape):
        c = input_shape[-1]
        return (input_shape[0], None if c is None else c + self.k)

    def get_config(self):
        config = super().get_config()
        config.update(k=self.k)
        return config


def _ch(c, width):
    """``c * width`` rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(c * width / 8.0)) * 8)


def _pair(v, name):
    v = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return v


def build(input_shape, n_classes, width=1.0, kernel_size=(2, 3), pool_size=(2, 3),
          norm="mixup", decoder_norm="batch", mixup_lambda=0.1, pooling="event", top_k=4,
          dense_units=512, dropout=0.3, embedding_output=False) -> keras.Model:
    """Build Mini-SegNet; output = class probabilities (batch, n_classes), plus
    the pooled ``embedding`` when ``embedding_output`` is True."""
    for key, value in (("norm", norm), ("decoder_norm", decoder_norm)):
        if value not in ("mixup", "batch"):
            raise ValueError(f"{key} must be 'mixup' or 'batch', got {value!r}")
    if pooling not in ("event", "gap"):
        raise ValueError(f"pooling must be 'event' or 'gap', got {pooling!r}")
    kernel = _pair(kernel_size, "kernel_size")
    pool = _pair(pool_size, "pool_size")
    width = float(width)
    def conv_norm_relu(x, filters, name, kind):
        mixup = kind == "mixup"
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=mixup, name=f"{name}_conv")(x)
        if mixup:
            x = MixupNorm(mixup_lambda, name=f"{name}_norm")(x)
        else:
            x = layers.BatchNormalization(name=f"{name}_norm")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    inputs, x = make_input(input_shape, min_rank=3)
    skip_1 = x
    x = conv_norm_relu(x, _ch(64, width), "enc_1", norm)
    x = layers.MaxPooling2D(pool, padding="same", name="enc_1_pool")(x)
    skip_2 = x
    for j in (1, 2):
        x = layers.Conv2D(_ch(128, width), kernel, padding="same", use_bias=False,
                          name=f"enc_2_conv{j}")(x)
        x = layers.BatchNormalization(name=f"enc_2_bn{j}")(x)
        x = layers.Activation("relu", name=f"enc_2_relu{j}")(x)
    x = layers.MaxPooling2D(pool, padding="same", name="enc_2_pool")(x)
    for i, (filters, ref) in enumerate(((_ch(128, width), skip_2), (_ch(64, width), skip_1)),
                                       start=1):
        x = layers.UpSampling2D(pool, name=f"dec_{i}_up")(x)
        x = CropTo(name=f"dec_{i}_crop")([x, ref])
        x = conv_norm_relu(x, filters, f"dec_{i}", decoder_norm)

    if pooling == "event":
        pooled = EventExtraction(top_k, name="pooled")(x)
    else:
        pooled = layers.GlobalAveragePooling2D(name="pooled")(x)
    h = layers.Dense(int(dense_units), name="fc")(pooled)
    h = layers.Activation("relu", name="fc_relu")(h)
    if dropout:
        h = layers.Dropout(dropout, name="fc_dropout")(h)
    outputs = softmax_head(h, n_classes)
    if embedding_output:
        embedding = layers.Activation("linear", dtype="float32", name="embedding")(pooled)
        return keras.Model(inputs, [outputs, embedding], name="mini_segnet")
    return keras.Model(inputs, outputs, name="mini_segnet")
