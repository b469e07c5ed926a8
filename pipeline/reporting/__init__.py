"""The library behind the report stage (``pipeline/report.py``) and
``notebooks/results.ipynb``: reading a run's work directory and turning it
into markdown and figures.

- ``artefacts``: the work directory's outputs as plain data (clips.csv,
  model summaries, stacking's scores, training histories, pseudo-labelling,
  timings, the submission's test score);
- ``oof``: the final out-of-fold predictions, per-class MAP@3, the confusion
  matrix, the most confidently wrong clips;
- ``tables``: cell formatters, markdown tables, the score tables;
- ``plots``: the figures (matplotlib, no pyplot);
- ``sections``: one function per report section, and ``render_report``.

Nothing here imports a stage module, and nothing but ``plots.save_png`` (and
the ``plot_*`` functions given a path) writes a file.
"""
from pipeline.reporting.artefacts import (PSEUDO_COLUMNS, Scores, collect_scores, dataset_summary,
                                          model_summaries, pseudo_label_summary, pseudo_label_table, read_clips,
                                          submission_score, timings_table, training_histories)
from pipeline.reporting.oof import FinalOOF, confusion_matrix, final_oof, most_wrong, per_class_table
from pipeline.reporting.plots import plot_confusion, plot_per_class, plot_training, save_png
from pipeline.reporting.sections import guard_lines, render_report, stacking_selection_lines
from pipeline.reporting.tables import (SCORE_FORMATS, fmt_float, fmt_int, fmt_score, fmt_seconds, markdown_table,
                                       models_score_table, stacking_score_table)

__all__ = ["PSEUDO_COLUMNS", "SCORE_FORMATS", "FinalOOF", "Scores", "collect_scores", "confusion_matrix",
           "dataset_summary", "final_oof", "fmt_float", "fmt_int", "fmt_score", "fmt_seconds", "guard_lines",
           "markdown_table", "model_summaries", "models_score_table", "most_wrong", "per_class_table",
           "plot_confusion", "plot_per_class", "plot_training", "pseudo_label_summary", "pseudo_label_table",
           "read_clips", "render_report", "save_png", "stacking_score_table", "stacking_selection_lines",
           "submission_score", "timings_table", "training_histories"]
