"""Handcrafted-feature level-1 models (pipeline/handcrafted.py): clip
statistics by hand, bad clips, no leakage from held-out clips, determinism."""
from __future__ import annotations

import joblib
import numpy as np
import pytest

from pipeline import handcrafted as hc
from pipeline.cache import FeatureStore
from pipeline.config import ConfigError, load_config, model_config
from pipeline.extraction import needed_features
from pipeline.metrics import map_at_3
from pipeline.spectral import deltas
from pipeline.trainer import TrainRows
from pipeline.workdir import WorkDir
from stacking.features import clip_statistics, mfcc_statistic_names, mfcc_statistics

N_MFCC, N_MELS = 3, 4


def make_stores(root, n_mfcc=N_MFCC, n_mels=N_MELS):
    work = WorkDir(root)
    mfcc = FeatureStore(work, "mfcc", {"kind": "mfcc", "n_mfcc": n_mfcc}, {})
    logmel = FeatureStore(work, "logmel", {"kind": "logmel", "n_mels": n_mels, "dtype": "float16"}, {})
    for s in (mfcc, logmel):
        s.ensure_dir()
    return {"mfcc": mfcc, "logmel": logmel}


# ---------------------------------------------------------------------------
# statistics
def test_time_statistics_by_hand():
    a = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [10.0, 5.0]])
    out = hc.time_statistics(a, ["mean", "std", "var", "min", "max", "skew", "p50"])
    x = a[:, 0]
    mu = 4.0
    m2 = ((x - mu) ** 2).mean()                       # (9 + 4 + 1 + 36) / 4
    m3 = ((x - mu) ** 3).mean()
    assert m2 == 12.5
    expected = [mu, 5, np.sqrt(m2), 0, m2, 0, 1, 5, 10, 5, m3 / m2 ** 1.5, 0, 2.5, 5]
    assert np.allclose(out, expected)
    # the stacker's four keep their layout
    assert np.allclose(clip_statistics(a), [10, 5, 1, 5, m2, 0, m3 / m2 ** 1.5, 0])


def test_segments_equal_clip_by_clip():
    rng = np.random.default_rng(0)
    clips = [rng.normal(size=(n, 5)) ** 3 for n in (1, 2, 7, 30)]
    stats = ["mean", "std", "min", "max", "skew", "p10", "p90"]
    together = hc.segment_statistics(np.concatenate(clips), [len(c) for c in clips], stats)
    one_by_one = np.stack([hc.time_statistics(c, stats) for c in clips])
    assert np.allclose(together, one_by_one)
    from scipy.stats import skew
    assert np.allclose(together[3, 20:25], skew(clips[3], axis=0, bias=True))
    assert (together[0, 20:25] == 0).all()   # one frame: no spread, no skewness
    with pytest.raises(ValueError):
        hc.segment_statistics(np.zeros((3, 2)), [1, 0, 2], ["mean"])
    with pytest.raises(ConfigError, match="unknown clip statistic"):
        hc.segment_statistics(np.zeros((3, 2)), [3], ["kurtosis"])


