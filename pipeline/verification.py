"""Pseudo-label verification: the decision rules and the iteration loop (no Keras).

The stage (``python -m pipeline.pseudo_label``) documents the methods; this
module holds what they decide with -- pure functions on probability arrays,
the per-iteration table, the guard, and :func:`verification_loop`, which
drives any ``runner`` that trains verifiers and predicts out of fold
(:class:`pipeline.verifiers.FoldVerifiers` in a run, a fake in the tests).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.fingerprints import param_hash
from pipeline.metrics import map_at_3
from pipeline.predictions import class_columns, probs_frame, read_table, write_table
from pipeline.workdir import atomic_write_csv, atomic_write_json, atomic_write_npy, read_json

log = logging.getLogger("pseudo_label")

MODES = ("verify", "smoothing", "loss_masking", "self_verify")
LOOP_MODES = ("verify", "self_verify")
VERIFIED = "verified"
UNRESOLVED = "unresolved"
TABLE_COLUMNS = ["iteration", "train_rows", "newly_accepted", "agree_rank1", "agree_rank2", "agree_rank3",
                 "disagree", "remaining_unverified", "map3_vs_given"]
def accepted_status(iteration: int) -> str:
    return f"accepted@{iteration}"


def relabelled_status(iteration: int) -> str:
    return f"relabelled@{iteration}"


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
    guard = {"enabled": True} if s["guard"] and mode == "verify" else None
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
                atomic_write_npy(crops_path, np.asarray(crops, dtype=np.float32))
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
