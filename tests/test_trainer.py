"""The shared fold trainer: deterministic, resumable, honest out-of-fold."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.callbacks as callbacks
import pipeline.trainer as trainer
from pipeline.cache import feature_stores
from pipeline.config import model_config
from pipeline.extraction import run_features
from pipeline.normalize import Normalizer
from pipeline.cv import run_folds
from pipeline.fold_training import train_model
from pipeline.workdir import WorkDir, read_json


def _cfg(tiny_cfg):
    cfg = dict(tiny_cfg)
    cfg["training"] = {**cfg["training"], "epochs": 3, "batch_size": 8, "early_stop_patience": 5,
                       "eval_batch_size": 16, "bn_momentum": 0.9, "mixup_alpha": 0.5}
    cfg["models"] = {"m_logmel": {"builder": "cnn_ref", "feature": "logmel", "window": 16,
                                  "params": {"filters": [4, 8], "dropout": 0.2}}}
    cfg["run"] = {"models": ["m_logmel"]}
    return cfg


@pytest.fixture
def prepared(tmp_path, tiny_dataset_ro, tiny_cfg):
    cfg = _cfg(tiny_cfg)
    work = WorkDir(tmp_path / "work")
    run_features(cfg, tiny_dataset_ro.root, work, progress=False)
    run_folds(cfg, tiny_dataset_ro.root, work)
    return cfg, work, tiny_dataset_ro.root


def _fold_args(cfg, work):
    import pandas as pd
    spec = model_config(cfg, "m_logmel")
    store = feature_stores(work, cfg, ["logmel"])["logmel"]
    folds = pd.read_csv(work.folds_csv)
    classes = sorted(folds.label.unique())
    tr, va = folds[folds.fold != 0], folds[folds.fold == 0]
    rows = trainer.TrainRows(tr.fname.tolist(), tr.label.map(classes.index).to_numpy(),
                             np.full(len(tr), 0.05, np.float32), tr.manually_verified.to_numpy())
    return dict(spec=spec, store=store, rows=rows, val_fnames=va.fname.tolist(),
                val_labels=va.label.map(classes.index).to_numpy(), test_fnames=[], n_classes=len(classes),
                seed=1, fold=0, fingerprint="fp", progress=False)


def test_interrupted_fold_resumes_to_the_same_result(prepared, tmp_path, monkeypatch):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    full = trainer.train_fold(out_dir=tmp_path / "a", **args)

    real_write = callbacks.atomic_write_json  # the checkpoint callback writes state.json
    calls = {"n": 0}

    def crash_after_first_epoch(obj, path):
        real_write(obj, path)
        if path.name == "state.json":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt("simulated kill after epoch 1")

    monkeypatch.setattr(callbacks, "atomic_write_json", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_fold(out_dir=tmp_path / "b", **args)
    monkeypatch.setattr(callbacks, "atomic_write_json", real_write)
    state = read_json(tmp_path / "b" / "state.json")
    assert state["epoch"] == 0 and not state["finished"]
    resumed = trainer.train_fold(out_dir=tmp_path / "b", **args)
    assert resumed.summary["epochs_run"] == full.summary["epochs_run"] == 3
    np.testing.assert_allclose(resumed.oof, full.oof, atol=1e-4)


def test_same_config_same_predictions(prepared, tmp_path):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    a = trainer.train_fold(out_dir=tmp_path / "a", **args)
    b = trainer.train_fold(out_dir=tmp_path / "b", **args)
    np.testing.assert_allclose(a.oof, b.oof, atol=1e-5)
    assert a.summary["val_map3"] == pytest.approx(b.summary["val_map3"])


def test_train_stage_is_out_of_fold_and_skips_finished_folds(prepared, caplog):
    import pandas as pd
    cfg, work, data = prepared
    cfg["training"]["epochs"] = 1
    result = train_model(cfg, data, work, "m_logmel", progress=False)
    folds = pd.read_csv(work.folds_csv)
    oof = pd.read_csv(work.oof_csv("m_logmel"))
    assert list(oof.fname) == list(folds.fname)
    assert (oof["fold"].to_numpy() == folds["fold"].to_numpy()).all()
    # each fold model trained only on the other folds' clips
    for k in range(int(folds.fold.max()) + 1):
        summary = read_json(work.fold_dir("m_logmel", k) / "summary.json")
        assert summary["train_clips"] == int((folds.fold != k).sum())
    test = pd.read_csv(work.test_csv("m_logmel"))
    probs = test.drop(columns="fname").to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert 0.0 <= result["oof_map3"] <= 1.0
    caplog.clear()
    with caplog.at_level("INFO"):
        train_model(cfg, data, work, "m_logmel", progress=False)
    assert "skipping" in caplog.text and "training on" not in caplog.text
    cfg["training"]["epochs"] = 2  # a changed setting retrains
    caplog.clear()
    with caplog.at_level("INFO"):
        train_model(cfg, data, work, "m_logmel", progress=False)
    assert "training on" in caplog.text


def test_predict_clips_geometric_mean_over_windows():
    class Const:
        output_shape = (None, 2)

        def predict_on_batch(self, x):
            # window probability depends on the window's first value
            p = np.clip(x[:, 0, 0].astype(np.float64), 0.01, 0.99)
            return np.stack([p, 1 - p], axis=1)

    class Store:
        def load(self, split, fname):
            return {"a": np.array([[0.2], [0.2], [0.8], [0.8]], np.float32),
                    "b": np.array([[0.5]], np.float32)}[fname]

    out = trainer.predict_clips(Const(), Store(), "train", ["a", "b"], window=2, hop=2,
                                normalizer=Normalizer(None), batch_size=4)
    g1, g0 = np.sqrt(0.2 * 0.8), np.sqrt(0.8 * 0.2)
    np.testing.assert_allclose(out[0], [g1 / (g1 + g0), g0 / (g1 + g0)], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.5, 0.5], atol=1e-6)


def test_reused_compiled_model_matches_a_fresh_one(prepared, tmp_path):
    cfg, work, _ = prepared
    args = _fold_args(cfg, work)
    cache: dict = {}
    trainer.train_fold(out_dir=tmp_path / "warm0", model_cache=cache, **args)
    assert len(cache) == 1
    second = dict(args, fold=1)
    reused = trainer.train_fold(out_dir=tmp_path / "warm1", model_cache=cache, **second)
    fresh = trainer.train_fold(out_dir=tmp_path / "cold1", **second)
    np.testing.assert_allclose(reused.oof, fresh.oof, atol=1e-5)
