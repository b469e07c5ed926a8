"""Reading a run's work directory into plain data: clips.csv, every model's
summary.json and training histories, stacking's scores and summary, the
pseudo-labelling table and summary, timings.json and the submission.

Every reader takes a work directory (a ``WorkDir`` or a path) and returns
None (or an empty table) for an artefact that is not there; none of them
writes anything. The formats are the files' own (the stage that writes them
is never imported).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipeline.dataset import Dataset
from pipeline.metrics import map_at_k_labels
from pipeline.verification import TABLE_COLUMNS
from pipeline.workdir import WorkDir, read_json

PSEUDO_COLUMNS = TABLE_COLUMNS  # the columns of pseudo_label/iterations.csv, as pipeline.verification writes it


def as_work(work) -> WorkDir:
    return work if isinstance(work, WorkDir) else WorkDir(work)


# ---------------------------------------------------------------------------
# dataset
def read_clips(work) -> pd.DataFrame | None:
    """clips.csv (written by the features stage), or None."""
    work = as_work(work)
    if not work.clips_csv.exists():
        return None
    clips = pd.read_csv(work.clips_csv, dtype={"fname": str, "split": str, "status": str, "error": str},
                        keep_default_na=False, na_values={"duration_s": ["", "nan", "NaN"]})
    clips["duration_s"] = pd.to_numeric(clips["duration_s"], errors="coerce")
    return clips


def dataset_summary(dataset: Dataset, clips: pd.DataFrame | None = None) -> dict:
    """Counts and durations of the dataset; durations and bad files come from clips.csv."""
    train = dataset.train
    out = {
        "train_clips": len(train), "test_clips": len(dataset.test_fnames), "classes": len(dataset.classes),
        "verified": int(train["manually_verified"].sum()),
        "verified_share": float(train["manually_verified"].mean()) if len(train) else float("nan"),
        "test_labelled": None if dataset.test_labels is None else len(dataset.test_labels),
        "clips_per_class_min": int(train["label"].value_counts().min()),
        "clips_per_class_max": int(train["label"].value_counts().max()),
        "durations": None, "status_counts": None, "bad": None,
    }
    if clips is not None:
        rows = []
        for split in ("train", "test", "all"):
            d = clips if split == "all" else clips[clips["split"] == split]
            dur = d["duration_s"].dropna()
            rows.append({"split": split, "clips": len(d), "total_s": float(dur.sum()),
                         "median_s": float(dur.median()) if len(dur) else float("nan"),
                         "min_s": float(dur.min()) if len(dur) else float("nan"),
                         "max_s": float(dur.max()) if len(dur) else float("nan")})
        out["durations"] = pd.DataFrame(rows)
        counts = clips.groupby(["status", "split"]).size().unstack(fill_value=0)
        for split in ("train", "test"):
            if split not in counts.columns:
                counts[split] = 0
        counts = counts[["train", "test"]].reset_index()
        counts["total"] = counts["train"] + counts["test"]
        out["status_counts"] = counts
        out["bad"] = clips.loc[clips["status"] != "ok", ["fname", "split", "status", "error"]].reset_index(drop=True)
    return out


# ---------------------------------------------------------------------------
# scores
@dataclass
class Scores:
    models: pd.DataFrame                 # one row per trained model (models/<m>/summary.json)
    stacking: pd.DataFrame | None        # stacking/scores.csv, or None when stacking did not run
    stacking_summary: dict | None        # stacking/summary.json
    final: str | None                    # the chosen final learner (stacking), or None


def model_summaries(work) -> dict[str, dict]:
    """model -> models/<model>/summary.json, for every model with one."""
    work = as_work(work)
    root = work.root / "models"
    out = {}
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            summary = read_json(d / "summary.json")
            if summary:
                out[d.name] = summary
    return out


SCORE_COLUMNS = ["model", "oof_map3", "oof_map3_verified", "test_map3", "params", "samples_per_second",
                 "train_seconds", "folds"]


def collect_scores(work) -> Scores:
    """Every single model's scores (best OOF MAP@3 first) and, when present, stacking's table."""
    work = as_work(work)
    rows = [{c: (name if c == "model" else s.get(c)) for c in SCORE_COLUMNS}
            for name, s in model_summaries(work).items()]
    models = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    if len(models):
        models = models.sort_values("oof_map3", ascending=False, na_position="last", kind="stable")
        models = models.reset_index(drop=True)
    stacking = summary = final = None
    scores_csv = work.stacking_dir / "scores.csv"
    if scores_csv.exists():
        stacking = pd.read_csv(scores_csv, dtype={"name": str, "kind": str})
        summary = read_json(work.stacking_dir / "summary.json") or None
        final = (summary or {}).get("final")
    return Scores(models=models, stacking=stacking, stacking_summary=summary, final=final)


# ---------------------------------------------------------------------------
# training, pseudo-labelling, timings, submission
def meta_class_groupings(work) -> dict[str, list[dict]]:
    """model -> the meta-classes each fold of a hierarchical model used (models/<model>/fold<k>/meta_classes.json)."""
    work = as_work(work)
    root = work.root / "models"
    out: dict[str, list[dict]] = {}
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        folds = [read_json(f / "meta_classes.json") for f in sorted(d.glob("fold*"), key=lambda p: (len(p.name),
                                                                                                      p.name))]
        folds = [m for m in folds if m]
        if folds:
            out[d.name] = folds
    return out


def training_histories(work) -> dict[str, pd.DataFrame]:
    """model -> every fold's history.csv stacked (fold, epoch, loss, val_map3, ...)."""
    work = as_work(work)
    out = {}
    root = work.root / "models"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = []
        for fold_dir in sorted(d.glob("fold*"), key=lambda p: (len(p.name), p.name)):
            path = fold_dir / "history.csv"
            if not path.exists() or path.stat().st_size == 0:
                continue
            try:
                hist = pd.read_csv(path)
                fold = int(fold_dir.name[len("fold"):])
            except (ValueError, pd.errors.EmptyDataError):
                continue
            if "epoch" in hist.columns and "val_map3" in hist.columns and len(hist):
                hist.insert(0, "fold", fold)
                frames.append(hist)
        if frames:
            out[d.name] = pd.concat(frames, ignore_index=True)
    return out


