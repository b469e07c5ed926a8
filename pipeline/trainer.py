"""The shared fold trainer every model uses.

One fold = train on the other folds' clips with random-offset windows,
evaluate the held-out clips after every epoch with the clip-level MAP@3
(sliding windows combined by geometric mean), reduce the learning rate on a
plateau of that score, stop early, keep the best weights (``best.keras``).
Then predict the held-out clips (out-of-fold) and the test clips.

Everything that varies between models comes from the model's config; the
trainer never special-cases a model. The batch loop drives a
``keras.callbacks.CallbackList``: the learning rate, early stopping, best
weights, the history table and the per-epoch checkpoint (``last.npz`` +
``state.json``) are callbacks (:mod:`pipeline.callbacks`), and
``training.callbacks`` adds more from the config. An interrupted fold
resumes from its last finished epoch; batch randomness is seeded by (seed,
fold, epoch) and the checkpoint holds the optimizer, dropout RNG and
callback states, so a resumed run ends exactly where an uninterrupted one does.

The loss is ``training.loss`` (:func:`pipeline.losses.make_losses`):
cross-entropy, the focal loss (``focal_alpha: balanced`` takes the fold's
training rows' class counts), or cross-entropy + ``triplet_weight`` x a
triplet loss on the model's ``embedding`` output. A triplet model is built
with ``embedding_output=True`` and trains on ``pairs`` batches (two clips of
each class, see :mod:`pipeline.sampling`); it predicts with its
``predictions`` output, and ``best.keras`` holds that output only, so a
saved fold model is a single-output probability model whatever the loss.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from models import load_model as load_saved_model  # imports custom layers first
from pipeline.batches import (EMBEDDING_OUTPUT, PROBS_OUTPUT, SlidingWindowBatches, TrainRows,  # noqa: F401
                              WindowBatches)  # (TrainRows, WindowBatches: re-exported, their home was here)
from pipeline.callbacks import (EPOCH_LOGS, EarlyStop, EpochHistory, EpochLog, FoldCheckpoint, KeepBest,
                                 PlateauLR, ProgressBar, TrainClock, config_callbacks, load_weights, renew_model,
                                 walk_layers)
from pipeline.config import model_settings, training_settings
from pipeline.fingerprints import param_hash
from pipeline.normalize import Normalizer
from pipeline.losses import EmbeddingTripletLoss, make_losses
from pipeline.metrics import accuracy, map_at_3
from pipeline.predictions import EPS, normalize_rows
from pipeline.prefetch import Prefetch, loader_options, without_loader_settings

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


def _probs_index(model) -> int:
    """Position of the class-probability output among a several-output model's outputs."""
    names = list(model.output_names)
    return names.index(PROBS_OUTPUT) if PROBS_OUTPUT in names else 0


def class_probabilities(model, outputs):
    """The class probabilities among what ``model`` predicted: the whole output of a one-output
    model, the ``predictions`` output of a model with several (a triplet model's embedding is
    for training only)."""
    if isinstance(outputs, dict):
        return outputs[PROBS_OUTPUT]
    if isinstance(outputs, (list, tuple)):
        return outputs[_probs_index(model)] if len(outputs) > 1 else outputs[0]
    return outputs


def n_outputs_classes(model) -> int:
    """Width of ``model``'s class-probability output."""
    shape = model.output_shape
    if isinstance(shape, dict):
        shape = shape[PROBS_OUTPUT]
    elif isinstance(shape, list):  # several outputs: one shape tuple each
        shape = shape[_probs_index(model)]
    return int(shape[-1])


def probability_model(model):
    """``model`` itself when its one output is the class probabilities, otherwise a model of the
    same layers (weights shared) with only the ``predictions`` output: what ``best.keras`` holds,
    so every user of a saved fold model gets one probability array."""
    if len(model.outputs) == 1:
        return model
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.outputs[_probs_index(model)], name=model.name)


