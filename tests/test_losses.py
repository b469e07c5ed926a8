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


# --------------------------------------------------------------------------- focal loss

from pipeline.config import ConfigError  # noqa: E402
from pipeline.settings import Training  # noqa: E402
from pipeline.losses import (  # noqa: E402
    ALPHA_RANGE, EmbeddingTripletLoss, TaggingFocalLoss, balanced_alpha, draw_negatives,
    make_losses, pack_triplet_targets, triplet_loss)


def _rows(loss, y_true, y_pred):
    return _np(loss.call(keras.ops.convert_to_tensor(y_true), keras.ops.convert_to_tensor(y_pred)))


MASKED_PRED = np.array([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]], np.float32)
MASKED_TRUE = np.array([[0.8, 0.1, 0.1, 0], [0.8, 0.1, 0.1, 1], [1, 0, 0, 0], [0.5, 0.5, 0, 1]], np.float32)


def test_focal_with_gamma_zero_is_the_cross_entropy():
    ce, focal = TaggingCrossEntropy(), TaggingFocalLoss(gamma=0.0)
    np.testing.assert_allclose(_rows(focal, Y_TRUE, Y_PRED), _rows(ce, Y_TRUE, Y_PRED), rtol=1e-7)
    np.testing.assert_allclose(_np(focal(Y_TRUE, Y_PRED)), _np(ce(Y_TRUE, Y_PRED)), rtol=1e-7)
    # the clipping is shared too: a zero probability gives the same finite loss
    t, p = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    assert _np(focal(t, p)) == pytest.approx(float(_np(ce(t, p))), rel=1e-7)


def test_focal_with_gamma_zero_is_the_masked_cross_entropy():
    ce, focal = TaggingCrossEntropy(mask_ratio=0.8), TaggingFocalLoss(gamma=0.0, mask_ratio=0.8)
    masked = _rows(focal, MASKED_TRUE, MASKED_PRED)
    np.testing.assert_allclose(masked, _rows(ce, MASKED_TRUE, MASKED_PRED), rtol=1e-7)
    assert masked[0] == 0.0 and masked[1] > 0       # the unverified outlier is dropped, the verified one kept
    np.testing.assert_allclose(_np(focal(MASKED_TRUE, MASKED_PRED)), _np(ce(MASKED_TRUE, MASKED_PRED)), rtol=1e-7)


def test_focal_masking_is_relative_to_the_focal_losses():
    focal = TaggingFocalLoss(gamma=2.0, mask_ratio=0.8)
    raw = _rows(TaggingFocalLoss(gamma=2.0), MASKED_TRUE[:, :-1], MASKED_PRED)
    masked = _rows(focal, MASKED_TRUE, MASKED_PRED)
    keep = (MASKED_TRUE[:, -1] > 0.5) | (raw <= 0.8 * raw.max())
    np.testing.assert_allclose(masked, raw * keep, rtol=1e-6)


def test_focal_matches_the_formula_on_soft_targets():
    gamma, alpha = 2.5, [0.5, 2.0, 1.0]
    p = np.clip(Y_PRED.astype(np.float64), 1e-7, 1.0)
    expected = -np.sum(Y_TRUE * np.array(alpha) * (1 - p + 1e-7) ** gamma * np.log(p), axis=-1)
    np.testing.assert_allclose(_rows(TaggingFocalLoss(gamma=gamma, alpha=alpha), Y_TRUE, Y_PRED), expected, rtol=1e-5)


def test_focal_down_weights_easy_rows():
    # row 0: confidently right (p_t = 0.9); row 1: wrong (p_t = 0.1)
    y_true = np.array([[1, 0], [1, 0]], np.float32)
    y_pred = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)
    ce = _rows(TaggingCrossEntropy(), y_true, y_pred)
    ratios = np.array([_rows(TaggingFocalLoss(gamma=g), y_true, y_pred) / ce for g in (0.0, 1.0, 2.0, 3.0)])
    np.testing.assert_allclose(ratios[0], [1.0, 1.0], rtol=1e-6)
    assert np.all(np.diff(ratios[:, 0]) < 0) and np.all(np.diff(ratios[:, 1]) < 0)  # every row loses weight ...
    assert np.all(np.diff(ratios[:, 0] / ratios[:, 1]) < 0)                         # ... the easy one much faster
    np.testing.assert_allclose(ratios[2], [(0.1 + 1e-7) ** 2, (0.9 + 1e-7) ** 2], rtol=1e-5)


