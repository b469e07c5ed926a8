"""Feature extraction: decode each clip once, compute every missing cached feature,
in parallel over clips (joblib), and write ``clips.csv`` (every clip's status).

The stage ``python -m pipeline.features`` calls :func:`run_features`.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from pipeline.audio import AudioError, preprocess, read_audio
from pipeline.cache import FeatureStore, describe, feature_stores
from pipeline.clips import usable_rows
from pipeline.config import model_config, verifier_config
from pipeline.dataset import Dataset, load_dataset
from pipeline.executor import Job, make_executor
from pipeline.fingerprints import clips_hash, file_identity
from pipeline.hierarchical import check_meta_classes
from pipeline.spectral import compute_feature
from pipeline.workdir import WorkDir, atomic_write_csv

log = logging.getLogger("features")


def needed_features(cfg: dict) -> list[str]:
    """Features used by the listed models (``feature:`` and every name in
    ``features: [...]``, following ``embeddings_from`` to the source model),
    the pseudo-label verifiers and the stacker."""
    specs = [model_config(cfg, m) for m in cfg["run"]["models"]]
    if cfg["pseudo_label"]["enabled"]:
        specs += [verifier_config(cfg, m) for m in cfg["pseudo_label"]["verifiers"]]
    names: list[str] = []
    for spec in specs:
        if spec.get("embeddings_from"):  # a model on embeddings needs its source model's feature
            spec = model_config(cfg, spec["embeddings_from"])
        many = spec.get("features") or []  # handcrafted models read several: features: [mfcc, logmel]
        for feat in [spec.get("feature")] + ([many] if isinstance(many, str) else list(many)):
            if feat in cfg["features"] and feat not in names:
                names.append(feat)
    mfcc = cfg["stacking"]["mfcc_feature"]
    if mfcc and mfcc in cfg["features"] and mfcc not in names:
        names.append(mfcc)
    return names


def _process_clips(split: str, tasks, stores: dict[str, FeatureStore], audio_cfg: dict):
    """Worker: compute the missing features of ``tasks`` (fname, path,
    [feature names]) and store them as one shard per feature.
    Returns (seconds of audio decoded, clips done, [bad clip records], busy seconds)."""
    start = time.perf_counter()
    seconds, bad = 0.0, []
    arrays = {name: {} for name in stores}
    rejected = {name: {} for name in stores}
    with threadpool_limits(1):  # parallelism is across clips; BLAS threads only contend
        for fname, path, names, _ident in tasks:
            try:
                y, sr = read_audio(path)
                seconds += len(y) / sr
                by_rate: dict[int, np.ndarray] = {}
                for name in names:
                    store = stores[name]
                    if store.sr not in by_rate:
                        by_rate[store.sr] = preprocess(
                            y, sr, store.sr, trim_top_db=audio_cfg["trim_top_db"],
                            silence_peak=audio_cfg["silence_peak"], path=path)
                    arrays[name][fname] = compute_feature(store.kind, by_rate[store.sr], store.sr,
                                                          store.compute_params())
            except AudioError as exc:
                for name in names:
                    arrays[name].pop(fname, None)
                    rejected[name][fname] = {"reason": exc.reason, "detail": exc.detail}
                bad.append((split, fname, exc.reason, exc.detail))
    ids = {fname: ident for fname, _path, _names, ident in tasks}
    for name, store in stores.items():
        if arrays[name] or rejected[name]:
            store.write_shard(split, arrays[name], rejected[name], ids)
    return seconds, len(tasks), bad, time.perf_counter() - start


#: what one chunk of clips asks a Ray cluster for: one core (its BLAS pools are limited to one thread), no GPU
FEATURE_JOB_RESOURCES = {"num_cpus": 1.0, "num_gpus": 0.0}


def compute_missing(dataset: Dataset, stores: dict[str, FeatureStore], audio_cfg: dict,
                    n_jobs: int = -1, chunk_size: int = 64, progress: bool = True, executor=None,
                    work: WorkDir | None = None) -> dict:
    """Compute every (clip, feature) not in the cache yet. Returns run statistics.

    Chunks of ``chunk_size`` clips run in parallel: joblib's workers on this
    machine, or with a Ray ``executor`` (``run.executor: ray``) one Ray job
    per chunk (README, "Running on Ray": joblib's own Ray backend was measured
    and not used)."""
    for store in stores.values():
        store.ensure_dir()
    chunks, n_tasks = [], 0
    for split, fnames in (("train", dataset.train["fname"].tolist()), ("test", dataset.test_fnames)):
        tasks = []
        for fname in fnames:
            path = dataset.audio_path(split, fname)
            ident = file_identity(path)
            # a clip whose audio file changed since it was cached is computed again
            missing = [n for n, s in stores.items() if not s.is_done(split, fname, ident)]
            if missing:
                tasks.append((fname, str(path), missing, ident))
        chunks += [(split, tasks[i:i + chunk_size]) for i in range(0, len(tasks), chunk_size)]
        n_tasks += len(tasks)
    total = len(dataset.train) + len(dataset.test_fnames)
    log.info("%d of %d clips need features (%d cached)", n_tasks, total, total - n_tasks)
    stats = {"clips": 0, "seconds": 0.0, "wall": 0.0, "busy": 0.0, "bad": []}
    if not chunks:
        return stats
    start = time.perf_counter()
    if executor is not None and executor.concurrent:  # Ray: one job per chunk, on any node with a free core
        # absolute paths: a Ray worker's working directory is not this process's
        chunks = [(split, [(f, os.path.abspath(path), names, ident) for f, path, names, ident in chunk])
                  for split, chunk in chunks]
        jobs = [Job(f"features {split} chunk {i}", _process_clips, (split, chunk, stores, audio_cfg),
                    dict(FEATURE_JOB_RESOURCES), work=None if work is None else str(work.root.absolute()),
                    needs=(str(Path(chunk[0][1]).parent),))  # the audio folder too must be visible there
                for i, (split, chunk) in enumerate(chunks)]
        results = executor.run(jobs)
        n_workers = min(executor.parallelism(), len(chunks))
    else:
        n_workers = os.cpu_count() if n_jobs in (-1, None) else max(1, int(n_jobs))
        n_workers = min(n_workers, len(chunks))
        runner = Parallel(n_jobs=n_workers, return_as="generator_unordered", batch_size=1)
        results = runner(delayed(_process_clips)(split, chunk, stores, audio_cfg) for split, chunk in chunks)
    with tqdm(total=n_tasks, unit="clip", desc="features", disable=not progress or executor is not None
              and executor.concurrent) as bar:
        for seconds, n, bad, busy in results:
            stats["seconds"] += seconds
            stats["busy"] += busy
            stats["clips"] += n
            stats["bad"].extend(bad)
            bar.update(n)
    stats["wall"] = time.perf_counter() - start
    for store in stores.values():
        pruned = store.prune("train") + store.prune("test")
        if pruned:
            log.info("%s: removed %d shard(s) whose clips were all recomputed", store.name, pruned)
    stats["workers"] = n_workers
    for split, fname, reason, detail in stats["bad"]:
        log.warning("bad clip %s/%s: %s %s", split, fname, reason, detail)
    return stats


def clip_table(dataset: Dataset, stores: dict[str, FeatureStore]) -> pd.DataFrame:
    """Status and duration of every clip (``clips.csv``). A clip is bad if
    any feature rejected it; duration comes from the file header."""
    rows = []
    for split, fnames in (("train", dataset.train["fname"].tolist()), ("test", dataset.test_fnames)):
        for fname in fnames:
            status, error = "ok", ""
            for store in stores.values():
                bad = store.bad_reason(split, fname)
                if bad:
                    status, error = bad["reason"], bad["detail"]
                    break
            path = dataset.audio_path(split, fname)
            try:
                info = sf.info(str(path))
                duration = info.frames / info.samplerate if info.samplerate else 0.0
                channels, rate = info.channels, info.samplerate
            except Exception:
                duration, channels, rate = float("nan"), 0, 0
            size, mtime_ns = file_identity(path) or (-1, -1)
            rows.append({"fname": fname, "split": split, "status": status, "duration_s": round(duration, 4),
                         "channels": channels, "sample_rate": rate, "error": error,
                         "size": size, "mtime_ns": mtime_ns})
    return pd.DataFrame(rows)


def run_features(cfg: dict, data_dir, work: WorkDir, progress: bool = True) -> pd.DataFrame:
    dataset = load_dataset(data_dir)
    check_meta_classes(cfg, dataset.classes)  # a bad grouping is refused now, not after the training of other models
    names = needed_features(cfg)
    stores = feature_stores(work, cfg, names)
    for store in stores.values():
        log.info("feature %s -> %s", describe(store), store.root)
    fcfg = cfg["feature_extraction"]
    with make_executor(cfg, work, "features", progress) as executor:  # Ray starts only if a clip needs work
        stats = compute_missing(dataset, stores, cfg["audio"], n_jobs=fcfg["n_jobs"], chunk_size=fcfg["chunk_size"],
                                progress=progress, executor=executor, work=work)
    clips = clip_table(dataset, stores)
    atomic_write_csv(clips, work.clips_csv)
    ok_rows = usable_rows(clips, "train")
    ok_train = ok_rows["fname"].tolist()
    source = clips_hash(ok_rows)  # statistics are redone when the training clips or their audio change
    for store in stores.values():
        have = store.stats()
        if have is None or have.get("source") != source:
            store.compute_stats(ok_train, seed=cfg["seed"], source=source)
    n_bad = int((clips.status != "ok").sum())
    if stats["clips"]:
        speed = stats["seconds"] / max(stats["wall"], 1e-9)
        log.info("features: %d clips, %.1f s of audio in %.1f s = %.0fx real time (%.0fx per core, %d workers); "
                 "%d bad clip(s)", stats["clips"], stats["seconds"], stats["wall"], speed,
                 speed / stats["workers"], stats["workers"], n_bad)
    else:
        log.info("features: everything cached (%d clips, %d bad)", len(clips), n_bad)
    return clips
