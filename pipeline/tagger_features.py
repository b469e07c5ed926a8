"""Features of new clips for the tagger (:mod:`pipeline.tagger`), computed in
memory with the training run's settings and the feature stage's own code.

Where "exactly the training run's parameters" come from: the feature cache
folder the model read, ``features/<name>-<key>/params.json``. That file is
written by :class:`pipeline.cache.FeatureStore` when the folder is made and
holds every setting the cache key hashes (the feature's settings with every
default filled in, the shared preprocessing ``trim_top_db`` /
``silence_peak``, the feature code's version), and the folder name is the
hash of exactly that: the arrays the model trained on were computed from it
and nothing else. The logged configs (``logs/<run>/<stage>.config.yaml``)
say what a stage was asked to run with, not which cache folder a given
model's folds read (a later run may have other settings, and a stage that
found a model up to date did not retrain it); the tagger uses them only to
find that folder, and only a config whose recomputed fold fingerprint equals
the one in every fold's ``summary.json`` (:mod:`pipeline.tagger_manifest`).
Here the store is rebuilt from params.json: features made by another
version of the feature code (``FEATURE_VERSION``, bumped whenever a
computation changes) are refused rather than silently computed otherwise.

Each clip goes through the feature stage's steps (:func:`pipeline.extraction._process_clips`):
:func:`pipeline.audio.read_audio`, :func:`pipeline.audio.preprocess` once per
(sample rate, trim, silence) setting, :func:`pipeline.spectral.compute_feature`
with the store's ``compute_params()``, stored in the store's dtype. Nothing
is written: the arrays live in :class:`MemoryStore` objects that offer the
reading side of a feature store, so the trainer's clip prediction, the
handcrafted statistics and the stacker's MFCC statistics read them exactly as
they read the training cache.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio import AudioError, preprocess, read_audio
from pipeline.cache import FeatureStore
from pipeline.cli import UserError
from pipeline.spectral import FEATURE_VERSION, compute_feature
from pipeline.workdir import WorkDir, read_json

log = logging.getLogger("tagger")

#: (feature name, cache key): one cached feature of the run
FeatureRef = tuple[str, str]


def feature_dir(root: Path, name: str, key: str) -> Path:
    """Where feature ``name`` with cache key ``key`` lives under a work directory or an exported tagger."""
    return Path(root) / "features" / f"{name}-{key}"


def open_feature(root: Path, name: str, key: str) -> FeatureStore:
    """The cached feature's store, rebuilt from its ``params.json`` (see the module doc) and checked:
    made by this feature code (``version``), settings today's schema accepts, ``stats.json`` there.

    Today's code may spell the same settings into another key (a new setting with a default,
    a schema change); the arrays are still computed from the run's settings, and a warning
    says so. The store keeps the folder's key and reads its statistics."""
    folder = feature_dir(root, name, key)
    params = read_json(folder / "params.json")
    if params is None:
        raise UserError(f"{folder / 'params.json'} is missing: the feature cache of the run is incomplete "
                        "(run `python -m pipeline.features` on the work directory, or export it again)")
    if params.get("version") != FEATURE_VERSION:
        raise UserError(f"{folder}: computed by feature code version {params.get('version')}, this code is version "
                        f"{FEATURE_VERSION} (it computes features differently): tag with the code that trained the "
                        "run, or retrain it (./run_all.sh)")
    try:
        store = FeatureStore(WorkDir(root), name, params["feature"], params["audio"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{folder / 'params.json'}: settings this code does not accept ({exc}): tag with the code "
                        "that trained the run") from None
    if store.key != key:
        log.warning("%s: today's code keys these settings as %s (its settings schema changed since the run); the "
                    "features are computed with the run's settings", folder, store.key)
        store.key, store.root = key, folder
    if store.stats() is None:
        raise UserError(f"{store.stats_path} is missing: run `python -m pipeline.features` on the work directory")
    return store


def open_embeddings_stats(root: Path, name: str, key: str) -> dict:
    """``stats.json`` of an embeddings store (``features/embeddings-<source>-<key>/``)."""
    path = feature_dir(root, name, key) / "stats.json"
    stats = read_json(path)
    if stats is None:
        raise UserError(f"{path} is missing: run `python -m pipeline.embeddings` on the work directory")
    return stats


_SPLITS = itertools.count()


def new_split() -> str:
    """A split name used by no other batch of this process (``tagging-<n>``)."""
    return f"tagging-{next(_SPLITS)}"


class MemoryStore:
    """The reading side of a :class:`~pipeline.cache.FeatureStore` (``name``,
    ``kind``, ``spec``, ``key``, ``root``, ``dtype``, ``load``, ``index``,
    ``length``, ``bad_reason``, ``stats``) over arrays held in memory, for
    clips that are not in the training cache.

    Each batch of clips gets a split name of its own (:func:`new_split`) and a
    store answers only for its split, so a cache keyed by split (the
    handcrafted statistics' memo) can never hand one batch's rows to another."""

    def __init__(self, name: str, key: str, kind: str, spec: dict, stats: dict | None,
                 arrays: dict[str, np.ndarray], dtype: str = "float32", split: str | None = None):
        self.name, self.key, self.kind, self.spec, self.dtype = name, key, kind, spec, dtype
        self._stats = stats
        self.arrays = arrays
        self.split = split or new_split()
        self.root = Path(f"<memory>/{name}-{key}")

    @classmethod
    def like(cls, store: FeatureStore, arrays: dict[str, np.ndarray], stats: dict | None = None,
             split: str | None = None) -> "MemoryStore":
        """A memory store with ``store``'s settings and statistics holding ``arrays``."""
        return cls(store.name, store.key, store.kind, store.spec, stats if stats is not None else store.stats(),
                   arrays, store.dtype, split)

    def _check(self, split: str) -> None:
        if split != self.split:
            raise KeyError(f"{self.name}: this in-memory store holds split {self.split!r}, not {split!r}")

    def index(self, split: str, refresh: bool = False) -> dict[str, dict]:
        self._check(split)
        return {f: {"shard": self.split, "start": 0, "stop": int(a.shape[0]), "id": None}
                for f, a in self.arrays.items()}

    def load(self, split: str, fname: str) -> np.ndarray:
        self._check(split)
        return self.arrays[fname]

    def length(self, split: str, fname: str) -> int:
        return int(self.load(split, fname).shape[0])

    def bad_reason(self, split: str, fname: str) -> dict | None:
        return None

    def stats(self) -> dict | None:
        return self._stats


def decode(source) -> tuple[np.ndarray, int, str]:
    """(mono float32 samples, rate, name for messages) of a file path or of a ``(y, sr)`` pair.

    A path goes through :func:`pipeline.audio.read_audio` (any format
    libsndfile reads; channels averaged); a pair is checked and averaged the
    same way. Raises :class:`~pipeline.audio.AudioError` (missing, unreadable, empty)."""
    if isinstance(source, tuple):
        y, sr = source
        y = np.asarray(y, dtype=np.float32)
        if y.ndim == 2:  # (samples, channels), soundfile's layout
            y = y.mean(axis=1) if y.shape[1] > 1 else y[:, 0]
        if y.ndim != 1:
            raise AudioError("<waveform>", "unreadable", f"expected (samples,) or (samples, channels), got {y.shape}")
        if y.size == 0:
            raise AudioError("<waveform>", "empty", "no samples")
        if not np.all(np.isfinite(y)):
            raise AudioError("<waveform>", "unreadable", "non-finite samples")
        if int(sr) <= 0:
            raise AudioError("<waveform>", "unreadable", f"sample rate {sr}")
        return np.ascontiguousarray(y), int(sr), "<waveform>"
    path = Path(source)
    if not path.is_file():
        raise AudioError(path, "missing", "no such file" if not path.exists() else "not a file")
    y, sr = read_audio(path)
    return y, sr, str(path)


class FeatureSet:
    """The cached features a tagger's models read, opened from ``root`` (a work
    directory or an exported tagger); :meth:`compute` turns one decoded clip
    into all of them at once, decoding and preprocessing once per setting."""

    def __init__(self, root: Path, refs: list[FeatureRef]):
        self.stores: dict[FeatureRef, FeatureStore] = {}
        for name, key in refs:
            if (name, key) not in self.stores:
                self.stores[(name, key)] = open_feature(root, name, key)
        self.stats = {ref: store.stats() for ref, store in self.stores.items()}

    def compute(self, y: np.ndarray, sr: int, path: str) -> dict[FeatureRef, np.ndarray]:
        """Every feature of one decoded clip (raises :class:`~pipeline.audio.AudioError` for a silent
        clip or one that is empty after trimming, as the feature stage does)."""
        prepared: dict[tuple, np.ndarray] = {}
        out = {}
        for ref, store in self.stores.items():
            audio = store.params["audio"]
            how = (store.sr, audio["trim_top_db"], audio["silence_peak"])
            if how not in prepared:
                prepared[how] = preprocess(y, sr, store.sr, trim_top_db=audio["trim_top_db"],
                                           silence_peak=audio["silence_peak"], path=path)
            arr = compute_feature(store.kind, prepared[how], store.sr, store.compute_params())
            out[ref] = np.asarray(arr, dtype=store.dtype)  # the cache holds the store's dtype (write_shard)
        return out

    def batch(self, ids: list[str], arrays: dict[FeatureRef, dict[str, np.ndarray]]) -> "ClipBatch":
        """The usable clips ``ids`` of one batch with their features (feature -> clip id -> array),
        one :class:`MemoryStore` per feature, all under one new split."""
        split = new_split()
        return ClipBatch(list(ids), split, {ref: MemoryStore.like(store, arrays.get(ref, {}), self.stats[ref], split)
                                            for ref, store in self.stores.items()})


@dataclass
class ClipBatch:
    """Usable clips of one batch (``ids``, in order) and their features, what a
    level-1 predictor reads: ``stores[(name, key)].load(split, id)``."""
    ids: list[str]
    split: str
    stores: dict[FeatureRef, MemoryStore]

    def store(self, ref) -> MemoryStore:
        return self.stores[tuple(ref)]
