"""The verifiers of pseudo-label verification: each model trained over the shared folds.

:class:`FoldVerifiers` is the ``runner`` of
:func:`pipeline.verification.verification_loop` in a real run: for every
iteration it trains each verifier (a network with the shared fold trainer,
or a handcrafted model) over the folds and predicts the non-verified rows
out of fold. Keras is imported only when a network verifier trains.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, verifier_config
from pipeline.executor import Job, LocalExecutor, job_resources, process_cache
from pipeline.fingerprints import param_hash
from pipeline.prefetch import without_loader_settings
from pipeline.predictions import geometric_mean, probs_frame, read_table, write_table
from pipeline.workdir import WorkDir, atomic_write_json, atomic_write_npy, read_json

log = logging.getLogger("pseudo_label")

def train_fold(*args, **kwargs):
    """:func:`pipeline.trainer.train_fold` (an indirection tests can replace)."""
    from pipeline.trainer import train_fold as real
    return real(*args, **kwargs)


def fold_fingerprint(*args, **kwargs) -> str:
    from pipeline.trainer import fold_fingerprint as real
    return real(*args, **kwargs)


def verifier_input(cfg: dict, work: WorkDir, spec: dict):
    """What a verifier reads: the cached feature (or embeddings) a network
    reads, or for a handcrafted model its features' stores (``.stores``)."""
    from pipeline.handcrafted import handcrafted_features, is_handcrafted
    if is_handcrafted(spec):
        from types import SimpleNamespace

        from pipeline.cache import feature_stores
        stores = feature_stores(work, cfg, handcrafted_features(spec))
        return SimpleNamespace(stores=stores, key=param_hash({n: st.key for n, st in stores.items()}, 16))
    from pipeline.fold_training import model_input
    return model_input(cfg, work, spec)


def predict_crops(model_path: Path, spec: dict, store, fnames: list[str], n_crops: int, seed: int,
                  n_classes: int, split: str, chunk: int = 64) -> np.ndarray:
    """(rows, crops, classes): ``n_crops`` random windows of each clip (seeded
    ``pipeline.windows.random_window``) predicted by the saved fold model."""
    out = np.zeros((len(fnames), int(n_crops), n_classes), dtype=np.float32)
    if not fnames:
        return out
    from pipeline.normalize import Normalizer
    from pipeline.trainer import load_saved_model
    from pipeline.windows import random_window
    model = load_saved_model(model_path)
    normalizer = Normalizer(store.stats() if spec["normalize"] else None)
    window, bs = int(spec["window"]), int(spec["train"]["eval_batch_size"])
    rng = np.random.default_rng([int(seed), 25])
    for start in range(0, len(fnames), chunk):
        part = fnames[start:start + chunk]
        x = np.stack([random_window(store.load(split, f), window, rng) for f in part for _ in range(int(n_crops))])
        probs = model.predict(normalizer(x), batch_size=bs, verbose=0)
        out[start:start + len(part)] = probs.reshape(len(part), int(n_crops), -1)
    return out


@dataclass
class VerifierFoldJob:
    """One verifier's fold in one round: what :func:`verifier_fold_job` needs, as plain picklable values."""
    cfg: dict
    work: str
    verifier: str
    iteration: int
    fold: int
    rows: object                 # pipeline.trainer.TrainRows: the training-set rows outside the fold
    val_fnames: list
    val_labels: np.ndarray
    pred_fnames: list            # the pool rows of the fold
    split: str                   # where fold k's clips are read (per fold for a verifier on embeddings)
    fold_dir: str
    fingerprint: str
    store_key: str
    classes: list
    crops: int | None            # self_verify: random crops per pool row
    progress: bool = True


def verifier_fold_job(job: VerifierFoldJob) -> dict:
    """Train one verifier on one fold and write its predictions (``pred.csv``, ``val.csv``, ``crops.npy``,
    ``summary.json`` last): a job of :class:`FoldVerifiers`, here or on a Ray worker."""
    work = WorkDir(job.work)
    spec = verifier_config(job.cfg, job.verifier)
    store = verifier_input(job.cfg, work, spec)
    if store.key != job.store_key:
        raise RuntimeError(f"{job.verifier} iteration {job.iteration} fold {job.fold}: this process computes the "
                           f"input key {store.key}, the driver {job.store_key}: they run different code or settings")
    v, k, rows, fold_dir = job.verifier, job.fold, job.rows, Path(job.fold_dir)
    seed, n_classes = int(job.cfg["seed"]), len(job.classes)
    log.info("%s iteration %d fold %d: training on %d rows, validating on %d, predicting %d",
             v, job.iteration, k, len(rows.fnames), len(job.val_fnames), len(job.pred_fnames))
    if hasattr(store, "stores"):  # a handcrafted verifier (cheap, and often the strongest)
        from pipeline.handcrafted import train_handcrafted_fold
        result = train_handcrafted_fold(spec, store.stores, rows, job.val_fnames, job.val_labels, job.pred_fnames,
                                        n_classes, fold_dir, seed, k, test_split=job.split,
                                        fingerprint=job.fingerprint)
    else:
        result = train_fold(spec, store, rows, job.val_fnames, job.val_labels, job.pred_fnames, n_classes,
                            fold_dir, seed, k, job.fingerprint, progress=job.progress, val_split=job.split,
                            test_split=job.split, model_cache=process_cache(f"verifier:{v}"))
    pred = result.test if result.test is not None else np.zeros((0, n_classes))
    write_table(probs_frame(job.pred_fnames, pred, job.classes), fold_dir / "pred.csv")
    write_table(probs_frame(job.val_fnames, result.oof, job.classes), fold_dir / "val.csv")
    if job.crops:
        atomic_write_npy(fold_dir / "crops.npy",
                         predict_crops(fold_dir / "best.keras", spec, store, job.pred_fnames, int(job.crops),
                                       seed * 1000 + job.iteration * 100 + k, n_classes, job.split))
    atomic_write_json({**result.summary, "fingerprint": job.fingerprint, "iteration": job.iteration,
                       "predicted_rows": len(job.pred_fnames)}, fold_dir / "summary.json")
    return {"val_map3": result.summary.get("val_map3")}


