"""Level-1 predictors of the tagger: one class per kind of model, one registry.

Each kind knows three things about a trained model: what it may have read
in training and what the tagger then needs to run it
(:meth:`Level1Predictor.candidates`: the input key the fold fingerprint
hashes, as :func:`pipeline.fold_training.train_model` computes it, with a
JSON-able manifest entry naming the per-fold files, the cached features it
reads and its inference settings; :meth:`~Level1Predictor.files`,
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

import itertools
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Iterator

import numpy as np

from pipeline.cache import feature_stores
from pipeline.cli import UserError
from pipeline.fingerprints import param_hash
from pipeline.handcrafted import handcrafted_features, is_handcrafted
from pipeline.normalize import Normalizer
from pipeline.tagger_features import ClipBatch, FeatureRef, FeatureSet, MemoryStore, feature_dir, new_split
from pipeline.workdir import WorkDir

log = logging.getLogger("tagger")


def model_specs(cfg: dict, model: str) -> list[dict]:
    """Model ``model``'s settings (:func:`pipeline.config.model_config`) as the stage that logged
    ``cfg`` may have computed them: with today's code, then with today's code but the training
    section as logged (the model's overrides merged over the logged training section, not
    validated again: the logged config holds every default of the code that wrote it, and
    today's schema may add settings, or coerce values, the run's fingerprint never saw), then
    entirely as logged (when today's code refuses the entry). Empty when ``cfg`` does not
    define the model."""
    import copy

    from pipeline.config import deep_merge, model_config
    entry = (cfg.get("models") or {}).get(model)
    if not isinstance(entry, dict):
        return []
    logged_train = deep_merge(cfg.get("training") or {}, entry.get("train") or {})
    try:
        today = model_config(cfg, model)
    except Exception:  # settings today's code refuses
        logged = copy.deepcopy(entry)
        logged.update(train=logged_train, builder=entry.get("builder") or model, name=model)
        logged.setdefault("params", {})
        return [logged]
    specs = [today, {**today, "train": logged_train}]
    return specs[:1] if specs[0] == specs[1] else specs


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
    def candidates(cls, cfg: dict, work: WorkDir, spec: dict, n_folds: int) -> Iterator[tuple[str, dict]]:
        """(input key, manifest entry) of every input the model may have read in training: the key
        its fold fingerprint hashes (as :func:`pipeline.fold_training.train_model` computes it)
        and the entry that reads that input (``kind``, ``builder``, ``folds``: the per-fold files,
        and what :meth:`features` / :meth:`files` / the constructor read). The input today's code
        computes from ``cfg`` comes first, then those the work directory's caches hold: a cache
        whose key today's code computes differently still names the folder the folds read, and
        the fingerprint tells which one it was."""
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


def cached_keys(work: WorkDir, name: str) -> list[str]:
    """Keys of the cache folders ``features/<name>-<key>/`` (with a params.json) in the work directory, newest first."""
    pattern = re.compile(re.escape(name) + r"-([0-9a-f]{10})")
    found = []
    for d in (work.root / "features").glob(f"{name}-*"):
        m = pattern.fullmatch(d.name)
        if m and (d / "params.json").is_file():
            found.append((d.stat().st_mtime_ns, m.group(1)))
    return [k for _, k in sorted(found, reverse=True)]


def input_keys(computed, work: WorkDir, name: str) -> list[str]:
    """``computed()`` (the key today's code gives; skipped when it fails) then :func:`cached_keys`."""
    keys = []
    try:
        keys.append(computed())
    except Exception as exc:  # settings today's code refuses: the caches may still hold the run's
        log.debug("%s: no key from the settings (%s)", name, exc)
    return list(dict.fromkeys(keys + cached_keys(work, name)))


#: at most this many combinations of several inputs' keys are tried (handcrafted, hierarchical)
MAX_COMBINATIONS = 64


def combinations(options: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every choice of one key per name (at most :data:`MAX_COMBINATIONS`), first keys first."""
    names = list(options)
    return [dict(zip(names, combo)) for combo in itertools.islice(itertools.product(*options.values()),
                                                                     MAX_COMBINATIONS)]


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
    def candidates(cls, cfg, work, spec, n_folds):
        import joblib
        feats = handcrafted_features(spec)
        choices = []
        first = work.fold_dir(spec["name"], 0) / "model.joblib"
        if first.is_file():  # the fold records the caches it read
            recorded = joblib.load(first).get("features") or {}
            if set(recorded) == set(feats):
                choices.append({f: recorded[f] for f in feats})
        choices += combinations({f: input_keys(lambda f=f: feature_stores(work, cfg, [f])[f].key, work, f)
                                 for f in feats})
        for keys in map(dict, dict.fromkeys(tuple(c.items()) for c in choices)):
            yield param_hash(keys, 16), {"kind": cls.kind, "builder": spec["builder"],
                                         "folds": fold_files(spec["name"], n_folds, "model.joblib"),
                                         "features": [[f, keys[f]] for f in feats]}

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
        from pipeline.handcrafted import full_proba, clip_statistics_matrix  # the fold's own probability columns
        stores = {name: batch.store((name, key)) for name, key in self.features(self.entry)}
        out = []
        for record in self.folds:
            s = record["settings"]
            Z = clip_statistics_matrix(stores, batch.split, batch.ids, stats=s["stats"],
                                       mfcc_deltas=bool(s["mfcc_deltas"]), delta_width=int(s["delta_width"]),
                                       length=bool(s["length"]))
            model = record["model"]
            out.append(full_proba(model.predict_proba(Z), model.classes_, self.n_classes))
        return out


def source_entry(cfg: dict, work: WorkDir, source: str, key: str, n_folds: int) -> dict | None:
    """How a model on embeddings gets them for a new clip, from the embeddings store
    ``features/embeddings-<source>-<key>/`` the run wrote (its params.json: the source's
    feature cache, patch length and normalisation, as
    :func:`pipeline.embedding_store.compute_embeddings` embedded the clips), the source's
    batch size and its fold models (the extractors); None when that store is not there."""
    from pipeline.workdir import read_json
    params = (read_json(feature_dir(work.root, f"embeddings-{source}", key) / "params.json") or {}).get("feature")
    if not params:
        return None
    spec = model_specs(cfg, source)[-1]
    return {"model": source, "feature": [params["source_feature"], params["source_feature_key"]],
            "patch": int(params["patch"]), "normalize": bool(params["normalize"]),
            "batch_size": int(spec["train"].get("eval_batch_size", 128)),
            "folds": fold_files(source, n_folds, "best.keras"), "store": [f"embeddings-{source}", key]}


def embedding_keys(cfg: dict, work: WorkDir, source: str) -> list[str]:
    from pipeline.embedding_store import open_embedding_store
    return input_keys(lambda: open_embedding_store(cfg, work, source).key, work, f"embeddings-{source}")


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
    def candidates(cls, cfg, work, spec, n_folds):
        from pipeline.trainer import eval_window_hop
        window, hop = eval_window_hop(spec)
        for key in embedding_keys(cfg, work, spec["embeddings_from"]):
            source = source_entry(cfg, work, spec["embeddings_from"], key, n_folds)
            if source is not None:
                yield key, {"kind": cls.kind, "builder": spec["builder"],
                            "folds": fold_files(spec["name"], n_folds, "best.keras"), "window": window, "hop": hop,
                            "normalize": bool(spec["normalize"]), "batch_size": int(spec["train"]["eval_batch_size"]),
                            "source": source}

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
    def candidates(cls, cfg, work, spec, n_folds):
        from pipeline.hierarchical import stores_key
        sources = list(spec["hierarchy"]["sources"])
        folds = [[f"models/{spec['name']}/fold{k}/{src}.keras" for src in sources] for k in range(n_folds)]
        for keys in combinations({src: embedding_keys(cfg, work, src) for src in sources}):
            entries = [source_entry(cfg, work, src, keys[src], n_folds) for src in sources]
            if all(e is not None for e in entries):  # stores_key reads each store's key only
                yield (stores_key({src: SimpleNamespace(key=k) for src, k in keys.items()}),
                       {"kind": cls.kind, "builder": spec["builder"], "folds": folds, "sources": entries})

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
    def candidates(cls, cfg, work, spec, n_folds):
        from pipeline.trainer import eval_window_hop
        window, hop = eval_window_hop(spec)
        feat = spec["feature"]
        for key in input_keys(lambda: feature_stores(work, cfg, [feat])[feat].key, work, feat):
            yield key, {"kind": cls.kind, "builder": spec["builder"],
                        "folds": fold_files(spec["name"], n_folds, "best.keras"), "feature": [feat, key],
                        "window": window, "hop": hop, "normalize": bool(spec["normalize"]),
                        "batch_size": int(spec["train"]["eval_batch_size"])}

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
