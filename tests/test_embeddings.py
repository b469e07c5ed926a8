"""Tests of the VGGish fine-tune -> embeddings -> multi-level attention path:
the preset entries, ``pipeline/embeddings.py`` (which extractor embeds which
clip, shapes, resumability, store key) and the balanced batch policy.

One tiny end-to-end run is shared by the module (tiny widths, 2 folds, 1
epoch): features -> folds -> train vggish -> embeddings; then mla trains on
the embeddings through ``pipeline.fold_training.train_model``.
"""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from helpers import make_tiny_dataset, synth_clip

import pipeline.fold_training
import pipeline.trainer
import pipeline.embedding_store as embedding_lib
from pipeline.config import load_config, model_config, resolve
from pipeline.dataset import load_dataset
from pipeline.embedding_store import (EmbeddingStore, clip_patches, compute_embeddings, embed_arrays, embedding_store,
                                 load_extractor, open_embedding_store)
from pipeline.extraction import run_features
from pipeline.cv import load_folds, run_folds
from pipeline.sampling import BATCH_POLICIES, balanced_batch_size, balanced_order
from pipeline.normalize import Normalizer
from pipeline.trainer import TrainRows
from pipeline.workdir import WorkDir, atomic_write_json, read_json

PATCH = 96


def tiny_cfg() -> dict:
    """The quick preset's vggish/mla entries at tiny sizes: 2 folds, 1 epoch."""
    cfg = load_config("quick")
    cfg["feature_extraction"] = {"n_jobs": 1, "chunk_size": 16}
    cfg["folds"] = {"n_folds": 2}
    cfg["training"].update(epochs=1, batch_size=8, eval_batch_size=64)
    cfg["models"]["vggish"]["params"] = {"width": 1 / 16, "hidden": 8}
    cfg["models"]["mla"]["params"] = {"units": 16, "levels": 2, "dropout": 0.1}
    cfg["run"]["models"] = ["vggish", "mla"]
    cfg["stacking"] = {"mfcc_feature": None}
    cfg["pseudo_label"]["enabled"] = False  # these tests are about embeddings: the given labels
    cfg["labels"] = {"source": "given"}
    return resolve(cfg)


def _lengthen(ds, rng) -> None:
    """Rewrite some regular clips longer (1.5-4.5 s), so clips have several patches."""
    hard = {fname for _split, fname in ds.hard.values()}
    regular_train = [f for f in ds.usable_train if f not in hard]
    for fname in regular_train[::2]:
        y = synth_clip(ds.label_of(fname), rng, ds.sr, duration=float(rng.uniform(1.5, 4.5)))
        sf.write(str(ds.path("train", fname)), y, ds.sr, subtype="PCM_16")
    for fname in [f for f in ds.test_fnames if f not in hard and f not in ds.bad][:2]:
        y = synth_clip(ds.label_of(fname), rng, ds.sr, duration=3.0)
        sf.write(str(ds.path("test", fname)), y, ds.sr, subtype="PCM_16")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    ds = make_tiny_dataset(root / "data", n_classes=3, clips_per_class=6, n_test=4, seed=3)
    _lengthen(ds, np.random.default_rng(7))
    cfg = tiny_cfg()
    work = WorkDir(root / "work")
    run_features(cfg, ds.root, work, progress=False)
    run_folds(cfg, ds.root, work)
    pipeline.fold_training.train_model(cfg, ds.root, work, "vggish", progress=False)
    store = embedding_store(cfg, work, "vggish", progress=False)
    clips = pd.read_csv(work.clips_csv, dtype={"fname": str})
    test_ok = clips[(clips.split == "test") & (clips.status == "ok")]["fname"].tolist()
    return SimpleNamespace(ds=ds, cfg=cfg, work=work, store=store, folds=load_folds(work), test_ok=test_ok)


def _reference(run, fname: str, split: str, fold: int) -> np.ndarray:
    """Recompute one clip's embeddings with fold ``fold``'s extractor."""
    src = run.store.source_store
    return embed_arrays(load_extractor(run.work, "vggish", fold), [src.load(split, fname)],
                        Normalizer(src.stats()))[0]


