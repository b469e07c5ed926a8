"""The shared fold trainer every model uses.

One fold = train on the other folds' clips with random-offset windows,
evaluate the held-out clips after every epoch with the clip-level MAP@3
(sliding windows combined by geometric mean), reduce the learning rate on a
plateau of that score, stop early, keep the best weights (``best.keras``).
Then predict the held-out clips (out-of-fold) and the test clips.

Everything that varies between models comes from the model's config; the
trainer never special-cases a model. Each epoch ends with a checkpoint
(``last.npz`` + ``state.json``), so an interrupted fold resumes from its
last finished epoch; batch randomness is seeded by (seed, fold, epoch), so a
resumed run draws the same batches as an uninterrupted one.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from models import load_model as load_saved_model  # imports custom layers first
from pipeline.augment import balanced_sample_weights, mixup, smoothed_targets, spec_augment
from pipeline.config import param_hash
from pipeline.losses import TaggingCrossEntropy
from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import EPS, normalize_rows
from pipeline.sampling import balanced_batch_size, balanced_order, check_batch_policy
from pipeline.windows import random_window, sliding_windows
from pipeline.workdir import atomic_write_bytes, atomic_write_csv, atomic_write_json, read_json

log = logging.getLogger("trainer")


def set_determinism(seed: int, strict: bool = False) -> None:
    """Seed every RNG (Python, numpy, backend), so the same config on the same
    machine gives the same predictions within float tolerance. ``strict``
    also turns on TensorFlow's op determinism (bit-exact, but it halves CPU
    training speed here, measured 37 vs 73 samples/s for cnn_ref)."""
    keras.utils.set_random_seed(int(seed))
    if strict and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:  # older TF: best effort
            pass


class Normalizer:
    """Per-channel standardisation with the feature's cached statistics."""

    def __init__(self, stats: dict | None):
        self.mean = np.asarray(stats["mean"], dtype=np.float32) if stats else None
        self.std = np.asarray(stats["std"], dtype=np.float32) if stats else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mean is None:
            return x
        return (x - self.mean) / self.std


@dataclass
class TrainRows:
    """The clips one model trains on, with their (possibly soft) targets."""
    fnames: list[str]
    labels: np.ndarray            # int class index
    epsilon: np.ndarray           # per-row label smoothing
    verified: np.ndarray          # 0/1, used by loss masking
    split: str = "train"


class WindowBatches:
    """Random-crop training batches, with augmentation and targets.

    The epoch is set from outside (``set_epoch``) and seeds all randomness,
    so batches are reproducible and a resumed run continues identically.
    """

    def __init__(self, store, rows: TrainRows, n_classes: int, window: int, train_cfg: dict,
                 normalizer: Normalizer, seed: int):
        self.store, self.rows, self.n_classes, self.window = store, rows, n_classes, window
        self.cfg, self.normalizer, self.seed = train_cfg, normalizer, seed
        # batch_policy "balanced": one clip of every class per batch (batch size = classes present)
        self.policy = check_batch_policy(train_cfg.get("batch_policy"))
        self.batch_size = (balanced_batch_size(rows.labels) if self.policy == "balanced"
                           else int(train_cfg.get("batch_size", 32)))
        steps = train_cfg.get("steps_per_epoch")
        self.steps = int(steps) if steps else max(1, math.ceil(len(rows.fnames) / self.batch_size))
        self.class_weight = (balanced_sample_weights(rows.labels, n_classes)
                             if train_cfg.get("class_weight") == "balanced" else None)
        self.mask_ratio = train_cfg.get("loss_masking")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        if self.policy == "balanced":
            self.order = balanced_order(self.rows.labels, self.steps, rng)
            return
        n_draw = self.steps * self.batch_size
        reps = -(-n_draw // len(self.rows.fnames))
        self.order = np.concatenate([rng.permutation(len(self.rows.fnames)) for _ in range(reps)])[:n_draw]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, idx: int):
        rng = np.random.default_rng([self.seed, self.epoch, idx, 1])
        pick = self.order[idx * self.batch_size:(idx + 1) * self.batch_size]
        x = np.stack([random_window(self.store.load(self.rows.split, self.rows.fnames[i]), self.window, rng)
                      for i in pick])
        x = self.normalizer(x)
        y = smoothed_targets(self.rows.labels[pick], self.n_classes, self.rows.epsilon[pick])
        verified = self.rows.verified[pick].astype(np.float32)
        sa = self.cfg.get("spec_augment")
        if sa and x.ndim >= 3 and x.shape[2] > 1:
            x = spec_augment(x, rng, **sa)
        x, y, verified = mixup(x, y, float(self.cfg.get("mixup_alpha") or 0.0), rng, verified)
        if self.mask_ratio is not None:
            y = np.concatenate([y, verified[:, None]], axis=1)
        if self.class_weight is not None:
            return x, y, self.class_weight[pick]
        return x, y


