"""Stage: level-2 learning on the out-of-fold tables.

``python -m stacking.stack --config quick --data DIR --work DIR`` loads the
listed models' OOF/test tables, scores every single model, blend and stacker
by cross-validation on the shared folds (never on rows a learner was fit
on), writes ``<work>/stacking/`` (scores.csv, <learner>_oof.csv,
final_test.csv, submissions/<name>.csv, summary.json) and the final
``<work>/submission.csv`` from the chosen learner fit on all OOF rows.

Every score comes with its uncertainty (scores.csv): map3_all_se is the
standard error over the folds (std of the K per-fold MAP@3 / sqrt(K)),
map3_all_se_rows the one over rows; diff_vs_default is the paired
cross-validated MAP@3 difference to the default learner on the same rows,
with diff_se_rows (SE of the mean per-row AP@3 difference), diff_se_folds
(from the K per-fold differences) and diff_se (the one ``switch_se`` names);
with test labels also map3_test, map3_test_se and diff_test_vs_default.

The final learner (``final: auto``): the declared ``default`` is kept unless
another entry's paired advantage over it exceeds ``switch_margin_se`` times
diff_se; among those that do, the highest cross-validated MAP@3 wins. A lead
smaller than its noise never changes the submission. summary.json and the
report record the rule, the default and the numbers behind the choice.

Settings: the ``stacking`` section (:class:`pipeline.settings.Stacking`;
``python -m pipeline.config`` prints each with its doc). The work is in
:mod:`stacking.level2`, the choice of the final entry in :mod:`stacking.selection`.
Resumable: when summary.json records the same input fingerprint (the
content of every input table, the dataset's tables, the MFCC cache key and
clips, the resolved settings) and every output exists, the stage does
nothing; when it differs, submission.csv and the other final outputs are
removed before anything is recomputed.
"""
from __future__ import annotations

import logging
import sys

from pipeline.cli import run_main, start_stage, timed_stage
from stacking.inputs import StackInputError
from stacking.level2 import run_stacking

log = logging.getLogger("stacking")


def main(argv=None):
    args, cfg, work = start_stage("Stack the models' out-of-fold predictions.", "stacking", argv)
    with timed_stage(work, "stacking"):
        run_stacking(cfg, args.data, work)


def cli(argv=None) -> int:
    """run_main, plus a refused level-1 table exits 2 with one clear line
    (caught inside the stage, so however run_main treats other errors)."""
    refused: list[StackInputError] = []

    def guarded(args):
        try:
            main(args)
        except StackInputError as exc:
            refused.append(exc)

    rc = run_main(guarded, argv)
    if refused:
        log.error("%s", refused[0])
        print(f"error: {refused[0]}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    raise SystemExit(cli())
