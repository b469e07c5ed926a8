"""Tag new audio with a finished run: the Python API behind ``python -m pipeline.predict``.

    from pipeline.tagger import Tagger
    tagger = Tagger.load("work")             # a finished work directory, or an exported tagger
    table = tagger.predict(["a.wav", "b.flac"])   # fname, label (top 3), error, one column per class
    probs = tagger.predict_waveform(y, sr)   # (n_classes,) for one decoded clip
    tagger.classes                           # the class order of every probability vector

What a file goes through is what the run's test clips went through:

1. decode and compute every cached feature the models read, with the
   training run's settings and the feature stage's code, in memory
   (:mod:`pipeline.tagger_features`; nothing is written to the run);
2. every fold of every level-1 model the final learner uses predicts it with
   the pipeline's own code (:mod:`pipeline.tagger_models`); the folds are
   combined by geometric mean as :func:`pipeline.fold_training.assemble_predictions`
   does, and an unusable file gets the training class prior from each model;
3. the final entry of the stack (the learner the stacking stage fit on all
   out-of-fold rows, or a single model) combines the models' probabilities
   as it did for ``stacking/final_test.csv``.

The pipeline's tables are written with 6 significant digits and read back
by the next step; the tagger rounds at the same points
(:func:`pipeline.predictions.as_written`), so it gives the run's own numbers
for its own test clips (``tests/test_predict.py``). Files are decoded and
predicted in batches (``batch_files``; every model predicts a whole batch's
windows in large fixed-shape batches), with a progress bar.

A bad file (missing, unreadable, unknown format, empty, silent) gets a row
with its error and what the pipeline gives an unusable test clip: every
level-1 model's class prior, combined by the final learner (for every blend,
the class prior itself); it is logged by name and never stops the others.
The rank blend ranks each clip among the clips tagged together, as it did
among the test clips, so its output depends on the batch it is part of.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from pipeline.audio import AudioError
from pipeline.cli import UserError
from pipeline.metrics import top_k_indices
from pipeline.predictions import as_written, geometric_mean, normalize_rows
from pipeline.tagger_features import FeatureSet, decode
from pipeline.tagger_manifest import check_versions, load_manifest
from pipeline.tagger_models import PREDICTORS
from pipeline.workdir import atomic_write_bytes, atomic_write_csv

log = logging.getLogger("tagger")

#: the columns of a result table before the class columns
RESULT_COLUMNS = ("fname", "label", "error")


class Tagger:
    """A finished run's ensemble, ready to tag audio (see the module doc).

    ``classes``: the class order of every probability vector; ``final``: the
    final entry's name (a learner, or a model); ``models``: the level-1 models
    it runs; ``scores``: the run's scores as the stacking stage recorded them."""

    def __init__(self, root, manifest: dict, progress: bool = True):
        from stacking.level2 import load_final_learner
        self.root, self.manifest, self.progress = Path(root), manifest, progress
        self.classes: list[str] = list(manifest["classes"])
        clash = sorted(set(RESULT_COLUMNS) & set(self.classes))
        if clash:
            raise UserError(f"class(es) {clash} have the names of result columns ({', '.join(RESULT_COLUMNS)})")
        self.prior = np.asarray(manifest["prior"], dtype=np.float64)
        final = manifest["final"]
        self.final, self.final_kind = final["name"], final["kind"]
        self.learner = None
        if final["learner"]:
            try:
                record = load_final_learner(self.root / final["learner"])
            except FileNotFoundError as exc:
                raise UserError(str(exc)) from None
            if list(record["models"]) != list(final["models"]) or list(record["classes"]) != self.classes:
                raise UserError(f"{self.root / final['learner']} was fit on other models or classes than the "
                                "manifest names: export the tagger again")
            self.learner = record["learner"]
        kinds = {m: PREDICTORS.get(entry["kind"]) for m, entry in manifest["models"].items()}
        unknown = {m: manifest["models"][m]["kind"] for m, k in kinds.items() if k is None}
        if unknown:
            raise UserError(f"model(s) {unknown} are of a kind this code cannot run (it runs {', '.join(PREDICTORS)})")
        refs = [ref for m, kind in kinds.items() for ref in kind.features(manifest["models"][m])]
        mfcc = final.get("mfcc")
        self.mfcc_ref = (mfcc["name"], mfcc["key"]) if mfcc else None
        if self.mfcc_ref:
            refs.append(self.mfcc_ref)
        self.features = FeatureSet(self.root, refs)
        self.models = {m: kinds[m](self.root, m, manifest["models"][m], len(self.classes), self.features)
                       for m in manifest["models"]}
        self.last_run: dict = {}
        differ = check_versions(manifest)
        if differ:
            log.warning("the tagger was exported with other library versions: %s; its saved models and learner "
                        "may load differently", ", ".join(differ))

    @classmethod
    def load(cls, path, model: str | None = None, progress: bool = True) -> "Tagger":
        """The tagger of a finished work directory or an exported tagger at ``path`` (refused,
        naming what is missing, when the run is unfinished). With ``model``: one level-1 model of
        it alone (its numbers are the run's ``predictions/<model>_test.csv``)."""
        start = time.perf_counter()
        tagger = cls(path, load_manifest(path, model), progress)
        log.info("tagger %s: final %s (%s) over %s; %d class(es); loaded in %.1f s", path, tagger.final,
                 tagger.final_kind, ", ".join(tagger.models), len(tagger.classes), time.perf_counter() - start)
        return tagger

    @property
    def scores(self) -> dict:
        return self.manifest.get("scores", {})

    # ------------------------------------------------------------------
    def predict_proba(self, sources: Sequence, names: Sequence[str] | None = None, batch_files: int = 256,
                      raise_errors: bool = False) -> tuple[np.ndarray, list[str]]:
        """(n, K) final probabilities and one error string per source ("" when usable).
        ``sources``: file paths or ``(y, sr)`` pairs; ``names`` name them in the log."""
        sources = list(sources)
        names = [str(s) if not isinstance(s, tuple) else "<waveform>" for s in sources] if names is None \
            else list(names)
        n, k = len(sources), len(self.classes)
        tables = {m: np.zeros((n, k)) for m in self.models}
        extra = np.full((n, self._n_extra()), np.nan)
        errors = [""] * n
        seconds, start = 0.0, time.perf_counter()
        busy = {"features": 0.0, **{m: 0.0 for m in self.models}}  # seconds spent per step
        batch_files = max(1, int(batch_files))
        with tqdm(total=n, unit="file", desc="tagging", disable=not self.progress or n == 0) as bar:
            for lo in range(0, n, batch_files):
                hi = min(n, lo + batch_files)
                tick = time.perf_counter()
                with threadpool_limits(1):  # as in the feature stage: BLAS threads only contend (10x slower here)
                    ids, arrays, good, audio = self._decode(sources, names, range(lo, hi), errors, raise_errors)
                seconds += audio
                batch = self.features.batch(ids, arrays)
                if self.mfcc_ref is not None and ids:
                    from stacking.features import mfcc_statistics
                    extra[lo + np.asarray(good)] = mfcc_statistics(batch.store(self.mfcc_ref), batch.split, ids)
                busy["features"] += time.perf_counter() - tick
                for m, predictor in self.models.items():
                    tick = time.perf_counter()
                    table = np.tile(self.prior, (hi - lo, 1))
                    if ids:  # each fold's test table, combined as assemble_predictions combines them
                        table[good] = geometric_mean([as_written(p) for p in predictor.predict_folds(batch)])
                    tables[m][lo:hi] = as_written(table)  # the model's test table
                    busy[m] += time.perf_counter() - tick
                bar.update(hi - lo)
        probs = self._final(tables, extra, n)
        wall = time.perf_counter() - start
        bad = [names[i] for i in range(n) if errors[i]]
        self.last_run = {"files": n, "bad": len(bad), "audio_seconds": seconds, "wall_seconds": wall,
                         "busy_seconds": {k: round(v, 3) for k, v in busy.items()}}
        if n:
            log.info("tagged %d file(s) (%.1f s of audio) in %.1f s: %.1f files/s, %.0fx real time; %d bad%s", n,
                     seconds, wall, n / max(wall, 1e-9), seconds / max(wall, 1e-9), len(bad),
                     f" ({', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''})" if bad else "")
        return probs, errors

    def _decode(self, sources, names, positions, errors, raise_errors):
        """Decode ``sources[positions]`` and compute their features: (clip ids, feature -> id -> array,
        offsets of the usable ones within ``positions``, seconds of audio); a bad one gets its error
        in ``errors`` (or raises, with ``raise_errors``)."""
        ids, arrays, good, seconds = [], {ref: {} for ref in self.features.stores}, [], 0.0
        for j, i in enumerate(positions):
            try:
                y, sr, where = decode(sources[i])
                feats = self.features.compute(y, sr, where)
            except AudioError as exc:
                if raise_errors:
                    raise
                errors[i] = f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason
                log.warning("%s: %s; it gets the class prior", names[i], errors[i])
                continue
            except Exception as exc:  # any other failure of one file must not stop the others
                if raise_errors:
                    raise
                errors[i] = f"failed: {type(exc).__name__}: {exc}"
                log.warning("%s: %s; it gets the class prior", names[i], errors[i], exc_info=True)
                continue
            seconds += len(y) / sr
            ids.append(str(i))
            good.append(j)
            for ref, arr in feats.items():
                arrays[ref][str(i)] = arr
        return ids, arrays, good, seconds

    def _n_extra(self) -> int:
        return 0 if self.learner is None else int(self.learner.layout.n_extra)

    def _final(self, tables: dict[str, np.ndarray], extra: np.ndarray, n: int) -> np.ndarray:
        """The final entry over the models' tables (rows normalised as the stacker reads them)."""
        if n == 0:
            return np.zeros((0, len(self.classes)))
        if self.learner is None:
            return normalize_rows(tables[self.final])
        unused = np.tile(self.prior, (n, 1))  # a model of weight 0 (see tagger_manifest.used_models)
        mats = [normalize_rows(tables[m]) if m in tables else unused for m in self.learner.layout.models]
        X = self.learner.layout.join(mats, extra if extra.shape[1] else None)
        return normalize_rows(self.learner.predict_proba(X))

    def predict(self, paths: Sequence, names: Sequence[str] | None = None, top_k: int = 3,
                batch_files: int = 256) -> pd.DataFrame:
        """One row per path: ``fname`` (``names``, default the paths as given), ``label`` (the
        top ``top_k`` classes, space-separated), ``error`` ("" for a usable file) and one
        probability column per class."""
        paths = list(paths)
        names = [str(p) for p in paths] if names is None else list(names)
        probs, errors = self.predict_proba(paths, names, batch_files)
        return result_frame(names, probs, self.classes, errors, self._check_top_k(top_k))

    def predict_waveform(self, y: np.ndarray, sr: int) -> np.ndarray:
        """(K,) probabilities of one decoded clip (samples, or samples x channels, at rate ``sr``);
        an unusable clip (empty, silent, non-finite) raises :class:`~pipeline.audio.AudioError`."""
        probs, _ = self.predict_proba([(y, int(sr))], raise_errors=True)
        return probs[0]

    def _check_top_k(self, top_k: int) -> int:
        if not 1 <= int(top_k) <= len(self.classes):
            raise UserError(f"--top-k {top_k}: must be between 1 and the number of classes ({len(self.classes)})")
        return int(top_k)


