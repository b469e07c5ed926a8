"""Stage: train every listed model over every fold.

``python -m pipeline.train [--model NAME ...]`` (default: the preset's
``run.models``). Finished (model, fold) pairs whose settings are unchanged are
skipped; an interrupted fold resumes from its last epoch. With
``--set run.executor=ray`` every (model, fold) is a Ray job (README, "Running
on Ray"). Writes
``predictions/<model>_oof.csv`` and ``predictions/<model>_test.csv``.
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.fold_training import check_run, train_models


def main(argv=None):
    def extra(p):
        p.add_argument("--model", action="append", default=None, help="model to train (repeatable; default: run.models)")
    args, cfg, work = start_stage("Train the listed models over every fold.", "train", argv, extra)
    check_run(cfg, args.data)
    # run.executor: local trains model after model here; ray runs every (model, fold) as a Ray job
    train_models(cfg, args.data, work, args.model or cfg["run"]["models"], timed=timed_stage)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
