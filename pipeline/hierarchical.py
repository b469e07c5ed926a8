"""The ``hierarchical`` model kind: two-level classification on frozen per-fold
embeddings (the hierarchical acoustic-scene seed system).

1. Extractors: each ``hierarchy.sources`` model (``cnn_ref`` on log-mel,
   gammatone and CQT in the presets: a VGG-like CNN trained with mixup and
   cross-entropy on soft targets, which has the gradients of the paper's KL
   loss) embeds every clip with each fold's trained network, up to its
   penultimate layer (:mod:`pipeline.embedding_store`). A clip's embedding is
   the mean over its windows. Fold k's classifier reads only fold k's
   embeddings, so it is scored on clips its extractor never trained on.
2. Meta-classes: ``hierarchy.meta_classes`` (a mapping) or, when none is
   given, derived per fold by average-linkage agglomerative clustering of the
   class confusion of the sources' out-of-fold predictions on the rows outside
   the fold (:func:`derive_meta_classes`). Written to
   ``models/<model>/fold<k>/meta_classes.json`` and shown in the report.
3. Per fold and source: a ``models.hierarchical`` network (a meta-class DNN
   and one DNN per meta-class, composed P(class) = P(meta) x P(class | meta))
   trained with :class:`pipeline.losses.HierarchicalLoss` (gamma x KL + (1 -
   gamma) x output-space triplet) for a fixed number of epochs (the paper
   trains 100 without early stopping), saved as ``<source>.keras`` with the
   fold's embedding standardisation built in.
4. The sources' posteriors are summed and normalised (one source: that
   representation alone).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, model_config
from pipeline.fingerprints import param_hash
from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import read_table
from pipeline.workdir import WorkDir, atomic_write_json

if TYPE_CHECKING:  # pipeline.trainer imports Keras
    from pipeline.trainer import FoldResult, TrainRows

log = logging.getLogger("hierarchical")

META_FILE = "meta_classes.json"


def is_hierarchical(spec: dict) -> bool:
    return spec.get("builder") == "hierarchical"


def source_stores(cfg: dict, work: WorkDir, spec: dict, dataset=None, compute: bool = True, executor=None) -> dict:
    """Each source's per-fold embedding store (missing embeddings computed first, as ``executor`` jobs)."""
    from pipeline.embedding_store import embedding_store
    return {src: embedding_store(cfg, work, src, compute=compute, dataset=dataset, executor=executor)
            for src in spec["hierarchy"]["sources"]}


def stores_key(stores: dict) -> str:
    """What the model's input is made from: every source store's key (they hash the extractors' fingerprints)."""
    return param_hash({src: st.key for src, st in stores.items()}, 16)


def clip_embeddings(store, split: str, fnames: Sequence[str]) -> np.ndarray:
    """(n, d): each clip's patch embeddings averaged (one vector per clip)."""
    return np.stack([np.asarray(store.load(split, f), dtype=np.float32).mean(axis=0) for f in fnames])


