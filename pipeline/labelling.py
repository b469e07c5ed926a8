"""What the pseudo-label stage does: pick the mode, run it, write ``labels.csv`` and its reports.

The methods are described in the stage, :mod:`pipeline.pseudo_label`; the
decision rules and the loop in :mod:`pipeline.verification`; the verifiers'
training in :mod:`pipeline.verifiers`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline.clips import load_clips
from pipeline.config import resolve, section
from pipeline.cv import current_folds
from pipeline.dataset import load_dataset
from pipeline.executor import make_executor
from pipeline.fingerprints import data_hash
from pipeline.labels import write_labels_table
from pipeline.verification import (assign_epsilon, format_table, given_labels_table, labels_table, quality_report,
                                   verification_loop)
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json

log = logging.getLogger("pseudo_label")


def settings(cfg: dict) -> dict:
    """The ``pseudo_label`` section, validated, every default filled in."""
    return section(cfg, "pseudo_label")


def _given_epsilons(cfg: dict) -> tuple[float, float]:
    t = cfg["training"]
    return float(t["smoothing_verified"] or 0.0), float(t["smoothing_unverified"] or 0.0)


def pseudo_label_stage(cfg: dict, work: WorkDir, folds: pd.DataFrame, classes: list[str],
                       clean: pd.DataFrame | None = None, progress: bool = True,
                       runner: Callable | None = None, data_hash: str = "") -> dict:
    """Everything after loading: decide the mode, run it, write labels.csv and the reports."""
    cfg = resolve(cfg)
    s = cfg["pseudo_label"]
    source = cfg["labels"]["source"]
    eps_v, eps_u = _given_epsilons(cfg)
    out = work.pseudo_dir
    n_nonver = int((folds["manually_verified"].astype(int) == 0).sum())
    reason = None
    if not s["enabled"]:
        reason = "pseudo_label.enabled is false"
    elif n_nonver == 0:
        reason = "folds.csv has no non-verified row"
    if reason:
        msg = f"pseudo-labelling skipped: {reason}"
        if source == "pseudo":
            write_labels_table(work, given_labels_table(folds, eps_v, eps_u), folds)
            msg += f"; labels.source is pseudo, so {work.labels_csv} = the given labels (smoothing {eps_v}/{eps_u})"
        log.info(msg)
        print(msg)
        return {"skipped": reason}

    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": s["mode"], "rows": len(folds), "nonverified": n_nonver}
    if s["mode"] in ("smoothing", "loss_masking"):
        table = given_labels_table(folds, eps_v, eps_u)
        write_labels_table(work, table, folds)
        for stale in ("iterations.csv", "quality.json"):  # a previous loop's reports would no longer apply
            (out / stale).unlink(missing_ok=True)
        msg = (f"pseudo-labelling mode {s['mode']}: no verification; {work.labels_csv} = the given labels with "
               f"smoothing {eps_v} (verified) / {eps_u} (non-verified)")
        if s["mode"] == "loss_masking":
            ratio = cfg["training"]["loss_masking"]
            msg += f"; the trainer masks unverified losses with training.loss_masking = {ratio}"
            if ratio is None:
                log.warning("mode loss_masking but training.loss_masking is null: set it (e.g. 0.8) "
                            "or the final models train without masking")
        log.info(msg)
        print(msg)
        summary["message"] = msg
        atomic_write_json(summary, out / "summary.json")
        return summary

    with make_executor(cfg, work, "pseudo_label", progress) as executor:  # Ray starts with the first job
        if runner is None:
            from pipeline.verifiers import FoldVerifiers  # Keras only when a network verifier trains
            runner = FoldVerifiers(cfg, work, s, classes, progress, data_hash, executor=executor)
        result = verification_loop(folds, classes, s, runner, out)
    low, high = (float(v) for v in s["unresolved_epsilon"])
    if result.guard is not None:
        # the guard keeps doubtful rows as they were: their given label with the fixed non-verified
        # smoothing, so a run in which the verifiers' record supports no decision trains exactly as
        # fixed smoothing does (measured: U(0.1, 0.3) alone moved the final test MAP@3 by up to 0.009)
        low = high = eps_u
    eps = assign_epsilon(result.status, eps_v, low, high, int(cfg["seed"]))
    table = labels_table(folds, classes, result.final_labels, result.status, eps)
    if result.guard is not None:
        summary["guard"] = result.guard
        if result.guard.get("fallback"):  # verification would hurt here: the given labels, fixed smoothing
            table = given_labels_table(folds, eps_v, eps_u)
    write_labels_table(work, table, folds)
    atomic_write_csv(result.table, out / "iterations.csv")
    counts = pd.Series(table["status"]).map(lambda st: st.split("@")[0]).value_counts().to_dict()
    summary.update(final_iteration=result.final_iteration, relabelled=result.relabelled,
                   status_counts={k: int(v) for k, v in counts.items()},
                   iterations=result.table.to_dict(orient="records"))
    text = format_table(result.table)
    log.info("pseudo-labelling (%s) per iteration:\n%s", s["mode"], text)
    print(f"pseudo-labelling ({s['mode']}), final iteration {result.final_iteration}:\n{text}")
    print("label status: " + ", ".join(f"{k} {v}" for k, v in summary["status_counts"].items()))
    if clean is not None:
        quality = quality_report(folds, table, clean)
        atomic_write_json(quality, out / "quality.json")
        summary["quality"] = quality
        qtext = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
        log.info("quality vs train_clean_labels.csv: %s", qtext)
        print(f"quality vs train_clean_labels.csv: {qtext}")
    else:
        (out / "quality.json").unlink(missing_ok=True)
    if source != "pseudo":
        log.info("wrote %s; set labels.source: pseudo (--set labels.source=pseudo) for the final models to use it",
                 work.labels_csv)
    atomic_write_json(summary, out / "summary.json")
    return summary


def run_pseudo_label(cfg: dict, data_dir, work: WorkDir, progress: bool = True) -> dict:
    """The stage's work on a dataset folder (the clean labels, when it has them, score the result)."""
    dataset = load_dataset(data_dir)
    folds = current_folds(cfg, dataset, work)
    clean_path = Path(data_dir) / "train_clean_labels.csv"
    clean = pd.read_csv(clean_path, dtype={"fname": str, "label": str}) if clean_path.exists() else None
    clips = load_clips(work)
    return pseudo_label_stage(cfg, work, folds, dataset.classes, clean, progress,
                              data_hash=data_hash(clips, dataset.classes, []))


