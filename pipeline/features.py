"""Stage: compute and cache every feature the preset's models need.

``python -m pipeline.features --config quick --data DIR --work DIR``

Each clip is decoded once and every missing feature is computed from it, in
parallel over clips (joblib, all cores by default; with ``--set
run.executor=ray`` one Ray job per chunk of clips). Re-running computes only
what is missing. Ends by writing ``clips.csv`` (status of every clip) and
per-feature normalisation statistics, and logs one summary line.
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.extraction import run_features


def main(argv=None):
    args, cfg, work = start_stage("Compute and cache features for every clip.", "features", argv)
    with timed_stage(work, "features"):
        run_features(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
