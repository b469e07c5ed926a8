"""Old vs new final-learner rule, over several finished work directories.

    python -m benchmarks.compare_selection WORK [WORK ...] [--config quick] [--models a,b,...]
                                           [--scratch DIR] [--keep] [--json PATH]

For each work directory (a finished ``./run_all.sh`` run) the stacking stage
is re-run twice on a copy (the trained models' folders, logs, plots and the
old stacking outputs are not copied; predictions, folds, clips and feature
caches are), with the same preset, dataset and ``run.models``:

- old rule: ``--set stacking.final=best`` (highest cross-validated MAP@3);
- new rule: the default ``stacking.final: auto`` (keep ``stacking.default``
  unless a paired CV advantage exceeds ``switch_margin_se`` SEs).

i.e. ``python -m stacking.stack --config C --data D --work COPY --set run.models=[...] [--set stacking.final=best]``.
The dataset D is the one recorded in ``WORK/dataset.json``; the models are
those the run stacked (``WORK/stacking/summary.json``) unless ``--models``.

Printed per dataset (markdown): the learner each rule picked, its CV MAP@3 ±
SE (over folds), its test MAP@3 ± SE, and the test MAP@3 of ``stats_lgbm``
and of the best single model by test (from ``stacking/scores.csv``); the
paired test difference new − old with its SE over test clips (per-clip AP@3
from the two submissions). Then a summary over the datasets: mean and std
(ddof 1) of new − old, new − stats_lgbm and new − best single model (test).
Both re-runs score the same evaluation; the largest |difference| between
their scores.csv is printed as a determinism check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
SKIP_TOP = {"models", "logs", "plots", "stacking", "pseudo_label", "report.md", "submission.csv", ".lock"}
RULES = (("old", ["--set", "stacking.final=best"]), ("new", []))


def copy_work(src: Path, dst: Path) -> None:
    """What the stacking stage reads: everything but the models' folders, logs and old answers."""
    def ignore(folder, names):
        return [n for n in names if Path(folder).resolve() == src.resolve() and (n in SKIP_TOP or n.startswith("."))]
    shutil.copytree(src, dst, ignore=ignore, symlinks=True)


