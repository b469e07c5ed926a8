"""Training one model over the shared folds: its input, each fold (skipping
finished ones), and the joined out-of-fold and test tables.

The stage ``python -m pipeline.train`` calls :func:`train_model` per model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import time

import numpy as np
import pandas as pd

from pipeline.cache import feature_stores
from pipeline.clips import load_clips, split_usable
from pipeline.config import model_config
from pipeline.dataset import load_dataset
from pipeline.fingerprints import data_hash, param_hash, table_hash
from pipeline.handcrafted import handcrafted_features, is_handcrafted, train_handcrafted_fold
from pipeline.hierarchical import (check_meta_classes, fold_meta_classes, is_hierarchical, source_stores,
                                   stores_key, train_hierarchical_fold)
from pipeline.cv import current_folds, inner_split
from pipeline.labels import training_labels
from pipeline.metrics import accuracy, map_at_3, scope_text
from pipeline.predictions import geometric_mean, probs_frame, read_table, write_table
from pipeline.trainer import TrainRows, fold_fingerprint, train_fold
from pipeline.workdir import WorkDir, atomic_write_json, read_json, remove_outputs

log = logging.getLogger("train")


def model_input(cfg: dict, work: WorkDir, spec: dict, dataset=None):
    """The array store a model reads: a cached feature, or (for models on
    embeddings) the store the embeddings stage wrote."""
    if spec.get("embeddings_from"):
        from pipeline.embedding_store import embedding_store
        return embedding_store(cfg, work, spec["embeddings_from"], dataset=dataset)
    return feature_stores(work, cfg, [spec["feature"]])[spec["feature"]]


def _stale_model_outputs(work: WorkDir, model: str, n_folds: int) -> list:
    """The model's tables and summary, plus folders of folds that no longer exist."""
    extra = [d for d in work.model_dir(model).glob("fold*")
             if d.is_dir() and d.name[4:].isdigit() and int(d.name[4:]) >= n_folds]
    return [work.oof_csv(model), work.test_csv(model), work.model_dir(model) / "summary.json"] + extra


def early_stopping_rows(labels: pd.DataFrame, folds: pd.DataFrame, fold: int, cidx: dict, tcfg: dict, seed: int):
    """(training rows, early-stopping fnames, early-stopping labels) of one fold.

    ``heldout`` (the papers' way): train on the other folds, stop on the
    held-out fold's given labels -- whose OOF predictions are then scored
    and stacked, so OOF scores lean optimistic. ``inner``: a seeded,
    stratified slice of the training folds decides early stopping and the
    held-out fold is only predicted."""
    train_mask = (folds["fold"] != fold).to_numpy()
    if tcfg["early_stopping_split"] == "inner":
        tr = labels[train_mask].reset_index(drop=True)
        inner = inner_split(tr, float(tcfg["inner_fraction"]), seed * 1000 + fold)
        return tr[~inner], tr.loc[inner, "fname"].tolist(), tr.loc[inner, "label"].map(cidx).to_numpy()
    held = ~train_mask
    return labels[train_mask], folds.loc[held, "fname"].tolist(), folds.loc[held, "label"].map(cidx).to_numpy()


@dataclass
class FoldInputs:
    """What every fold of a model is made from, and the fingerprint that keys its outputs."""
    labels: pd.DataFrame        # fname, label, epsilon, verified of every folds.csv row
    good_test: list[str]        # usable test clips, in test order
    bad_test: list[str]         # unusable test clips (they get the class prior)
    fingerprint: str


def fold_inputs(cfg: dict, work: WorkDir, spec: dict, store_key: str, folds: pd.DataFrame, dataset) -> FoldInputs:
    """The one place a model's fold fingerprint is computed (training, and the embeddings' staleness check)."""
    labels = training_labels(cfg, work, folds, spec["train"])
    clips = load_clips(work)
    good_test, bad_test = split_usable(clips, "test", dataset.test_fnames, work.clips_csv)
    fp = fold_fingerprint(spec, store_key, table_hash(labels), table_hash(folds), int(cfg["seed"]),
                          data_hash(clips, dataset.classes, good_test))
    return FoldInputs(labels, good_test, bad_test, fp)


def check_run(cfg: dict, data_dir) -> None:
    """Settings that need the dataset to be checked (a configured meta-class grouping), before any training."""
    check_meta_classes(cfg, load_dataset(data_dir).classes)


