"""Stratified, seeded folds and the folds stage."""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pytest

from helpers import tiny_config
from pipeline.extraction import run_features
from pipeline.cv import load_folds, make_folds, run_folds
from pipeline.workdir import WorkDir


def _train(spec: dict[tuple[str, int], int]) -> pd.DataFrame:
    """spec: (label, verified) -> count."""
    rows = []
    for (label, verified), n in spec.items():
        rows += [{"fname": f"{label}_{verified}_{i:03d}.wav", "label": label, "manually_verified": verified}
                 for i in range(n)]
    return pd.DataFrame(rows)


BIG = _train({("a", 1): 50, ("a", 0): 25, ("b", 1): 30, ("b", 0): 40, ("c", 1): 20, ("c", 0): 10})


def test_every_row_in_exactly_one_fold():
    folds = make_folds(BIG, n_folds=5, seed=1)
    assert len(folds) == len(BIG)
    assert folds["fname"].tolist() == BIG["fname"].tolist()          # same rows, same order
    assert list(folds.columns) == ["fname", "label", "manually_verified", "fold"]
    assert set(folds["fold"]) == set(range(5))
    assert folds["fname"].is_unique
    assert folds["fold"].between(0, 4).all()


def test_stratified_on_label_and_verified():
    folds = make_folds(BIG, n_folds=5, seed=1)
    for (label, verified), group in folds.groupby(["label", "manually_verified"]):
        counts = group["fold"].value_counts().reindex(range(5), fill_value=0)
        # every stratum splits evenly: n/5 per fold, +-1
        share = len(group) / 5
        assert counts.min() >= np.floor(share) and counts.max() <= np.ceil(share), (label, verified, counts.tolist())
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 6     # at most one extra clip per stratum


def test_seeded():
    a = make_folds(BIG, 5, seed=7)
    b = make_folds(BIG, 5, seed=7)
    c = make_folds(BIG, 5, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert (a["fold"] != c["fold"]).any()


def test_tiny_strata():
    # strata of 1-3 clips (fewer than n_folds) must not break the split
    train = _train({("a", 1): 7, ("a", 0): 1, ("b", 1): 2, ("b", 0): 2, ("c", 1): 3, ("d", 0): 1})
    folds = make_folds(train, n_folds=5, seed=0)
    assert len(folds) == len(train) and set(folds["fold"]) == set(range(5))
    big = folds[(folds.label == "a") & (folds.manually_verified == 1)]
    assert big["fold"].value_counts().max() <= 2


def test_only_tiny_strata():
    train = _train({("a", 1): 2, ("b", 1): 2, ("c", 0): 2})
    folds = make_folds(train, n_folds=5, seed=0)
    assert sorted(folds["fold"].value_counts().tolist()) == [1, 1, 1, 1, 2]


def test_too_few_rows():
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        make_folds(_train({("a", 1): 2, ("b", 1): 2}), n_folds=5)


# -- stage ---------------------------------------------------------------------------

@pytest.fixture
def featured(tiny_dataset, tmp_path):
    work = WorkDir(tmp_path / "work")
    cfg = tiny_config()
    cfg["features"] = {"wave": {"kind": "wave", "sr": 8000}}   # the cheapest feature is enough here
    cfg["models"] = {"m": {"feature": "wave", "window": 256}}
    cfg["run"] = {"models": ["m"]}
    run_features(cfg, tiny_dataset.root, work, progress=False)
    return tiny_dataset, work, cfg


def test_run_folds_writes_once_and_leaves_out_bad_clips(featured):
    ds, work, cfg = featured
    folds = run_folds(cfg, ds.root, work)
    assert work.folds_csv.exists()
    on_disk = load_folds(work)
    pd.testing.assert_frame_equal(on_disk, folds)
    assert on_disk["fname"].tolist() == ds.usable_train
    bad_train = {f for f, (split, _) in ds.bad.items() if split == "train"}
    assert bad_train and not bad_train & set(on_disk["fname"])
    assert set(on_disk["fold"]) == set(range(cfg["folds"]["n_folds"]))
    labels = {r["fname"]: (r["label"], r["manually_verified"]) for r in ds.train}
    assert all(labels[f] == (l, v) for f, l, v in zip(on_disk.fname, on_disk.label, on_disk.manually_verified))


def test_run_folds_reuses_file_made_from_the_same_inputs(featured):
    ds, work, cfg = featured
    run_folds(cfg, ds.root, work)
    content = work.folds_csv.read_bytes()
    old = time.time() - 100
    os.utime(work.folds_csv, (old, old))
    mtime = work.folds_csv.stat().st_mtime_ns
    again = run_folds(cfg, ds.root, work)
    assert work.folds_csv.stat().st_mtime_ns == mtime
    assert work.folds_csv.read_bytes() == content
    assert again["fold"].nunique() == cfg["folds"]["n_folds"]


@pytest.mark.parametrize("change", [{"seed": 7}, {"folds": {"n_folds": 4}}])
def test_run_folds_rewrites_when_the_settings_change(featured, change):
    """Issue 9: --set folds.n_folds=3 or --set seed=7 on an existing work dir kept the old folds."""
    ds, work, cfg = featured
    run_folds(cfg, ds.root, work)
    cfg2 = {**cfg, **change}
    again = run_folds(cfg2, ds.root, work)
    fresh = make_folds(pd.DataFrame(ds.train).query("fname in @ds.usable_train"),
                       cfg2["folds"]["n_folds"], cfg2["seed"])
    np.testing.assert_array_equal(again["fold"].to_numpy(), fresh["fold"].to_numpy())
    pd.testing.assert_frame_equal(load_folds(work), again)


def test_run_folds_rewrites_when_labels_change(featured, tmp_path):
    """Issue 9: changed labels in train.csv were ignored (labels came from the old folds.csv)."""
    ds, work, cfg = featured
    run_folds(cfg, ds.root, work)
    train = pd.read_csv(ds.root / "train.csv", dtype=str)
    usable = train[train.fname.isin(ds.usable_train)].index[:3]
    new_label = ds.classes[0]
    train.loc[usable, "label"] = [c for c in ds.classes if c != new_label][0]
    train.to_csv(ds.root / "train.csv", index=False)
    again = run_folds(cfg, ds.root, work)
    merged = again.set_index("fname").loc[train.loc[usable, "fname"], "label"]
    assert (merged == train.loc[usable, "label"].to_numpy()).all()


def test_current_folds_refuses_stale_folds(featured):
    ds, work, cfg = featured
    run_folds(cfg, ds.root, work)
    from pipeline.dataset import load_dataset
    from pipeline.cv import current_folds
    dataset = load_dataset(ds.root)
    current_folds(cfg, dataset, work)  # fine
    with pytest.raises(FileNotFoundError, match="pipeline.folds"):
        current_folds({**cfg, "seed": 99}, dataset, work)


def test_too_few_clips_for_the_folds_is_one_clear_error(featured):
    from pipeline.dataset import DatasetError
    ds, work, cfg = featured
    with pytest.raises(DatasetError, match="cannot make 20 folds"):
        run_folds({**cfg, "folds": {"n_folds": 20}}, ds.root, work)


def test_run_folds_needs_clips_csv(tiny_dataset, tmp_path):
    work = WorkDir(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="pipeline.features"):
        run_folds(tiny_config(), tiny_dataset.root, work)
