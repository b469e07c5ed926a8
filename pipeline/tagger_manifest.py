"""What a tagger is made of: the manifest of a finished run, resolved from its
work directory (read only) or read from an exported tagger's ``tagger.json``.

A manifest (a JSON-able dict) names the classes, the training class prior,
the final entry of the stack (``final``: the learner file, the stacked
models in level-2 column order, the ones it actually uses, the MFCC cache of
its extra columns) and, per used level-1 model, its kind's entry
(:mod:`pipeline.tagger_models`: per-fold files, cached features, inference
settings), plus the run's scores. Every path in it is relative to the root
(work directory or exported tagger), which share one layout for these files.

Which settings a model was trained with: the run's stages log their
resolved settings (``logs/<run id>/<stage>.config.yaml``), but a later run
may have used other ones, and a stage that found a model up to date did not
retrain it. So each logged config (newest first) is tried, with the model's
settings as today's schema resolves them and as they were logged
(:func:`pipeline.tagger_models.model_specs`), and each input the model may
have read (the cache today's code would key from those settings, then every
cache folder of that input in the work directory:
:meth:`~pipeline.tagger_models.Level1Predictor.candidates`); the combination
whose recomputed fold fingerprint (:func:`pipeline.fold_training.fold_inputs`,
the function the training stage keys its folds with: the model's settings,
its input's cache key, labels, folds, seed, clips) equals the fingerprint in
the model's fold ``summary.json`` files is what its folds were trained
with. The cache folders it names hold the exact feature settings
(``params.json``, :mod:`pipeline.tagger_features`). Trying the caches on
disk, not only the key today's code computes, keeps a run taggable after a
code change that only changes how a cache key is spelled.

A work directory that is missing or unfinished is refused with one line
naming what is missing and the stage that makes it.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import yaml

from pipeline.cli import UserError
from pipeline.config import yaml_numbers  # YAML 1.1 reads 1e-4 as a string: the config loader's own fix
from pipeline.fingerprints import content_hash
from pipeline.workdir import WorkDir, read_json

log = logging.getLogger("tagger")

#: version of the manifest (and of an exported tagger's layout); bump when either changes shape
TAGGER_FORMAT = 1
#: an exported tagger's manifest, at its root
MANIFEST = "tagger.json"
#: the final learner's record, relative to the root (stacking.level2.final_learner_path)
LEARNER_FILE = "stacking/final_learner.joblib"


def is_export(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_manifest(path, model: str | None = None) -> dict:
    """The manifest of a finished work directory or of an exported tagger at ``path``;
    with ``model``, that of a tagger of that one level-1 model (its test table's numbers)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder: pass a finished work directory (./run_all.sh --work {path} "
                        "makes one) or an exported tagger (python -m pipeline.export)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder: pass a finished work directory or an exported tagger")
    if not is_export(path):
        return resolve_work_dir(path, model)
    manifest = read_export(path)
    return single_model(manifest, model) if model else manifest