def train_model(cfg: dict, data_dir, work: WorkDir, model: str, progress: bool = True) -> dict:
    """Train all folds of one model (skipping finished ones) and write its tables."""
    spec = model_config(cfg, model)
    dataset = load_dataset(data_dir)
    classes = dataset.classes
    cidx = dataset.class_index
    folds = current_folds(cfg, dataset, work)
    handcrafted = is_handcrafted(spec)
    hierarchical = is_hierarchical(spec)
    whole_clips = handcrafted or hierarchical  # one row per clip, no windows, no early stopping
    if handcrafted:  # statistics of cached features into scikit-learn / LightGBM: no Keras, no windows
        stores = feature_stores(work, cfg, handcrafted_features(spec))
        store_key = param_hash({n: st.key for n, st in stores.items()}, 16)
    elif hierarchical:  # DNNs on each source's per-fold clip embeddings
        stores = source_stores(cfg, work, spec, dataset)
        store_key = stores_key(stores)
    else:
        store = model_input(cfg, work, spec, dataset)
        store_key = store.key
    inputs = fold_inputs(cfg, work, spec, store_key, folds, dataset)
    labels, good_test, bad_test, fp = inputs.labels, inputs.good_test, inputs.bad_test, inputs.fingerprint
    seed = int(cfg["seed"])
    n_folds = int(folds["fold"].max()) + 1
    model_fp = param_hash({"folds": fp, "n_folds": n_folds, "test": list(dataset.test_fnames),
                           "prior": list(np.round(dataset.class_prior(), 12)),
                           "truth": None if dataset.test_labels is None else table_hash(dataset.test_labels)}, 16)
    summary_path = work.model_dir(model) / "summary.json"
    done = read_json(summary_path) or {}
    if (done.get("fingerprint") == model_fp and work.oof_csv(model).exists() and work.test_csv(model).exists()):
        log.info("%s: up to date (%d folds), skipping", model, n_folds)
        return done
    remove_outputs(_stale_model_outputs(work, model, n_folds) + work.final_outputs(),
                   f"{model} is retrained or reassembled", log)
    tcfg = spec["train"]
    start = time.time()
    model_cache: dict = {}  # the compiled model is reused across folds (see trainer.fresh_model)
    for k in range(n_folds):
        fold_dir = work.fold_dir(model, k)
        summary = read_json(fold_dir / "summary.json")
        if summary and summary.get("fingerprint") == fp and (fold_dir / "oof.csv").exists():
            log.info("%s fold %d (of folds 0-%d): done (val MAP@3 %.4f), skipping", model, k, n_folds - 1,
                     summary["val_map3"])
            continue
        held = folds["fold"] == k
        held_fnames = folds.loc[held, "fname"].tolist()
        if whole_clips:  # nothing to stop early: fit on every other fold's clip
            tr, stop_fnames, stop_labels = labels[~held.to_numpy()], [], None
        else:
            tr, stop_fnames, stop_labels = early_stopping_rows(labels, folds, k, cidx, tcfg, seed)
        train_split = "train" if whole_clips else store.train_split(k)  # per-fold for embeddings
        rows = TrainRows(fnames=tr["fname"].tolist(), labels=tr["label"].map(cidx).to_numpy(),
                         epsilon=tr["epsilon"].to_numpy(dtype=np.float32), verified=tr["verified"].to_numpy(),
                         split=train_split)
        log.info("%s fold %d (of folds 0-%d): training on %d clips, early stopping on %d (%s), predicting %d "
                 "held-out", model, k, n_folds - 1, len(rows.fnames), len(stop_fnames),
                 "none" if whole_clips else tcfg["early_stopping_split"], len(held_fnames))
        if hierarchical:
            result = train_hierarchical_fold(spec, stores, rows, held_fnames,
                                             folds.loc[held, "label"].map(cidx).to_numpy(), good_test, len(classes),
                                             fold_dir, seed, k, fold_meta_classes(spec, work, folds, k, classes),
                                             fingerprint=fp, model_cache=model_cache)
        elif handcrafted:
            result = train_handcrafted_fold(spec, stores, rows, held_fnames,
                                            folds.loc[held, "label"].map(cidx).to_numpy(), good_test,
                                            len(classes), fold_dir, seed, k, fingerprint=fp)
        else:
            result = train_fold(spec, store, rows, stop_fnames, stop_labels, good_test, len(classes), fold_dir,
                                seed, k, fp, progress=progress, val_split=train_split,
                                test_split=store.test_split(k), model_cache=model_cache,
                                heldout_fnames=held_fnames)
        _write_fold(fold_dir, held_fnames, k, result, good_test, classes)
    return assemble_predictions(work, model, folds, dataset, bad_test, n_folds, time.time() - start, model_fp)


