"""Handcrafted-feature level-1 models: per-clip statistics into LightGBM
(``stats_lgbm``) or logistic regression (``stats_lr``).

The baseline most people try first: summarise each clip's cached MFCC and
log-mel (with deltas) by statistics over time per coefficient / band (mean,
std, min, max, skewness, ...) and fit a classic classifier on that vector.
No Keras, no windows: one row per clip, seconds per fold on a CPU.

This module is also the repository's one implementation of clip
statistics: the stacker's MFCC statistics (:mod:`stacking.features`) call
:func:`clip_statistics_matrix` with its own choice of statistics.

Model entry (``models:`` in a preset)::

    stats_lgbm:
      builder: stats_lgbm
      features: [mfcc, logmel]
      window: 0
      params: {n_estimators: 300, learning_rate: 0.05, num_leaves: 15, unverified_weight: 0.6}

Every setting has a default and a doc in :mod:`pipeline.settings`
(``StatsLgbmParams``, ``StatsLrParams``); unknown keys are refused so a typo
is not silently ignored.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from pipeline.cache import FeatureStore
from pydantic import ValidationError

from pipeline.config import ConfigError
from pipeline.fingerprints import param_hash
from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import EPS
from pipeline.spectral import deltas
from pipeline.settings import HANDCRAFTED_PARAMS, StatsParams, describe_error
from pipeline.workdir import atomic_write_bytes

if TYPE_CHECKING:  # pipeline.trainer imports Keras; these models need none
    from pipeline.trainer import FoldResult, TrainRows

log = logging.getLogger("handcrafted")

HANDCRAFTED_BUILDERS = ("stats_lgbm", "stats_lr")

#: statistics over time that :func:`segment_statistics` knows, besides ``p<q>`` (percentile q, 0..100)
KNOWN_STATS = ("mean", "std", "var", "min", "max", "skew")

#: the settings, their defaults and the measurements behind them: pipeline.settings.StatsLgbmParams / StatsLrParams
DEFAULT_STATS = tuple(StatsParams().stats)
STAT_KEYS = ("stats", "mfcc_deltas", "delta_width", "length")  # the statistics' own settings; the rest: the estimator



def is_handcrafted(spec: dict) -> bool:
    return spec.get("builder") in HANDCRAFTED_BUILDERS


def handcrafted_features(spec: dict) -> list[str]:
    """The cached features a handcrafted model reads (``features: [...]``,
    or a single ``feature:``)."""
    feats = spec.get("features")
    if feats is None:
        feats = [spec["feature"]] if spec.get("feature") else []
    if isinstance(feats, str):
        feats = [feats]
    feats = [str(f) for f in feats]
    if not feats:
        raise ConfigError(f"model {spec.get('name', spec.get('builder'))!r}: a handcrafted model needs "
                          "`features: [...]` (e.g. [mfcc, logmel])")
    return feats


def model_settings(spec: dict) -> tuple[dict, dict]:
    """(statistics settings, estimator settings) of a model entry, defaults filled in."""
    builder = spec.get("builder")
    if builder not in HANDCRAFTED_BUILDERS:
        raise ConfigError(f"{builder!r} is not a handcrafted builder ({', '.join(HANDCRAFTED_BUILDERS)})")
    schema = HANDCRAFTED_PARAMS[builder]
    try:
        params = schema.model_validate(dict(spec.get("params") or {})).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"models.{spec.get('name', builder)}.params.{describe_error(exc, model=schema)}") from None
    stats = {k: params[k] for k in STAT_KEYS}
    est = {k: v for k, v in params.items() if k not in STAT_KEYS}
    stats["stats"] = check_stats(stats["stats"])
    return stats, est


# ---------------------------------------------------------------------------
# statistics over time
def check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    out = []
    for s in stats:
        s = str(s)
        if s not in KNOWN_STATS and not _percentile(s):
            raise ConfigError(f"unknown clip statistic {s!r} (known: {', '.join(KNOWN_STATS)}, p<q> e.g. p50)")
        out.append(s)
    if not out:
        raise ConfigError("no clip statistics selected")
    return tuple(out)


def _percentile(name: str) -> float | None:
    if name.startswith("p"):
        try:
            q = float(name[1:])
        except ValueError:
            return None
        return q if 0.0 <= q <= 100.0 else None
    return None


def segment_statistics(data: np.ndarray, lengths: Sequence[int], stats: Sequence[str]) -> np.ndarray:
    """Statistics over time of many clips at once.

    ``data`` (sum(lengths), C): the clips' frames concatenated on axis 0;
    returns (n_clips, len(stats) * C), statistic-major (all C values of the
    first statistic, then the second, ...). Moments are population
    (biased) ones: ``std``/``var`` divide by T, ``skew`` = m3 / m2^1.5 and is
    0 for a (numerically) constant coefficient or a one-frame clip.

    The moments, min and max are segment reductions (``np.ufunc.reduceat``)
    over all clips at once. Skewness is computed here rather than with
    ``scipy.stats.skew``, which works one clip at a time: measured on the
    2700 fsdd training clips (184 columns: MFCC 20 + deltas 20 + log-mel
    48 x 3; ~28 frames each), 0.18 s here vs 0.65 s for a per-clip
    ``scipy.stats.skew(bias=True)`` loop, same values (max abs difference
    1e-13) except that scipy gives NaN for the 287 constant columns.
    Percentiles (``p10``, ``p50``, ...) are a per-clip ``np.percentile``.
    """
    data = np.asarray(data, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if data.ndim != 2:
        raise ValueError(f"expected (frames, columns) data, got shape {data.shape}")
    if (lengths <= 0).any() or lengths.sum() != data.shape[0]:
        raise ValueError("segment lengths must be positive and sum to the number of frames")
    stats = check_stats(stats)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    count = lengths[:, None].astype(np.float64)
    need = set(stats)
    res: dict[str, np.ndarray] = {}
    mean = np.add.reduceat(data, starts, axis=0) / count
    res["mean"] = mean
    if need & {"min", "skew"}:
        res["min"] = np.minimum.reduceat(data, starts, axis=0)
    if need & {"max", "skew"}:
        res["max"] = np.maximum.reduceat(data, starts, axis=0)
    if need & {"std", "var", "skew"}:
        centred = data - np.repeat(mean, lengths, axis=0)
        sq = centred * centred
        m2 = np.add.reduceat(sq, starts, axis=0) / count
        res["var"], res["std"] = m2, np.sqrt(m2)
        if "skew" in need:
            m3 = np.add.reduceat(sq * centred, starts, axis=0) / count
            scale = np.maximum(1.0, np.maximum(np.abs(res["min"]), np.abs(res["max"])))
            flat = m2 <= 1e-12 * scale ** 2
            res["skew"] = np.where(flat, 0.0, m3 / np.where(flat, 1.0, m2) ** 1.5)
    qs = [(s, _percentile(s)) for s in stats if s not in KNOWN_STATS]
    if qs:  # a per-clip sort; no segment reduction for these
        pct = np.empty((len(qs), len(lengths), data.shape[1]))
        for i, (a, n) in enumerate(zip(starts, lengths)):
            pct[:, i] = np.percentile(data[a:a + n], [q for _, q in qs], axis=0)
        res.update({s: pct[j] for j, (s, _) in enumerate(qs)})
    return np.concatenate([res[s] for s in stats], axis=1)


def time_statistics(arr: np.ndarray, stats: Sequence[str]) -> np.ndarray:
    """One clip: (T, C) -> (len(stats) * C,), statistic-major."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    return segment_statistics(a.reshape(a.shape[0], -1), [a.shape[0]], stats)[0]