def test_matrix_layout_by_hand_and_bad_clips(tmp_path):
    stores = make_stores(tmp_path)
    rng = np.random.default_rng(1)
    m = rng.normal(size=(12, N_MFCC)).astype(np.float32)
    lm = rng.normal(size=(12, N_MELS, 3)).astype(np.float16)
    nan_clip = m.copy()
    nan_clip[3, 1] = np.nan
    stores["mfcc"].write_shard("train", {"a": m, "nan": nan_clip, "onlylm": np.zeros((0, N_MFCC))},
                               {"bad": {"reason": "silent"}})
    stores["mfcc"].write_shard("train", {"wide": np.zeros((5, N_MFCC + 1))}, {})  # a shard holds one width
    stores["logmel"].write_shard("train", {"a": lm, "nan": lm, "onlylm": lm}, {"bad": {"reason": "silent"}})
    stats = ["mean", "max"]
    X, names = hc.clip_statistics_matrix(stores, "train", ["a", "nan", "wide", "bad", "never", "onlylm"],
                                         stats=stats, return_names=True)
    widths = 2 * (N_MFCC + N_MFCC + 3 * N_MELS)
    assert X.shape == (6, widths + 1) and len(names) == X.shape[1]
    assert names[0] == "mfcc0_mean" and names[N_MFCC] == "mfcc0_max" and names[2 * N_MFCC] == "mfcc_d0_mean"
    assert names[4 * N_MFCC] == "logmel0_mean" and names[4 * N_MFCC + 2 * N_MELS] == "logmel_d0_mean"
    assert names[-1] == "mfcc_log_frames"
    d = deltas(m, 9).astype(np.float64)
    lm64 = lm.astype(np.float64)
    by_hand = np.concatenate([m.mean(0), m.max(0), d.mean(0), d.max(0)]
                             + [np.concatenate([lm64[:, :, c].mean(0), lm64[:, :, c].max(0)]) for c in range(3)]
                             + [[np.log1p(12)]])
    assert np.allclose(X[0], by_hand, atol=1e-6)
    # non-finite, misshaped, marked bad, missing, empty: NaN in that feature's columns only
    mfcc_cols = slice(0, 4 * N_MFCC)
    for row in range(1, 6):
        assert np.isnan(X[row, mfcc_cols]).all() and np.isnan(X[row, -1])
    assert np.allclose(X[1, 4 * N_MFCC:-1], X[0, 4 * N_MFCC:-1])   # "nan" has a fine log-mel
    assert np.isnan(X[2:5]).all()
    assert np.isfinite(X[5, 4 * N_MFCC:-1]).all()
    # the stacker's view of the same store: 4 statistics, no deltas, no length
    st = mfcc_statistics(stores["mfcc"], "train", ["a", "bad"])
    assert st.shape == (2, 4 * N_MFCC) and len(mfcc_statistic_names(N_MFCC)) == st.shape[1]
    assert np.allclose(st[0], clip_statistics(m)) and np.isnan(st[1]).all()


def test_repeated_calls_reuse_rows_and_match(tmp_path):
    stores = make_stores(tmp_path)
    rng = np.random.default_rng(2)
    stores["mfcc"].write_shard("train", {f"c{i}": rng.normal(size=(5 + i, N_MFCC)) for i in range(4)}, {})
    stores["logmel"].write_shard("train", {f"c{i}": rng.normal(size=(5 + i, N_MELS, 3)) for i in range(4)}, {})
    first = hc.clip_statistics_matrix(stores, "train", ["c0", "c1", "c2", "c3", "c0"])
    again = hc.clip_statistics_matrix(stores, "train", ["c3", "c1"])
    assert np.array_equal(first[[3, 1]], again) and np.array_equal(first[0], first[4])


# ---------------------------------------------------------------------------
# the models
CLASSES = 5          # class 4 never appears in training


def separable_fixture(root, n_per_class=24, seed=3):
    """Clips whose MFCC / log-mel levels depend on the class, random lengths."""
    rng = np.random.default_rng(seed)
    stores = make_stores(root)
    centres_m = rng.normal(scale=3.0, size=(CLASSES, N_MFCC))
    centres_l = rng.normal(scale=3.0, size=(CLASSES, N_MELS))
    fnames, labels, mf, lm = [], [], {}, {}
    for c in range(CLASSES - 1):
        for i in range(n_per_class):
            f = f"c{c}_{i}.wav"
            t = int(rng.integers(8, 40))
            mf[f] = centres_m[c] + rng.normal(size=(t, N_MFCC))
            base = centres_l[c] + rng.normal(size=(t, N_MELS))
            lm[f] = np.stack([base, np.gradient(base, axis=0), np.zeros_like(base)], axis=-1)
            fnames.append(f)
            labels.append(c)
    stores["mfcc"].write_shard("train", mf, {})
    stores["logmel"].write_shard("train", lm, {})
    test = {f"t{i}.wav": i % (CLASSES - 1) for i in range(12)}
    tm = {f: centres_m[c] + rng.normal(size=(15, N_MFCC)) for f, c in test.items()}
    tl = {f: np.stack([centres_l[c] + rng.normal(size=(15, N_MELS))] * 3, axis=-1) for f, c in test.items()}
    stores["mfcc"].write_shard("test", tm, {})
    stores["logmel"].write_shard("test", tl, {})
    return stores, np.array(fnames), np.array(labels), list(test), np.array(list(test.values()))


def spec_for(builder, **params):
    base = {"stats_lgbm": {"n_estimators": 40, "n_jobs": 1}, "stats_lr": {"C": 0.1, "n_jobs": 1}}[builder]
    return {"name": builder, "builder": builder, "features": ["mfcc", "logmel"], "window": 0,
            "params": {**base, **params}}