# ---------------------------------------------------------------------------
# results
def result_frame(names: Sequence[str], probs: np.ndarray, classes: Sequence[str], errors: Sequence[str],
                 top_k: int = 3) -> pd.DataFrame:
    """fname, label (top ``top_k`` classes, space-separated: the submission's format), error, classes."""
    top = np.asarray(classes)[top_k_indices(probs, top_k)] if len(probs) else np.zeros((0, top_k), dtype=str)
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64).reshape(len(names), len(classes)), columns=list(classes))
    df.insert(0, "error", list(errors))
    df.insert(0, "label", [" ".join(row) for row in top])
    df.insert(0, "fname", list(names))
    return df


def result_json(df: pd.DataFrame, tagger: Tagger, top_k: int) -> dict:
    """The JSON form of a result table: the classes, the final entry and one record per file."""
    classes = tagger.classes
    probs = df[classes].to_numpy(dtype=np.float64)
    files = [{"fname": row.fname, "labels": row.label.split(), "error": row.error or None,
              "probabilities": {c: float(f"{p:.6g}") for c, p in zip(classes, probs[i])}}
             for i, row in enumerate(df[list(RESULT_COLUMNS)].itertuples(index=False))]
    return {"classes": classes, "final": tagger.final, "final_kind": tagger.final_kind, "models": list(tagger.models),
            "top_k": top_k, "files": files}


