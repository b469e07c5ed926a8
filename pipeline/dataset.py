"""The FSDKaggle2018 dataset contract.

Two folder layouts are recognised, automatically, by :func:`load_dataset`:

``kaggle`` (the competition download, or any folder arranged like it)
    ``train.csv`` (fname,label[,manually_verified]), ``audio_train/``,
    ``sample_submission.csv`` (the test fnames, in order) and ``audio_test/``;
    optionally ``test_labels.csv`` (fname,label[,usage]) for scoring. The test
    labels may cover any subset of the test clips.

``zenodo`` (the FSDKaggle2018 release from Zenodo, unzipped under one folder, used in place)
    ``FSDKaggle2018.meta/train_post_competition.csv``
    (fname,label,manually_verified,freesound_id,license),
    ``FSDKaggle2018.audio_train/``,
    ``FSDKaggle2018.meta/test_post_competition_scoring_clips.csv``
    (fname,label,usage,freesound_id,license; usage is Public or Private) and
    ``FSDKaggle2018.audio_test/``. The test set is the rows of the scoring-clips
    CSV, in file order, and their labels are the test labels. (The audio folder
    also holds the unscored padding clips of the competition; they are not
    part of the test set.)

When both are present the kaggle layout wins (and the log says so). The
dataset folder is only ever read. Everything is validated on load, and every
failure is one :class:`DatasetError` naming the file and the row (as a
1-based line number in the CSV, the header being line 1) and what to do.
"""
from __future__ import annotations

import codecs
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: distinct labels one submission row lists (MAP@3), so the fewest classes a dataset may have
MIN_CLASSES = 3
#: values of the ``usage`` column of the test labels
USAGE_VALUES = ("Public", "Private")


class DatasetError(ValueError):
    """The dataset folder breaks the contract; the message says where."""


@dataclass(frozen=True)
class Layout:
    """Where one layout keeps its files, relative to the dataset root."""
    name: str
    train_csv: str
    test_csv: str                 # the test set, in order
    train_audio: str
    test_audio: str
    labels_csv: str | None        # separate optional test labels (kaggle); None: test_csv holds them
    description: str

    def paths(self, root: Path) -> dict[str, Path]:
        out = {"train_csv": root / self.train_csv, "test_csv": root / self.test_csv,
               "train_audio": root / self.train_audio, "test_audio": root / self.test_audio}
        if self.labels_csv:
            out["labels_csv"] = root / self.labels_csv
        return out


KAGGLE = Layout("kaggle", "train.csv", "sample_submission.csv", "audio_train", "audio_test", "test_labels.csv",
                "Kaggle competition layout")
ZENODO = Layout("zenodo", "FSDKaggle2018.meta/train_post_competition.csv",
                "FSDKaggle2018.meta/test_post_competition_scoring_clips.csv",
                "FSDKaggle2018.audio_train", "FSDKaggle2018.audio_test", None,
                "FSDKaggle2018 release from Zenodo")
LAYOUTS = {KAGGLE.name: KAGGLE, ZENODO.name: ZENODO}


@dataclass
class Dataset:
    root: Path
    train: pd.DataFrame           # fname, label, manually_verified (0/1)
    test_fnames: list[str]        # test set order (sample_submission / scoring clips)
    classes: list[str]            # sorted unique train labels
    test_labels: pd.DataFrame | None = None   # fname, label of the labelled test clips (any subset); None: no labels
    layout: str = KAGGLE.name     # "kaggle" or "zenodo"
    train_audio_dir: Path | None = None       # defaults to the layout's folder under root
    test_audio_dir: Path | None = None
    test_usage: pd.Series | None = None       # "Public"/"Private" per labelled test clip, indexed by fname
    train_csv: Path | None = None             # the CSVs the tables came from (for messages and reports)
    test_csv: Path | None = None
    test_labels_csv: Path | None = None       # None without test labels

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        spec = LAYOUTS[self.layout]
        if self.train_audio_dir is None:
            self.train_audio_dir = self.root / spec.train_audio
        if self.test_audio_dir is None:
            self.test_audio_dir = self.root / spec.test_audio

    def audio_path(self, split: str, fname: str) -> Path:
        if split == "train":
            return self.train_audio_dir / fname
        if split == "test":
            return self.test_audio_dir / fname
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def class_prior(self) -> np.ndarray:
        counts = self.train["label"].value_counts()
        prior = np.array([counts.get(c, 0) for c in self.classes], dtype=np.float64)
        return prior / prior.sum()

    @property
    def n_test_labelled(self) -> int:
        """How many test clips have a label (0 without test labels)."""
        return 0 if self.test_labels is None else int(self.test_labels["fname"].isin(self.test_fnames).sum())

    def test_label_indices(self) -> np.ndarray | None:
        """(n_test,) int class index of each test clip in test order, -1 where the
        clip is unlabelled; ``None`` when the dataset has no test labels at all."""
        if self.test_labels is None:
            return None
        index = self.class_index
        truth = dict(zip(self.test_labels["fname"], self.test_labels["label"]))
        return np.array([index.get(truth.get(f), -1) for f in self.test_fnames], dtype=np.int64)


