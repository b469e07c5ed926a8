"""Stage: verify the non-verified training labels (label noise), write ``labels.csv``.

``python -m pipeline.pseudo_label --config quick --data DIR --work DIR``

FSDKaggle2018 has ~60 % non-verified labels, up to a third of them wrong.
This stage runs between the first training round and the final models and
writes ``<work>/labels.csv`` (fname, label, status, epsilon) for every row of
``folds.csv``; the trainer uses it when the preset says
``labels.source: pseudo`` (:func:`pipeline.labels.training_labels`).

One switch, ``pseudo_label.mode``, picks the method:

``verify`` (default; the "pseudo-label + label smoothing" system)
    Iteration 0 trains the verifier ensemble (``pseudo_label.verifiers``) on
    the verified rows only. Every iteration trains each verifier over the K
    folds of ``folds.csv`` on the current training set -- for fold k: train on
    the training-set rows with fold != k, early-stop on the training-set rows
    with fold == k, and predict the non-verified rows with fold == k, so no
    model ever scores a row it trained on. The verifiers are combined by
    geometric mean. A non-verified row is *accepted* (added to the training
    set, with its given label, for good) when its top prediction is its given
    label with probability > ``accept_threshold``. The loop stops when the
    number of disagreeing rows (given label outside the top 3) is not lower
    than at the previous iteration (plateau), when an iteration accepts
    nothing new (the next one would retrain on the same set), or at
    ``max_iterations`` rounds; that last iteration is the final one: on its
    predictions rows are accepted above ``final_accept_threshold`` and rows
    whose top prediction is another class with probability >
    ``relabel_threshold`` are *relabelled* to it. Rows left are *unresolved*
    and trained with label smoothing eps ~ U(``unresolved_epsilon``) per row
    (seeded); verified, accepted and relabelled rows get
    ``training.smoothing_verified``.
``smoothing`` (the LR-fusion paper)
    No verification: labels.csv = the given labels with fixed smoothing by
    status (``training.smoothing_verified`` 0.05 / ``training.smoothing_unverified``
    0.3); non-verified rows get status ``unresolved``.
``loss_masking`` (1st place)
    No verification; labels.csv as in ``smoothing`` (labels left alone).
    The method itself lives in the trainer: set ``training.loss_masking: 0.8``
    to drop, within each batch, the losses of unverified rows above 0.8 x the
    batch maximum (:mod:`pipeline.losses`).
``self_verify`` (2nd place)
    The same loop with another acceptance rule: a remaining row is accepted
    when every one of ``crops`` random crops (``pipeline.windows.random_window``,
    seeded), predicted by the fold model that never trained on it
    (``best.keras``), ranks its given label first and the mean probability of
    that label is > ``self_verify_threshold``; at most ``per_class_cap`` rows
    per class per round (the most confident). No threshold lowering and no
    relabelling at the final iteration.

``guard`` (``pseudo_label.guard: true``; mode ``verify``)
    Verification must not make the labels worse. The verifiers' out-of-fold
    predictions of the training-set rows are kept (``iter<i>/calibration.csv``).
    At iteration 0 (verified rows only) they give the precision of the
    ensemble's top class at each confidence on rows whose labels are right;
    the accept and relabel thresholds are raised to the lowest confidence at
    which that precision reaches ``accept_precision`` / ``relabel_precision``
    (over at least ``min_support`` rows), and a decision no confidence
    supports is switched off: those rows stay unresolved (their given label,
    smoothed). At later iterations (accepted rows in the training set), a
    MAP@3 on the verified rows more than ``fallback_margin`` below iteration
    0's means the accepted rows hurt: the stage falls back to the given labels
    with fixed smoothing, and summary.json says why. Verifiers may be
    handcrafted models (``stats_lgbm``): cheap, and on small data often the
    strongest.

The stage is skipped (and says so) when ``pseudo_label.enabled`` is false or
folds.csv has no non-verified row; then, if ``labels.source`` is ``pseudo``,
labels.csv is written with the given labels and the fixed smoothing of mode
``smoothing`` so the trainer still works.

Artefacts under ``<work>/pseudo_label/``: ``iter<i>/<verifier>/fold<k>/``
(the trainer's fold folder + ``pred.csv`` + ``summary.json``),
``iter<i>/<verifier>/predictions.csv``, ``iter<i>/predictions.csv`` (the
ensemble), ``iter<i>/decisions.csv``, ``iter<i>/state.json`` (written
atomically; a finished iteration whose inputs are unchanged is not
recomputed, and a finished fold is skipped by fingerprint),
``iterations.csv`` (the per-iteration table), ``summary.json`` and, when the
dataset has ``train_clean_labels.csv``, ``quality.json`` (precision/recall
of the accepted and relabelled rows).
"""
from __future__ import annotations

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.labelling import run_pseudo_label


def main(argv=None):
    args, cfg, work = start_stage("Verify the non-verified labels (pseudo-labelling); write labels.csv.",
                                  "pseudo_label", argv)
    with timed_stage(work, "pseudo_label"):
        run_pseudo_label(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
