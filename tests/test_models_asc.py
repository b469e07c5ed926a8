"""Tests of the acoustic-scene builders ``xception_ms`` and ``factorized_cnn``
(and their optional second output, the ``embedding``).

Cheap on 2 CPU cores: the paper-size Xception (20.9 M parameters) is only
built, never run; forward passes and training steps use tiny inputs and
slim widths, and the training steps run eagerly (tracing their graphs alone
costs 5-10 s).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from helpers import assert_defaults_read_without_keras  # noqa: E402
from models.factorized_cnn import band_starts  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

N_CLASSES = 5
SHAPE = (32, 48, 3)
RNG = np.random.default_rng(0)
TINY = {
    "xception_ms": dict(width=0.125, middle_blocks=2),
    "factorized_cnn": dict(channels=(8, 16), fc_units=16),
}


def _count(model, pattern):
    return sum(1 for layer in model.layers if re.fullmatch(pattern, layer.name))


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _x(n=4, shape=SHAPE):
    return RNG.standard_normal((n,) + tuple(shape)).astype("float32")


def _check_probs(y, n=4, n_classes=N_CLASSES):
    y = _np(y)
    assert y.shape == (n, n_classes)
    assert y.dtype == np.float32
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)


def _of_type(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


# ------------------------------------------------------------------ registry
def test_registry_embedding_capable_and_defaults_without_keras():
    assert {"xception_ms", "factorized_cnn"} <= set(models.BUILDERS)
    assert models.embedding_capable("xception_ms")
    assert models.embedding_capable("factorized_cnn")
    for name in ("cnn_ref", "wave1d", "inception2d", "vggish", "mla"):
        assert not models.embedding_capable(name)
    with pytest.raises(ValueError, match="unknown model"):
        models.embedding_capable("nope")
    assert_defaults_read_without_keras("xception_ms", "factorized_cnn")
    assert models.builder_defaults("xception_ms") == dict(
        width=1.0, middle_blocks=8, dropout=0.5, multi_scale=True, embedding_output=False)
    assert models.builder_defaults("factorized_cnn") == dict(
        band_size=20, band_overlap=10, kernel=7, channels=[32, 64], pool=[5, 5],
        fc_units=100, dropout=0.3, embedding_output=False)


# -------------------------------------------------------------- xception_ms
def test_xception_ms_paper_size_structure():
    m = models.build_model("xception_ms", (469, 128, 3), 10)  # build only, never run
    assert _count(m, r"entry_block_\d+") == 3
    assert _count(m, r"middle_block_\d+") == 8
    assert _count(m, r"exit_block_\d+") == 2
    seps = _of_type(m, keras.layers.SeparableConv2D)
    assert len(seps) == 3 * 2 + 8 * 3 + 2 * 2
    for flow, n in (("entry", 6), ("middle", 24), ("exit", 4)):
        assert sum(s.name.startswith(f"{flow}_block_") for s in seps) == n
    # residual shortcuts: 1x1 stride-2 projections where the shape changes
    projs = [l for l in m.layers if l.name.endswith("_proj_conv")]
    assert len(projs) == 4
    assert all(p.kernel_size == (1, 1) and p.strides == (2, 2) for p in projs)
    assert _count(m, r"\w+_add") == 3 + 8 + 1
    # multi-scale fusion of the last three blocks
    concat = m.get_layer("multi_scale")
    assert len(concat.input) == 3
    pooled = _of_type(m, keras.layers.GlobalAveragePooling2D)
    assert len(pooled) == 3
    widths = [p.output.shape[-1] for p in pooled]
    assert widths == [728, 1024, 2048]
    assert sum(widths) == concat.output.shape[-1] == 3800
    names = [layer.name for layer in m.layers]
    sources = [t._keras_history[0].name for t in (p.input for p in pooled)]
    assert sources == ["middle_block_8", "exit_block_1", "exit_block_2"]
    assert names.index("exit_block_2") > names.index("exit_block_1") > names.index("middle_block_8")
    n = m.count_params()
    print(f"xception_ms params at width 1.0, 8 middle blocks, 10 classes: {n:,}")
    assert n == 20_899_490  # Keras' Xception without top (20,861,480) + Dense 3800 -> 10


def test_xception_ms_single_scale_and_small_inputs():
    m = models.build_model("xception_ms", SHAPE, N_CLASSES, multi_scale=False,
                           embedding_output=True, **TINY["xception_ms"])
    assert len(_of_type(m, keras.layers.GlobalAveragePooling2D)) == 1
    assert not _of_type(m, keras.layers.Concatenate)
    assert m.outputs[1].shape[1:] == (256,)  # 2048 x 0.125 of exit_block_2 only
    assert _count(m, r"middle_block_\d+") == 2
    # no middle flow: the last three blocks are entry_block_3, exit_block_1, exit_block_2
    m0 = models.build_model("xception_ms", SHAPE, N_CLASSES, width=0.125, middle_blocks=0)
    assert _count(m0, r"middle_block_\d+") == 0
    assert m0.get_layer("multi_scale").output.shape[-1] == 88 + 128 + 256
    # tiny inputs never collapse below 1 ('same' padding, ceil at every stride)
    for shape in ((1, 1, 3), (5, 3, 3)):
        mt = models.build_model("xception_ms", shape, N_CLASSES, **TINY["xception_ms"])
        assert mt.get_layer("exit_block_2").output.shape[1:3] == (1, 1)
        _check_probs(mt(_x(2, shape), training=False), n=2)


# ----------------------------------------------------------- factorized_cnn
@pytest.mark.parametrize("n_mels, expected", [
    (48, [0, 10, 20, 28]),
    (128, list(range(0, 101, 10)) + [108]),
    (40, [0, 10, 20]),
    (20, [0]),
    (7, [0]),
])
def test_band_starts_cover_every_bin(n_mels, expected):
    starts = band_starts(n_mels, 20, 10)
    assert starts == expected
    size = min(20, n_mels)
    covered = set()
    for s in starts:
        covered.update(range(s, s + size))
    assert covered == set(range(n_mels))
    assert starts[-1] + size == n_mels


def test_band_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match="band_overlap"):
        band_starts(48, 20, 20)


@pytest.mark.parametrize("n_mels, n_bands", [(48, 4), (128, 12)])
def test_factorized_cnn_structure(n_mels, n_bands):
    m = models.build_model("factorized_cnn", (64, n_mels, 3), N_CLASSES, embedding_output=True)
    crops = _of_type(m, keras.layers.Cropping2D)
    assert len(crops) == n_bands
    assert all(c.output.shape[2] == 20 for c in crops)
    assert _count(m, r"band_\d+_fc") == n_bands
    convs = _of_type(m, keras.layers.Conv2D)
    assert len(convs) == n_bands * 4  # 2 layers x (k x 1, 1 x k) per band
    kernels = {c.kernel_size for c in convs}
    assert kernels == {(7, 1), (1, 7)}
    assert (7, 7) not in kernels
    assert [m.get_layer(f"band_1_layer{i}_conv_{ab}").filters
            for i in (1, 2) for ab in "ab"] == [32, 32, 64, 64]
    assert m.get_layer("bands_concat").output.shape[-1] == n_bands * 100
    assert m.output_names == ["predictions", "embedding"]
    assert m.outputs[1].shape[1:] == (n_bands * 64,)
    print(f"factorized_cnn params at (64, {n_mels}, 3), {N_CLASSES} classes: {m.count_params():,}")


def test_factorized_cnn_kernel_channels_and_narrow_input():
    m = models.build_model("factorized_cnn", (16, 48, 3), N_CLASSES, kernel=5,
                           channels=(4, 6), band_size=16, band_overlap=4, embedding_output=True)
    convs = _of_type(m, keras.layers.Conv2D)
    assert {c.kernel_size for c in convs} == {(5, 1), (1, 5)}
    n_bands = len(band_starts(48, 16, 4))
    assert n_bands == len(_of_type(m, keras.layers.Cropping2D)) == 4
    assert m.outputs[1].shape[1:] == (n_bands * 6,)
    # fewer mel bins than a band: one band of them all
    m1 = models.build_model("factorized_cnn", (3, 7, 3), N_CLASSES, **TINY["factorized_cnn"])
    assert len(_of_type(m1, keras.layers.Cropping2D)) == 1
    _check_probs(m1(_x(2, (3, 7, 3)), training=False), n=2)


# ------------------------------------------------------------ both builders
@pytest.mark.parametrize("name", sorted(TINY))
def test_embedding_output(name):
    single = models.build_model(name, SHAPE, N_CLASSES, **TINY[name])
    assert len(single.outputs) == 1
    assert single.output_names == ["predictions"]
    assert not any(layer.name == "embedding" for layer in single.layers)
    m = models.build_model(name, SHAPE, N_CLASSES, embedding_output=True, **TINY[name])
    assert m.output_names == ["predictions", "embedding"]
    probs, emb = m(_x(), training=False)
    _check_probs(probs)
    emb = _np(emb)
    dim = m.get_layer("embedding").output.shape[-1]
    assert emb.shape == (4, dim) and emb.dtype == np.float32
    assert dim == {"xception_ms": 88 + 128 + 256, "factorized_cnn": 4 * 16}[name]
    # same weights: the first output is the single-output classifier's
    single.set_weights(m.get_weights())
    x = _x(2)
    np.testing.assert_allclose(_np(single(x, training=False)),
                               _np(m(x, training=False)[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_embedding_is_float32_under_mixed_precision(name):
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = models.build_model(name, SHAPE, N_CLASSES, embedding_output=True, **TINY[name])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert [o.dtype for o in m.outputs] == ["float32", "float32"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_step(name):
    m = models.build_model(name, SHAPE, N_CLASSES, **TINY[name])
    x = _x()
    y = np.eye(N_CLASSES, dtype="float32")[[0, 1, 2, 3]]
    # one step: eagerly (tracing the graph would cost 5-10 s on 2 cores)
    m.compile(optimizer="adam", loss="categorical_crossentropy", run_eagerly=True)
    before = [w.copy() for w in m.get_weights()]
    loss = float(np.asarray(m.train_on_batch(x, y)).ravel()[0])
    assert np.isfinite(loss)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, m.get_weights())) > 0
    _check_probs(m(x, training=False))


def test_two_output_train_step_with_a_loss_on_the_embedding():
    """What a trainer does: CE on the probabilities + a metric loss on the embedding."""
    m = models.build_model("factorized_cnn", SHAPE, N_CLASSES, embedding_output=True,
                           **TINY["factorized_cnn"])

    def spread(y_true, emb):  # stand-in for a triplet loss
        return keras.ops.mean(keras.ops.square(emb), axis=-1)

    m.compile(optimizer="adam",
              loss={"predictions": "categorical_crossentropy", "embedding": spread},
              loss_weights={"predictions": 1.0, "embedding": 10.0}, run_eagerly=True)
    y = np.eye(N_CLASSES, dtype="float32")[[0, 1, 2, 3]]
    out = m.train_on_batch(_x(), {"predictions": y, "embedding": np.zeros((4, 1), "float32")})
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_save_and_load_round_trip(tmp_path, name):
    m = models.build_model(name, SHAPE, N_CLASSES, embedding_output=True, **TINY[name])
    path = tmp_path / f"{name}.keras"
    m.save(path)
    loaded = models.load_model(path, compile=False)  # safe mode: built-in layers only
    assert loaded.output_names == ["predictions", "embedding"]
    x = _x(2)
    for a, b in zip(m(x, training=False), loaded(x, training=False)):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-6)