# ---------------------------------------------------------------------------
# reading

def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text of ``raw`` (a UTF-8 BOM is dropped); undecodable bytes name their line."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        start = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        text = raw[start:end if end >= 0 else len(raw)].decode("latin-1").rstrip("\r")
        if len(text) > 80:
            text = text[:77] + "..."
        bad = raw[exc.start:exc.end].hex(" ")
        raise DatasetError(f"{path}: line {line}: not valid UTF-8 (byte(s) 0x{bad} at column {exc.start - start + 1} "
                           f"of {text!r}), perhaps Latin-1/Windows-1252: re-save the file as UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)") from None


def read_csv_table(path: Path, required: list[str]) -> pd.DataFrame:
    """A dataset CSV (fname as text) with its ``required`` columns; a bad file or row is one DatasetError naming
    the file and line."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    text = _decode(path, raw)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True,
                         skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: line 1: the file is empty (expected a header with {', '.join(required)})") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{path}: cannot parse CSV: {exc}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: line 1: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    # blank lines stay in the index (dropped here), so index + 2 is still the line number
    df = df[~(df == "").all(axis=1)]
    if df.empty:
        raise DatasetError(f"{path}: line 2: no data rows")
    for col in df.columns:
        df[col] = df[col].str.strip()
    return df


def _line(idx) -> int:
    return int(idx) + 2  # header is line 1


def _case_twin(folder: Path) -> Path | None:
    """A sibling of ``folder`` whose name differs only in letter case."""
    parent = folder.parent
    if not parent.is_dir():
        return None
    for p in parent.iterdir():
        if p.name != folder.name and p.name.lower() == folder.name.lower() and p.is_dir():
            return p
    return None


def check_fnames(df: pd.DataFrame, path: Path, audio_dir: Path | None) -> None:
    """Refuse blank or duplicated fnames (and, with ``audio_dir``, a missing folder or files), naming the CSV line."""
    blank = df.index[df["fname"] == ""]
    if len(blank):
        raise DatasetError(f"{path}: line {_line(blank[0])}: empty fname")
    dup = df["fname"].duplicated(keep="first")
    if dup.any():
        idx = df.index[dup][0]
        first = df.index[(df["fname"] == df.at[idx, "fname"])][0]
        raise DatasetError(f"{path}: line {_line(idx)}: duplicate fname {df.at[idx, 'fname']!r} "
                           f"(first seen on line {_line(first)})")
    if audio_dir is not None:
        if not audio_dir.is_dir():
            twin = _case_twin(audio_dir)
            hint = (f"; {twin.name!r} exists, a name that differs only in letter case: rename it to {audio_dir.name!r}"
                    if twin is not None else "")
            raise DatasetError(f"{audio_dir}: audio folder not found (listed by {path.name}){hint}")
        present = set(p.name for p in audio_dir.iterdir())
        absent = ~df["fname"].isin(present)
        if absent.any():
            by_lower: dict[str, str] = {}
            for name in sorted(present):
                by_lower.setdefault(name.lower(), name)
            case_only = df.loc[absent, "fname"].str.lower().isin(by_lower)
            idx = df.index[absent][0]
            fname = df.at[idx, "fname"]
            counts = f"{int(absent.sum())} listed file(s) missing"
            if case_only.any():
                counts += f", {int(case_only.sum())} of them only by letter case"
            twin = by_lower.get(fname.lower())
            if twin is not None:
                raise DatasetError(f"{path}: line {_line(idx)}: {fname!r} does not exist in {audio_dir}, but {twin!r} "
                                   f"does: a case mismatch (file names are case-sensitive); rename the file or fix "
                                   f"the name in {path.name} ({counts})")
            raise DatasetError(f"{path}: line {_line(idx)}: {fname!r} does not exist in {audio_dir} ({counts})")


def _check_labels(df: pd.DataFrame, path: Path, empty_hint: str = "") -> None:
    """No empty label, no whitespace inside a label (submission rows are space-separated)."""
    blank = df.index[df["label"] == ""]
    if len(blank):
        raise DatasetError(f"{path}: line {_line(blank[0])}: empty label{empty_hint}")
    spaced = df["label"].str.contains(r"\s", regex=True)
    if spaced.any():
        idx = df.index[spaced][0]
        label = df.at[idx, "label"]
        raise DatasetError(f"{path}: line {_line(idx)}: label {label!r} contains whitespace, but a submission "
                           f"separates its labels with spaces; rename the class without whitespace "
                           f"(e.g. {'_'.join(label.split())!r}) everywhere it appears")


def _check_known(df: pd.DataFrame, path: Path, classes: list[str], train_csv: Path) -> None:
    unknown = ~df["label"].isin(classes)
    if unknown.any():
        idx = df.index[unknown][0]
        raise DatasetError(f"{path}: line {_line(idx)}: label {df.at[idx, 'label']!r} never seen in {train_csv.name}")


def _check_usage(df: pd.DataFrame, path: Path) -> pd.Series:
    bad = ~df["usage"].isin(USAGE_VALUES)
    if bad.any():
        idx = df.index[bad][0]
        raise DatasetError(f"{path}: line {_line(idx)}: usage must be {' or '.join(USAGE_VALUES)}, "
                           f"got {df.at[idx, 'usage']!r}")
    return pd.Series(df["usage"].to_numpy(), index=pd.Index(df["fname"].to_numpy(), name="fname"), name="usage")


def _read_train(train_csv: Path, audio_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    train = read_csv_table(train_csv, ["fname", "label"])
    _check_labels(train, train_csv)
    if "manually_verified" in train.columns:
        bad = ~train["manually_verified"].isin(["0", "1"])
        if bad.any():
            idx = train.index[bad][0]
            raise DatasetError(f"{train_csv}: line {_line(idx)}: manually_verified must be 0 or 1, "
                               f"got {train.at[idx, 'manually_verified']!r}")
        train["manually_verified"] = train["manually_verified"].astype(int)
    else:
        log.info("%s has no manually_verified column: every row counts as verified", train_csv)
        train["manually_verified"] = 1
    last = _line(train.index[-1])
    classes = sorted(train["label"].unique())
    if len(classes) < MIN_CLASSES:
        raise DatasetError(f"{train_csv}: lines 2-{last}: needs at least {MIN_CLASSES} classes (a submission row "
                           f"lists {MIN_CLASSES} distinct labels), found {len(classes)}: {classes}; "
                           f"add clips of more classes")
    check_fnames(train, train_csv, audio_dir)
    return train[["fname", "label", "manually_verified"]].reset_index(drop=True), classes


# ---------------------------------------------------------------------------
# layout detection

def _layout_state(spec: Layout, root: Path) -> tuple[bool, bool]:
    """(complete: both CSVs are there, partial: anything of the layout is there)."""
    paths = spec.paths(root)
    complete = paths["train_csv"].is_file() and paths["test_csv"].is_file()
    markers = set(paths.values()) | {p.parent for p in paths.values()}
    markers.discard(root)         # the meta folder of the zenodo layout counts, the root itself does not
    return complete, any(p.exists() for p in markers)


def _looked_for(spec: Layout, root: Path) -> str:
    paths = spec.paths(root)
    names = []
    for key, p in paths.items():
        rel = p.relative_to(root).as_posix() + ("/" if key.endswith("audio") else "")
        optional = key == "labels_csv"
        names.append(f"{rel} ({'optional, ' if optional else ''}{'found' if p.exists() else 'missing'})")
    return f"{spec.name} layout ({spec.description}): " + ", ".join(names)


def _neither_error(root: Path) -> DatasetError:
    hints = []
    if root.name.startswith("FSDKaggle2018."):
        hints.append(f"{root.name} is a folder of the Zenodo release: point at its parent {root.parent}")
    try:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if any(_layout_state(spec, sub)[0] for spec in LAYOUTS.values()):
                hints.append(f"{sub} holds a dataset: point at it")
    except OSError:
        pass
    msg = (f"{root}: no dataset found. Looked for the {_looked_for(KAGGLE, root)}; and for the "
           f"{_looked_for(ZENODO, root)}. Point --data at the folder that holds one of them"
           f"{' (' + '; '.join(hints) + ')' if hints else ''}.")
    return DatasetError(msg)


def detect_layout(root: str | Path) -> str:
    """``"kaggle"`` or ``"zenodo"``: which layout ``root`` holds (see the module doc).

    A layout whose two CSVs are present wins, kaggle first; failing that, the
    one layout of which anything is present (so that loading it names the
    missing file); else :class:`DatasetError` listing what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found" + (" (it is a file)" if root.exists() else ""))
    k_complete, k_any = _layout_state(KAGGLE, root)
    z_complete, z_any = _layout_state(ZENODO, root)
    if k_complete:
        if z_any:
            log.info("%s holds both the kaggle and (%s) the zenodo layout: preferring kaggle (%s, %s)",
                     root, "complete" if z_complete else "part of", KAGGLE.train_csv, KAGGLE.test_csv)
        return KAGGLE.name
    if z_complete:
        if k_any:
            log.info("%s: the kaggle layout is incomplete (%s); using the complete zenodo layout", root,
                     ", ".join(f"{p.name} missing" for k, p in KAGGLE.paths(root).items()
                               if k.endswith("csv") and k != "labels_csv" and not p.exists()))
        return ZENODO.name
    if k_any != z_any:
        return KAGGLE.name if k_any else ZENODO.name
    raise _neither_error(root)


