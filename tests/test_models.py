"""Tests of the network builders in ``models/``.

Kept cheap for a 2-core machine: every "paper size" test only BUILDS the
model and counts its parameters (never runs it); forward passes and training
steps use tiny inputs / slim widths. The VGGish checkpoint round trip uses
the real 72 M-parameter shapes once (about 290 MB of random float32).

Parameter-count tolerances (paper figures are rounded, the papers do not give
every width):
    wave1d      2.1 M  +-10 % (ours: 2,190,569; 2,091,113 without the 3
                1x1 projection shortcuts, see models/wave1d.py)
    inception2d 7.7 M  +-10 % (ours: 7,796,105; widths chosen for this)
    vggish      72.14 M exact (the reference architecture is fully specified)
"""

from __future__ import annotations

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models import mla, vggish, vggish_weights  # noqa: E402

# Keras' TF backend converts tensors with np.array(copy=False) semantics that
# numpy 2 reports as deprecated; that is Keras-internal noise, not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

N_CLASSES = 5
RNG = np.random.default_rng(0)


def _count(model, pattern):
    return sum(1 for layer in model.layers if re.fullmatch(pattern, layer.name))


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _check_probs(model, x, n_classes=N_CLASSES):
    y = _np(model(x, training=False))
    assert y.shape == (x.shape[0], n_classes)
    assert y.dtype == np.float32
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    return y


# Tiny configurations used for the forward / training-step / save tests.
TINY = {
    "cnn_ref": ((64, 32, 3), dict(filters=(8, 16))),
    "wave1d": ((4096, 1), dict(widths=(8, 16, 24, 32))),
    "inception2d": ((64, 64, 3), dict(width=0.25, dense_units=64)),
    "vggish": ((96, 64), dict(width=1 / 16, hidden=16)),
    "mla": ((6, 128), dict(units=32)),
}


@pytest.fixture(scope="module")
def tiny_models():
    return {name: models.build_model(name, shape, N_CLASSES, **params)
            for name, (shape, params) in TINY.items()}


