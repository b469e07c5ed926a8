"""Load the level-1 tables a stacker learns from, and refuse bad ones.

Every model's OOF table must cover exactly the clips of ``folds.csv``, with
the same fold per clip: a table made with other folds would let a stacker
see predictions from models that trained on the rows it is scored on. Every
refusal is a ``StackInputError`` (a ``ValueError``) naming the model.

The result is a :class:`Level2Inputs`: the OOF and test probabilities as
two arrays (models side by side, plus optional per-clip feature columns)
with their column metadata (:class:`stacking.base.Level2Layout`), the
labels, the shared folds and the row weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.cv import load_folds
from pipeline.predictions import class_columns
from pipeline.workdir import WorkDir
from stacking.base import Level2Layout, as_extra, check_sample_weight, verified_weights


class StackInputError(ValueError):
    """A level-1 table the stacker must not learn from; the message names the model."""


@dataclass
class Level2Inputs:
    """Level-1 predictions as level-2 arrays, rows aligned to ``folds.csv``
    order (train) and sample_submission order (test); ``layout`` names the
    columns (``model:class`` probabilities, model-major, then extra per-clip
    features such as MFCC statistics)."""
    layout: Level2Layout
    X_oof: np.ndarray                  # (n, M*K + F)
    y: np.ndarray                      # (n,) int class indices
    folds: np.ndarray                  # (n,) int fold per row (folds.csv)
    fnames: list[str]
    verified: np.ndarray               # (n,) bool
    sample_weight: np.ndarray | None = None   # (n,) fit weights of the rows (None: all 1)
    X_test: np.ndarray | None = None   # (n_test, M*K + F), None without test tables
    test_fnames: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.X_oof = self.layout.check(self.X_oof)
        n = self.X_oof.shape[0]
        self.y = np.asarray(self.y, dtype=int)
        self.folds = np.asarray(self.folds, dtype=int)
        self.verified = np.asarray(self.verified, dtype=bool)
        for name in ("y", "folds", "verified"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"level-2 inputs: {name} has shape {getattr(self, name).shape}, expected ({n},)")
        if len(self.fnames) != n:
            raise ValueError(f"level-2 inputs: {len(self.fnames)} fnames for {n} rows")
        self.sample_weight = check_sample_weight(self.sample_weight, n)
        if self.X_test is not None:
            self.X_test = self.layout.check(self.X_test)
            if len(self.test_fnames) != self.X_test.shape[0]:
                raise ValueError(f"level-2 inputs: {len(self.test_fnames)} test fnames for "
                                 f"{self.X_test.shape[0]} test rows")

    @property
    def model_names(self) -> list[str]:
        return list(self.layout.models)

    @property
    def classes(self) -> list[str]:
        return list(self.layout.classes)

    @property
    def columns(self) -> list[str]:
        return self.layout.columns

    @property
    def extra_names(self) -> list[str]:
        return list(self.layout.extra)

    def oof(self, model: str) -> np.ndarray:
        """One model's (n, K) OOF probabilities."""
        return np.ascontiguousarray(self.X_oof[:, self.layout.model_slice(model)])

    def test(self, model: str) -> np.ndarray:
        """One model's (n_test, K) test probabilities."""
        if self.X_test is None:
            raise ValueError("no test tables loaded")
        return np.ascontiguousarray(self.X_test[:, self.layout.model_slice(model)])

    def with_extra(self, extra, test_extra=None, names: Sequence[str] | None = None) -> "Level2Inputs":
        """These inputs with per-clip feature columns (n, F) appended (replacing
        any there were); ``test_extra`` (n_test, F) is required with test tables."""
        ex = as_extra(extra, len(self.y))
        names = [f"extra{j}" for j in range(ex.shape[1])] if names is None else list(names)
        if len(names) != ex.shape[1]:
            raise ValueError(f"{len(names)} names for {ex.shape[1]} extra feature column(s)")
        layout = self.layout.with_extra(names)
        p = self.layout.n_probability_columns
        X_oof = np.concatenate([self.X_oof[:, :p], ex], axis=1)
        X_test = None
        if self.X_test is not None:
            if test_extra is None:
                raise ValueError("test tables are loaded: their extra features (test_extra) are needed too")
            tx = as_extra(test_extra, self.X_test.shape[0])
            if tx.shape[1] != ex.shape[1]:
                raise ValueError(f"{tx.shape[1]} extra test column(s) for {ex.shape[1]} extra train column(s)")
            X_test = np.concatenate([self.X_test[:, :p], tx], axis=1)
        return dataclasses.replace(self, layout=layout, X_oof=X_oof, X_test=X_test)

    def with_unverified_weight(self, unverified_weight: float | None) -> "Level2Inputs":
        """These inputs with non-verified rows weighing ``unverified_weight`` (None: every row 1)."""
        return dataclasses.replace(self, sample_weight=verified_weights(self.verified, unverified_weight))


