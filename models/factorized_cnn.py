"""Large-margin factorized CNN on mel sub-bands (the DCASE 2019 Task 1 system).

Input ``(T, n_mels, C)`` (paper: 40 or 200 mel bands, stereo C = 2; here the
cached log-mel + deltas, C = 3; a 2-D ``(T, n_feat)`` input gets a channel
axis). Any size >= 1 works ('same' padding, global pooling at the end).

Structure:
    sub-bands:  the mel axis is cut into overlapping bands of ``band_size`` bins
                with ``band_overlap`` bins of overlap (start every
                band_size - band_overlap bins); the last band is aligned to the
                top edge, so every bin is covered (48 mels -> 4 bands starting
                at 0, 10, 20, 28; 128 mels -> 12 bands; 40 -> 3; n_mels <=
                band_size -> 1 band of all bins). Band ``b`` (1-based) is cut
                out with a Cropping2D layer ``band_<b>_crop`` (no Lambda: saved
                models load in safe mode).
    per band (its own weights, layers ``band_<b>_*``), the DCASE 2019 baseline
    CNN with every k x k convolution factorized:
        layer 1: conv (k x 1) -> conv (1 x k), ``channels[0]`` filters each
                 -> BN -> ReLU -> maxpool ``pool`` ('same') -> Dropout
        layer 2: conv (k x 1) -> conv (1 x k), ``channels[1]`` filters each
                 -> BN -> ReLU -> global max pooling (``band_<b>_pool``)
                 -> Dropout -> Dense ``fc_units`` ReLU (``band_<b>_fc``) -> Dropout
    global classifier: the bands' FC outputs concatenated (``bands_concat``)
                 -> Dense softmax.
Kernels are (time, mel): (k x 1) runs along time, (1 x k) along mel. Convs
have no bias (BN follows); the first of each factorized pair is linear.

EMBEDDING: the final conv features of every band after pooling, before the FC
layers (the paper's triplet-loss input), concatenated over the bands
(``band_features``): D = n_bands x channels[-1] (48 mels, defaults: 4 x 64 =
256). ``embedding_output=True`` adds it as a second output named
``embedding`` (float32, (batch, D)) after the class probabilities
(``predictions``); the paper trains with CE + 10 x triplet(margin 0.2) on it.

The paper's settings (for the trainer, not model parameters): Adam lr 1e-3,
200 epochs; triplet loss with anchor/positive from the same class but another
city, random negatives; SpecAugment, no mixup (mixed labels break triplets).

Deviations: the baseline's second pooling (4 x 100 on a 500-frame, 40-band
input, i.e. nearly everything) is a global max pooling here, so any clip
length works; the paper's channels are 2 -> 64 -> 64 (40 bands) or
2 -> 32 -> 64 (200 bands), the default is the latter (the baseline's).

Parameter counts (measured, 3 input channels, 10 classes):
    48 mels,  defaults (4 bands):                               234,938
    128 mels, defaults (12 bands):                              704,794
    48 mels,  channels=(16, 32), fc_units=64 (smaller, 4 bands): 63,306

Hyperparameters (defaults = the paper's / DCASE 2019 baseline's settings):
    band_size=20            -- mel bins per sub-band
    band_overlap=10         -- bins shared by neighbouring sub-bands
    kernel=7                -- k of the factorized (k x 1) + (1 x k) convolutions
    channels=(32, 64)       -- filters of the two conv layers of each band
    pool=(5, 5)             -- max pooling after the first conv layer (time, mel)
    fc_units=100            -- units of each band's FC layer
    dropout=0.3             -- dropout after each pooling and each band's FC
    embedding_output=False  -- also output the concatenated band features as ``embedding``
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import make_input, softmax_head


def band_starts(n_mels, band_size=20, band_overlap=10):
    """First mel bin of each sub-band (the last one aligned to the top edge)."""
    n_mels, size, overlap = int(n_mels), int(band_size), int(band_overlap)
    if not 0 <= overlap < size:
        raise ValueError(f"band_overlap must be in [0, band_size), got {overlap} for {size}")
    if n_mels <= size:
        return [0]
    step = size - overlap
    starts = list(range(0, n_mels - size, step))
    return starts + [n_mels - size]


def _factorized_conv(x, filters, k, name):
    x = layers.Conv2D(filters, (k, 1), padding="same", use_bias=False, name=f"{name}_conv_a")(x)
    x = layers.Conv2D(filters, (1, k), padding="same", use_bias=False, name=f"{name}_conv_b")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build(input_shape, n_classes, band_size=20, band_overlap=10, kernel=7,
          channels=(32, 64), pool=(5, 5), fc_units=100, dropout=0.3,
          embedding_output=False) -> keras.Model:
    """Build the factorized sub-band CNN; output = class probabilities (batch, n_classes),
    plus the concatenated band ``embedding`` when ``embedding_output`` is True."""
    c1, c2 = (int(c) for c in channels)
    k = int(kernel)
    inputs, x = make_input(input_shape, min_rank=3)
    n_mels = x.shape[2]
    if n_mels is None:
        raise ValueError(f"the mel axis of input_shape {tuple(input_shape)} must be known")
    size = min(int(band_size), n_mels)
    features, fcs = [], []
    for b, start in enumerate(band_starts(n_mels, band_size, band_overlap), start=1):
        p = f"band_{b}"
        h = layers.Cropping2D(((0, 0), (start, n_mels - start - size)), name=f"{p}_crop")(x)
        h = _factorized_conv(h, c1, k, f"{p}_layer1")
        h = layers.MaxPooling2D(tuple(int(s) for s in pool), padding="same", name=f"{p}_pool1")(h)
        if dropout:
            h = layers.Dropout(dropout, name=f"{p}_dropout1")(h)
        h = _factorized_conv(h, c2, k, f"{p}_layer2")
        h = layers.GlobalMaxPooling2D(name=f"{p}_pool")(h)
        features.append(h)
        if dropout:
            h = layers.Dropout(dropout, name=f"{p}_dropout2")(h)
        h = layers.Dense(int(fc_units), activation="relu", name=f"{p}_fc")(h)
        if dropout:
            h = layers.Dropout(dropout, name=f"{p}_dropout3")(h)
        fcs.append(h)
    h = fcs[0] if len(fcs) == 1 else layers.Concatenate(name="bands_concat")(fcs)
    probs = softmax_head(h, n_classes)
    if not embedding_output:
        return keras.Model(inputs, probs, name="factorized_cnn")
    emb = features[0] if len(features) == 1 else layers.Concatenate(name="band_features")(features)
    emb = layers.Activation("linear", dtype="float32", name="embedding")(emb)
    return keras.Model(inputs, [probs, emb], name="factorized_cnn")
