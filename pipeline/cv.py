"""The shared cross-validation folds: assignment, fingerprint, the inner split.

``folds.csv`` is made once per dataset and read by every model, so every
model's out-of-fold predictions are comparable and stackable. The stage
``python -m pipeline.folds`` calls :func:`run_folds`.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from pipeline.clips import load_clips, split_usable
from pipeline.config import ConfigError
from pipeline.dataset import DatasetError, load_dataset
from pipeline.fingerprints import param_hash, table_hash
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json, read_json

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


def inner_split(rows: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a seeded, label-stratified slice of ``rows`` (fname,
    label, verified) for early stopping inside the training folds. Taken
    from the verified rows when there are enough of them (their labels are
    the trustworthy ones); a class keeps at least one training clip."""
    rng = np.random.default_rng([int(seed), 7])
    verified = rows["verified"].to_numpy().astype(int) == 1 if "verified" in rows else np.ones(len(rows), bool)
    n_classes = rows["label"].nunique()
    pool = verified if verified.sum() >= max(10, 2 * n_classes) else np.ones(len(rows), bool)
    mask = np.zeros(len(rows), dtype=bool)
    labels = rows["label"].to_numpy()
    for label in np.unique(labels):
        members = np.flatnonzero(pool & (labels == label))
        total = int((labels == label).sum())
        take = min(int(round(fraction * len(members))), total - 1)
        if take <= 0 and len(members) >= 3 and total >= 4:
            take = 1
        if take > 0:
            mask[rng.choice(members, size=take, replace=False)] = True
    if not mask.any():
        raise DatasetError(f"training.early_stopping_split is inner, but {len(rows)} training clips leave none "
                           "for the early-stopping slice: raise training.inner_fraction or use heldout")
    return mask


def load_folds(work: WorkDir) -> pd.DataFrame:
    work.require(work.folds_csv, "python -m pipeline.folds")
    return pd.read_csv(work.folds_csv, dtype={"fname": str, "label": str}, keep_default_na=False)


def usable_train(dataset, work: WorkDir) -> pd.DataFrame:
    """train.csv rows whose audio decoded (clips.csv status ok)."""
    good, bad = split_usable(load_clips(work), "train", dataset.train["fname"].tolist(), work.clips_csv)
    if bad:
        log.warning("%d training clip(s) left out of the folds (unusable audio): %s", len(bad),
                    ", ".join(sorted(bad)[:20]) + (" ..." if len(bad) > 20 else ""))
    return dataset.train[dataset.train["fname"].isin(set(good))].reset_index(drop=True)


def check_fold_sizes(usable: pd.DataFrame, n_folds: int, source: str) -> None:
    """Enough clips for ``n_folds`` folds, said before any training."""
    if n_folds < 2:
        raise ConfigError(f"folds.n_folds = {n_folds}: cross-validation needs at least 2 folds")
    if len(usable) < 2 * n_folds:
        raise DatasetError(f"{source}: {len(usable)} usable training clip(s) cannot make {n_folds} folds "
                           f"(at least {2 * n_folds} needed); add clips or lower folds.n_folds")
    counts = usable["label"].value_counts()
    thin = counts[counts < n_folds]
    if len(thin):
        log.warning("%d class(es) have fewer clips than folds (%s): some folds will not see them in "
                    "training", len(thin), ", ".join(f"{c} {n}" for c, n in thin.head(5).items()))


def folds_fingerprint(usable: pd.DataFrame, n_folds: int, seed: int) -> str:
    """What folds.csv is made from: the usable rows, their labels and
    verification flags, the number of folds and the seed."""
    return param_hash({"rows": table_hash(usable[["fname", "label", "manually_verified"]]),
                       "n_folds": int(n_folds), "seed": int(seed)}, 16)


def _describe_change(old: pd.DataFrame, new: pd.DataFrame) -> str:
    o, n = old.set_index("fname"), new.set_index("fname")
    added, removed = len(n.index.difference(o.index)), len(o.index.difference(n.index))
    common = n.index.intersection(o.index)
    relabelled = int((o.loc[common, "label"].astype(str) != n.loc[common, "label"].astype(str)).sum())
    flags = int((o.loc[common, "manually_verified"].astype(int)
                 != n.loc[common, "manually_verified"].astype(int)).sum())
    parts = [f"{v} {k}" for k, v in (("added", added), ("removed", removed), ("relabelled", relabelled),
                                     ("with another manually_verified", flags)) if v]
    return ", ".join(parts) if parts else "same rows; other settings (folds.n_folds or seed)"


def _expected(cfg: dict, dataset, work: WorkDir) -> tuple[pd.DataFrame, int, int, str]:
    """(usable rows, n_folds, seed, fingerprint) folds.csv must be made from."""
    usable = usable_train(dataset, work)
    n_folds, seed = int(cfg["folds"]["n_folds"]), int(cfg["seed"])
    return usable, n_folds, seed, folds_fingerprint(usable, n_folds, seed)


def run_folds(cfg: dict, data_dir, work: WorkDir) -> pd.DataFrame:
    """Write folds.csv, or keep it when it was made from the same rows and settings."""
    usable, n_folds, seed, fp = _expected(cfg, load_dataset(data_dir), work)
    check_fold_sizes(usable, n_folds, str(work.clips_csv))
    meta = read_json(work.folds_json) or {}
    if work.folds_csv.exists() and meta.get("fingerprint") == fp:
        folds = load_folds(work)
        log.info("folds.csv is up to date (%d clips, %d folds)", len(folds), folds["fold"].nunique())
        return folds
    folds = make_folds(usable, n_folds, seed)
    if work.folds_csv.exists():
        log.info("folds.csv was made from other rows or settings (%s): rewriting it",
                 _describe_change(load_folds(work), folds))
    atomic_write_csv(folds, work.folds_csv)
    atomic_write_json({"fingerprint": fp, "n_folds": n_folds, "seed": seed, "clips": len(folds)}, work.folds_json)
    log.info("wrote %s: %d clips in %d folds", work.folds_csv, len(folds), folds["fold"].nunique())
    return folds


def current_folds(cfg: dict, dataset, work: WorkDir) -> pd.DataFrame:
    """folds.csv, refused when it no longer matches train.csv, clips.csv or
    the fold settings (a stage run alone after the dataset changed)."""
    folds = load_folds(work)
    usable, _n, _seed, fp = _expected(cfg, dataset, work)
    if (read_json(work.folds_json) or {}).get("fingerprint") != fp:
        raise FileNotFoundError(f"{work.folds_csv} was made from other training rows or fold settings "
                                f"({_describe_change(folds, usable)}): run `python -m pipeline.folds` first "
                                "(./run_all.sh runs every stage in order)")
    return folds