# ---------------------------------------------------------------------------
# per-feature blocks
def expected_shape(store: FeatureStore) -> tuple[int, ...] | None:
    """A clip array's shape after the time axis, from the feature's settings
    (None: unknown kind, taken from the first usable clip)."""
    if store.kind == "mfcc":
        return (int(store.spec["n_mfcc"]),)
    if store.kind == "logmel":
        return (int(store.spec["n_mels"]), 3)
    if store.kind == "vggish":
        return (64,)
    if store.kind == "wave":
        return (1,)
    return None


def _block_names(store: FeatureStore, shape: tuple[int, ...], mfcc_deltas: bool) -> list[tuple[str, int]]:
    """(prefix, width) of each block of a feature: a 3D feature (T, bands, C)
    gives one block per channel (log-mel: value, delta, delta-delta)."""
    name = store.name
    if len(shape) == 2:
        suffixes = ["", "_d", "_dd"] + [f"_c{c}" for c in range(3, shape[1])]
        return [(name + suffixes[c], shape[0]) for c in range(shape[1])]
    width = int(np.prod(shape))
    blocks = [(name, width)]
    if mfcc_deltas and store.kind == "mfcc":
        blocks.append((name + "_d", width))
    return blocks


def _blocks(store: FeatureStore, arr: np.ndarray, mfcc_deltas: bool, delta_width: int) -> np.ndarray:
    """(T, total width) float64: the blocks of one clip side by side."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 3:
        return a.transpose(0, 2, 1).reshape(a.shape[0], -1)  # channel-major: all bands of channel 0, ...
    a = a.reshape(a.shape[0], -1)
    if mfcc_deltas and store.kind == "mfcc":
        return np.concatenate([a, deltas(a.astype(np.float32), int(delta_width)).astype(np.float64)], axis=1)
    return a


def statistic_names(stores: Mapping[str, FeatureStore], stats: Sequence[str] = DEFAULT_STATS,
                    mfcc_deltas: bool = True, length: bool = True,
                    shapes: Mapping[str, tuple] | None = None) -> list[str]:
    """Column names of :func:`clip_statistics_matrix`: ``<block><i>_<stat>``
    (e.g. ``mfcc3_skew``, ``logmel_d10_std``), then ``<feature>_log_frames``."""
    names = []
    for key, store in stores.items():
        shape = (shapes or {}).get(key) or expected_shape(store)
        if shape is None:
            raise ValueError(f"{store.name}: unknown array shape; pass shapes=")
        for prefix, width in _block_names(store, tuple(shape), mfcc_deltas):
            names += [f"{prefix}{i}_{s}" for s in stats for i in range(width)]
    if length and stores:
        names.append(f"{next(iter(stores.values())).name}_log_frames")
    return names


# finished rows, kept between calls (the folds of one run read the same clips):
# (store root, split, settings) -> (fname, shard, offset, audio identity) -> row. Only usable
# clips are kept; a clip recomputed after its audio changed sits elsewhere in the cache
# (another shard, another identity), so an entry can not go stale.
_MEMO: dict[tuple, dict[tuple, np.ndarray]] = {}
_MEMO_ENTRIES = 8
_CHUNK_CELLS = 4_000_000  # float64 cells per segment reduction (32 MB)


def _load_usable(store: FeatureStore, split: str, fname: str, shape: tuple | None) -> np.ndarray | None:
    try:
        arr = store.load(split, fname)
    except (FileNotFoundError, ValueError, OSError, KeyError):
        return None
    if arr.ndim < 1 or arr.shape[0] == 0 or (shape is not None and tuple(arr.shape[1:]) != tuple(shape)):
        return None
    if not np.isfinite(arr).all():
        return None
    return arr


def _block_major(widths: Sequence[int], n_stats: int) -> np.ndarray:
    """Column order that turns statistic-major over all of a feature's
    columns into block by block, statistic-major within each block."""
    total, order, offset = sum(widths), [], 0
    for w in widths:
        for s in range(n_stats):
            order.extend(range(s * total + offset, s * total + offset + w))
        offset += w
    return np.asarray(order, dtype=np.int64)


def _store_statistics(store: FeatureStore, split: str, fnames: Sequence[str], stats: tuple[str, ...],
                      mfcc_deltas: bool, delta_width: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(n, width) statistics of one feature (NaN rows for unusable clips),
    (n,) frame counts (0: unusable) and the clip shape used."""
    shape = expected_shape(store)
    memo_key = (str(store.root), store.key, split, stats, bool(mfcc_deltas) and store.kind == "mfcc",
                int(delta_width))
    memo = _MEMO.get(memo_key, {})
    rows: dict[str, np.ndarray] = {}
    pending: list[tuple[str, np.ndarray]] = []
    cells = 0

    def flush():
        nonlocal pending, cells
        if pending:
            data = np.concatenate([b for _, b in pending], axis=0)
            out = segment_statistics(data, [len(b) for _, b in pending], stats)
            for (f, b), r in zip(pending, out):
                rows[f] = np.append(r, float(len(b)))  # the frame count rides along in the memo
        pending, cells = [], 0

    index = store.index(split)

    def where(fname):
        e = index.get(fname) or {}
        return fname, str(e.get("shard")), e.get("start"), tuple(e.get("id") or ())

    for fname in dict.fromkeys(fnames):  # each clip once
        hit = memo.get(where(fname))
        if hit is not None:
            rows[fname] = hit
            continue
        arr = _load_usable(store, split, fname, shape)
        if arr is None:
            continue
        if shape is None:
            shape = tuple(arr.shape[1:])
        block = _blocks(store, arr, mfcc_deltas, delta_width)
        pending.append((fname, block))
        cells += block.size
        if cells >= _CHUNK_CELLS:
            flush()
    flush()
    if shape is None:
        raise ValueError(f"{store.name} ({split}): no usable clip among {len(fnames)}, cannot size its statistics")
    blocks = [w for _, w in _block_names(store, shape, mfcc_deltas)]
    width = len(stats) * sum(blocks)
    out = np.full((len(fnames), width), np.nan)
    n_frames = np.zeros(len(fnames))
    for i, fname in enumerate(fnames):
        r = rows.get(fname)
        if r is not None:
            out[i], n_frames[i] = r[:-1], r[-1]
    out = out[:, _block_major(blocks, len(stats))]
    if rows:
        memo.update({where(f): r for f, r in rows.items()})
        _MEMO.pop(memo_key, None)
        _MEMO[memo_key] = memo  # most recent last
        while len(_MEMO) > _MEMO_ENTRIES:
            _MEMO.pop(next(iter(_MEMO)))
    return out, n_frames, shape


