"""The fold trainer with the focal and triplet losses (training.loss): what it compiles, the triplet
batches' targets, exact resume, and a saved model that predicts probabilities only."""
from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline.trainer as trainer
from pipeline.config import ConfigError
from pipeline.losses import EmbeddingTripletLoss, TaggingFocalLoss, balanced_alpha
from pipeline.normalize import Normalizer
from pipeline.workdir import read_json

N_CLASSES = 3
#: training clips per class (unequal, so balanced focal alphas differ); one more per class is held out
PER_CLASS = (6, 4, 3)
TINY = {
    "factorized_cnn": {"channels": [4, 4], "fc_units": 8, "band_size": 6, "band_overlap": 2, "kernel": 3,
                       "dropout": 0.3},
    "xception_ms": {"width": 0.125, "middle_blocks": 0},
}


class MelStore:
    """Clips (T, 12 mels, 1) in memory; class k lifts mel bins 4k..4k+3."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.clips, self.labels = {}, {}
        for k, n in enumerate(PER_CLASS):
            for i in range(n + 1):
                x = rng.normal(size=(int(rng.integers(10, 18)), 12, 1)).astype(np.float32)
                x[:, 4 * k:4 * k + 4] += 0.8
                self.clips[f"c{k}_{i}"] = x
                self.labels[f"c{k}_{i}"] = k

    def load(self, split, fname):
        return self.clips[fname]


@pytest.fixture(scope="module")
def store():
    return MelStore()


def _spec(builder="factorized_cnn", **train):
    tcfg = {"epochs": 1, "batch_size": 6, "lr": 3e-3, "eval_batch_size": 8, "mixup_alpha": 0.0, "bn_momentum": 0.9,
            "callbacks": []}
    tcfg.update(train)
    return {"name": builder, "builder": builder, "window": 8, "normalize": False, "params": dict(TINY[builder]),
            "train": tcfg}


def _rows(store):
    tr = [f for f in sorted(store.clips) if not f.endswith("_0")]
    verified = np.array([i % 2 for i in range(len(tr))])
    return trainer.TrainRows(tr, np.array([store.labels[f] for f in tr]), np.full(len(tr), 0.1, np.float32),
                             verified)


def _fold(store, spec, out_dir, **kw):
    val = [f for f in sorted(store.clips) if f.endswith("_0")]
    return trainer.train_fold(spec, store, _rows(store), val, np.array([store.labels[f] for f in val]), val[:2],
                              N_CLASSES, out_dir, seed=5, fold=0, fingerprint="fp", progress=False, **kw)


def _check_saved_model(out_dir, result, store):
    """best.keras loads back as a one-output probability model that predicts the fold's OOF."""
    model = trainer.load_saved_model(out_dir / "best.keras")
    assert list(model.output_names) == ["predictions"]
    val = [f for f in sorted(store.clips) if f.endswith("_0")]
    probs = trainer.predict_clips(model, store, "train", val, 8, 4, Normalizer(None), 8)
    np.testing.assert_allclose(probs, result.oof, atol=1e-5)
    np.testing.assert_allclose(result.oof.sum(axis=1), 1.0, atol=1e-5)