# -- preset ---------------------------------------------------------------------
def test_quick_preset_entries():
    cfg = load_config("quick")
    v = model_config(cfg, "vggish")
    assert (v["builder"], v["feature"], v["window"]) == ("vggish", "vggish", PATCH)
    assert v["train"]["eval_hop_fraction"] == 1.0
    assert v["train"].get("batch_policy", "unbalanced") in BATCH_POLICIES
    assert not v["params"].get("checkpoint") or v.get("normalize") is False
    m = model_config(cfg, "mla")
    assert (m["builder"], m["embeddings_from"], m["window"]) == ("mla", "vggish", 6)
    assert m["train"]["mixup_alpha"] == 0.2 and 0 < m["train"]["eval_hop_fraction"] <= 1


def test_clip_patches_are_complete_and_non_overlapping():
    arr = np.arange(250 * 2, dtype=np.float32).reshape(250, 2)
    p = clip_patches(arr)
    assert p.shape == (2, PATCH, 2)
    np.testing.assert_array_equal(p.reshape(-1, 2), arr[:2 * PATCH])
    short = clip_patches(arr[:40])  # shorter than a patch: repeated, never zero-padded
    assert short.shape == (1, PATCH, 2)
    np.testing.assert_array_equal(short[0, 40:80], arr[:40])


