"""Benchmark the feature stage end to end (decode, resample, trim, feature, write).

    python -m benchmarks.bench_features --data ../shared/data/fsdd [--feature logmel] [--jobs 2]
    python -m benchmarks.bench_features --data ../shared/data/fsdd --long 120   # 120 x 10 s files at 44.1 kHz

Reports seconds of audio per wall second ("x real time"), per core, and the
per-core speed inside the workers (excluding worker start-up). Each run uses
a fresh temporary work directory, so nothing is cached.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from pipeline.audio import read_audio, resample
from pipeline.cache import feature_stores
from pipeline.config import load_config
from pipeline.dataset import load_dataset
from pipeline.extraction import compute_missing
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
        rows.append({"fname": fname, "label": "a" if i % 2 else "b", "manually_verified": 1})
    pd.DataFrame(rows).to_csv(out / "train.csv", index=False)
    sf.write(out / "audio_test" / "t0.wav", parts[0], sr, subtype="PCM_16")
    pd.DataFrame({"fname": ["t0.wav"], "label": ["a b"]}).to_csv(out / "sample_submission.csv", index=False)
    return out


def bench(data: Path, feature: str, jobs: int, config: str) -> dict:
    cfg = load_config(config)
    dataset = load_dataset(data)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = WorkDir(tmp)
        stores = feature_stores(work, cfg, [feature])
        start = time.perf_counter()
        stats = compute_missing(dataset, stores, cfg.get("audio", {}), n_jobs=jobs, progress=False,
                                chunk_size=cfg.get("feature_extraction", {}).get("chunk_size", 16))
        wall = time.perf_counter() - start
    workers = stats.get("workers", 1)
    return {
        "data": str(data), "feature": feature, "workers": workers, "clips": stats["clips"],
        "audio_s": round(stats["seconds"], 1), "wall_s": round(wall, 2),
        "x_realtime": round(stats["seconds"] / wall, 1),
        "x_realtime_per_core": round(stats["seconds"] / wall / workers, 1),
        "x_realtime_per_core_in_workers": round(stats["seconds"] / stats["busy"], 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (FSDKaggle2018 layout)")
    p.add_argument("--feature", default="logmel", help="feature name from the preset")
    p.add_argument("--config", default="quick")
    p.add_argument("--jobs", type=int, default=-1, help="workers (-1: all cores)")
    p.add_argument("--long", type=int, default=0, help="benchmark N long (10 s, 44.1 kHz) files made from --data instead")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        if args.long:
            data = make_long_dataset(data, Path(tmp) / "long", args.long)
        result = bench(data, args.feature, args.jobs, args.config)
    result["data"] = f"{args.data}" + (f" (long: {args.long} x 10 s @ 44.1 kHz)" if args.long else "")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