def _write_fold(fold_dir, held_fnames: list[str], fold: int, result, good_test: list[str], classes) -> None:
    """A finished fold's tables; summary.json (with the fingerprint) last, so
    a fold counts as done only once its tables exist."""
    write_table(probs_frame(held_fnames, result.oof, classes, [fold] * len(held_fnames)), fold_dir / "oof.csv")
    write_table(probs_frame(good_test, result.test if result.test is not None
                            else np.zeros((0, len(classes))), classes), fold_dir / "test.csv")
    atomic_write_json(result.summary, fold_dir / "summary.json")


def test_scores(dataset, probs: np.ndarray) -> dict:
    """Test MAP@3 on the labelled test clips (any subset), saying how many."""
    truth = dataset.test_label_indices()
    if truth is None:
        return {}
    labelled = truth >= 0
    out = {"test_labelled": int(labelled.sum()), "test_clips": len(truth)}
    if labelled.any():
        out["test_map3"] = map_at_3(truth[labelled], probs[labelled])
    return out


def assemble_predictions(work: WorkDir, model: str, folds: pd.DataFrame, dataset, bad_test: list[str],
                         n_folds: int, wall: float, fingerprint: str = "") -> dict:
    """Join the folds' tables: OOF in folds.csv order, test = geometric mean
    over folds; unusable test clips (and only those) get the training class prior."""
    classes = dataset.classes
    oof = pd.concat([read_table(work.fold_dir(model, k) / "oof.csv", classes) for k in range(n_folds)])
    oof = oof.set_index("fname").loc[folds["fname"]].reset_index()
    tests = [read_table(work.fold_dir(model, k) / "test.csv", classes) for k in range(n_folds)]
    test = pd.DataFrame({"fname": dataset.test_fnames})
    good = [f for f in dataset.test_fnames if f not in set(bad_test)]
    for k, t in enumerate(tests):
        if t["fname"].tolist() != good:
            raise RuntimeError(f"{work.fold_dir(model, k) / 'test.csv'} does not hold the current usable test "
                               "clips in order: this is a bug (the fold fingerprint should have retrained it)")
    probs = np.tile(dataset.class_prior(), (len(test), 1))
    if good:
        mean = geometric_mean([t[classes].to_numpy() for t in tests])
        pos = pd.Series(np.arange(len(test)), index=test["fname"]).loc[good].to_numpy()
        probs[pos] = mean
    write_table(oof, work.oof_csv(model))
    write_table(probs_frame(test["fname"], probs, classes), work.test_csv(model))
    if bad_test:
        log.warning("%s: %d test clip(s) with unusable audio get the class prior: %s", model, len(bad_test),
                    ", ".join(bad_test))
    y = folds["label"].map(dataset.class_index).to_numpy()
    p = oof[classes].to_numpy()
    ver = folds["manually_verified"].to_numpy() == 1
    summaries = [read_json(work.fold_dir(model, k) / "summary.json") for k in range(n_folds)]
    result = {
        "model": model, "fingerprint": fingerprint, "oof_map3": map_at_3(y, p),
        "oof_map3_verified": map_at_3(y[ver], p[ver]) if ver.any() else None,
        "oof_accuracy": accuracy(y, p), "folds": n_folds, "train_clips": len(folds),
        "train_seconds": round(sum(s["train_seconds"] for s in summaries), 1),
        "samples_per_second": round(float(np.mean([s["samples_per_second"] for s in summaries])), 1),
        "params": summaries[0]["params"], "input_shape": summaries[0]["input_shape"],
        "early_stopping_split": summaries[0].get("early_stopping_split", "heldout"),
        "stage_seconds_this_run": round(wall, 1),
    }
    result.update(test_scores(dataset, probs))
    atomic_write_json(result, work.model_dir(model) / "summary.json")
    scope = scope_text(result.get("test_labelled"), result.get("test_clips"))
    ver_text = "" if result["oof_map3_verified"] is None else f" (verified rows {result['oof_map3_verified']:.4f})"
    log.info("%s: OOF MAP@3 %.4f%s%s; %s params, %.0f samples/s", model, result["oof_map3"], ver_text,
             f", test MAP@3 {result['test_map3']:.4f}{scope}" if "test_map3" in result else "",
             f"{result['params']:,}", result["samples_per_second"])
    return result
