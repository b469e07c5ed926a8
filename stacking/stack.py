"""Stage: level-2 learning on the out-of-fold tables.

``python -m stacking.stack --config quick --data DIR --work DIR`` loads the
listed models' OOF/test tables, scores every single model, blend and stacker
by cross-validation on the shared folds (never on rows a learner was fit
on), writes ``<work>/stacking/`` (scores.csv, <learner>_oof.csv,
final_test.csv, submissions/<name>.csv, summary.json) and the final
``<work>/submission.csv`` from the chosen learner fit on all OOF rows.

Settings (preset section ``stacking:``, every key optional):
  models             models to stack (default: run.models that have OOF and test tables)
  learners           subset of mean, geomean, rank, logreg, lightgbm (default: all)
  final              "best" (highest cross-validated map3_all) or a model/blend/learner name
  unverified_weight  weight of non-verified rows for logreg and lightgbm (null: 1)
  weights            model -> weight for the blends (default: equal)
  mfcc_feature       feature whose MFCC statistics LightGBM also sees (default "mfcc")
  lightgbm           {n_estimators, learning_rate, max_depth, num_leaves, min_child_samples, n_jobs}
  logreg             {C, per_model_weights, class_bias}
Resumable: when summary.json records the same input fingerprint (file
mtimes and sizes of every input table, the resolved settings) and every
output exists, the stage does nothing.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureStore
from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.config import ConfigError, param_hash
from pipeline.dataset import load_dataset
from pipeline.predictions import probs_frame, write_table
from pipeline.submission import write_submission
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json, read_json
from stacking.blends import BLENDS
from stacking.evaluate import Evaluation, evaluate, label_indices_for_test
from stacking.features import mfcc_statistic_names, mfcc_statistics
from stacking.inputs import StackInputError, StackInputs, load_stack_inputs
from stacking.learners import LightGBMStacker, LogisticFusion

log = logging.getLogger("stacking")

KNOWN_LEARNERS = ["mean", "geomean", "rank", "logreg", "lightgbm"]
DEFAULTS = {
    "models": None,
    "learners": None,
    "final": "best",
    "unverified_weight": 0.6,
    "weights": None,
    "mfcc_feature": "mfcc",
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.05, "max_depth": 3, "num_leaves": 8,
                 "min_child_samples": 20, "n_jobs": 1},
    "logreg": {"C": 1.0, "per_model_weights": False, "class_bias": False},
}


def stacking_settings(cfg: dict) -> dict:
    """The ``stacking`` section over the defaults; unknown names are refused."""
    section = cfg.get("stacking") or {}
    if not isinstance(section, dict):
        raise ConfigError("stacking: must be a mapping")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"stacking: unknown setting(s) {unknown} (known: {', '.join(DEFAULTS)})")
    out = copy.deepcopy(DEFAULTS)
    for key, value in section.items():
        if key in ("lightgbm", "logreg"):
            bad = sorted(set(value or {}) - set(DEFAULTS[key]))
            if bad:
                raise ConfigError(f"stacking.{key}: unknown setting(s) {bad} (known: {', '.join(DEFAULTS[key])})")
            out[key].update(value or {})
        else:
            out[key] = copy.deepcopy(value)
    learners = KNOWN_LEARNERS if out["learners"] is None else list(out["learners"])
    bad = [n for n in learners if n not in KNOWN_LEARNERS]
    if bad:
        raise ConfigError(f"stacking.learners: unknown {bad} (known: {', '.join(KNOWN_LEARNERS)})")
    out["learners"] = learners
    return out


def select_models(cfg: dict, settings: dict, work: WorkDir) -> list[str]:
    """Listed models must all have tables; by default, run.models that do."""
    def has_tables(m):
        return work.oof_csv(m).exists() and work.test_csv(m).exists()

    listed = settings["models"]
    if listed:
        missing = [m for m in listed if not has_tables(m)]
        if missing:
            raise FileNotFoundError(
                f"stacking.models lists {missing} but their tables are missing "
                f"({', '.join(str(work.oof_csv(m)) + ' / ' + str(work.test_csv(m)) for m in missing)}): "
                "train them first (python -m pipeline.train)")
        return list(listed)
    run_models = list((cfg.get("run") or {}).get("models") or [])
    models = [m for m in run_models if has_tables(m)]
    skipped = [m for m in run_models if m not in models]
    if skipped:
        log.warning("run.models %s have no OOF/test tables in %s: stacking without them",
                    skipped, work.predictions_dir)
    if not models:
        raise FileNotFoundError(f"no model of run.models {run_models} has OOF and test tables in "
                                f"{work.predictions_dir}: train them first (python -m pipeline.train)")
    return models


def learner_factories(settings: dict, models: list[str], seed: int) -> dict:
    """name -> unfitted estimator (evaluate clones it for every fit)."""
    weights = settings["weights"]
    if weights:
        dropped = sorted(set(weights) - set(models))
        if dropped:
            log.warning("stacking.weights names %s, which are not stacked: ignored", dropped)
        weights = {m: w for m, w in weights.items() if m in models}
    uw = settings["unverified_weight"]
    out = {}
    for name in settings["learners"]:
        if name in BLENDS:
            out[name] = BLENDS[name](weights=weights or None)
        elif name == "logreg":
            out[name] = LogisticFusion(unverified_weight=uw, **settings["logreg"])
        elif name == "lightgbm":
            out[name] = LightGBMStacker(unverified_weight=uw, random_state=seed, **settings["lightgbm"])
    return out


def mfcc_store(cfg: dict, settings: dict, work: WorkDir) -> FeatureStore | None:
    """The MFCC cache LightGBM's statistics come from, or None (logged) when absent."""
    name = settings["mfcc_feature"]
    if not name:
        return None
    spec = (cfg.get("features") or {}).get(name)
    if spec is None:
        log.info("feature %r is not defined in the preset: LightGBM runs without MFCC statistics", name)
        return None
    store = FeatureStore(work, name, spec, cfg.get("audio", {}))
    if not store.index("train"):
        log.info("no cached %s feature in %s: LightGBM runs without MFCC statistics "
                 "(run python -m pipeline.features to add them)", name, store.root)
        return None
    return store


