"""VGGish (AudioSet feature model) in Keras 3, and its fine-tune classifier.

Embedding model (``build_vggish_embedding``), faithful to the reference
``vggish_slim.py``: input a (96, 64) log-mel patch (0.96 s, 64 mel bands); a
Reshape adds the channel axis; then
    conv1 64 -> pool1 -> conv2 128 -> pool2 -> conv3_1 256 -> conv3_2 256 ->
    pool3 -> conv4_1 512 -> conv4_2 512 -> pool4 -> flatten (6*4*512 = 12288)
    -> fc1_1 4096 -> fc1_2 4096 -> fc2 128
3x3 convs with 'same' padding, bias and ReLU; 2x2 max pools stride 2 'same';
fc1_* with ReLU; fc2 is linear (the 128-d embedding is taken before any
activation). Layer names equal the checkpoint scopes' last component so
``models.vggish_weights.load_vggish_checkpoint`` can map
``vggish/conv3/conv3_1/weights`` -> layer ``conv3_1``. Kernel layouts
(HWIO conv kernels, (in, out) dense kernels, HWC flatten order) are the same
in TF-slim and Keras, so the reference weights load without transposes.
72,141,184 parameters at width 1.0.

Fine-tune classifier (``build``), as in the paper ("add Dense(100) +
softmax(41) on top") and the reference ``vggish_train_demo.py``, which
applies a ReLU to the (pre-activation) embedding before its hidden
fully-connected layer (ReLU) and the classifier:
    patch -> vggish (sub-model named "vggish") -> ReLU -> Dense(hidden) ReLU -> Dense softmax
Extract the fine-tuned extractor with ``model.get_layer("vggish")``.

Hyperparameters (defaults = the paper's / reference settings):
    hidden=100                -- units of the hidden Dense layer on top of the embedding (0 = none)
    width=1.0                 -- channel multiplier for the convs and fc1_* (1.0 = faithful VGGish)
    embedding_size=128        -- size of the fc2 embedding (reference: 128)
    checkpoint=None           -- optional path of the reference ``vggish_model.ckpt`` to load (needs TF, width=1)
    trainable_embedding=True  -- fine-tune the VGGish layers (False = frozen extractor)
    dropout=0.0               -- dropout before the hidden and output Dense layers (paper: none)
"""

from __future__ import annotations

import keras
from keras import layers

from models._common import softmax_head

# (layer name, base channels) in order; "pool" entries are 2x2 max pools.
_CONV_PLAN = (("conv1", 64), ("pool1", None), ("conv2", 128), ("pool2", None),
              ("conv3_1", 256), ("conv3_2", 256), ("pool3", None),
              ("conv4_1", 512), ("conv4_2", 512), ("pool4", None))
_FC_PLAN = (("fc1_1", 4096), ("fc1_2", 4096))
LAYER_NAMES = ("conv1", "conv2", "conv3_1", "conv3_2", "conv4_1", "conv4_2",
               "fc1_1", "fc1_2", "fc2")

def _scaled(c, width):
    return max(1, int(round(c * float(width))))

def build_vggish_embedding(input_shape=(96, 64), width=1.0, embedding_size=128,
                           name="vggish") -> keras.Model:
    """Patch (96, 64) -> 128-d embedding (linear fc2 output), ~72 M params."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3 and shape[-1] == 1:
        shape2d = shape[:2]
    elif len(shape) == 2:
        shape2d = shape
    else:
        raise ValueError(f"VGGish input must be (frames, bands) or (frames, bands, 1), got {shape}")
    inputs = keras.Input(shape=shape, name="log_mel_patch")
    x = layers.Reshape(shape2d + (1,), name="add_channel")(inputs)
    for lname, ch in _CONV_PLAN:
        if ch is None:
            x = layers.MaxPooling2D(2, strides=2, padding="same", name=lname)(x)
        else:
            x = layers.Conv2D(_scaled(ch, width), 3, padding="same", activation="relu",
                              name=lname)(x)
    x = layers.Flatten(name="flatten")(x)
    for lname, units in _FC_PLAN:
        x = layers.Dense(_scaled(units, width), activation="relu", name=lname)(x)
    # No activation: the reference embedding is the pre-activation fc2 output.
    x = layers.Dense(int(embedding_size), activation=None, name="fc2")(x)
    return keras.Model(inputs, x, name=name)

def build(input_shape, n_classes, hidden=100, width=1.0, embedding_size=128,
          checkpoint=None, trainable_embedding=True, dropout=0.0) -> keras.Model:
    """VGGish fine-tune classifier; output = class probabilities (batch, n_classes)."""
    embedding = build_vggish_embedding(input_shape, width=width,
                                       embedding_size=embedding_size, name="vggish")
    if checkpoint:
        from models.vggish_weights import load_vggish_checkpoint
        load_vggish_checkpoint(embedding, checkpoint)
    embedding.trainable = bool(trainable_embedding)
    inputs = keras.Input(shape=tuple(int(d) for d in input_shape), name="patch")
    x = embedding(inputs)
    # The embedding is pre-activation; the reference train demo adds a ReLU.
    x = layers.Activation("relu", name="embedding_relu")(x)
    if hidden:
        if dropout:
            x = layers.Dropout(dropout, name="hidden_dropout")(x)
        x = layers.Dense(int(hidden), activation="relu", name="hidden")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = softmax_head(x, n_classes)
    return keras.Model(inputs, outputs, name="vggish_classifier")