class KillAt(keras.callbacks.Callback):
    """A kill in the middle of epoch ``epoch`` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
            raise KeyboardInterrupt(f"simulated kill in epoch {self.epoch}")


def test_triplet_fold_resumes_exactly(store, tmp_path):
    spec = _spec(epochs=2, loss="triplet", triplet_strategy="paper")
    full = _fold(store, spec, tmp_path / "full")
    killed = _spec(epochs=2, loss="triplet", triplet_strategy="paper",
                   callbacks=[{"class": f"{__name__}.KillAt", "args": {"epoch": 1}}])
    with pytest.raises(KeyboardInterrupt):
        _fold(store, killed, tmp_path / "resumed")
    state = read_json(tmp_path / "resumed" / "state.json")
    assert state["epoch"] == 0 and not state["finished"]
    resumed = _fold(store, spec, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "history.csv").read_bytes() == (tmp_path / "full" / "history.csv").read_bytes()
    np.testing.assert_array_equal(resumed.oof, full.oof)
    np.testing.assert_array_equal(resumed.test, full.test)
    assert resumed.summary["epochs_run"] == full.summary["epochs_run"] == 2
    _check_saved_model(tmp_path / "full", full, store)


@pytest.mark.parametrize("strategy, extra", [
    ("paper", {}),
    ("batch_all", {}),
    ("batch_hard", {"class_weight": "balanced", "loss_masking": 0.8}),  # weights and masking: the CE output only
    ("semi_hard", {}),
])
def test_triplet_step_for_every_strategy(store, tmp_path, strategy, extra):
    cache: dict = {}
    result = _fold(store, _spec(loss="triplet", triplet_strategy=strategy, triplet_weight=2.0, **extra), tmp_path,
                   model_cache=cache)
    (model,) = cache.values()
    assert list(model.output_names) == ["predictions", "embedding"]
    losses = model.loss
    assert set(losses) == {"predictions", "embedding"}
    emb = losses["embedding"]
    assert isinstance(emb, EmbeddingTripletLoss) and emb.strategy == strategy and emb.with_sources
    assert emb.with_negatives == (strategy == "paper")
    assert losses["predictions"].mask_ratio == extra.get("loss_masking")
    assert np.isfinite(result.summary["val_map3"])
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]
    _check_saved_model(tmp_path, result, store)


def test_focal_balanced_step_on_xception_ms(store, tmp_path):
    cache: dict = {}
    result = _fold(store, _spec("xception_ms", loss="focal", focal_alpha="balanced", focal_gamma=2.0), tmp_path,
                   model_cache=cache)
    (model,) = cache.values()
    assert isinstance(model.loss, TaggingFocalLoss) and model.loss.gamma == 2.0
    assert model.loss.alpha == pytest.approx(balanced_alpha(_rows(store).labels, N_CLASSES))
    assert model.loss.alpha[0] < model.loss.alpha[2]  # the rarest class weighs most
    _check_saved_model(tmp_path, result, store)


@pytest.mark.parametrize("builder, loss", [("xception_ms", "crossentropy"), ("xception_ms", "triplet"),
                                           ("factorized_cnn", "crossentropy"), ("factorized_cnn", "focal")])
def test_every_new_model_trains_with_every_loss(store, tmp_path, builder, loss):
    result = _fold(store, _spec(builder, loss=loss), tmp_path)
    assert np.isfinite(result.summary["val_map3"])
    _check_saved_model(tmp_path, result, store)


def test_model_cache_key_holds_the_focal_alphas():
    spec = trainer.model_settings(_spec("factorized_cnn", loss="focal", focal_alpha="balanced"))
    cache: dict = {}
    shape = (8, 12, 1)
    a = trainer.fresh_model(spec, shape, N_CLASSES, cache, class_counts=[6, 4, 3])
    assert trainer.fresh_model(spec, shape, N_CLASSES, cache, class_counts=[6, 4, 3]) is a
    b = trainer.fresh_model(spec, shape, N_CLASSES, cache, class_counts=[3, 4, 6])  # another fold's rows
    assert b is not a and b.loss.alpha == pytest.approx(a.loss.alpha[::-1])


def test_triplet_batches_carry_sources_negatives_and_masking(store):
    rows = _rows(store)
    tcfg = {"loss": "triplet", "triplet_strategy": "paper", "batch_size": 7, "loss_masking": 0.8,
            "class_weight": "balanced", "mixup_alpha": 0.0}
    batches = trainer.WindowBatches(store, rows, N_CLASSES, 8, tcfg, Normalizer(None), seed=4)
    assert batches.policy == "pairs" and batches.batch_size == 6
    for idx in range(len(batches)):
        x, y, weights = batches[idx]
        pick = batches.order[idx * 6:(idx + 1) * 6]
        labels = rows.labels[pick]
        assert set(y) == {"predictions", "embedding"} and set(weights) == {"predictions"}
        assert y["predictions"].shape == (6, N_CLASSES + 1)  # the verified column for loss masking
        np.testing.assert_array_equal(y["predictions"][:, -1], rows.verified[pick])
        packed = y["embedding"]
        assert packed.shape == (6, 3)
        np.testing.assert_array_equal(packed[:, 0], labels)          # the given class, not smoothed
        np.testing.assert_array_equal(packed[:, 1], pick)            # the source: the clip's row
        negatives = packed[:, 2].astype(int)
        assert (labels[negatives] != labels).all()                   # a negative of another class
        again = batches[idx]
        np.testing.assert_array_equal(again[1]["embedding"], packed)  # seeded by (seed, epoch, batch)
    other = trainer.WindowBatches(store, rows, N_CLASSES, 8, dict(tcfg, triplet_strategy="batch_hard"),
                                  Normalizer(None), seed=4)
    assert other[0][1]["embedding"].shape == (6, 2)  # no negatives column


def test_triplet_with_balanced_batches_fails_before_training(store, tmp_path):
    with pytest.raises(ConfigError, match="batch_policy: balanced"):
        _fold(store, _spec(loss="triplet", batch_policy="balanced"), tmp_path / "f")
    assert not (tmp_path / "f" / "state.json").exists()


def test_prediction_helpers_take_the_probabilities_of_a_two_output_model():
    class TwoOutputs:
        output_names = ["predictions", "embedding"]
        output_shape = [(None, 2), (None, 5)]

        def predict_on_batch(self, x):
            p = np.clip(x[:, 0, 0].astype(np.float64), 0.01, 0.99)
            return [np.stack([p, 1 - p], axis=1), np.zeros((len(x), 5))]

    class Store:
        def load(self, split, fname):
            return {"a": np.full((4, 1), 0.2, np.float32), "b": np.full((2, 1), 0.7, np.float32)}[fname]

    out = trainer.predict_clips(TwoOutputs(), Store(), "train", ["a", "b"], window=2, hop=2,
                                normalizer=Normalizer(None), batch_size=4)
    np.testing.assert_allclose(out, [[0.2, 0.8], [0.7, 0.3]], atol=1e-6)
    assert trainer.predict_fixed_batches(TwoOutputs(), np.zeros((0, 2, 1)), 4).shape == (0, 2)


def test_class_weights_reach_the_classification_output_only(store):
    spec = _spec(loss="triplet", triplet_strategy="batch_all", class_weight="balanced", lr=1e-12)
    spec["params"]["dropout"] = 0.0
    model = trainer.build_compiled(spec, (8, 12, 1), N_CLASSES)
    batches = trainer.WindowBatches(store, _rows(store), N_CLASSES, 8, spec["train"], Normalizer(None), seed=1)
    x, y, weights = batches[0]
    weighted = trainer.sample_weights(model, (x, y, weights))
    assert weighted[0] is weights["predictions"] and weighted[1] is None
    _, ce_w, triplet_w = model.train_on_batch(x, y, sample_weight=weighted)
    _, ce, triplet = model.train_on_batch(x, y)
    assert triplet_w == pytest.approx(triplet, rel=1e-5) and triplet > 0
    assert ce_w != pytest.approx(ce, rel=1e-3)