def write_result(df: pd.DataFrame, out: Path, tagger: Tagger, top_k: int) -> Path:
    """The result table as ``.csv`` (probabilities with 6 significant digits, as every table of the
    pipeline) or ``.json`` (:func:`result_json`)."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        atomic_write_bytes(out, (json.dumps(result_json(df, tagger, top_k), indent=1) + "\n").encode())
    elif out.suffix.lower() == ".csv":
        atomic_write_csv(df, out, float_format="%.6g")
    else:
        raise UserError(f"--out {out}: the file name must end in .csv or .json")
    return out


def summary_lines(df: pd.DataFrame, classes: Sequence[str], top_k: int) -> list[str]:
    """A readable line per file: its top classes with their probabilities, or its error."""
    lines = []
    for _, row in df.iterrows():
        labels = row["label"].split()[:top_k]
        ranked = "  ".join(f"{c} {row[c]:.3f}" for c in labels)
        lines.append(f"{row['fname']}\t{ranked}" + (f"\t(error: {row['error']}; class prior)" if row["error"] else ""))
    return lines


# ---------------------------------------------------------------------------
# the command line's inputs and outputs
def audio_files(audio_dir: Path) -> list[Path]:
    """The regular, non-hidden files directly in ``audio_dir``, by name (each gets a row; a
    file that is not audio gets its error)."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise UserError(f"--audio-dir {audio_dir}: not a folder")
    return sorted((p for p in audio_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def submission_inputs(sample_csv: Path, files: Sequence[Path] | None, audio_dir: Path | None):
    """(fnames in the sample submission's order, the path of each): from ``audio_dir``, or the
    ``files`` matched by file name. A listed clip with no file gets a row marked missing."""
    from pipeline.dataset import check_fnames, read_csv_table  # the dataset's CSV reader: line-numbered errors
    sample_csv = Path(sample_csv)
    df = read_csv_table(sample_csv, ["fname"])
    check_fnames(df, sample_csv, None)
    fnames = df["fname"].tolist()
    if audio_dir is not None:
        paths = [Path(audio_dir) / f for f in fnames]
    else:
        by_name: dict[str, Path] = {}
        for p in map(Path, files or []):
            if p.name in by_name and by_name[p.name] != p:
                raise UserError(f"two files are named {p.name} ({by_name[p.name]}, {p}): a submission row names "
                                "a clip by its file name")
            by_name[p.name] = p
        unlisted = sorted(set(by_name) - set(fnames))
        if unlisted:
            log.warning("%d file(s) not listed in %s are left out: %s", len(unlisted), sample_csv.name,
                        ", ".join(unlisted[:10]))
        paths = [by_name.get(f, Path(audio_dir or ".") / f"<no file named {f}>") for f in fnames]
    found = sum(p.is_file() for p in paths)
    if not found:
        raise UserError(f"none of the {len(fnames)} clips {sample_csv} lists has a file "
                        f"({'in ' + str(audio_dir) if audio_dir else 'among the files given'}): check --audio-dir")
    if found < len(paths):
        log.warning("%d of the %d clips %s lists have no file: their rows get the class prior", len(paths) - found,
                    len(paths), sample_csv.name)
    return fnames, paths


def tag(path, files: Sequence[str] = (), audio_dir=None, out=None, top_k: int = 3, sample_submission=None,
        model: str | None = None, batch_files: int = 256, progress: bool = True) -> pd.DataFrame:
    """What ``python -m pipeline.predict`` does: load the tagger at ``path``, tag ``files`` or
    every file in ``audio_dir``, and write the result table (``out``: .csv or .json; none:
    print a line per file) or, with ``sample_submission``, a validated Kaggle submission in
    that file's order at ``out``."""
    from pipeline.submission import write_submission
    if files and audio_dir is not None:
        raise UserError("give FILES... or --audio-dir DIR, not both")
    if not files and audio_dir is None:
        raise UserError("nothing to tag: give FILES... or --audio-dir DIR")
    if sample_submission:
        if out is None or Path(out).suffix.lower() != ".csv":
            raise UserError("--sample-submission writes a Kaggle submission: pass --out PATH.csv")
        if int(top_k) != 3:
            raise UserError(f"--top-k {top_k}: a Kaggle submission lists exactly 3 labels per clip")
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {out}: the file name must end in .csv or .json")
    if sample_submission:
        fnames, paths = submission_inputs(Path(sample_submission), files, audio_dir)
    elif audio_dir is not None:
        paths = audio_files(Path(audio_dir))
        fnames = [p.name for p in paths]
        if not paths:
            raise UserError(f"--audio-dir {audio_dir}: no files in it")
    else:
        paths, fnames = [Path(f) for f in files], [str(f) for f in files]
    tagger = Tagger.load(path, model=model, progress=progress)
    top_k = tagger._check_top_k(top_k)
    df = tagger.predict(paths, fnames, top_k=top_k, batch_files=batch_files)
    if sample_submission:
        write_submission(Path(out), fnames, df[tagger.classes].to_numpy(), tagger.classes)
        log.info("submission of %d clip(s) in %s's order -> %s", len(fnames), Path(sample_submission).name, out)
    elif out is not None:
        write_result(df, Path(out), tagger, top_k)
        log.info("%d row(s) -> %s", len(df), out)
    else:
        print("\n".join(summary_lines(df, tagger.classes, top_k)))
    return df