def predict_fixed_batches(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Predict in batches of one fixed shape (the last one padded), so the
    compiled predict function is traced once instead of once per size.
    A model with several outputs gives its class probabilities (:func:`class_probabilities`)."""
    n = len(x)
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        probs = class_probabilities(model, model.predict_on_batch(chunk))
        out.append(np.asarray(probs)[: min(batch_size, n - start)])
    return np.concatenate(out) if out else np.zeros((0, n_outputs_classes(model)), dtype=np.float32)


def predict_clips(model, store, split: str, fnames: list[str], window: int, hop: int,
                  normalizer: Normalizer, batch_size: int = 128, max_windows: int = 4096, *,
                  workers: int = 0, depth: int | None = None) -> np.ndarray:
    """Clip-level probabilities: every clip's sliding windows, predicted in
    large batches across clips, combined per clip by geometric mean.

    The model batches are :class:`pipeline.batches.SlidingWindowBatches`: a
    group of clips' windows (``max_windows`` or more) cut into fixed-shape
    batches of ``batch_size`` (the last padded), so the compiled predict
    function is traced once. With ``workers`` > 0, that many threads read,
    cut and normalise the next batches (at most ``depth`` ahead) while the
    model predicts; the batches, and so the result, are the same with any
    number (0: each batch is made when the model needs it). A clip that
    cannot be read raises an error naming it."""
    out = np.zeros((len(fnames), n_outputs_classes(model)), dtype=np.float64)
    batches = SlidingWindowBatches(store, split, fnames, window, hop, normalizer, batch_size, max_windows)
    sums = None
    workers = max(0, min(workers, len(batches) - 1))  # no more workers than batches to make ahead
    with Prefetch(batches, workers, depth, kind="thread", name="predict") as loader:
        for i, x in enumerate(loader.map(range(len(batches)))):
            _, n_real, (first, end), last = batches.plan[i]
            probs = np.asarray(class_probabilities(model, model.predict_on_batch(x)))[:n_real]
            logp = np.log(np.clip(probs.astype(np.float64), EPS, 1.0))
            if sums is None:  # the first batch of a group of clips
                sums = np.zeros((end - first, logp.shape[1]))
            np.add.at(sums, batches.owners[i] - first, logp)  # in window order, as over the whole group
            if last:
                mean = sums / batches.counts[first:end, None]
                out[first:end] = np.exp(mean - mean.max(axis=1, keepdims=True))
                sums = None
    return normalize_rows(out)


@dataclass
class FoldResult:
    oof: np.ndarray
    test: np.ndarray | None
    summary: dict = field(default_factory=dict)


def fresh_model(spec: dict, input_shape: tuple, n_classes: int, cache: dict | None = None,
                class_counts=None):
    """A compiled model with fresh initial weights.

    Compiling a train step traces a graph, which costs seconds to tens of
    seconds per model on this CPU (measured: inception2d 34 s, wave1d 16 s)
    — per fold, more than the training itself on small data. With a
    ``cache`` (one dict per stage run), the model compiled for the first fold
    is reused: a freshly built copy (same seeded initialisation as a new
    model) lends its weights and RNG states, and the optimizer state is
    zeroed, which is what a new Adam starts from.

    ``class_counts`` (the fold's training rows per class) set the focal
    loss's ``focal_alpha: balanced``; the losses' settings are part of the
    cache key, so a fold whose alphas differ compiles its own model."""
    losses, _ = compile_losses(spec, n_classes, class_counts)
    key = param_hash({"builder": spec["builder"], "params": spec["params"], "shape": list(input_shape),
                      "classes": n_classes, "train": without_loader_settings(spec["train"]),
                      "losses": _loss_settings(losses)})
    if cache is None or key not in cache:
        model = build_compiled(spec, input_shape, n_classes, class_counts)
        if cache is not None:
            cache.clear()  # one model at a time: keep memory flat
            cache[key] = model
        return model
    model = cache[key]
    renew_model(model, _build(spec, input_shape, n_classes), spec["train"]["lr"])
    return model


def sample_weights(model, batch):
    """A batch's sample weights as ``train_on_batch`` takes them: ``None``, one array, or, for
    per-output weights (``{"predictions": w}``), a list in the model's output order with ``None``
    for the other outputs (Keras 3 matches a dict of weights to a list-output model by position,
    so a dict fails there)."""
    weights = batch[2] if len(batch) > 2 else None
    if isinstance(weights, dict):
        return [weights.get(name) for name in model.output_names]
    return weights


def _run_epochs(model, batches: "WindowBatches", callbacks, first: int, epochs: int, evaluate, val_labels,
                current_lr, loader: Prefetch | None = None) -> None:
    """Epochs ``first`` .. ``epochs - 1`` of one fold: seed the epoch's
    batches, train on every batch, evaluate the held-out clips (clip-level
    MAP@3), and let the callbacks act on the epoch's logs (``loss``,
    ``val_map3``, ``val_acc``, ``lr``: the rate this epoch trained with).
    A callback stops the fold with ``model.stop_training``.

    Batches go through ``train_on_batch`` rather than ``fit``: measured here,
    ``fit`` on a PyDataset ran at half the speed (73 vs 152 samples/s for
    cnn_ref) and kept a core busy between batches. ``loader`` (a
    :class:`pipeline.prefetch.Prefetch` over ``batches``) makes the epoch's
    batches ahead of the step in its workers; without one (or with 0
    workers) each batch is made here when its step comes. Either way batch
    ``i`` of epoch ``e`` is ``batches.make(e, i)``."""
    loader = loader if loader is not None else Prefetch(batches, 0)
    model.stop_training = False
    callbacks.on_train_begin()
    logs: dict = {}
    for epoch in range(first, epochs):
        batches.set_epoch(epoch)
        callbacks.on_epoch_begin(epoch)
        losses = []
        made = loader.map((epoch, i) for i in range(len(batches)))  # starts on the first next()
        try:
            for i in range(len(batches)):
                callbacks.on_train_batch_begin(i)
                batch = next(made)
                loss = model.train_on_batch(*batch[:2], sample_weight=sample_weights(model, batch))
                losses.append(float(np.asarray(loss if np.ndim(loss) == 0 else loss[0])))
                callbacks.on_train_batch_end(i, {"loss": losses[-1]})
        finally:
            made.close()  # nothing of this epoch stays queued (an exception: the caller closes the workers)
        val_probs = evaluate(model)
        values = (float(np.mean(losses)), map_at_3(val_labels, val_probs), accuracy(val_labels, val_probs),
                  current_lr())
        logs = dict(zip(EPOCH_LOGS, values))
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)


def _set_bn_momentum(model, momentum: float) -> None:
    """Short runs (the quick preset) take too few steps for BatchNorm's
    default 0.99 moving averages to settle, which makes held-out scores
    erratic; a lower momentum fixes that without changing the architecture."""
    for _path, layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def _build(spec: dict, input_shape: tuple, n_classes: int):
    """The model of ``spec``, with its ``embedding`` output when it trains with the triplet loss."""
    from models import build_model
    params = dict(spec["params"])
    if training_settings(spec["train"])["loss"] == "triplet":
        params["embedding_output"] = True
    return build_model(spec["builder"], input_shape, n_classes, **params)


def compile_losses(spec: dict, n_classes: int, class_counts=None):
    """``(loss, loss_weights)`` for ``model.compile`` from ``training.loss`` (:func:`make_losses`):
    one loss for cross-entropy and focal (no weights); for the triplet loss one per output,
    ``{"predictions": classification, "embedding": triplet}`` weighted 1 and ``triplet_weight``.
    The triplet loss reads the row's source (its clip, see :class:`WindowBatches`) and, for the
    ``paper`` strategy, the negatives drawn with numpy from its targets."""
    made = make_losses(spec["train"], n_classes, class_counts)
    if made["embedding"] is None:
        return made["classification"], None
    strategy = made["embedding"].strategy
    embedding = EmbeddingTripletLoss(margin=made["embedding"].margin, strategy=strategy, with_sources=True,
                                     normalize=made["embedding"].normalize,
                                     with_negatives=strategy == "paper")
    weights = made["loss_weights"]
    return ({PROBS_OUTPUT: made["classification"], EMBEDDING_OUTPUT: embedding},
            {PROBS_OUTPUT: float(weights["classification"]), EMBEDDING_OUTPUT: float(weights["embedding"])})


def _loss_settings(loss) -> dict:
    if isinstance(loss, dict):
        return {name: _loss_settings(v) for name, v in loss.items()}
    return {"class": type(loss).__name__, **loss.get_config()}


def build_compiled(spec: dict, input_shape: tuple, n_classes: int, class_counts=None):
    """A freshly built model, compiled with Adam and the loss of ``training.loss``
    (``class_counts``: the training rows per class, for ``focal_alpha: balanced``)."""
    spec = model_settings(spec)
    model = _build(spec, input_shape, n_classes)
    tcfg = spec["train"]
    if tcfg["bn_momentum"] is not None:
        _set_bn_momentum(model, tcfg["bn_momentum"])
    loss, loss_weights = compile_losses(spec, n_classes, class_counts)
    if loss_weights is None:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(tcfg["lr"])), loss=loss)
    else:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(tcfg["lr"])), loss=loss,
                      loss_weights=loss_weights)
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
    spec = model_settings(spec)
    tcfg = spec["train"]
    label = f"{spec['name']} fold {fold}"  # folds are 0-based everywhere
    extra = config_callbacks(tcfg["callbacks"], out_dir)  # a bad entry fails before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    window = int(spec["window"])
    hop = max(1, int(round(window * float(tcfg["eval_hop_fraction"]))))
    normalizer = Normalizer(store.stats() if spec["normalize"] else None)
    probe = store.load(rows.split, rows.fnames[0])
    input_shape = (window,) + tuple(probe.shape[1:])

    # the batches first: a batch policy the loss cannot train with fails before the model compiles
    batches = WindowBatches(store, rows, n_classes, window, tcfg, normalizer, seed=seed * 1000 + fold)
    # how batches are made (workers, queue depth, threads or processes): never what they hold
    loading = loader_options(tcfg, getattr(store, "kind", None))
    workers, depth = loading["workers"], loading["depth"]
    # the workers live for the fold; an exception or Ctrl-C stops them before it propagates, and the
    # checkpoint of the last finished epoch (written at its end) is left as it was
    with Prefetch(batches, workers, depth, kind=loading["kind"], name=f"{spec['name']}-fold{fold}") as loader:
        if loading["kind"] == "process":
            loader.start()  # worker processes start (import numpy and the store's modules) while the model builds
        class_counts = np.bincount(np.asarray(rows.labels, dtype=int), minlength=n_classes)
        set_determinism(seed * 1000 + fold, strict=bool(tcfg["strict_determinism"]))
        model = fresh_model(spec, input_shape, n_classes, model_cache, class_counts=class_counts)
        eval_bs = int(tcfg["eval_batch_size"])
        epochs = int(tcfg["epochs"])

        keep_best = KeepBest(out_dir / "best.weights.npz")
        plateau = PlateauLR(float(tcfg["lr"]), factor=float(tcfg["lr_factor"]),
                            patience=int(tcfg["lr_patience"]), min_lr=float(tcfg["min_lr"]))
        stop = EarlyStop(int(tcfg["early_stop_patience"]), label=label)
        history = EpochHistory(out_dir / "history.csv")
        clock = TrainClock(batches.batch_size)
        checkpoint = FoldCheckpoint(out_dir, fingerprint, [keep_best, plateau, stop, history, clock],
                                    kept=[keep_best.path, out_dir / "best.keras"])
        callbacks = keras.callbacks.CallbackList(
            [keep_best, plateau, EpochLog(label, keep_best, plateau), stop, clock, ProgressBar(label, progress),
             history, *extra, checkpoint],  # the checkpoint last: it records what the others decided
            model=model, epochs=epochs, steps=len(batches), verbose=0)
        if checkpoint.resume() and not checkpoint.finished:
            log.info("%s: resuming after epoch %d (best MAP@3 %.4f)", out_dir, checkpoint.epoch + 1,
                     keep_best.best)
        if not checkpoint.finished:
            if workers:
                log.info("%s: %d %s worker(s) make batches ahead (at most %d queued)", label, workers,
                         loading["kind"], depth)
            _run_epochs(model, batches, callbacks, checkpoint.epoch + 1, epochs,
                        evaluate=lambda m: predict_clips(m, store, val_split, val_fnames, window, hop, normalizer,
                                                         eval_bs, workers=workers, depth=depth),
                        val_labels=val_labels, current_lr=lambda: plateau.lr, loader=loader)
            checkpoint.finish()
        else:  # training finished in an earlier run: its table may not have been written
            history.write()

    best = model  # predicts its class probabilities (predict_clips), whatever its outputs
    if (out_dir / "best.weights.npz").exists():
        load_weights(best, out_dir / "best.weights.npz")
        probability_model(best).save(out_dir / "best.keras")  # the kept model, in Keras' format
    else:  # finished and saved in an earlier run, which stopped before its summary
        best = load_saved_model(out_dir / "best.keras")

    def predict(fnames: list[str], split: str) -> np.ndarray:
        return predict_clips(best, store, split, fnames, window, hop, normalizer, eval_bs, workers=workers,
                             depth=depth)

    if heldout_fnames is None or list(heldout_fnames) == list(val_fnames):
        oof = predict(val_fnames, val_split)
        val_probs = oof
    else:
        oof = predict(list(heldout_fnames), val_split)
        val_probs = predict(val_fnames, val_split)
    test = predict(test_fnames, test_split) if test_fnames else None
    summary = {
        "fold": fold, "fingerprint": fingerprint, "best_epoch": keep_best.best_epoch + 1,
        "epochs_run": checkpoint.epoch + 1, "val_map3": map_at_3(val_labels, val_probs),
        "val_accuracy": accuracy(val_labels, val_probs), "train_clips": len(rows.fnames),
        "early_stopping_clips": len(val_fnames),
        "early_stopping_split": "heldout" if heldout_fnames is None or list(heldout_fnames) == list(val_fnames)
        else "inner",
        "train_seconds": round(clock.seconds, 2),
        "samples_per_second": round(clock.samples / max(clock.seconds, 1e-9), 1),
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
    clips' audio identity, the class list and the test clips in order).

    Not the loader settings (``loader_workers``, ``prefetch_batches``,
    ``loader_kind``: :data:`pipeline.prefetch.LOADER_SETTINGS`): they decide
    how batches are made, not what they hold (every batch is seeded by
    (seed, fold, epoch, index); tests/test_prefetch.py shows identical fold
    results with 0, 1 and several workers), so changing them must not
    retrain anything -- and a work directory trained before they existed
    keeps its fingerprints."""
    spec = {**spec, "train": without_loader_settings(spec["train"])} if "train" in spec else spec
    return param_hash({"spec": spec, "feature": store_key, "labels": labels_hash, "folds": folds_hash,
                       "seed": seed, "data": data_hash, "backend": keras.backend.backend()}, 16)


def eval_window_hop(spec: dict) -> tuple[int, int]:
    """(window, hop) of a network's clip-level prediction, as :func:`train_fold`
    slides them over held-out and test clips: the model's ``window`` and
    ``eval_hop_fraction`` x window (at least 1)."""
    spec = model_settings(spec)
    window = int(spec["window"])
    return window, max(1, int(round(window * float(spec["train"]["eval_hop_fraction"]))))