def _stat(path: Path) -> list | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_mtime_ns, st.st_size]


def input_fingerprint(cfg: dict, settings: dict, models: list[str], data_dir: Path, work: WorkDir,
                      store: FeatureStore | None) -> dict:
    files = {"folds.csv": _stat(work.folds_csv)}
    for m in models:
        files[f"{m}_oof"] = _stat(work.oof_csv(m))
        files[f"{m}_test"] = _stat(work.test_csv(m))
    for name in ("train.csv", "sample_submission.csv", "test_labels.csv"):
        files[name] = _stat(Path(data_dir) / name)
    mfcc = None
    if store is not None:
        idx = sorted(store.root.glob("*/shard-*.index.json"))
        mfcc = [store.key, len(idx), max((p.stat().st_mtime_ns for p in idx), default=0)]
    resolved = dict(settings, models=models, seed=cfg.get("seed", 2018))
    return {"settings": param_hash(resolved), "files": files, "mfcc": mfcc, "data": str(Path(data_dir).resolve())}


def _outputs(work: WorkDir, names: list[str], learners: list[str]) -> list[Path]:
    d = work.stacking_dir
    return ([d / "scores.csv", d / "final_test.csv", d / "summary.json", work.submission_csv]
            + [d / f"{n}_oof.csv" for n in learners] + [d / "submissions" / f"{n}.csv" for n in names])


def _up_to_date(work: WorkDir, fingerprint: dict) -> dict | None:
    summary = read_json(work.stacking_dir / "summary.json")
    if not summary or summary.get("fingerprint") != fingerprint:
        return None
    if "names" not in summary or "learners" not in summary:
        return None
    if not all(p.exists() for p in _outputs(work, summary["names"], summary["learners"])):
        return None
    final_sub = work.stacking_dir / "submissions" / f"{summary['final']}.csv"
    if work.submission_csv.read_bytes() != final_sub.read_bytes():  # another stage wrote submission.csv
        return None
    return summary


def _remove_stale(d: Path, learners: list[str], names: list[str]) -> None:
    """Drop outputs of learners/models no longer in the run, so the folder
    matches scores.csv."""
    stale = [p for p in d.glob("*_oof.csv") if p.name[:-len("_oof.csv")] not in learners]
    stale += [p for p in (d / "submissions").glob("*.csv") if p.stem not in names]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d output(s) of an earlier run: %s", len(stale), ", ".join(p.name for p in stale))


