"""Training one model over the shared folds: its input, each fold (skipping
finished ones), and the joined out-of-fold and test tables.

The stage ``python -m pipeline.train`` calls :func:`train_models`, which calls
:func:`train_model` per model; each unfinished fold is a job
(:func:`train_fold_job`) of the executor ``run.executor`` names
(:mod:`pipeline.executor`).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
import time

import numpy as np
import pandas as pd

from pipeline.cache import feature_stores
from pipeline.clips import load_clips, split_usable
from pipeline.config import model_config, without_executor_settings
from pipeline.dataset import load_dataset
from pipeline.fingerprints import data_hash, param_hash, table_hash
from pipeline.handcrafted import handcrafted_features, is_handcrafted, train_handcrafted_fold
from pipeline.hierarchical import (check_meta_classes, fold_meta_classes, is_hierarchical, source_stores,
                                   stores_key, train_hierarchical_fold)
from pipeline.cv import current_folds, inner_split
from pipeline.executor import Job, LocalExecutor, job_resources, make_executor, process_cache
from pipeline.labels import training_labels
from pipeline.metrics import accuracy, map_at_3, scope_text
from pipeline.predictions import geometric_mean, probs_frame, read_table, write_table
from pipeline.trainer import TrainRows, fold_fingerprint, train_fold
from pipeline.workdir import WorkDir, atomic_write_json, read_json, remove_outputs

log = logging.getLogger("train")


def model_input(cfg: dict, work: WorkDir, spec: dict, dataset=None, executor=None, compute: bool = True):
    """The array store a model reads: a cached feature, or (for models on
    embeddings) the store the embeddings stage wrote (missing embeddings
    computed first, as ``executor`` jobs, unless ``compute`` is false)."""
    if spec.get("embeddings_from"):
        from pipeline.embedding_store import embedding_store
        return embedding_store(cfg, work, spec["embeddings_from"], compute=compute, dataset=dataset,
                               executor=executor)
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
    # how the folds are run (executor, resources) is not what they compute: never in the fingerprint
    fp = fold_fingerprint(without_executor_settings(spec), store_key, table_hash(labels), table_hash(folds),
                          int(cfg["seed"]), data_hash(clips, dataset.classes, good_test))
    return FoldInputs(labels, good_test, bad_test, fp)


def check_run(cfg: dict, data_dir) -> None:
    """Settings that need the dataset to be checked (a configured meta-class grouping), before any training."""
    check_meta_classes(cfg, load_dataset(data_dir).classes)


def model_sources(cfg: dict, model: str) -> list[str]:
    """The models whose trained folds ``model`` reads (its ``embeddings_from``, its ``hierarchy.sources``)."""
    spec = (cfg.get("models") or {}).get(model) or {}
    out = [spec["embeddings_from"]] if spec.get("embeddings_from") else []
    return out + [s for s in ((spec.get("hierarchy") or {}).get("sources") or []) if s not in out]


def train_models(cfg: dict, data_dir, work: WorkDir, models: list[str], timed=None, progress: bool = True) -> dict:
    """Train the listed models (the stage ``python -m pipeline.train``); ``timed(work, name)`` wraps each
    model (the stage's timing). Returns model -> its summary.

    ``run.executor: local``: one model after the other, each fold in this process. ``ray``: every model's
    folds as Ray jobs at once, one driver thread per model; a model starts once every model it reads
    (:func:`model_sources`) is assembled, so vggish's folds finish before mla's embeddings are made, and
    hierarchy.sources before hierarchical. One progress bar counts every job. The models then overlap in
    time, so the stage is timed as a whole (``train``) instead of model by model (``train:<model>``)."""
    timed = timed or (lambda _work, _name: nullcontext())
    with make_executor(cfg, work, "train", progress) as executor:
        if not executor.concurrent:
            out = {}
            for model in models:
                with timed(work, f"train:{model}"):
                    out[model] = train_model(cfg, data_dir, work, model, progress, executor)
            return out
        with timed(work, "train"):
            return _train_concurrently(cfg, data_dir, work, models, progress, executor)


def _train_concurrently(cfg: dict, data_dir, work: WorkDir, models: list[str], progress: bool, executor) -> dict:
    """:func:`train_models` on a concurrent executor: one driver thread per model, each waiting for the models
    it reads; Ray is started by this (the main) thread when a model's first batch needs it."""
    futures: dict = {}
    submitted = threading.Event()

    def one(model: str) -> dict:
        submitted.wait()
        for src in model_sources(cfg, model):
            if src in futures:
                futures[src].result()  # a source that failed stops this model too (its error is raised)
        return train_model(cfg, data_dir, work, model, progress, executor)

    pool = ThreadPoolExecutor(max_workers=max(1, len(models)), thread_name_prefix="train")
    try:
        for model in models:
            futures[model] = pool.submit(one, model)
        submitted.set()
        first_error = None
        while not all(f.done() for f in futures.values()):
            executor.serve()  # Ray is started here, in the main thread, when a model first needs it
            wait([f for f in futures.values() if not f.done()], timeout=0.2, return_when=FIRST_COMPLETED)
            failed = [f.exception() for f in futures.values() if f.done() and f.exception() is not None]
            if failed and first_error is None:  # as a local run stops at a model's error: stop every job
                first_error = executor.first_error or failed[0]
                executor.cancel_all()
        if first_error is not None:
            raise first_error
        return {m: f.result() for m, f in futures.items()}
    except BaseException:
        executor.cancel_all()  # Ctrl-C or an error: stop every job (their epoch checkpoints stay)
        raise
    finally:
        submitted.set()
        pool.shutdown(wait=True)


@dataclass
class FoldJob:
    """One (model, fold) training: what :func:`train_fold_job` needs, as plain picklable values (a Ray
    worker on another node re-opens the work directory and the model's input from them)."""
    cfg: dict
    work: str
    model: str
    fold: int
    n_folds: int
    rows: TrainRows
    stop_fnames: list
    stop_labels: object          # np.ndarray of class indices, or None (whole-clip models)
    held_fnames: list
    held_labels: object          # np.ndarray of class indices
    good_test: list
    classes: list
    folds: pd.DataFrame          # folds.csv (the hierarchical model's meta-classes read it)
    fingerprint: str
    store_key: str
    progress: bool = True


def train_fold_job(job: FoldJob) -> dict:
    """Train (or resume) one fold of one model and write its tables; a job of
    :func:`train_model`, here or on a Ray worker. The compiled model is kept
    for the process's next fold of the same model (``executor.process_cache``)."""
    work = WorkDir(job.work)
    cfg, model, k = job.cfg, job.model, job.fold
    spec = model_config(cfg, model)
    handcrafted, hierarchical = is_handcrafted(spec), is_hierarchical(spec)
    if handcrafted:
        stores = feature_stores(work, cfg, handcrafted_features(spec))
        key = param_hash({n: st.key for n, st in stores.items()}, 16)
    elif hierarchical:
        stores = source_stores(cfg, work, spec, compute=False)
        key = stores_key(stores)
    else:
        store = model_input(cfg, work, spec, compute=False)
        key = store.key
    if key != job.store_key:
        raise RuntimeError(f"{model} fold {k}: this process computes the model's input key {key}, the driver "
                           f"{job.store_key}: the driver and this worker run different code or settings")
    classes, seed, rows, fold_dir = job.classes, int(cfg["seed"]), job.rows, work.fold_dir(model, k)
    log.info("%s fold %d (of folds 0-%d): training on %d clips, early stopping on %d (%s), predicting %d "
             "held-out", model, k, job.n_folds - 1, len(rows.fnames), len(job.stop_fnames),
             "none" if handcrafted or hierarchical else spec["train"]["early_stopping_split"],
             len(job.held_fnames))
    cache = process_cache(f"train:{model}")
    if hierarchical:
        result = train_hierarchical_fold(spec, stores, rows, job.held_fnames, job.held_labels, job.good_test,
                                         len(classes), fold_dir, seed, k,
                                         fold_meta_classes(spec, work, job.folds, k, classes),
                                         fingerprint=job.fingerprint, model_cache=cache)
    elif handcrafted:
        result = train_handcrafted_fold(spec, stores, rows, job.held_fnames, job.held_labels, job.good_test,
                                        len(classes), fold_dir, seed, k, fingerprint=job.fingerprint)
    else:
        result = train_fold(spec, store, rows, job.stop_fnames, job.stop_labels, job.good_test, len(classes),
                            fold_dir, seed, k, job.fingerprint, progress=job.progress, val_split=rows.split,
                            test_split=store.test_split(k), model_cache=cache, heldout_fnames=job.held_fnames)
    _write_fold(fold_dir, job.held_fnames, k, result, job.good_test, classes)
    return {"val_map3": result.summary.get("val_map3")}


def train_model(cfg: dict, data_dir, work: WorkDir, model: str, progress: bool = True, executor=None) -> dict:
    """Train all folds of one model (skipping finished ones) and write its tables.

    Each unfinished fold is a job (:func:`train_fold_job`) of ``executor`` (default: this process, fold
    after fold); the tables are assembled here once every fold is done."""
    executor = executor or LocalExecutor()
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
        stores = source_stores(cfg, work, spec, dataset, executor=executor)
        store_key = stores_key(stores)
    else:
        store = model_input(cfg, work, spec, dataset, executor=executor)
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
    jobs = []
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
        job = FoldJob(cfg=cfg, work=str(work.root.absolute()), model=model, fold=k, n_folds=n_folds, rows=rows,
                      stop_fnames=stop_fnames, stop_labels=stop_labels, held_fnames=held_fnames,
                      held_labels=folds.loc[held, "label"].map(cidx).to_numpy(), good_test=good_test,
                      classes=list(classes), folds=folds, fingerprint=fp, store_key=store_key,
                      progress=progress and executor.job_progress)
        jobs.append(Job(f"{model} fold {k}", train_fold_job, (job,), job_resources(cfg, model),
                        work=str(work.root.absolute()), needs=("folds.csv",)))
    executor.run(jobs)
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
