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

import copy
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.config import ConfigError, model_config, param_hash
from pipeline.labels import write_labels_table
from pipeline.metrics import map_at_3
from pipeline.predictions import class_columns, geometric_mean, probs_frame, read_table, write_table
from pipeline.workdir import WorkDir, atomic_write_bytes, atomic_write_csv, atomic_write_json, read_json

log = logging.getLogger("pseudo_label")

MODES = ("verify", "smoothing", "loss_masking", "self_verify")
LOOP_MODES = ("verify", "self_verify")
VERIFIED = "verified"
UNRESOLVED = "unresolved"
TABLE_COLUMNS = ["iteration", "train_rows", "newly_accepted", "agree_rank1", "agree_rank2", "agree_rank3",
                 "disagree", "remaining_unverified", "map3_vs_given"]
DEFAULTS = {
    "enabled": True, "mode": "verify", "verifiers": ["cnn_ref"], "models": {}, "train": {},
    "accept_threshold": 0.5, "final_accept_threshold": 0.1, "relabel_threshold": 0.5,
    "max_iterations": 5, "unresolved_epsilon": [0.1, 0.3],
    "crops": 25, "self_verify_threshold": 0.95, "per_class_cap": 40,
    "guard": False, "accept_precision": 0.95, "relabel_precision": 0.9, "min_support": 20,
    "fallback_margin": 0.01,
}


def accepted_status(iteration: int) -> str:
    return f"accepted@{iteration}"


def relabelled_status(iteration: int) -> str:
    return f"relabelled@{iteration}"


# -- settings -----------------------------------------------------------------
def settings(cfg: dict) -> dict:
    """The preset's ``pseudo_label`` section over the defaults, validated."""
    s = copy.deepcopy(DEFAULTS)
    s.update(copy.deepcopy(cfg.get("pseudo_label") or {}))
    if s["mode"] not in MODES:
        raise ConfigError(f"pseudo_label.mode must be one of {', '.join(MODES)}, got {s['mode']!r}")
    for key in ("accept_threshold", "final_accept_threshold", "relabel_threshold", "self_verify_threshold"):
        if not 0.0 <= float(s[key]) <= 1.0:
            raise ConfigError(f"pseudo_label.{key} must be in [0, 1], got {s[key]!r}")
    if int(s["max_iterations"]) < 1:
        raise ConfigError(f"pseudo_label.max_iterations must be >= 1, got {s['max_iterations']!r}")
    if isinstance(s["verifiers"], str):
        s["verifiers"] = [s["verifiers"]]
    if s["mode"] in LOOP_MODES and not s["verifiers"]:
        raise ConfigError("pseudo_label.verifiers is empty: name at least one model")
    low, high = (float(v) for v in s["unresolved_epsilon"])
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"pseudo_label.unresolved_epsilon must be [low, high] in [0, 1], got {s['unresolved_epsilon']}")
    for key in ("accept_precision", "relabel_precision"):
        if not 0.0 < float(s[key]) <= 1.0:
            raise ConfigError(f"pseudo_label.{key} must be in (0, 1], got {s[key]!r}")
    if int(s["min_support"]) < 1:
        raise ConfigError(f"pseudo_label.min_support must be >= 1, got {s['min_support']!r}")
    if int(s["crops"]) < 1 or int(s["per_class_cap"]) < 1:
        raise ConfigError("pseudo_label.crops and pseudo_label.per_class_cap must be >= 1")
    return s


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def verifier_spec(cfg: dict, name: str) -> dict:
    """Full settings of one verifier: a model of the preset's ``models`` or of
    ``pseudo_label.models`` (verifier-only entries), with ``pseudo_label.train``
    applied over its training settings."""
    pl = cfg.get("pseudo_label") or {}
    merged = dict(cfg)
    merged["models"] = {**(cfg.get("models") or {}), **(pl.get("models") or {})}
    spec = model_config(merged, name)
    spec["train"] = _merge(spec["train"], pl.get("train") or {})
    return spec


