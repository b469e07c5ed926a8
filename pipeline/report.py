"""Stage: one readable report of a run.

``python -m pipeline.report --config quick --data DIR --work DIR`` reads what
the other stages left in the work directory and writes ``<work>/report.md``
with its figures in ``<work>/plots/``:

- the dataset (clips, durations, classes, verified share, bad files);
- the score table of every single model and, when stacking ran, of every
  model, blend and stacker with the chosen final learner;
- per-class MAP@3 and the confusion matrix of the final OOF predictions;
- validation MAP@3 per epoch for every fold of every model;
- the pseudo-labelling iterations, the time per stage, the submission and
  (with ``test_labels.csv``) its test MAP@3.

Everything optional is optional: a part whose inputs are missing is replaced
by one line saying what was not run. The data-gathering functions are public
because ``notebooks/results.ipynb`` uses them too.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.dataset import Dataset, load_dataset
from pipeline.metrics import (map_at_3, map_at_k_labels, per_class_map_at_3, precision_at_rank, scope_text,
                              top_k_indices)
from pipeline.predictions import class_columns, read_table
from pipeline.fingerprints import folder_listing, param_hash
from pipeline.workdir import WorkDir, atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger("report")

PSEUDO_COLUMNS = ["iteration", "train_rows", "newly_accepted", "agree_rank1", "agree_rank2", "agree_rank3",
                  "disagree", "remaining_unverified", "map3_vs_given"]


def _as_work(work) -> WorkDir:
    return work if isinstance(work, WorkDir) else WorkDir(work)


# ---------------------------------------------------------------------------
# formatting
def _is_missing(x) -> bool:
    if x is None:
        return True
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def fmt_score(x) -> str:
    return "–" if _is_missing(x) else f"{float(x):.4f}"


def fmt_int(x) -> str:
    return "–" if _is_missing(x) else f"{int(x):,}"


def fmt_float(x, digits: int = 1) -> str:
    return "–" if _is_missing(x) else f"{float(x):,.{digits}f}"


def fmt_seconds(x) -> str:
    if _is_missing(x):
        return "–"
    x = float(x)
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def markdown_table(df: pd.DataFrame, formats: dict | None = None) -> str:
    """A GitHub markdown table; ``formats`` maps column -> callable(value) -> str."""
    formats = formats or {}

    def cell(col, value):
        text = formats[col](value) if col in formats else ("–" if _is_missing(value) else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# dataset
def read_clips(work) -> pd.DataFrame | None:
    """clips.csv (written by the features stage), or None."""
    work = _as_work(work)
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
    work = _as_work(work)
    root = work.root / "models"
    out = {}
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            summary = read_json(d / "summary.json")
            if summary:
                out[d.name] = summary
    return out


def collect_scores(work) -> Scores:
    """Every single model's scores and, when present, stacking's table."""
    work = _as_work(work)
    rows = []
    for name, s in model_summaries(work).items():
        rows.append({"model": name, "oof_map3": s.get("oof_map3"), "oof_map3_verified": s.get("oof_map3_verified"),
                     "test_map3": s.get("test_map3"), "params": s.get("params"),
                     "samples_per_second": s.get("samples_per_second"), "train_seconds": s.get("train_seconds"),
                     "folds": s.get("folds")})
    cols = ["model", "oof_map3", "oof_map3_verified", "test_map3", "params", "samples_per_second",
            "train_seconds", "folds"]
    models = pd.DataFrame(rows, columns=cols)
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
# the final OOF predictions
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


def _load_oof(work: WorkDir, path: Path, name: str, kind: str, source: str,
              classes: Sequence[str] | None) -> FinalOOF:
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
    work = _as_work(work)
    if not work.folds_csv.exists():
        return None
    scores = collect_scores(work)
    if scores.final:
        kind = (scores.stacking_summary or {}).get("final_kind", "stacker")
        for path in (work.stacking_dir / f"{scores.final}_oof.csv", work.oof_csv(scores.final)):
            if path.exists():
                return _load_oof(work, path, scores.final, kind, "stacking final", classes)
        log.warning("stacking's final %r has no OOF table: falling back to the best single model", scores.final)
    for name in scores.models["model"]:
        if work.oof_csv(name).exists():
            return _load_oof(work, work.oof_csv(name), name, "model", "best single model", classes)
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


# ---------------------------------------------------------------------------
# other tables
def training_histories(work) -> dict[str, pd.DataFrame]:
    """model -> every fold's history.csv stacked (fold, epoch, loss, val_map3, ...)."""
    work = _as_work(work)
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
    path = _as_work(work).pseudo_dir / "iterations.csv"
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    known = [c for c in PSEUDO_COLUMNS if c in df.columns]  # the documented columns first, in their order
    return df[known + [c for c in df.columns if c not in known]]


