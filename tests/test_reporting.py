"""Unit tests of ``pipeline/reporting/``, the report stage's library: each
module on small hand-made inputs (the stage itself, on a whole synthetic run,
is tested in tests/test_report.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.dataset import load_dataset
from pipeline.reporting import artefacts, oof, plots, sections, tables
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json
from test_report import make_dataset  # noqa: E402  (tests/ is on sys.path under pytest)


# --- tables -------------------------------------------------------------------------
def test_markdown_table_formats_escapes_and_marks_missing():
    df = pd.DataFrame({"name": ["a|b", "c\nd"], "score": [0.123456, float("nan")], "n": [1234, None]})
    text = tables.markdown_table(df, {"score": tables.fmt_score})
    assert text.splitlines() == ["| name | score | n |", "|---|---|---|",
                                 "| a\\|b | 0.1235 | 1234.0 |", "| c d | – | – |"]


def test_formatters():
    assert tables.fmt_seconds(59.94) == "59.9 s"
    assert tables.fmt_seconds(150) == "2.5 min"
    assert tables.fmt_seconds(9000) == "2.50 h"
    assert tables.fmt_int(12345) == "12,345" and tables.fmt_float(1234.56) == "1,234.6"
    assert tables.fmt_signed(0.01) == "+0.0100" and tables.fmt_signed(None) == "–"
    assert tables.fmt_share(0.25) == "25.0%"
    assert tables.is_missing(pd.NA) and tables.is_missing(None) and not tables.is_missing([1, 2])


def test_stacking_score_table_marks_default_and_final():
    st = pd.DataFrame({"name": ["a", "mean", "lr"], "kind": ["model", "blend", "stacker"],
                       "map3_all": [0.8, 0.85, 0.9], "map3_verified": [0.82, 0.86, 0.91],
                       "diff_vs_default": [np.nan, 0.0, 0.05], "diff_se": [np.nan, 0.0, 0.01]})
    scores = artefacts.Scores(models=pd.DataFrame(), stacking=st, stacking_summary={"default": "mean"}, final="lr")
    t = tables.stacking_score_table(scores)
    assert list(t.columns) == ["name", "kind", "CV MAP@3 (all)", "CV MAP@3 (verified)", "Δ vs default",
                               "± SE (Δ)", "test MAP@3", "default", "final"]
    assert t["default"].tolist() == ["", "yes", ""] and t["final"].tolist() == ["", "", "yes"]
    assert "| lr | stacker | 0.9000 | 0.9100 | +0.0500 | 0.0100 | – |  | yes |" in \
        tables.markdown_table(t, tables.SCORE_FORMATS)


# --- artefacts ----------------------------------------------------------------------
def test_artefact_readers_on_a_small_work_dir(tmp_path):
    work = WorkDir(tmp_path / "work")
    assert artefacts.timings_table(work) is None and artefacts.pseudo_label_table(work) is None
    assert artefacts.collect_scores(work).models.empty and artefacts.training_histories(work) == {}

    atomic_write_json({"features": 30.0, "train:a": 90.0}, work.timings_json)
    t = artefacts.timings_table(work)
    assert t["share"].tolist() == [0.25, 0.75]

    for m, s in (("a", 0.7), ("b", 0.9), ("c", None)):
        atomic_write_json({"oof_map3": s, "params": 10}, work.model_dir(m) / "summary.json")
    assert artefacts.collect_scores(tmp_path / "work").models["model"].tolist() == ["b", "a", "c"]

    atomic_write_csv(pd.DataFrame({"epoch": [1, 2], "val_map3": [0.5, 0.6]}), work.fold_dir("a", 1) / "history.csv")
    (work.fold_dir("a", 0) / "history.csv").parent.mkdir(parents=True, exist_ok=True)
    (work.fold_dir("a", 0) / "history.csv").write_text("")  # an interrupted fold: skipped
    hist = artefacts.training_histories(work)
    assert list(hist) == ["a"] and hist["a"]["fold"].tolist() == [1, 1]

    work.pseudo_dir.mkdir(parents=True)
    pd.DataFrame({"extra": [1], "disagree": [2], "iteration": [1]}).to_csv(work.pseudo_dir / "iterations.csv",
                                                                          index=False)
    assert list(artefacts.pseudo_label_table(work).columns) == ["iteration", "disagree", "extra"]


# --- oof ----------------------------------------------------------------------------
def _final() -> oof.FinalOOF:
    classes = ["x", "y", "z"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .7, .2], [.3, .3, .4], [.6, .1, .3]])
    return oof.FinalOOF(name="m", kind="model", source="best single model", path=Path("m.csv"), classes=classes,
                        fnames=np.array([f"{i}.wav" for i in range(6)]), folds=np.array([0, 1, 0, 1, 0, 1]),
                        labels=np.asarray(classes)[y], y=y, verified=np.array([1, 0, 1, 1, 0, 1], bool),
                        probs=probs)


def test_confusion_per_class_and_most_wrong():
    final = _final()
    cm = oof.confusion_matrix(final)
    assert cm.to_numpy().tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    pairs = oof.top_confusions(cm)
    assert pairs.values.tolist() == [["x", "y", 1], ["z", "x", 1]]
    table = oof.per_class_table(final)
    assert table["class"].tolist()[-1] == "y" and table.set_index("class").at["y", "map3"] == 1.0
    assert table.set_index("class").at["x", "verified_clips"] == 1
    wrong = oof.most_wrong(final, 2)
    assert wrong["fname"].tolist() == ["1.wav", "5.wav"]
    assert np.allclose(wrong["p_given"], [0.2, 0.3]) and wrong["rank_given"].tolist() == [2, 2]


# --- plots --------------------------------------------------------------------------
def test_plots_return_figures_and_write_pngs(tmp_path):
    hist = pd.DataFrame({"fold": [0, 0, 1, 1], "epoch": [1, 2, 1, 2], "val_map3": [0.4, 0.5, 0.45, 0.6]})
    fig = plots.plot_training("m", hist)
    assert not list(tmp_path.iterdir())  # no path: nothing written
    plots.save_png(fig, tmp_path / "sub" / "t.png")
    assert (tmp_path / "sub" / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots.plot_confusion(_final(), tmp_path / "c.png")
    assert (tmp_path / "c.png").exists()


# --- sections -----------------------------------------------------------------------
def test_sections_of_an_empty_work_dir_write_nothing(tmp_path):
    data = make_dataset(tmp_path / "data", test_labels=False, audio=False)
    ds = load_dataset(data, check_files=False)
    work = WorkDir(tmp_path / "work")
    text, figures = sections.render_report(work, ds)
    assert figures == {} and not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert text.startswith(f"# Run report: `{work.root}`")
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Dataset", "## Scores", "## Final OOF predictions", "## Training curves", "## Pseudo-labelling",
        "## Time per stage", "## Submission"]
    assert sections.timings_section(work).lines[-2] == "No timings.json (no stage has recorded its time)."


def test_training_section_links_its_figure(tmp_path):
    work = WorkDir(tmp_path / "work")
    atomic_write_csv(pd.DataFrame({"epoch": [1, 2], "val_map3": [0.5, 0.6]}), work.fold_dir("a", 0) / "history.csv")
    sec = sections.training_section(work)
    assert list(sec.figures) == ["training_a.png"]
    assert "![training a](plots/training_a.png)" in sec.lines
    assert "best validation MAP@3 per fold: 0: 0.6000" in "\n".join(sec.lines)
