"""Load the level-1 tables a stacker learns from, and refuse bad ones.

Every model's OOF table must cover exactly the clips of ``folds.csv``, with
the same fold per clip: a table made with other folds would let a stacker
see predictions from models that trained on the rows it is scored on. Every
refusal is a ``StackInputError`` (a ``ValueError``) naming the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.folds import load_folds
from pipeline.predictions import class_columns
from pipeline.workdir import WorkDir


class StackInputError(ValueError):
    """A level-1 table the stacker must not learn from; the message names the model."""


@dataclass
class StackInputs:
    """Level-1 predictions aligned to ``folds.csv`` order (train) and
    sample_submission order (test)."""
    fnames: list[str]
    y: np.ndarray                      # (n,) int class indices
    verified: np.ndarray               # (n,) bool
    folds: np.ndarray                  # (n,) int
    classes: list[str]
    oof: dict[str, np.ndarray]         # model -> (n, K)
    test: dict[str, np.ndarray] = field(default_factory=dict)   # model -> (n_test, K)
    test_fnames: list[str] = field(default_factory=list)
    extra: np.ndarray | None = None        # optional per-clip features (n, F), e.g. MFCC statistics
    test_extra: np.ndarray | None = None   # the same for the test clips (n_test, F)
    extra_names: list[str] | None = None

    @property
    def models(self) -> list[str]:
        return list(self.oof)


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


def load_stack_inputs(work: WorkDir, models: Sequence[str], classes: Sequence[str] | None = None,
                      test_fnames: Sequence[str] | None = None, require_test: bool = True) -> StackInputs:
    """Join the listed models' OOF (and test) tables against ``folds.csv``.

    ``classes`` defaults to the first model's class columns; ``test_fnames``
    (sample_submission order) to the first model's test table.
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
    return StackInputs(
        fnames=folds["fname"].tolist(),
        y=folds["label"].map(index).to_numpy(dtype=int),
        verified=folds["manually_verified"].astype(int).to_numpy() == 1,
        folds=folds["fold"].to_numpy(dtype=int),
        classes=classes, oof=oof, test=test,
        test_fnames=list(test_fnames) if test_fnames is not None else [])
