"""Harder variants of an existing dataset, for judging the pipeline on more than one small test set.

``fsdd-hard``: the full ``../shared/data/fsdd`` saturates (test MAP@3 ~0.995),
so differences between selection rules vanish in it. This variant keeps its
whole test set but trains on a seeded subsample with more label noise::

    python -m data.variants fsdd-hard --source ../shared/data/fsdd --out DIR --seed S \
        [--per-class 30] [--unverified 0.5] [--wrong 0.4] [--force]

writes, in the Kaggle layout:

- ``train.csv``: ``per_class`` clips per class (classes by the *clean* label;
  every clip of a class with fewer), of which ``round(unverified * n)`` per
  class get ``manually_verified=0`` and, of those, ``round(wrong * n_unverified)``
  per class a wrong label drawn uniformly from the other classes. The true
  labels come from the source's ``train_clean_labels.csv`` when it has one
  (so the injected noise is on top of clean labels), else from its train
  table (whose own noise then adds to the injected one; a warning says so).
  Verified clips are always correctly labelled.
- ``train_clean_labels.csv``: the true label of every subsampled clip.
- ``sample_submission.csv`` and ``test_labels.csv``: the source's, unchanged
  (copied byte for byte from a Kaggle-layout source; written from the
  scoring-clips table of a Zenodo-layout one).
- ``audio_train/`` (the subsample) and ``audio_test/`` (every test clip):
  symbolic links to the absolute source paths; no audio is copied or changed.
- ``variant.json``: the recipe (source, seed, fractions) and the counts.

Everything drawn depends only on (source tables, seed, fractions): the same
arguments give byte-identical CSVs. The source folder is only read. An
existing ``--out`` is replaced only with ``--force`` and only when it holds
an earlier variant (its ``variant.json``); the new one is built beside it and
renamed into place. Any refused input is one ``error: ...`` line, exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from data.common import other_label, swap_into_place
from pipeline.dataset import DatasetError, load_dataset

log = logging.getLogger("data.variants")

VARIANT_VERSION = 1
MARKER = "variant.json"


class VariantError(ValueError):
    """A refused input or argument (reported as one line)."""


def _fraction(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise VariantError(f"--{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _clean_labels(source: Path, train: pd.DataFrame, classes: list[str]) -> tuple[pd.Series, str]:
    """fname -> true label, and where it came from."""
    path = source / "train_clean_labels.csv"
    if not path.is_file():
        log.warning("%s has no train_clean_labels.csv: the true labels are taken from its train table, "
                    "so any noise already there adds to the injected noise", source)
        return train.set_index("fname")["label"], "train table"
    try:
        clean = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise VariantError(f"{path}: cannot be read as a CSV ({exc})") from None
    if not {"fname", "label"} <= set(clean.columns):
        raise VariantError(f"{path}: needs the columns fname,label (has {','.join(clean.columns)})")
    clean = clean.drop_duplicates("fname").set_index("fname")["label"]
    missing = [f for f in train["fname"] if f not in clean.index]
    if missing:
        raise VariantError(f"{path}: no clean label for {len(missing)} train clip(s), e.g. {missing[0]!r}")
    clean = clean.loc[train["fname"]]
    unknown = sorted(set(clean) - set(classes))
    if unknown:
        raise VariantError(f"{path}: label(s) {unknown[:3]} are not classes of the train table")
    return clean, path.name


def make_fsdd_hard(source, out, seed: int, per_class: int = 30, unverified: float = 0.5, wrong: float = 0.4,
                   force: bool = False) -> dict:
    """Build the fsdd-hard variant of ``source`` in ``out`` (see the module doc); returns its recipe."""
    source = Path(source)
    out = Path(out)
    if not source.exists():
        raise VariantError(f"--source {source}: not found (pass the dataset folder, e.g. ../shared/data/fsdd)")
    if not source.is_dir():
        raise VariantError(f"--source {source}: is a file, not a dataset folder")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise VariantError(f"--per-class must be a whole number >= 1, got {per_class!r}")
    unverified, wrong = _fraction("unverified", unverified), _fraction("wrong", wrong)
    src_abs, out_abs = Path(os.path.abspath(source)), Path(os.path.abspath(out))
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise VariantError(f"--out {out}: is inside --source {source}, which is only read; pick another folder")
    if out.exists():
        if not out.is_dir():
            raise VariantError(f"--out {out}: exists and is a file")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise VariantError(f"--out {out}: exists, is not empty and holds no {MARKER} (not a variant "
                                   "made here); pick an empty or new folder")
            if not force:
                raise VariantError(f"--out {out}: already holds a variant; pass --force to replace it")

    try:
        ds = load_dataset(source, check_files=False)
    except DatasetError as exc:
        raise VariantError(f"--source {source}: {exc}") from None
    classes = list(ds.classes)
    if len(classes) < 3:
        raise VariantError(f"--source {source}: has {len(classes)} classes; a submission needs at least 3")
    train = ds.train.sort_values("fname", kind="stable").reset_index(drop=True)
    clean, clean_from = _clean_labels(source, train, classes)

    rng = np.random.default_rng(seed)
    rows = []
    short = {}
    for cls in classes:                                  # sorted: the draw order is fixed
        pool = clean.index[clean.values == cls].tolist()  # fname order (the table was sorted)
        if len(pool) < per_class:
            short[cls] = len(pool)
        n = min(per_class, len(pool))
        picked = [pool[i] for i in np.sort(rng.choice(len(pool), size=n, replace=False))]
        n_unv = int(round(unverified * n))
        unv = set(rng.choice(picked, size=n_unv, replace=False).tolist()) if n_unv else set()
        unv_sorted = sorted(unv)
        n_wrong = int(round(wrong * n_unv))
        bad = set(rng.choice(unv_sorted, size=n_wrong, replace=False).tolist()) if n_wrong else set()
        for f in picked:
            label = other_label(rng, classes, cls) if f in bad else cls
            rows.append({"fname": f, "label": label, "manually_verified": 0 if f in unv else 1, "clean": cls})
    if short:
        log.warning("%d class(es) have fewer than %d clips; all of theirs were taken: %s",
                    len(short), per_class, ", ".join(f"{c} ({n})" for c, n in sorted(short.items())))
    sub = pd.DataFrame(rows).sort_values("fname", kind="stable").reset_index(drop=True)

    # audio: every picked train clip and every test clip must exist in the source
    links = []
    for split, fnames, folder in (("train", sub["fname"].tolist(), ds.train_audio_dir),
                                  ("test", list(ds.test_fnames), ds.test_audio_dir)):
        folder = Path(os.path.abspath(folder))
        missing = [f for f in fnames if not (folder / f).is_file()]
        if missing:
            raise VariantError(f"--source {source}: {len(missing)} {split} audio file(s) listed but missing "
                               f"from {folder}, e.g. {missing[0]!r}")
        links += [(split, f, folder / f) for f in fnames]

    n_unv = int((sub["manually_verified"] == 0).sum())
    n_wrong = int((sub["label"] != sub["clean"]).sum())
    recipe = {
        "variant": "fsdd-hard", "version": VARIANT_VERSION, "source": str(src_abs), "source_layout": ds.layout,
        "seed": int(seed), "per_class": per_class, "unverified": unverified, "wrong": wrong,
        "clean_labels_from": clean_from, "classes": len(classes), "train_clips": len(sub),
        "unverified_clips": n_unv, "wrong_labels": n_wrong, "test_clips": len(ds.test_fnames),
        "test_labelled": 0 if ds.test_labels is None else int(len(ds.test_labels)),
    }

    out_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_abs.name}.", dir=out_abs.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "audio_train").mkdir()
        (tmp / "audio_test").mkdir()
        for split, f, target in links:
            os.symlink(target, tmp / f"audio_{split}" / f)
        sub[["fname", "label", "manually_verified"]].to_csv(tmp / "train.csv", index=False, lineterminator="\n")
        sub[["fname", "clean"]].rename(columns={"clean": "label"}).to_csv(
            tmp / "train_clean_labels.csv", index=False, lineterminator="\n")
        if ds.layout == "kaggle":
            shutil.copyfile(ds.test_csv, tmp / "sample_submission.csv")
            if ds.test_labels_csv is not None:
                shutil.copyfile(ds.test_labels_csv, tmp / "test_labels.csv")
        else:
            top3 = " ".join(classes[:3])
            pd.DataFrame({"fname": ds.test_fnames, "label": top3}).to_csv(
                tmp / "sample_submission.csv", index=False, lineterminator="\n")
            lab = ds.test_labels.copy()
            if ds.test_usage is not None:
                lab["usage"] = lab["fname"].map(ds.test_usage)
            lab.to_csv(tmp / "test_labels.csv", index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        (tmp / MARKER).write_text(json.dumps(recipe, indent=2) + "\n")
        swap_into_place(tmp, out_abs)  # replaces an empty folder or, with --force, an earlier variant (links only)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fsdd-hard seed %d: %d train clips (%d classes), %d non-verified, %d wrong labels; %d test clips -> %s",
             seed, len(sub), len(classes), n_unv, n_wrong, len(ds.test_fnames), out)
    return recipe


VARIANTS = {"fsdd-hard": make_fsdd_hard}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.variants",
                                     description="Write a harder variant of a dataset (symlinked audio).")
    sub = parser.add_subparsers(dest="variant", required=True)
    p = sub.add_parser("fsdd-hard", help="seeded train subsample with injected label noise, full test set")
    p.add_argument("--source", required=True, help="dataset folder to read (kaggle or zenodo layout)")
    p.add_argument("--out", required=True, help="folder to write (created; replaced only with --force)")
    p.add_argument("--seed", type=int, required=True, help="random seed of the subsample and the noise")
    p.add_argument("--per-class", type=int, default=30, help="train clips per class (default 30)")
    p.add_argument("--unverified", type=float, default=0.5, help="share marked manually_verified=0 (default 0.5)")
    p.add_argument("--wrong", type=float, default=0.4, help="share of those given a wrong label (default 0.4)")
    p.add_argument("--force", action="store_true", help="replace an earlier variant in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = VARIANTS[args.variant](args.source, args.out, seed=args.seed, per_class=args.per_class,
                                        unverified=args.unverified, wrong=args.wrong, force=args.force)
    except VariantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {recipe['train_clips']} train clips, {recipe['unverified_clips']} non-verified, "
          f"{recipe['wrong_labels']} wrong labels, {recipe['test_clips']} test clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