def test_focal_alpha_scales_per_class():
    y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    plain = _rows(TaggingFocalLoss(gamma=2.0), y_true, Y_PRED)
    scaled = _rows(TaggingFocalLoss(gamma=2.0, alpha=[0.5, 2.0, 1.0]), y_true, Y_PRED)
    np.testing.assert_allclose(scaled, plain * [0.5, 2.0, 1.0], rtol=1e-6)


def test_focal_get_config_round_trip():
    loss = TaggingFocalLoss(gamma=3.0, alpha=[0.5, 1.0], mask_ratio=0.8, name="focal")
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, TaggingFocalLoss)
    assert (revived.gamma, revived.alpha, revived.mask_ratio, revived.eps, revived.name) == (3.0, [0.5, 1.0], 0.8,
                                                                                             1e-7, "focal")
    with pytest.raises(ValueError, match="gamma"):
        TaggingFocalLoss(gamma=-1.0)


def test_balanced_alpha_is_inverse_frequency_with_mean_one():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)           # class 3 has no training row
    alpha = balanced_alpha(labels, 4)
    # 1/n = [1/6, 1/3, 1], mean 1/2 over the present classes -> [1/3, 2/3, 2]; the absent class gets 1
    np.testing.assert_allclose(alpha, [1 / 3, 2 / 3, 2.0, 1.0])
    assert np.mean(alpha[:3]) == pytest.approx(1.0)
    assert balanced_alpha(np.eye(4)[labels], 4) == pytest.approx(alpha)   # one-hot rows count the same
    # very skewed: 1/n = [0.01, 1] -> [0.0198, 1.98]; the common class is clipped up to the floor
    skewed = balanced_alpha(np.array([0] * 100 + [1]), 2)
    np.testing.assert_allclose(skewed, [ALPHA_RANGE[0], 2 / 1.01])
    with pytest.raises(ValueError):
        balanced_alpha(np.eye(3)[[0, 1]], 4)


# --------------------------------------------------------------------------- triplet loss

#   rows:   A0 (0,0)  A1 (1,0)  A2 (0,2)  B3 (0,3)  B4 (3,0)  C5 (3,2)   (C5 has no positive)
LABELS = np.array([0, 0, 0, 1, 1, 2])
EMB = np.array([[0, 0], [1, 0], [0, 2], [0, 3], [3, 0], [3, 2]], np.float32)
#   squared distances (anchor: positives | negatives)
#   A0: A1 1, A2 4  | B3 9,  B4 9,  C5 13
#   A1: A0 1, A2 5  | B3 10, B4 4,  C5 8
#   A2: A0 4, A1 5  | B3 1,  B4 13, C5 9
#   B3: B4 18       | A0 9,  A1 10, A2 1, C5 10
#   B4: B3 18       | A0 9,  A1 4,  A2 13, C5 4
MARGIN = 5.0


def _triplet(labels=LABELS, emb=EMB, **kwargs):
    return float(_np(triplet_loss(keras.ops.convert_to_tensor(labels), keras.ops.convert_to_tensor(emb),
                                  **{"margin": MARGIN, **kwargs})))


def test_pairwise_distances_of_the_hand_batch():
    from pipeline.losses import pairwise_sq_distances
    d = _np(pairwise_sq_distances(EMB))
    np.testing.assert_allclose(d, ((EMB[:, None] - EMB[None]) ** 2).sum(-1), atol=1e-5)
    assert d[0, 5] == 13 and d[3, 4] == 18


def test_batch_hard_by_hand():
    # farthest positive - nearest negative + 5: A0 4-9 -> 0, A1 5-4 -> 6, A2 5-1 -> 9, B3 18-1 -> 22,
    # B4 18-4 -> 19; C5 has no positive: mean over 5 anchors
    assert _triplet(strategy="batch_hard") == pytest.approx((0 + 6 + 9 + 22 + 19) / 5)


def test_semi_hard_by_hand():
    # per pair, the nearest negative beyond d(a,p), else the farthest negative:
    # (0,1) 1 vs 9 -> 0; (0,2) 4 vs 9 -> 0; (1,0) 1 vs 4 -> 2; (1,2) 5 vs 8 -> 2; (2,0) 4 vs 9 -> 0;
    # (2,1) 5 vs 9 -> 1; (3,4) 18, none beyond -> farthest 10 -> 13; (4,3) 18 -> farthest 13 -> 10
    assert _triplet(strategy="semi_hard") == pytest.approx((0 + 0 + 2 + 2 + 0 + 1 + 13 + 10) / 8)


