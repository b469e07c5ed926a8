"""The report's sections: one function per ``## section`` of report.md.

Each takes what it reads (the work directory, the dataset, or data already
read) and returns a ``Section``: its markdown lines and the figures it links
to, by file name under ``plots/``. Nothing here writes a file; the report
stage writes report.md and the figures (``render_report`` gives both).

A part whose inputs are missing becomes one line saying what was not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from pipeline.dataset import Dataset
from pipeline.metrics import scope_text, top_k_indices
from pipeline.reporting.artefacts import (Scores, as_work, collect_scores, dataset_summary, meta_class_groupings,
                                          pseudo_label_summary, pseudo_label_table, read_clips, submission_score,
                                          timings_table, training_histories)
from pipeline.reporting.oof import confusion_matrix, final_oof, per_class_table, top_confusions
from pipeline.reporting.plots import plot_confusion, plot_per_class, plot_training
from pipeline.reporting.tables import (SCORE_FORMATS, fmt_float, fmt_score, fmt_seconds, fmt_share, is_missing,
                                       markdown_table, models_score_table, stacking_score_table)
from pipeline.workdir import WorkDir


@dataclass
class Section:
    lines: list[str]
    figures: dict = field(default_factory=dict)   # file name under plots/ -> matplotlib Figure


def labels_file_name(dataset: Dataset) -> str:
    """The dataset's test labels file by name (test_labels.csv when it has none)."""
    return dataset.test_labels_csv.name if dataset.test_labels_csv else "test_labels.csv"


def plot_link(work: WorkDir, name: str, alt: str) -> str:
    """Markdown image of ``plots/<name>``, relative to report.md."""
    return f"![{alt}]({(work.plots_dir / name).relative_to(work.root).as_posix()})"


# ---------------------------------------------------------------------------
# prose
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
        if cand is not None and not is_missing(sel.get("candidate_diff")):
            d, se = float(sel["candidate_diff"]), float(sel["candidate_diff_se"])
            text += (f"; {'switched to' if sel.get('switched') else 'strongest challenger'} {cand}: "
                     f"{d:+.4f} ± {se:.4f}")
            if rule == "auto":
                text += (f" (> {k:g} SE: switched)" if sel.get("switched")
                         else f" (not more than {k:g} SE: kept the default)")
        if rule == "best":
            text += f"; highest CV MAP@3: {final}"
        elif rule == "forced" and final != default and not is_missing(sel.get("final_diff")):
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


# ---------------------------------------------------------------------------
# the sections, in the report's order
def header_section(work: WorkDir, dataset: Dataset) -> Section:
    return Section([f"# Run report: `{work.root}`", "", f"Dataset: `{dataset.root}` ({dataset.layout} layout)", ""])


def dataset_section(work: WorkDir, dataset: Dataset) -> Section:
    """Clips, classes, verified share; durations and bad files from clips.csv."""
    ds = dataset_summary(dataset, read_clips(work))
    labels_name = labels_file_name(dataset)
    per_class = (str(ds["clips_per_class_min"]) if ds["clips_per_class_min"] == ds["clips_per_class_max"]
                 else f"{ds['clips_per_class_min']}–{ds['clips_per_class_max']}")
    md = ["## Dataset", "",
          f"- clips: {ds['train_clips']:,} train, {ds['test_clips']:,} test"
          + ("" if ds["test_labelled"] is None else f" ({ds['test_labelled']:,} test clips labelled in {labels_name})"),
          f"- classes: {ds['classes']} ({per_class} train clips per class)",
          f"- manually verified: {ds['verified']:,} of {ds['train_clips']:,} train clips "
          f"({100 * ds['verified_share']:.1f}%)"]
    if ds["durations"] is None:
        md += ["- durations and bad files: not known (clips.csv is missing: the features stage did not run)", ""]
        return Section(md)
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
    return Section(md)


