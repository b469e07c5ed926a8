"""Stage: level-2 learning on the out-of-fold tables.

``python -m stacking.stack --config quick --data DIR --work DIR`` loads the
listed models' OOF/test tables, scores every single model, blend and stacker
by cross-validation on the shared folds (never on rows a learner was fit
on), writes ``<work>/stacking/`` (scores.csv, <learner>_oof.csv,
final_test.csv, submissions/<name>.csv, summary.json) and the final
``<work>/submission.csv`` from the chosen learner fit on all OOF rows.

Every score comes with its uncertainty (scores.csv): map3_all_se is the
standard error over the folds (std of the K per-fold MAP@3 / sqrt(K)),
map3_all_se_rows the one over rows; diff_vs_default is the paired
cross-validated MAP@3 difference to the default learner on the same rows,
with diff_se_rows (SE of the mean per-row AP@3 difference), diff_se_folds
(from the K per-fold differences) and diff_se (the one ``switch_se`` names);
with test labels also map3_test, map3_test_se and diff_test_vs_default.

The final learner (``final: auto``): the declared ``default`` is kept unless
another entry's paired advantage over it exceeds ``switch_margin_se`` times
diff_se; among those that do, the highest cross-validated MAP@3 wins. A lead
smaller than its noise never changes the submission. summary.json and the
report record the rule, the default and the numbers behind the choice.

Settings (preset section ``stacking:``, every key optional):
  models             models to stack (default: run.models that have OOF and test tables)
  learners           subset of the registered learners (stacking.learners.REGISTRY: mean, geomean,
                     rank, learned, logreg, lightgbm), scored in the order given (default: all, in
                     registration order)
  final              "auto" (default: the switch rule above), "best" (the old rule: highest
                     cross-validated map3_all, noise and all) or a model/blend/learner name (forced)
  default            the default final learner of the rule (default "learned"; when it is not
                     scored, the first of ``learners``)
  switch_margin_se   k of the rule: switch only when diff_vs_default > k * diff_se (default 1.0)
  switch_se          which SE of the paired difference the rule uses: rows, folds or max (default)
  unverified_weight  weight of non-verified rows: the sample weights every learner's fit gets
                     (used by learned, logreg and lightgbm; the fixed blends learn nothing) (null: 1)
  weights            model -> weight for the fixed blends (default: equal)
  mfcc_feature       feature whose MFCC statistics LightGBM also sees (default "mfcc")
  learned            {l2}: the learned-weight geometric blend (non-negative per-model weights
                     fit by log-loss on the training rows; l2 pulls them towards equal)
  lightgbm           {n_estimators, learning_rate, max_depth, num_leaves, min_child_samples, n_jobs,
                     inner_folds, early_stopping_rounds}: with inner_folds >= 2 the number of trees
                     (at most n_estimators) is chosen by inner CV with early stopping on each
                     training set, and num_leaves / min_child_samples may be lists (a grid, chosen
                     the same way); default: 3 inner folds, up to 400 trees, num_leaves 8,
                     min_child_samples 20 (a grid cost 3-5x the time and did not help on the demo)
  logreg             {C, per_model_weights, class_bias, inner_folds}: a list C is chosen by inner CV
                     on each training set (default [0.01, 0.03, 0.1, 0.3, 1, 3], 3 inner folds);
                     default form: one weight per model plus a per-class bias (per_model_weights
                     and class_bias true; false/false is the full K x (K*M + 1) multinomial LR)
Resumable: when summary.json records the same input fingerprint (the
content of every input table, the dataset's tables, the MFCC cache key and
clips, the resolved settings) and every output exists, the stage does
nothing; when it differs, submission.csv and the other final outputs are
removed before anything is recomputed.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureStore
from pipeline.cli import run_main, start_stage, timed_stage
from pipeline.config import ConfigError, param_hash
from pipeline.dataset import load_dataset
from pipeline.predictions import probs_frame, write_table
from pipeline.submission import write_submission
from pipeline.fingerprints import content_hash, table_hash
from pipeline.workdir import WorkDir, atomic_write_csv, atomic_write_json, read_json, remove_outputs
from stacking.base import Level2Estimator, Level2Layout
from stacking.evaluate import Evaluation, evaluate, label_indices_for_test
from stacking.features import mfcc_statistic_names, mfcc_statistics
from stacking.inputs import Level2Inputs, StackInputError, load_level2_inputs
from stacking.learners import REGISTRY, LearnerSpec, registered_learners

log = logging.getLogger("stacking")

NESTED = ("learned", "lightgbm", "logreg")
SE_KINDS = ("rows", "folds", "max")
DEFAULTS = {
    "models": None,
    "learners": None,
    "final": "auto",
    "default": "learned",
    "switch_margin_se": 1.0,
    "switch_se": "max",
    "unverified_weight": 0.6,
    "weights": None,
    "mfcc_feature": "mfcc",
    "learned": {"l2": 0.0},
    "lightgbm": {"n_estimators": 400, "learning_rate": 0.05, "max_depth": 3, "num_leaves": 8,
                 "min_child_samples": 20, "n_jobs": 1, "inner_folds": 3, "early_stopping_rounds": 30},
    "logreg": {"C": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "per_model_weights": True, "class_bias": True,
               "inner_folds": 3},
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
        if key in NESTED:
            bad = sorted(set(value or {}) - set(DEFAULTS[key]))
            if bad:
                raise ConfigError(f"stacking.{key}: unknown setting(s) {bad} (known: {', '.join(DEFAULTS[key])})")
            out[key].update(value or {})
        else:
            out[key] = copy.deepcopy(value)
    known = registered_learners()
    learners = known if out["learners"] is None else list(out["learners"])
    bad = [n for n in learners if n not in known]
    if bad:
        raise ConfigError(f"stacking.learners: unknown {bad} (known: {', '.join(known)})")
    out["learners"] = learners
    if not isinstance(out["final"], str) or not out["final"]:
        raise ConfigError(f"stacking.final must be 'auto', 'best' or a name, got {out['final']!r}")
    if not isinstance(out["default"], str) or not out["default"]:
        raise ConfigError(f"stacking.default must be a model/blend/learner name, got {out['default']!r}")
    k = out["switch_margin_se"]
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ConfigError(f"stacking.switch_margin_se must be a number >= 0, got {k!r}")
    if out["switch_se"] not in SE_KINDS:
        raise ConfigError(f"stacking.switch_se must be one of {', '.join(SE_KINDS)}, got {out['switch_se']!r}")
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


@dataclass
class Selection:
    """How the final learner was chosen, and the numbers behind it."""
    final: str
    rule: str                        # auto | best | forced
    default: str
    switched: bool                   # (auto) the default was replaced
    candidate: str | None            # the strongest challenger of the default (or the switch target)
    switch_margin_se: float
    switch_se: str
    default_cv: float
    default_cv_se: float
    candidate_cv: float | None = None
    candidate_diff: float | None = None
    candidate_diff_se: float | None = None
    final_diff: float | None = None
    final_diff_se: float | None = None

    def as_dict(self) -> dict:
        return {k: (_num(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def sentence(self) -> str:
        """One line: "default X (cv a ± se); candidate Y +d ± se_d: kept default / switched"."""
        text = f"default {self.default} (cv MAP@3 {self.default_cv:.4f} ± {self.default_cv_se:.4f})"
        if self.candidate is not None:
            text += (f"; candidate {self.candidate} {self.candidate_diff:+.4f} ± {self.candidate_diff_se:.4f} "
                     f"(paired, {self.switch_se} SE)")
        if self.rule == "auto":
            verdict = (f"switched to {self.final}" if self.switched else "kept the default")
            text += f": {verdict} (rule: switch only when the advantage exceeds {self.switch_margin_se:g} SE)"
        elif self.rule == "best":
            text += f": highest cross-validated MAP@3 (stacking.final: best) is {self.final}"
        else:
            text += f": forced by stacking.final: {self.final}"
            if self.final != self.default and self.final_diff is not None:
                text += f" ({self.final_diff:+.4f} ± {self.final_diff_se:.4f} vs the default)"
        return text


def resolve_default(settings: dict, names: list[str]) -> str:
    """The configured default when it is scored; else the first configured
    learner (a fixed choice, never one made by the scores)."""
    default = settings["default"]
    if default in names:
        return default
    fallback = next((n for n in settings["learners"] if n in names), names[0])
    log.warning("stacking.default %r is not among the scored names %s: the default is %r",
                default, names, fallback)
    return fallback


def select_final(ev: Evaluation, final: str = "auto", default: str | None = None,
                 switch_margin_se: float = 1.0, switch_se: str = "max") -> Selection:
    """The final learner by ``final``:

    - ``auto``: keep ``default`` unless some entry's paired cross-validated
      advantage over it exceeds ``switch_margin_se`` standard errors of that
      difference (``switch_se``: rows, folds or max); among those, the highest
      cross-validated MAP@3;
    - ``best``: the highest cross-validated MAP@3 (the old rule, for comparisons);
    - a name: that model/blend/learner.
    """
    scores = ev.scores.set_index("name")
    names = scores.index.tolist()
    if default is None:
        default = ev.reference or names[0]
    if default not in names:
        raise ConfigError(f"the default learner {default!r} is not one of {names}")
    if final not in (None, "auto", "best") and final not in names:
        raise ConfigError(f"stacking.final {final!r} is neither 'auto', 'best' nor one of {names}")
    diffs = {n: ev.difference(n, default) for n in names if n != default}
    se = {n: d.se(switch_se) for n, d in diffs.items()}
    cv = scores["map3_all"]
    # the strongest challenger / the switch target: highest cv MAP@3, ties to the earlier table row
    candidate = max(diffs, key=lambda n: (cv[n], -names.index(n))) if diffs else None
    switched = False
    if final in (None, "auto"):
        rule = "auto"
        passing = [n for n, d in diffs.items() if d.diff > switch_margin_se * se[n] and d.diff > 0]
        if passing:
            chosen = max(passing, key=lambda n: (cv[n], -names.index(n)))
            candidate, switched = chosen, True
        else:
            chosen = default
    elif final == "best":
        rule, chosen = "best", str(scores["map3_all"].idxmax())
    else:
        rule, chosen = "forced", final
    sel = Selection(final=chosen, rule=rule, default=default, switched=switched, candidate=candidate,
                    switch_margin_se=float(switch_margin_se), switch_se=switch_se,
                    default_cv=float(scores.loc[default, "map3_all"]),
                    default_cv_se=float(scores.loc[default, "map3_all_se"]))
    if candidate is not None:
        sel.candidate_cv = float(scores.loc[candidate, "map3_all"])
        sel.candidate_diff, sel.candidate_diff_se = diffs[candidate].diff, se[candidate]
    if chosen != default:
        sel.final_diff, sel.final_diff_se = diffs[chosen].diff, se[chosen]
    return sel


def choose_final(ev: Evaluation, final: str = "auto", default: str | None = None,
                 switch_margin_se: float = 1.0, switch_se: str = "max") -> str:
    """The name :func:`select_final` chooses."""
    return select_final(ev, final, default, switch_margin_se, switch_se).final


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


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


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
    remove_outputs(work.final_outputs(), "their stacking inputs changed", log)
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

    row = ev.scores.set_index("name").loc[final]
    summary = {
        "final": final, "final_kind": ev.kinds[final],
        "cv_map3_all": _num(row["map3_all"]), "cv_map3_all_se": _num(row["map3_all_se"]),
        "cv_map3_verified": _num(row["map3_verified"]),
        "test_map3": _num(row["map3_test"]) if "map3_test" in row else None,
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


def main(argv=None):
    args, cfg, work = start_stage("Stack the models' out-of-fold predictions.", "stacking", argv)
    with timed_stage(work, "stacking"):
        run_stacking(cfg, args.data, work)


def cli(argv=None) -> int:
    """run_main, plus a refused level-1 table exits 2 with one clear line
    (caught inside the stage, so however run_main treats other errors)."""
    refused: list[StackInputError] = []

    def guarded(args):
        try:
            main(args)
        except StackInputError as exc:
            refused.append(exc)

    rc = run_main(guarded, argv)
    if refused:
        log.error("%s", refused[0])
        print(f"error: {refused[0]}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    raise SystemExit(cli())
