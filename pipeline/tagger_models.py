"""Level-1 predictors of the tagger: one class per kind of model, one registry.

Each kind knows three things about a trained model: what it read in training
(:meth:`Level1Predictor.store_key`, the input key the fold fingerprint
hashes, computed as :func:`pipeline.fold_training.train_model` computes it),
what the tagger needs to run it (:meth:`~Level1Predictor.entry`: a JSON-able
manifest entry naming the per-fold files, the cached features it reads and
its inference settings; :meth:`~Level1Predictor.files`,
:meth:`~Level1Predictor.features`), and how to predict new clips with every
fold model (:meth:`~Level1Predictor.predict_folds`, the pipeline's own code
for its held-out and test clips). Combining the folds (geometric mean, the
class prior for unusable clips) is common to all kinds and lives in
:mod:`pipeline.tagger`.

Kinds today (:data:`PREDICTORS`, matched in this order):

- ``handcrafted``: ``stats_lgbm`` / ``stats_lr`` (``model.joblib`` per fold,
  clip statistics of cached features, :mod:`pipeline.handcrafted`);
- ``embeddings``: a network on per-fold embeddings (``embeddings_from``:
  ``mla``): fold k's clips are embedded by the source model's fold-k
  extractor (:mod:`pipeline.embedding_store`) and predicted by fold k's
  network, exactly as its test clips were;
- ``hierarchical``: two-level DNNs on each source's per-fold mean clip
  embedding, posteriors summed over sources (:mod:`pipeline.hierarchical`);
- ``network``: a Keras network on one cached feature (``best.keras`` per
  fold, sliding windows combined by geometric mean:
  :func:`pipeline.trainer.predict_clips`).

A new kind is one subclass registered with :func:`register_predictor`; a
model no registered kind handles is refused by name (:func:`predictor_for`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.cache import feature_stores
from pipeline.cli import UserError
from pipeline.fingerprints import param_hash
from pipeline.handcrafted import handcrafted_features, is_handcrafted
from pipeline.normalize import Normalizer
from pipeline.tagger_features import ClipBatch, FeatureRef, FeatureSet, MemoryStore, feature_dir, new_split
from pipeline.workdir import WorkDir

log = logging.getLogger("tagger")


def fold_files(model: str, n_folds: int, filename: str) -> list[str]:
    """``models/<model>/fold<k>/<filename>`` for every fold, relative to the work directory."""
    return [f"models/{model}/fold{k}/{filename}" for k in range(n_folds)]


def _load_network(path: Path, n_classes: int):
    from models import load_model
    model = load_model(path, compile=False)
    from pipeline.trainer import n_outputs_classes
    if n_outputs_classes(model) != n_classes:
        raise UserError(f"{path}: predicts {n_outputs_classes(model)} classes, the run has {n_classes}")
    return model


class Level1Predictor:
    """One kind of level-1 model. Subclasses set :attr:`kind` and implement the
    class methods (resolution, on a work directory) and the instance methods
    (prediction, from a work directory or an exported tagger: ``root``)."""

    kind: ClassVar[str] = ""

    # -- resolution (work directory + the logged settings) -------------------
    @classmethod
    def handles(cls, spec: dict) -> bool:
        """Whether a model entry (:func:`pipeline.config.model_config`) is of this kind."""
        raise NotImplementedError

    @classmethod
    def store_key(cls, cfg: dict, work: WorkDir, spec: dict) -> str:
        """The key of what the model read in training, as its fold fingerprint hashes it."""
        raise NotImplementedError

    @classmethod
    def entry(cls, cfg: dict, work: WorkDir, spec: dict, n_folds: int) -> dict:
        """The model's manifest entry: ``kind``, ``builder``, ``folds`` (per-fold files) and what
        :meth:`features` / :meth:`files` / the constructor read."""
        raise NotImplementedError

    @classmethod
    def features(cls, entry: dict) -> list[FeatureRef]:
        """The cached features (name, key) the model reads for a new clip."""
        raise NotImplementedError

    @classmethod
    def files(cls, entry: dict) -> list[str]:
        """Every file the model needs besides its features' params.json / stats.json, relative to ``root``."""
        return list(entry["folds"])

    # -- prediction ----------------------------------------------------------
    def __init__(self, root: Path, name: str, entry: dict, n_classes: int, features: FeatureSet):
        self.root, self.name, self.entry, self.n_classes = Path(root), name, entry, n_classes

    def predict_folds(self, batch: ClipBatch) -> list[np.ndarray]:
        """(len(batch.ids), K) class probabilities of every fold model, in fold order."""
        raise NotImplementedError