# -- pure decision logic (no Keras) ----------------------------------------
def label_ranks(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """1-based rank of each row's given label (ties: lower class index first,
    as :func:`pipeline.metrics.top_k_indices`)."""
    probs = np.asarray(probs)
    if len(probs) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.argmax(order == np.asarray(given)[:, None], axis=1) + 1


def top_class(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    return np.argsort(-probs, axis=1, kind="stable")[:, 0] if len(probs) else np.zeros(0, dtype=int)


def accept_mask(probs: np.ndarray, given: np.ndarray, candidates: np.ndarray, threshold: float) -> np.ndarray:
    """Candidates whose top prediction is the given label with probability > threshold."""
    probs, given = np.asarray(probs), np.asarray(given, dtype=int)
    if len(given) == 0:
        return np.zeros(0, dtype=bool)
    p_given = probs[np.arange(len(given)), given]
    return np.asarray(candidates, dtype=bool) & (top_class(probs) == given) & (p_given > threshold)


def relabel_targets(probs: np.ndarray, given: np.ndarray, candidates: np.ndarray, threshold: float) -> np.ndarray:
    """New class index for candidates whose top prediction is another class
    with probability > threshold; -1 elsewhere."""
    probs, given = np.asarray(probs), np.asarray(given, dtype=int)
    if len(given) == 0:
        return np.zeros(0, dtype=int)
    top = top_class(probs)
    p_top = probs[np.arange(len(given)), top]
    hit = np.asarray(candidates, dtype=bool) & (top != given) & (p_top > threshold)
    return np.where(hit, top, -1)


def calibrated_threshold(probs: np.ndarray, labels: np.ndarray, precision: float, min_support: int) -> float | None:
    """The lowest confidence t at which the verifiers' top class is right at
    least ``precision`` of the time on rows whose label is known to be right
    (out-of-fold predictions of verified rows), counting only rows with top
    probability > t and at least ``min_support`` of them; None when no t
    qualifies. Accepting or relabelling a non-verified row at p > t then has
    (about) that precision too: a decision the verifiers' own record supports."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    if len(labels) < max(1, min_support):
        return None
    p_top = probs.max(axis=1)
    right = top_class(probs) == labels
    order = np.argsort(-p_top, kind="stable")
    hits = np.cumsum(right[order])
    n = np.arange(1, len(order) + 1)
    ok = (hits / n >= precision) & (n >= min_support)
    if not ok.any():
        return None
    last = int(np.flatnonzero(ok)[-1])            # the largest confident set that is precise enough
    return float(np.nextafter(p_top[order][last], -np.inf))  # "> t" keeps that row in


def guard_thresholds(s: dict, calib_probs: np.ndarray, calib_labels: np.ndarray) -> dict:
    """Accept / final-accept / relabel thresholds raised to what the verifiers'
    out-of-fold precision on verified rows supports; a decision it does not
    support at any confidence is switched off (threshold 1: doubtful rows stay
    unresolved, i.e. their given label with smoothing)."""
    support = int(s["min_support"])
    t_acc = calibrated_threshold(calib_probs, calib_labels, float(s["accept_precision"]), support)
    t_rel = calibrated_threshold(calib_probs, calib_labels, float(s["relabel_precision"]), support)
    return {"accept_threshold": max(float(s["accept_threshold"]), 1.0 if t_acc is None else t_acc),
            "final_accept_threshold": max(float(s["final_accept_threshold"]), 1.0 if t_acc is None else t_acc),
            "relabel_threshold": max(float(s["relabel_threshold"]), 1.0 if t_rel is None else t_rel),
            "calibration_rows": int(len(calib_labels))}


def decide(probs: np.ndarray, given: np.ndarray, remaining: np.ndarray, final: bool, accept_threshold: float = 0.5,
           final_accept_threshold: float = 0.1, relabel_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The ``verify`` rule for one iteration: (accepted mask, relabel targets).
    Only ``remaining`` rows (not yet accepted) are decided on; relabelling
    happens only at the final iteration."""
    remaining = np.asarray(remaining, dtype=bool)
    acc = accept_mask(probs, given, remaining, final_accept_threshold if final else accept_threshold)
    if final:
        rel = relabel_targets(probs, given, remaining & ~acc, relabel_threshold)
    else:
        rel = np.full(len(remaining), -1, dtype=int)
    return acc, rel


def self_verify_mask(crop_probs: np.ndarray, given: np.ndarray, candidates: np.ndarray, threshold: float = 0.95,
                     per_class_cap: int = 40) -> np.ndarray:
    """The ``self_verify`` rule: ``crop_probs`` (rows, crops, classes). A
    candidate is accepted when every crop ranks its given label first and the
    label's mean probability over the crops is > threshold; at most
    ``per_class_cap`` rows per (given) class, the most confident first
    (ties: earlier row first)."""
    crop_probs, given = np.asarray(crop_probs, dtype=np.float64), np.asarray(given, dtype=int)
    n = len(given)
    if n == 0:
        return np.zeros(0, dtype=bool)
    tops = np.argsort(-crop_probs, axis=2, kind="stable")[:, :, 0]
    all_agree = (tops == given[:, None]).all(axis=1)
    mean_given = crop_probs[np.arange(n), :, given].mean(axis=1)
    ok = np.asarray(candidates, dtype=bool) & all_agree & (mean_given > threshold)
    out = np.zeros(n, dtype=bool)
    for c in np.unique(given[ok]):
        idx = np.flatnonzero(ok & (given == c))
        keep = idx[np.argsort(-mean_given[idx], kind="stable")[:int(per_class_cap)]]
        out[keep] = True
    return out


def is_plateau(disagree_history: list[int]) -> bool:
    """True when the last iteration's disagreeing count is not lower than the previous one's."""
    return len(disagree_history) >= 2 and disagree_history[-1] >= disagree_history[-2]


def iteration_row(iteration: int, train_rows: int, probs: np.ndarray, given: np.ndarray, newly_accepted: int,
                  remaining_after: int) -> dict:
    """One row of the paper-style table, over every non-verified row (``probs``
    and ``given`` of the whole non-verified pool)."""
    ranks = label_ranks(probs, given)
    return {"iteration": int(iteration), "train_rows": int(train_rows), "newly_accepted": int(newly_accepted),
            "agree_rank1": int((ranks == 1).sum()), "agree_rank2": int((ranks == 2).sum()),
            "agree_rank3": int((ranks == 3).sum()), "disagree": int((ranks > 3).sum()),
            "remaining_unverified": int(remaining_after),
            "map3_vs_given": round(map_at_3(np.asarray(given), np.asarray(probs)), 6) if len(given) else float("nan")}


def assign_epsilon(status, eps_verified: float, low: float = 0.1, high: float = 0.3, seed: int = 2018) -> np.ndarray:
    """Per-row smoothing: ``eps_verified`` for verified/accepted/relabelled
    rows, U(low, high) for unresolved ones. One draw per row in table order
    from a generator seeded by ``seed``, so a row's epsilon does not depend on
    which other rows are unresolved."""
    status = np.asarray(status, dtype=object)
    draws = np.random.default_rng([int(seed), 5]).uniform(low, high, size=len(status))
    return np.where(status == UNRESOLVED, draws, float(eps_verified)).astype(np.float64)


def given_labels_table(folds: pd.DataFrame, eps_verified: float, eps_unverified: float) -> pd.DataFrame:
    """labels.csv with the given labels and fixed smoothing by status (mode
    ``smoothing`` / ``loss_masking``, and the skipped stage)."""
    ver = folds["manually_verified"].astype(int).to_numpy() == 1
    return pd.DataFrame({"fname": folds["fname"].astype(str).to_numpy(), "label": folds["label"].astype(str).to_numpy(),
                         "status": np.where(ver, VERIFIED, UNRESOLVED),
                         "epsilon": np.where(ver, float(eps_verified), float(eps_unverified))})


def labels_table(folds: pd.DataFrame, classes: list[str], final_labels: np.ndarray, status,
                 epsilon: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"fname": folds["fname"].astype(str).to_numpy(),
                         "label": np.asarray(classes, dtype=object)[np.asarray(final_labels, dtype=int)],
                         "status": np.asarray(status, dtype=object), "epsilon": np.asarray(epsilon, dtype=float)})


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def quality_report(folds: pd.DataFrame, labels: pd.DataFrame, clean: pd.DataFrame) -> dict:
    """Precision/recall of the verification against the true labels.

    accepted: precision = share of accepted rows whose given label is true;
    recall = share of the correct non-verified rows that were accepted.
    relabelled: precision = share whose new label is true; recall = share of
    the wrong non-verified rows that were relabelled to the true label.
    """
    truth = clean.assign(fname=clean["fname"].astype(str)).set_index("fname")["label"].astype(str)
    tab = folds[["fname", "label", "manually_verified"]].merge(
        labels[["fname", "label", "status"]].rename(columns={"label": "final"}), on="fname")
    tab = tab[tab["manually_verified"].astype(int) == 0]
    tab = tab[tab["fname"].isin(truth.index)]
    true = truth.loc[tab["fname"]].to_numpy()
    given, final, status = tab["label"].to_numpy(), tab["final"].to_numpy(), tab["status"].astype(str)
    correct = given == true
    acc = status.str.startswith("accepted").to_numpy()
    rel = status.str.startswith("relabelled").to_numpy()
    unres = (status == UNRESOLVED).to_numpy()

    def share(num, den):
        return float(num) / float(den) if den else None

    return {
        "nonverified_rows": int(len(tab)), "wrong_given": int((~correct).sum()),
        "accepted": int(acc.sum()), "relabelled": int(rel.sum()), "unresolved": int(unres.sum()),
        "accepted_precision": share((acc & correct).sum(), acc.sum()),
        "accepted_recall": share((acc & correct).sum(), correct.sum()),
        "relabelled_precision": share((rel & (final == true)).sum(), rel.sum()),
        "relabelled_recall": share((rel & (final == true)).sum(), (~correct).sum()),
        "unresolved_wrong_share": share((unres & ~correct).sum(), unres.sum()),
        "label_accuracy_given": share(correct.sum(), len(tab)),
        "label_accuracy_final": share((final == true).sum(), len(tab)),
    }


# -- the loop ------------------------------------------------------------------
@dataclass
class LoopResult:
    final_labels: np.ndarray      # class index per row of folds.csv (relabelled rows changed)
    status: np.ndarray            # verified / accepted@i / relabelled@i / unresolved per row
    table: pd.DataFrame           # the per-iteration table (TABLE_COLUMNS)
    relabelled: int
    final_iteration: int
    guard: dict | None = None     # thresholds the guard used and the fallback decision (pseudo_label.guard)


def verification_loop(folds: pd.DataFrame, classes: list[str], s: dict, runner, out_dir: Path) -> LoopResult:
    """Run the verification iterations (modes ``verify`` / ``self_verify``).

    ``runner(iteration, train_df, pool_df, iter_dir) -> (probs, crop_probs|None)``
    trains the verifiers on ``train_df`` (fname, label, fold) and predicts
    every row of ``pool_df`` (the non-verified rows, fname/label/fold) out of
    fold; ``runner.fingerprint`` names everything else its output depends on.
    A finished iteration (``iter<i>/state.json``) whose inputs are unchanged is
    read back instead of recomputed.
    """
    out_dir = Path(out_dir)
    cidx = {c: i for i, c in enumerate(classes)}
    folds = folds.reset_index(drop=True)
    given = folds["label"].map(cidx).to_numpy()
    nonver = folds["manually_verified"].astype(int).to_numpy() == 0
    pool_idx = np.flatnonzero(nonver)
    pool_df = folds.iloc[pool_idx][["fname", "label", "fold"]].reset_index(drop=True)
    given_pool = given[pool_idx]
    accepted_at = np.full(len(pool_idx), -1, dtype=int)
    relabel_to = np.full(len(pool_idx), -1, dtype=int)
    mode, cap = s["mode"], int(s["max_iterations"])
    history, rows, final_iteration = [], [], -1
    guard = {"enabled": True} if s.get("guard") and mode == "verify" else None
    thresholds = dict(accept_threshold=float(s["accept_threshold"]),
                      final_accept_threshold=float(s["final_accept_threshold"]),
                      relabel_threshold=float(s["relabel_threshold"]))

    for i in range(cap):
        in_train = ~nonver.copy()
        in_train[pool_idx[accepted_at >= 0]] = True
        train_df = folds.loc[in_train, ["fname", "label", "fold"]].reset_index(drop=True)
        iter_dir = out_dir / f"iter{i}"
        fp = param_hash({"runner": getattr(runner, "fingerprint", ""), "mode": mode,
                         "crops": int(s["crops"]) if mode == "self_verify" else None,
                         "train": pd.util.hash_pandas_object(train_df, index=False).tolist(),
                         "pool": pd.util.hash_pandas_object(pool_df, index=False).tolist()}, 16)
        state = read_json(iter_dir / "state.json")
        pred_path, crops_path = iter_dir / "predictions.csv", iter_dir / "crops.npy"
        calib_path = iter_dir / "calibration.csv"
        if (state and state.get("fingerprint") == fp and pred_path.exists()
                and (mode != "self_verify" or crops_path.exists()) and (guard is None or calib_path.exists())):
            log.info("iteration %d: done before with the same training set (%d rows), reusing its predictions",
                     i, len(train_df))
        else:
            log.info("iteration %d: training %s on %d rows, predicting %d non-verified rows", i,
                     "+".join(s["verifiers"]), len(train_df), len(pool_df))
            probs, crops = runner(i, train_df, pool_df, iter_dir)
            if getattr(runner, "calibration", None) is not None:
                write_table(runner.calibration, calib_path)
            write_table(probs_frame(pool_df["fname"], probs, classes, pool_df["fold"]), pred_path)
            if mode == "self_verify":
                _save_npy(np.asarray(crops, dtype=np.float32), crops_path)
        # decisions always use the stored tables, so a resumed run decides exactly as a fresh one
        probs = read_table(pred_path, classes).set_index("fname").loc[pool_df["fname"], classes].to_numpy()
        crops = np.load(crops_path) if mode == "self_verify" else None

        remaining = accepted_at < 0
        ranks = label_ranks(probs, given_pool)
        history.append(int((ranks > 3).sum()))
        final = i == cap - 1 or is_plateau(history)
        if mode == "self_verify":
            acc = self_verify_mask(crops, given_pool, remaining, float(s["self_verify_threshold"]),
                                   int(s["per_class_cap"]))
            rel = np.full(len(pool_idx), -1, dtype=int)
            if not acc.any() or acc.sum() == remaining.sum():
                final = True
        else:
            if guard is not None and _guard_step(guard, i, folds, given, calib_path, s, thresholds):
                accepted_at[:], relabel_to[:] = -1, -1   # fall back: every non-verified row keeps its given label
                final_iteration = i
                break
            acc, rel = decide(probs, given_pool, remaining, final, **thresholds)
            if not final and (not acc.any() or acc.sum() == remaining.sum()):
                final = True  # the next round would train on the same set: this one is the last
                acc, rel = decide(probs, given_pool, remaining, True, **thresholds)
        accepted_at[acc] = i
        relabel_to[rel >= 0] = rel[rel >= 0]
        left = int(((accepted_at < 0) & (relabel_to < 0)).sum())
        row = iteration_row(i, len(train_df), probs, given_pool, int(acc.sum()), left)
        rows.append(row)
        decisions = pool_df.assign(top=np.asarray(classes)[top_class(probs)] if len(probs) else [],
                                   p_top=probs.max(axis=1) if len(probs) else [],
                                   p_given=probs[np.arange(len(given_pool)), given_pool] if len(probs) else [],
                                   rank=ranks,
                                   decision=np.where(acc, "accepted", np.where(rel >= 0, "relabelled",
                                                     np.where(remaining, "", "accepted_before"))))
        atomic_write_csv(decisions, iter_dir / "decisions.csv", float_format="%.6g")
        atomic_write_json({"fingerprint": fp, "iteration": i, "final": bool(final), "finished": True,
                           "train_rows": len(train_df), "table_row": row,
                           "relabelled": int((rel >= 0).sum())}, iter_dir / "state.json")
        log.info("iteration %d%s: %s", i, " (final)" if final else "",
                 ", ".join(f"{k}={v}" for k, v in row.items() if k != "iteration"))
        if final:
            final_iteration = i
            break

    status = np.full(len(folds), VERIFIED, dtype=object)
    final_labels = given.copy()
    pool_status = np.full(len(pool_idx), UNRESOLVED, dtype=object)
    for j in range(len(pool_idx)):
        if accepted_at[j] >= 0:
            pool_status[j] = accepted_status(accepted_at[j])
        elif relabel_to[j] >= 0:
            pool_status[j] = relabelled_status(final_iteration)
            final_labels[pool_idx[j]] = relabel_to[j]
    status[pool_idx] = pool_status
    return LoopResult(final_labels, status, pd.DataFrame(rows, columns=TABLE_COLUMNS),
                      int((relabel_to >= 0).sum()), final_iteration, guard)


def _guard_step(guard: dict, iteration: int, folds: pd.DataFrame, given: np.ndarray, calib_path: Path, s: dict,
                thresholds: dict) -> bool:
    """The guard's work at one iteration, from the verifiers' out-of-fold
    predictions of the verified rows (``calibration.csv``): at iteration 0 set
    the thresholds their precision supports (``thresholds`` is updated in
    place); later, compare their MAP@3 on the verified rows with iteration 0's
    -- the accepted rows joined the training set in between, so a drop means
    they hurt. Returns True to fall back to the given labels."""
    if not calib_path.exists():
        log.warning("pseudo_label.guard: %s is missing (an older run): using the configured thresholds", calib_path)
        return False
    calib = read_table(calib_path).set_index("fname")
    ver = folds[(folds["manually_verified"].astype(int) == 1) & folds["fname"].isin(calib.index)]
    p = calib.loc[ver["fname"], class_columns(calib.reset_index())].to_numpy()
    y = given[ver.index.to_numpy()]
    score = map_at_3(y, p) if len(y) else float("nan")
    guard.setdefault("verified_map3", []).append(score)
    if iteration == 0:
        thresholds.update({k: v for k, v in guard_thresholds(s, p, y).items() if k.endswith("threshold")})
        guard.update(thresholds, calibration_rows=int(len(y)))
        log.info("guard: on %d verified rows (out of fold) the verifiers' MAP@3 is %.4f; thresholds their "
                 "precision supports: accept > %.3f, final accept > %.3f, relabel > %.3f (1 = off)", len(y), score,
                 thresholds["accept_threshold"], thresholds["final_accept_threshold"], thresholds["relabel_threshold"])
        return False
    first = guard["verified_map3"][0]
    if score < first - float(s["fallback_margin"]):
        guard["fallback"] = (f"iteration {iteration}: MAP@3 on the verified rows fell from {first:.4f} to "
                             f"{score:.4f} after training on the accepted rows")
        log.warning("guard: %s: falling back to the given labels with fixed smoothing", guard["fallback"])
        return True
    return False


def _save_npy(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(Path(path), buf.getvalue())


# -- the Keras side (imported lazily, so the decision logic needs no Keras) --
def train_fold(*args, **kwargs):
    """:func:`pipeline.trainer.train_fold` (an indirection tests can replace)."""
    from pipeline.trainer import train_fold as real
    return real(*args, **kwargs)


def fold_fingerprint(*args, **kwargs) -> str:
    from pipeline.trainer import fold_fingerprint as real
    return real(*args, **kwargs)


def feature_source(cfg: dict, work: WorkDir, spec: dict):
    """What a verifier reads: the cached feature (or embeddings) a network
    reads, or for a handcrafted model its features' stores (``.stores``)."""
    from pipeline.handcrafted import handcrafted_features, is_handcrafted
    if is_handcrafted(spec):
        from types import SimpleNamespace

        from pipeline.cache import feature_stores
        stores = feature_stores(work, cfg, handcrafted_features(spec))
        return SimpleNamespace(stores=stores, key=param_hash({n: st.key for n, st in stores.items()}, 16))
    from pipeline.train import feature_source as real
    return real(cfg, work, spec)


def predict_crops(model_path: Path, spec: dict, store, fnames: list[str], n_crops: int, seed: int,
                  n_classes: int, chunk: int = 64) -> np.ndarray:
    """(rows, crops, classes): ``n_crops`` random windows of each clip (seeded
    ``pipeline.windows.random_window``) predicted by the saved fold model."""
    out = np.zeros((len(fnames), int(n_crops), n_classes), dtype=np.float32)
    if not fnames:
        return out
    from pipeline.trainer import Normalizer, load_saved_model
    from pipeline.windows import random_window
    model = load_saved_model(model_path)
    normalizer = Normalizer(store.stats() if spec.get("normalize", True) else None)
    window, bs = int(spec["window"]), int(spec["train"].get("eval_batch_size", 128))
    rng = np.random.default_rng([int(seed), 25])
    for start in range(0, len(fnames), chunk):
        part = fnames[start:start + chunk]
        x = np.stack([random_window(store.load("train", f), window, rng) for f in part for _ in range(int(n_crops))])
        probs = model.predict(normalizer(x), batch_size=bs, verbose=0)
        out[start:start + len(part)] = probs.reshape(len(part), int(n_crops), -1)
    return out


class FoldVerifiers:
    """Trains each verifier over the folds with the shared fold trainer.

    For fold k: train on the training-set rows with fold != k, validate
    (early stopping) on the training-set rows with fold == k, predict the
    pool rows with fold == k (``test_split="train"``). Verifiers are combined
    by geometric mean.
    """

    def __init__(self, cfg: dict, work: WorkDir, s: dict, classes: list[str], progress: bool = True,
                 data_hash: str = ""):
        self._model_caches: dict[str, dict] = {}  # verifier -> compiled model reused across folds
        self.cfg, self.work, self.s, self.classes, self.progress = cfg, work, s, list(classes), progress
        self.seed = int(cfg.get("seed", 2018))
        self.specs = {v: verifier_spec(cfg, v) for v in s["verifiers"]}
        self.stores = {v: feature_source(cfg, work, spec) for v, spec in self.specs.items()}
        self.want_crops = s["mode"] == "self_verify"
        handcrafted = [v for v, st in self.stores.items() if hasattr(st, "stores")]
        if self.want_crops and handcrafted:
            raise ConfigError(f"pseudo_label.mode self_verify predicts random crops; handcrafted verifier(s) "
                              f"{handcrafted} read whole clips: use mode verify or network verifiers")
        self.data_hash = data_hash
        self.fingerprint = param_hash({"specs": self.specs, "stores": {v: st.key for v, st in self.stores.items()},
                                       "seed": self.seed, "data": data_hash, "crops": int(s["crops"]) if self.want_crops else None}, 16)

    def __call__(self, iteration: int, train_df: pd.DataFrame, pool_df: pd.DataFrame, iter_dir: Path):
        cidx = {c: i for i, c in enumerate(self.classes)}
        n_classes = len(self.classes)
        folds_all = sorted(set(train_df["fold"]) | set(pool_df["fold"]))
        train_hash = param_hash(pd.util.hash_pandas_object(train_df, index=False).tolist(), 16)
        pool_hash = param_hash(pd.util.hash_pandas_object(pool_df, index=False).tolist(), 16)
        all_probs, all_crops, all_val = [], [], []
        for v, spec in self.specs.items():
            store = self.stores[v]
            val_probs = np.zeros((len(train_df), n_classes))  # out-of-fold, of the training-set rows
            probs = np.zeros((len(pool_df), n_classes))
            crops = np.zeros((len(pool_df), int(self.s["crops"]), n_classes)) if self.want_crops else None
            for k in folds_all:
                tr = train_df[train_df["fold"] != k]
                val = train_df[train_df["fold"] == k]
                pmask = (pool_df["fold"] == k).to_numpy()
                pred_fnames = pool_df.loc[pmask, "fname"].tolist()
                if tr.empty or val.empty:
                    raise ValueError(f"pseudo-labelling iteration {iteration}, fold {k}: the training set has "
                                     f"{len(tr)} row(s) outside the fold and {len(val)} inside it; every fold "
                                     "needs verified rows (too few folds or verified clips?)")
                fold_dir = iter_dir / v / f"fold{k}"
                fp = fold_fingerprint(spec, store.key, train_hash, pool_hash, self.seed, self.data_hash)
                summary = read_json(fold_dir / "summary.json")
                done = (summary and summary.get("fingerprint") == fp and (fold_dir / "pred.csv").exists()
                        and (fold_dir / "val.csv").exists()
                        and (not self.want_crops or (fold_dir / "crops.npy").exists()))
                if done:
                    log.info("%s iteration %d fold %d: done, skipping", v, iteration, k)
                else:
                    from pipeline.trainer import TrainRows
                    eps = float(spec["train"].get("smoothing_verified", 0.05) or 0.0)
                    rows = TrainRows(fnames=tr["fname"].tolist(), labels=tr["label"].map(cidx).to_numpy(),
                                     epsilon=np.full(len(tr), eps, dtype=np.float32),
                                     verified=np.ones(len(tr), dtype=int))
                    log.info("%s iteration %d fold %d: training on %d rows, validating on %d, predicting %d",
                             v, iteration, k, len(tr), len(val), len(pred_fnames))
                    if hasattr(store, "stores"):  # a handcrafted verifier (cheap, and often the strongest)
                        from pipeline.handcrafted import train_handcrafted_fold
                        result = train_handcrafted_fold(spec, store.stores, rows, val["fname"].tolist(),
                                                        val["label"].map(cidx).to_numpy(), pred_fnames, n_classes,
                                                        fold_dir, self.seed, k, test_split="train", fingerprint=fp)
                    else:
                        result = train_fold(spec, store, rows, val["fname"].tolist(),
                                            val["label"].map(cidx).to_numpy(), pred_fnames, n_classes, fold_dir,
                                            self.seed, k, fp, progress=self.progress, val_split="train",
                                            test_split="train", model_cache=self._model_caches.setdefault(v, {}))
                    pred = result.test if result.test is not None else np.zeros((0, n_classes))
                    write_table(probs_frame(pred_fnames, pred, self.classes), fold_dir / "pred.csv")
                    write_table(probs_frame(val["fname"], result.oof, self.classes), fold_dir / "val.csv")
                    if self.want_crops:
                        _save_npy(predict_crops(fold_dir / "best.keras", spec, store, pred_fnames,
                                                int(self.s["crops"]), self.seed * 1000 + iteration * 100 + k,
                                                n_classes), fold_dir / "crops.npy")
                    atomic_write_json({**result.summary, "fingerprint": fp, "iteration": iteration,
                                       "predicted_rows": len(pred_fnames)}, fold_dir / "summary.json")
                table = read_table(fold_dir / "pred.csv", self.classes)
                probs[pmask] = table.set_index("fname").loc[pred_fnames, self.classes].to_numpy() \
                    if pred_fnames else np.zeros((0, n_classes))
                if self.want_crops:
                    crops[pmask] = np.load(fold_dir / "crops.npy")
                vmask = (train_df["fold"] == k).to_numpy()
                val_probs[vmask] = read_table(fold_dir / "val.csv", self.classes).set_index("fname") \
                    .loc[train_df.loc[vmask, "fname"], self.classes].to_numpy()
            write_table(probs_frame(pool_df["fname"], probs, self.classes, pool_df["fold"]),
                        iter_dir / v / "predictions.csv")
            all_probs.append(probs)
            all_crops.append(crops)
            all_val.append(val_probs)
        # the guard's evidence: how right the ensemble is, out of fold, on rows of the training set
        self.calibration = probs_frame(train_df["fname"], geometric_mean(all_val), self.classes)
        ensemble = geometric_mean(all_probs) if len(pool_df) else np.zeros((0, n_classes))
        crop_ens = (geometric_mean(all_crops) if len(pool_df) else all_crops[0]) if self.want_crops else None
        return ensemble, crop_ens


# -- the stage -------------------------------------------------------------
def _eps_defaults(cfg: dict) -> tuple[float, float]:
    t = cfg.get("training") or {}
    return float(t.get("smoothing_verified", 0.05) or 0.0), float(t.get("smoothing_unverified", 0.3) or 0.0)


def pseudo_label_stage(cfg: dict, work: WorkDir, folds: pd.DataFrame, classes: list[str],
                       clean: pd.DataFrame | None = None, progress: bool = True,
                       runner: Callable | None = None, data_hash: str = "") -> dict:
    """Everything after loading: decide the mode, run it, write labels.csv and the reports."""
    s = settings(cfg)
    source = (cfg.get("labels") or {}).get("source", "given")
    eps_v, eps_u = _eps_defaults(cfg)
    out = work.pseudo_dir
    n_nonver = int((folds["manually_verified"].astype(int) == 0).sum())
    reason = None
    if not s["enabled"]:
        reason = "pseudo_label.enabled is false"
    elif n_nonver == 0:
        reason = "folds.csv has no non-verified row"
    if reason:
        msg = f"pseudo-labelling skipped: {reason}"
        if source == "pseudo":
            write_labels_table(work, given_labels_table(folds, eps_v, eps_u), folds)
            msg += f"; labels.source is pseudo, so {work.labels_csv} = the given labels (smoothing {eps_v}/{eps_u})"
        log.info(msg)
        print(msg)
        return {"skipped": reason}

    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": s["mode"], "rows": len(folds), "nonverified": n_nonver}
    if s["mode"] in ("smoothing", "loss_masking"):
        table = given_labels_table(folds, eps_v, eps_u)
        write_labels_table(work, table, folds)
        for stale in ("iterations.csv", "quality.json"):  # a previous loop's reports would no longer apply
            (out / stale).unlink(missing_ok=True)
        msg = (f"pseudo-labelling mode {s['mode']}: no verification; {work.labels_csv} = the given labels with "
               f"smoothing {eps_v} (verified) / {eps_u} (non-verified)")
        if s["mode"] == "loss_masking":
            ratio = (cfg.get("training") or {}).get("loss_masking")
            msg += f"; the trainer masks unverified losses with training.loss_masking = {ratio}"
            if ratio is None:
                log.warning("mode loss_masking but training.loss_masking is null: set it (e.g. 0.8) "
                            "or the final models train without masking")
        log.info(msg)
        print(msg)
        summary["message"] = msg
        atomic_write_json(summary, out / "summary.json")
        return summary

    runner = runner or FoldVerifiers(cfg, work, s, classes, progress, data_hash)
    result = verification_loop(folds, classes, s, runner, out)
    low, high = (float(v) for v in s["unresolved_epsilon"])
    eps = assign_epsilon(result.status, eps_v, low, high, int(cfg.get("seed", 2018)))
    table = labels_table(folds, classes, result.final_labels, result.status, eps)
    if result.guard is not None:
        summary["guard"] = result.guard
        if result.guard.get("fallback"):  # verification would hurt here: the given labels, fixed smoothing
            table = given_labels_table(folds, eps_v, eps_u)
    write_labels_table(work, table, folds)
    atomic_write_csv(result.table, out / "iterations.csv")
    counts = pd.Series(table["status"]).map(lambda st: st.split("@")[0]).value_counts().to_dict()
    summary.update(final_iteration=result.final_iteration, relabelled=result.relabelled,
                   status_counts={k: int(v) for k, v in counts.items()},
                   iterations=result.table.to_dict(orient="records"))
    text = format_table(result.table)
    log.info("pseudo-labelling (%s) per iteration:\n%s", s["mode"], text)
    print(f"pseudo-labelling ({s['mode']}), final iteration {result.final_iteration}:\n{text}")
    print("label status: " + ", ".join(f"{k} {v}" for k, v in summary["status_counts"].items()))
    if clean is not None:
        quality = quality_report(folds, table, clean)
        atomic_write_json(quality, out / "quality.json")
        summary["quality"] = quality
        qtext = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
        log.info("quality vs train_clean_labels.csv: %s", qtext)
        print(f"quality vs train_clean_labels.csv: {qtext}")
    else:
        (out / "quality.json").unlink(missing_ok=True)
    if source != "pseudo":
        log.info("wrote %s; set labels.source: pseudo (--set labels.source=pseudo) for the final models to use it",
                 work.labels_csv)
    atomic_write_json(summary, out / "summary.json")
    return summary


def run_pseudo_label(cfg: dict, data_dir, work: WorkDir, progress: bool = True) -> dict:
    from pipeline.dataset import load_dataset
    from pipeline.fingerprints import data_hash
    from pipeline.folds import current_folds
    dataset = load_dataset(data_dir)
    folds = current_folds(cfg, dataset, work)
    clean_path = Path(data_dir) / "train_clean_labels.csv"
    clean = pd.read_csv(clean_path, dtype={"fname": str, "label": str}) if clean_path.exists() else None
    from pipeline.clips import load_clips
    clips = load_clips(work)
    return pseudo_label_stage(cfg, work, folds, dataset.classes, clean, progress,
                              data_hash=data_hash(clips, dataset.classes, []))


def main(argv=None):
    args, cfg, work = start_stage("Verify the non-verified labels (pseudo-labelling); write labels.csv.",
                                  "pseudo_label", argv)
    with timed_stage(work, "pseudo_label"):
        run_pseudo_label(cfg, args.data, work)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