# ---------------------------------------------------------------------------
# loading

def load_dataset(root: str | Path, check_files: bool = True) -> Dataset:
    """Load and validate a dataset folder (either layout); raise :class:`DatasetError` on any breach.

    ``check_files=False`` skips the audio folders (only the tables are read)."""
    root = Path(root)
    spec = LAYOUTS[detect_layout(root)]
    paths = spec.paths(root)
    log.info("dataset %s: %s layout (%s)", root, spec.name, spec.description)
    train_csv, test_csv = paths["train_csv"], paths["test_csv"]
    train_dir, test_dir = paths["train_audio"], paths["test_audio"]
    train, classes = _read_train(train_csv, train_dir if check_files else None)

    test_labels = test_usage = labels_csv = None
    if spec.labels_csv is None:      # zenodo: the scoring clips are the test set and hold its labels
        test = read_csv_table(test_csv, ["fname", "label", "usage"])
        check_fnames(test, test_csv, test_dir if check_files else None)
        _check_labels(test, test_csv)
        _check_known(test, test_csv, classes, train_csv)
        test_usage = _check_usage(test, test_csv)
        test_fnames = test["fname"].tolist()
        test_labels = test[["fname", "label"]].reset_index(drop=True)
        labels_csv = test_csv
    else:
        sub = read_csv_table(test_csv, ["fname"])
        check_fnames(sub, test_csv, test_dir if check_files else None)
        test_fnames = sub["fname"].tolist()
        if paths["labels_csv"].is_file():
            labels_csv = paths["labels_csv"]
            lab = read_csv_table(labels_csv, ["fname", "label"])
            check_fnames(lab, labels_csv, None)
            stray = ~lab["fname"].isin(set(test_fnames))
            if stray.any():
                idx = lab.index[stray][0]
                raise DatasetError(f"{labels_csv}: line {_line(idx)}: fname {lab.at[idx, 'fname']!r} is not a test "
                                   f"clip (not listed in {test_csv.name}); remove the row or list the clip in "
                                   f"{test_csv.name} ({int(stray.sum())} such row(s))")
            _check_labels(lab, labels_csv, " (leave the row out if the clip has no label)")
            _check_known(lab, labels_csv, classes, train_csv)
            if "usage" in lab.columns:
                test_usage = _check_usage(lab, labels_csv)
            test_labels = lab[["fname", "label"]].reset_index(drop=True)

    ds = Dataset(root=root, train=train, test_fnames=test_fnames, classes=classes, test_labels=test_labels,
                 layout=spec.name, train_audio_dir=train_dir, test_audio_dir=test_dir, test_usage=test_usage,
                 train_csv=train_csv, test_csv=test_csv, test_labels_csv=labels_csv)
    if test_labels is not None and ds.n_test_labelled < len(test_fnames):
        log.info("%s labels %d of the %d test clips; the rest are unlabelled", labels_csv.name,
                 ds.n_test_labelled, len(test_fnames))
    return ds


def check_labels_known(labels: pd.Series, classes: list[str], source: Path) -> None:
    """Every label in ``labels`` must be a training class."""
    unknown = ~labels.isin(classes)
    if unknown.any():
        idx = labels.index[unknown][0]
        raise DatasetError(f"{source}: line {_line(idx)}: label {labels.loc[idx]!r} never seen in training")
