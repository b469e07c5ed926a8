"""The whole pipeline through ``run_all.sh`` on a tiny dataset the test makes,
with every kind of bad input; then a re-run that must skip finished work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import make_tiny_dataset
from pipeline.dataset import load_dataset
from pipeline.submission import validate_submission

REPO = Path(__file__).resolve().parent.parent

TINY_PRESET = {
    "inherit": "quick",
    "feature_extraction": {"n_jobs": 2, "chunk_size": 8},
    "features": {"logmel": {"n_fft": 512, "n_mels": 24}, "wave": {"sr": 8000}},
    "folds": {"n_folds": 3},
    "training": {"epochs": 2, "batch_size": 8, "early_stop_patience": 2, "eval_batch_size": 32},
    "models": {
        "cnn_ref": {"window": 16, "params": {"filters": [8, 16]}},
        "wave1d": {"window": 4096, "params": {"widths": [8, 16], "blocks_per_width": 1}},
        "vggish": {"params": {"width": 0.0625, "hidden": 16}},
        "mla": {"params": {"units": 16}},
    },
    "pseudo_label": {"enabled": True, "verifiers": ["cnn_ref"], "max_iterations": 2, "train": {"epochs": 1}},
    "labels": {"source": "pseudo"},
    "run": {"models": ["cnn_ref", "wave1d", "vggish", "mla"]},
    "stacking": {"lightgbm": {"n_estimators": 20}},
}


def _run(args, cwd=REPO):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", str(REPO / "run_all.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_tiny_dataset(root / "data", n_classes=4, clips_per_class=9, n_test=8)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY_PRESET))
    work = root / "work"
    first = _run(["--data", str(data.root), "--work", str(work), "--preset", str(preset)])
    return {"data": data, "work": work, "preset": preset, "out": first}


def test_submission_is_complete_and_valid(run):
    ds = load_dataset(run["data"].root)
    sub = pd.read_csv(run["work"] / "submission.csv")
    validate_submission(sub, ds.test_fnames, ds.classes)
    assert len(sub) == len(ds.test_fnames)


def test_bad_files_are_logged_by_name_and_counted(run):
    clips = pd.read_csv(run["work"] / "clips.csv")
    for fname, (split, status) in run["data"].bad.items():
        row = clips[(clips.fname == fname) & (clips.split == split)]
        assert row["status"].item() == status
        assert fname in run["out"], f"{fname} not named in the log"
    folds = pd.read_csv(run["work"] / "folds.csv")
    bad_train = {f for f, (split, _) in run["data"].bad.items() if split == "train"}
    assert bad_train and not bad_train & set(folds.fname)
    report = (run["work"] / "report.md").read_text()
    for fname in run["data"].bad:
        assert fname in report


def test_every_stage_wrote_its_outputs(run):
    work = run["work"]
    for model in ("cnn_ref", "wave1d", "vggish", "mla"):
        oof = pd.read_csv(work / "predictions" / f"{model}_oof.csv")
        folds = pd.read_csv(work / "folds.csv")
        assert list(oof.fname) == list(folds.fname)
        assert len(pd.read_csv(work / "predictions" / f"{model}_test.csv")) == len(run["data"].test_fnames)
    assert (work / "labels.csv").exists() and (work / "pseudo_label" / "iterations.csv").exists()
    assert (work / "stacking" / "scores.csv").exists()
    assert (work / "report.md").exists() and any((work / "plots").glob("*.png"))
    out = run["out"]
    assert "OOF MAP@3" in out and "test MAP@3" in out and str(work / "submission.csv") in out


def _documented_layout() -> list[tuple[str, bool]]:
    """(regex, required) for every path docs/DESIGN.md documents in the work directory."""
    import re
    text = (REPO / "docs" / "DESIGN.md").read_text()
    blocks = dict(re.findall(r"```(layout|trainer-files)\n(.*?)```", text, re.S))

    def paths(block):
        for line in blocks[block].splitlines():
            head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            for path in re.split(r", (?=<work>/)", head):
                yield path.removeprefix("<work>/")

    def expand(path):  # {a,b} alternatives, one path each
        m = re.search(r"\{([^{}]*)\}", path)
        if not m:
            return [path]
        return [x for alt in m.group(1).split(",") for x in expand(path[:m.start()] + alt + path[m.end():])]

    trainer = list(paths("trainer-files"))
    out = []
    for path in paths("layout"):
        optional = path.endswith("?")
        path = path.rstrip("?")
        for one in ([path.replace("<trainer file>", t) for t in trainer] if "<trainer file>" in path else [path]):
            opt = optional or one.endswith("?")
            for alt in expand(one.rstrip("?")):
                pattern = re.escape(alt).replace(re.escape("<callback file>"), "[^/]+")
                pattern = re.sub(r"\\<[^>]*\\>|<[^>]*>", "[^/]+", pattern)
                out.append(("^" + pattern + "$", not opt))
    return out


def test_work_dir_layout_is_the_documented_one(run):
    """Every file the run wrote is documented in docs/DESIGN.md, and every documented
    (non-optional) kind of file is there: the design doc cannot drift from the code."""
    import re
    layout = _documented_layout()
    assert len(layout) > 30
    work = Path(run["work"])
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() or p.is_symlink())
    undocumented = [f for f in files if not any(re.match(rx, f) for rx, _ in layout)]
    assert not undocumented, f"written but not in docs/DESIGN.md's layout: {undocumented[:10]}"
    missing = [rx for rx, required in layout if required and not any(re.match(rx, f) for f in files)]
    assert not missing, f"documented in docs/DESIGN.md but not written by the run: {missing}"


def test_rerun_skips_finished_work_and_gives_the_same_submission(run):
    before = (run["work"] / "submission.csv").read_text()
    out = _run(["--data", str(run["data"].root), "--work", str(run["work"]), "--preset", str(run["preset"])])
    assert "everything cached" in out
    assert "skipping" in out and "training on" not in out
    assert (run["work"] / "submission.csv").read_text() == before


def test_stage_alone_says_what_it_needs(tmp_path, run):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--data", str(run["data"].root),
                           "--work", str(tmp_path / "empty"), "--config", str(run["preset"])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "folds.csv" in proc.stderr and "pipeline.folds" in proc.stderr
