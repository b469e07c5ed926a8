"""Training labels: which class each training clip is trained towards, and
with how much label smoothing.

Default (the LR-fusion paper): the given label, smoothed by verification
status (0.05 verified, 0.3 non-verified). When the pseudo-labelling stage has
written ``labels.csv`` and the preset uses it, its labels and per-row
epsilons are used instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import section
from pipeline.fingerprints import table_hash
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json, read_json

log = logging.getLogger("labels")


def training_labels(cfg: dict, work: WorkDir, folds: pd.DataFrame, train_cfg: dict | None = None) -> pd.DataFrame:
    """fname, label, epsilon, verified for every row of folds.csv."""
    tcfg = section({"training": train_cfg or cfg.get("training")}, "training")  # a partial one: defaults filled
    eps_v = float(tcfg["smoothing_verified"] or 0.0)
    eps_u = float(tcfg["smoothing_unverified"] or 0.0)
    table = folds[["fname", "label", "manually_verified"]].copy()
    table["verified"] = table["manually_verified"].astype(int)
    table["epsilon"] = np.where(table["verified"] == 1, eps_v, eps_u)
    source = section(cfg, "labels")["source"]
    if source == "pseudo":
        if not work.labels_csv.exists():
            raise FileNotFoundError(f"{work.labels_csv} is missing: the preset trains on pseudo-labels, "
                                    "run `python -m pipeline.pseudo_label` first")
        made_from = (read_json(labels_json(work)) or {}).get("folds")
        if made_from != table_hash(folds):
            raise FileNotFoundError(f"{work.labels_csv} was made for another folds.csv (the training rows or "
                                    "their labels changed): run `python -m pipeline.pseudo_label` first")
        pseudo = pd.read_csv(work.labels_csv, dtype=str, keep_default_na=False)
        need = ["fname", "label", "status", "epsilon"]
        absent = [c for c in need if c not in pseudo.columns]
        if absent:
            raise ValueError(f"{work.labels_csv}: line 1: missing column(s) {', '.join(absent)} "
                             f"(expected {','.join(need)})")
        for col in need:
            blank = pseudo[col].str.strip() == ""
            if blank.any():
                raise ValueError(f"{work.labels_csv}: line {int(blank.to_numpy().argmax()) + 2}: empty {col}")
        dup = pseudo["fname"].duplicated()
        if dup.any():
            i = int(dup.to_numpy().argmax())
            raise ValueError(f"{work.labels_csv}: line {i + 2}: duplicate fname {pseudo['fname'].iloc[i]!r}")
        eps = pd.to_numeric(pseudo["epsilon"], errors="coerce")
        bad = eps.isna() | (eps < 0) | (eps > 1)
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise ValueError(f"{work.labels_csv}: line {i + 2}: epsilon must be a number in [0, 1], "
                             f"got {pseudo['epsilon'].iloc[i]!r}")
        pseudo["epsilon"] = eps
        missing = set(table["fname"]) - set(pseudo["fname"])
        if missing:
            raise ValueError(f"{work.labels_csv} lacks {len(missing)} clip(s) of folds.csv, e.g. {sorted(missing)[:3]}")
        extra = set(pseudo["fname"]) - set(table["fname"])
        if extra:
            raise ValueError(f"{work.labels_csv} has {len(extra)} clip(s) not in folds.csv, e.g. {sorted(extra)[:3]}")
        pseudo = pseudo.set_index("fname").loc[table["fname"]]
        table["label"] = pseudo["label"].to_numpy()
        table["epsilon"] = pseudo["epsilon"].astype(float).to_numpy()
        # rows the verification accepted or relabelled count as trusted for loss masking
        table["verified"] = (pseudo["status"].astype(str) != "unresolved").astype(int).to_numpy()
    elif source != "given":
        raise ValueError(f"labels.source must be 'given' or 'pseudo', got {source!r}")
    return table[["fname", "label", "epsilon", "verified"]].reset_index(drop=True)


def labels_json(work: WorkDir) -> Path:
    """Which folds.csv labels.csv was made for."""
    return work.root / "labels.json"


def write_labels_table(work: WorkDir, table: pd.DataFrame, folds: pd.DataFrame) -> None:
    """labels.csv plus the fingerprint of the folds.csv it belongs to, so a
    later stage never trains on labels made for another dataset."""
    atomic_write_csv(table, work.labels_csv)
    atomic_write_json({"folds": table_hash(folds)}, labels_json(work))
