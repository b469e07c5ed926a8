"""Benchmark the feature stage end to end (decode, resample, trim, feature, write).

    python -m benchmarks.bench_features --data ../shared/data/fsdd [--features logmel] [--jobs 2]
    python -m benchmarks.bench_features --data ../shared/data/fsdd --long 120   # 120 x 10 s files at 44.1 kHz
    python -m benchmarks.bench_features --data ../shared/data/fsdd --features logmel cqt gammatone \
        --clips 200 --jobs 1 --isolated

Reports seconds of audio per wall second ("x real time"), per core, and the
per-core speed inside the workers (excluding worker start-up). Each run uses
a fresh temporary work directory, so nothing is cached.

``--features`` takes names from the preset's ``features`` section or, for a
kind the preset does not list (cqt, gammatone), the kind at its defaults;
each is timed on its own. ``--clips N`` times a seeded sample of N training
clips instead of the whole dataset. ``--isolated`` also times the feature
function alone, in this process, on the same clips decoded and preprocessed
beforehand ("feature only": the cost the feature adds to the stage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from threadpoolctl import threadpool_limits

from pipeline.audio import AudioError, preprocess, read_audio, resample
from pipeline.cache import feature_settings, feature_stores
from pipeline.config import load_config
from pipeline.dataset import Dataset, load_dataset
from pipeline.extraction import compute_missing
from pipeline.settings import FEATURE_KINDS
from pipeline.spectral import compute_feature
from pipeline.workdir import WorkDir


def make_long_dataset(src: Path, out: Path, n_files: int, seconds: float = 10.0, sr: int = 44100,
                      seed: int = 0) -> Path:
    """FSDKaggle2018-like long clips (44.1 kHz 16-bit) made by concatenating
    the source dataset's clips, so the benchmark covers long files too."""
    rng = np.random.default_rng(seed)
    src_ds = load_dataset(src, check_files=False)
    pool = src_ds.train["fname"].tolist()
    (out / "audio_train").mkdir(parents=True, exist_ok=True)
    (out / "audio_test").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_files):
        parts, total = [], 0
        while total < seconds * sr:
            y, r = read_audio(src_ds.audio_path("train", pool[rng.integers(len(pool))]))
            y = resample(y, r, sr)
            parts.append(y)
            total += len(y)
        fname = f"long{i:04d}.wav"
        sf.write(out / "audio_train" / fname, np.concatenate(parts)[: int(seconds * sr)], sr, subtype="PCM_16")
        rows.append({"fname": fname, "label": "abc"[i % 3], "manually_verified": 1})  # the contract: >= 3 classes
    pd.DataFrame(rows).to_csv(out / "train.csv", index=False)
    sf.write(out / "audio_test" / "t0.wav", parts[0], sr, subtype="PCM_16")
    pd.DataFrame({"fname": ["t0.wav"], "label": ["a b"]}).to_csv(out / "sample_submission.csv", index=False)
    return out


def with_feature(cfg: dict, feature: str) -> dict:
    """``cfg`` with ``feature`` defined: a preset's feature as it is, else a known kind at its defaults."""
    if feature not in cfg["features"]:
        if feature not in FEATURE_KINDS:
            raise SystemExit(f"--features: {feature!r} is neither a feature of the preset "
                             f"({', '.join(cfg['features'])}) nor a kind ({', '.join(FEATURE_KINDS)})")
        cfg = {**cfg, "features": {**cfg["features"], feature: feature_settings(feature, {"kind": feature})}}
    return cfg


def sample_clips(dataset: Dataset, n_clips: int, seed: int = 0) -> Dataset:
    """A seeded sample of ``n_clips`` training clips and no test clips (0: the whole dataset)."""
    if not n_clips or n_clips >= len(dataset.train):
        return dataset
    return dataclasses.replace(dataset, train=dataset.train.sample(n=n_clips, random_state=seed), test_fnames=[])


