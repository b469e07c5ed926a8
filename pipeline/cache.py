"""On-disk feature cache, in a folder keyed by a hash of every parameter
that shapes the arrays (``features/<name>-<hash>/``).

Clips are stored in shards: each worker task writes one ``.npy`` holding its
clips' arrays concatenated on axis 0, plus an index (``.index.json``: fname,
length, and the bad clips with their reason) written last. Why: creating a
file costs ~1 ms on this kind of disk, far more than computing a short clip's
log-mel, so one file per clip would cap the stage's speed. Clips keep their
own lengths; a shard is memory-mapped so training reads only the windows it
needs. Both files are written to a temp name and renamed, and a shard counts
only once its index exists, so an interrupted run never leaves a half-written
shard that is read as valid; the next run recomputes just the missing clips.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pydantic import ValidationError

from pipeline.config import ConfigError
from pipeline.fingerprints import param_hash
from pipeline.settings import Audio, describe_error
from pipeline.spectral import FEATURE_VERSION, VGGISH_SR
from pipeline.workdir import WorkDir, atomic_write_json, atomic_write_npy, read_json


def feature_settings(name: str, spec: dict) -> dict:
    """A feature's settings with every default of its kind filled in (the cache key hashes all of them)."""
    from pipeline.settings import FEATURE_KINDS
    kind = spec.get("kind", name)
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"features.{name}.kind: unknown feature kind {kind!r} (known: {', '.join(FEATURE_KINDS)})")
    try:
        return FEATURE_KINDS[kind].model_validate({**spec, "kind": kind}).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"features.{name}.{describe_error(exc, model=FEATURE_KINDS[kind])}") from None


def feature_key_params(spec: dict, audio_cfg: dict) -> dict:
    """Everything the array depends on: the feature's own settings, the
    shared preprocessing and the code version."""
    try:
        audio = Audio.model_validate(audio_cfg or {}).model_dump()  # the defaults fill a partial section
    except ValidationError as exc:
        raise ConfigError(f"audio.{describe_error(exc, model=Audio)}") from None
    return {"feature": spec, "audio": {k: audio[k] for k in ("trim_top_db", "silence_peak")},
            "version": FEATURE_VERSION}


