"""The model inputs the fold trainer consumes, each a pure function of its task (no Keras here).

- :class:`WindowBatches`: training batch ``(epoch, index)`` of a fold: random-offset windows,
  normalisation, augmentation and targets, every draw seeded by (seed, fold, epoch, index).
- :class:`SlidingWindowBatches`: inference batch ``index`` of a list of clips: every clip's sliding
  windows, consecutive across clips, cut into fixed-size model batches (the last of each group
  padded), normalised.

Because each item depends on its task only, :class:`pipeline.prefetch.Prefetch` can make them in
any number of threads or processes and hand them over in order, and the result is the same as
making them one by one in the loop. This module imports no Keras, so a worker process that
unpickles a producer loads numpy and the pipeline's small modules only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline.audio import repeat_to_length
from pipeline.augment import balanced_sample_weights, mixup, smoothed_targets, spec_augment
from pipeline.config import training_settings
from pipeline.normalize import Normalizer
from pipeline.prefetch import clip_failure
from pipeline.sampling import (balanced_batch_size, balanced_order, pairs_batch_size, pairs_order,
                               policy_for_loss)
from pipeline.windows import random_window, window_starts

log = logging.getLogger("trainer")

#: the class-probability output of every builder (the softmax head of models/_common.py); a triplet
#: model's second output is ``EMBEDDING_OUTPUT``
PROBS_OUTPUT, EMBEDDING_OUTPUT = "predictions", "embedding"


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

    Batch ``(epoch, idx)`` (:meth:`make`, or ``batches[idx]`` after ``set_epoch(epoch)``) is seeded
    by (seed, epoch, idx) and the epoch's order by (seed, epoch), so batches are reproducible, a
    resumed run continues identically, and any number of workers makes the same ones
    (:mod:`pipeline.prefetch`; the instance is also the producer: ``batches((epoch, idx))``).

    With ``loss: triplet`` a batch's targets are ``{"predictions": y,
    "embedding": packed}``: ``packed`` holds each row's given class (before
    smoothing), its row index as the source (two windows of one clip are
    never a positive pair) and, for ``triplet_strategy: paper``, a negative
    per row drawn with the batch's seeded numpy generator. Sample weights
    (``class_weight``) then come as ``{"predictions": w}``: the triplet loss
    is one value per batch and takes none.
    """

    def __init__(self, store, rows: TrainRows, n_classes: int, window: int, train_cfg: dict,
                 normalizer: Normalizer, seed: int):
        self.store, self.rows, self.n_classes, self.window = store, rows, n_classes, window
        train_cfg = training_settings(train_cfg)
        self.cfg, self.normalizer, self.seed = train_cfg, normalizer, seed
        self.triplet = train_cfg["loss"] == "triplet"
        self.negatives = self.triplet and train_cfg["triplet_strategy"] == "paper"
        # batch_policy "balanced": one clip of every class per batch (batch size = classes present);
        # "pairs": batch_size // 2 classes with two clips each (the triplet loss's default)
        self.policy = policy_for_loss(train_cfg["batch_policy"], train_cfg["loss"])
        if self.policy != (train_cfg["batch_policy"] or "unbalanced"):
            log.info("batch_policy %s: the triplet loss trains on pairs batches instead (two clips of each class)",
                     train_cfg["batch_policy"] or "null")
        if self.policy == "balanced":
            self.batch_size = balanced_batch_size(rows.labels)
        elif self.policy == "pairs":
            self.batch_size = pairs_batch_size(rows.labels, int(train_cfg["batch_size"]))
        else:
            self.batch_size = int(train_cfg["batch_size"])
        steps = train_cfg["steps_per_epoch"]
        self.steps = int(steps) if steps else max(1, math.ceil(len(rows.fnames) / self.batch_size))
        self.class_weight = (balanced_sample_weights(rows.labels, n_classes)
                             if train_cfg["class_weight"] == "balanced" else None)
        self.mask_ratio = train_cfg["loss_masking"]
        self._orders: dict[int, np.ndarray] = {}
        self.set_epoch(0)

    def __getstate__(self):  # a worker process computes the orders it needs
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    def order_for(self, epoch: int) -> np.ndarray:
        """Row indices of the epoch's batches, consecutive ``batch_size`` slices (seeded by (seed, epoch))."""
        order = self._orders.get(epoch)
        if order is not None:
            return order
        rng = np.random.default_rng([self.seed, epoch])
        if self.policy == "balanced":
            order = balanced_order(self.rows.labels, self.steps, rng)
        elif self.policy == "pairs":
            order = pairs_order(self.rows.labels, self.steps, self.batch_size, rng)
        else:
            n_draw = self.steps * self.batch_size
            reps = -(-n_draw // len(self.rows.fnames))
            order = np.concatenate([rng.permutation(len(self.rows.fnames)) for _ in range(reps)])[:n_draw]
        for old in [e for e in list(self._orders) if e < epoch - 1]:  # threads may ask for two epochs at once
            self._orders.pop(old, None)
        self._orders[epoch] = order
        return order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self.order_for(epoch)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, idx: int):
        return self.make(self.epoch, idx)

    def __call__(self, task: tuple[int, int]):
        """The producer interface of :class:`pipeline.prefetch.Prefetch`: ``task = (epoch, idx)``."""
        epoch, idx = task
        return self.make(epoch, idx)

    def _window(self, i: int, rng: np.random.Generator, where: str) -> np.ndarray:
        fname, split = self.rows.fnames[i], self.rows.split
        try:
            return random_window(self.store.load(split, fname), self.window, rng)
        except Exception as exc:
            raise clip_failure(exc, fname, split, where) from exc

    def make(self, epoch: int, idx: int):
        """Batch ``idx`` of epoch ``epoch``: ``(x, y)`` or ``(x, y, sample_weight)``."""
        rng = np.random.default_rng([self.seed, epoch, idx, 1])
        pick = self.order_for(epoch)[idx * self.batch_size:(idx + 1) * self.batch_size]
        where = f"making training batch {idx + 1} of epoch {epoch + 1}"
        x = np.stack([self._window(i, rng, where) for i in pick])
        try:
            return self._finish(x, pick, rng)
        except Exception as exc:
            names = [self.rows.fnames[i] for i in pick]
            exc.add_note(f"while {where} (clips {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
            raise

    def _finish(self, x: np.ndarray, pick: np.ndarray, rng: np.random.Generator):
        x = self.normalizer(x)
        y = smoothed_targets(self.rows.labels[pick], self.n_classes, self.rows.epsilon[pick])
        verified = self.rows.verified[pick].astype(np.float32)
        sa = self.cfg["spec_augment"]
        if sa and x.ndim >= 3 and x.shape[2] > 1:
            x = spec_augment(x, rng, **sa)
        x, y, verified = mixup(x, y, float(self.cfg["mixup_alpha"] or 0.0), rng, verified)
        if self.mask_ratio is not None:
            y = np.concatenate([y, verified[:, None]], axis=1)
        if self.triplet:
            negatives = draw_negatives(self.rows.labels[pick], rng) if self.negatives else None
            y = {PROBS_OUTPUT: y, EMBEDDING_OUTPUT: pack_triplet_targets(self.rows.labels[pick], pick, negatives)}
            if self.class_weight is not None:
                return x, y, {PROBS_OUTPUT: self.class_weight[pick]}
            return x, y
        if self.class_weight is not None:
            return x, y, self.class_weight[pick]
        return x, y


# -- the triplet loss's targets (numpy; pipeline.losses re-exports them) -----------------------------
def draw_negatives(labels, rng: np.random.Generator) -> np.ndarray:
    """Per row, the index of a random row of another class (numpy; for
    ``pipeline.losses.triplet_loss(negatives=...)``).

    ``labels``: class indices, or one-hot / soft targets (argmax). A row with no other class in the
    batch gets its own index, which :func:`pipeline.losses.triplet_loss` treats as "no negative".
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
    labels = labels.astype(int)
    out = np.arange(len(labels))
    for i, label in enumerate(labels):
        others = np.flatnonzero(labels != label)
        if len(others):
            out[i] = rng.choice(others)
    return out


def pack_triplet_targets(targets, sources=None, negatives=None) -> np.ndarray:
    """``y_true`` for :class:`pipeline.losses.EmbeddingTripletLoss`: the targets (class indices or one-hot / soft
    rows), then a source-id column, then a negative-index column, as the loss's flags say (float32:
    ids must stay below 2**24)."""
    targets = np.asarray(targets, dtype=np.float32)
    cols = [targets[:, None] if targets.ndim == 1 else targets]
    for extra in (sources, negatives):
        if extra is not None:
            cols.append(np.asarray(extra, dtype=np.float32)[:, None])
    return np.concatenate(cols, axis=1)


def clip_length(store, split: str, fname: str) -> int:
    """Frames (axis 0) of a stored clip. Read through ``store.load`` (a view into a memory-mapped
    shard: nothing is copied), so a missing or unusable clip fails with the store's own message, as
    when its windows are cut."""
    try:
        return int(np.shape(store.load(split, fname))[0])
    except Exception as exc:
        raise clip_failure(exc, fname, split, "reading clip lengths for prediction") from exc


class SlidingWindowBatches:
    """Every clip's sliding windows (:func:`pipeline.windows.sliding_windows`), consecutive across
    clips, as fixed-size model batches.

    Clips are taken in groups: a group ends after the clip that brings it to ``max_windows``
    windows or more (or at the last clip), and a group's windows are cut into batches of
    ``batch_size``, the last one padded by repeating the group's last window -- exactly the batches
    :func:`pipeline.trainer.predict_clips` has always predicted, now planned from the clips'
    lengths so that each can be made on its own (``batches(i)``), ahead of the model, and a long
    clip spans several batches instead of one huge array.

    ``plan[i] = (segments, n_real, (first, end), last)``: the ``(clip, first window, stop window)``
    pieces of batch ``i`` in order, how many of its rows are real windows, the clips ``first ..
    end - 1`` of its group and whether it is the group's last batch. ``owners[i]``: the clip of each
    real row; ``counts``: windows per clip.
    """

    def __init__(self, store, split: str, fnames: list[str], window: int, hop: int, normalizer: Normalizer,
                 batch_size: int, max_windows: int):
        self.store, self.split, self.fnames = store, split, list(fnames)
        self.window, self.hop, self.normalizer = int(window), max(1, int(hop)), normalizer
        self.batch_size = int(batch_size)
        counts = [len(window_starts(clip_length(store, split, f), self.window, self.hop)) for f in self.fnames]
        self.counts = np.asarray(counts, dtype=int)
        self.plan: list[tuple[list[tuple[int, int, int]], int, tuple[int, int], bool]] = []
        self.owners: list[np.ndarray] = []
        group: list[tuple[int, int]] = []  # (clip, windows) of the open group
        n_group = 0
        for i, n in enumerate(counts):
            group.append((i, n))
            n_group += n
            if n_group >= max_windows or i == len(counts) - 1:
                self._plan_group(group, i + 1)
                group, n_group = [], 0

    def _plan_group(self, group: list[tuple[int, int]], group_end: int) -> None:
        pieces = [(clip, 0, n) for clip, n in group]
        total = sum(n for _, n in group)
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            segments, offset = [], 0
            for clip, a, b in pieces:
                lo, hi = max(start, offset), min(stop, offset + (b - a))
                if lo < hi:
                    segments.append((clip, lo - offset, hi - offset))
                offset += b - a
            self.plan.append((segments, stop - start, (group[0][0], group_end), stop == total))
            self.owners.append(np.concatenate([np.full(b - a, clip) for clip, a, b in segments]))

    def __len__(self) -> int:
        return len(self.plan)

    def _windows(self, clip: int, first: int, stop: int) -> np.ndarray:
        fname = self.fnames[clip]
        try:
            arr = np.asarray(self.store.load(self.split, fname))
            if arr.shape[0] <= self.window:
                return repeat_to_length(arr, self.window)[None]
            starts = window_starts(arr.shape[0], self.window, self.hop)[first:stop]
            return arr[starts[:, None] + np.arange(self.window)[None, :]]
        except Exception as exc:
            raise clip_failure(exc, fname, self.split, "cutting sliding windows for prediction") from exc

    def __call__(self, idx: int) -> np.ndarray:
        """Model batch ``idx``: (batch_size, window, ...) float32, normalised."""
        segments, n_real, _, _ = self.plan[idx]
        x = np.concatenate([self._windows(*seg) for seg in segments])
        if n_real < self.batch_size:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n_real, axis=0)])
        return self.normalizer(x)