# -- the embeddings stage -----------------------------------------------------------
def test_every_usable_clip_has_its_patch_embeddings(run):
    store, src = run.store, run.store.source_store
    assert isinstance(store, EmbeddingStore) and store.kind == "embeddings" and store.n_folds == 2
    assert store.root == run.work.features_dir("embeddings-vggish", store.key)
    several = 0
    for k in range(2):
        split = store.train_split(k)
        for fname in run.folds["fname"]:
            e = store.load(split, fname)
            n = max(1, src.length("train", fname) // PATCH)
            assert e.shape == (n, 128) and e.dtype == np.float32 and np.isfinite(e).all()
            assert store.length(split, fname) == n
            several += n > 1
        assert set(store.index(split)) == set(run.folds["fname"])  # only the usable train clips
    assert several >= 6, "the fixture should have clips with several patches"
    for k in range(2):
        split = store.test_split(k)
        assert set(store.index(split)) == set(run.test_ok)  # the corrupt test clip has none
        for fname in run.test_ok:
            assert store.load(split, fname).shape == (max(1, src.length("test", fname) // PATCH), 128)
    with pytest.raises(ValueError, match="per fold"):
        store.load("test", run.test_ok[0])
    with pytest.raises(ValueError, match="per fold"):
        store.load("train", run.folds["fname"][0])
    st = store.stats()
    assert len(st["mean"]) == len(st["std"]) == 128 and min(st["std"]) > 0


def test_each_fold_split_is_in_its_own_extractors_space(run):
    """Fold k's split holds every train clip embedded by extractor k; its
    held-out clips are exactly the ones extractor k never trained on."""
    for k in range(2):
        held_out = run.folds[run.folds["fold"] == k]["fname"].tolist()
        trained_on = run.folds[run.folds["fold"] != k]["fname"].tolist()
        for fname in (max(held_out, key=lambda f: run.store.length(run.store.train_split(k), f)), trained_on[0]):
            got = run.store.load(run.store.train_split(k), fname)
            np.testing.assert_allclose(got, _reference(run, fname, "train", k), rtol=1e-3, atol=1e-4)
            assert not np.allclose(got, _reference(run, fname, "train", 1 - k), rtol=1e-3, atol=1e-4)


def test_test_clips_are_stored_per_fold_extractor(run):
    fname = max(run.test_ok, key=lambda f: run.store.length(run.store.test_split(0), f))
    e0 = run.store.load(run.store.test_split(0), fname)
    e1 = run.store.load(run.store.test_split(1), fname)
    np.testing.assert_allclose(e0, _reference(run, fname, "test", 0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(e1, _reference(run, fname, "test", 1), rtol=1e-3, atol=1e-4)
    assert not np.allclose(e0, e1, rtol=1e-3, atol=1e-4)


def test_key_follows_the_source_fingerprints(run, caplog):
    path = run.work.fold_dir("vggish", 1) / "summary.json"
    summary = read_json(path)
    try:
        atomic_write_json({**summary, "fingerprint": "0123456789abcdef"}, path)
        with caplog.at_level("WARNING", logger="embeddings"):
            other = open_embedding_store(run.cfg, run.work, "vggish", dataset=load_dataset(run.ds.root))
        assert other.key != run.store.key
        assert "trained with other settings" in caplog.text
    finally:
        atomic_write_json(summary, path)
    assert open_embedding_store(run.cfg, run.work, "vggish").key == run.store.key


def test_resumes_without_recomputing(run, monkeypatch):
    store = open_embedding_store(run.cfg, run.work, "vggish")

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is missing: no extractor should be loaded")

    with monkeypatch.context() as m:
        m.setattr(embedding_lib, "load_extractor", no_model)
        assert compute_embeddings(run.cfg, run.work, store, progress=False)["clips"] == 0
    before = {f: np.array(store.load(store.test_split(1), f)) for f in run.test_ok}
    # an interrupted fold: its marker and its shards gone -> only those clips are recomputed
    store.marker(1, store.test_split(1)).unlink()
    shutil.rmtree(store.root / store.test_split(1))
    store = open_embedding_store(run.cfg, run.work, "vggish")
    stats = compute_embeddings(run.cfg, run.work, store, progress=False)
    assert stats["clips"] == len(run.test_ok) and stats["folds_done"] == 1
    for f, e in before.items():
        np.testing.assert_allclose(store.load(store.test_split(1), f), e, rtol=1e-3, atol=1e-4)


def test_mla_trains_end_to_end_on_embeddings(run, monkeypatch):
    splits = set()
    original = EmbeddingStore.load

    def spy(self, split, fname):
        splits.add(split)
        return original(self, split, fname)

    monkeypatch.setattr(EmbeddingStore, "load", spy)
    result = pipeline.fold_training.train_model(run.cfg, run.ds.root, run.work, "mla", progress=False)
    # fold k trains, validates and predicts the test clips in extractor k's space only
    assert splits == {"train-fold0", "train-fold1", "test-fold0", "test-fold1"}
    assert result["input_shape"] == [6, 128] and 0.0 <= result["oof_map3"] <= 1.0
    oof = pd.read_csv(run.work.oof_csv("mla"), dtype={"fname": str})
    test = pd.read_csv(run.work.test_csv("mla"), dtype={"fname": str})
    assert oof["fname"].tolist() == run.folds["fname"].tolist()
    assert test["fname"].tolist() == run.ds.test_fnames
    probs = test[sorted(run.ds.classes)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


# -- batch policy -------------------------------------------------------------------
def test_balanced_order_has_one_clip_of_every_class_per_batch():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9 + [4] * 3)  # class 3 absent
    n = balanced_batch_size(labels)
    assert n == 4
    order = balanced_order(labels, 9, np.random.default_rng(0))
    batches = order.reshape(9, n)
    for batch in batches:
        assert sorted(labels[batch]) == [0, 1, 2, 4]
    uses = np.bincount(order, minlength=len(labels))
    for c in (0, 1, 2, 4):  # every clip of a class used evenly
        u = uses[labels == c]
        assert u.max() - u.min() <= 1


def test_window_batches_balanced_policy(run):
    labels = run.folds["label"].map({c: i for i, c in enumerate(sorted(run.ds.classes))}).to_numpy()
    rows = TrainRows(fnames=run.folds["fname"].tolist(), labels=labels,
                     epsilon=np.zeros(len(labels), np.float32), verified=np.ones(len(labels), int), split=run.store.train_split(0))
    tcfg = {"batch_policy": "balanced", "batch_size": 32, "mixup_alpha": 0.0}
    batches = pipeline.trainer.WindowBatches(run.store, rows, 3, 6, tcfg, Normalizer(None), seed=1)
    assert batches.batch_size == 3 and len(batches) == math.ceil(len(labels) / 3)
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        for i in range(len(batches)):
            x, y = batches[i][:2]
            assert x.shape == (3, 6, 128)
            assert sorted(np.argmax(y, axis=1)) == [0, 1, 2]