def predict_fixed_batches(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Predict in batches of one fixed shape (the last one padded), so the
    compiled predict function is traced once instead of once per size."""
    n = len(x)
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        out.append(np.asarray(model.predict_on_batch(chunk))[: min(batch_size, n - start)])
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), dtype=np.float32)


def predict_clips(model, store, split: str, fnames: list[str], window: int, hop: int,
                  normalizer: Normalizer, batch_size: int = 128, max_windows: int = 4096) -> np.ndarray:
    """Clip-level probabilities: every clip's sliding windows, predicted in
    large batches across clips, combined per clip by geometric mean."""
    out = np.zeros((len(fnames), model.output_shape[-1]), dtype=np.float64)
    pending, owners, first = [], [], 0

    def flush(upto: int):
        nonlocal pending, owners, first
        if not pending:
            return
        x = normalizer(np.concatenate(pending))
        probs = predict_fixed_batches(model, x, batch_size)
        logp = np.log(np.clip(probs.astype(np.float64), EPS, 1.0))
        owner = np.concatenate(owners)
        sums = np.zeros((upto - first, logp.shape[1]))
        np.add.at(sums, owner - first, logp)
        counts = np.bincount(owner - first, minlength=upto - first)[:, None]
        mean = sums / counts
        out[first:upto] = np.exp(mean - mean.max(axis=1, keepdims=True))
        pending, owners, first = [], [], upto

    n_pending = 0
    for i, fname in enumerate(fnames):
        wins = sliding_windows(store.load(split, fname), window, hop)
        pending.append(wins)
        owners.append(np.full(len(wins), i))
        n_pending += len(wins)
        if n_pending >= max_windows:
            flush(i + 1)
            n_pending = 0
    flush(len(fnames))
    return normalize_rows(out)


@dataclass
class FoldResult:
    oof: np.ndarray
    test: np.ndarray | None
    summary: dict = field(default_factory=dict)


def _seed_generators(model) -> list:
    """The random-number states of stochastic layers (Dropout, ...), in a
    stable order; saved beside the checkpoint so a resumed fold draws the
    same dropout masks as an uninterrupted one."""
    gens = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for attr in ("seed_generator", "_seed_generator"):
            gen = getattr(layer, attr, None)
            if gen is not None and hasattr(gen, "state"):
                gens.append(gen)
    return gens


def fresh_model(spec: dict, input_shape: tuple, n_classes: int, cache: dict | None = None):
    """A compiled model with fresh initial weights.

    Compiling a train step traces a graph, which costs seconds to tens of
    seconds per model on this CPU (measured: inception2d 34 s, wave1d 16 s)
    — per fold, more than the training itself on small data. With a
    ``cache`` (one dict per stage run), the model compiled for the first fold
    is reused: a freshly built copy (same seeded initialisation as a new
    model) lends its weights and RNG states, and the optimizer state is
    zeroed, which is what a new Adam starts from."""
    from models import build_model
    key = param_hash({"builder": spec["builder"], "params": spec.get("params", {}), "shape": list(input_shape),
                      "classes": n_classes, "train": spec["train"]})
    if cache is None or key not in cache:
        model = build_compiled(spec, input_shape, n_classes)
        if cache is not None:
            cache.clear()  # one model at a time: keep memory flat
            cache[key] = model
        return model
    model = cache[key]
    template = build_model(spec["builder"], input_shape, n_classes, **spec.get("params", {}))
    model.set_weights(template.get_weights())
    for mine, theirs in zip(_seed_generators(model), _seed_generators(template)):
        mine.state.assign(theirs.state.value)
    if model.optimizer.built:
        for v in model.optimizer.variables:
            v.assign(keras.ops.zeros_like(v))
    model.optimizer.learning_rate.assign(float(spec["train"].get("lr", 1e-3)))
    return model


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_weights(model, path: Path) -> None:
    atomic_write_bytes(path, _npz_bytes({f"w{i}": w for i, w in enumerate(model.get_weights())}))


def load_weights(model, path: Path) -> None:
    with np.load(path) as saved:
        model.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])


def save_checkpoint(model, path: Path) -> None:
    """Everything a resumed epoch needs: weights, optimizer state and the
    dropout RNG states, as one ``.npz`` (writing a whole ``.keras`` archive
    every epoch cost seconds per epoch for the deeper models)."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"o{i}": np.asarray(keras.ops.convert_to_numpy(v.value))
                   for i, v in enumerate(model.optimizer.variables)})
    arrays.update({f"g{i}": np.asarray(keras.ops.convert_to_numpy(g.state.value))
                   for i, g in enumerate(_seed_generators(model))})
    atomic_write_bytes(path, _npz_bytes(arrays))