def split_rows(fnames, labels, verified=None):
    held = np.arange(len(fnames)) % 4 == 0
    verified = np.ones(len(fnames), int) if verified is None else verified
    rows = TrainRows(fnames=list(fnames[~held]), labels=labels[~held], epsilon=np.zeros((~held).sum(), np.float32),
                     verified=verified[~held])
    return rows, list(fnames[held]), labels[held]


@pytest.mark.parametrize("builder", ["stats_lgbm", "stats_lr"])
def test_fold_learns_separable_classes(tmp_path, builder):
    stores, fnames, labels, test_fnames, test_labels = separable_fixture(tmp_path / "w")
    rows, val_f, val_y = split_rows(fnames, labels)
    res = hc.train_handcrafted_fold(spec_for(builder), stores, rows, val_f, val_y, test_fnames, CLASSES,
                                    tmp_path / "fold0", seed=7, fold=0, fingerprint="fp")
    assert res.oof.shape == (len(val_f), CLASSES) and res.test.shape == (len(test_fnames), CLASSES)
    for p in (res.oof, res.test):
        assert np.allclose(p.sum(axis=1), 1.0) and (p > 0).all()
        assert (p[:, CLASSES - 1] < 1e-5).all()       # a class never trained on: tiny, not missing
    assert map_at_3(val_y, res.oof) > 0.95 and map_at_3(test_labels, res.test) > 0.95
    s = res.summary
    assert s["val_map3"] == map_at_3(val_y, res.oof) and s["train_clips"] == len(rows.fnames)
    assert s["best_epoch"] == 0 and s["epochs_run"] == 0 and s["fingerprint"] == "fp"
    assert s["input_shape"] == [2 * 5 * N_MFCC + 3 * 5 * N_MELS + 1] and s["params"] > 0
    assert s["backend"] == {"stats_lgbm": "lightgbm", "stats_lr": "sklearn"}[builder]
    for key in ("fold", "val_accuracy", "train_seconds", "samples_per_second"):
        assert key in s
    saved = joblib.load(tmp_path / "fold0" / "model.joblib")
    assert saved["classes"] == [0, 1, 2, 3] and len(saved["columns"]) == s["input_shape"][0]
    assert not list((tmp_path / "fold0").glob(".*tmp"))


@pytest.mark.parametrize("builder", ["stats_lgbm", "stats_lr"])
def test_no_leak_from_held_out_clips(tmp_path, builder, monkeypatch):
    stores, fnames, labels, test_fnames, _ = separable_fixture(tmp_path / "w")
    rows, val_f, val_y = split_rows(fnames, labels)
    seen = []
    real = hc.clip_statistics_matrix

    def spy(stores_, split, names, **kw):
        seen.append(list(names))
        return real(stores_, split, names, **kw)

    fitted = []
    for name in ("_fit_lgbm", "_fit_lr"):
        real_fit = getattr(hc, name)
        monkeypatch.setattr(hc, name, lambda X, y, w, est, seed, _f=real_fit: fitted.append(X.copy()) or _f(X, y, w, est, seed))
    monkeypatch.setattr(hc, "clip_statistics_matrix", spy)
    spec = spec_for(builder)
    a = hc.train_handcrafted_fold(spec, stores, rows, val_f, val_y, test_fnames, CLASSES, tmp_path / "a", 1, 0)
    # the training matrix was built from the training rows only, and that is what the model was fit on
    assert seen[0] == rows.fnames and not set(seen[0]) & set(val_f)
    assert len(fitted) == 1 and np.array_equal(fitted[0], real(stores, "train", rows.fnames,
                                                               **_stat_kwargs(spec)), equal_nan=True)
    # the held-out labels only score: altering them changes no prediction
    shuffled = (val_y + 1) % (CLASSES - 1)
    b = hc.train_handcrafted_fold(spec, stores, rows, val_f, shuffled, test_fnames, CLASSES, tmp_path / "b", 1, 0)
    assert np.array_equal(a.oof, b.oof) and np.array_equal(a.test, b.test)
    assert b.summary["val_map3"] < a.summary["val_map3"]
    # ... whereas training on the held-out clips with those altered labels does change them (the check has teeth)
    leaky = TrainRows(fnames=rows.fnames + val_f, labels=np.concatenate([rows.labels, shuffled]),
                      epsilon=np.zeros(len(rows.fnames) + len(val_f), np.float32),
                      verified=np.ones(len(rows.fnames) + len(val_f), int))
    c = hc.train_handcrafted_fold(spec, stores, leaky, val_f, val_y, test_fnames, CLASSES, tmp_path / "c", 1, 0)
    assert not np.allclose(a.oof, c.oof)


