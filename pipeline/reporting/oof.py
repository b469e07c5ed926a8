"""The run's final out-of-fold predictions and what the report computes from
them: per-class MAP@3, the confusion matrix and the most confidently wrong
clips.

The final predictions are stacking's chosen learner when stacking ran (read
from its ``stacking/<name>_oof.csv`` or the model's own OOF table), else the
best single model by OOF MAP@3.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.metrics import map_at_3, per_class_map_at_3, precision_at_rank, top_k_indices
from pipeline.predictions import class_columns, read_table
from pipeline.reporting.artefacts import as_work, collect_scores
from pipeline.workdir import WorkDir

log = logging.getLogger("report")


@dataclass
class FinalOOF:
    name: str                 # learner or model name
    kind: str                 # model | blend | stacker
    source: str               # why this one: "stacking final" or "best single model"
    path: Path
    classes: list[str]
    fnames: np.ndarray        # (n,)
    folds: np.ndarray         # (n,)
    labels: np.ndarray        # (n,) given label names
    y: np.ndarray             # (n,) given label indices
    verified: np.ndarray      # (n,) bool
    probs: np.ndarray         # (n, K)

    @property
    def map3(self) -> float:
        return map_at_3(self.y, self.probs)

    @property
    def map3_verified(self) -> float:
        return map_at_3(self.y[self.verified], self.probs[self.verified])


def load_oof(work: WorkDir, path: Path, name: str, kind: str, source: str,
             classes: Sequence[str] | None) -> FinalOOF:
    """One OOF table joined to folds.csv (given label, verified flag, fold)."""
    table = read_table(path, classes)
    classes = list(classes) if classes is not None else class_columns(table)
    folds = pd.read_csv(work.require(work.folds_csv, "python -m pipeline.folds"), dtype={"fname": str, "label": str})
    merged = folds[["fname", "label", "manually_verified", "fold"]].merge(
        table.drop(columns=["fold"], errors="ignore"), on="fname", how="inner")
    if len(merged) < len(folds):
        log.warning("%s covers %d of the %d clips of folds.csv", path, len(merged), len(folds))
    index = {c: i for i, c in enumerate(classes)}
    known = merged["label"].isin(index)
    if not known.all():
        log.warning("%s: %d row(s) with a label outside the class columns left out", path, int((~known).sum()))
        merged = merged[known]
    return FinalOOF(name=name, kind=kind, source=source, path=path, classes=classes,
                    fnames=merged["fname"].to_numpy(), folds=merged["fold"].to_numpy(dtype=int),
                    labels=merged["label"].to_numpy(), y=merged["label"].map(index).to_numpy(dtype=int),
                    verified=merged["manually_verified"].to_numpy() == 1,
                    probs=merged[classes].to_numpy(dtype=np.float64))


def final_oof(work, classes: Sequence[str] | None = None) -> FinalOOF | None:
    """The final OOF predictions: stacking's chosen learner (its
    ``stacking/<name>_oof.csv``, or the model's own table when a single model
    was chosen) when stacking ran, else the best single model by OOF MAP@3.
    None when there is nothing to read (no folds.csv or no OOF table)."""
    work = as_work(work)
    if not work.folds_csv.exists():
        return None
    scores = collect_scores(work)
    if scores.final:
        kind = (scores.stacking_summary or {}).get("final_kind", "stacker")
        for path in (work.stacking_dir / f"{scores.final}_oof.csv", work.oof_csv(scores.final)):
            if path.exists():
                return load_oof(work, path, scores.final, kind, "stacking final", classes)
        log.warning("stacking's final %r has no OOF table: falling back to the best single model", scores.final)
    for name in scores.models["model"]:
        if work.oof_csv(name).exists():
            return load_oof(work, work.oof_csv(name), name, "model", "best single model", classes)
    return None


def per_class_table(final: FinalOOF) -> pd.DataFrame:
    """class, clips, verified_clips, map3, map3_verified, accuracy — worst class first."""
    table = per_class_map_at_3(final.y, final.probs, final.classes)
    ap = precision_at_rank(final.y, final.probs, 3)
    ver_clips, ver_map = [], []
    for idx in range(len(final.classes)):
        mask = (final.y == idx) & final.verified
        ver_clips.append(int(mask.sum()))
        ver_map.append(float(ap[mask].mean()) if mask.any() else float("nan"))
    table.insert(2, "verified_clips", ver_clips)
    table.insert(4, "map3_verified", ver_map)
    return table.sort_values("map3", kind="stable").reset_index(drop=True)


def confusion_matrix(final: FinalOOF, rows: np.ndarray | None = None) -> pd.DataFrame:
    """Counts: given label (index) x top-1 predicted label (columns)."""
    mask = np.ones(len(final.y), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    k = len(final.classes)
    pred = top_k_indices(final.probs[mask], 1)[:, 0]
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (final.y[mask], pred), 1)
    return pd.DataFrame(counts, index=pd.Index(final.classes, name="given"),
                        columns=pd.Index(final.classes, name="predicted"))


def top_confusions(cm: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` most frequent off-diagonal (given, predicted) pairs of a
    confusion matrix, most clips first (ties in row-major order)."""
    pairs = [(cm.index[i], cm.columns[j], int(cm.iat[i, j])) for i in range(len(cm)) for j in range(len(cm))
             if i != j and cm.iat[i, j] > 0]
    pairs.sort(key=lambda t: -t[2])
    return pd.DataFrame(pairs[:n], columns=["given", "predicted", "clips"])


def most_wrong(final: FinalOOF, n: int = 20) -> pd.DataFrame:
    """The clips whose given label gets the lowest final OOF probability."""
    p_given = final.probs[np.arange(len(final.y)), final.y]
    top3 = top_k_indices(final.probs, 3)
    names = np.asarray(final.classes)
    order = np.argsort(p_given, kind="stable")[:n]
    return pd.DataFrame({
        "fname": final.fnames[order], "given": final.labels[order], "verified": final.verified[order],
        "p_given": p_given[order], "rank_given": [int((final.probs[i] > p_given[i]).sum()) + 1 for i in order],
        "top3": [" ".join(names[top3[i]]) for i in order],
        "p_top1": final.probs[order, top3[order, 0]], "fold": final.folds[order],
    })
