"""Tests of the ``mini_segnet`` builder (Mini-SegNet + Mixup Normalization +
event extraction block, DCASE 2020 Task 1A) and its custom layers.

Cheap on 2 CPU cores: the paper-size model (342 k parameters) is only built;
forward passes and the training step use tiny inputs and ``width=0.125``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from helpers import assert_defaults_read_without_keras  # noqa: E402
from models.mini_segnet import CropTo, EventExtraction, MixupNorm  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

N_CLASSES = 5
SHAPE = (16, 12, 3)
TINY = dict(width=0.125, dense_units=16)
RNG = np.random.default_rng(0)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _x(n=2, shape=SHAPE):
    return RNG.standard_normal((n,) + tuple(shape)).astype("float32")


def _count(model, pattern, cls=None):
    return sum(1 for layer in model.layers if re.fullmatch(pattern, layer.name)
               and (cls is None or isinstance(layer, cls)))


def _check_probs(y, n, n_classes=N_CLASSES):
    y = _np(y)
    assert y.shape == (n, n_classes)
    assert y.dtype == np.float32
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ MixupNorm
def _instance_norm(x, eps=1e-5):
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def test_mixup_norm_matches_numpy():
    x = (RNG.standard_normal((3, 6, 5, 4)) * [1.0, 3.0, 0.5, 10.0] + [0.0, 5.0, -2.0, 1.0])
    x = x.astype("float32")
    # lam = 0: plain instance norm, per sample and channel mean 0, std 1
    y0 = _np(MixupNorm(lam=0.0)(x))
    np.testing.assert_allclose(y0, _instance_norm(x.astype("float64")), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y0.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y0.std(axis=(1, 2)), 1.0, atol=1e-3)
    # lam = 1: the identity
    np.testing.assert_allclose(_np(MixupNorm(lam=1.0)(x)), x, rtol=1e-6, atol=1e-6)
    # lam = 0.1 (the paper's best): the mix
    want = 0.1 * x + 0.9 * _instance_norm(x.astype("float64"))
    np.testing.assert_allclose(_np(MixupNorm(lam=0.1)(x)), want, rtol=1e-4, atol=1e-5)
    # deterministic and the same in training and inference
    layer = MixupNorm(lam=0.1)
    np.testing.assert_array_equal(_np(layer(x, training=True)), _np(layer(x, training=False)))
    assert layer.count_params() == 0
    assert MixupNorm.from_config(layer.get_config()).lam == pytest.approx(0.1)


# ------------------------------------------------------------ event extraction
def _event_numpy(x, k):
    """Reference: argmax per position (first on ties), counts, stable sort."""
    n, c = x.shape[0], x.shape[-1]
    s = np.argmax(x, axis=-1).reshape(n, -1)
    counts = np.stack([np.bincount(row, minlength=c) for row in s])
    top = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    return counts, top, np.concatenate([x.mean(axis=(1, 2)), top / c], axis=1)


def _hand_made():
    """(2, 2, 3, 5): sample 0's max channels per position are
    [[2, 2, 0], [0, 4, 1]] (the last position ties channels 1 and 3 -> 1);
    sample 1 is all zeros (every position ties -> channel 0)."""
    x = np.zeros((2, 2, 3, 5), dtype="float32")
    winners = [[2, 2, 0], [0, 4, 1]]
    for f in range(2):
        for t in range(3):
            x[0, f, t] = RNG.uniform(-1.0, 0.5, 5)
            x[0, f, t, winners[f][t]] = 1.0 + f + t
    x[0, 1, 2, 3] = x[0, 1, 2, 1]  # tie between channels 1 and 3
    return x


def test_event_extraction_matches_numpy_with_ties():
    x = _hand_made()
    layer = EventExtraction(k=4)
    counts = _np(layer.channel_counts(x))
    np.testing.assert_array_equal(counts, [[2, 1, 2, 0, 1], [6, 0, 0, 0, 0]])
    top = _np(layer.top_channels(x))
    # ties: counts 2 (channels 0, 2) then 1 (channels 1, 4), lower index first
    np.testing.assert_array_equal(top, [[0, 2, 1, 4], [0, 1, 2, 3]])
    out = _np(layer(x))
    assert out.shape == (2, 5 + 4)
    ref_counts, ref_top, ref_out = _event_numpy(x, 4)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 5:], [0.0, 0.4, 0.2, 0.8])


def test_event_extraction_random_and_errors():
    x = RNG.standard_normal((3, 7, 9, 8)).astype("float32")
    _, _, ref = _event_numpy(x, 3)
    np.testing.assert_allclose(_np(EventExtraction(k=3)(x)), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="top_k=9 exceeds"):
        EventExtraction(k=9)(x)
    assert EventExtraction.from_config(EventExtraction(k=3).get_config()).k == 3


def test_crop_to():
    x = np.arange(2 * 6 * 9 * 2, dtype="float32").reshape(2, 6, 9, 2)
    ref = np.zeros((2, 5, 7, 3), dtype="float32")
    np.testing.assert_array_equal(_np(CropTo()([x, ref])), x[:, :5, :7, :])


# ---------------------------------------------------------------------- builder
def test_registry_and_defaults_without_keras():
    assert "mini_segnet" in models.BUILDERS
    assert models.embedding_capable("mini_segnet")
    assert_defaults_read_without_keras("mini_segnet")
    assert models.builder_defaults("mini_segnet") == dict(
        width=1.0, kernel_size=[2, 3], pool_size=[2, 3], norm="mixup", decoder_norm="batch", mixup_lambda=0.1,
        pooling="event", top_k=4, dense_units=512, dropout=0.3, embedding_output=False)


def test_paper_size_structure_and_parameters():
    m = models.build_model("mini_segnet", (400, 256, 3), 18)  # build only, never run
    conv = keras.layers.Conv2D
    assert _count(m, r"enc_.*", conv) == 3
    assert _count(m, r"dec_.*", conv) == 2
    assert [layer.filters for layer in m.layers if isinstance(layer, conv)] == [64, 128, 128, 128, 64]
    assert all(layer.kernel_size == (2, 3) for layer in m.layers if isinstance(layer, conv))
    assert _count(m, r".*", MixupNorm) == 1  # enc_1 (the decoder's norm is BN by default: see decoder_norm)
    assert _count(m, r"dec_\d_norm", keras.layers.BatchNormalization) == 2
    paper = models.build_model("mini_segnet", (400, 256, 3), 18, decoder_norm="mixup")
    assert _count(paper, r".*", MixupNorm) == 3  # the paper's: enc_1 and both decoder stages
    assert _count(m, r"enc_2_bn\d", keras.layers.BatchNormalization) == 2
    assert _count(m, r".*", keras.layers.MaxPooling2D) == 2
    assert _count(m, r".*", keras.layers.UpSampling2D) == 2
    assert m.get_layer("enc_2_pool").output.shape[1:] == (100, 29, 128)
    assert m.get_layer("dec_2_relu").output.shape[1:] == (400, 256, 64)  # back to the input
    assert m.get_layer("pooled").output.shape[1:] == (64 + 4,)
    assert len([layer for layer in m.layers if isinstance(layer, keras.layers.Dense)]) == 2
    assert m.count_params() == 342_482
    assert models.build_model("mini_segnet", (64, 48, 3), 18).count_params() == 342_482
    assert m.output_shape == (None, 18)


@pytest.mark.parametrize("pooling, width", [("event", 8 + 4), ("gap", 8)])
def test_pooling_widths_and_probabilities(pooling, width):
    m = models.build_model("mini_segnet", SHAPE, N_CLASSES, pooling=pooling, **TINY)
    assert m.get_layer("pooled").output.shape[1:] == (width,)
    assert isinstance(m.get_layer("pooled"),
                      EventExtraction if pooling == "event" else keras.layers.GlobalAveragePooling2D)
    _check_probs(m(_x(3), training=False), 3)


@pytest.mark.parametrize("shape", [(37, 29, 3), (1, 1, 3), (5, 2, 3), (37, 29)])
def test_odd_input_sizes(shape):
    m = models.build_model("mini_segnet", shape, N_CLASSES, **TINY)
    full = shape if len(shape) == 3 else shape + (1,)
    assert m.get_layer("dec_2_relu").output.shape[1:3] == full[:2]
    _check_probs(m(_x(2, shape), training=False), 2)


def test_variable_time_length():
    m = models.build_model("mini_segnet", (None, 20, 3), N_CLASSES, **TINY)
    for t in (7, 31):
        _check_probs(m(_x(2, (t, 20, 3)), training=False), 2)


def test_batch_norm_variant_and_bad_options():
    m = models.build_model("mini_segnet", SHAPE, N_CLASSES, norm="batch", **TINY)
    assert _count(m, r".*", MixupNorm) == 0
    assert _count(m, r".*", keras.layers.BatchNormalization) == 5
    for bad in (dict(norm="layer"), dict(pooling="max"), dict(kernel_size=(2, 0))):
        with pytest.raises(ValueError):
            models.build_model("mini_segnet", SHAPE, N_CLASSES, **TINY, **bad)


def test_save_and_load_round_trip(tmp_path):
    m = models.build_model("mini_segnet", (21, 13, 3), N_CLASSES, embedding_output=True, **TINY)
    path = tmp_path / "mini_segnet.keras"
    m.save(path)
    loaded = models.load_model(path, compile=False)
    assert loaded.output_names == ["predictions", "embedding"]
    assert loaded.get_layer("enc_1_norm").lam == pytest.approx(0.1)
    x = _x(2, (21, 13, 3))
    for a, b in zip(m(x, training=False), loaded(x, training=False)):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert _np(m(x, training=False)[1]).shape == (2, 12)


def test_train_step():
    m = models.build_model("mini_segnet", SHAPE, N_CLASSES, **TINY)
    x = _x(4)
    y = np.eye(N_CLASSES, dtype="float32")[[0, 1, 2, 3]]
    m.compile(optimizer="adam", loss="categorical_crossentropy")
    before = [w.copy() for w in m.get_weights()]
    loss = float(np.asarray(m.train_on_batch(x, y)).ravel()[0])
    assert np.isfinite(loss)
    changed = [not np.array_equal(a, b) for a, b in zip(before, m.get_weights())]
    assert sum(changed) >= len(m.trainable_weights) - 1  # the convs and dense layers all move