class FoldVerifiers:
    """Trains each verifier over the folds with the shared fold trainer.

    For fold k: train on the training-set rows with fold != k, validate
    (early stopping) on the training-set rows with fold == k, predict the
    pool rows with fold == k (from the split fold k trains on). Verifiers are combined
    by geometric mean. Every (verifier, fold) of a round is a job of ``executor``
    (:func:`verifier_fold_job`; default: this process, one after the other); the
    round's tables are then read back in a fixed order.
    """

    def __init__(self, cfg: dict, work: WorkDir, s: dict, classes: list[str], progress: bool = True,
                 data_hash: str = "", executor=None):
        self.executor = executor or LocalExecutor()
        self.cfg, self.work, self.s, self.classes, self.progress = cfg, work, s, list(classes), progress
        self.seed = int(cfg["seed"])
        self.specs = {v: verifier_config(cfg, v) for v in s["verifiers"]}
        self.stores = {v: verifier_input(cfg, work, spec) for v, spec in self.specs.items()}
        self.want_crops = s["mode"] == "self_verify"
        handcrafted = [v for v, st in self.stores.items() if hasattr(st, "stores")]
        if self.want_crops and handcrafted:
            raise ConfigError(f"pseudo_label.mode self_verify predicts random crops; handcrafted verifier(s) "
                              f"{handcrafted} read whole clips: use mode verify or network verifiers")
        self.data_hash = data_hash
        # the loader settings decide how batches are made, not what they hold: no fingerprint has them
        # (pipeline.trainer.fold_fingerprint)
        specs = {v: {**spec, "train": without_loader_settings(spec["train"])} for v, spec in self.specs.items()}
        self.fingerprint = param_hash({"specs": specs, "stores": {v: st.key for v, st in self.stores.items()},
                                       "seed": self.seed, "data": data_hash, "crops": int(s["crops"]) if self.want_crops else None}, 16)

    def __call__(self, iteration: int, train_df: pd.DataFrame, pool_df: pd.DataFrame, iter_dir: Path):
        cidx = {c: i for i, c in enumerate(self.classes)}
        n_classes = len(self.classes)
        folds_all = sorted(set(train_df["fold"]) | set(pool_df["fold"]))
        train_hash = param_hash(pd.util.hash_pandas_object(train_df, index=False).tolist(), 16)
        pool_hash = param_hash(pd.util.hash_pandas_object(pool_df, index=False).tolist(), 16)
        jobs = []
        for v, spec in self.specs.items():  # every fold not done yet, as a job
            store = self.stores[v]
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
                    continue
                from pipeline.trainer import TrainRows
                eps = float(spec["train"]["smoothing_verified"] or 0.0)
                rows = TrainRows(fnames=tr["fname"].tolist(), labels=tr["label"].map(cidx).to_numpy(),
                                 epsilon=np.full(len(tr), eps, dtype=np.float32),
                                 verified=np.ones(len(tr), dtype=int))
                # the pool rows are training clips: read from the split this fold trains on (per fold for
                # a verifier on embeddings: fold k's extractor space)
                split = next(iter(store.stores.values())).train_split(k) if hasattr(store, "stores") \
                    else store.train_split(k)
                job = VerifierFoldJob(cfg=self.cfg, work=str(self.work.root.absolute()), verifier=v,
                                      iteration=iteration, fold=k, rows=rows, val_fnames=val["fname"].tolist(),
                                      val_labels=val["label"].map(cidx).to_numpy(), pred_fnames=pred_fnames,
                                      split=split, fold_dir=str(fold_dir.absolute()), fingerprint=fp,
                                      store_key=store.key, classes=self.classes,
                                      crops=int(self.s["crops"]) if self.want_crops else None,
                                      progress=self.progress and self.executor.job_progress)
                jobs.append(Job(f"{v} iteration {iteration} fold {k}", verifier_fold_job, (job,),
                                job_resources(self.cfg, v), work=str(self.work.root.absolute()), needs=("folds.csv",)))
        self.executor.run(jobs)
        all_probs, all_crops, all_val = [], [], []
        for v in self.specs:  # the round's tables, read back in a fixed order
            val_probs = np.zeros((len(train_df), n_classes))  # out-of-fold, of the training-set rows
            probs = np.zeros((len(pool_df), n_classes))
            crops = np.zeros((len(pool_df), int(self.s["crops"]), n_classes)) if self.want_crops else None
            for k in folds_all:
                fold_dir = iter_dir / v / f"fold{k}"
                pmask = (pool_df["fold"] == k).to_numpy()
                pred_fnames = pool_df.loc[pmask, "fname"].tolist()
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