def test_registry_and_unknown_name():
    assert set(models.BUILDERS) == {"cnn_ref", "wave1d", "inception2d", "vggish", "mla", "xception_ms",
                                    "factorized_cnn", "mini_segnet", "hierarchical"}
    with pytest.raises(ValueError, match="known models: cnn_ref, factorized_cnn, hierarchical, inception2d, mini_segnet, "
                                         "mla, vggish, wave1d, xception_ms"):
        models.build_model("resnet9000", (10, 10), 3)
    assert models.default_params("mla") == dict(units=600, levels=3, dropout=0.4,
                                                attention_activation="sigmoid")


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward_and_train_step(tiny_models, name):
    model = tiny_models[name]
    shape = TINY[name][0]
    x = RNG.standard_normal((4,) + shape).astype("float32")
    y = np.eye(N_CLASSES, dtype="float32")[[0, 1, 2, 3]]
    _check_probs(model, x)
    # Graph tracing of the deep conv nets costs 10-30 s on 2 CPU cores, so those
    # two take their (single) step eagerly; the others are traced as in training.
    model.compile(optimizer="adam", loss="categorical_crossentropy",
                  run_eagerly=name in ("inception2d", "wave1d"))
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    loss = float(np.asarray(loss).ravel()[0])
    assert np.isfinite(loss)
    changed = sum(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert changed > 0
    _check_probs(model, x)


def test_cnn_ref_structure(tiny_models):
    m = tiny_models["cnn_ref"]
    assert _count(m, r"conv_block_\d+") == 2
    assert _count(m, r"conv_block_\d+_conv\d") == 4
    full = models.build_model("cnn_ref", (128, 64, 3), 41)
    assert _count(full, r"conv_block_\d+") == 4
    print("cnn_ref params (128, 64, 3), 41 classes:", full.count_params())
    # 2-D (T, n_mfcc) input gets a channel axis; avgmax pooling works
    m2 = models.build_model("cnn_ref", (32, 20), 3, filters=(4,), pooling="avgmax")
    _check_probs(m2, RNG.standard_normal((2, 32, 20)).astype("float32"), 3)


def test_wave1d_structure_and_paper_param_count():
    m = models.build_model("wave1d", (88200, 1), 41)  # 2 s at 44.1 kHz; build only
    assert _count(m, r"res_block_\d+_\d+") == 8
    for w in (48, 96, 192, 384):
        assert _count(m, rf"res_block_{w}_\d+") == 2
    # width changes 48->96->192->384 need 1x1 projection shortcuts
    assert _count(m, r"res_block_\d+_1_proj_conv") == 3
    assert m.get_layer("stem_conv").kernel_size == (80,)
    assert m.get_layer("stem_conv").strides == (4,)
    n = m.count_params()
    print(f"wave1d params at (88200, 1), 41 classes: {n:,} (paper 2.1 M)")
    assert n == 2_190_569
    assert abs(n - 2.1e6) / 2.1e6 < 0.10


def test_inception2d_structure_and_paper_param_count():
    m = models.build_model("inception2d", (299, 299, 3), 41)  # build only, never run
    assert _count(m, r"inception_a_\d+") == 3
    assert _count(m, r"inception_b_\d+") == 1
    assert _count(m, r"inception_c_\d+") == 3
    assert _count(m, r"reduction_[ab]") == 2
    names = [layer.name for layer in m.layers]
    order = [names.index(n) for n in ("stem_pool", "inception_a_3", "reduction_a",
                                      "inception_b_1", "reduction_b", "inception_c_3")]
    assert order == sorted(order)
    assert [m.get_layer(f"stem_{i}_conv").filters for i in (1, 2, 3)] == [32, 32, 64]
    assert m.get_layer("dense").units == 1024
    n = m.count_params()
    print(f"inception2d params at (299, 299, 3), 41 classes: {n:,} (paper 7.7 M)")
    assert abs(n - 7.7e6) / 7.7e6 < 0.10


def test_inception2d_small_inputs(tiny_models):
    assert _count(tiny_models["inception2d"], r"inception_[abc]_\d+") == 7
    m = models.build_model("inception2d", (128, 64, 3), N_CLASSES, width=0.125, dense_units=32)
    assert m.get_layer("reduction_b").output.shape[1:3] == (8, 4)
    _check_probs(m, RNG.standard_normal((2, 128, 64, 3)).astype("float32"))


@pytest.fixture(scope="module")
def vggish_full():
    return vggish.build_vggish_embedding((96, 64))  # 72 M params; built once


def test_vggish_embedding_structure_and_param_count(vggish_full):
    m = vggish_full
    for name in vggish.LAYER_NAMES:
        m.get_layer(name)
    assert m.get_layer("flatten").output.shape[1:] == (12288,)
    assert m.output.shape[1:] == (128,)
    assert m.get_layer("fc2").get_config()["activation"] == "linear"
    assert m.get_layer("fc1_2").get_config()["activation"] == "relu"
    n = m.count_params()
    print(f"vggish embedding params at (96, 64): {n:,}")
    assert n == 72_141_184


def test_vggish_classifier_structure(tiny_models):
    m = tiny_models["vggish"]
    emb = m.get_layer("vggish")
    assert isinstance(emb, keras.Model)
    for name in vggish.LAYER_NAMES:
        emb.get_layer(name)
    assert emb.output.shape[1:] == (128,)
    assert m.get_layer("hidden").units == 16
    assert m.get_layer("embedding_relu") is not None
    full = models.build_model("vggish", (96, 64), 41)  # build only
    print(f"vggish classifier params at (96, 64), 41 classes: {full.count_params():,}")
    assert full.get_layer("hidden").units == 100
    assert full.count_params() == 72_141_184 + 128 * 100 + 100 + 100 * 41 + 41


# ---------------------------------------------------------------- checkpoint
def _reference_shapes(model):
    shapes = {}
    for layer_name, scope in vggish_weights.CHECKPOINT_SCOPES.items():
        layer = model.get_layer(layer_name)
        shapes[f"{scope}/weights"] = tuple(layer.kernel.shape)
        shapes[f"{scope}/biases"] = tuple(layer.bias.shape)
    return shapes


def _random_reference_weights(shapes, rng):
    """He-scaled random weights so activations stay O(1) through the network."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("/weights"):
            fan_in = int(np.prod(shape[:-1]))
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / fan_in))
            out[name] = w
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _save_tf_checkpoint(prefix, variables):
    tf = pytest.importorskip("tensorflow")
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])
    return str(prefix)


def _np_conv3x3_relu(x, w, b):
    """'same' 3x3 conv (cross-correlation, as TF) + bias + ReLU; x (H, W, C)."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))  # H, W, C, 3, 3
    cols = win.transpose(0, 1, 3, 4, 2).reshape(x.shape[0], x.shape[1], -1)  # (kh, kw, c) order
    y = cols @ w.reshape(-1, w.shape[-1]).astype(np.float64) + b
    return np.maximum(y, 0.0)


def _np_pool2(x):
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def _np_vggish(patch, v):
    x = patch[:, :, None].astype(np.float64)
    p = "vggish/"
    x = _np_pool2(_np_conv3x3_relu(x, v[p + "conv1/weights"], v[p + "conv1/biases"]))
    x = _np_pool2(_np_conv3x3_relu(x, v[p + "conv2/weights"], v[p + "conv2/biases"]))
    for s in ("conv3", "conv4"):
        for i in (1, 2):
            x = _np_conv3x3_relu(x, v[f"{p}{s}/{s}_{i}/weights"], v[f"{p}{s}/{s}_{i}/biases"])
        x = _np_pool2(x)
    x = x.reshape(-1)  # HWC flatten, as tf-slim's flatten
    assert x.shape == (12288,)
    for i in (1, 2):
        x = np.maximum(x @ v[f"{p}fc1/fc1_{i}/weights"] + v[f"{p}fc1/fc1_{i}/biases"], 0.0)
    return x @ v[p + "fc2/weights"] + v[p + "fc2/biases"]  # no activation


def test_vggish_checkpoint_round_trip_full_size(vggish_full, tmp_path):
    rng = np.random.default_rng(1)
    variables = _random_reference_weights(_reference_shapes(vggish_full), rng)
    assert sum(a.size for a in variables.values()) == 72_141_184
    prefix = _save_tf_checkpoint(tmp_path / "vggish_model.ckpt", variables)
    vggish_weights.load_vggish_checkpoint(vggish_full, prefix)
    np.testing.assert_array_equal(vggish_full.get_layer("conv3_1").kernel.numpy(),
                                  variables["vggish/conv3/conv3_1/weights"])
    patch = rng.standard_normal((96, 64)).astype(np.float32)
    got = _np(vggish_full(patch[None], training=False))[0]
    want = _np_vggish(patch, variables)
    assert got.shape == (128,)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_vggish_checkpoint_errors_name_the_variable(tmp_path):
    emb = vggish.build_vggish_embedding((96, 64), width=1 / 16)
    shapes = _reference_shapes(emb)
    variables = _random_reference_weights(shapes, np.random.default_rng(2))
    before = emb.get_layer("conv1").kernel.numpy().copy()

    missing = dict(variables)
    del missing["vggish/conv4/conv4_1/biases"]
    prefix = _save_tf_checkpoint(tmp_path / "missing.ckpt", missing)
    with pytest.raises(ValueError, match=r"'vggish/conv4/conv4_1/biases' missing") as info:
        vggish_weights.load_vggish_checkpoint(emb, prefix)
    assert "conv4_2" not in str(info.value)

    bad = dict(variables)
    bad["vggish/fc1/fc1_2/weights"] = np.zeros((7, 9), np.float32)
    prefix = _save_tf_checkpoint(tmp_path / "bad.ckpt", bad)
    expected = shapes["vggish/fc1/fc1_2/weights"]
    with pytest.raises(ValueError) as info:
        vggish_weights.load_vggish_checkpoint(emb, prefix)
    msg = str(info.value)
    assert "'vggish/fc1/fc1_2/weights'" in msg
    assert f"expected shape {expected}" in msg and "found (7, 9)" in msg
    # nothing was assigned by the failed loads
    np.testing.assert_array_equal(emb.get_layer("conv1").kernel.numpy(), before)

    # a correct slim checkpoint loads into the classifier's 'vggish' sub-model
    prefix = _save_tf_checkpoint(tmp_path / "ok.ckpt", variables)
    clf = models.build_model("vggish", (96, 64), 3, width=1 / 16, checkpoint=prefix)
    np.testing.assert_array_equal(clf.get_layer("vggish").get_layer("fc2").kernel.numpy(),
                                  variables["vggish/fc2/weights"])


def test_pca_params_and_postprocess(tmp_path):
    rng = np.random.default_rng(3)
    eig = rng.standard_normal((128, 128))
    means = rng.standard_normal((128, 1))  # the reference file stores (128, 1)
    path = tmp_path / "vggish_pca_params.npz"
    np.savez(path, pca_eigen_vectors=eig, pca_means=means)
    e, m = vggish_weights.load_pca_params(path)
    assert e.shape == (128, 128) and m.shape == (128,)
    emb = rng.standard_normal((5, 128))
    q = vggish_weights.apply_pca_quantize(emb, e, m)
    ref = np.dot(eig, emb.T - means).T  # the reference Postprocessor formula
    ref = np.uint8((np.clip(ref, -2, 2) + 2) * (255.0 / 4))
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, ref)
    np.savez(tmp_path / "bad.npz", pca_eigen_vectors=eig[:, :64], pca_means=means)
    with pytest.raises(ValueError, match="pca_eigen_vectors has shape"):
        vggish_weights.load_pca_params(tmp_path / "bad.npz")