def scores_section(scores: Scores, labels_name: str) -> Section:
    """The single models' table and, when stacking ran, stacking's table with the chosen final learner."""
    md = ["## Scores", "", "### Single models", ""]
    if len(scores.models):
        md += ["OOF MAP@3 over every row of folds.csv (all rows / manually verified rows only); "
               f"test MAP@3 when the dataset has test labels ({labels_name}).", "",
               markdown_table(models_score_table(scores), SCORE_FORMATS), ""]
    else:
        md += ["No model has been trained (no models/<model>/summary.json): run `python -m pipeline.train`.", ""]
    md += ["### Stacking", ""]
    if scores.stacking is None:
        md += ["Stacking was not run (no stacking/scores.csv): run `python -m stacking.stack`.", ""]
        return Section(md)
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
    return Section(md)


PER_CLASS_PNG = "per_class_map3.png"
CONFUSION_PNG = "confusion.png"


def final_oof_section(work: WorkDir, dataset: Dataset) -> Section:
    """Per-class MAP@3 and the confusion matrix of the final OOF predictions (with their plots)."""
    md = ["## Final OOF predictions", ""]
    try:
        final = final_oof(work, dataset.classes)
    except (ValueError, FileNotFoundError) as exc:
        return Section(md + [f"The final OOF table could not be read ({exc}): no per-class scores or confusion "
                             "matrix.", ""])
    if final is None and not work.folds_csv.exists():
        return Section(md + ["No folds.csv (the folds stage did not run): no per-class scores or confusion matrix.",
                             ""])
    if final is None:
        return Section(md + ["No OOF predictions (no model trained): no per-class scores or confusion matrix.", ""])
    figures = {}
    n_unver = int((~final.verified).sum())
    md += [f"Final = **{final.name}** ({final.kind}, {final.source}), from `{final.path.relative_to(work.root).as_posix()}`: "
           f"OOF MAP@3 {fmt_score(final.map3)} on {len(final.y):,} clips, "
           f"{fmt_score(final.map3_verified)} on the {int(final.verified.sum()):,} verified ones.", ""]
    table = per_class_table(final)
    figures[PER_CLASS_PNG] = plot_per_class(table, title=f"{final.name}: per-class OOF MAP@3")
    md += ["### Per-class MAP@3", "", plot_link(work, PER_CLASS_PNG, "per-class MAP@3"), "",
           markdown_table(table, {"map3": fmt_score, "map3_verified": fmt_score, "accuracy": fmt_score}), ""]
    figures[CONFUSION_PNG] = plot_confusion(final)
    top1 = top_k_indices(final.probs, 1)[:, 0] == final.y
    md += ["### Confusion matrix", "",
           f"Top-1 prediction vs the given label over all {len(final.y):,} OOF clips. "
           f"{n_unver:,} of them are not manually verified, so some of their given labels are wrong "
           "and part of the off-diagonal mass is label noise, not model error. "
           f"Top-1 accuracy: {fmt_score(top1.mean())} all, "
           f"{fmt_score(top1[final.verified].mean() if final.verified.any() else None)} verified, "
           f"{fmt_score(top1[~final.verified].mean() if n_unver else None)} not verified.", "",
           plot_link(work, CONFUSION_PNG, "confusion matrix"), ""]
    pairs = top_confusions(confusion_matrix(final), 10)
    if len(pairs):
        md += ["Most frequent confusions:", "", markdown_table(pairs), ""]
    return Section(md, figures)


def training_section(work: WorkDir) -> Section:
    """Validation MAP@3 per epoch and fold, one plot per model."""
    md = ["## Training curves", ""]
    histories = training_histories(work)
    if not histories:
        return Section(md + ["No training history (no models/<model>/fold<k>/history.csv).", ""])
    figures = {}
    for model, hist in histories.items():
        name = f"training_{model}.png"
        figures[name] = plot_training(model, hist)
        best = hist.groupby("fold")["val_map3"].max()
        md += [f"### {model}", "",
               f"{hist['fold'].nunique()} fold(s), {int(hist.groupby('fold')['epoch'].max().max())} epoch(s) at most; "
               f"best validation MAP@3 per fold: " + ", ".join(f"{k}: {v:.4f}" for k, v in best.items()), "",
               plot_link(work, name, f"training {model}"), ""]
    return Section(md, figures)