# ---------------------------------------------------------------------------
# an exported tagger
def library_versions() -> dict:
    """Versions of the libraries whose saved objects a tagger holds (Keras models, pickled learners)."""
    import importlib.metadata as md

    import keras
    out = {"keras": keras.__version__, "backend": keras.backend.backend()}
    for pkg in ("numpy", "scikit-learn", "lightgbm", "tensorflow", "librosa"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def check_versions(manifest: dict) -> list[str]:
    """The libraries whose version differs from the export's (logged as a warning by the loader)."""
    want = manifest.get("versions") or {}
    if not want:
        return []
    have = library_versions()
    return [f"{k} {want[k]} (here {have.get(k)})" for k in want if have.get(k) != want[k]]


def read_export(path: Path) -> dict:
    manifest = read_json(Path(path) / MANIFEST)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != TAGGER_FORMAT:
        raise UserError(f"{Path(path) / MANIFEST}: tagger format {fmt!r}, this code reads format {TAGGER_FORMAT}: "
                        "export it again with this version (python -m pipeline.export)")
    return manifest


def single_model(manifest: dict, model: str) -> dict:
    """The manifest of a tagger of one of ``manifest``'s level-1 models."""
    if model not in manifest["models"]:
        raise UserError(f"model {model!r} is not in this tagger (it has {', '.join(manifest['models'])}); tag from "
                        "the work directory, or export it with that model")
    return {**manifest, "final": {"name": model, "kind": "model", "learner": None, "models": [model],
                                  "used": [model], "mfcc": None},
            "models": {model: manifest["models"][model]}}


# ---------------------------------------------------------------------------
# a work directory
def _require(work: WorkDir, rel: str, stage: str, what: str = "") -> Path:
    path = work.root / rel
    if not path.exists():
        raise UserError(f"{work.root} is not a finished run: {rel} is missing{what}; run `{stage} --work "
                        f"{work.root}` (./run_all.sh --work {work.root} runs every stage)")
    return path


def used_models(record: dict) -> list[str]:
    """The stacked models the final entry needs, in level-2 column order. A blend gives a
    model of weight exactly 0 no say at all (0 x its log-probabilities or probabilities
    adds exactly 0), so such a model is neither loaded nor exported; the level-2 input
    gets the class prior in its columns."""
    if record["kind"] == "model":
        return [record["final"]]
    from stacking.blends import Blend, LearnedGeometricBlend
    learner, models = record["learner"], list(record["models"])
    if isinstance(learner, LearnedGeometricBlend):
        weights = dict(zip(learner.models_, learner.coef_))
    elif isinstance(learner, Blend) and learner.weights is not None:
        weights = {m: learner.weights.get(m, 0.0) for m in models}
    else:
        return models
    return [m for m in models if float(weights.get(m, 0.0)) != 0.0]


def needs_extra_columns(record: dict) -> bool:
    """Whether the final learner reads the level-2 array's extra per-clip columns (the MFCC
    statistics). The blends and the logistic fusion take only the probability blocks
    (:meth:`stacking.base.Level2Layout.probabilities`); any other learner is assumed to read them."""
    from stacking.blends import Blend, LearnedGeometricBlend
    from stacking.learners import LogisticFusion
    learner = record["learner"]
    if learner is None or not learner.layout.n_extra:
        return False
    return not isinstance(learner, (Blend, LearnedGeometricBlend, LogisticFusion))


def logged_configs(work: WorkDir):
    """(path, resolved config) of every distinct settings file the run's stages logged, newest first."""
    paths = {}
    for p in work.logs_dir.glob("*/*.config.yaml"):
        try:
            paths[p.resolve()] = p.stat().st_mtime_ns
        except OSError:
            continue
    seen = set()
    root = work.root.resolve()
    for p in sorted(paths, key=lambda q: (-paths[q], str(q))):
        try:
            text = p.read_text()
        except OSError:
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            cfg = yaml_numbers(yaml.safe_load(text))
        except yaml.YAMLError:
            continue
        if isinstance(cfg, dict):
            yield (p.relative_to(root) if p.is_relative_to(root) else p), cfg


def _fold_fingerprint(work: WorkDir, model: str, n_folds: int) -> str:
    fps = []
    for k in range(n_folds):
        summary = read_json(work.fold_dir(model, k) / "summary.json")
        if not summary or "fingerprint" not in summary:
            raise UserError(f"{work.root} is not a finished run: fold {k} of {model!r} is not trained; run "
                            f"`python -m pipeline.train --model {model} --work {work.root}`")
        fps.append(summary["fingerprint"])
    if len(set(fps)) != 1:
        raise UserError(f"the folds of {model!r} were trained with different settings or data: run "
                        f"`python -m pipeline.train --model {model} --work {work.root}` to retrain the stale ones")
    return fps[0]


def resolve_model(work: WorkDir, model: str, configs: list, folds: pd.DataFrame, classes: list[str]) -> dict:
    """``model``'s manifest entry: the first (logged config, settings, input) whose recomputed
    fold fingerprint is the one its folds recorded (see the module doc); refused when none is."""
    from pipeline.fold_training import fold_inputs
    from pipeline.tagger_models import model_specs, predictor_for

    n_folds = int(folds["fold"].max()) + 1
    want = _fold_fingerprint(work, model, n_folds)
    test = _require(work, f"predictions/{model}_test.csv", "python -m pipeline.train")
    # what fold_inputs reads of the dataset: the test clips in order and the classes (as the tables hold them)
    dataset = SimpleNamespace(test_fnames=pd.read_csv(test, dtype={"fname": str}, usecols=["fname"])["fname"].tolist(),
                              classes=list(classes))
    last_error, tried = None, 0
    for where, cfg in configs:
        for spec in model_specs(cfg, model):
            kind = predictor_for(model, spec)  # an unknown kind is refused by name
            try:
                for key, entry in kind.candidates(cfg, work, spec, n_folds):
                    tried += 1
                    if fold_inputs(cfg, work, spec, key, folds, dataset).fingerprint == want:
                        entry["settings_from"] = str(where)
                        for rel in kind.files(entry):
                            _require(work, rel, "python -m pipeline.train", f" (needed by {model})")
                        return entry
            except Exception as exc:  # a config this run cannot have trained with (other labels, ...)
                last_error = f"{where}: {type(exc).__name__}: {exc}"
                log.debug("%s: %s", model, last_error)
    raise UserError(f"cannot tell which settings {model!r} was trained with: none of the {len(configs)} settings "
                    f"files logged under {work.logs_dir} ({tried} candidate inputs) gives the fingerprint of its "
                    f"folds ({want})" + (f"; last error: {last_error}" if last_error else "")
                    + f". Rerun the command that trained it (python -m pipeline.train --model {model} --work "
                    f"{work.root} with the run's --config/--set): finished folds are skipped and the settings "
                    "logged. If the code changed since the run in a way that changes its fingerprints, tag with "
                    "the code that trained it, or export the tagger with it (python -m pipeline.export)")


def _finite(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else None


def run_scores(work: WorkDir, summary: dict, models: list[str]) -> dict:
    """The run's scores as the stack recorded them: the final entry's, the score table, each model's."""
    table = []
    if (work.stacking_dir / "scores.csv").exists():
        df = pd.read_csv(work.stacking_dir / "scores.csv")
        table = [{k: _finite(v) if k not in ("name", "kind") else v for k, v in row.items()}
                 for row in df.to_dict("records")]
    per_model = {}
    for m in models:
        s = read_json(work.model_dir(m) / "summary.json") or {}
        per_model[m] = {k: _finite(s[k]) for k in ("oof_map3", "oof_map3_verified", "test_map3", "test_labelled",
                                                  "test_clips") if k in s}
    return {"final": summary.get("final"), "final_kind": summary.get("final_kind"),
            "cv_map3": _finite(summary.get("cv_map3_all")), "cv_map3_se": _finite(summary.get("cv_map3_all_se")),
            "cv_map3_verified": _finite(summary.get("cv_map3_verified")),
            "test_map3": _finite(summary.get("test_map3")), "selection": summary.get("selection_text"),
            "table": table, "models": per_model}


def resolve_work_dir(path: Path, model: str | None = None) -> dict:
    """The manifest of the finished run in work directory ``path`` (nothing is written there);
    with ``model``, of a tagger of that one trained model (stacked or not, used by the final
    learner or not)."""
    from pipeline.cv import load_folds
    from stacking.level2 import load_final_learner

    work = WorkDir(path)  # the folder exists: nothing is created
    _require(work, "clips.csv", "python -m pipeline.features")
    _require(work, "folds.csv", "python -m pipeline.folds")
    summary_path = _require(work, "stacking/summary.json", "python -m stacking.stack",
                            " (train the models first: python -m pipeline.train)")
    summary = read_json(summary_path)
    try:
        record = load_final_learner(work.root / LEARNER_FILE)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if record["fingerprint"] != summary.get("fingerprint"):
        raise UserError(f"{work.root / LEARNER_FILE} does not belong to the stack in {summary_path}: rerun "
                        f"`python -m stacking.stack --work {work.root}`")
    used = used_models(record)
    wanted = [model] if model else used
    files = (summary.get("fingerprint") or {}).get("files", {})
    for m in wanted:
        if m in record["models"] and content_hash(work.test_csv(m)) != files.get(f"{m}_test"):
            raise UserError(f"{m!r} changed since the stack was made (its test table differs): rerun "
                            f"`python -m stacking.stack --work {work.root}`")
    folds = load_folds(work)
    configs = list(logged_configs(work))
    if not configs:
        raise UserError(f"{work.logs_dir} holds no logged settings (<run id>/<stage>.config.yaml): the tagger needs "
                        "them to find each model's settings; rerun the run's stages (finished work is skipped)")
    classes = list(record["classes"])
    entries = {m: resolve_model(work, m, configs, folds, classes) for m in wanted}
    final = {"name": record["final"], "kind": record["kind"],
             "learner": None if record["learner"] is None else LEARNER_FILE,
             "models": list(record["models"]), "used": used,
             "mfcc": record["mfcc"] if needs_extra_columns(record) else None}
    prior = np.asarray(record["prior"], dtype=np.float64)
    manifest = {"format": TAGGER_FORMAT, "classes": classes, "prior": [float(v) for v in prior], "final": final,
                "models": entries, "scores": run_scores(work, summary, list(record["models"]))}
    return single_model(manifest, model) if model else manifest


def manifest_files(manifest: dict) -> list[str]:
    """Every file a tagger of ``manifest`` reads, relative to its root (what an export copies)."""
    from pipeline.tagger_features import feature_dir
    from pipeline.tagger_models import PREDICTORS
    files: list[str] = []
    refs = []
    for entry in manifest["models"].values():
        kind = PREDICTORS[entry["kind"]]
        files += kind.files(entry)
        refs += kind.features(entry)
    mfcc = manifest["final"].get("mfcc")
    if mfcc:
        refs.append((mfcc["name"], mfcc["key"]))
    for name, key in dict.fromkeys(refs):
        folder = feature_dir(Path(""), name, key)
        files += [str(folder / "params.json"), str(folder / "stats.json")]
    if manifest["final"].get("learner"):
        files.append(manifest["final"]["learner"])
    return list(dict.fromkeys(files))
