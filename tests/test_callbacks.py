"""The fold trainer's callbacks: config callbacks, plateau LR, early stopping,
exact resume, and checkpoints keyed by variable path."""
from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

import pipeline.callbacks as callbacks
import pipeline.trainer as trainer
from pipeline.workdir import read_json
from pipeline.config import ConfigError

N_CLASSES = 3


class MemoryStore:
    """A feature store in memory: clip ``c<k>_<i>`` of class k is noise plus a
    class-dependent offset on one mel band, so a tiny CNN learns something
    (and its held-out score moves from epoch to epoch)."""

    def __init__(self, n_per_class: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.clips, self.labels = {}, {}
        for k in range(N_CLASSES):
            for i in range(n_per_class):
                x = rng.normal(size=(int(rng.integers(10, 20)), 6, 1)).astype(np.float32)
                x[:, 2 * k] += 0.8
                self.clips[f"c{k}_{i}"] = x
                self.labels[f"c{k}_{i}"] = k

    def load(self, split, fname):
        return self.clips[fname]


def _spec(**train):
    tcfg = {"epochs": 4, "batch_size": 6, "lr": 3e-3, "lr_patience": 1, "lr_factor": 0.5, "early_stop_patience": 3,
            "eval_batch_size": 16, "mixup_alpha": 0.4, "bn_momentum": 0.9, "callbacks": []}
    tcfg.update(train)
    return {"name": "tiny", "builder": "cnn_ref", "window": 8, "normalize": False,
            "params": {"filters": [4], "dropout": 0.3}, "train": tcfg}


def _fold(store, spec, out_dir, **kw):
    names = sorted(store.clips)
    val = [f for f in names if f.endswith(("_0", "_1"))]
    tr = [f for f in names if f not in val]
    rows = trainer.TrainRows(tr, np.array([store.labels[f] for f in tr]), np.full(len(tr), 0.05, np.float32),
                             np.ones(len(tr), int))
    return trainer.train_fold(spec, store, rows, val, np.array([store.labels[f] for f in val]), [],
                              N_CLASSES, out_dir, seed=3, fold=1, fingerprint="fp", progress=False, **kw)


class Recorder(keras.callbacks.Callback):
    """A user callback named by dotted path in the config."""
    events: list = []

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def on_epoch_end(self, epoch, logs=None):
        Recorder.events.append((self.tag, epoch, dict(logs or {})))


class KillAt(keras.callbacks.Callback):
    """Simulates a kill in the middle of an epoch (after a finished epoch's checkpoint)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
            raise KeyboardInterrupt(f"simulated kill in epoch {self.epoch}")

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch


@pytest.fixture(scope="module")
def store():
    return MemoryStore()


@pytest.fixture(scope="module")
def with_user_callbacks(store, tmp_path_factory):
    """One fold trained with a dotted-path callback and a CSVLogger from the config."""
    Recorder.events.clear()
    spec = _spec(callbacks=[{"class": f"{__name__}.Recorder", "args": {"tag": "{fold_dir}/tag"}},
                            {"class": "CSVLogger", "args": {"filename": "{fold_dir}/keras_log.csv"}}])
    out = tmp_path_factory.mktemp("user") / "fold1"
    result = _fold(store, spec, out)
    return out, result, list(Recorder.events)


def test_config_callback_sees_val_map3_every_epoch(with_user_callbacks):
    out, result, events = with_user_callbacks
    assert [e[1] for e in events] == list(range(result.summary["epochs_run"]))
    history = pd.read_csv(out / "history.csv")
    for (tag, epoch, logs), (_, row) in zip(events, history.iterrows()):
        assert tag == f"{out}/tag"
        assert {"loss", "val_map3", "val_acc", "lr"} <= set(logs)
        assert logs["val_map3"] == pytest.approx(row["val_map3"]) and row["epoch"] == epoch + 1


def test_fold_dir_is_substituted_csvlogger_writes_in_the_fold(with_user_callbacks):
    out, result, _ = with_user_callbacks
    logged = pd.read_csv(out / "keras_log.csv")
    assert list(logged["epoch"]) == list(range(result.summary["epochs_run"]))
    history = pd.read_csv(out / "history.csv")
    np.testing.assert_allclose(logged["val_map3"], history["val_map3"])
    assert list(history.columns) == ["epoch", "loss", "val_map3", "val_acc", "lr"]


@pytest.mark.parametrize("entry, needle", [
    ({"class": "NoSuchCallback"}, "NoSuchCallback"),
    ({"class": "no_such_pkg.module.Thing"}, "no_such_pkg.module.Thing"),
    ({"class": "pipeline.metrics.map_at_3"}, "not a keras.callbacks.Callback"),
    ({"class": "CSVLogger", "args": {"nope": 1}}, "bad args"),
    ({"class": "CSVLogger", "argz": {}}, "unknown key 'argz'"),
])
def test_bad_callback_fails_fast_naming_the_key(store, tmp_path, entry, needle):
    entries = [{"class": "TerminateOnNaN"}, entry]
    with pytest.raises(ConfigError, match=r"training\.callbacks\[1\]") as err:
        callbacks.config_callbacks(entries, tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"training\.callbacks\[1\]"):  # before any training
        _fold(store, _spec(callbacks=entries), tmp_path / "fold1")
    assert not (tmp_path / "fold1").exists()


def _tiny_model(extra_layer: bool = False):
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="hidden")(inputs)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    if extra_layer:
        h = keras.layers.Dense(3, name="extra")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def _drive(cbs, model, scores):
    """Run the callbacks over epochs whose val_map3 are ``scores``; the rate
    each epoch trained with, and the epochs that ran."""
    cb_list = keras.callbacks.CallbackList(cbs, model=model, epochs=len(scores), steps=1)
    model.stop_training = False
    lrs, ran = [], []
    for epoch, score in enumerate(scores):
        cb_list.on_epoch_begin(epoch)
        lrs.append(round(float(model.optimizer.learning_rate.numpy()), 6))
        ran.append(epoch)
        cb_list.on_epoch_end(epoch, {"loss": 1.0, "val_map3": score})
        if model.stop_training:
            break
    return lrs, ran


def test_plateau_reduces_lr_after_patience_epochs_without_gain():
    model = _tiny_model()
    plateau = callbacks.PlateauLR(0.1, factor=0.5, patience=2, min_lr=0.02)
    lrs, _ = _drive([plateau], model, [0.5, 0.6, 0.6, 0.59, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6])
    # gains at epochs 0, 1, 4; two epochs without gain -> halve, floor 0.02
    assert lrs == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02]
    assert plateau.get_state() == {"lr": 0.02, "wait": 0, "best": 0.7}


def test_early_stop_after_patience_epochs_without_gain():
    model = _tiny_model()
    stop = callbacks.EarlyStop(3)
    _, ran = _drive([stop], model, [0.5, 0.6, 0.6, 0.6, 0.61, 0.6, 0.6, 0.6, 0.9, 0.9])
    assert ran == list(range(8)) and model.stop_training  # no gain in epochs 5, 6, 7 -> stop after 7
    assert stop.get_state() == {"wait": 3, "best": 0.61}


def test_checkpoint_of_another_model_is_refused(tmp_path):
    old = _tiny_model()
    callbacks.save_weights(old, tmp_path / "best.weights.npz")
    callbacks.save_checkpoint(old, tmp_path / "last.npz")
    with np.load(tmp_path / "best.weights.npz") as saved:
        assert set(saved.files) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    new = _tiny_model(extra_layer=True)
    before = [w.copy() for w in new.get_weights()]
    with pytest.raises(callbacks.CheckpointMismatch, match=r"best\.weights\.npz.*missing 2: extra/bias, extra/kernel"):
        callbacks.load_weights(new, tmp_path / "best.weights.npz")
    with pytest.raises(callbacks.CheckpointMismatch, match=r"last\.npz.*missing .*extra/kernel"):
        callbacks.load_checkpoint(new, tmp_path / "last.npz")
    for a, b in zip(before, new.get_weights()):  # nothing half-loaded
        np.testing.assert_array_equal(a, b)
    # the old, position-keyed layout is refused too, by name
    np.savez(tmp_path / "legacy.npz", **{f"w{i}": w for i, w in enumerate(old.get_weights())})
    with pytest.raises(callbacks.CheckpointMismatch, match=r"unexpected 4: w0, w1, w2, w3"):
        callbacks.load_weights(old, tmp_path / "legacy.npz")
    # and the same model takes it back, RNG and optimizer states included
    again = _tiny_model()
    callbacks.load_checkpoint(again, tmp_path / "last.npz")
    for a, b in zip(old.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_rng_states_are_found_by_stable_keys():
    a, b = _tiny_model(), _tiny_model()
    assert list(callbacks.rng_states(a)) == list(callbacks.rng_states(b)) == ["drop/seed_generator_state"]
    keys = callbacks.checkpoint_variables(a)
    assert "rng:drop/seed_generator_state" in keys and "optimizer:iteration" in keys


def test_resume_after_a_kill_is_exact(store, tmp_path):
    spec = _spec(epochs=5)
    full = _fold(store, spec, tmp_path / "full")
    killed = _spec(epochs=5, callbacks=[{"class": f"{__name__}.KillAt", "args": {"epoch": 3}}])
    with pytest.raises(KeyboardInterrupt):
        _fold(store, killed, tmp_path / "resumed")
    state = read_json(tmp_path / "resumed" / "state.json")
    assert state["epoch"] == 2 and not state["finished"]
    assert set(state["callbacks"]) == {"keep_best", "plateau_lr", "early_stop", "history", "clock"}
    assert state["callbacks"]["plateau_lr"]["lr"] < 3e-3, "the LR was reduced before the kill: its state matters"
    resumed = _fold(store, spec, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "history.csv").read_bytes() == (tmp_path / "full" / "history.csv").read_bytes()
    np.testing.assert_array_equal(resumed.oof, full.oof)
    drop = {"train_seconds", "samples_per_second"}
    assert {k: v for k, v in resumed.summary.items() if k not in drop} == \
        {k: v for k, v in full.summary.items() if k not in drop}
    history = pd.read_csv(tmp_path / "full" / "history.csv")
    assert history["lr"].nunique() > 1, "the run should cross a plateau, so the LR state matters"


def test_fold_that_finished_training_is_not_retrained(store, tmp_path, monkeypatch):
    spec = _spec(epochs=2)
    full = _fold(store, spec, tmp_path / "a")
    real = trainer.load_weights

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after training, before predicting")

    monkeypatch.setattr(trainer, "load_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        _fold(store, spec, tmp_path / "b")
    monkeypatch.setattr(trainer, "load_weights", real)
    assert read_json(tmp_path / "b" / "state.json")["finished"]
    Recorder.events.clear()
    again = _fold(store, _spec(epochs=2, callbacks=[{"class": f"{__name__}.Recorder", "args": {"tag": "x"}}]),
                  tmp_path / "b")
    assert Recorder.events == []  # no epoch ran
    np.testing.assert_array_equal(again.oof, full.oof)
    assert again.summary["epochs_run"] == 2


def test_mismatching_checkpoint_restarts_the_fold(store, tmp_path, monkeypatch, caplog):
    spec = _spec(epochs=3)
    killed = _spec(epochs=3, callbacks=[{"class": f"{__name__}.KillAt", "args": {"epoch": 1}}])
    with pytest.raises(KeyboardInterrupt):
        _fold(store, killed, tmp_path / "f")
    np.savez(tmp_path / "f" / "last.npz", w0=np.zeros(3))  # e.g. written by another model version
    with caplog.at_level("INFO"):
        result = _fold(store, spec, tmp_path / "f")
    assert "does not match the model" in caplog.text and "starting the fold afresh" in caplog.text
    assert result.summary["epochs_run"] == 3


def test_tensorboard_is_built_or_refused_up_front(tmp_path):
    import importlib.util
    entries = [{"class": "TensorBoard", "args": {"log_dir": "{fold_dir}/tb"}}]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"training\.callbacks\[0\] \(TensorBoard\): needs the tensorboard"):
            callbacks.config_callbacks(entries, tmp_path)
    else:
        (tb,) = callbacks.config_callbacks(entries, tmp_path)
        assert tb.log_dir == f"{tmp_path}/tb"


def test_trainer_uses_no_private_keras_attributes():
    import inspect
    import re
    for module in (trainer, callbacks):
        source = inspect.getsource(module)
        private = [m for m in re.findall(r"\b(\w+)\.(_[A-Za-z]\w*)", source) if m[0] != "self"]
        assert not private, f"{module.__name__}: {private}"