def run_stack(config: str, data: str, work: Path, models: list[str], extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "stacking.stack", "--config", config, "--data", data, "--work", str(work),
           "--set", f"run.models=[{','.join(models)}]", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{tail}")
    return time.time() - start


def per_clip_ap3(submission: Path, labels: dict[str, str]) -> pd.Series:
    """fname -> AP@3 of the submission's three labels (labelled test clips only)."""
    sub = pd.read_csv(submission, dtype=str, keep_default_na=False)
    out = {}
    for f, lab in zip(sub["fname"], sub["label"]):
        if f in labels:
            top = lab.split()[:3]
            out[f] = next((1.0 / (i + 1) for i, t in enumerate(top) if t == labels[f]), 0.0)
    return pd.Series(out).sort_index()


def test_labels_of(data: str) -> dict[str, str]:
    from pipeline.dataset import load_dataset
    ds = load_dataset(data, check_files=False)
    if ds.test_labels is None:
        return {}
    return dict(zip(ds.test_labels["fname"], ds.test_labels["label"]))


def compare_one(work: Path, config: str, models: list[str] | None, scratch: Path, keep: bool) -> dict:
    ident = json.loads((work / "dataset.json").read_text())
    data = ident["data"]
    summary0 = json.loads((work / "stacking" / "summary.json").read_text()) if (
        work / "stacking" / "summary.json").exists() else {}
    models = models or summary0.get("models")
    if not models:
        raise SystemExit(f"error: {work}: no stacking/summary.json to read the stacked models from; pass --models")
    labels = test_labels_of(data)
    res = {"work": str(work), "data": data, "models": models, "n_test_labelled": len(labels), "rules": {}}
    scores = {}
    for rule, extra in RULES:
        copy = scratch / f"{work.name}_{rule}"
        if copy.exists():
            shutil.rmtree(copy)
        copy_work(work, copy)
        wall = run_stack(config, data, copy, models, extra)
        s = json.loads((copy / "stacking" / "summary.json").read_text())
        sc = pd.read_csv(copy / "stacking" / "scores.csv").set_index("name")
        scores[rule] = sc
        final = s["final"]
        res["rules"][rule] = {
            "final": final, "kind": s["final_kind"], "cv": float(sc.loc[final, "map3_all"]),
            "cv_se": float(sc.loc[final, "map3_all_se"]),
            "test": float(sc.loc[final, "map3_test"]) if "map3_test" in sc else math.nan,
            "test_se": float(sc.loc[final, "map3_test_se"]) if "map3_test_se" in sc else math.nan,
            "selection": s.get("selection_text", ""), "wall_s": round(wall, 1),
            "ap3": per_clip_ap3(copy / "stacking" / "submissions" / f"{final}.csv", labels),
        }
        if not keep:
            shutil.rmtree(copy)
    old, new = scores["old"], scores["new"]
    num = [c for c in old.columns if c != "kind"]
    res["rerun_max_abs_diff"] = float(np.nanmax(np.abs(old[num].to_numpy(float) - new.loc[old.index, num].to_numpy(float))))
    sc = new
    single = sc[sc["kind"] == "model"]
    res["scores"] = sc
    res["stats_lgbm"] = float(sc.loc["stats_lgbm", "map3_test"]) if "stats_lgbm" in sc.index else math.nan
    best = single["map3_test"].idxmax()
    res["best_single"] = {"name": best, "test": float(single.loc[best, "map3_test"]),
                          "test_se": float(single.loc[best, "map3_test_se"]), "cv": float(single.loc[best, "map3_all"])}
    d = res["rules"]["new"]["ap3"] - res["rules"]["old"]["ap3"]
    res["paired_new_minus_old"] = (float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan)
    if summary0.get("final") and summary0.get("selection", {}).get("rule") == "auto":
        res["original_final"] = summary0["final"]
    return res


def fmt(x, nd=4, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def table(res: dict) -> str:
    r_old, r_new = res["rules"]["old"], res["rules"]["new"]
    lines = [f"#### {Path(res['work']).name} (data {res['data']}, {res['n_test_labelled']} labelled test clips)", "",
             "| | learner | CV MAP@3 | ± SE | test MAP@3 | ± SE |", "|---|---|---:|---:|---:|---:|"]
    for label, r in (("old rule (final: best)", r_old), ("new rule (final: auto)", r_new)):
        lines.append(f"| {label} | {r['final']} ({r['kind']}) | {fmt(r['cv'])} | {fmt(r['cv_se'])} | "
                     f"{fmt(r['test'])} | {fmt(r['test_se'])} |")
    sc = res["scores"]
    if "stats_lgbm" in sc.index:
        lines.append(f"| stats_lgbm | model | {fmt(sc.loc['stats_lgbm', 'map3_all'])} | "
                     f"{fmt(sc.loc['stats_lgbm', 'map3_all_se'])} | {fmt(res['stats_lgbm'])} | "
                     f"{fmt(sc.loc['stats_lgbm', 'map3_test_se'])} |")
    b = res["best_single"]
    lines.append(f"| best single model by test | {b['name']} | {fmt(b['cv'])} | "
                 f"{fmt(sc.loc[b['name'], 'map3_all_se'])} | {fmt(b['test'])} | {fmt(b['test_se'])} |")
    dm, dse = res["paired_new_minus_old"]
    lines += ["", f"new − old on test: {fmt(dm, sign=True)} ± {fmt(dse)} (paired over clips); "
              f"new rule: {r_new['selection']}; stacking re-runs {r_old['wall_s']} s + {r_new['wall_s']} s, "
              f"max |Δ| between their scores.csv {res['rerun_max_abs_diff']:.1e}"]
    if res.get("original_final") and res["original_final"] != r_new["final"]:
        lines.append(f"(note: the original run's auto rule picked {res['original_final']})")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    rows = {
        "new − old": [r["rules"]["new"]["test"] - r["rules"]["old"]["test"] for r in results],
        "new − stats_lgbm": [r["rules"]["new"]["test"] - r["stats_lgbm"] for r in results],
        "new − best single model": [r["rules"]["new"]["test"] - r["best_single"]["test"] for r in results],
    }
    n = len(results)
    differ = sum(r["rules"]["new"]["final"] != r["rules"]["old"]["final"] for r in results)
    out = [f"### Summary over {n} dataset(s) (test MAP@3; std over datasets, ddof 1)", "",
           "| difference | mean | std | min | max | per dataset |", "|---|---:|---:|---:|---:|---|"]
    for name, vals in rows.items():
        v = np.array(vals, float)
        ok = v[~np.isnan(v)]
        std = float(np.std(ok, ddof=1)) if len(ok) > 1 else math.nan
        out.append(f"| {name} | {fmt(float(ok.mean()) if len(ok) else math.nan, sign=True)} | {fmt(std)} | "
                   f"{fmt(float(ok.min()) if len(ok) else math.nan, sign=True)} | "
                   f"{fmt(float(ok.max()) if len(ok) else math.nan, sign=True)} | "
                   f"{', '.join(fmt(x, sign=True) for x in v)} |")
    out += ["", f"the two rules picked different learners on {differ} of {n} dataset(s): "
            + "; ".join(f"{Path(r['work']).name}: old {r['rules']['old']['final']}, new {r['rules']['new']['final']}"
                        for r in results)]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_selection", description=__doc__.split("\n\n")[0])
    p.add_argument("work", nargs="+", help="finished work directories")
    p.add_argument("--config", default="quick", help="preset the runs used (default quick)")
    p.add_argument("--models", default=None, help="comma-separated models to stack (default: the run's)")
    p.add_argument("--scratch", default=None, help="where the copies go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the copies")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    models = args.models.split(",") if args.models else None
    for w in args.work:
        if not (Path(w) / "dataset.json").is_file():
            print(f"error: {w}: not a finished work directory (no dataset.json)", file=sys.stderr)
            return 2
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="compare_selection."))
    scratch.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for w in args.work:
            res = compare_one(Path(w), args.config, models, scratch, args.keep)
            results.append(res)
            print(table(res), "\n", flush=True)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(summary(results))
    if args.json:
        dump = [{k: v for k, v in r.items() if k != "scores"} | {
            "rules": {k: {kk: vv for kk, vv in rv.items() if kk != "ap3"} for k, rv in r["rules"].items()}}
            for r in results]
        Path(args.json).write_text(json.dumps(dump, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