def load_checkpoint(model, path: Path) -> None:
    with np.load(path) as saved:
        n_w = sum(1 for k in saved.files if k.startswith("w"))
        model.set_weights([saved[f"w{i}"] for i in range(n_w)])
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        for i, v in enumerate(model.optimizer.variables):
            v.assign(saved[f"o{i}"])
        for i, g in enumerate(_seed_generators(model)):
            if f"g{i}" in saved.files:
                g.state.assign(saved[f"g{i}"])


class _EpochLoop:
    """Per-epoch work of one fold: seed the epoch's batches, set the learning
    rate, train on every batch, evaluate the held-out clips (clip-level
    MAP@3), keep the best weights, reduce the LR on a plateau, stop early,
    checkpoint the state.

    Batches go through ``train_on_batch`` rather than ``fit``: measured here,
    ``fit`` on a PyDataset ran at half the speed (73 vs 152 samples/s for
    cnn_ref) and kept a core busy between batches."""

    def __init__(self, model, spec, fold, state, batches, out_dir, progress, evaluate, val_labels):
        self.model = model
        self.spec, self.fold, self.state, self.batches = spec, fold, state, batches
        self.out_dir, self.progress, self.evaluate, self.val_labels = out_dir, progress, evaluate, val_labels
        self.tcfg = spec["train"]
        self.epochs = int(self.tcfg.get("epochs", 10))
        self.bar = None

    def run(self) -> None:
        while not self.state["finished"] and self.state["epoch"] + 1 < self.epochs:
            epoch = self.state["epoch"] + 1
            self.batches.set_epoch(epoch)
            self.model.optimizer.learning_rate.assign(self.state["lr"])
            losses = []
            t0 = time.perf_counter()
            with tqdm(total=len(self.batches), unit="batch", leave=False, disable=not self.progress,
                      desc=f"{self.spec['name']} fold {self.fold} epoch {epoch + 1}/{self.epochs}") as bar:
                for i in range(len(self.batches)):
                    batch = self.batches[i]
                    loss = self.model.train_on_batch(*batch[:2], sample_weight=batch[2] if len(batch) > 2 else None)
                    losses.append(float(np.asarray(loss if np.ndim(loss) == 0 else loss[0])))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            self.state["train_seconds"] += time.perf_counter() - t0
            self.end_epoch(epoch, float(np.mean(losses)))

    def end_epoch(self, epoch: int, loss: float) -> None:
        state, tcfg = self.state, self.tcfg
        state["train_samples"] += len(self.batches) * self.batches.batch_size
        val_probs = self.evaluate(self.model)
        score = map_at_3(self.val_labels, val_probs)
        state["history"].append({"epoch": epoch + 1, "loss": loss, "val_map3": score,
                                 "val_acc": accuracy(self.val_labels, val_probs), "lr": state["lr"]})
        if score > state["best"] + 1e-6:
            state.update(best=score, best_epoch=epoch, wait=0, lr_wait=0)
            save_weights(self.model, self.out_dir / "best.weights.npz")
        else:
            state["wait"] += 1
            state["lr_wait"] += 1
            if state["lr_wait"] >= int(tcfg.get("lr_patience", 3)):
                state["lr"] = max(float(tcfg.get("min_lr", 1e-6)), state["lr"] * float(tcfg.get("lr_factor", 0.5)))
                state["lr_wait"] = 0
        log.info("%s fold %d epoch %d/%d: loss %.4f val MAP@3 %.4f (best %.4f @ %d) lr %.2g", self.spec["name"],
                 self.fold, epoch + 1, self.epochs, loss, score, state["best"], state["best_epoch"] + 1, state["lr"])
        state["epoch"] = epoch
        if state["wait"] >= int(tcfg.get("early_stop_patience", 5)):
            log.info("%s fold %d: early stop (no gain for %d epochs)", self.spec["name"], self.fold, state["wait"])
            state["finished"] = True
        save_checkpoint(self.model, self.out_dir / "last.npz")
        atomic_write_json(state, self.out_dir / "state.json")