#: kind -> predictor class, in matching order (:func:`predictor_for`)
PREDICTORS: dict[str, type[Level1Predictor]] = {}


def register_predictor(cls: type[Level1Predictor]) -> type[Level1Predictor]:
    """Add a kind of level-1 model to :data:`PREDICTORS` (usable as a class decorator)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in PREDICTORS:
        raise ValueError(f"a predictor for kind {cls.kind!r} is already registered")
    PREDICTORS[cls.kind] = cls
    return cls


def predictor_for(model: str, spec: dict) -> type[Level1Predictor]:
    """The predictor class of model ``model``'s entry; refused by name when no kind handles it."""
    for cls in PREDICTORS.values():
        if cls.handles(spec):
            return cls
    raise UserError(f"model {model!r} (builder {spec.get('builder')!r}) is of a kind the tagger cannot run yet "
                    f"(it runs: {', '.join(PREDICTORS)}); add a predictor for it in pipeline/tagger_models.py")


def _ref(pair) -> FeatureRef:
    return (str(pair[0]), str(pair[1]))


@register_predictor
class HandcraftedPredictor(Level1Predictor):
    """``stats_lgbm`` / ``stats_lr``: each fold's fitted estimator (``model.joblib``) on the clip
    statistics of its cached features (:func:`pipeline.handcrafted.clip_statistics_matrix`,
    with the statistics settings the fold recorded)."""

    kind = "handcrafted"

    @classmethod
    def handles(cls, spec):
        return is_handcrafted(spec)

    @classmethod
    def _stores(cls, cfg, work, spec):
        return feature_stores(work, cfg, handcrafted_features(spec))

    @classmethod
    def store_key(cls, cfg, work, spec):
        return param_hash({n: st.key for n, st in cls._stores(cfg, work, spec).items()}, 16)

    @classmethod
    def entry(cls, cfg, work, spec, n_folds):
        stores = cls._stores(cfg, work, spec)
        return {"kind": cls.kind, "builder": spec["builder"], "folds": fold_files(spec["name"], n_folds, "model.joblib"),
                "features": [[n, st.key] for n, st in stores.items()]}

    @classmethod
    def features(cls, entry):
        return [_ref(f) for f in entry["features"]]

    def __init__(self, root, name, entry, n_classes, features):
        super().__init__(root, name, entry, n_classes, features)
        import joblib
        self.folds = []
        want = {n: k for n, k in self.features(entry)}
        for rel in entry["folds"]:
            record = joblib.load(self.root / rel)
            if record.get("features") != want or int(record.get("n_classes", -1)) != n_classes:
                raise UserError(f"{self.root / rel}: fitted on features {record.get('features')} with "
                                f"{record.get('n_classes')} classes, not {want} with {n_classes}: the fold does not "
                                f"belong to this run; retrain {name} (python -m pipeline.train --model {name})")
            self.folds.append(record)

    def predict_folds(self, batch):
        from pipeline.handcrafted import _full_proba, clip_statistics_matrix  # the fold's own probability columns
        stores = {name: batch.store((name, key)) for name, key in self.features(self.entry)}
        out = []
        for record in self.folds:
            s = record["settings"]
            Z = clip_statistics_matrix(stores, batch.split, batch.ids, stats=s["stats"],
                                       mfcc_deltas=bool(s["mfcc_deltas"]), delta_width=int(s["delta_width"]),
                                       length=bool(s["length"]))
            model = record["model"]
            out.append(_full_proba(model.predict_proba(Z), model.classes_, self.n_classes))
        return out


def source_entry(cfg: dict, work: WorkDir, source: str, n_folds: int) -> dict:
    """How a model on embeddings gets them for a new clip: the source model's feature, its
    patch length, normalisation and batch size (as :func:`pipeline.embedding_store.compute_embeddings`
    embeds clips), its fold models (the extractors) and the embeddings store the run wrote."""
    from pipeline.config import model_config
    from pipeline.embedding_store import open_embedding_store
    store = open_embedding_store(cfg, work, source)
    spec = model_config(cfg, source)
    return {"model": source, "feature": [store.source_store.name, store.source_store.key],
            "patch": int(spec["window"]), "normalize": bool(spec["normalize"]),
            "batch_size": int(spec["train"].get("eval_batch_size", 128)),
            "folds": fold_files(source, n_folds, "best.keras"), "store": [store.name, store.key]}


