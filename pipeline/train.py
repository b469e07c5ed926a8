"""Stage: train every listed model over every fold.

``python -m pipeline.train [--model NAME ...]`` (default: the preset's
``run.models``). Finished (model, fold) pairs whose settings are unchanged are
skipped; an interrupted fold resumes from its last epoch. Writes
``predictions/<model>_oof.csv`` and ``predictions/<model>_test.csv``.
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.fold_training import check_run, train_model


def main(argv=None):
    def extra(p):
        p.add_argument("--model", action="append", default=None, help="model to train (repeatable; default: run.models)")
    args, cfg, work = start_stage("Train the listed models over every fold.", "train", argv, extra)
    check_run(cfg, args.data)
    for model in args.model or cfg["run"]["models"]:
        with timed_stage(work, f"train:{model}"):
            train_model(cfg, args.data, work, model)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