def clip_statistics_matrix(stores: Mapping[str, FeatureStore], split: str, fnames: Sequence[str], *,
                           stats: Sequence[str] = DEFAULT_STATS, mfcc_deltas: bool = True,
                           delta_width: int = 9, length: bool = True,
                           return_names: bool = False):
    """(n, F) statistics over time of every clip's cached features.

    Per feature, in ``stores`` order: blocks of columns (MFCC; its deltas
    when ``mfcc_deltas``; log-mel value, delta, delta-delta), each block
    ``len(stats)`` x its width, statistic-major (see
    :func:`statistic_names`); then, with ``length``, log(1 + frames) of the
    first feature. A clip whose feature is missing, marked bad, empty,
    misshaped or non-finite gets NaN in that feature's columns (and in the
    length column when it is the first feature); its other features are
    still filled. With ``return_names`` returns (matrix, names).
    """
    stats = check_stats(stats)
    fnames = list(fnames)
    parts, names, first_frames = [], [], None
    for key, store in stores.items():
        block, n_frames, shape = _store_statistics(store, split, fnames, stats, mfcc_deltas, delta_width)
        bad = int((n_frames == 0).sum())
        if bad:
            log.info("%s: %d of %d %s clip(s) have no usable %s feature: NaN statistics", store.name, bad,
                     len(fnames), split, store.name)
        parts.append(block)
        names += statistic_names({key: store}, stats, mfcc_deltas, length=False, shapes={key: shape})
        if first_frames is None:
            first_frames = n_frames
    if length and first_frames is not None:
        parts.append(np.where(first_frames > 0, np.log1p(first_frames), np.nan)[:, None])
        names.append(f"{next(iter(stores.values())).name}_log_frames")
    out = np.concatenate(parts, axis=1) if parts else np.zeros((len(fnames), 0))
    return (out, names) if return_names else out


