"""The level-2 stage's work: load the level-1 tables as arrays, score every
model, blend and stacker by cross-validation on the shared folds, choose the
final entry (:mod:`stacking.selection`), and write the tables, submissions and
summary. The stage ``python -m stacking.stack`` calls :func:`run_stacking`;
its settings and their docs are :class:`pipeline.settings.Stacking`.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureStore
from pipeline.config import ConfigError, section
from pipeline.settings import closest
from pipeline.dataset import load_dataset
from pipeline.predictions import probs_frame, write_table
from pipeline.submission import write_submission
from pipeline.fingerprints import content_hash, param_hash, table_hash
from pipeline.workdir import (WorkDir, atomic_write_bytes, atomic_write_csv, atomic_write_json, read_json,
                              remove_outputs)
from stacking.base import Level2Estimator, Level2Layout
from stacking.evaluate import evaluate, label_indices_for_test
from stacking.features import mfcc_statistic_names, mfcc_statistics
from stacking.inputs import Level2Inputs, load_level2_inputs
from stacking.learners import REGISTRY, LearnerSpec, registered_learners
from stacking.selection import finite_or_none, resolve_default, select_final

log = logging.getLogger("stacking")

def stacking_settings(cfg: dict) -> dict:
    """The ``stacking`` section (pipeline.settings.Stacking: every default and doc), validated; ``learners``
    resolved against the registry (null: every registered learner, in registration order)."""
    out = section(cfg, "stacking")
    known = registered_learners()
    learners = known if out["learners"] is None else list(out["learners"])
    bad = [n for n in learners if n not in known]
    if bad:
        raise ConfigError(f"stacking.learners: unknown {bad}{closest(bad[0], known)}")
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


def selected_learners(settings: dict) -> list[LearnerSpec]:
    """The registered learners ``stacking.learners`` names (all when not
    given), in its order."""
    unknown = [n for n in settings["learners"] if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"stacking.learners: unknown {unknown} (known: {', '.join(REGISTRY)})")
    return [REGISTRY[n] for n in settings["learners"]]


def build_learners(settings: dict, layout: Level2Layout, seed: int) -> dict[str, Level2Estimator]:
    """name -> unfitted estimator of every selected registered learner
    (evaluate clones it for every fit); blend weights naming models that are
    not stacked are dropped (logged) first."""
    weights = settings["weights"]
    if weights:
        dropped = sorted(set(weights) - set(layout.models))
        if dropped:
            log.warning("stacking.weights names %s, which are not stacked: ignored", dropped)
        weights = {m: w for m, w in weights.items() if m in layout.models}
    resolved = dict(settings, weights=weights or None)
    return {spec.name: spec.build(resolved, layout, seed) for spec in selected_learners(settings)}


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


def input_fingerprint(cfg: dict, settings: dict, models: list[str], dataset, work: WorkDir,
                      store: FeatureStore | None) -> dict:
    """What the stage's outputs are made from, by content (an identical
    rewrite of an input table does not count as a change): folds.csv, every
    stacked model's tables, the dataset's tables, the MFCC cache and the
    resolved settings."""
    files = {"folds.csv": content_hash(work.folds_csv)}
    for m in models:
        files[f"{m}_oof"] = content_hash(work.oof_csv(m))
        files[f"{m}_test"] = content_hash(work.test_csv(m))
    data = {"train": table_hash(dataset.train), "test": param_hash(list(dataset.test_fnames), 16),
            "test_labels": None if dataset.test_labels is None else table_hash(dataset.test_labels)}
    mfcc = None
    if store is not None:
        clips = content_hash(work.clips_csv)
        mfcc = [store.key, clips]
    resolved = dict(settings, models=models, seed=cfg.get("seed", 2018))
    return {"settings": param_hash(resolved), "files": files, "mfcc": mfcc, "data": data}


#: what :func:`save_final_learner` writes; bump when its record changes shape (readers check it)
FINAL_LEARNER_FORMAT = 1


def final_learner_path(work: WorkDir) -> Path:
    """``<work>/stacking/final_learner.joblib``: the final entry as the stage fit it (see :func:`save_final_learner`)."""
    return work.stacking_dir / "final_learner.joblib"


def save_final_learner(work: WorkDir, final: str, kind: str, learner, models: list[str], classes: list[str],
                       prior, mfcc: FeatureStore | None, fingerprint: dict) -> Path:
    """Persist the final entry so new clips can be tagged exactly as the test set was
    (:mod:`pipeline.tagger`): the learner fit on all OOF rows (None when the final
    entry is a single model), the stacked models in the level-2 column order, the
    classes, the training class prior (the row a level-1 table gives an unusable
    clip), the MFCC cache the learner's extra columns come from (None: no extra
    columns), and the stage's input fingerprint (the one in summary.json), so a
    reader can tell that the record belongs to the current stack."""
    import joblib
    record = {"format": FINAL_LEARNER_FORMAT, "final": final, "kind": kind, "learner": learner,
              "models": list(models), "classes": list(classes), "prior": [float(v) for v in prior],
              "mfcc": None if mfcc is None else {"name": mfcc.name, "key": mfcc.key},
              "fingerprint": fingerprint}
    buf = io.BytesIO()
    joblib.dump(record, buf)
    path = final_learner_path(work)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_final_learner(path: Path) -> dict:
    """The record :func:`save_final_learner` wrote (FileNotFoundError naming the stage when absent)."""
    import joblib
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m stacking.stack` first (a stack made before "
                                "the final learner was saved is redone by it)")
    record = joblib.load(path)
    if not isinstance(record, dict) or record.get("format") != FINAL_LEARNER_FORMAT:
        raise FileNotFoundError(f"{path} was written by another version of the stacking stage: rerun "
                                "`python -m stacking.stack`")
    return record


def _outputs(work: WorkDir, names: list[str], learners: list[str]) -> list[Path]:
    d = work.stacking_dir
    return ([d / "scores.csv", d / "final_test.csv", d / "summary.json", work.submission_csv,
             final_learner_path(work)]
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


def learner_details(learner) -> dict:
    """What a fitted level-2 learner learnt, for summary.json and the report:
    blend weights, the chosen regularisation, per-model LR weights."""
    out = {}
    if getattr(learner, "weights_", None) is not None:
        out["weights"] = {m: round(float(w), 4) for m, w in learner.weights_.items()}
        out["temperature"] = round(float(learner.temperature_), 4)
    if getattr(learner, "C_", None) is not None:
        out["C"] = float(learner.C_)
    if getattr(learner, "model_weights_", None) is not None:
        out["model_weights"] = {m: round(float(w), 4) for m, w in learner.model_weights_.items()}
    if getattr(learner, "best_params_", None) is not None:
        out["params"] = {k: int(v) for k, v in learner.best_params_.items()}
    return out




def add_mfcc_statistics(inputs: Level2Inputs, store: FeatureStore) -> Level2Inputs:
    """The inputs with the clips' MFCC statistics as extra feature columns."""
    extra = mfcc_statistics(store, "train", inputs.fnames)
    return inputs.with_extra(extra, mfcc_statistics(store, "test", inputs.test_fnames),
                             mfcc_statistic_names(extra.shape[1] // 4))


def run_stacking(cfg: dict, data_dir, work: WorkDir) -> dict:
    """Run (or skip, when nothing changed) the stacking stage; returns the summary."""
    settings = stacking_settings(cfg)
    models = select_models(cfg, settings, work)
    clash = sorted(set(models) & set(settings["learners"]))
    if clash:
        raise ConfigError(f"model name(s) {clash} clash with learner names: rename the model(s)")
    specs = selected_learners(settings)
    store = mfcc_store(cfg, settings, work) if any(s.extra_features for s in specs) else None
    dataset = load_dataset(data_dir, check_files=False)  # only the tables matter here, not the audio
    fingerprint = input_fingerprint(cfg, settings, models, dataset, work, store)
    done = _up_to_date(work, fingerprint)
    if done is not None:
        log.info("stacking inputs unchanged since the last run: keeping %s (final: %s)", work.stacking_dir, done["final"])
        print(work.submission_csv)
        return {**done, "skipped": True}
    # the answer of the previous inputs must not outlive a failure below
    remove_outputs(work.final_outputs() + [final_learner_path(work)], "their stacking inputs changed", log)
    inputs = load_level2_inputs(work, models, classes=dataset.classes, test_fnames=dataset.test_fnames,
                                unverified_weight=settings["unverified_weight"])
    log.info("stacking %d model(s) %s on %d clips (%d verified), %d folds, %d classes; learners: %s",
             len(models), models, len(inputs.y), int(inputs.verified.sum()), len(np.unique(inputs.folds)),
             len(inputs.classes), settings["learners"])
    if store is not None:
        inputs = add_mfcc_statistics(inputs, store)
        log.info("%s also see(s) %d MFCC statistics per clip (%s)", ", ".join(s.name for s in specs if s.extra_features),
                 len(inputs.extra_names), store.name)
    test_y = label_indices_for_test(inputs.test_fnames, dataset.test_labels, inputs.classes)
    if test_y is not None and not (test_y >= 0).any():
        log.warning("test_labels.csv labels none of the test clips: no test scores")

    names = models + settings["learners"]
    default = resolve_default(settings, names)
    ev = evaluate(inputs, build_learners(settings, inputs.layout, cfg.get("seed", 2018)), test_y=test_y,
                  reference=default, se_kind=settings["switch_se"], kinds={s.name: s.kind for s in specs})
    selection = select_final(ev, settings["final"], default, settings["switch_margin_se"], settings["switch_se"])
    final = selection.final

    d = work.stacking_dir
    (d / "submissions").mkdir(parents=True, exist_ok=True)
    atomic_write_csv(ev.scores, d / "scores.csv")
    for name in settings["learners"]:
        write_table(probs_frame(inputs.fnames, ev.oof[name], inputs.classes, inputs.folds), d / f"{name}_oof.csv")
    for name, proba in ev.test.items():
        write_submission(d / "submissions" / f"{name}.csv", inputs.test_fnames, proba, inputs.classes)
    write_table(probs_frame(inputs.test_fnames, ev.test[final], inputs.classes), d / "final_test.csv")
    write_submission(work.submission_csv, inputs.test_fnames, ev.test[final], inputs.classes)
    save_final_learner(work, final, ev.kinds[final], ev.fitted.get(final), models, inputs.classes,
                       dataset.class_prior(), store, fingerprint)

    row = ev.scores.set_index("name").loc[final]
    summary = {
        "final": final, "final_kind": ev.kinds[final],
        "cv_map3_all": finite_or_none(row["map3_all"]), "cv_map3_all_se": finite_or_none(row["map3_all_se"]),
        "cv_map3_verified": finite_or_none(row["map3_verified"]),
        "test_map3": finite_or_none(row["map3_test"]) if "map3_test" in row else None,
        "default": default, "selection": selection.as_dict(), "selection_text": selection.sentence(),
        "final_details": learner_details(ev.fitted[final]) if final in ev.fitted else {},
        "fitted": {n: learner_details(l) for n, l in ev.fitted.items() if learner_details(l)},
        "models": models, "learners": settings["learners"], "names": list(ev.test),
        "mfcc_statistics": store.name if store is not None else None,
        "submission": str(work.submission_csv), "fingerprint": fingerprint,
    }
    atomic_write_json(summary, d / "summary.json")
    _remove_stale(d, settings["learners"], list(ev.test))
    log.info("scores (cross-validated on folds.csv):\n%s", ev.scores.to_string(index=False, float_format="%.4f"))
    log.info("final: %s (%s), cv MAP@3 %.4f ± %.4f%s; %s", final, ev.kinds[final], summary["cv_map3_all"],
             summary["cv_map3_all_se"] or float("nan"),
             "" if summary["test_map3"] is None else f", test MAP@3 {summary['test_map3']:.4f}",
             summary["selection_text"])
    print(work.submission_csv)
    return {**summary, "skipped": False}
