"""Stage: the cross-validation folds every model and the stacker share.

``python -m pipeline.folds`` writes ``<work>/folds.csv`` (fname, label,
manually_verified, fold), stratified on label x manually_verified and
seeded. Clips that failed to decode are left out (see ``clips.csv``).
``folds.json`` records what it was made from (the usable rows with their
labels and flags, n_folds, seed): re-running keeps the file while those are
unchanged, so every model sees the same split, and rewrites it (saying what
changed) when train.csv or the settings changed.
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.cv import run_folds


def main(argv=None):
    args, cfg, work = start_stage("Write the shared cross-validation folds.", "folds", argv)
    with timed_stage(work, "folds"):
        run_folds(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