def choose_final(ev: Evaluation, final: str) -> str:
    names = ev.scores["name"].tolist()
    if final in (None, "best"):
        return str(ev.scores.loc[ev.scores["map3_all"].idxmax(), "name"])
    if final not in names:
        raise ConfigError(f"stacking.final {final!r} is neither 'best' nor one of {names}")
    return final


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def add_mfcc_statistics(inputs: StackInputs, store: FeatureStore) -> None:
    inputs.extra = mfcc_statistics(store, "train", inputs.fnames)
    inputs.test_extra = mfcc_statistics(store, "test", inputs.test_fnames)
    inputs.extra_names = mfcc_statistic_names(inputs.extra.shape[1] // 4)


def run_stacking(cfg: dict, data_dir, work: WorkDir) -> dict:
    """Run (or skip, when nothing changed) the stacking stage; returns the summary."""
    settings = stacking_settings(cfg)
    models = select_models(cfg, settings, work)
    clash = sorted(set(models) & set(settings["learners"]))
    if clash:
        raise ConfigError(f"model name(s) {clash} clash with learner names: rename the model(s)")
    store = mfcc_store(cfg, settings, work) if "lightgbm" in settings["learners"] else None
    fingerprint = input_fingerprint(cfg, settings, models, data_dir, work, store)
    done = _up_to_date(work, fingerprint)
    if done is not None:
        log.info("stacking inputs unchanged since the last run: keeping %s (final: %s)", work.stacking_dir, done["final"])
        print(work.submission_csv)
        return {**done, "skipped": True}

    dataset = load_dataset(data_dir, check_files=False)  # only the tables matter here, not the audio
    inputs = load_stack_inputs(work, models, classes=dataset.classes, test_fnames=dataset.test_fnames)
    log.info("stacking %d model(s) %s on %d clips (%d verified), %d folds, %d classes; learners: %s",
             len(models), models, len(inputs.y), int(inputs.verified.sum()), len(np.unique(inputs.folds)),
             len(inputs.classes), settings["learners"])
    if store is not None:
        add_mfcc_statistics(inputs, store)
        log.info("LightGBM also sees %d MFCC statistics per clip (%s)", inputs.extra.shape[1], store.name)
    test_y = label_indices_for_test(inputs.test_fnames, dataset.test_labels, inputs.classes)
    if test_y is not None and not (test_y >= 0).any():
        log.warning("test_labels.csv labels none of the test clips: no test scores")

    ev = evaluate(inputs, learner_factories(settings, models, cfg.get("seed", 2018)), test_y=test_y)
    final = choose_final(ev, settings["final"])

    d = work.stacking_dir
    (d / "submissions").mkdir(parents=True, exist_ok=True)
    atomic_write_csv(ev.scores, d / "scores.csv")
    for name in settings["learners"]:
        write_table(probs_frame(inputs.fnames, ev.oof[name], inputs.classes, inputs.folds), d / f"{name}_oof.csv")
    for name, proba in ev.test.items():
        write_submission(d / "submissions" / f"{name}.csv", inputs.test_fnames, proba, inputs.classes)
    write_table(probs_frame(inputs.test_fnames, ev.test[final], inputs.classes), d / "final_test.csv")
    write_submission(work.submission_csv, inputs.test_fnames, ev.test[final], inputs.classes)

    row = ev.scores.set_index("name").loc[final]
    summary = {
        "final": final, "final_kind": ev.kinds[final],
        "cv_map3_all": _num(row["map3_all"]), "cv_map3_verified": _num(row["map3_verified"]),
        "test_map3": _num(row["map3_test"]) if "map3_test" in row else None,
        "models": models, "learners": settings["learners"], "names": list(ev.test),
        "mfcc_statistics": store.name if store is not None else None,
        "submission": str(work.submission_csv), "fingerprint": fingerprint,
    }
    atomic_write_json(summary, d / "summary.json")
    _remove_stale(d, settings["learners"], list(ev.test))
    log.info("scores (cross-validated on folds.csv):\n%s", ev.scores.to_string(index=False, float_format="%.4f"))
    log.info("final: %s (%s), cv MAP@3 %.4f%s", final, ev.kinds[final], summary["cv_map3_all"],
             "" if summary["test_map3"] is None else f", test MAP@3 {summary['test_map3']:.4f}")
    print(work.submission_csv)
    return {**summary, "skipped": False}


def main(argv=None):
    args, cfg, work = start_stage("Stack the models' out-of-fold predictions.", "stacking", argv)
    with timed_stage(work, "stacking"):
        run_stacking(cfg, args.data, work)


def cli(argv=None) -> int:
    """run_main, plus a refused level-1 table exits 2 with one clear line."""
    try:
        return run_main(main, argv)
    except StackInputError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
