"""Per-fold embeddings of every clip patch from a trained source model's fold
extractors: the 128-d ``fc2`` output of the fine-tuned VGGish (for ``mla``,
``embeddings_from: vggish``), or any other network's penultimate layer (for
``hierarchical``, whose ``hierarchy.sources`` are ``cnn_ref`` on log-mel,
gammatone and CQT).

``python -m pipeline.embeddings --config quick --data DIR --work DIR [--source vggish]``

Which extractor embeds which clip (so the next model's out-of-fold scores
stay honest): the next model's fold k lives entirely in fold k's extractor's
embedding space (the ``vggish`` sub-model of
``<work>/models/<source>/fold<k>/best.keras``). Split ``train-fold<k>`` holds
every train clip embedded by extractor k, and ``test-fold<k>`` the test
clips. Fold k's held-out clips are exactly the clips extractor k never saw,
so the next model's fold k is scored only on clips that neither it nor its
extractor trained on. Why not "each train clip by the extractor that held it
out" (one shared ``train`` split): the folds' extractors are separately
fine-tuned networks, so their embedding spaces are unrelated; a model
trained on a mix of spaces and scored in another one measured chance-level
MAP@3 on fsdd (0.199 for 10 classes). The per-fold test predictions are
combined by the trainer's usual geometric mean over folds.

A clip of T frames gives ``max(1, T // window)`` complete, non-overlapping
patches of the source model's window (VGGish: 96 frames; the reference keeps
complete examples only; a clip shorter than one patch is repeated to one). Each
patch is normalised as the extractor was trained (the source model's
``normalize``) and embedded in large batches across clips. The embedding is
the pre-activation ``fc2`` output, as in the reference.

Storage: an ordinary feature cache folder written with
:class:`pipeline.cache.FeatureStore` shards,
``<work>/features/embeddings-<source>-<key>/`` with ``train-fold<k>/`` and
``test-fold<k>/``; ``<key>`` hashes the source model's fold fingerprints, so
retraining the extractor gives a new folder. Resumable: a shard counts once
its index is written, and a finished (fold, split) leaves a marker in
``done/``, so a re-run loads no model at all. ``stats.json`` holds per-dim
mean/std over fold 0's train embeddings (a rough scale only: each fold has its
own space, so models on embeddings should not rely on it; ``mla`` uses BatchNorm).

``embedding_store(cfg, work, source)`` (used by ``pipeline.train`` for a model
with ``embeddings_from``) computes whatever is missing and returns the store;
its ``train_split(fold)`` and ``test_split(fold)`` name the splits fold ``fold``
reads its training/held-out and test clips from.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.audio import repeat_to_length
from pipeline.cache import FeatureStore, feature_stores
from pipeline.clips import load_clips, usable_rows
from pipeline.config import ConfigError, model_config
from pipeline.fingerprints import param_hash
from pipeline.cv import load_folds
from pipeline.spectral import VGGISH_PATCH
from pipeline.workdir import WorkDir, atomic_write_json, read_json

log = logging.getLogger("embeddings")

#: the Dense layer of every builder's softmax head (models/_common.py softmax_head): its input is the penultimate layer
HEAD_LAYER = "predictions_dense"

#: Bump when the way embeddings are computed changes, so old folders are not reused.
EMBEDDINGS_VERSION = 2


class EmbeddingStore(FeatureStore):
    """A FeatureStore over the embeddings of one source model: per fold k,
    splits ``train-fold<k>`` and ``test-fold<k>`` (every train / test clip
    by fold k's extractor)."""

    def __init__(self, work: WorkDir, source: str, source_spec: dict, source_store: FeatureStore,
                 fingerprints: list[str], audio_cfg: dict):
        spec = {"kind": "embeddings", "source": source, "fingerprints": list(fingerprints),
                "source_feature": source_store.name, "source_feature_key": source_store.key,
                "patch": int(source_spec["window"]), "normalize": bool(source_spec["normalize"]),
                "extractor": extractor_kind(source_spec), "version": EMBEDDINGS_VERSION}
        super().__init__(work, f"embeddings-{source}", spec, audio_cfg)
        self.source = source
        self.source_spec = source_spec
        self.source_store = source_store
        self.n_folds = len(fingerprints)

    def settings(self, name: str, spec: dict) -> dict:
        return dict(spec)  # made here, not a configured feature: nothing to fill in

    def train_split(self, fold: int) -> str:
        """The split fold ``fold``'s model reads its training and held-out clips from."""
        return f"train-fold{int(fold)}"

    def test_split(self, fold: int) -> str:
        """The split fold ``fold``'s model reads the test clips from."""
        return f"test-fold{int(fold)}"

    def load(self, split: str, fname: str) -> np.ndarray:
        if split in ("train", "test"):
            raise ValueError(f"{self.name}: embeddings are stored per fold; read split "
                             f"store.{split}_split(fold) (e.g. {self.root.name}/{split}-fold0), not {split!r}")
        try:
            return super().load(split, fname)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root / split}: no embedding for {fname}: run "
                                    f"`python -m pipeline.embeddings --source {self.source}` first") from None

    def ensure_dir(self) -> None:
        """The folder and its params.json (splits are created as they are written; no ``test/``)."""
        (self.root / "done").mkdir(parents=True, exist_ok=True)
        if not (self.root / "params.json").exists():
            atomic_write_json(self.params, self.root / "params.json")

    def marker(self, fold: int, split: str) -> Path:
        return self.root / "done" / f"fold{int(fold)}-{split}.json"