def meta_classes_section(work: WorkDir) -> Section:
    """The meta-classes every fold of a hierarchical model used (given or derived); nothing without one."""
    groupings = meta_class_groupings(work)
    if not groupings:
        return Section([])
    md = ["## Meta-classes of the hierarchical models", ""]
    for model, folds in groupings.items():
        hows = sorted({m["how"] for m in folds})
        md += [f"### {model}", "", f"Meta-classes {'; '.join(hows)}.", ""]
        rows = [{"fold": m["fold"], "meta-classes": "; ".join(
            f"**{name}**: {', '.join(members)}" for name, members in zip(m["names"], m["classes"]))} for m in folds]
        md += [markdown_table(pd.DataFrame(rows), {}), ""]
    return Section(md)


def pseudo_label_section(work: WorkDir) -> Section:
    """The pseudo-labelling iterations and what its guard decided."""
    md = ["## Pseudo-labelling", ""]
    pseudo = pseudo_label_table(work)
    if pseudo is None:
        md += ["Pseudo-labelling was not run (no pseudo_label/iterations.csv).", ""]
    else:
        md += [markdown_table(pseudo, {c: fmt_score for c in pseudo.columns if "map3" in c}), ""]
    return Section(md + guard_lines(pseudo_label_summary(work)))


def timings_section(work: WorkDir) -> Section:
    """Wall time per stage with its share, and the total."""
    md = ["## Time per stage", ""]
    timings = timings_table(work)
    if timings is None:
        return Section(md + ["No timings.json (no stage has recorded its time).", ""])
    total = pd.DataFrame([{"stage": "total", "seconds": timings["seconds"].sum(), "share": 1.0}])
    shown = pd.concat([timings, total], ignore_index=True)
    return Section(md + ["Wall time per stage, summed over runs (this report's own time is added after it is "
                         "written).", "",
                         markdown_table(shown, {"seconds": fmt_seconds, "share": fmt_share}), ""])


def submission_section(work: WorkDir, dataset: Dataset, scores: Scores) -> Section:
    """Where the submission is and, with test labels, its test MAP@3."""
    md = ["## Submission", ""]
    labels_name = labels_file_name(dataset)
    sub = submission_score(work, dataset)
    if not sub["exists"]:
        return Section(md + [f"No submission yet ({sub['path']} is missing: run `python -m stacking.stack`).", ""])
    origin = f" (from stacking's final learner {scores.final})" if scores.final else ""
    md += [f"Submission: `{sub['path']}`{origin}", ""]
    if dataset.test_labels is None:
        md += [f"No {labels_name} in the dataset: the test MAP@3 is not known.", ""]
    elif sub["map3"] is None:
        md += [f"{labels_name} labels none of the submission's clips: no test MAP@3.", ""]
    else:
        md += [f"Final test MAP@3: **{sub['map3']:.4f}** over {sub['labelled']:,} labelled test clips"
               f"{scope_text(sub['labelled'], len(dataset.test_fnames))}.", ""]
    return Section(md)


def report_sections(work, dataset: Dataset) -> list[Section]:
    """Every section of the report, in order."""
    work = as_work(work)
    scores = collect_scores(work)
    return [header_section(work, dataset), dataset_section(work, dataset),
            scores_section(scores, labels_file_name(dataset)), final_oof_section(work, dataset),
            training_section(work), meta_classes_section(work), pseudo_label_section(work), timings_section(work),
            submission_section(work, dataset, scores)]


def render_report(work, dataset: Dataset) -> tuple[str, dict]:
    """(report.md's text, {file name under plots/: Figure}); writes nothing."""
    sections = report_sections(work, dataset)
    lines = [line for s in sections for line in s.lines]
    figures = {name: fig for s in sections for name, fig in s.figures.items()}
    return "\n".join(lines).rstrip() + "\n", figures