def test_paper_with_given_negatives_by_hand():
    negatives = np.array([3, 5, 4, 2, 1, 3])
    # (0,1) 1-9 -> 0; (0,2) 4-9 -> 0; (1,0) 1-8 -> 0; (1,2) 5-8 -> 2; (2,0) 4-13 -> 0; (2,1) 5-13 -> 0;
    # (3,4) 18-1 -> 22; (4,3) 18-4 -> 19: mean over all 8 valid pairs, zero-loss ones included
    assert _triplet(strategy="paper", negatives=negatives) == pytest.approx(43 / 8)
    # a "negative" of the anchor's own class is no negative: A0's two pairs drop out
    assert _triplet(strategy="paper", negatives=np.array([1, 5, 4, 2, 1, 3])) == pytest.approx(43 / 6)
    # per-pair negatives (N, N) are read as [anchor, positive]
    per_pair = np.tile(negatives[:, None], (1, 6))
    per_pair[1, 2] = 3                                     # (1,2): 5 - 10 -> 0
    assert _triplet(strategy="paper", negatives=per_pair) == pytest.approx(41 / 8)


def _brute_force(labels, emb, margin, sources=None):
    d = ((emb[:, None].astype(np.float64) - emb[None]) ** 2).sum(-1)
    vals = [max(d[a, p] - d[a, n] + margin, 0.0) for a in range(len(labels)) for p in range(len(labels))
            for n in range(len(labels)) if a != p and labels[a] == labels[p] and labels[n] != labels[a]
            and (sources is None or sources[a] != sources[p])]
    return np.mean(vals) if vals else 0.0


def test_batch_all_is_the_mean_over_every_valid_triplet():
    assert _triplet(strategy="batch_all") == pytest.approx(_brute_force(LABELS, EMB, MARGIN))
    rng = np.random.default_rng(0)
    labels, emb = rng.integers(0, 3, 10), rng.standard_normal((10, 4)).astype(np.float32)
    sources = rng.integers(0, 2, 10)
    assert _triplet(labels, emb, strategy="batch_all", margin=1.0, sources=sources) == pytest.approx(
        _brute_force(labels, emb, 1.0, sources), rel=1e-4)


def test_one_hot_and_soft_labels_are_argmaxed():
    soft = np.eye(3, dtype=np.float32)[LABELS] * 0.9 + 0.1 / 3
    for strategy in ("batch_hard", "semi_hard", "batch_all"):
        assert _triplet(soft, strategy=strategy) == pytest.approx(_triplet(strategy=strategy))
    assert _triplet(LABELS[:, None].astype(np.float32), strategy="batch_hard") == pytest.approx(
        _triplet(strategy="batch_hard"))


def test_sources_exclude_same_source_positives():
    sources = np.array([7, 7, 7, 1, 2, 3])                 # the class-0 rows all come from one source
    # only (3,4) and (4,3) are left
    assert _triplet(strategy="batch_hard", sources=sources) == pytest.approx((22 + 19) / 2)
    assert _triplet(strategy="semi_hard", sources=sources) == pytest.approx((13 + 10) / 2)
    assert _triplet(strategy="paper", negatives=np.array([3, 5, 4, 2, 1, 3]), sources=sources) == pytest.approx(
        (22 + 19) / 2)
    # A0 and A2 share a source, A1 differs: the pairs (0,2) and (2,0) go
    sources = np.array([7, 8, 7, 1, 2, 3])
    assert _triplet(strategy="semi_hard", sources=sources) == pytest.approx((0 + 2 + 2 + 1 + 13 + 10) / 6)


def _value_and_grad(fn, x):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        x = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(x)
        return _np(value), _np(tape.gradient(value, x))
    if backend == "jax":
        import jax
        value, grad = jax.value_and_grad(fn)(keras.ops.convert_to_tensor(x))
        return _np(value), _np(grad)
    import torch
    x = torch.tensor(x, requires_grad=True)
    value = fn(x)
    value.backward()
    return _np(value.detach()), _np(x.grad)