def _stat_kwargs(spec):
    stats, _ = hc.model_settings(spec)
    return dict(stats=stats["stats"], mfcc_deltas=stats["mfcc_deltas"], delta_width=stats["delta_width"],
                length=stats["length"])


@pytest.mark.parametrize("builder", ["stats_lgbm", "stats_lr"])
def test_deterministic_and_seeded(tmp_path, builder):
    stores, fnames, labels, test_fnames, _ = separable_fixture(tmp_path / "w")
    verified = (np.arange(len(fnames)) % 3 != 0).astype(int)
    rows, val_f, val_y = split_rows(fnames, labels, verified)
    spec = spec_for(builder)
    hc._MEMO.clear()
    runs = [hc.train_handcrafted_fold(spec, stores, rows, val_f, val_y, test_fnames, CLASSES, tmp_path / str(i), 5, 2)
            for i in range(2)]
    assert np.array_equal(runs[0].oof, runs[1].oof) and np.array_equal(runs[0].test, runs[1].test)
    if builder == "stats_lgbm":  # bagging and column sampling draw from the seed
        other = hc.train_handcrafted_fold(spec, stores, rows, val_f, val_y, test_fnames, CLASSES, tmp_path / "o", 6, 2)
        assert not np.array_equal(runs[0].oof, other.oof)
    # unverified rows weigh less: a different fit than with weight 1
    heavy = hc.train_handcrafted_fold(spec_for(builder, unverified_weight=1.0), stores, rows, val_f, val_y,
                                      test_fnames, CLASSES, tmp_path / "h", 5, 2)
    assert not np.allclose(runs[0].oof, heavy.oof)


def test_bad_clips_in_training_validation_and_test(tmp_path):
    stores, fnames, labels, test_fnames, _ = separable_fixture(tmp_path / "w")
    rng = np.random.default_rng(9)
    stores["mfcc"].write_shard("train", {"nanm.wav": np.full((9, N_MFCC), np.nan)}, {"gone.wav": {"reason": "empty"}})
    stores["logmel"].write_shard("train", {"nanm.wav": rng.normal(size=(9, N_MELS, 3))},
                                 {"gone.wav": {"reason": "empty"}})
    rows, val_f, val_y = split_rows(fnames, labels)
    rows = TrainRows(fnames=rows.fnames + ["gone.wav", "nanm.wav"], labels=np.concatenate([rows.labels, [0, 1]]),
                     epsilon=np.zeros(len(rows.fnames) + 2, np.float32), verified=np.ones(len(rows.fnames) + 2, int))
    for builder in hc.HANDCRAFTED_BUILDERS:
        res = hc.train_handcrafted_fold(spec_for(builder), stores, rows, val_f + ["nanm.wav", "gone.wav"],
                                        np.concatenate([val_y, [1, 0]]), test_fnames + ["missing.wav"], CLASSES,
                                        tmp_path / builder, 1, 0)
        assert np.isfinite(res.oof).all() and np.isfinite(res.test).all()
        assert np.allclose(res.oof.sum(axis=1), 1) and np.allclose(res.test.sum(axis=1), 1)
        assert res.summary["train_clips"] == len(rows.fnames) - 1   # the clip with no feature at all is left out


# ---------------------------------------------------------------------------
# settings and presets
def test_settings_checked():
    assert hc.is_handcrafted({"builder": "stats_lr"}) and not hc.is_handcrafted({"builder": "cnn_ref"})
    assert hc.handcrafted_features({"features": "mfcc"}) == ["mfcc"]
    with pytest.raises(ConfigError, match="features"):
        hc.handcrafted_features({"name": "x", "builder": "stats_lr"})
    with pytest.raises(ConfigError, match="n_estimator"):
        hc.model_settings(spec_for("stats_lgbm", n_estimator=3))
    with pytest.raises(ConfigError, match="unknown clip statistic"):
        hc.model_settings(spec_for("stats_lr", stats=["mean", "median"]))


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_presets_define_both_models(preset):
    cfg = load_config(preset, ["run.models=[stats_lgbm,stats_lr]"])
    for name in hc.HANDCRAFTED_BUILDERS:
        spec = model_config(cfg, name)
        assert hc.is_handcrafted(spec) and hc.handcrafted_features(spec) == ["mfcc", "logmel"]
        hc.model_settings(spec)   # every key known
    assert set(needed_features(cfg)) >= {"mfcc", "logmel"}
    assert "wave" not in needed_features(cfg)
