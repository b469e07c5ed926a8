"""Stage: train every listed model over every fold.

``python -m pipeline.train [--model NAME ...]`` (default: the preset's
``run.models``). Finished (model, fold) pairs whose settings are unchanged are
skipped; an interrupted fold resumes from its last epoch. Writes
``predictions/<model>_oof.csv`` and ``predictions/<model>_test.csv``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from pipeline.cache import feature_stores
from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.config import model_config
from pipeline.dataset import load_dataset
from pipeline.folds import load_folds
from pipeline.labels import table_hash, training_labels
from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import geometric_mean, probs_frame, read_table, write_table
from pipeline.trainer import TrainRows, fold_fingerprint, train_fold
from pipeline.workdir import WorkDir, atomic_write_json, read_json

log = logging.getLogger("train")


def feature_source(cfg: dict, work: WorkDir, spec: dict):
    """The array store a model reads: a cached feature, or (for models on
    embeddings) the store the embeddings stage wrote."""
    if spec.get("embeddings_from"):
        from pipeline.embeddings import embedding_store
        return embedding_store(cfg, work, spec["embeddings_from"])
    return feature_stores(work, cfg, [spec["feature"]])[spec["feature"]]


def usable_test_fnames(work: WorkDir, test_fnames: list[str]) -> tuple[list[str], list[str]]:
    clips = pd.read_csv(work.require(work.clips_csv, "python -m pipeline.features"), dtype={"fname": str})
    bad = set(clips[(clips.split == "test") & (clips.status != "ok")]["fname"])
    return [f for f in test_fnames if f not in bad], [f for f in test_fnames if f in bad]


def train_model(cfg: dict, data_dir, work: WorkDir, model: str, progress: bool = True) -> dict:
    """Train all folds of one model (skipping finished ones) and write its tables."""
    spec = model_config(cfg, model)
    dataset = load_dataset(data_dir)
    classes = dataset.classes
    cidx = dataset.class_index
    folds = load_folds(work)
    store = feature_source(cfg, work, spec)
    labels = training_labels(cfg, work, folds, spec["train"])
    good_test, bad_test = usable_test_fnames(work, dataset.test_fnames)
    seed = int(cfg.get("seed", 2018))
    fp = fold_fingerprint(spec, store.key, table_hash(labels), table_hash(folds), seed)
    y_given = folds["label"].map(cidx).to_numpy()
    n_folds = int(folds["fold"].max()) + 1
    start = time.time()
    model_cache: dict = {}  # the compiled model is reused across folds (see trainer.fresh_model)
    for k in range(n_folds):
        fold_dir = work.fold_dir(model, k)
        summary = read_json(fold_dir / "summary.json")
        if summary and summary.get("fingerprint") == fp and (fold_dir / "oof.csv").exists():
            log.info("%s fold %d: done (val MAP@3 %.4f), skipping", model, k, summary["val_map3"])
            continue
        tr = labels[folds["fold"] != k]
        train_split = store.train_split(k)  # per-fold for embeddings, "train" otherwise
        rows = TrainRows(fnames=tr["fname"].tolist(), labels=tr["label"].map(cidx).to_numpy(),
                         epsilon=tr["epsilon"].to_numpy(dtype=np.float32), verified=tr["verified"].to_numpy(),
                         split=train_split)
        held = folds["fold"] == k
        log.info("%s fold %d/%d: training on %d clips, validating on %d", model, k + 1, n_folds,
                 len(rows.fnames), int(held.sum()))
        # Early stopping watches the held-out clips' given labels, as the papers did.
        result = train_fold(spec, store, rows, folds.loc[held, "fname"].tolist(), y_given[held.to_numpy()],
                            good_test, len(classes), fold_dir, seed, k, fp, progress=progress,
                            val_split=train_split, test_split=store.test_split(k),
                            model_cache=model_cache)
        write_table(probs_frame(folds.loc[held, "fname"], result.oof, classes, [k] * int(held.sum())),
                    fold_dir / "oof.csv")
        write_table(probs_frame(good_test, result.test if result.test is not None
                                else np.zeros((0, len(classes))), classes), fold_dir / "test.csv")
        atomic_write_json(result.summary, fold_dir / "summary.json")
    return assemble_predictions(work, model, folds, dataset, bad_test, n_folds, time.time() - start)


def assemble_predictions(work: WorkDir, model: str, folds: pd.DataFrame, dataset, bad_test: list[str],
                         n_folds: int, wall: float) -> dict:
    """Join the folds' tables: OOF in folds.csv order, test = geometric mean
    over folds; unusable test clips get the training class prior."""
    classes = dataset.classes
    oof = pd.concat([read_table(work.fold_dir(model, k) / "oof.csv", classes) for k in range(n_folds)])
    oof = oof.set_index("fname").loc[folds["fname"]].reset_index()
    tests = [read_table(work.fold_dir(model, k) / "test.csv", classes) for k in range(n_folds)]
    test = pd.DataFrame({"fname": dataset.test_fnames})
    probs = np.tile(dataset.class_prior(), (len(test), 1))
    if len(tests[0]):
        mean = geometric_mean([t[classes].to_numpy() for t in tests])
        pos = pd.Series(np.arange(len(test)), index=test["fname"]).loc[tests[0]["fname"]].to_numpy()
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
        "model": model, "oof_map3": map_at_3(y, p), "oof_map3_verified": map_at_3(y[ver], p[ver]),
        "oof_accuracy": accuracy(y, p), "folds": n_folds,
        "train_seconds": round(sum(s["train_seconds"] for s in summaries), 1),
        "samples_per_second": round(float(np.mean([s["samples_per_second"] for s in summaries])), 1),
        "params": summaries[0]["params"], "input_shape": summaries[0]["input_shape"],
        "stage_seconds_this_run": round(wall, 1),
    }
    if dataset.test_labels is not None:
        truth = dataset.test_labels.set_index("fname").loc[test["fname"], "label"].map(dataset.class_index)
        result["test_map3"] = map_at_3(truth.to_numpy(), probs)
    atomic_write_json(result, work.model_dir(model) / "summary.json")
    log.info("%s: OOF MAP@3 %.4f (verified rows %.4f)%s; %s params, %.0f samples/s", model, result["oof_map3"],
             result["oof_map3_verified"],
             f", test MAP@3 {result['test_map3']:.4f}" if "test_map3" in result else "",
             f"{result['params']:,}", result["samples_per_second"])
    return result


def main(argv=None):
    def extra(p):
        p.add_argument("--model", action="append", default=None, help="model to train (repeatable; default: run.models)")
    args, cfg, work = start_stage("Train the listed models over every fold.", "train", argv, extra)
    for model in args.model or cfg.get("run", {}).get("models", []):
        with timed_stage(work, f"train:{model}"):
            train_model(cfg, args.data, work, model)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