def level2_inputs(oof: dict[str, np.ndarray], y, folds, classes: Sequence[str], *, fnames=None, verified=None,
                  test: dict[str, np.ndarray] | None = None, test_fnames=None, extra=None, test_extra=None,
                  extra_names=None, unverified_weight: float | None = None) -> Level2Inputs:
    """:class:`Level2Inputs` from per-model (n, K) matrices (dict order is
    the column order); ``fnames`` default to row numbers, ``verified`` to all."""
    models = list(oof)
    layout = Level2Layout(tuple(models), tuple(classes))
    n = len(y)
    verified = np.ones(n, dtype=bool) if verified is None else verified
    X_test = None
    if test:
        if set(test) != set(models):
            raise ValueError(f"test tables for {sorted(test)}, OOF tables for {sorted(models)}")
        X_test = layout.join([test[m] for m in models])
        test_fnames = [f"test{i}" for i in range(X_test.shape[0])] if test_fnames is None else list(test_fnames)
    inputs = Level2Inputs(layout=layout, X_oof=layout.join([oof[m] for m in models]), y=y, folds=folds,
                          fnames=[f"row{i}" for i in range(n)] if fnames is None else list(fnames),
                          verified=verified, X_test=X_test, test_fnames=list(test_fnames or []))
    if extra is not None:
        inputs = inputs.with_extra(extra, test_extra, extra_names)
    return inputs.with_unverified_weight(unverified_weight)


def _examples(items, k: int = 5) -> str:
    items = sorted(map(str, items))
    return ", ".join(items[:k]) + (" ..." if len(items) > k else "")


