"""The fold trainer's Keras callbacks, and the files that make a fold resumable.

The trainer (:mod:`pipeline.trainer`) runs its own batch loop over
``train_on_batch`` and drives a ``keras.callbacks.CallbackList`` from it.
Every per-epoch policy is one small callback here, each with one concern:

=====================  =====================================================
:class:`PlateauLR`      learning rate: set it each epoch, reduce it on a plateau
:class:`EarlyStop`      stop the fold (``model.stop_training``) after no gain
:class:`KeepBest`       keep the best epoch's weights (``best.weights.npz``)
:class:`EpochHistory`   the per-epoch table (``history.csv``)
:class:`TrainClock`     training time and samples (for samples/s)
:class:`EpochLog`       one log line per epoch
:class:`ProgressBar`    the per-epoch tqdm bar
:class:`FoldCheckpoint` ``last.npz`` + ``state.json`` after every epoch, and resume
=====================  =====================================================

Why not Keras' own ``ReduceLROnPlateau`` / ``EarlyStopping`` /
``ModelCheckpoint`` / ``CSVLogger``: a fold killed after epoch k must resume
to exactly the result of an uninterrupted run, so every counter (plateau
wait, best score, current learning rate, early-stop wait, the history rows)
must be saved with the checkpoint and restored, and Keras' callbacks keep
theirs in memory only. ``ReduceLROnPlateau`` also reads the rate back from
the float32 optimizer variable, so the logged and reduced rates would drift
from the exact values this trainer has always used (0.001, not
0.0010000000474974513); ``ModelCheckpoint`` writes a ``.keras`` archive
(seconds per epoch for the deeper models); ``CSVLogger`` appends, so a
resumed fold would truncate or repeat rows. The callbacks here that hold
such counters are :class:`Stateful`: ``get_state``/``set_state`` of plain
JSON values, which :class:`FoldCheckpoint` writes into ``state.json``.

Extra callbacks come from the config (``training.callbacks``, see
:func:`config_callbacks`); they receive the same logs (``loss``,
``val_map3``, ``val_acc``, ``lr``). Their own state is not checkpointed.

Checkpoint files are keyed by variable path (``v.path``), not by position:
loading checks the paths and shapes first and refuses a file that does not
match the model (:class:`CheckpointMismatch`) instead of loading wrong
weights into the right slots. Only public Keras API is used.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import ConfigError
from pipeline.workdir import atomic_write_bytes, atomic_write_csv, atomic_write_json, read_json

log = logging.getLogger("trainer")

#: ``state.json`` layout version; a state of another version is not resumed (the fold starts afresh)
STATE_FORMAT = 2
#: the per-epoch values every callback receives, in ``history.csv``'s column order (after ``epoch``)
EPOCH_LOGS = ("loss", "val_map3", "val_acc", "lr")


# ---------------------------------------------------------------------------
# model state by variable path

class CheckpointMismatch(ValueError):
    """A weights/checkpoint file whose variables are not the model's."""


def walk_layers(model):
    """``(path, layer)`` for every layer under ``model``, outermost first, with
    public API only: a model's ``layers`` (recursing into nested models) and,
    for custom layers, their public attributes that are layers (or lists of
    layers). ``path`` joins the layer names from the top model down, which
    the builders make stable from one build to the next."""
    seen: set[int] = set()

    def visit(layer, prefix):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            children = list(layer.layers)
        else:
            children = []
            for name, value in vars(layer).items():
                if name.startswith("_"):
                    continue
                items = value if isinstance(value, (list, tuple)) else [value]
                children += [v for v in items if isinstance(v, keras.layers.Layer)]
        for child in children:
            yield from visit(child, path + "/")

    for layer in model.layers:
        yield from visit(layer, "")


def renew_model(model, template, lr: float) -> None:
    """Make a compiled ``model`` start like a freshly built and compiled copy of
    ``template`` (same architecture): its weights and dropout RNG states, and
    a zeroed optimizer state (what a new Adam starts from) at learning rate
    ``lr``. Lets a compiled train step be reused instead of traced again."""
    model.set_weights(template.get_weights())
    theirs = rng_states(template)
    for key, v in rng_states(model).items():  # the dropout RNGs start where a new model's would
        v.assign(theirs[key].value)
    if model.optimizer.built:
        for v in model.optimizer.variables:  # zeros by shape and dtype (zeros_like(variable) fails under JAX)
            v.assign(keras.ops.zeros(v.shape, dtype=v.dtype))
    model.optimizer.learning_rate.assign(float(lr))  # zeroed with the rest