@pytest.mark.parametrize("strategy", ["paper", "batch_all", "batch_hard", "semi_hard"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [1, 1, 1, 1]], ids=["all_different", "one_class"])
def test_no_valid_triplet_gives_zero_and_a_finite_gradient(strategy, labels):
    emb = np.array([[0, 0], [1, 0], [0, 2], [1, 1]], np.float32)
    labels = np.array(labels)
    kwargs = {"negatives": draw_negatives(labels, np.random.default_rng(0))} if strategy == "paper" else {}
    value, grad = _value_and_grad(lambda e: triplet_loss(labels, e, margin=0.2, strategy=strategy, **kwargs), emb)
    assert value == 0.0 and np.all(np.isfinite(grad))
    # and with no valid positive because every pair shares a source
    value, grad = _value_and_grad(lambda e: triplet_loss(np.array([0, 0, 1, 1]), e, strategy=strategy,
                                                         sources=np.array([0, 0, 1, 1]), **kwargs), emb)
    assert value == 0.0 and np.all(np.isfinite(grad))


def test_triplet_gradient_pulls_positives_together():
    value, grad = _value_and_grad(lambda e: triplet_loss(LABELS, e, margin=MARGIN, strategy="batch_hard"), EMB)
    assert value > 0 and np.all(np.isfinite(grad))
    # B3 = (0,3) is in three active triplets (mean over 5 anchors): as anchor, d(B3,B4) - d(B3,A2):
    # 2(B3-B4) - 2(B3-A2) = (-6, 4); as B4's positive, d(B4,B3): 2(B3-B4) = (-6, 6); as A2's negative,
    # -d(A2,B3): -2(B3-A2) = (0, -2)
    np.testing.assert_allclose(grad[3], np.array([-12, 8]) / 5, rtol=1e-5)
    assert np.all(grad[0] == 0)                            # A0's triplet is inactive and A0 is no one's pick


def test_draw_negatives_picks_another_class():
    rng = np.random.default_rng(1)
    neg = draw_negatives(LABELS, rng)
    assert np.all(LABELS[neg] != LABELS)
    assert np.array_equal(draw_negatives(np.eye(3)[LABELS], np.random.default_rng(1)), neg)
    assert np.array_equal(draw_negatives(np.array([2, 2, 2]), rng), [0, 1, 2])   # no negative: itself


def test_paper_draws_its_own_negatives_deterministically():
    # rows 0, 1 (class 0) have one possible negative, row 2; row 2 has no positive
    labels, emb = np.array([0, 0, 1]), np.array([[0, 0], [1, 0], [0, 2]], np.float32)
    value = float(_np(triplet_loss(labels, emb, margin=5.0, strategy="paper", seed=3)))
    assert value == pytest.approx(((1 - 4 + 5) + (1 - 5 + 5)) / 2)
    a = _triplet(strategy="paper", seed=keras.random.SeedGenerator(7))
    b = _triplet(strategy="paper", seed=keras.random.SeedGenerator(7))
    assert a == b
    # between the mean with every pair's farthest negative and that with every pair's nearest one
    d = ((EMB[:, None] - EMB[None]) ** 2).sum(-1)
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j and LABELS[i] == LABELS[j]]
    negs = {i: d[i][LABELS != LABELS[i]] for i in range(6)}
    low = np.mean([max(d[i, j] - negs[i].max() + MARGIN, 0) for i, j in pairs])
    high = np.mean([max(d[i, j] - negs[i].min() + MARGIN, 0) for i, j in pairs])
    assert low - 1e-5 <= a <= high + 1e-5 and low < high


def test_embedding_triplet_loss_reads_packed_targets():
    negatives = np.array([3, 5, 4, 2, 1, 3])
    sources = np.array([7, 7, 7, 1, 2, 3])
    y_true = pack_triplet_targets(np.eye(3)[LABELS], sources=sources, negatives=negatives)
    assert y_true.shape == (6, 5)
    loss = EmbeddingTripletLoss(margin=MARGIN, strategy="paper", with_sources=True, with_negatives=True)
    assert float(_np(loss(y_true, EMB))) == pytest.approx((22 + 19) / 2)
    only_labels = EmbeddingTripletLoss(margin=MARGIN, strategy="batch_hard")
    assert float(_np(only_labels(pack_triplet_targets(LABELS), EMB))) == pytest.approx(56 / 5)
    assert float(_np(only_labels(LABELS.astype(np.float32), EMB))) == pytest.approx(56 / 5)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, EmbeddingTripletLoss)
    assert (revived.margin, revived.strategy, revived.with_sources, revived.with_negatives) == (
        MARGIN, "paper", True, True)
    with pytest.raises(ValueError, match="strategy"):
        EmbeddingTripletLoss(strategy="hardest")


