"""A changed dataset must never give a stale answer (issue 9).

Each test reuses a work directory after changing the dataset or the settings
the way a user would, reruns the stages, and checks that the result equals a
fresh run on the changed dataset and that only what depends on the change
was redone. The level-1 models here are the handcrafted-statistics models
(scikit-learn, deterministic and fast); the fingerprints they go through are
the same as every model's.
"""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from helpers import make_tiny_dataset, synth_clip
from pipeline import folds as folds_stage
from pipeline import features as features_stage
from pipeline import train as train_stage
from pipeline.cli import run_main
from pipeline.workdir import WorkDir, read_json
from stacking import stack as stack_stage

REPO = Path(__file__).resolve().parent.parent

PRESET = {
    "inherit": "quick",
    "feature_extraction": {"n_jobs": 1, "chunk_size": 8},
    "features": {"logmel": {"n_fft": 512, "n_mels": 16}, "mfcc": {"n_mels": 20, "n_mfcc": 8}},
    "folds": {"n_folds": 3},
    "models": {
        "lr_a": {"builder": "stats_lr", "features": ["mfcc"], "window": 0, "params": {"C": 1.0}},
        "lr_b": {"builder": "stats_lr", "features": ["mfcc", "logmel"], "window": 0, "params": {"C": 0.1}},
    },
    "pseudo_label": {"enabled": False},
    "labels": {"source": "given"},
    "run": {"models": ["lr_a", "lr_b"]},
    "stacking": {"learners": ["mean", "geomean"], "mfcc_feature": None},
}


def _preset(root: Path, **overrides) -> Path:
    path = root / "tiny.yaml"
    preset = {**PRESET, **overrides}
    path.write_text(yaml.safe_dump(preset))
    return path


def _stages(data: Path, work: Path, preset: Path, sets=()) -> list[int]:
    argv = ["--config", str(preset), "--data", str(data), "--work", str(work)]
    for s in sets:
        argv += ["--set", s]
    return [run_main(m.main, argv) for m in (features_stage, folds_stage, train_stage)] + \
        [stack_stage.cli(argv)]


def _run(data, work, preset, sets=()):
    codes = _stages(data, work, preset, sets)
    assert codes == [0, 0, 0, 0], codes


def _tables(work: Path) -> dict[str, pd.DataFrame]:
    out = {"submission": pd.read_csv(work / "submission.csv")}
    for model in ("lr_a", "lr_b"):
        out[f"{model}_oof"] = pd.read_csv(work / "predictions" / f"{model}_oof.csv")
        out[f"{model}_test"] = pd.read_csv(work / "predictions" / f"{model}_test.csv")
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=False, rtol=1e-6, obj=k)


def _fold_mtimes(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(work.glob("models/*/fold*/summary.json"))}


@pytest.fixture
def setup(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_classes=4, clips_per_class=9, n_test=8, seed=11)
    preset = _preset(tmp_path)
    work = tmp_path / "work"
    _run(data.root, work, preset)
    return data, work, preset, tmp_path


def _fresh(tmp_path: Path, data_root: Path, preset: Path, sets=()) -> dict:
    fresh = tmp_path / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    _run(data_root, fresh, preset, sets)
    return _tables(fresh)


def test_identical_rerun_recomputes_nothing(setup, capsys):
    data, work, preset, _ = setup
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and "logs" not in p.parts}
    capsys.readouterr()
    _run(data.root, work, preset)
    err = capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and "logs" not in p.parts}
    changed = [str(p) for p in after if before.get(p) != after[p] and p.name not in (".lock.json",)]
    assert not changed, changed
    assert "stacking inputs unchanged" in err and err.count("up to date, nothing recomputed") >= 4


def test_new_test_clips_get_real_predictions(setup):
    """5 clips added to sample_submission.csv (with audio) used to get the class prior."""
    data, work, preset, tmp = setup
    rng = np.random.default_rng(5)
    sub = pd.read_csv(data.root / "sample_submission.csv")
    new = []
    for i in range(5):
        fname = f"new{i}.wav"
        sf.write(str(data.root / "audio_test" / fname), synth_clip(data.classes[i % 4], rng, data.sr), data.sr)
        new.append({"fname": fname, "label": sub["label"].iloc[0]})
    pd.concat([sub, pd.DataFrame(new)]).to_csv(data.root / "sample_submission.csv", index=False)
    _run(data.root, work, preset)
    got = _tables(work)
    assert len(got["submission"]) == len(sub) + 5
    _assert_same(got, _fresh(tmp, data.root, preset))
    test = got["lr_a_test"].set_index("fname")
    prior = test.loc[[f for f in test.index if f.startswith("new")]].to_numpy()
    assert prior.std(axis=0).max() > 1e-3, "the new clips all got one row (the prior)"