def rng_states(model) -> dict:
    """Stable key -> the state variable of every random-number generator
    (``keras.random.SeedGenerator``: Dropout, noise layers, ...). A layer's
    ``variables`` are its weights plus its generators' states (public Keras
    API), so the states are the model's variables that are not weights,
    each keyed by the innermost layer holding it (``head_dropout/
    seed_generator_state``): the variables' own paths carry a global counter
    (``seed_generator_12/...``) that differs from one build to the next."""
    weights = {id(v) for v in model.weights}
    owner: dict[int, tuple[str, object]] = {}
    for path, layer in walk_layers(model):  # outermost first: the innermost owner wins
        for v in layer.variables:
            if id(v) not in weights:
                owner[id(v)] = (path, v)
    out: dict = {}
    for v in model.variables:
        if id(v) in weights:
            continue
        path, _ = owner.get(id(v), (model.name, v))
        key = f"{path}/{v.name}"
        n = 1
        while key in out:
            key = f"{path}/{v.name}_{n}"
            n += 1
        out[key] = v
    return out


def _unique(pairs, what: str) -> dict:
    out: dict = {}
    for key, v in pairs:
        if key in out:
            raise ValueError(f"two {what} share the path {key!r}: checkpoints are keyed by path, "
                             "so layer names must be unique")
        out[key] = v
    return out


def weight_variables(model) -> dict:
    """``v.path`` -> weight variable (stable: the builders name their layers)."""
    return _unique(((v.path, v) for v in model.weights), "weights")


def optimizer_variables(model) -> dict:
    """``optimizer:<path>`` -> optimizer variable, without the optimizer's
    own name (``adam_3/...``: a global counter, like the generators')."""
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    prefix = f"{opt.name}/"
    return _unique(((f"optimizer:{v.path[len(prefix):] if v.path.startswith(prefix) else v.path}", v)
                    for v in opt.variables), "optimizer variables")


def checkpoint_variables(model) -> dict:
    """Everything a resumed epoch needs, by key: the weights (their path),
    the optimizer state (``optimizer:...``) and the RNG states (``rng:...``)."""
    out = dict(weight_variables(model))
    out.update(optimizer_variables(model))
    out.update({f"rng:{k}": v for k, v in rng_states(model).items()})
    return out


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_variables(variables: dict, path: Path) -> None:
    """``{key: variable}`` as one ``.npz`` of ``{key: array}``, written atomically."""
    atomic_write_bytes(Path(path), _npz_bytes({k: np.asarray(v.numpy()) for k, v in variables.items()}))