def _set_bn_momentum(model, momentum: float) -> None:
    """Short runs (the quick preset) take too few steps for BatchNorm's
    default 0.99 moving averages to settle, which makes held-out scores
    erratic; a lower momentum fixes that without changing the architecture."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def build_compiled(spec: dict, input_shape: tuple, n_classes: int):
    from models import build_model
    model = build_model(spec["builder"], input_shape, n_classes, **spec.get("params", {}))
    tcfg = spec["train"]
    if tcfg.get("bn_momentum") is not None:
        _set_bn_momentum(model, tcfg["bn_momentum"])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(tcfg.get("lr", 1e-3))),
                  loss=TaggingCrossEntropy(mask_ratio=tcfg.get("loss_masking")))
    return model


def train_fold(spec: dict, store, rows: TrainRows, val_fnames: list[str], val_labels: np.ndarray,
               test_fnames: list[str], n_classes: int, out_dir: Path, seed: int, fold: int,
               fingerprint: str, progress: bool = True, val_split: str = "train",
               test_split: str = "test", model_cache: dict | None = None,
               heldout_fnames: list[str] | None = None) -> FoldResult:
    """Train (or resume) one fold and predict its held-out and test clips.

    ``val_fnames``/``val_labels`` decide early stopping and the best epoch;
    the out-of-fold predictions are of ``heldout_fnames`` (default: the
    validation clips themselves, the papers' way)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = spec["train"]
    window = int(spec["window"])
    hop = max(1, int(round(window * float(tcfg.get("eval_hop_fraction", 0.5)))))
    normalizer = Normalizer(store.stats() if spec.get("normalize", True) else None)
    probe = store.load(rows.split, rows.fnames[0])
    input_shape = (window,) + tuple(probe.shape[1:])

    state = read_json(out_dir / "state.json")
    if state and state.get("fingerprint") != fingerprint:
        log.info("%s: settings changed since the last run, starting the fold afresh", out_dir)
        state = None
    set_determinism(seed * 1000 + fold, strict=bool(tcfg.get("strict_determinism", False)))
    model = fresh_model(spec, input_shape, n_classes, model_cache)
    if state and (out_dir / "last.npz").exists() and not state.get("finished"):
        load_checkpoint(model, out_dir / "last.npz")
        log.info("%s: resuming after epoch %d (best MAP@3 %.4f)", out_dir, state["epoch"] + 1, state["best"])
    else:
        state = {"fingerprint": fingerprint, "epoch": -1, "best": -1.0, "best_epoch": -1, "wait": 0,
                 "lr_wait": 0, "lr": float(tcfg.get("lr", 1e-3)), "history": [], "train_seconds": 0.0,
                 "train_samples": 0, "finished": False}
    batches = WindowBatches(store, rows, n_classes, window, tcfg, normalizer, seed=seed * 1000 + fold)
    eval_bs = int(tcfg.get("eval_batch_size", 128))

    _EpochLoop(model, spec, fold, state, batches, out_dir, progress,
               evaluate=lambda m: predict_clips(m, store, val_split, val_fnames, window, hop, normalizer, eval_bs),
               val_labels=val_labels).run()
    state["finished"] = True
    atomic_write_json(state, out_dir / "state.json")
    atomic_write_csv(pd.DataFrame(state["history"]), out_dir / "history.csv")

    best = model
    if (out_dir / "best.weights.npz").exists():
        load_weights(best, out_dir / "best.weights.npz")
        best.save(out_dir / "best.keras")  # the kept model, in Keras' format
    else:  # finished in an earlier run: the .keras file is already there
        best = load_saved_model(out_dir / "best.keras")
    if heldout_fnames is None or list(heldout_fnames) == list(val_fnames):
        oof = predict_clips(best, store, val_split, val_fnames, window, hop, normalizer, eval_bs)
        val_probs = oof
    else:
        oof = predict_clips(best, store, val_split, list(heldout_fnames), window, hop, normalizer, eval_bs)
        val_probs = predict_clips(best, store, val_split, val_fnames, window, hop, normalizer, eval_bs)
    test = (predict_clips(best, store, test_split, test_fnames, window, hop, normalizer, eval_bs)
            if test_fnames else None)
    summary = {
        "fold": fold, "fingerprint": fingerprint, "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"] + 1, "val_map3": map_at_3(val_labels, val_probs),
        "val_accuracy": accuracy(val_labels, val_probs), "train_clips": len(rows.fnames),
        "early_stopping_clips": len(val_fnames),
        "early_stopping_split": "heldout" if heldout_fnames is None or list(heldout_fnames) == list(val_fnames)
        else "inner",
        "train_seconds": round(state["train_seconds"], 2),
        "samples_per_second": round(state["train_samples"] / max(state["train_seconds"], 1e-9), 1),
        "params": int(best.count_params()), "input_shape": list(input_shape),
        "backend": keras.backend.backend(),
    }
    for leftover in ("last.npz", "best.weights.npz"):  # best.keras is what we keep
        if os.path.exists(out_dir / leftover):
            os.unlink(out_dir / leftover)
    return FoldResult(oof=oof, test=test, summary=summary)


def fold_fingerprint(spec: dict, store_key: str, labels_hash: str, folds_hash: str, seed: int,
                     data_hash: str = "") -> str:
    """Everything a fold's result depends on; a change retrains the fold:
    the model's settings, the feature cache's key, the training labels and
    smoothing, folds.csv, the seed, the backend, and ``data_hash`` (the
    clips' audio identity, the class list and the test clips in order)."""
    return param_hash({"spec": spec, "feature": store_key, "labels": labels_hash, "folds": folds_hash,
                       "seed": seed, "data": data_hash, "backend": keras.backend.backend()}, 16)