def guard_lines(pseudo_summary: dict) -> list[str]:
    """What the pseudo-label guard decided (thresholds, or the fallback and why)."""
    g = pseudo_summary.get("guard")
    if not g:
        return []
    scores = ", ".join(fmt_score(v) for v in g.get("verified_map3", []))
    if g.get("fallback"):
        return [f"**Guard: fell back to the given labels with fixed smoothing** ({g['fallback']}).", ""]
    off = lambda t: "off" if t is None or t >= 1.0 else f"> {t:.3f}"  # noqa: E731
    return [f"Guard: on {g.get('calibration_rows', 0):,} verified rows the verifiers' out-of-fold MAP@3 per "
            f"iteration was {scores}; thresholds their precision supports: accept {off(g.get('accept_threshold'))}, "
            f"final accept {off(g.get('final_accept_threshold'))}, relabel {off(g.get('relabel_threshold'))}.", ""]


def timings_table(work) -> pd.DataFrame | None:
    """stage, seconds, share of the total — from timings.json; None when absent."""
    timings = read_json(_as_work(work).timings_json)
    if not timings:
        return None
    df = pd.DataFrame({"stage": list(timings), "seconds": [float(v) for v in timings.values()]})
    total = df["seconds"].sum()
    df["share"] = df["seconds"] / total if total > 0 else float("nan")
    return df


def submission_score(work, dataset: Dataset | None) -> dict:
    """The submission's path and, with test labels, its MAP@3 over the labelled test clips."""
    work = _as_work(work)
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