def _listing(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_variables(variables: dict, path: Path) -> None:
    """Assign a :func:`save_variables` file to ``variables``, after checking
    that its keys and shapes are exactly theirs; otherwise nothing is
    assigned and :class:`CheckpointMismatch` names the differences."""
    path = Path(path)
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    missing = set(variables) - set(arrays)
    unexpected = set(arrays) - set(variables)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    shapes = [f"{k} {arrays[k].shape} vs the model's {tuple(v.shape)}" for k, v in variables.items()
              if k in arrays and tuple(arrays[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"shape differs for {len(shapes)}: {_listing(shapes, 3)}")
    if problems:
        raise CheckpointMismatch(f"{path} does not match the model, not loaded ({'; '.join(problems)})")
    for key, v in variables.items():
        v.assign(arrays[key])


def save_weights(model, path: Path) -> None:
    save_variables(weight_variables(model), path)


def load_weights(model, path: Path) -> None:
    load_variables(weight_variables(model), path)


def save_checkpoint(model, path: Path) -> None:
    """Weights, optimizer state and RNG states as one ``.npz`` (a whole
    ``.keras`` archive every epoch cost seconds per epoch for the deeper models)."""
    save_variables(checkpoint_variables(model), path)


def load_checkpoint(model, path: Path) -> None:
    load_variables(checkpoint_variables(model), path)


# ---------------------------------------------------------------------------
# the trainer's callbacks

class Stateful(keras.callbacks.Callback):
    """A callback whose counters go into the fold's checkpoint (``state.json``
    under ``state_key``), so a resumed fold continues them exactly."""
    state_key = ""

    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError


class _Monitor(Stateful):
    """Tracks the best value of one log (higher is better): ``improved``
    says whether this epoch beat it by more than ``min_delta``."""

    def __init__(self, monitor: str = "val_map3", min_delta: float = 1e-6, patience: int = 1):
        super().__init__()
        self.monitor, self.min_delta, self.patience = monitor, float(min_delta), int(patience)
        self.best: float | None = None
        self.wait = 0

    def out_of_patience(self, logs) -> bool:
        """Counts the epochs since the last gain; True once ``patience`` of them passed."""
        if self.improved(logs):
            self.wait = 0
            return False
        self.wait += 1
        return self.wait >= self.patience

    def improved(self, logs) -> bool:
        if not logs or self.monitor not in logs:
            raise KeyError(f"{type(self).__name__}: the epoch logs hold no {self.monitor!r} "
                           f"(they hold {', '.join(sorted(logs or {}))})")
        score = float(logs[self.monitor])
        if self.best is None or score > self.best + self.min_delta:
            self.best = score
            return True
        return False


class PlateauLR(_Monitor):
    """Sets the learning rate at each epoch's start, and multiplies it by
    ``factor`` (not below ``min_lr``) after ``patience`` epochs without gain.
    The rate is kept as a Python float (the optimizer's variable is float32)."""
    state_key = "plateau_lr"

    def __init__(self, lr: float, factor: float = 0.5, patience: int = 3, min_lr: float = 1e-6,
                 monitor: str = "val_map3"):
        super().__init__(monitor, patience=patience)
        self.lr, self.factor, self.min_lr = float(lr), float(factor), float(min_lr)

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(self.lr)

    def on_epoch_end(self, epoch, logs=None):
        if self.out_of_patience(logs):
            self.lr = max(self.min_lr, self.lr * self.factor)
            self.wait = 0

    def get_state(self) -> dict:
        return {"lr": self.lr, "wait": self.wait, "best": self.best}

    def set_state(self, state: dict) -> None:
        self.lr, self.wait, self.best = float(state["lr"]), int(state["wait"]), state["best"]


class EarlyStop(_Monitor):
    """Stops the fold (``model.stop_training``) after ``patience`` epochs without gain."""
    state_key = "early_stop"

    def __init__(self, patience: int = 5, monitor: str = "val_map3", label: str = ""):
        super().__init__(monitor, patience=patience)
        self.label = label

    def on_epoch_end(self, epoch, logs=None):
        if self.out_of_patience(logs):
            log.info("%s: early stop (no gain for %d epochs)", self.label, self.wait)
            self.model.stop_training = True

    def get_state(self) -> dict:
        return {"wait": self.wait, "best": self.best}

    def set_state(self, state: dict) -> None:
        self.wait, self.best = int(state["wait"]), state["best"]


class KeepBest(_Monitor):
    """Writes the weights of every epoch that beats the best so far (by path,
    see :func:`save_weights`); ``best_epoch`` is 0-based, -1 before any."""
    state_key = "keep_best"

    def __init__(self, path: Path, monitor: str = "val_map3"):
        super().__init__(monitor)
        self.path = Path(path)
        self.best_epoch = -1

    def on_epoch_end(self, epoch, logs=None):
        if self.improved(logs):
            self.best_epoch = int(epoch)
            save_weights(self.model, self.path)

    def get_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def set_state(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], int(state["best_epoch"])


class EpochHistory(Stateful):
    """One row per epoch (``epoch`` 1-based, then :data:`EPOCH_LOGS`, then any
    other log), written to ``history.csv`` when training ends. The rows are
    checkpointed, so a resumed fold's table is the uninterrupted one.
    (Not rewritten every epoch: pandas' CSV writer costs ~5 ms, measurable
    on the quick preset's sub-second epochs.)"""
    state_key = "history"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": int(epoch) + 1, **(logs or {})})

    def on_train_end(self, logs=None):
        self.write()

    def write(self) -> None:
        table = pd.DataFrame(self.rows)
        first = ["epoch", *(k for k in EPOCH_LOGS if k in table.columns)]
        # the column order is fixed here: rows restored from state.json come back with sorted keys
        atomic_write_csv(table[first + sorted(c for c in table.columns if c not in first)], self.path)

    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = list(state["rows"])


class TrainClock(Stateful):
    """Seconds spent in the training batches (not evaluation) and samples
    seen, summed over the epochs, for the fold's samples/s."""
    state_key = "clock"

    def __init__(self, samples_per_batch: int):
        super().__init__()
        self.samples_per_batch = int(samples_per_batch)
        self.seconds, self.samples = 0.0, 0
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.samples += self.samples_per_batch
        if batch + 1 == self.params.get("steps"):
            self.seconds += time.perf_counter() - self._t0

    def get_state(self) -> dict:
        return {"seconds": self.seconds, "samples": self.samples}

    def set_state(self, state: dict) -> None:
        self.seconds, self.samples = float(state["seconds"]), int(state["samples"])


class EpochLog(keras.callbacks.Callback):
    """``<model> fold <k> epoch <e>/<E>: loss ... val MAP@3 ... (best ... @ ...) lr ...``
    (fold 0-based, epochs 1-based), after the best score and the rate are updated."""

    def __init__(self, label: str, keep_best: KeepBest, plateau: PlateauLR):
        super().__init__()
        self.label, self.keep_best, self.plateau = label, keep_best, plateau

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        log.info("%s epoch %d/%d: loss %.4f val MAP@3 %.4f (best %.4f @ %d) lr %.2g", self.label, epoch + 1,
                 self.params.get("epochs", 0), logs.get("loss", float("nan")), logs.get("val_map3", float("nan")),
                 self.keep_best.best if self.keep_best.best is not None else float("nan"),
                 self.keep_best.best_epoch + 1, self.plateau.lr)


class ProgressBar(keras.callbacks.Callback):
    """A tqdm bar per epoch (closed after its last batch). Its batch hook
    also keeps ``CallbackList`` dispatching batch ends synchronously,
    rather than through a thread pool started for every fold."""

    def __init__(self, label: str, enabled: bool = True):
        super().__init__()
        self.label, self.enabled = label, enabled
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.close()
        self.bar = tqdm(total=self.params.get("steps"), unit="batch", leave=False, disable=not self.enabled,
                        desc=f"{self.label} epoch {epoch + 1}/{self.params.get('epochs')}")

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is None:
            return
        self.bar.update(1)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)
        if batch + 1 == self.params.get("steps"):
            self.close()

    def on_train_end(self, logs=None):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class FoldCheckpoint(keras.callbacks.Callback):
    """After every epoch: the model state (``last.npz``: weights, optimizer
    and RNG states, by path) and then ``state.json`` (the fingerprint, the
    last finished epoch, whether the fold is finished, every
    :class:`Stateful` callback's state). ``state.json`` is written last, so
    it never points at a newer epoch than ``last.npz`` holds. Must be the
    last callback, so it records what every other one decided this epoch.

    :meth:`resume` reads them back into the model and the callbacks. A
    fold that had finished training resumes (to predict) only if one of the
    ``kept`` files (its best weights) is still there."""

    def __init__(self, out_dir: Path, fingerprint: str, stateful: list[Stateful], kept: list[Path] = ()):
        super().__init__()
        self.out_dir, self.fingerprint, self.stateful = Path(out_dir), fingerprint, list(stateful)
        self.kept = [Path(p) for p in kept]
        self._variables = None
        keys = [cb.state_key for cb in self.stateful]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError(f"stateful callbacks need distinct state keys, got {keys}")
        self.epoch, self.finished = -1, False

    @property
    def state_path(self) -> Path:
        return self.out_dir / "state.json"

    @property
    def weights_path(self) -> Path:
        return self.out_dir / "last.npz"

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "finished": self.finished, "callbacks": {cb.state_key: cb.get_state() for cb in self.stateful}}

    def write_state(self) -> None:
        atomic_write_json(self.state(), self.state_path)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = int(epoch)
        self.finished = bool(self.model.stop_training) or epoch + 1 >= int(self.params.get("epochs", 0))
        if self._variables is None:  # the same variables every epoch (the optimizer is built by now)
            self._variables = checkpoint_variables(self.model)
        save_variables(self._variables, self.weights_path)
        self.write_state()

    def finish(self) -> None:
        """The fold's training is over (whatever stopped it)."""
        self.finished = True
        self.write_state()

    def resume(self) -> bool:
        """Restore an earlier run of this fold, if there is a usable one: the
        callbacks' states, and (unless it had finished training) the model
        state from ``last.npz``. Returns whether anything was restored;
        otherwise the fold starts afresh (and says why when there was a state)."""
        state = read_json(self.state_path)
        if not state:
            return False
        why = None
        if state.get("fingerprint") != self.fingerprint:
            why = "settings changed since the last run"
        elif state.get("format") != STATE_FORMAT:
            why = "its state.json is of an older trainer"
        elif set(state.get("callbacks", {})) != {cb.state_key for cb in self.stateful}:
            why = "its state.json holds other callbacks"
        elif not state.get("finished") and not self.weights_path.exists():
            why = "last.npz is missing"
        elif state.get("finished") and self.kept and not any(p.exists() for p in self.kept):
            why = f"it had finished but none of {', '.join(p.name for p in self.kept)} is left"
        if why is None and not state.get("finished"):
            try:
                load_checkpoint(self.model, self.weights_path)
            except CheckpointMismatch as err:
                why = str(err)
        if why is not None:
            log.info("%s: %s, starting the fold afresh", self.out_dir, why)
            return False
        for cb in self.stateful:
            cb.set_state(state["callbacks"][cb.state_key])
        self.epoch, self.finished = int(state["epoch"]), bool(state["finished"])
        return True


# ---------------------------------------------------------------------------
# extra callbacks from the config

def _substitute(value, fold_dir: str):
    if isinstance(value, str):
        return value.replace("{fold_dir}", fold_dir)
    if isinstance(value, list):
        return [_substitute(v, fold_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, fold_dir) for k, v in value.items()}
    return value


def _callback_class(name: str):
    """A class of ``keras.callbacks`` (``CSVLogger``) or a dotted path (``pkg.module.Class``)."""
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise LookupError(f"cannot import {module_name!r} ({err})") from None
        where = module_name
    else:
        module, attr, where = keras.callbacks, name, "keras.callbacks"
    cls = getattr(module, attr, None)
    if cls is None:
        raise LookupError(f"no {attr!r} in {where}")
    if not (isinstance(cls, type) and issubclass(cls, keras.callbacks.Callback)):
        raise LookupError(f"{name} is not a keras.callbacks.Callback subclass")
    return cls


def config_callbacks(entries, fold_dir: Path, where: str = "training.callbacks") -> list:
    """The callbacks ``training.callbacks`` asks for, built for one fold:
    a list of ``{class: NAME, args: {...}}`` where NAME is a class of
    ``keras.callbacks`` or ``pkg.module.Class``, and ``{fold_dir}`` in any
    string argument is the fold's folder. An unknown class or bad
    arguments raise :class:`ConfigError` naming ``where[i]`` and the class.

    They run after the trainer's own callbacks and before the checkpoint,
    so they see the epoch's final state and may stop the fold
    (``model.stop_training``). Their state is not checkpointed: after a
    resume a ``CSVLogger`` starts its file afresh unless ``append: true``.
    The learning rate belongs to :class:`PlateauLR`, which sets it at each
    epoch's start."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{where} must be a list of {{class: NAME, args: {{...}}}}, got {entries!r}")
    out = []
    for i, entry in enumerate(entries):
        key = f"{where}[{i}]"
        if not isinstance(entry, dict) or "class" not in entry:
            raise ConfigError(f"{key} must be a mapping {{class: NAME, args: {{...}}}}, got {entry!r}")
        unknown = set(entry) - {"class", "args"}
        if unknown:
            raise ConfigError(f"{key} ({entry['class']}): unknown key {sorted(unknown)[0]!r} (known: class, args)")
        name, args = entry["class"], entry.get("args") or {}
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: class must be a class name, got {name!r}")
        if not isinstance(args, dict):
            raise ConfigError(f"{key} ({name}): args must be a mapping, got {args!r}")
        try:
            cls = _callback_class(name)
        except LookupError as err:
            raise ConfigError(f"{key} ({name}): unknown callback class: {err}") from None
        if issubclass(cls, keras.callbacks.TensorBoard) and importlib.util.find_spec("tensorboard") is None:
            # otherwise it fails at the first batch, after the model is compiled
            raise ConfigError(f"{key} ({name}): needs the tensorboard package, which is not installed")
        try:
            out.append(cls(**_substitute(args, str(fold_dir))))
        except Exception as err:  # a constructor's complaint, whatever its type
            raise ConfigError(f"{key} ({name}): bad args {args!r}: {type(err).__name__}: {err}") from None
    return out