# ---------------------------------------------------------------- attention
def test_attention_weights_sum_to_one():
    for act in ("sigmoid", "softmax"):
        layer = mla.AttentionPooling(7, attention_activation=act)
        h = RNG.standard_normal((3, 6, 10)).astype("float32")
        pooled, v = layer(h, return_attention=True)
        v = _np(v)
        assert _np(pooled).shape == (3, 7) and v.shape == (3, 6, 7)
        np.testing.assert_allclose(v.sum(axis=1), 1.0, atol=1e-5)
        assert np.all(v > 0)


def test_attention_concentrates_on_planted_instance():
    d, k, n = 4, 3, 6
    layer = mla.AttentionPooling(k)
    layer.build((None, n, d))
    # attention driven only by feature 0: logit = 10 * x0 - 5
    att_kernel = np.zeros((d, k), np.float32)
    att_kernel[0, :] = 10.0
    layer.attention_dense.set_weights([att_kernel, np.full(k, -5.0, np.float32)])
    # class scores driven by feature 1
    score_kernel = np.zeros((d, k), np.float32)
    score_kernel[1, :] = [4.0, -4.0, 0.0]
    layer.score_dense.set_weights([score_kernel, np.zeros(k, np.float32)])

    h = np.zeros((2, n, d), np.float32)
    h[:, :, 1] = -1.0  # distractors vote against class 0
    h[0, 3, 0], h[0, 3, 1] = 1.0, 1.0  # informative instance 3 (sample 0)
    h[1, 5, 0], h[1, 5, 1] = 1.0, 1.0  # informative instance 5 (sample 1)
    pooled, v = layer(h, return_attention=True)
    v, pooled = _np(v), _np(pooled)
    assert np.all(v[0, 3] > 0.9) and np.all(v[1, 5] > 0.9)
    assert int(np.argmax(v[0, :, 0])) == 3 and int(np.argmax(v[1, :, 0])) == 5
    # prediction follows the informative instance: sigmoid(4) for class 0
    assert pooled[0, 0] > 0.9 and pooled[0, 1] < 0.1
    # whereas plain mean pooling of the instance scores would be dominated by the distractors
    mean_pooled = (1.0 / (1.0 + np.exp(-h @ score_kernel))).mean(axis=1)
    assert mean_pooled[0, 0] < 0.5