# ---------------------------------------------------------------------------
# plots
def _figure(figsize):
    """A pyplot-free Figure: no global state, no display needed (PNGs render
    with Agg); in a notebook, ``display(fig)`` shows it."""
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def _save(fig, path: Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(path, buf.getvalue())


def plot_per_class(table: pd.DataFrame, path: Path | None = None, title: str = "Per-class MAP@3"):
    """Horizontal bars of per-class MAP@3 (all rows; verified rows as dots)."""
    t = table.sort_values("map3", kind="stable")
    fig = _figure((7, max(2.5, 0.28 * len(t) + 1)))
    ax = fig.subplots()
    pos = np.arange(len(t))
    ax.barh(pos, t["map3"].fillna(0), color="tab:blue", label="all rows")
    if "map3_verified" in t:
        ax.plot(t["map3_verified"], pos, "o", color="tab:orange", ms=4, label="verified rows")
    ax.set_yticks(pos, [f"{c} ({n})" for c, n in zip(t["class"], t["clips"])], fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("MAP@3")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return fig


def plot_confusion(final: FinalOOF, path: Path | None = None, title: str | None = None):
    """Row-normalised confusion matrix of top-1 vs given label (counts written when small)."""
    cm = confusion_matrix(final)
    counts = cm.to_numpy()
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    k = len(final.classes)
    size = max(4.0, 0.32 * k + 2)
    fig = _figure((size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), final.classes, rotation=90, fontsize=7)
    ax.set_yticks(range(k), final.classes, fontsize=7)
    ax.set_xlabel("top-1 predicted")
    ax.set_ylabel("given label")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    n_unver = int((~final.verified).sum())
    ax.set_title(title or f"{final.name}: OOF top-1 vs given label\n"
                 f"({len(final.y)} clips, {n_unver} not verified)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the given label's clips")
    _save(fig, path)
    return fig


def plot_training(model: str, history: pd.DataFrame, path: Path | None = None):
    """Validation MAP@3 per epoch, one line per fold."""
    fig = _figure((6, 3.5))
    ax = fig.subplots()
    for fold, h in history.groupby("fold"):
        h = h.sort_values("epoch")
        ax.plot(h["epoch"], h["val_map3"], marker="o", ms=3, label=f"fold {fold}")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAP@3")
    ax.set_title(f"{model}: validation MAP@3 per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return fig


# ---------------------------------------------------------------------------
# the report
SCORE_FORMATS = {"OOF MAP@3 (all)": fmt_score, "OOF MAP@3 (verified)": fmt_score, "test MAP@3": fmt_score,
                 "params": fmt_int, "samples/s": fmt_float, "train time": fmt_seconds,
                 "CV MAP@3 (all)": fmt_score, "CV MAP@3 (verified)": fmt_score, "accuracy (all)": fmt_score,
                 "± SE": fmt_score, "Δ vs default": lambda v: "–" if _is_missing(v) else f"{float(v):+.4f}",
                 "± SE (Δ)": fmt_score, "test ± SE": fmt_score}


def models_score_table(scores: Scores) -> pd.DataFrame:
    m = scores.models
    return pd.DataFrame({"model": m["model"], "OOF MAP@3 (all)": m["oof_map3"],
                         "OOF MAP@3 (verified)": m["oof_map3_verified"], "test MAP@3": m["test_map3"],
                         "params": m["params"], "samples/s": m["samples_per_second"],
                         "train time": m["train_seconds"]})


def stacking_score_table(scores: Scores) -> pd.DataFrame:
    """One row per model, blend and stacker: cross-validated MAP@3 with its
    standard error over the folds, the paired difference to the default
    learner with its SE (when scores.csv has them), test MAP@3, and which
    entry is the default and which the final one."""
    s = scores.stacking
    out = pd.DataFrame({"name": s["name"], "kind": s["kind"], "CV MAP@3 (all)": s["map3_all"]})
    if "map3_all_se" in s:
        out["± SE"] = s["map3_all_se"]
    out["CV MAP@3 (verified)"] = s["map3_verified"]
    if "diff_vs_default" in s:
        out["Δ vs default"] = s["diff_vs_default"]
        out["± SE (Δ)"] = s["diff_se"] if "diff_se" in s else float("nan")
    out["test MAP@3"] = s["map3_test"] if "map3_test" in s else float("nan")
    if "map3_test_se" in s:
        out["test ± SE"] = s["map3_test_se"]
    if "accuracy_all" in s:
        out["accuracy (all)"] = s["accuracy_all"]
    default = (scores.stacking_summary or {}).get("default")
    if default is not None:
        out["default"] = ["yes" if n == default else "" for n in s["name"]]
    out["final"] = ["yes" if n == scores.final else "" for n in s["name"]]
    return out


def _weights_text(weights: dict) -> str:
    return ", ".join(f"{m} {w:.3f}" for m, w in sorted(weights.items(), key=lambda kv: -kv[1]))


SE_KIND_TEXT = {"max": "the larger of its SE over rows and its SE over folds", "rows": "its SE over rows",
                "folds": "its SE over folds"}


def stacking_selection_lines(summary: dict) -> list[str]:
    """The paragraph on how the final learner was chosen (rule, default,
    strongest challenger and the numbers), and what the final learner learnt."""
    sel = summary.get("selection") or {}
    lines = []
    if sel:
        rule, default, final = sel.get("rule"), sel.get("default"), sel.get("final")
        k, se_kind = sel.get("switch_margin_se"), sel.get("switch_se")
        lines.append({"auto": f"Selection rule: keep the declared default **{default}** unless another entry's "
                              f"paired cross-validated MAP@3 advantage over it exceeds {k:g} standard error(s) of "
                              f"that difference ({SE_KIND_TEXT.get(se_kind, se_kind)}).",
                      "best": "Selection rule: the highest cross-validated MAP@3 (`stacking.final: best`).",
                      "forced": f"Selection: forced by `stacking.final: {final}`."}.get(rule, f"Selection: {rule}."))
        text = f"Default {default}: CV MAP@3 {fmt_score(sel.get('default_cv'))} ± {fmt_score(sel.get('default_cv_se'))}"
        cand = sel.get("candidate")
        if cand is not None and not _is_missing(sel.get("candidate_diff")):
            d, se = float(sel["candidate_diff"]), float(sel["candidate_diff_se"])
            text += (f"; {'switched to' if sel.get('switched') else 'strongest challenger'} {cand}: "
                     f"{d:+.4f} ± {se:.4f}")
            if rule == "auto":
                text += (f" (> {k:g} SE: switched)" if sel.get("switched")
                         else f" (not more than {k:g} SE: kept the default)")
        if rule == "best":
            text += f"; highest CV MAP@3: {final}"
        elif rule == "forced" and final != default and not _is_missing(sel.get("final_diff")):
            text += f"; forced {final}: {float(sel['final_diff']):+.4f} ± {float(sel['final_diff_se']):.4f} vs the default"
        lines.append(text + ".")
    details = summary.get("final_details") or {}
    final = summary.get("final")
    if details.get("weights"):
        lines.append(f"Weights of the final blend {final} (fit on all OOF rows): {_weights_text(details['weights'])}.")
    if details.get("model_weights"):
        lines.append(f"Per-model weights of the final {final}: {_weights_text(details['model_weights'])}.")
    if details.get("C") is not None:
        lines.append(f"Regularisation of the final {final} chosen by inner CV: C = {details['C']:g}.")
    if details.get("params"):
        lines.append(f"Parameters of the final {final} chosen by inner CV: "
                     + ", ".join(f"{k} {v}" for k, v in details["params"].items()) + ".")
    return lines


def _plot_link(work: WorkDir, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(work.root).as_posix()})"


def build_report(work, dataset: Dataset) -> str:
    """Write report.md and the plots; returns the markdown text."""
    work = _as_work(work)
    plots = work.plots_dir
    plots.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# Run report: `{work.root}`", "", f"Dataset: `{dataset.root}` ({dataset.layout} layout)", ""]
    labels_name = dataset.test_labels_csv.name if dataset.test_labels_csv else "test_labels.csv"

    # -- dataset --------------------------------------------------------------
    clips = read_clips(work)
    ds = dataset_summary(dataset, clips)
    per_class = (str(ds["clips_per_class_min"]) if ds["clips_per_class_min"] == ds["clips_per_class_max"]
                 else f"{ds['clips_per_class_min']}–{ds['clips_per_class_max']}")
    md += ["## Dataset", "",
           f"- clips: {ds['train_clips']:,} train, {ds['test_clips']:,} test"
           + ("" if ds["test_labelled"] is None else f" ({ds['test_labelled']:,} test clips labelled in {labels_name})"),
           f"- classes: {ds['classes']} ({per_class} train clips per class)",
           f"- manually verified: {ds['verified']:,} of {ds['train_clips']:,} train clips "
           f"({100 * ds['verified_share']:.1f}%)"]
    if ds["durations"] is None:
        md += ["- durations and bad files: not known (clips.csv is missing: the features stage did not run)", ""]
    else:
        dur = ds["durations"].set_index("split")
        md += [f"- total duration: {fmt_seconds(dur.at['train', 'total_s'])} train, "
               f"{fmt_seconds(dur.at['test', 'total_s'])} test; median clip {dur.at['train', 'median_s']:.2f} s train, "
               f"{dur.at['test', 'median_s']:.2f} s test", ""]
        md += [markdown_table(ds["durations"], {"total_s": lambda v: fmt_float(v, 1),
                                                "median_s": lambda v: fmt_float(v, 2),
                                                "min_s": lambda v: fmt_float(v, 2),
                                                "max_s": lambda v: fmt_float(v, 2)}), ""]
        bad = ds["bad"]
        md += [f"Clip status (from clips.csv): {len(bad)} bad file(s) found.", "",
               markdown_table(ds["status_counts"]), ""]
        if len(bad):
            md += ["Bad files (left out of training; bad test clips get the class prior):", "",
                   markdown_table(bad), ""]

    # -- scores ---------------------------------------------------------------
    scores = collect_scores(work)
    md += ["## Scores", "", "### Single models", ""]
    if len(scores.models):
        md += ["OOF MAP@3 over every row of folds.csv (all rows / manually verified rows only); "
               f"test MAP@3 when the dataset has test labels ({labels_name}).", "",
               markdown_table(models_score_table(scores), SCORE_FORMATS), ""]
    else:
        md += ["No model has been trained (no models/<model>/summary.json): run `python -m pipeline.train`.", ""]
    md += ["### Stacking", ""]
    if scores.stacking is not None:
        summ = scores.stacking_summary or {}
        md += ["Every model, blend and stacker scored by cross-validation on the shared folds "
               "(a learner never scores rows it was fit on)."
               + (" ± SE: standard error over the folds; Δ vs default: paired difference in cross-validated "
                  "MAP@3 to the default learner on the same rows, with its standard error."
                  if "diff_vs_default" in scores.stacking else ""), "",
               markdown_table(stacking_score_table(scores), SCORE_FORMATS), ""]
        if scores.final:
            line = f"Chosen final learner: **{scores.final}** ({summ.get('final_kind', '?')})"
            if summ.get("cv_map3_all") is not None:
                line += f", CV MAP@3 {fmt_score(summ.get('cv_map3_all'))} (verified {fmt_score(summ.get('cv_map3_verified'))})"
            if summ.get("test_map3") is not None:
                line += f", test MAP@3 {fmt_score(summ.get('test_map3'))}"
            md += [line + ".", ""]
            sel_lines = stacking_selection_lines(summ)
            if sel_lines:
                md += [" ".join(sel_lines), ""]
    else:
        md += ["Stacking was not run (no stacking/scores.csv): run `python -m stacking.stack`.", ""]

    # -- final OOF: per class and confusion -----------------------------------
    md += ["## Final OOF predictions", ""]
    final = None
    try:
        final = final_oof(work, dataset.classes)
    except (ValueError, FileNotFoundError) as exc:
        md += [f"The final OOF table could not be read ({exc}): no per-class scores or confusion matrix.", ""]
    else:
        if final is None and not work.folds_csv.exists():
            md += ["No folds.csv (the folds stage did not run): no per-class scores or confusion matrix.", ""]
        elif final is None:
            md += ["No OOF predictions (no model trained): no per-class scores or confusion matrix.", ""]
    if final is not None:
        n_unver = int((~final.verified).sum())
        md += [f"Final = **{final.name}** ({final.kind}, {final.source}), from `{final.path.relative_to(work.root).as_posix()}`: "
               f"OOF MAP@3 {fmt_score(final.map3)} on {len(final.y):,} clips, "
               f"{fmt_score(final.map3_verified)} on the {int(final.verified.sum()):,} verified ones.", ""]
        table = per_class_table(final)
        plot_per_class(table, plots / "per_class_map3.png", f"{final.name}: per-class OOF MAP@3")
        md += ["### Per-class MAP@3", "", _plot_link(work, plots / "per_class_map3.png", "per-class MAP@3"), "",
               markdown_table(table, {"map3": fmt_score, "map3_verified": fmt_score, "accuracy": fmt_score}), ""]
        plot_confusion(final, plots / "confusion.png")
        top1 = top_k_indices(final.probs, 1)[:, 0] == final.y
        md += ["### Confusion matrix", "",
               f"Top-1 prediction vs the given label over all {len(final.y):,} OOF clips. "
               f"{n_unver:,} of them are not manually verified, so some of their given labels are wrong "
               "and part of the off-diagonal mass is label noise, not model error. "
               f"Top-1 accuracy: {fmt_score(top1.mean())} all, "
               f"{fmt_score(top1[final.verified].mean() if final.verified.any() else None)} verified, "
               f"{fmt_score(top1[~final.verified].mean() if n_unver else None)} not verified.", "",
               _plot_link(work, plots / "confusion.png", "confusion matrix"), ""]
        cm = confusion_matrix(final)
        pairs = [(cm.index[i], cm.columns[j], int(cm.iat[i, j])) for i in range(len(cm)) for j in range(len(cm))
                 if i != j and cm.iat[i, j] > 0]
        pairs.sort(key=lambda t: -t[2])
        if pairs:
            md += ["Most frequent confusions:", "",
                   markdown_table(pd.DataFrame(pairs[:10], columns=["given", "predicted", "clips"])), ""]

    # -- training curves ------------------------------------------------------
    md += ["## Training curves", ""]
    histories = training_histories(work)
    if histories:
        for model, hist in histories.items():
            path = plots / f"training_{model}.png"
            plot_training(model, hist, path)
            best = hist.groupby("fold")["val_map3"].max()
            md += [f"### {model}", "",
                   f"{hist['fold'].nunique()} fold(s), {int(hist.groupby('fold')['epoch'].max().max())} epoch(s) at most; "
                   f"best validation MAP@3 per fold: " + ", ".join(f"{k}: {v:.4f}" for k, v in best.items()), "",
                   _plot_link(work, path, f"training {model}"), ""]
    else:
        md += ["No training history (no models/<model>/fold<k>/history.csv).", ""]

    # -- pseudo-labelling -----------------------------------------------------
    md += ["## Pseudo-labelling", ""]
    pseudo = pseudo_label_table(work)
    if pseudo is None:
        md += ["Pseudo-labelling was not run (no pseudo_label/iterations.csv).", ""]
    else:
        fmts = {c: fmt_score for c in pseudo.columns if "map3" in c}
        md += [markdown_table(pseudo, fmts), ""]
    md += guard_lines(read_json(work.pseudo_dir / "summary.json") or {})

    # -- timings --------------------------------------------------------------
    md += ["## Time per stage", ""]
    timings = timings_table(work)
    if timings is None:
        md += ["No timings.json (no stage has recorded its time).", ""]
    else:
        total = pd.DataFrame([{"stage": "total", "seconds": timings["seconds"].sum(), "share": 1.0}])
        shown = pd.concat([timings, total], ignore_index=True)
        md += ["Wall time per stage, summed over runs (this report's own time is added after it is written).", "",
               markdown_table(shown, {"seconds": fmt_seconds, "share": lambda v: f"{100 * v:.1f}%"}), ""]

    # -- submission -----------------------------------------------------------
    md += ["## Submission", ""]
    sub = submission_score(work, dataset)
    if not sub["exists"]:
        md += [f"No submission yet ({sub['path']} is missing: run `python -m stacking.stack`).", ""]
    else:
        origin = f" (from stacking's final learner {scores.final})" if scores.final else ""
        md += [f"Submission: `{sub['path']}`{origin}", ""]
        if dataset.test_labels is None:
            md += [f"No {labels_name} in the dataset: the test MAP@3 is not known.", ""]
        elif sub["map3"] is None:
            md += [f"{labels_name} labels none of the submission's clips: no test MAP@3.", ""]
        else:
            md += [f"Final test MAP@3: **{sub['map3']:.4f}** over {sub['labelled']:,} labelled test clips"
                   f"{scope_text(sub['labelled'], len(dataset.test_fnames))}.", ""]

    text = "\n".join(md).rstrip() + "\n"
    atomic_write_bytes(work.report_md, text.encode())
    return text


def report_inputs(work: WorkDir) -> str:
    """Identity of everything the report reads: every artefact in the work
    directory but the report's own outputs, the logs and timings.json (the
    report stage's own time is recorded there after the report is written;
    counting it would rebuild the report on every run)."""
    skip_dirs = {"plots", "logs"}
    skip_files = {work.report_md.name, work.timings_json.name, REPORT_INPUTS, ".lock", ".lock.json"}
    listing = [row for row in folder_listing(work.root, max_depth=6)
               if row[0].split("/")[0] not in skip_dirs and row[0] not in skip_files]
    return param_hash(listing, 16)


REPORT_INPUTS = ".report-inputs.json"


def run_report(cfg: dict, data_dir, work: WorkDir) -> Path:
    inputs = {"inputs": report_inputs(work), "data": str(Path(data_dir).resolve())}
    marker = work.root / REPORT_INPUTS
    if read_json(marker) == inputs and work.report_md.exists():
        log.info("report inputs unchanged: keeping %s", work.report_md)
        print(work.report_md)
        return work.report_md
    dataset = load_dataset(data_dir, check_files=False)  # the report only reads tables
    build_report(work, dataset)
    atomic_write_json(inputs, marker)
    log.info("wrote %s (plots in %s)", work.report_md, work.plots_dir)
    print(work.report_md)
    return work.report_md


def main(argv=None):
    args, cfg, work = start_stage("Write report.md and its plots from a run's work directory.", "report", argv)
    with timed_stage(work, "report"):
        run_report(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
