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
by one line saying what was not run. The reading, tables, plots and sections
live in ``pipeline/reporting/``; this stage decides whether the report is up
to date and writes it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.dataset import Dataset, load_dataset
from pipeline.fingerprints import folder_listing, param_hash
from pipeline.reporting.artefacts import as_work
from pipeline.reporting.plots import save_png
from pipeline.reporting.sections import render_report
from pipeline.workdir import WorkDir, atomic_write_bytes, atomic_write_json, read_json

__all__ = ["main", "run_report", "build_report", "report_inputs", "REPORT_INPUTS"]

log = logging.getLogger("report")

REPORT_INPUTS = ".report-inputs.json"


def build_report(work, dataset: Dataset) -> str:
    """Write report.md and the plots; returns the markdown text."""
    work = as_work(work)
    work.plots_dir.mkdir(parents=True, exist_ok=True)
    text, figures = render_report(work, dataset)
    for name, fig in figures.items():
        save_png(fig, work.plots_dir / name)
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
