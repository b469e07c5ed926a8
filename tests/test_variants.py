"""data.variants fsdd-hard: counts, noise rates, determinism by seed, symlinks, accepted by load_dataset."""
from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest

from data.variants import VariantError, main, make_fsdd_hard
from pipeline.dataset import load_dataset
from tests.helpers import make_tiny_dataset, make_zenodo_layout


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(root: Path) -> dict:
    """Every entry under root: (mode, size, mtime) — to prove the source is never touched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """7 classes x 12 clips, hard cases (stereo, 8-bit, empty, silent, corrupt ...), plus a
    train_clean_labels.csv and some noise in train.csv that the variant must not inherit."""
    root = tmp_path_factory.mktemp("src")
    ds = make_tiny_dataset(root, n_classes=7, clips_per_class=12, n_test=10, seed=3)
    rows = _rows(root / "train.csv")
    with open(root / "train_clean_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fname", "label"])
        w.writerows([[r["fname"], r["label"]] for r in rows])
    # the source's own (given) labels are noisy: the variant's noise must be computed from the clean ones
    noisy = [dict(r) for r in rows]
    for r in noisy[:10]:
        r["label"] = ds.classes[(ds.classes.index(r["label"]) + 1) % len(ds.classes)]
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["fname", "label", "manually_verified"])
        w.writeheader()
        w.writerows(noisy)
    for dirpath, _dirs, files in os.walk(root):      # read-only, like ../shared/data/fsdd
        for f in files:
            os.chmod(Path(dirpath) / f, 0o444)
    return ds


def test_counts_noise_symlinks_and_loadable(source, tmp_path):
    before = _snapshot(source.root)
    out = tmp_path / "hard"
    recipe = make_fsdd_hard(source.root, out, seed=1, per_class=10, unverified=0.5, wrong=0.4)
    assert _snapshot(source.root) == before                      # nothing in the source changed

    train = _rows(out / "train.csv")
    clean = {r["fname"]: r["label"] for r in _rows(out / "train_clean_labels.csv")}
    src_clean = {r["fname"]: r["label"] for r in _rows(source.root / "train_clean_labels.csv")}
    assert [r["fname"] for r in train] == sorted(clean)
    assert len(train) == 7 * 10 == recipe["train_clips"]
    assert all(clean[f] == src_clean[f] for f in clean)            # the true labels are the source's clean ones
    for cls in source.classes:                                    # per class: 10 picked, 5 non-verified, 2 wrong
        mine = [r for r in train if clean[r["fname"]] == cls]
        assert len(mine) == 10
        unv = [r for r in mine if r["manually_verified"] == "0"]
        assert len(unv) == 5
        assert sum(r["label"] != cls for r in unv) == 2
        assert all(r["label"] == cls for r in mine if r["manually_verified"] == "1")
    wrong = [r for r in train if r["label"] != clean[r["fname"]]]
    assert len(wrong) == 14 == recipe["wrong_labels"]
    assert all(r["label"] in source.classes for r in wrong)
    assert recipe["unverified_clips"] == 35

    # test set kept whole, byte for byte
    for name in ("sample_submission.csv", "test_labels.csv"):
        assert (out / name).read_bytes() == (source.root / name).read_bytes()
    # audio: symlinks to absolute source paths, one per listed clip, nothing else
    assert sorted(os.listdir(out / "audio_train")) == sorted(clean)
    assert sorted(os.listdir(out / "audio_test")) == sorted(source.test_fnames)
    for split, names in (("train", clean), ("test", source.test_fnames)):
        for f in names:
            link = out / f"audio_{split}" / f
            assert stat.S_ISLNK(link.lstat().st_mode)
            target = os.readlink(link)
            assert os.path.isabs(target)
            assert os.path.samefile(target, source.path(split, f))

    ds = load_dataset(out)                                        # validates tables and that every file exists
    assert ds.layout == "kaggle"
    assert ds.classes == source.classes
    assert len(ds.train) == 70 and int((ds.train["manually_verified"] == 0).sum()) == 35
    assert ds.test_fnames == source.test_fnames
    assert json.loads((out / "variant.json").read_text())["seed"] == 1


def test_deterministic_by_seed(source, tmp_path):
    a = make_fsdd_hard(source.root, tmp_path / "a", seed=5, per_class=8)
    b = make_fsdd_hard(source.root, tmp_path / "b", seed=5, per_class=8)
    c = make_fsdd_hard(source.root, tmp_path / "c", seed=6, per_class=8)
    assert a == b
    for name in ("train.csv", "train_clean_labels.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()
    # defaults: 8 per class -> 4 non-verified -> round(1.6) = 2 wrong per class
    assert a["train_clips"] == 56 and a["unverified_clips"] == 28 and a["wrong_labels"] == 14


def test_small_class_takes_all_and_zero_rates(source, tmp_path):
    rec = make_fsdd_hard(source.root, tmp_path / "all", seed=0, per_class=100, unverified=0.0, wrong=1.0)
    n_src = len(_rows(source.root / "train.csv"))
    assert rec["train_clips"] == n_src and rec["unverified_clips"] == 0 and rec["wrong_labels"] == 0
    rec = make_fsdd_hard(source.root, tmp_path / "none", seed=0, per_class=4, unverified=1.0, wrong=0.0)
    assert rec["unverified_clips"] == 28 and rec["wrong_labels"] == 0


def test_without_clean_labels_and_from_zenodo(tmp_path):
    z = make_zenodo_layout(tmp_path / "z", n_classes=3, clips_per_class=4, n_test=4, seed=1)
    rec = make_fsdd_hard(z.root, tmp_path / "out", seed=2, per_class=4, unverified=0.5, wrong=1.0)
    assert rec["clean_labels_from"] == "train table" and rec["source_layout"] == "zenodo"
    assert rec["wrong_labels"] == 6
    ds = load_dataset(tmp_path / "out")
    assert ds.layout == "kaggle" and ds.test_fnames == z.test_fnames
    assert dict(zip(ds.test_labels["fname"], ds.test_labels["label"])) == z.test_labels


def test_refusals_are_one_line(source, tmp_path, capsys):
    rc = main(["fsdd-hard", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--seed", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --source") and "not found" in err and "\n" not in err
    assert not (tmp_path / "o").exists()

    empty = tmp_path / "empty_src"
    empty.mkdir()
    rc = main(["fsdd-hard", "--source", str(empty), "--out", str(tmp_path / "o"), "--seed", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --source") and "\n" not in err

    with pytest.raises(VariantError, match="--wrong"):
        make_fsdd_hard(source.root, tmp_path / "o", seed=1, wrong=1.5)
    with pytest.raises(VariantError, match="--per-class"):
        make_fsdd_hard(source.root, tmp_path / "o", seed=1, per_class=0)
    with pytest.raises(VariantError, match="inside --source"):
        make_fsdd_hard(source.root, source.root / "sub", seed=1)

    # an existing variant is replaced only with --force; a foreign folder never
    out = tmp_path / "v"
    assert main(["fsdd-hard", "--source", str(source.root), "--out", str(out), "--seed", "1", "--per-class", "3"]) == 0
    capsys.readouterr()
    assert main(["fsdd-hard", "--source", str(source.root), "--out", str(out), "--seed", "2", "--per-class", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["fsdd-hard", "--source", str(source.root), "--out", str(out), "--seed", "2", "--per-class", "3",
                 "--force"]) == 0
    assert json.loads((out / "variant.json").read_text())["seed"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(VariantError, match="not empty"):
        make_fsdd_hard(source.root, foreign, seed=1, force=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no half-built folder left
