"""The executors (``pipeline/executor.py``): the same tiny run on a local Ray with 2 CPUs gives the tables the
local executor gives; a job whose worker is killed is retried and resumes from its last epoch checkpoint; a
node that cannot see the work directory is named; the local executor never imports Ray; executor settings
are in no fingerprint."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import make_tiny_dataset, tiny_config
from pipeline.config import ConfigError, load_config, model_config, resolve
from pipeline.executor import (Job, LocalExecutor, RayExecutor, WorkDirNotVisible, init_ray, job_resources,
                               make_executor)
from pipeline.workdir import WorkDir, changed_paths

REPO = Path(__file__).resolve().parent.parent
MODELS = ["stats_lr", "m_logmel", "hier"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 CPUs for the module (starting one costs seconds)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    init_ray("", num_cpus=2)
    yield ray
    ray.shutdown()


def _config(executor: str, **train) -> dict:
    """tiny_config's cnn_ref on log-mel, a handcrafted model and a hierarchical model on the cnn_ref's
    embeddings, with pseudo-labelling (one verifier, two rounds)."""
    base = tiny_config()
    cfg = dict(base)
    cfg["models"] = {**base["models"],
                     "stats_lr": {"builder": "stats_lr", "features": ["logmel"], "window": 0},
                     "hier": {"builder": "hierarchical", "window": 0, "params": {"hidden": [16]},
                              "train": {"epochs": 2, "batch_size": 16}, "hierarchy": {"sources": ["m_logmel"]}}}
    cfg["models"]["m_logmel"] = {**base["models"]["m_logmel"], "params": {"filters": [8, 16]}}
    cfg["training"] = {**base["training"], "epochs": 2, "batch_size": 8, "eval_batch_size": 32, **train}
    cfg["run"] = {**base["run"], "models": MODELS, "executor": executor}
    cfg["pseudo_label"] = {**base["pseudo_label"], "enabled": True, "verifiers": ["m_logmel"], "max_iterations": 2,
                           "train": {"epochs": 1}}
    cfg["labels"] = {"source": "pseudo"}
    out = resolve(cfg)
    out["features"] = base["features"]
    out["models"] = {k: v for k, v in out["models"].items() if k in cfg["models"]}
    return out


def _tables(work: WorkDir, models) -> dict:
    out = {}
    for m in models:
        for path in (work.oof_csv(m), work.test_csv(m)):
            out[path.name] = pd.read_csv(path, dtype={"fname": str})
    return out


def _assert_same_tables(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["fname"].tolist() == b[name]["fname"].tolist(), name
        cols = [c for c in a[name].columns if c not in ("fname", "fold")]
        np.testing.assert_allclose(a[name][cols].to_numpy(), b[name][cols].to_numpy(), atol=atol, err_msg=name)


# -- no Ray needed ---------------------------------------------------------------------
def test_the_local_executor_runs_jobs_in_order_and_never_imports_ray():
    code = ("import sys\n"
            "import pipeline.fold_training, pipeline.verifiers, pipeline.extraction, pipeline.embedding_store\n"
            "import pipeline.labelling\n"
            "from pipeline.config import load_config\n"
            "from pipeline.executor import Job, make_executor\n"
            "ex = make_executor(load_config('quick'))\n"
            "assert type(ex).__name__ == 'LocalExecutor', ex\n"
            "assert ex.run([Job(str(i), abs, (-i,)) for i in range(4)]) == [0, 1, 2, 3]\n"
            "assert 'ray' not in sys.modules, 'the local executor imported ray'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]


def test_executor_settings_are_in_no_fingerprint():
    plain = load_config("quick")
    ray_cfg = load_config("quick", ["run.executor=ray", "run.ray_address=auto", "run.resources.num_gpus=1",
                                    "models.cnn_ref.resources={num_cpus: 4}", "run.max_retries=1"])
    assert isinstance(make_executor(plain), LocalExecutor) and isinstance(make_executor(ray_cfg), RayExecutor)
    for model in ray_cfg["run"]["models"]:  # model_config is what every fold fingerprint is computed from
        assert model_config(ray_cfg, model) == model_config(plain, model), model
    assert job_resources(ray_cfg, "cnn_ref") == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert job_resources(ray_cfg, "wave1d") == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert job_resources(plain) == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match="run.executor"):
        load_config("quick", ["run.executor=dask"])
    with pytest.raises(ConfigError, match="num_gpus"):
        load_config("quick", ["models.cnn_ref.resources.num_gpus=-1"])


# -- on a local Ray with 2 CPUs ------------------------------------------------------------
def test_a_tiny_run_on_ray_gives_the_local_tables(ray_cluster, tmp_path):
    from pipeline.cv import run_folds
    from pipeline.extraction import run_features
    from pipeline.fold_training import train_models
    from pipeline.labelling import run_pseudo_label

    data = make_tiny_dataset(tmp_path / "data", n_classes=3, clips_per_class=8, n_test=6).root
    works = {}
    for kind in ("local", "ray"):
        cfg = _config(kind)
        work = works[kind] = WorkDir(tmp_path / f"work-{kind}")
        run_features(cfg, data, work, progress=False)     # ray: one job per chunk of clips
        run_folds(cfg, data, work)
        run_pseudo_label(cfg, data, work, progress=False)  # ray: each (verifier, fold) of a round is a job
        train_models(cfg, data, work, MODELS, progress=False)  # ray: (model, fold)s and the fold embeddings
    local, on_ray = works["local"], works["ray"]
    assert (local.clips_csv.read_text() == on_ray.clips_csv.read_text())
    for name in ("logmel",):
        from pipeline.cache import feature_stores
        a = feature_stores(local, _config("local"), [name])[name]
        b = feature_stores(on_ray, _config("ray"), [name])[name]
        for split in ("train", "test"):
            assert a.index(split).keys() == b.index(split).keys()
            for fname, entry in a.index(split).items():
                if "bad" not in entry:
                    np.testing.assert_array_equal(a.load(split, fname), b.load(split, fname))
    assert local.labels_csv.read_text() == on_ray.labels_csv.read_text()
    _assert_same_tables(_tables(local, MODELS), _tables(on_ray, MODELS))
    jobs = pd.read_csv(on_ray.logs_dir / "train.jobs.csv")
    assert sorted(jobs["job"]) == sorted([f"{m} fold {k}" for m in MODELS for k in range(3)] +
                                         [f"embeddings m_logmel fold {k}" for k in range(3)])
    assert set(pd.read_csv(on_ray.logs_dir / "pseudo_label.jobs.csv")["job"]) >= {
        f"m_logmel iteration 0 fold {k}" for k in range(3)}
    # resumable: a rerun on Ray finds every (model, fold) done and changes nothing (Ray is not even started)
    before = len(changed_paths())
    train_models(_config("ray"), data, on_ray, MODELS, progress=False)
    assert changed_paths()[before:] == []


def test_a_killed_job_is_retried_and_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    from pipeline.cv import run_folds
    from pipeline.extraction import run_features
    from pipeline.fold_training import train_models

    data = make_tiny_dataset(tmp_path / "data", n_classes=3, clips_per_class=8, n_test=6, hard_cases=False).root
    flag = tmp_path / "killed"
    callbacks = [{"class": "tests.executor_helpers.KillOnce",
                  "args": {"flag": str(flag), "log": "{fold_dir}/epochs.txt", "at_epoch": 2}}]
    works = {}
    for kind in ("local", "ray"):
        cfg = _config(kind, epochs=4, callbacks=callbacks, early_stop_patience=10)
        cfg["pseudo_label"]["enabled"] = False
        cfg["labels"]["source"] = "given"
        work = works[kind] = WorkDir(tmp_path / f"work-{kind}")
        run_features(_config("local"), data, work, progress=False)
        run_folds(cfg, data, work)
        if kind == "local":
            flag.touch()   # disarmed: the reference run is never killed
        else:
            flag.unlink()  # armed: the first Ray job to start epoch 2 is killed (SIGKILL) once
        train_models(cfg, data, work, ["m_logmel"], progress=False)
    assert flag.exists(), "no job was killed"
    logs = {k: [tuple(map(int, line.split())) for line in (works["ray"].fold_dir("m_logmel", k) / "epochs.txt")
                .read_text().splitlines()] for k in range(3)}
    killed = [k for k, rows in logs.items() if len({pid for pid, _ in rows}) > 1]
    assert len(killed) == 1, logs
    rows = logs[killed[0]]
    first_pid = rows[0][0]
    before = [e for pid, e in rows if pid == first_pid]
    after = [e for pid, e in rows if pid != first_pid]
    assert before == [0, 1, 2] and after == [2, 3], rows  # retried in another process, from epoch 2 on
    _assert_same_tables(_tables(works["local"], ["m_logmel"]), _tables(works["ray"], ["m_logmel"]))


def test_a_node_that_cannot_see_the_work_directory_is_named(ray_cluster, tmp_path):
    import ray.util

    node = ray.util.get_node_ip_address()
    missing = tmp_path / "not-shared" / "work"
    with RayExecutor(work=missing, stage="train") as executor:   # the check on every node when Ray starts
        with pytest.raises(WorkDirNotVisible) as info:
            executor.start()
    msg = str(info.value)
    assert f"node {node}" in msg and str(missing) in msg and "shared" in msg and "run.executor=local" in msg

    work = tmp_path / "work"
    work.mkdir()
    with RayExecutor(stage="train") as executor:                  # and in each job, before it starts
        with pytest.raises(WorkDirNotVisible) as info:
            executor.run([Job("m fold 0", os.getpid, (), work=str(work), needs=("folds.csv",))])
    msg = str(info.value)
    assert f"node {node}" in msg and str(work / "folds.csv") in msg


def test_a_job_asking_for_more_than_the_cluster_has_is_refused(ray_cluster):
    with RayExecutor(stage="train") as executor:
        with pytest.raises(ConfigError, match=r"m fold 0 requests num_gpus=1 .* run.resources.num_gpus"):
            executor.run([Job("m fold 0", os.getpid, (), resources={"num_cpus": 1, "num_gpus": 1})])
