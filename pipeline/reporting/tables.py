"""Markdown for the report: cell formatters, a GitHub table writer and the
score tables (single models; every model, blend and stacker of stacking)."""
from __future__ import annotations

import pandas as pd

from pipeline.reporting.artefacts import Scores


def is_missing(x) -> bool:
    """None, NaN or NA (anything pandas counts as missing); never raises."""
    if x is None:
        return True
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def fmt_score(x) -> str:
    return "–" if is_missing(x) else f"{float(x):.4f}"


def fmt_int(x) -> str:
    return "–" if is_missing(x) else f"{int(x):,}"


def fmt_float(x, digits: int = 1) -> str:
    return "–" if is_missing(x) else f"{float(x):,.{digits}f}"


def fmt_signed(x) -> str:
    return "–" if is_missing(x) else f"{float(x):+.4f}"


def fmt_seconds(x) -> str:
    if is_missing(x):
        return "–"
    x = float(x)
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def fmt_share(x) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(df: pd.DataFrame, formats: dict | None = None) -> str:
    """A GitHub markdown table; ``formats`` maps column -> callable(value) -> str."""
    formats = formats or {}

    def cell(col, value):
        text = formats[col](value) if col in formats else ("–" if is_missing(value) else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |")
    return "\n".join(lines)


SCORE_FORMATS = {"OOF MAP@3 (all)": fmt_score, "OOF MAP@3 (verified)": fmt_score, "test MAP@3": fmt_score,
                 "params": fmt_int, "samples/s": fmt_float, "train time": fmt_seconds,
                 "CV MAP@3 (all)": fmt_score, "CV MAP@3 (verified)": fmt_score, "accuracy (all)": fmt_score,
                 "± SE": fmt_score, "Δ vs default": fmt_signed, "± SE (Δ)": fmt_score, "test ± SE": fmt_score}


def models_score_table(scores: Scores) -> pd.DataFrame:
    """One row per trained model, best OOF MAP@3 first, with the report's column names."""
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