def source_files(src: dict) -> list[str]:
    store = feature_dir(Path(""), *src["store"])
    return list(src["folds"]) + [str(store / "params.json"), str(store / "stats.json")]


class SourceEmbedder:
    """A source model's per-fold extractors (:func:`pipeline.embedding_store.load_extractor`) and
    what :func:`~pipeline.embedding_store.embed_arrays` needs: fold k's embeddings of a batch's
    clips, exactly as the embeddings stage computed the run's."""

    def __init__(self, root: Path, src: dict, features: FeatureSet):
        from pipeline.embedding_store import load_extractor
        self.src = src
        work = WorkDir(root)  # an exported tagger keeps the work directory's layout for these files
        self.extractors = [load_extractor(work, src["model"], k) for k in range(len(src["folds"]))]
        self.normalizer = Normalizer(features.stats[_ref(src["feature"])] if src["normalize"] else None)

    def embed(self, fold: int, batch: ClipBatch) -> MemoryStore:
        """A memory store of fold ``fold``'s (n_patches, d) embeddings of every clip of ``batch``."""
        from pipeline.embedding_store import embed_arrays
        frames = batch.store(self.src["feature"])
        arrays = [frames.load(batch.split, i) for i in batch.ids]
        embs = embed_arrays(self.extractors[fold], arrays, self.normalizer, int(self.src["patch"]),
                            int(self.src["batch_size"]))
        name, key = self.src["store"]
        return MemoryStore(name, key, "embeddings", {}, None, dict(zip(batch.ids, embs)), split=new_split())


@register_predictor
class EmbeddingPredictor(Level1Predictor):
    """A network on per-fold embeddings (``embeddings_from: <source>``): for fold k, every
    clip is cut into the source's patches, normalised as the source trained, embedded by
    the source's fold-k extractor (:class:`SourceEmbedder`) and predicted by fold k's
    network with sliding windows over the embeddings, as its test clips were."""

    kind = "embeddings"

    @classmethod
    def handles(cls, spec):
        return bool(spec.get("embeddings_from"))

    @classmethod
    def store_key(cls, cfg, work, spec):
        from pipeline.embedding_store import open_embedding_store
        return open_embedding_store(cfg, work, spec["embeddings_from"]).key

    @classmethod
    def entry(cls, cfg, work, spec, n_folds):
        from pipeline.trainer import eval_window_hop
        window, hop = eval_window_hop(spec)
        return {"kind": cls.kind, "builder": spec["builder"], "folds": fold_files(spec["name"], n_folds, "best.keras"),
                "window": window, "hop": hop, "normalize": bool(spec["normalize"]),
                "batch_size": int(spec["train"]["eval_batch_size"]),
                "source": source_entry(cfg, work, spec["embeddings_from"], n_folds)}

    @classmethod
    def features(cls, entry):
        return [_ref(entry["source"]["feature"])]

    @classmethod
    def files(cls, entry):
        return list(entry["folds"]) + source_files(entry["source"])

    def __init__(self, root, name, entry, n_classes, features):
        super().__init__(root, name, entry, n_classes, features)
        from pipeline.tagger_features import open_embeddings_stats
        self.models = [_load_network(self.root / rel, n_classes) for rel in entry["folds"]]
        self.embedder = SourceEmbedder(self.root, entry["source"], features)
        # the network's own input statistics: the embeddings store's stats.json
        stats = open_embeddings_stats(self.root, *entry["source"]["store"])
        self.normalizer = Normalizer(stats if entry["normalize"] else None)

    def predict_folds(self, batch):
        from pipeline.trainer import predict_clips
        e = self.entry
        out = []
        for k, model in enumerate(self.models):
            store = self.embedder.embed(k, batch)
            out.append(predict_clips(model, store, store.split, batch.ids, int(e["window"]), int(e["hop"]),
                                     self.normalizer, int(e["batch_size"])))
        return out