# ---------------------------------------------------------------- meta-classes
def soft_confusion(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C): row c = the mean predicted distribution of the rows labelled c (a row of zeros if none)."""
    labels = np.asarray(labels, dtype=int)
    out = np.zeros((n_classes, n_classes))
    np.add.at(out, labels, np.asarray(probs, dtype=np.float64))
    counts = np.bincount(labels, minlength=n_classes)[:, None]
    return out / np.maximum(counts, 1)


def default_n_meta(n_classes: int) -> int:
    return max(1, min(n_classes, int(round(np.sqrt(n_classes)))))


def derive_meta_classes(confusion: np.ndarray, n_meta: int) -> list[list[int]]:
    """Groups of classes that the classifier confuses with each other.

    Similarity of two classes = their symmetrised confusion (the mean
    probability one's clips give the other); distance = 1 - similarity / the
    largest similarity; average-linkage agglomerative clustering into
    ``n_meta`` groups. Groups are sorted by their smallest class index."""
    from sklearn.cluster import AgglomerativeClustering
    conf = np.asarray(confusion, dtype=np.float64)
    n = conf.shape[0]
    n_meta = int(min(max(n_meta, 1), n))
    if n_meta == 1:
        return [list(range(n))]
    if n_meta == n:
        return [[c] for c in range(n)]
    sim = (conf + conf.T) / 2.0
    np.fill_diagonal(sim, 0.0)
    dist = 1.0 - sim / max(sim.max(), 1e-12)
    np.fill_diagonal(dist, 0.0)
    labels = AgglomerativeClustering(n_clusters=n_meta, metric="precomputed", linkage="average").fit_predict(dist)
    groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in np.unique(labels)]
    return sorted(groups, key=lambda g: g[0])


def given_meta_classes(mapping: dict, classes: Sequence[str], where: str) -> tuple[list[str], list[list[int]]]:
    """(names, class-index groups) of a configured mapping; refused unless every class is in exactly one group."""
    index = {c: i for i, c in enumerate(classes)}
    names, groups, seen = [], [], {}
    for name, members in mapping.items():
        if not members:
            raise ConfigError(f"{where}.{name}: an empty meta-class; give it classes or remove it")
        group = []
        for c in members:
            if c not in index:
                import difflib
                near = difflib.get_close_matches(str(c), list(classes), n=3)
                raise ConfigError(f"{where}.{name}: {c!r} is not a class of this dataset"
                                  + (f" (did you mean {', '.join(near)}?)" if near else ""))
            if c in seen:
                raise ConfigError(f"{where}: class {c!r} is in both {seen[c]!r} and {name!r}; give each class once")
            seen[c] = name
            group.append(index[c])
        names.append(str(name))
        groups.append(sorted(group))
    missing = [c for c in classes if c not in seen]
    if missing:
        raise ConfigError(f"{where}: class(es) {', '.join(missing)} are in no meta-class; every class needs one")
    return names, groups


def check_meta_classes(cfg: dict, classes: Sequence[str]) -> None:
    """Refuse a bad configured grouping before any training (the classes come with the dataset)."""
    for name in cfg["run"]["models"]:
        hierarchy = cfg["models"][name].get("hierarchy") or {}
        if hierarchy.get("meta_classes"):
            given_meta_classes(hierarchy["meta_classes"], classes, f"models.{name}.hierarchy.meta_classes")


def fold_meta_classes(spec: dict, work: WorkDir, folds: pd.DataFrame, fold: int, classes: Sequence[str]) -> dict:
    """The meta-classes fold ``fold`` uses: configured, or derived from the
    sources' out-of-fold predictions on the rows of the other folds (their
    mean over sources; the held-out rows' labels are not used)."""
    hierarchy = spec["hierarchy"]
    if hierarchy["meta_classes"]:
        names, groups = given_meta_classes(hierarchy["meta_classes"], classes,
                                           f"models.{spec['name']}.hierarchy.meta_classes")
        how = "given"
    else:
        keep = (folds["fold"] != fold).to_numpy()
        probs = []
        for src in hierarchy["sources"]:
            path = work.oof_csv(src)
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run `python -m pipeline.train --model {src}` first")
            table = read_table(path, list(classes)).set_index("fname").loc[folds["fname"]]
            probs.append(table[list(classes)].to_numpy()[keep])
        index = {c: i for i, c in enumerate(classes)}
        labels = folds.loc[keep, "label"].map(index).to_numpy()
        confusion = soft_confusion(labels, np.mean(probs, axis=0), len(classes))
        n_meta = hierarchy["n_meta"] or default_n_meta(len(classes))
        groups = derive_meta_classes(confusion, n_meta)
        names = [f"meta_{m}" for m in range(len(groups))]
        how = (f"derived from the out-of-fold confusion of {', '.join(hierarchy['sources'])} on the rows outside "
               f"each fold")
    return {"how": how, "names": names, "groups": groups,
            "classes": [[classes[c] for c in g] for g in groups]}


# ---------------------------------------------------------------- one fold
def _template(spec: dict, n_dims: int, n_classes: int, groups, seed: int):
    """A freshly initialised (seeded) two-level network on standardised embeddings."""
    import keras
    from models import build_model

    keras.utils.set_random_seed(int(seed))
    return build_model("hierarchical", (n_dims,), n_classes, groups=groups, **spec["params"])


def with_standardization(model, mean: np.ndarray | None, var: np.ndarray | None):
    """The classifier as saved and used for prediction: raw clip embeddings in,
    the fold's standardisation (a Normalization layer with constants) first."""
    import keras
    n_dims = int(model.input_shape[-1])
    inputs = keras.Input((n_dims,), name="embedding")
    x = inputs if mean is None else keras.layers.Normalization(mean=mean, variance=var, name="standardize")(inputs)
    return keras.Model(inputs, model(x), name="hierarchical_classifier")


def fresh_classifier(spec: dict, n_dims: int, n_classes: int, groups, seed: int, cache: dict):
    """A compiled classifier with a fresh seeded initialisation. Tracing the train
    step costs ~3 s per model here, more than the training (60 epochs of 300
    clips: ~2 s), so the model compiled for the first (fold, source) with these
    meta-classes is reused: it takes a new template's weights and dropout RNG
    state, and its Adam state is zeroed (what a new Adam starts from)."""
    import keras
    from pipeline.losses import HierarchicalLoss
    from pipeline.callbacks import renew_model

    template = _template(spec, n_dims, n_classes, groups, seed)
    key = param_hash({"groups": groups, "dims": n_dims, "classes": n_classes}, 16)
    model = cache.get(key)
    if model is None:
        h = spec["hierarchy"]
        template.compile(optimizer=keras.optimizers.Adam(float(spec["train"]["lr"])),
                         loss=HierarchicalLoss(groups, gamma=h["gamma"], margin=h["margin"]))
        cache.clear()  # one model at a time
        cache[key] = template
        return template
    renew_model(model, template, spec["train"]["lr"])
    return model


def fit_epochs(model, x: np.ndarray, targets: np.ndarray, batch_size: int, epochs: int, seed: int) -> None:
    """Shuffled epochs of equal-size batches (one traced step shape): the last
    batch of an epoch is filled up with the epoch's first rows, so every row is
    seen once or twice per epoch."""
    n = len(x)
    bs = min(int(batch_size), n)
    rng = np.random.default_rng(int(seed))
    for _ in range(int(epochs)):
        order = rng.permutation(n)
        n_batches = -(-n // bs)
        order = np.concatenate([order, order[:n_batches * bs - n]])
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            model.train_on_batch(x[idx], targets[idx])


def predict_rows(model, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities of clip embeddings (eager calls: no retracing per input size)."""
    out = [np.asarray(model(x[i:i + batch_size], training=False), dtype=np.float64)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]))


def train_hierarchical_fold(spec: dict, stores: dict, rows: "TrainRows", held_fnames: Sequence[str],
                            held_labels: np.ndarray, test_fnames: Sequence[str], n_classes: int, fold_dir,
                            seed: int, fold: int, meta: dict, fingerprint: str | None = None,
                            model_cache: dict | None = None) -> "FoldResult":
    """Train fold ``fold``'s classifier per source on ``rows`` and predict the
    held-out and test clips (posteriors summed over sources, normalised);
    same contract as :func:`pipeline.trainer.train_fold`."""
    from pipeline.augment import smoothed_targets
    from pipeline.trainer import FoldResult

    model_cache = {} if model_cache is None else model_cache
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"fold": int(fold), **meta}, fold_dir / META_FILE)
    groups = meta["groups"]
    targets = smoothed_targets(np.asarray(rows.labels), n_classes, np.asarray(rows.epsilon))
    tcfg = spec["train"]
    held_sum = np.zeros((len(held_fnames), n_classes))
    test_sum = np.zeros((len(test_fnames), n_classes))
    per_source, dims, n_params, start = {}, [], 0, time.perf_counter()
    for src, store in stores.items():
        x_train = clip_embeddings(store, store.train_split(fold), rows.fnames)
        dims.append(int(x_train.shape[1]))
        mean, var = (x_train.mean(axis=0), np.maximum(x_train.var(axis=0), 1e-6)) if spec["normalize"] else (None,
                                                                                                            None)
        src_seed = int(seed) * 1000 + int(fold) * 10 + int(param_hash(src, 6), 16) % 10_000 * 100
        net = fresh_classifier(spec, x_train.shape[1], n_classes, groups, src_seed, model_cache)
        model = with_standardization(net, mean, var)
        x_fit = x_train if mean is None else np.asarray(model.get_layer("standardize")(x_train))
        fit_epochs(net, x_fit, targets, tcfg["batch_size"], tcfg["epochs"], src_seed)
        model.save(fold_dir / f"{src}.keras")
        held = predict_rows(model, clip_embeddings(store, store.train_split(fold), held_fnames))
        held_sum += held
        if len(test_fnames):
            test_sum += predict_rows(model, clip_embeddings(store, store.test_split(fold), test_fnames))
        per_source[src] = round(map_at_3(np.asarray(held_labels), held), 6)
        n_params += int(net.count_params())
    train_seconds = time.perf_counter() - start
    oof = held_sum / held_sum.sum(axis=1, keepdims=True)
    test = test_sum / test_sum.sum(axis=1, keepdims=True) if len(test_fnames) else None
    summary = {
        "fold": int(fold), "best_epoch": int(tcfg["epochs"]), "epochs_run": int(tcfg["epochs"]),
        "val_map3": map_at_3(np.asarray(held_labels), oof), "val_accuracy": accuracy(np.asarray(held_labels), oof),
        "val_map3_per_source": per_source, "meta_classes": meta["classes"],
        "train_clips": len(rows.fnames), "train_seconds": round(train_seconds, 3),
        "samples_per_second": round(len(rows.fnames) * int(tcfg["epochs"]) * len(stores) / max(train_seconds, 1e-9),
                                    1),
        "params": n_params, "input_shape": dims, "backend": "keras",
    }
    if fingerprint is not None:
        summary["fingerprint"] = fingerprint
    log.info("%s fold %d: %d meta-classes %s; val MAP@3 %.4f (%s)", spec["name"], fold, len(groups),
             meta["classes"], summary["val_map3"], ", ".join(f"{s} {v:.4f}" for s, v in per_source.items()))
    return FoldResult(oof=oof, test=test, summary=summary)
