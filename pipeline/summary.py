"""Print the run's headline numbers (the last thing ``run_all.sh`` shows):
each model's OOF MAP@3, the stack's, test MAP@3 when the dataset has
``test_labels.csv``, and where the submission and the report are."""
from __future__ import annotations

import pandas as pd

from pipeline.cli import run_main, stage_parser
from pipeline.config import load_config
from pipeline.workdir import WorkDir, read_json


def summary_lines(cfg: dict, work: WorkDir) -> list[str]:
    lines = []
    for model in cfg.get("run", {}).get("models", []):
        s = read_json(work.model_dir(model) / "summary.json")
        if not s:
            lines.append(f"{model:>14}: not trained")
            continue
        test = f"   test MAP@3 {s['test_map3']:.4f}" if "test_map3" in s else ""
        lines.append(f"{model:>14}: OOF MAP@3 {s['oof_map3']:.4f} (verified rows {s['oof_map3_verified']:.4f}){test}")
    stack = read_json(work.stacking_dir / "summary.json")
    scores_path = work.stacking_dir / "scores.csv"
    if stack and scores_path.exists():
        scores = pd.read_csv(scores_path).set_index("name")
        final = stack.get("final") or stack.get("chosen")
        if final in scores.index:
            row = scores.loc[final]
            test = f"   test MAP@3 {row['map3_test']:.4f}" if "map3_test" in row and pd.notna(row["map3_test"]) else ""
            lines.append(f"{'final (' + str(final) + ')':>14}: OOF MAP@3 {row['map3_all']:.4f} "
                         f"(cross-validated; verified rows {row['map3_verified']:.4f}){test}")
    lines.append(f"submission: {work.submission_csv}" + ("" if work.submission_csv.exists() else " (missing)"))
    lines.append(f"report:     {work.report_md}" + ("" if work.report_md.exists() else " (missing)"))
    return lines


def main(argv=None):
    args = stage_parser("Print the run's headline numbers.").parse_args(argv)
    cfg = load_config(args.config, args.set)
    print("\n".join(summary_lines(cfg, WorkDir(args.work))))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