def _probabilities(model: str, what: str, df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The class columns as a row-normalised float matrix; refuse non-numeric,
    non-finite, negative or all-zero rows."""
    try:
        probs = df[list(classes)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise StackInputError(f"model {model!r}: {what} has non-numeric probabilities ({exc})") from None
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise StackInputError(f"model {model!r}: {what} has non-finite values in {int(bad.sum())} row(s) "
                         f"(e.g. {_examples(df['fname'].to_numpy()[bad])})")
    if (probs < 0).any():
        raise StackInputError(f"model {model!r}: {what} has negative probabilities")
    sums = probs.sum(axis=1)
    if (sums <= 0).any():
        raise StackInputError(f"model {model!r}: {what} has rows that sum to 0")
    return probs / sums[:, None]  # the tables are rounded to 6 digits


def _check_columns(model: str, what: str, df: pd.DataFrame, classes: Sequence[str]) -> None:
    if "fname" not in df.columns:
        raise StackInputError(f"model {model!r}: {what} has no fname column")
    cols = class_columns(df)
    if cols != list(classes):
        missing, unexpected = sorted(set(classes) - set(cols)), sorted(set(cols) - set(classes))
        detail = (f"missing {missing}, unexpected {unexpected}" if missing or unexpected
                  else "same classes in a different order")
        raise StackInputError(f"model {model!r}: {what} class columns differ from the dataset's classes ({detail})")
    dup = df["fname"].duplicated()
    if dup.any():
        raise StackInputError(f"model {model!r}: {what} lists {int(dup.sum())} fname(s) twice "
                         f"(e.g. {_examples(df['fname'][dup])})")


def check_oof_table(model: str, df: pd.DataFrame, folds: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The model's OOF probabilities aligned to ``folds`` row order, or a ValueError naming the model."""
    what = "OOF table"
    _check_columns(model, what, df, classes)
    if "fold" not in df.columns:
        raise StackInputError(f"model {model!r}: {what} has no fold column")
    have, want = set(df["fname"]), set(folds["fname"])
    missing = want - have
    if missing:
        raise StackInputError(f"model {model!r}: {what} misses {len(missing)} of the {len(want)} clips in folds.csv "
                         f"(e.g. {_examples(missing)}): rerun its training on the current folds")
    extra = have - want
    if extra:
        raise StackInputError(f"model {model!r}: {what} has {len(extra)} row(s) not in folds.csv "
                         f"(e.g. {_examples(extra)}): it came from a different folds.csv")
    aligned = df.set_index("fname").loc[folds["fname"]]
    fold_col = pd.to_numeric(aligned["fold"], errors="coerce").to_numpy()
    differ = fold_col != folds["fold"].to_numpy()
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        raise StackInputError(f"model {model!r}: {what} came from different folds: {int(differ.sum())} clip(s) have "
                         f"another fold than folds.csv (e.g. {folds['fname'].iloc[i]}: fold "
                         f"{aligned['fold'].iloc[i]} in the table, {folds['fold'].iloc[i]} in folds.csv)")
    return _probabilities(model, what, aligned.reset_index(), classes)


def check_test_table(model: str, df: pd.DataFrame, test_fnames: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """The model's test probabilities, rows exactly ``test_fnames`` in order."""
    what = "test table"
    _check_columns(model, what, df, classes)
    have, want = df["fname"].tolist(), list(test_fnames)
    if have != want:
        missing, extra = set(want) - set(have), set(have) - set(want)
        if missing:
            detail = f"misses {len(missing)} test clip(s) (e.g. {_examples(missing)})"
        elif extra:
            detail = f"has {len(extra)} row(s) not in the test set (e.g. {_examples(extra)})"
        else:
            detail = "rows are not in sample_submission order"
        raise StackInputError(f"model {model!r}: {what} {detail}")
    return _probabilities(model, what, df, classes)


def _read(path, model: str, what: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"model {model!r}: {what} {path} is missing: "
                                "train that model first (python -m pipeline.train)")
    return pd.read_csv(path, dtype={"fname": str})


def load_level2_inputs(work: WorkDir, models: Sequence[str], classes: Sequence[str] | None = None,
                       test_fnames: Sequence[str] | None = None, require_test: bool = True,
                       unverified_weight: float | None = None) -> Level2Inputs:
    """Join the listed models' OOF (and test) tables against ``folds.csv``.

    ``classes`` defaults to the first model's class columns; ``test_fnames``
    (sample_submission order) to the first model's test table. Non-verified
    rows weigh ``unverified_weight`` (None: every row weighs 1).
    """
    if not models:
        raise StackInputError("no models to stack")
    if len(set(models)) != len(models):
        raise StackInputError(f"models listed twice: {list(models)}")
    folds = load_folds(work)
    for col in ("fname", "label", "manually_verified", "fold"):
        if col not in folds.columns:
            raise StackInputError(f"{work.folds_csv}: missing column {col}")
    if folds["fname"].duplicated().any():
        raise StackInputError(f"{work.folds_csv}: duplicate fnames")
    oof_frames = {m: _read(work.oof_csv(m), m, "OOF table") for m in models}
    if classes is None:
        classes = class_columns(oof_frames[models[0]])
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(folds["label"]) - set(index))
    if unknown:
        raise StackInputError(f"{work.folds_csv}: labels {unknown} are not among the classes")
    oof = {m: check_oof_table(m, df, folds, classes) for m, df in oof_frames.items()}

    test: dict[str, np.ndarray] = {}
    if require_test:
        test_frames = {m: _read(work.test_csv(m), m, "test table") for m in models}
        if test_fnames is None:
            test_fnames = test_frames[models[0]]["fname"].tolist()
        test = {m: check_test_table(m, df, test_fnames, classes) for m, df in test_frames.items()}
    return level2_inputs(
        oof, y=folds["label"].map(index).to_numpy(dtype=int), folds=folds["fold"].to_numpy(dtype=int),
        classes=classes, fnames=folds["fname"].tolist(),
        verified=folds["manually_verified"].astype(int).to_numpy() == 1, test=test,
        test_fnames=list(test_fnames) if test_fnames is not None else [], unverified_weight=unverified_weight)