@register_predictor
class HierarchicalPredictor(Level1Predictor):
    """``hierarchical`` (:mod:`pipeline.hierarchical`): for fold k and each source, the clip's
    mean embedding by the source's fold-k extractor (:class:`SourceEmbedder`,
    :func:`pipeline.hierarchical.clip_embeddings`) into fold k's two-level classifier of that
    source (``<source>.keras``, its standardisation built in,
    :func:`pipeline.hierarchical.predict_rows`); the sources' posteriors summed and
    normalised, as the fold predicted its test clips."""

    kind = "hierarchical"

    @classmethod
    def handles(cls, spec):
        from pipeline.hierarchical import is_hierarchical
        return is_hierarchical(spec)

    @classmethod
    def store_key(cls, cfg, work, spec):
        from pipeline.embedding_store import open_embedding_store
        from pipeline.hierarchical import stores_key
        return stores_key({src: open_embedding_store(cfg, work, src) for src in spec["hierarchy"]["sources"]})

    @classmethod
    def entry(cls, cfg, work, spec, n_folds):
        sources = list(spec["hierarchy"]["sources"])
        return {"kind": cls.kind, "builder": spec["builder"],
                "folds": [[f"models/{spec['name']}/fold{k}/{src}.keras" for src in sources] for k in range(n_folds)],
                "sources": [source_entry(cfg, work, src, n_folds) for src in sources]}

    @classmethod
    def features(cls, entry):
        return [_ref(src["feature"]) for src in entry["sources"]]

    @classmethod
    def files(cls, entry):
        return [f for fold in entry["folds"] for f in fold] + [f for src in entry["sources"] for f in source_files(src)]

    def __init__(self, root, name, entry, n_classes, features):
        super().__init__(root, name, entry, n_classes, features)
        self.models = [[_load_network(self.root / rel, n_classes) for rel in fold] for fold in entry["folds"]]
        self.embedders = [SourceEmbedder(self.root, src, features) for src in entry["sources"]]

    def predict_folds(self, batch):
        from pipeline.hierarchical import clip_embeddings, predict_rows
        out = []
        for k, models in enumerate(self.models):
            total = np.zeros((len(batch.ids), self.n_classes))
            for model, embedder in zip(models, self.embedders):
                store = embedder.embed(k, batch)
                total += predict_rows(model, clip_embeddings(store, store.split, batch.ids))
            out.append(total / total.sum(axis=1, keepdims=True))
        return out


@register_predictor
class NetworkPredictor(Level1Predictor):
    """A Keras network on one cached feature: each fold's ``best.keras`` predicts every clip's
    sliding windows in large fixed-shape batches, combined per clip by geometric mean
    (:func:`pipeline.trainer.predict_clips`, the function that predicted the test set)."""

    kind = "network"

    @classmethod
    def handles(cls, spec):
        import models
        return bool(spec.get("feature")) and spec.get("builder") in models.BUILDERS

    @classmethod
    def store_key(cls, cfg, work, spec):
        return feature_stores(work, cfg, [spec["feature"]])[spec["feature"]].key

    @classmethod
    def entry(cls, cfg, work, spec, n_folds):
        from pipeline.trainer import eval_window_hop
        window, hop = eval_window_hop(spec)
        return {"kind": cls.kind, "builder": spec["builder"], "folds": fold_files(spec["name"], n_folds, "best.keras"),
                "feature": [spec["feature"], cls.store_key(cfg, work, spec)], "window": window, "hop": hop,
                "normalize": bool(spec["normalize"]), "batch_size": int(spec["train"]["eval_batch_size"])}

    @classmethod
    def features(cls, entry):
        return [_ref(entry["feature"])]

    def __init__(self, root, name, entry, n_classes, features):
        super().__init__(root, name, entry, n_classes, features)
        self.models = [_load_network(self.root / rel, n_classes) for rel in entry["folds"]]
        self.normalizer = Normalizer(features.stats[self.features(entry)[0]] if entry["normalize"] else None)

    def predict_folds(self, batch):
        from pipeline.trainer import predict_clips
        e = self.entry
        store = batch.store(e["feature"])
        return [predict_clips(model, store, batch.split, batch.ids, int(e["window"]), int(e["hop"]),
                              self.normalizer, int(e["batch_size"])) for model in self.models]
