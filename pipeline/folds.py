"""Stage: the cross-validation folds every model and the stacker share.

``python -m pipeline.folds`` writes ``<work>/folds.csv`` once (fname, label,
manually_verified, fold), stratified on label x manually_verified and
seeded. Clips that failed to decode are left out (see ``clips.csv``).
Re-running keeps the existing file, so every model sees the same split.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.dataset import load_dataset
from pipeline.workdir import WorkDir, atomic_write_csv

log = logging.getLogger("folds")


def make_folds(train: pd.DataFrame, n_folds: int = 5, seed: int = 2018) -> pd.DataFrame:
    """Assign a fold to every row, stratified on label x manually_verified.

    Strata smaller than ``n_folds`` cannot be split evenly; they are merged
    into their label's stratum (then into one "rare" stratum), so the split
    still works on small or unbalanced datasets.
    """
    if len(train) < n_folds:
        raise ValueError(f"{len(train)} usable training clips cannot make {n_folds} folds")
    strata = train["label"].astype(str) + "|" + train["manually_verified"].astype(str)
    counts = strata.map(strata.value_counts())
    strata = strata.where(counts >= n_folds, train["label"].astype(str))
    counts = strata.map(strata.value_counts())
    strata = strata.where(counts >= n_folds, "__rare__")
    if strata.value_counts().min() < n_folds:  # only the merged rare stratum can still be short
        strata = strata.replace("__rare__", strata.value_counts().idxmax())
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(train), -1, dtype=int)
    for k, (_, held_out) in enumerate(skf.split(np.zeros(len(train)), strata)):
        folds[held_out] = k
    out = train[["fname", "label", "manually_verified"]].copy().reset_index(drop=True)
    out["fold"] = folds
    return out


def load_folds(work: WorkDir) -> pd.DataFrame:
    work.require(work.folds_csv, "python -m pipeline.folds")
    return pd.read_csv(work.folds_csv, dtype={"fname": str, "label": str})


def run_folds(cfg: dict, data_dir, work: WorkDir) -> pd.DataFrame:
    if work.folds_csv.exists():
        folds = load_folds(work)
        log.info("folds.csv exists (%d clips, %d folds): reusing it", len(folds), folds["fold"].nunique())
        return folds
    dataset = load_dataset(data_dir)
    work.require(work.clips_csv, "python -m pipeline.features")
    clips = pd.read_csv(work.clips_csv, dtype={"fname": str})
    bad = set(clips[(clips.split == "train") & (clips.status != "ok")]["fname"])
    usable = dataset.train[~dataset.train["fname"].isin(bad)]
    if bad:
        log.warning("%d training clip(s) left out of the folds (unusable audio): %s", len(bad),
                    ", ".join(sorted(bad)[:20]) + (" ..." if len(bad) > 20 else ""))
    fcfg = cfg.get("folds", {})
    folds = make_folds(usable, fcfg.get("n_folds", 5), cfg.get("seed", 2018))
    atomic_write_csv(folds, work.folds_csv)
    log.info("wrote %s: %d clips in %d folds", work.folds_csv, len(folds), folds["fold"].nunique())
    return folds


def main(argv=None):
    args, cfg, work = start_stage("Write the shared cross-validation folds.", "folds", argv)
    with timed_stage(work, "folds"):
        run_folds(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
