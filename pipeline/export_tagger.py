"""Export a finished run as a self-contained tagger folder that
:meth:`pipeline.tagger.Tagger.load` reads without the work directory.

``python -m pipeline.export --work W --out DIR`` calls :func:`export_tagger`.

The folder keeps the work directory's layout for what it holds, so the same
code reads both:

    tagger.json                                   the manifest (pipeline.tagger_manifest): format version,
                                                  classes, class prior, the final entry, each model's kind,
                                                  files and inference settings, the run's scores, provenance
    stacking/final_learner.joblib                 the final learner as the stacking stage fit it (if any)
    models/<model>/fold<k>/{best.keras,model.joblib}   every fold model the final learner uses
                                                  (and the extractor folds of a model on embeddings);
                                                  Keras models without their optimizer state
    features/<feature>-<key>/{params.json,stats.json}  each feature's exact settings and normalisation
    features/embeddings-<source>-<key>/{params.json,stats.json}   an embeddings store's statistics

It needs this repository's code (the feature functions, the networks' custom
layers, the learners' classes) and compatible library versions (recorded in
``tagger.json`` and checked on load), but nothing of the work directory or
the dataset. An unfinished run is refused (see :mod:`pipeline.tagger_manifest`).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.cli import UserError
from pipeline.tagger_manifest import MANIFEST, TAGGER_FORMAT, library_versions, manifest_files, resolve_work_dir
from pipeline.workdir import atomic_write_json, read_json

log = logging.getLogger("export")


def copy_model_file(src: Path, dst: Path) -> None:
    """Copy one file of the tagger; a Keras model without its optimizer state (a fold's
    ``best.keras`` keeps Adam's two moments of every weight, two thirds of the file, which
    inference never reads): loaded uncompiled and saved again, same weights, same outputs."""
    if src.suffix == ".keras":
        from models import load_model
        load_model(src, compile=False).save(dst)
    else:
        shutil.copy2(src, dst)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_tagger(work, out) -> dict:
    """Write the tagger of the finished run in ``work`` to the new folder ``out`` (refused when it
    exists and is not empty); returns {"path", "files", "bytes", "models", "final"}."""
    work, out = Path(work), Path(out)
    if not work.is_dir():
        raise UserError(f"--work {work}: no such folder: pass a finished work directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; pass a new folder")
    if out.resolve().is_relative_to(work.resolve()):
        raise UserError(f"--out {out}: inside the work directory; pass a folder outside it")
    manifest = resolve_work_dir(work)
    files = manifest_files(manifest)
    manifest = {**manifest, "versions": library_versions(),
                "source": {"work": str(work.resolve()), "dataset": read_json(work / "dataset.json"),
                           "exported": time.strftime("%Y-%m-%d %H:%M:%S")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            copy_model_file(work / rel, dst)
        atomic_write_json(manifest, tmp / MANIFEST)  # last: a folder without it is not a tagger
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = folder_size(out)
    log.info("exported the tagger of %s (final %s over %s) -> %s: %d files, %.1f MB (format %d)", work,
             manifest["final"]["name"], ", ".join(manifest["models"]), out, len(files) + 1, size / 1e6,
             TAGGER_FORMAT)
    return {"path": str(out), "files": len(files) + 1, "bytes": size, "models": list(manifest["models"]),
            "final": manifest["final"]["name"]}