def test_changed_labels_retrain_with_the_new_labels(setup):
    """3 labels changed in train.csv: every fold used to be skipped with the old labels."""
    data, work, preset, tmp = setup
    train = pd.read_csv(data.root / "train.csv", dtype=str)
    rows = train.index[train.fname.isin(data.usable_train)][:3]
    train.loc[rows, "label"] = [data.classes[(data.classes.index(l) + 1) % 4] for l in train.loc[rows, "label"]]
    train.to_csv(data.root / "train.csv", index=False)
    before = _fold_mtimes(work)
    _run(data.root, work, preset)
    folds = pd.read_csv(work / "folds.csv", dtype=str).set_index("fname")
    assert (folds.loc[train.loc[rows, "fname"], "label"].to_numpy() == train.loc[rows, "label"].to_numpy()).all()
    after = _fold_mtimes(work)
    assert all(after[k] != before[k] for k in before), "every fold depends on the labels"
    _assert_same(_tables(work), _fresh(tmp, data.root, preset))


def test_added_train_rows_are_used(setup):
    """12 train rows added: their features were computed, then ignored."""
    data, work, preset, tmp = setup
    rng = np.random.default_rng(9)
    train = pd.read_csv(data.root / "train.csv", dtype=str)
    extra = []
    for i in range(12):
        fname = f"extra{i:02d}.wav"
        label = data.classes[i % 4]
        sf.write(str(data.root / "audio_train" / fname), synth_clip(label, rng, data.sr), data.sr)
        extra.append({"fname": fname, "label": label, "manually_verified": "1"})
    pd.concat([train, pd.DataFrame(extra)]).to_csv(data.root / "train.csv", index=False)
    _run(data.root, work, preset)
    folds = pd.read_csv(work / "folds.csv")
    assert len(folds) == len(data.usable_train) + 12
    assert len(pd.read_csv(work / "stacking" / "mean_oof.csv")) == len(folds)
    _assert_same(_tables(work), _fresh(tmp, data.root, preset))


@pytest.mark.parametrize("sets", [["folds.n_folds=2"], ["seed=7"]])
def test_fold_settings_on_an_existing_work_dir(setup, sets):
    data, work, preset, tmp = setup
    _run(data.root, work, preset, sets)
    folds = pd.read_csv(work / "folds.csv")
    if sets == ["folds.n_folds=2"]:
        assert folds["fold"].nunique() == 2 and not (work / "models" / "lr_a" / "fold2").exists()
    _assert_same(_tables(work), _fresh(tmp, data.root, preset, sets))


def test_a_rewritten_audio_file_is_recomputed(setup):
    data, work, preset, tmp = setup
    fname = data.test_fnames[1]
    sf.write(str(data.path("test", fname)), synth_clip(data.classes[0], np.random.default_rng(3), data.sr), data.sr)
    _run(data.root, work, preset)
    _assert_same(_tables(work), _fresh(tmp, data.root, preset))


def test_replaced_test_set_and_removed_class(setup):
    """Used to crash after the skip (KeyError / ValueError) and leave the old submission."""
    data, work, preset, tmp = setup
    # a new test set: the old test clips renamed
    sub = pd.read_csv(data.root / "sample_submission.csv")
    for f in sub["fname"]:
        (data.root / "audio_test" / f).rename(data.root / "audio_test" / f"r_{f}")
    sub["fname"] = "r_" + sub["fname"]
    sub.to_csv(data.root / "sample_submission.csv", index=False)
    labels = pd.read_csv(data.root / "test_labels.csv")
    labels["fname"] = "r_" + labels["fname"]
    # and one class removed from training (and from the test labels)
    gone = data.classes[-1]
    labels[labels.label != gone].to_csv(data.root / "test_labels.csv", index=False)
    train = pd.read_csv(data.root / "train.csv", dtype=str)
    train[train.label != gone].to_csv(data.root / "train.csv", index=False)
    _run(data.root, work, preset)
    got = _tables(work)
    assert got["submission"]["fname"].tolist() == sub["fname"].tolist()
    assert gone not in got["lr_a_test"].columns
    _assert_same(got, _fresh(tmp, data.root, preset))


