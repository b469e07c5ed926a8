"""The sharded feature cache and the features stage on the tiny dataset."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError

from helpers import tiny_config
from pipeline.audio import preprocess, read_audio
from pipeline.cache import FeatureStore, feature_key_params, feature_stores
from pipeline.dataset import load_dataset
from pipeline.extraction import clip_table, compute_missing, needed_features, run_features
from pipeline.spectral import compute_feature
from pipeline.workdir import WorkDir, atomic_write_bytes

SPEC = {"kind": "logmel", "sr": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 16, "fmin": 20,
        "fmax": 8000, "delta_width": 9, "dtype": "float16"}
AUDIO = {"trim_top_db": 60, "silence_peak": 1.0e-4}


@pytest.fixture
def work(tmp_path):
    return WorkDir(tmp_path / "work")


# -- keys ---------------------------------------------------------------------

@pytest.mark.parametrize("param, value", [("sr", 22050), ("n_fft", 1024), ("hop_length", 160), ("n_mels", 32),
                                          ("fmin", 0), ("fmax", 7000), ("delta_width", 5), ("dtype", "float32")])
def test_key_changes_with_every_feature_parameter(work, param, value):
    base = FeatureStore(work, "logmel", SPEC, AUDIO)
    changed = FeatureStore(work, "logmel", {**SPEC, param: value}, AUDIO)
    assert changed.key != base.key
    assert changed.root != base.root


def test_key_holds_every_default_and_refuses_foreign_parameters(work):
    mfcc = FeatureStore(work, "m", {"kind": "mfcc"}, AUDIO)
    assert mfcc.spec["n_mfcc"] == 20 and mfcc.spec["fmax"] is None   # the kind's defaults are part of the key
    assert FeatureStore(work, "m", {"kind": "mfcc", "n_mfcc": 13}, AUDIO).key != mfcc.key
    assert FeatureStore(work, "m", {"kind": "mfcc", "n_mfcc": 20}, AUDIO).key == mfcc.key  # explicit default: same
    with pytest.raises(ConfigError, match="features.m.delta_width"):
        FeatureStore(work, "m", {"kind": "mfcc", "delta_width": 9}, AUDIO)
    with pytest.raises(ConfigError, match="unknown feature kind"):
        FeatureStore(work, "m", {"kind": "chroma"}, AUDIO)


@pytest.mark.parametrize("param, value", [("trim_top_db", 40), ("trim_top_db", None), ("silence_peak", 1e-3)])
def test_key_changes_with_audio_preprocessing(work, param, value):
    base = FeatureStore(work, "logmel", SPEC, AUDIO)
    assert FeatureStore(work, "logmel", SPEC, {**AUDIO, param: value}).key != base.key


def test_key_stable_otherwise(work, tmp_path):
    base = FeatureStore(work, "logmel", SPEC, AUDIO)
    reordered = dict(reversed(list(SPEC.items())))
    assert FeatureStore(work, "logmel", reordered, dict(reversed(list(AUDIO.items())))).key == base.key
    assert FeatureStore(WorkDir(tmp_path / "other"), "logmel", SPEC, AUDIO).key == base.key  # not the folder
    with pytest.raises(ConfigError, match="audio.unrelated: unknown setting"):
        FeatureStore(work, "logmel", SPEC, {**AUDIO, "unrelated": 3})
    assert base.root == work.root / "features" / f"logmel-{base.key}"
    assert feature_key_params(SPEC, AUDIO)["audio"] == AUDIO
    assert FeatureStore(work, "logmel2", SPEC, AUDIO).root != base.root


def test_key_changes_with_feature_version(work, monkeypatch):
    import pipeline.cache as cache
    base = FeatureStore(work, "logmel", SPEC, AUDIO).key
    monkeypatch.setattr(cache, "FEATURE_VERSION", 999)
    assert FeatureStore(work, "logmel", SPEC, AUDIO).key != base


# -- shards ---------------------------------------------------------------------

def _arrays(lengths, seed=0, tail=(16, 3)):
    rng = np.random.default_rng(seed)
    return {f"clip{i}.wav": rng.standard_normal((n,) + tail).astype(np.float32) for i, n in enumerate(lengths)}


def test_write_load_round_trip(work):
    store = FeatureStore(work, "logmel", SPEC, AUDIO)
    store.ensure_dir()
    assert json.loads((store.root / "params.json").read_text()) == json.loads(json.dumps(store.params))
    a1, a2 = _arrays([5, 1, 37], seed=1), {f"x{i}.wav": a for i, a in enumerate(_arrays([12, 3], seed=2).values())}
    store.write_shard("train", a1, {"bad.wav": {"reason": "silent", "detail": "peak below 0.0001"}})
    store.write_shard("train", a2, {})
    fresh = FeatureStore(work, "logmel", SPEC, AUDIO)       # a new reader sees what was written
    for fname, arr in {**a1, **a2}.items():
        assert fresh.is_done("train", fname)
        out = fresh.load("train", fname)
        assert isinstance(out, np.memmap)                 # a view into the memory-mapped shard
        assert out.dtype == np.float16 and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr.astype(np.float16))
        assert fresh.length("train", fname) == arr.shape[0]
    assert fresh.is_done("train", "bad.wav")
    assert fresh.bad_reason("train", "bad.wav") == {"reason": "silent", "detail": "peak below 0.0001"}
    assert fresh.bad_reason("train", "clip0.wav") is None
    with pytest.raises(ValueError, match="silent"):
        fresh.load("train", "bad.wav")
    with pytest.raises(FileNotFoundError):
        fresh.load("train", "never.wav")
    assert not fresh.is_done("test", "clip0.wav")          # splits are separate


def test_shard_with_only_bad_clips(work):
    store = FeatureStore(work, "logmel", SPEC, AUDIO)
    store.ensure_dir()
    shard = store.write_shard("test", {}, {"a.wav": {"reason": "unreadable", "detail": "x"}})
    assert not shard.with_suffix(".npy").exists()
    assert FeatureStore(work, "logmel", SPEC, AUDIO).bad_reason("test", "a.wav")["reason"] == "unreadable"


def test_recomputed_clips_win_and_superseded_shards_are_pruned(work):
    """A clip whose audio changed is recomputed into a newer shard: that one is
    read, and a shard none of whose clips is current any more is removed."""
    store = FeatureStore(work, "logmel", SPEC, AUDIO)
    store.ensure_dir()
    old = _arrays([4, 6], seed=1)
    keep = store.write_shard("train", {"other.wav": _arrays([3], seed=3)["clip0.wav"]}, {}, {"other.wav": [9, 9]})
    first = store.write_shard("train", old, {}, {f: [100, 1] for f in old})
    assert store.is_done("train", "clip0.wav", (100, 1)) and not store.is_done("train", "clip0.wav", (100, 2))
    new = _arrays([5, 7], seed=2)
    store.write_shard("train", new, {}, {f: [100, 2] for f in new})
    fresh = FeatureStore(work, "logmel", SPEC, AUDIO)
    assert fresh.is_done("train", "clip0.wav", (100, 2))
    np.testing.assert_array_equal(fresh.load("train", "clip1.wav"), new["clip1.wav"].astype(np.float16))
    assert fresh.prune("train") == 1
    assert not first.with_suffix(".index.json").exists() and not first.with_suffix(".npy").exists()
    assert keep.with_suffix(".index.json").exists() and fresh.is_done("train", "other.wav", (9, 9))


def test_index_less_shard_is_not_valid(work):
    store = FeatureStore(work, "logmel", SPEC, AUDIO)
    store.ensure_dir()
    arrays = _arrays([4, 6])
    shard = store.write_shard("train", arrays, {})
    index = shard.with_suffix(".index.json")
    assert index.exists() and shard.with_suffix(".npy").exists()
    # interrupted before the index was renamed into place: the .npy and a temp file remain
    index.rename(index.parent / f".{index.name}.1234.5678.tmp")
    fresh = FeatureStore(work, "logmel", SPEC, AUDIO)
    assert not any(fresh.is_done("train", f) for f in arrays)
    assert fresh.index("train") == {}


def test_npy_only_shard_is_not_valid(work):
    store = FeatureStore(work, "logmel", SPEC, AUDIO)
    store.ensure_dir()
    np.save(store.root / "train" / "shard-0123456789abcdef.npy", np.zeros((3, 16, 3), np.float16))
    (store.root / "train" / ".shard-0123456789abcdef.npy.1.2.tmp").write_bytes(b"half")
    assert FeatureStore(work, "logmel", SPEC, AUDIO).index("train") == {}


def test_atomic_write_success_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    atomic_write_bytes(target, b"again")
    assert target.read_bytes() == b"again"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")          # the write itself raises
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# -- the features stage -----------------------------------------------------------

def _stores(work, cfg):
    return feature_stores(work, cfg, needed_features(cfg))


def _run(dataset, work, cfg):
    stores = _stores(work, cfg)
    stats = compute_missing(dataset, stores, cfg["audio"], n_jobs=1, chunk_size=8, progress=False)
    return stores, stats


def test_compute_missing_end_to_end(tiny_dataset, work):
    ds = tiny_dataset
    cfg = tiny_config()
    dataset = load_dataset(ds.root)
    n_clips = len(ds.train) + len(ds.test_fnames)

    stores, stats = _run(dataset, work, cfg)
    assert set(stores) == {"logmel", "wave"}
    assert stats["clips"] == n_clips
    assert {(s, f): r for s, f, r, _d in stats["bad"]} == {(s, f): r for f, (s, r) in ds.bad.items()}
    for store in stores.values():
        for split, fnames in (("train", ds.train_fnames), ("test", ds.test_fnames)):
            for f in fnames:
                assert store.is_done(split, f)
                if f in ds.bad:
                    assert store.bad_reason(split, f)["reason"] == ds.bad[f][1]
                else:
                    arr = store.load(split, f)
                    assert arr.shape[0] > 0 and np.all(np.isfinite(arr))
    # shapes and dtypes of the two features
    f_stereo = ds.hard["stereo"][1]
    assert stores["logmel"].load("train", f_stereo).shape[1:] == (16, 3)
    assert stores["logmel"].load("train", f_stereo).dtype == np.float16
    wave = stores["wave"].load("train", ds.hard["sr44k"][1])
    assert wave.shape[1:] == (1,) and wave.dtype == np.float32
    assert np.max(np.abs(wave)) == pytest.approx(1.0, abs=1e-5)
    # the cached array equals a direct computation
    f24 = ds.hard["pcm24"][1]
    y, sr = read_audio(ds.path("train", f24))
    direct = compute_feature("logmel", preprocess(y, sr, 16000), 16000, stores["logmel"].compute_params())
    np.testing.assert_array_equal(stores["logmel"].load("train", f24), direct.astype(np.float16))

    # second call: nothing to do
    _, stats2 = _run(dataset, work, cfg)
    assert stats2["clips"] == 0 and stats2["bad"] == []

    # lose one shard's index (as if killed before it was written): only its clips are redone
    idx_path = sorted((stores["logmel"].root / "train").glob("shard-*.index.json"))[0]
    meta = json.loads(idx_path.read_text())
    lost = set(meta["fnames"]) | set(meta["bad"])
    before = {f: np.array(stores["logmel"].load("train", f)) for f in meta["fnames"]}
    idx_path.unlink()
    stores3, stats3 = _run(dataset, work, cfg)
    assert 0 < stats3["clips"] == len(lost)
    assert all(s == "train" for s, *_ in stats3["bad"])
    assert {f for _s, f, *_ in stats3["bad"]} == lost & set(ds.bad)
    for f, arr in before.items():
        np.testing.assert_array_equal(stores3["logmel"].load("train", f), arr)

    # a changed parameter is a new cache folder, computed from scratch; the other feature is untouched
    cfg4 = copy.deepcopy(cfg)
    cfg4["features"]["logmel"]["n_mels"] = 8
    stores4, stats4 = _run(dataset, work, cfg4)
    assert stores4["logmel"].root != stores["logmel"].root
    assert stores4["wave"].root == stores["wave"].root
    assert stats4["clips"] == n_clips
    assert stores4["logmel"].load("train", f_stereo).shape[1:] == (8, 3)
    assert stores["logmel"].root.is_dir()                      # the old cache is kept
    # a changed preprocessing setting moves every feature to a new folder
    cfg5 = copy.deepcopy(cfg)
    cfg5["audio"]["trim_top_db"] = 30
    stores5 = _stores(work, cfg5)
    assert set(stores5) == set(stores) and all(stores5[n].root != stores[n].root for n in stores)


def test_run_features_writes_clips_csv_and_stats(tiny_dataset, work):
    ds = tiny_dataset
    cfg = tiny_config()
    clips = run_features(cfg, ds.root, work, progress=False)
    on_disk = pd.read_csv(work.clips_csv, dtype={"fname": str}, keep_default_na=False)
    assert on_disk["fname"].tolist() == clips["fname"].tolist()
    for col in ("fname", "split", "status", "duration_s", "error"):
        assert col in on_disk.columns
    assert on_disk["fname"].tolist() == ds.train_fnames + ds.test_fnames      # one row per clip, in order
    assert on_disk["split"].tolist() == ["train"] * len(ds.train) + ["test"] * len(ds.test_fnames)
    expected = {f: "ok" for f in ds.train_fnames + ds.test_fnames}
    expected.update({f: status for f, (_s, status) in ds.bad.items()})
    assert dict(zip(on_disk["fname"], on_disk["status"])) == expected
    assert set(on_disk["status"]) <= {"ok", "unreadable", "empty", "silent"}
    bad_rows = on_disk[on_disk["status"] != "ok"]
    assert (bad_rows["error"] != "").all()
    durations = dict(zip(clips["fname"], clips["duration_s"]))
    assert durations[ds.hard["short"][1]] == pytest.approx(0.1)
    assert durations[ds.hard["empty"][1]] == 0.0
    assert np.isnan(durations[ds.hard["corrupt"][1]])
    # per-feature normalisation statistics
    for store in _stores(work, cfg).values():
        stats = json.loads(store.stats_path.read_text())
        assert stats["clips"] == len(ds.usable_train)
        assert len(stats["mean"]) == len(stats["std"])
        assert all(np.isfinite(stats["mean"])) and all(s > 0 for s in stats["std"])
    logmel_stats = json.loads(_stores(work, cfg)["logmel"].stats_path.read_text())
    assert len(logmel_stats["mean"]) == 3                      # per channel (log-mel, delta, delta-delta)
    wave_stats = json.loads(_stores(work, cfg)["wave"].stats_path.read_text())
    assert wave_stats["mean"] == [0.0] and wave_stats["std"] == [1.0]
    # a re-run recomputes nothing and rewrites the same table
    again = run_features(cfg, ds.root, work, progress=False)
    pd.testing.assert_frame_equal(again, clips)


def test_clip_table_marks_a_clip_bad_if_any_feature_rejects_it(tiny_dataset, work):
    ds = tiny_dataset
    cfg = tiny_config()
    dataset = load_dataset(ds.root)
    stores, _ = _run(dataset, work, cfg)
    table = clip_table(dataset, stores)
    assert len(table) == len(ds.train) + len(ds.test_fnames)
    assert table.set_index("fname").loc[ds.hard["silent"][1], "status"] == "silent"