def pseudo_label_table(work) -> pd.DataFrame | None:
    """pseudo_label/iterations.csv, or None when pseudo-labelling did not run."""
    path = as_work(work).pseudo_dir / "iterations.csv"
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    known = [c for c in PSEUDO_COLUMNS if c in df.columns]  # the documented columns first, in their order
    return df[known + [c for c in df.columns if c not in known]]


def pseudo_label_summary(work) -> dict:
    """pseudo_label/summary.json ({} when absent)."""
    return read_json(as_work(work).pseudo_dir / "summary.json") or {}


def timings_table(work) -> pd.DataFrame | None:
    """stage, seconds, share of the total — from timings.json; None when absent."""
    timings = read_json(as_work(work).timings_json)
    if not timings:
        return None
    df = pd.DataFrame({"stage": list(timings), "seconds": [float(v) for v in timings.values()]})
    total = df["seconds"].sum()
    df["share"] = df["seconds"] / total if total > 0 else float("nan")
    return df


def submission_score(work, dataset: Dataset | None) -> dict:
    """The submission's path and, with test labels, its MAP@3 over the labelled test clips."""
    work = as_work(work)
    out = {"path": work.submission_csv, "exists": work.submission_csv.exists(), "map3": None, "labelled": 0}
    if not out["exists"] or dataset is None or dataset.test_labels is None:
        return out
    sub = pd.read_csv(work.submission_csv, dtype=str, keep_default_na=False)
    truth = dict(zip(dataset.test_labels["fname"], dataset.test_labels["label"]))
    labelled = sub[sub["fname"].isin(truth)]
    out["labelled"] = len(labelled)
    if len(labelled):
        out["map3"] = map_at_k_labels([truth[f] for f in labelled["fname"]],
                                      [str(lab).split() for lab in labelled["label"]])
    return out