def test_failed_run_leaves_no_stale_submission(setup):
    data, work, preset, _ = setup
    assert (work / "submission.csv").exists()
    train = pd.read_csv(data.root / "train.csv", dtype=str)
    train.loc[0, "label"] = "two words"  # now invalid: the run must stop in validation
    train.to_csv(data.root / "train.csv", index=False)
    codes = _stages(data.root, work, preset)
    assert codes[0] == 2
    assert not (work / "submission.csv").exists()


def test_partial_ground_truth_scores_the_labelled_clips(setup, capsys):
    """test_labels.csv for part of the test set used to crash after all training."""
    data, work, preset, _ = setup
    labels = pd.read_csv(data.root / "test_labels.csv")
    labels.iloc[:5].to_csv(data.root / "test_labels.csv", index=False)
    _run(data.root, work, preset)
    summary = read_json(work / "models" / "lr_a" / "summary.json")
    assert summary["test_labelled"] == 5 and summary["test_clips"] == len(data.test_fnames)
    assert "test_map3" in summary
    assert f"on 5 of {len(data.test_fnames)} test clips" in capsys.readouterr().err
    from pipeline.config import load_config
    from pipeline.summary import summary_lines
    lines = summary_lines(load_config(str(preset)), WorkDir(work))
    assert any(f"on 5 of {len(data.test_fnames)} test clips" in line for line in lines), lines


# -- one clear line for an ordinary mistake ------------------------------------------
def _stage_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.folds", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("sets, expect", [
    (["training.epochs=abc"], "training.epochs = 'abc': input should be a valid integer"),
    (["training.epochs=0"], "training.epochs = 0: input should be greater than or equal to 1"),
    (["folds.n_folds=1"], "folds.n_folds = 1: input should be greater than or equal to 2"),
    (["training.epoch=6"], "did you mean epochs"),
])
def test_bad_settings_fail_in_the_first_second(tmp_path, sets, expect):
    args = ["--data", str(tmp_path / "nodata"), "--work", str(tmp_path / "w")]
    for s in sets:
        args += ["--set", s]
    proc = _stage_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_unusable_work_dirs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _stage_cli("--work", str(afile), "--data", str(tmp_path))
    assert proc.returncode == 2 and "not a folder" in proc.stderr and "Traceback" not in proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = _stage_cli("--work", str(ro / "sub"), "--data", str(tmp_path))
        if proc.returncode == 0:  # root ignores permissions; nothing to check then
            pytest.skip("running as root: permissions are not enforced")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    finally:
        ro.chmod(0o700)


def test_disk_full_is_one_line(setup, monkeypatch, capsys):
    data, work, preset, _ = setup
    import pipeline.workdir as wd

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "x"))
    monkeypatch.setattr(wd, "_same_bytes", lambda *a: False)
    monkeypatch.setattr(wd.os, "replace", full)
    (work / "folds.json").unlink()  # force a write
    code = run_main(folds_stage.main, ["--config", str(preset), "--data", str(data.root), "--work", str(work)])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err


def test_a_second_run_on_the_same_work_dir_is_refused(setup):
    data, work, preset, _ = setup
    from pipeline.workdir import WorkLock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; sys.path.insert(0, sys.argv[1]); from pipeline.workdir import WorkDir, WorkLock; "
        "WorkLock(WorkDir(sys.argv[2]), 'test holder').acquire(); print('held', flush=True); time.sleep(60)"),
        str(REPO), str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _stage_cli("--config", str(preset), "--data", str(data.root), "--work", str(work))
        assert proc.returncode == 2
        assert "in use by another run" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert WorkLock  # the lock goes away with its holder:
    assert _stage_cli("--config", str(preset), "--data", str(data.root), "--work", str(work)).returncode == 0


def test_each_run_has_its_own_log_folder(setup):
    data, work, preset, _ = setup
    for _ in range(2):
        assert _stage_cli("--config", str(preset), "--data", str(data.root), "--work", str(work)).returncode == 0
    runs = [d for d in (work / "logs").iterdir() if d.is_dir() and not d.is_symlink()]
    assert len(runs) >= 3 and all(len(list(d.glob("*.log"))) >= 1 for d in runs)
    assert (work / "logs" / "latest").is_symlink()