def test_mla_structure(tiny_models):
    m = models.build_model("mla", (6, 128), 41)  # paper settings, build only
    assert _count(m, r"attention_pool_\d") == 3
    assert _count(m, r"level_\d_dense") == 3
    assert m.get_layer("level_1_dense").units == 600
    assert m.get_layer("level_1_dropout").rate == 0.4
    assert m.get_layer("levels_concat").output.shape[1:] == (3 * 41,)
    print(f"mla params at (6, 128), 41 classes: {m.count_params():,}")


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", ["mla", "vggish"])
def test_save_and_load_keras(tiny_models, name, tmp_path):
    model = tiny_models[name]
    x = RNG.standard_normal((2,) + TINY[name][0]).astype("float32")
    want = _np(model(x, training=False))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # custom layers registered on import
    np.testing.assert_allclose(_np(loaded(x, training=False)), want, rtol=1e-5, atol=1e-6)
    loaded2 = models.load_model(path, compile=False)
    np.testing.assert_allclose(_np(loaded2(x, training=False)), want, rtol=1e-5, atol=1e-6)
    if name == "vggish":
        assert loaded.get_layer("vggish").get_layer("fc2").units == 128
    if name == "mla":
        assert isinstance(loaded.get_layer("attention_pool_2"), mla.AttentionPooling)