def test_tiny_two_output_model_trains_with_ce_plus_triplet():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    embedding = keras.layers.Dense(3, name="embedding")(inputs)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(embedding)
    model = keras.Model(inputs, {"probs": probs, "embedding": embedding})
    losses = make_losses({"loss": "triplet", "triplet_weight": 1.0}, n_classes=3)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss={"probs": losses["classification"], "embedding": losses["embedding"]},
                  loss_weights={"probs": 1.0, "embedding": losses["loss_weights"]["embedding"]})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[np.argmax(x[:, :3], axis=1)]
    hist = model.fit(x, {"probs": y, "embedding": y}, epochs=4, batch_size=16, verbose=0)
    assert np.all(np.isfinite(hist.history["loss"])) and hist.history["loss"][-1] < hist.history["loss"][0]


# --------------------------------------------------------------------------- make_losses

def test_make_losses_defaults_and_kinds():
    defaults = Training()
    assert (defaults.loss, defaults.focal_gamma, defaults.focal_alpha, defaults.triplet_margin,
            defaults.triplet_weight, defaults.triplet_strategy) == ("crossentropy", 2.0, None, 0.2, 10.0, "paper")
    ce = make_losses({"loss_masking": 0.8}, n_classes=3)
    assert isinstance(ce["classification"], TaggingCrossEntropy) and ce["classification"].mask_ratio == 0.8
    assert ce["embedding"] is None and ce["loss_weights"] == {"classification": 1.0} and ce["loss"] == "crossentropy"

    focal = make_losses({"loss": "focal", "focal_alpha": [0.5, 1.0, 1.0]}, n_classes=3)["classification"]
    assert isinstance(focal, TaggingFocalLoss) and focal.gamma == 2.0 and focal.alpha == [0.5, 1.0, 1.0]
    balanced = make_losses({"loss": "focal", "focal_alpha": "balanced", "focal_gamma": 3}, 3, class_counts=[6, 3, 1])
    assert balanced["classification"].gamma == 3.0
    np.testing.assert_allclose(balanced["classification"].alpha, [1 / 3, 2 / 3, 2.0])
    with pytest.raises(ValueError, match="class_counts"):
        make_losses({"loss": "focal", "focal_alpha": "balanced"}, 3)

    triplet = make_losses({"loss": "triplet", "mixup_alpha": 0.0, "loss_masking": None}, n_classes=3)
    assert isinstance(triplet["classification"], TaggingCrossEntropy)
    emb = triplet["embedding"]
    assert isinstance(emb, EmbeddingTripletLoss) and (emb.margin, emb.strategy) == (0.2, "paper")
    assert triplet["loss_weights"] == {"classification": 1.0, "embedding": 10.0}
    hard = make_losses({"loss": "triplet", "triplet_strategy": "semi_hard", "triplet_margin": 0.3,
                        "triplet_weight": 2}, 3)
    assert (hard["embedding"].strategy, hard["embedding"].margin, hard["loss_weights"]["embedding"]) == (
        "semi_hard", 0.3, 2.0)


@pytest.mark.parametrize("cfg, message", [
    ({"loss": "hinge"}, "training.loss = 'hinge'"),
    ({"loss": "triplet", "mixup_alpha": 0.4}, "mixup and the triplet loss do not mix"),
    ({"loss": "focal", "focal_alpha": [1.0, 1.0]}, "2 values, expected one per class \\(3\\)"),
    ({"loss": "focal", "focal_alpha": "inverse"}, "focal_alpha"),
    ({"loss": "focal", "focal_gamma": -1}, "focal_gamma"),
    ({"loss": "triplet", "triplet_strategy": "hardest"}, "triplet_strategy"),
])
def test_make_losses_refusals(cfg, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_losses(cfg, n_classes=3)
    assert "\n" not in str(err.value)


def test_normalised_triplet_loss_ignores_the_embedding_scale():
    labels = np.array([0, 0, 1, 1], dtype="float32")[:, None]
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]], dtype="float32")  # classes interleaved
    loss = EmbeddingTripletLoss(margin=0.2, strategy="batch_hard", normalize=True)
    small, big = float(loss(labels, emb)), float(loss(labels, 50.0 * emb))
    assert small == pytest.approx(big, rel=1e-5)
    raw = EmbeddingTripletLoss(margin=0.2, strategy="batch_hard")
    assert float(raw(labels, 50.0 * emb)) != pytest.approx(float(raw(labels, emb)))
    assert EmbeddingTripletLoss.from_config(loss.get_config()).normalize