# ---------------------------------------------------------------------------
# the models
def _sample_weights(verified: np.ndarray, unverified_weight) -> np.ndarray:
    w = np.ones(len(verified))
    if unverified_weight is not None:
        w[np.asarray(verified).astype(bool) == 0] = float(unverified_weight)
    return w


def full_proba(proba: np.ndarray, present: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class 0..n_classes-1: classes the model never saw
    get EPS, then rows are renormalised."""
    out = np.full((proba.shape[0], n_classes), EPS)
    out[:, np.asarray(present, dtype=int)] = np.maximum(proba, EPS)
    return out / out.sum(axis=1, keepdims=True)


class _ConstantModel:
    """Fewer than two classes to learn from: predict the training prior."""

    def __init__(self, labels: np.ndarray, weights: np.ndarray):
        self.classes_ = np.unique(labels)
        self.prior_ = np.array([weights[labels == c].sum() for c in self.classes_])
        self.prior_ = self.prior_ / self.prior_.sum()

    def predict_proba(self, X):
        return np.tile(self.prior_, (len(X), 1))


def _fit_lgbm(X, y, w, est: dict, seed: int):
    import lightgbm as lgb
    model = lgb.LGBMClassifier(
        objective="multiclass", n_estimators=int(est["n_estimators"]), learning_rate=float(est["learning_rate"]),
        num_leaves=int(est["num_leaves"]), max_depth=int(est["max_depth"]),
        min_child_samples=int(est["min_child_samples"]), colsample_bytree=float(est["colsample_bytree"]),
        subsample=float(est["subsample"]), subsample_freq=1 if float(est["subsample"]) < 1 else 0,
        reg_lambda=float(est["reg_lambda"]), max_bin=int(est["max_bin"]), n_jobs=int(est["n_jobs"]),
        random_state=int(seed), deterministic=True, force_row_wise=True, verbose=-1)
    model.fit(X, y, sample_weight=w)
    leaves = sum(int(t["num_leaves"]) for t in model.booster_.dump_model()["tree_info"])
    return model, leaves


def _fit_lr(X, y, w, est: dict, seed: int):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if str(est["C"]).lower() == "auto":
        n_min = int(np.bincount(y).min(initial=0)) if len(y) else 0
        folds = max(2, min(int(est["cv"]), n_min)) if n_min >= 2 else 2
        clf = LogisticRegressionCV(Cs=[float(c) for c in est["Cs"]], cv=folds, max_iter=int(est["max_iter"]),
                                   scoring="neg_log_loss", random_state=int(seed))
    else:
        clf = LogisticRegression(C=float(est["C"]), max_iter=int(est["max_iter"]), random_state=int(seed))
    # impute with the training mean (a column no training clip has: 0); standardise; fit
    model = Pipeline([("impute", SimpleImputer(strategy="mean", keep_empty_features=True)),
                      ("scale", StandardScaler()), ("lr", clf)])
    n_jobs = int(est["n_jobs"])
    with threadpool_limits(n_jobs if n_jobs > 0 else None):  # <= 0: every core
        model.fit(X, y, lr__sample_weight=w)
    lr = model.named_steps["lr"]
    return model, int(lr.coef_.size + lr.intercept_.size)


def train_handcrafted_fold(spec: dict, stores: Mapping[str, FeatureStore], rows: "TrainRows",
                           val_fnames: Sequence[str], val_labels: np.ndarray, test_fnames: Sequence[str],
                           n_classes: int, fold_dir, seed: int, fold: int, val_split: str = "train",
                           test_split: str = "test", fingerprint: str | None = None,
                           progress: bool = False) -> "FoldResult":
    """Fit one fold of a handcrafted model on ``rows`` only and predict the
    held-out clips (OOF) and the test clips; same contract as
    :func:`pipeline.trainer.train_fold` (``fingerprint``, when given, goes
    into the summary as there; ``progress`` is accepted and unused).

    Writes ``model.joblib`` (the fitted estimator, the column names and the
    classes it saw) into ``fold_dir``.
    """
    import joblib

    from pipeline.trainer import FoldResult  # lazy: pipeline.trainer imports Keras

    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    stat_cfg, est = model_settings(spec)
    feats = handcrafted_features(spec)
    missing = [f for f in feats if f not in stores]
    if missing:
        raise KeyError(f"model {spec.get('name')!r} reads feature(s) {missing}, not among the stores given "
                       f"({sorted(stores)})")
    stores = {f: stores[f] for f in feats}
    kw = dict(stats=stat_cfg["stats"], mfcc_deltas=bool(stat_cfg["mfcc_deltas"]),
              delta_width=int(stat_cfg["delta_width"]), length=bool(stat_cfg["length"]))
    start = time.perf_counter()
    X, names = clip_statistics_matrix(stores, rows.split, rows.fnames, return_names=True, **kw)
    y = np.asarray(rows.labels, dtype=int)
    w = _sample_weights(np.asarray(rows.verified), est["unverified_weight"])
    usable = ~np.isnan(X).all(axis=1)  # a clip with no usable feature at all teaches nothing
    X, y, w = X[usable], y[usable], w[usable]
    if len(y) == 0:
        raise ValueError(f"model {spec.get('name')!r} fold {fold}: no training clip has usable features")
    feature_seconds = time.perf_counter() - start

    start = time.perf_counter()
    builder = spec["builder"]
    backend = "lightgbm" if builder == "stats_lgbm" else "sklearn"
    model_seed = int(seed) * 1000 + int(fold)
    if len(np.unique(y)) < 2:
        model, n_params = _ConstantModel(y, w), 1
    elif builder == "stats_lgbm":
        model, n_params = _fit_lgbm(X, y, w, est, model_seed)
    else:
        model, n_params = _fit_lr(X, y, w, est, model_seed)
    train_seconds = time.perf_counter() - start

    def predict(split: str, fnames: Sequence[str]) -> np.ndarray:
        Z = clip_statistics_matrix(stores, split, list(fnames), **kw)
        return full_proba(model.predict_proba(Z), model.classes_, n_classes)

    oof = predict(val_split, val_fnames)
    test = predict(test_split, test_fnames) if len(test_fnames) else None
    buf = io.BytesIO()
    joblib.dump({"model": model, "columns": names, "classes": np.asarray(model.classes_).tolist(),
                 "n_classes": int(n_classes), "builder": builder, "settings": {**stat_cfg, **est},
                 "features": {f: s.key for f, s in stores.items()}}, buf)
    atomic_write_bytes(fold_dir / "model.joblib", buf.getvalue())
    val_labels = np.asarray(val_labels)
    summary = {
        "fold": fold, "best_epoch": 0, "epochs_run": 0,
        "val_map3": map_at_3(val_labels, oof), "val_accuracy": accuracy(val_labels, oof),
        "train_clips": int(len(y)), "train_seconds": round(train_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "samples_per_second": round(len(y) / max(train_seconds, 1e-9), 1),
        "params": int(n_params), "input_shape": [int(X.shape[1])], "backend": backend,
        "settings_hash": param_hash({**stat_cfg, **est, "stats": list(stat_cfg["stats"])}),
    }
    if fingerprint is not None:
        summary["fingerprint"] = fingerprint
    log.info("%s fold %d: %d clips x %d statistics, fit %.1f s, val MAP@3 %.4f", spec.get("name", builder), fold,
             len(y), X.shape[1], train_seconds, summary["val_map3"])
    return FoldResult(oof=oof, test=test, summary=summary)