# -- helpers ------------------------------------------------------------------
def clip_patches(arr: np.ndarray, patch: int = VGGISH_PATCH) -> np.ndarray:
    """(n, patch, ...) complete non-overlapping patches, n = max(1, T // patch)
    (a clip shorter than one patch is repeated to one)."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape[0] < patch:
        arr = repeat_to_length(arr, patch)
    n = arr.shape[0] // patch
    return arr[:n * patch].reshape((n, patch) + arr.shape[1:])


def load_extractor(work: WorkDir, source: str, fold: int):
    """Fold ``fold``'s fine-tuned extractor: the ``vggish`` sub-model of a VGGish
    classifier (its ``fc2`` embedding), else the classifier up to its penultimate
    layer (what the softmax head reads: the 256-d vector of the hierarchical
    paper's VGG-like extractor is ``cnn_ref``'s pooled features)."""
    from models import load_model
    path = work.fold_dir(source, fold) / "best.keras"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m pipeline.train --model {source}` first")
    model = load_model(path, compile=False)
    return extractor_of(model)


def extractor_of(model):
    """The embedding sub-model of a trained classifier (see :func:`load_extractor`)."""
    import keras
    names = {layer.name for layer in model.layers}
    if "vggish" in names:
        return model.get_layer("vggish")
    head = HEAD_LAYER
    if head not in names:
        raise ValueError(f"model {model.name!r} has no {head!r} layer (the softmax head of models/_common.py), so "
                         "it has no penultimate layer to embed clips with")
    return keras.Model(model.inputs, model.get_layer(head).input, name=f"{model.name}_embedding")


def extractor_kind(source_spec: dict) -> str:
    """Which layer a source model's embeddings come from (part of the store's key)."""
    return "vggish" if source_spec["builder"] == "vggish" else "penultimate"


def embed_arrays(extractor, arrays: list[np.ndarray], normalizer, patch: int = VGGISH_PATCH,
                 batch_size: int = 128) -> list[np.ndarray]:
    """Embeddings (n_patches_i, d) of several clips' frame arrays, in one predict call."""
    patches = [clip_patches(a, patch) for a in arrays]
    x = normalizer(np.concatenate(patches))
    emb = np.asarray(extractor.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
    bounds = np.cumsum([0] + [len(p) for p in patches])
    return [emb[bounds[i]:bounds[i + 1]] for i in range(len(patches))]


def source_fingerprints(work: WorkDir, source: str, n_folds: int) -> list[str]:
    """The fold fingerprints of the trained source model (its summary.json files)."""
    out = []
    for k in range(n_folds):
        fold_dir = work.fold_dir(source, k)
        summary = read_json(fold_dir / "summary.json")
        if not summary or not (fold_dir / "best.keras").exists():
            raise FileNotFoundError(f"{fold_dir}: fold {k} of {source!r} is not trained: "
                                    f"run `python -m pipeline.train --model {source}` first")
        out.append(summary["fingerprint"])
    return out


def _check_source_current(cfg: dict, work: WorkDir, source: str, spec: dict, src_store: FeatureStore,
                          folds: pd.DataFrame, fingerprints: list[str], dataset) -> None:
    """Warn when the extractor was trained with other settings or data than the current ones."""
    from pipeline.fold_training import fold_inputs  # Keras: only when the check runs
    want = fold_inputs(cfg, work, spec, src_store.key, folds, dataset).fingerprint
    stale = [k for k, fp in enumerate(fingerprints) if fp != want]
    if stale:
        log.warning("%s fold(s) %s were trained with other settings than the preset's: the embeddings use "
                    "them as they are; run `python -m pipeline.train --model %s` to retrain", source,
                    ", ".join(map(str, stale)), source)


def open_embedding_store(cfg: dict, work: WorkDir, source: str, dataset=None) -> EmbeddingStore:
    """The store of ``source``'s embeddings (nothing computed)."""
    spec = model_config(cfg, source)
    if spec.get("embeddings_from"):
        raise ConfigError(f"model {source!r} reads embeddings itself; it cannot be an embeddings source")
    if not spec.get("feature"):
        raise ConfigError(f"model {source!r} names no feature; it cannot be an embeddings source")
    src_store = feature_stores(work, cfg, [spec["feature"]])[spec["feature"]]
    folds = load_folds(work)
    n_folds = int(folds["fold"].max()) + 1
    fingerprints = source_fingerprints(work, source, n_folds)
    if dataset is not None:
        _check_source_current(cfg, work, source, spec, src_store, folds, fingerprints, dataset)
    return EmbeddingStore(work, source, spec, src_store, fingerprints, cfg["audio"])


def _usable_test(work: WorkDir) -> list[str]:
    """Usable test clips in test order (clips.csv lists them in that order)."""
    return usable_rows(load_clips(work), "test")["fname"].tolist()


def _groups(src: FeatureStore, split: str, fnames: list[str], patch: int, max_patches: int):
    """Yield (fname -> frames, fname -> bad reason) groups of about ``max_patches`` patches."""
    arrays, bad, n = {}, {}, 0
    for fname in fnames:
        why = src.bad_reason(split, fname)
        if why is not None:
            bad[fname] = why
            continue
        arrays[fname] = arr = src.load(split, fname)
        n += max(1, arr.shape[0] // patch)
        if n >= max_patches:
            yield arrays, bad
            arrays, bad, n = {}, {}, 0
    if arrays or bad:
        yield arrays, bad


def _fold_splits(store: EmbeddingStore, fold: int, train_fnames: list[str], test_fnames: list[str]):
    """[(out split, source split, fnames, names hash)] of fold ``fold`` that its marker does not say are done."""
    out = []
    for out_split, src_split, fnames in ((store.train_split(fold), "train", train_fnames),
                                         (store.test_split(fold), "test", test_fnames)):
        names_hash = param_hash(sorted(fnames), 16)
        if (read_json(store.marker(fold, out_split)) or {}).get("fnames_hash") != names_hash:
            out.append((out_split, src_split, fnames, names_hash))
    return out


def embed_fold_job(cfg: dict, work_root: str, source: str, fold: int, store_key: str, progress: bool,
                   max_patches: int) -> dict:
    """Every missing embedding of one fold (its train and test splits) with fold ``fold``'s extractor:
    a job of :func:`compute_embeddings`, here or on a Ray worker. Returns its statistics."""
    from pipeline.normalize import Normalizer
    work = WorkDir(work_root)
    store = open_embedding_store(cfg, work, source)
    if store.key != store_key:
        raise RuntimeError(f"embeddings {source} fold {fold}: this process computes the store key {store.key}, the "
                           f"driver {store_key}: the driver and this worker run different code or settings")
    src, spec = store.source_store, store.source_spec
    normalizer = Normalizer(src.stats() if spec["normalize"] else None)
    patch = int(spec["window"])
    batch_size = int(spec["train"].get("eval_batch_size", 128))
    stats = {"clips": 0, "patches": 0, "folds_done": 0}
    extractor = None
    for out_split, src_split, fnames, names_hash in _fold_splits(store, fold, load_folds(work)["fname"].tolist(),
                                                                 _usable_test(work)):
        todo = [f for f in fnames if not store.is_done(out_split, f)]
        if todo and extractor is None:
            extractor = load_extractor(work, store.source, fold)
        with tqdm(total=len(todo), unit="clip", disable=not progress or not todo,
                  desc=f"embeddings {store.source} fold {fold} {out_split}") as bar:
            for arrays, bad in _groups(src, src_split, todo, patch, max_patches):
                names = list(arrays)
                embs = (embed_arrays(extractor, [arrays[f] for f in names], normalizer, patch, batch_size)
                        if names else [])
                store.write_shard(out_split, dict(zip(names, embs)), bad)
                stats["clips"] += len(names)
                stats["patches"] += int(sum(len(e) for e in embs))
                bar.update(len(names) + len(bad))
        store.index(out_split, refresh=True)
        missing = [f for f in fnames if not store.is_done(out_split, f)]
        if missing:
            raise RuntimeError(f"{store.root / out_split}: {len(missing)} clip(s) still lack embeddings")
        atomic_write_json({"fold": fold, "split": out_split, "clips": len(fnames), "fnames_hash": names_hash},
                          store.marker(fold, out_split))
        stats["folds_done"] += 1
    return stats


def compute_embeddings(cfg: dict, work: WorkDir, store: EmbeddingStore, progress: bool = True,
                       max_patches: int = 2048, executor=None) -> dict:
    """Write every missing embedding of ``store`` (resumable): each fold with work left is a job
    (:func:`embed_fold_job`) of ``executor`` (default: this process, fold after fold). Returns run statistics."""
    from pipeline.executor import Job, LocalExecutor, job_resources
    executor = executor or LocalExecutor()
    folds = load_folds(work)
    train_fnames, test_fnames = folds["fname"].tolist(), _usable_test(work)
    store.ensure_dir()
    stats = {"clips": 0, "patches": 0, "seconds": 0.0, "folds_done": 0}
    start = time.perf_counter()
    todo = [k for k in range(store.n_folds) if _fold_splits(store, k, train_fnames, test_fnames)]
    jobs = [Job(f"embeddings {store.source} fold {k}", embed_fold_job,
                (cfg, str(work.root.absolute()), store.source, k, store.key, progress and executor.job_progress,
                 max_patches), job_resources(cfg, store.source), work=str(work.root.absolute()), needs=("folds.csv",))
            for k in todo]
    for done in executor.run(jobs):
        for key in ("clips", "patches", "folds_done"):
            stats[key] += done[key]
    for k in todo:  # those jobs wrote through their own handles on the store
        for split in (store.train_split(k), store.test_split(k)):
            store.index(split, refresh=True)
    stats["seconds"] = time.perf_counter() - start
    if store.stats() is None or stats["clips"]:
        split0 = store.train_split(0)
        train_ok = [f for f in folds["fname"] if store.bad_reason(split0, f) is None]
        store.compute_stats(train_ok, seed=int(cfg["seed"]), split=split0)
    return stats


def embedding_store(cfg: dict, work: WorkDir, source_model: str, compute: bool = True,
                    progress: bool = True, dataset=None, executor=None) -> EmbeddingStore:
    """The embeddings of ``source_model``'s fine-tuned extractors, with the
    FeatureStore reading interface (``load``, ``length``, ``stats``, ``key``,
    ``name``, ``kind``) plus ``test_split(fold)``. With ``compute`` (default)
    whatever is missing is computed first (one ``executor`` job per fold)."""
    store = open_embedding_store(cfg, work, source_model, dataset)
    if compute:
        stats = compute_embeddings(cfg, work, store, progress=progress, executor=executor)
        if stats["clips"]:
            n_train = len(store.index(store.train_split(0)))
            n_test = len(store.index(store.test_split(0)))
            log.info("embeddings %s: %d clips (%d patches) embedded in %.1f s = %.0f patches/s; store holds %d train "
                     "+ %d test clips x %d folds of %d-d embeddings -> %s", source_model, stats["clips"],
                     stats["patches"], stats["seconds"], stats["patches"] / max(stats["seconds"], 1e-9), n_train,
                     n_test, store.n_folds, _dim(store), store.root)
        else:
            log.info("embeddings %s: everything cached (%d folds) in %s", source_model, store.n_folds, store.root)
    return store


def _dim(store: EmbeddingStore) -> int:
    st = store.stats()
    return len(st["mean"]) if st else 0


def default_sources(cfg: dict) -> list[str]:
    """Every ``embeddings_from`` and ``hierarchy.sources`` of the preset's run.models (``vggish`` if none)."""
    out = []
    for m in cfg["run"]["models"]:
        spec = cfg["models"][m]
        for src in ([spec["embeddings_from"]] if spec["embeddings_from"] else []) + \
                list((spec.get("hierarchy") or {}).get("sources") or []):
            if src not in out:
                out.append(src)
    return out or ["vggish"]
