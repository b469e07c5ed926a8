"""TaggingCrossEntropy: soft-target CE and batch-wise loss masking."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipeline.losses import TaggingCrossEntropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


Y_PRED = np.array([[0.7, 0.2, 0.1],
                   [0.2, 0.5, 0.3],
                   [0.1, 0.1, 0.8]], dtype=np.float32)
Y_TRUE = np.array([[0.9, 0.05, 0.05],
                   [0.0, 1.0, 0.0],
                   [0.5, 0.0, 0.5]], dtype=np.float32)


def _ce(t, p):
    return -np.sum(t * np.log(np.clip(p, 1e-7, 1.0)), axis=-1)


def test_soft_target_cross_entropy():
    loss = TaggingCrossEntropy()
    per_row = _np(loss.call(keras.ops.convert_to_tensor(Y_TRUE), keras.ops.convert_to_tensor(Y_PRED)))
    expected = [-(0.9 * np.log(0.7) + 0.05 * np.log(0.2) + 0.05 * np.log(0.1)),
                -np.log(0.5),
                -(0.5 * np.log(0.1) + 0.5 * np.log(0.8))]
    np.testing.assert_allclose(per_row, expected, rtol=1e-5)
    np.testing.assert_allclose(_np(loss(Y_TRUE, Y_PRED)), np.mean(expected), rtol=1e-5)


def test_zero_probability_is_clipped():
    loss = TaggingCrossEntropy()
    value = _np(loss(np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)))
    assert np.isfinite(value) and value == pytest.approx(-np.log(1e-7), rel=1e-4)


def test_loss_masking_drops_only_unverified_outliers():
    # rows 0 and 1 have the same, largest loss; row 0 is unverified, row 1 verified
    y_pred = np.array([[0.05, 0.95], [0.05, 0.95], [0.6, 0.4], [0.9, 0.1]], np.float32)
    targets = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
    verified = np.array([[0], [1], [0], [1]], np.float32)
    y_true = np.concatenate([targets, verified], axis=1)
    raw = _ce(targets, y_pred)                 # [3.0, 3.0, 0.51, 0.105]
    loss = TaggingCrossEntropy(mask_ratio=0.8)
    per_row = _np(loss.call(keras.ops.convert_to_tensor(y_true), keras.ops.convert_to_tensor(y_pred)))
    np.testing.assert_allclose(per_row, [0.0, raw[1], raw[2], raw[3]], rtol=1e-5)
    np.testing.assert_allclose(_np(loss(y_true, y_pred)), (raw[1] + raw[2] + raw[3]) / 4, rtol=1e-5)


def test_loss_masking_threshold_is_relative_to_batch_max():
    # unverified row at 0.85 x max is dropped with ratio 0.8, kept with ratio 0.9
    p_max, p_mid = 0.1, 0.1 ** 0.85
    y_pred = np.array([[p_max, 1 - p_max], [p_mid, 1 - p_mid]], np.float32)
    y_true = np.array([[1, 0, 1], [1, 0, 0]], np.float32)
    dropped = _np(TaggingCrossEntropy(mask_ratio=0.8).call(keras.ops.convert_to_tensor(y_true),
                                                          keras.ops.convert_to_tensor(y_pred)))
    kept = _np(TaggingCrossEntropy(mask_ratio=0.9).call(keras.ops.convert_to_tensor(y_true),
                                                       keras.ops.convert_to_tensor(y_pred)))
    assert dropped[1] == 0.0 and dropped[0] > 0
    np.testing.assert_allclose(kept[1], -0.85 * np.log(0.1), rtol=1e-5)


def test_get_config_round_trip():
    loss = TaggingCrossEntropy(mask_ratio=0.8, name="masked")
    cfg = loss.get_config()
    assert cfg["mask_ratio"] == 0.8 and cfg["name"] == "masked"
    clone = TaggingCrossEntropy.from_config(cfg)
    assert isinstance(clone, TaggingCrossEntropy)
    assert clone.mask_ratio == 0.8 and clone.name == "masked"
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, TaggingCrossEntropy) and revived.mask_ratio == 0.8
    assert TaggingCrossEntropy.from_config(TaggingCrossEntropy().get_config()).mask_ratio is None


def test_tiny_model_trains_with_masked_loss():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=TaggingCrossEntropy(mask_ratio=0.8))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    labels = np.argmax(x[:, :3], axis=1)
    y = np.concatenate([np.eye(3, dtype=np.float32)[labels], np.ones((32, 1), np.float32)], axis=1)
    hist = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
