"""Print the run's headline numbers (the last thing ``run_all.sh`` shows):
each model's OOF MAP@3, every blend's and stacker's cross-validated MAP@3
with its standard error and its paired difference to the default learner,
the final learner and why it was chosen, test MAP@3 when the dataset has
``test_labels.csv``, and where the submission and the report are."""
from __future__ import annotations

import pandas as pd

from pipeline.cli import run_main, stage_parser
from pipeline.config import load_config
from pipeline.metrics import scope_text
from pipeline.workdir import WorkDir, read_json


def summary_lines(cfg: dict, work: WorkDir) -> list[str]:
    lines = []
    for model in cfg["run"]["models"]:
        s = read_json(work.model_dir(model) / "summary.json")
        if not s:
            lines.append(f"{model:>14}: not trained")
            continue
        test = (f"   test MAP@3 {s['test_map3']:.4f}{scope_text(s.get('test_labelled'), s.get('test_clips'))}"
                if "test_map3" in s else "")
        lines.append(f"{model:>14}: OOF MAP@3 {s['oof_map3']:.4f} (verified rows {s['oof_map3_verified']:.4f}){test}")
    stack = read_json(work.stacking_dir / "summary.json")
    scores_path = work.stacking_dir / "scores.csv"
    if stack and scores_path.exists():
        scores = pd.read_csv(scores_path).set_index("name")
        final = stack.get("final") or stack.get("chosen")
        if "map3_all_se" in scores.columns:
            lines += ["stacking (cross-validated MAP@3 ± SE over folds; paired difference to the default "
                      f"{stack.get('default')} ± its SE; test MAP@3):"]
            for name, row in scores.iterrows():
                if row.get("kind") == "model":
                    continue
                mark = " <- final" if name == final else (" (default)" if name == stack.get("default") else "")
                diff = (f"   vs default {row['diff_vs_default']:+.4f} ± {row['diff_se']:.4f}"
                        if "diff_vs_default" in row and pd.notna(row["diff_vs_default"]) else "")
                test = f"   test {row['map3_test']:.4f}" if "map3_test" in row and pd.notna(row["map3_test"]) else ""
                lines.append(f"{name:>14}: {row['map3_all']:.4f} ± {row['map3_all_se']:.4f}{diff}{test}{mark}")
        if final in scores.index:
            row = scores.loc[final]
            se = f" ± {row['map3_all_se']:.4f}" if "map3_all_se" in row and pd.notna(row["map3_all_se"]) else ""
            test = f"   test MAP@3 {row['map3_test']:.4f}" if "map3_test" in row and pd.notna(row["map3_test"]) else ""
            lines.append(f"{'final (' + str(final) + ')':>14}: OOF MAP@3 {row['map3_all']:.4f}{se} "
                         f"(cross-validated; verified rows {row['map3_verified']:.4f}){test}")
        if stack.get("selection_text"):
            lines.append(f"{'selection':>14}: {stack['selection_text']}")
        weights = (stack.get("final_details") or {}).get("weights")
        if weights:
            lines.append(f"{'weights':>14}: " + ", ".join(f"{m} {w:.3f}" for m, w in
                                                          sorted(weights.items(), key=lambda kv: -kv[1])))
    lines.append(f"submission: {work.submission_csv}" + ("" if work.submission_csv.exists() else " (missing)"))
    lines.append(f"report:     {work.report_md}" + ("" if work.report_md.exists() else " (missing)"))
    return lines


def main(argv=None):
    args = stage_parser("Print the run's headline numbers.").parse_args(argv)
    cfg = load_config(args.config, args.set)
    print("\n".join(summary_lines(cfg, WorkDir(args.work))))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