class FeatureStore:
    """Read/write access to one feature's cache folder."""

    def __init__(self, work: WorkDir, name: str, spec: dict, audio_cfg: dict):
        self.name = name
        self.spec = self.settings(name, spec)
        self.kind = self.spec["kind"]
        self.params = feature_key_params(self.spec, audio_cfg)
        self.key = param_hash(self.params)
        self.root = work.features_dir(name, self.key)
        self._index: dict[str, dict] = {}
        self._maps: dict[Path, np.ndarray] = {}

    def settings(self, name: str, spec: dict) -> dict:
        """The settings the key hashes: a configured feature's, every default of its kind filled in."""
        return feature_settings(name, spec)

    def __getstate__(self):  # sent to worker processes without open memory maps
        state = self.__dict__.copy()
        state["_index"], state["_maps"] = {}, {}
        return state

    @property
    def sr(self) -> int:
        return int(self.spec["sr"]) if self.kind != "vggish" else VGGISH_SR

    @property
    def dtype(self) -> str:
        return self.spec.get("dtype", "float32")  # vggish frames have no setting

    def train_split(self, fold: int) -> str:
        """Where fold ``fold`` reads its training and held-out clips (stores
        with per-fold contents, like embeddings, override these two)."""
        return "train"

    def test_split(self, fold: int) -> str:
        return "test"

    def compute_params(self) -> dict:
        """Arguments for :func:`pipeline.spectral.compute_feature`."""
        return {k: v for k, v in self.spec.items() if k not in ("kind", "sr", "dtype")}

    def ensure_dir(self) -> None:
        for split in ("train", "test"):
            (self.root / split).mkdir(parents=True, exist_ok=True)
        if not (self.root / "params.json").exists():
            atomic_write_json(self.params, self.root / "params.json")

    # -- writing -----------------------------------------------------------
    def write_shard(self, split: str, arrays: dict[str, np.ndarray], bad: dict[str, dict],
                    ids: dict[str, list] | None = None) -> Path:
        """Store one task's clips: ``arrays`` fname -> array, ``bad`` fname -> {reason, detail};
        ``ids`` fname -> the audio file's identity (size, mtime_ns) it was computed from."""
        names = list(arrays) + list(bad)
        ids = {f: list(ids[f]) for f in names if f in ids} if ids else {}
        shard = self.root / split / f"shard-{param_hash([sorted(names), sorted(ids.items())], 16)}"
        lengths = [int(a.shape[0]) for a in arrays.values()]
        if arrays:
            data = np.concatenate([np.asarray(a, dtype=self.dtype) for a in arrays.values()], axis=0)
            atomic_write_npy(shard.with_suffix(".npy"), data)
        atomic_write_json({"fnames": list(arrays), "lengths": lengths, "bad": bad, "ids": ids,
                           "written_ns": time.time_ns()}, shard.with_suffix(".index.json"))
        return shard

    # -- reading -----------------------------------------------------------
    def index(self, split: str, refresh: bool = False) -> dict[str, dict]:
        """fname -> {"shard", "start", "stop", "id", "index"} or {"bad": {reason, detail}, "id", "index"}

        A clip recomputed after its audio file changed sits in a newer shard;
        the newest shard's entry wins."""
        if refresh or split not in self._index:
            entries: dict[str, dict] = {}
            folder = self.root / split
            metas = []
            for idx_path in sorted(folder.glob("shard-*.index.json")) if folder.is_dir() else []:
                meta = read_json(idx_path)
                metas.append((meta.get("written_ns", 0), idx_path.name, idx_path, meta))
            for _, _, idx_path, meta in sorted(metas, key=lambda m: (m[0], m[1])):
                npy = idx_path.with_name(idx_path.name.replace(".index.json", ".npy"))
                ids = meta.get("ids", {})
                offset = 0
                for fname, length in zip(meta["fnames"], meta["lengths"]):
                    entries[fname] = {"shard": npy, "start": offset, "stop": offset + length, "id": ids.get(fname),
                                      "index": idx_path}
                    offset += length
                for fname, why in meta.get("bad", {}).items():
                    entries[fname] = {"bad": why, "id": ids.get(fname), "index": idx_path}
            self._index[split] = entries
        return self._index[split]

    def is_done(self, split: str, fname: str, ident=None) -> bool:
        """Cached, and (with ``ident``) computed from the audio file as it is now."""
        entry = self.index(split).get(fname)
        if entry is None:
            return False
        return ident is None or entry.get("id") == list(ident)

    def prune(self, split: str) -> int:
        """Delete shards none of whose clips is current any more (every clip
        was recomputed into a newer shard). Returns the number removed."""
        current = {e["index"] for e in self.index(split, refresh=True).values()}
        removed = 0
        for idx_path in sorted((self.root / split).glob("shard-*.index.json")):
            if idx_path not in current:
                idx_path.unlink()
                idx_path.with_name(idx_path.name.replace(".index.json", ".npy")).unlink(missing_ok=True)
                removed += 1
        if removed:
            self.index(split, refresh=True)
        return removed

    def bad_reason(self, split: str, fname: str) -> dict | None:
        return self.index(split).get(fname, {}).get("bad")

    def load(self, split: str, fname: str) -> np.ndarray:
        """The clip's array, a view into a memory-mapped shard."""
        entry = self.index(split).get(fname)
        if entry is None:
            raise FileNotFoundError(f"{self.root / split}: no {self.name} feature for {fname}: "
                                    "run `python -m pipeline.features` first")
        if "bad" in entry:
            raise ValueError(f"{fname} ({split}) has no {self.name} feature: "
                             f"{entry['bad']['reason']} {entry['bad'].get('detail', '')}")
        mm = self._maps.get(entry["shard"])
        if mm is None:
            mm = self._maps[entry["shard"]] = np.load(entry["shard"], mmap_mode="r")
        return mm[entry["start"]:entry["stop"]]

    def length(self, split: str, fname: str) -> int:
        entry = self.index(split)[fname]
        return entry["stop"] - entry["start"]

    # -- normalisation statistics -------------------------------------
    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"

    def stats(self) -> dict | None:
        """Per-channel mean and std over training clips (label-free, so
        sharing them across folds leaks nothing a model could exploit)."""
        return read_json(self.stats_path)

    def compute_stats(self, fnames: list[str], max_clips: int = 500, seed: int = 0, split: str = "train",
                      source: str | None = None) -> dict:
        """Mean/std per last-axis channel (per mel band x channel collapsed
        to per channel for 3D arrays) over up to ``max_clips`` clips."""
        rng = np.random.default_rng(seed)
        pick = list(fnames)
        if len(pick) > max_clips:
            pick = list(rng.choice(pick, size=max_clips, replace=False))
        if not pick:
            raise ValueError(f"no usable training clips to compute {self.name} statistics")
        total = sq = 0.0
        count = 0
        for fname in pick:
            arr = np.asarray(self.load(split, fname), dtype=np.float64)
            flat = arr.reshape(-1, arr.shape[-1])  # (frames [x bands], channels)
            total = total + flat.sum(axis=0)
            sq = sq + (flat ** 2).sum(axis=0)
            count += flat.shape[0]
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-12))
        if self.kind == "wave":  # waveforms are already peak-normalised
            mean, std = np.zeros(1), np.ones(1)
        stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "clips": len(pick),
                 "source": source}
        atomic_write_json(stats, self.stats_path)
        return stats


def feature_stores(work: WorkDir, cfg: dict, names: list[str] | None = None) -> dict[str, FeatureStore]:
    feats = cfg["features"]
    names = names if names is not None else list(feats)
    unknown = [n for n in names if n not in feats]
    if unknown:
        raise KeyError(f"feature(s) {unknown} not defined in the preset's features section")
    return {n: FeatureStore(work, n, feats[n], cfg["audio"]) for n in names}


def describe(store: FeatureStore) -> str:
    return f"{store.name} ({store.kind}, key {store.key}): {json.dumps(store.spec, sort_keys=True)}"