def bench(data: Path, feature: str, jobs: int, config: str, n_clips: int = 0) -> dict:
    cfg = with_feature(load_config(config), feature)
    dataset = sample_clips(load_dataset(data), n_clips)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = WorkDir(tmp)
        stores = feature_stores(work, cfg, [feature])
        start = time.perf_counter()
        stats = compute_missing(dataset, stores, cfg.get("audio", {}), n_jobs=jobs, progress=False,
                                chunk_size=cfg.get("feature_extraction", {}).get("chunk_size", 16))
        wall = time.perf_counter() - start
    workers = stats.get("workers", 1)
    return {
        "data": str(data), "feature": feature, "kind": stores[feature].kind, "workers": workers,
        "clips": stats["clips"], "audio_s": round(stats["seconds"], 1), "wall_s": round(wall, 2),
        "x_realtime": round(stats["seconds"] / wall, 1),
        "x_realtime_per_core": round(stats["seconds"] / wall / workers, 1),
        "x_realtime_per_core_in_workers": round(stats["seconds"] / stats["busy"], 1),
    }


def bench_isolated(data: Path, features: list[str], config: str, n_clips: int = 0, repeats: int = 3) -> dict:
    """feature -> seconds of audio per second of the feature function alone (one core, best of ``repeats``),
    on the clips decoded and preprocessed (resampled, trimmed) beforehand. The audio seconds are the
    decoded clips' (before trimming), as the stage counts them."""
    cfg = load_config(config)
    for feature in features:
        cfg = with_feature(cfg, feature)
    dataset = sample_clips(load_dataset(data), n_clips)
    with tempfile.TemporaryDirectory() as tmp:
        stores = feature_stores(WorkDir(tmp), cfg, features)
    audio = cfg["audio"]
    decoded, seconds = [], 0.0
    for split, fnames in (("train", dataset.train["fname"].tolist()), ("test", dataset.test_fnames)):
        for fname in fnames:
            y, sr = read_audio(dataset.audio_path(split, fname))
            decoded.append((y, sr))
            seconds += len(y) / sr
    out = {}
    for name, store in stores.items():
        clips = []
        for y, sr in decoded:
            try:
                clips.append(preprocess(y, sr, store.sr, trim_top_db=audio["trim_top_db"],
                                        silence_peak=audio["silence_peak"]))
            except AudioError:
                continue
        params = store.compute_params()
        best = float("inf")
        with threadpool_limits(1):  # one core, as in the stage's workers
            compute_feature(store.kind, clips[0], store.sr, params)  # warm-up (caches, numba's compiled loop)
            for _ in range(repeats):
                start = time.perf_counter()
                for y in clips:
                    compute_feature(store.kind, y, store.sr, params)
                best = min(best, time.perf_counter() - start)
        out[name] = {"feature_only_s": round(best, 3), "feature_only_x_realtime_per_core": round(seconds / best, 1)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (FSDKaggle2018 layout)")
    p.add_argument("--features", "--feature", dest="features", nargs="+", default=["logmel"],
                   help="feature names from the preset, or kinds at their defaults (cqt, gammatone), each timed")
    p.add_argument("--config", default="quick")
    p.add_argument("--jobs", type=int, default=-1, help="workers (-1: all cores)")
    p.add_argument("--clips", type=int, default=0, help="time a seeded sample of N training clips (0: all)")
    p.add_argument("--isolated", action="store_true", help="also time the feature function alone (one core)")
    p.add_argument("--long", type=int, default=0, help="benchmark N long (10 s, 44.1 kHz) files made from --data instead")
    p.add_argument("--json", default=None, help="append each result as one JSON line to this file")
    args = p.parse_args(argv)
    data = Path(args.data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.long:
            data = make_long_dataset(data, Path(tmp) / "long", args.long)
        for feature in args.features:
            results.append(bench(data, feature, args.jobs, args.config, args.clips))
        if args.isolated:
            alone = bench_isolated(data, args.features, args.config, args.clips)
            for result in results:
                result.update(alone[result["feature"]])
    for result in results:
        result["data"] = f"{args.data}" + (f" (long: {args.long} x 10 s @ 44.1 kHz)" if args.long else "") + \
            (f" ({args.clips} clips)" if args.clips else "")
        print(json.dumps(result))
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(result) + "\n")
    if len(results) > 1 or args.isolated:
        cols = ["feature", "workers", "clips", "audio_s", "wall_s", "x_realtime_per_core",
                "x_realtime_per_core_in_workers"] + (["feature_only_x_realtime_per_core"] if args.isolated else [])
        print(pd.DataFrame(results)[cols].to_string(index=False))


if __name__ == "__main__":
    main()
