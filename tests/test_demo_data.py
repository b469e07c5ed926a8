"""Tests of the demo dataset builder (`python -m data.build_demo`, package `data.demo`).

A reduced build (8 train + 2 test clips per class) keeps the suite fast; the
rendering path, label noise, hard cases and caching are the same as for the
default size. Tests that need fluidsynth and the FluidR3 soundfont skip when
they are absent (`apt-get install fluidsynth fluid-soundfont-gm`).
"""

from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import build_demo
from data.demo import build, hard_cases, plan, render

SMALL = {"clips_per_class": 8, "test_clips_per_class": 2}


def _renderer_available() -> bool:
    try:
        render.find_fluidsynth()
        render.find_soundfont()
    except RuntimeError:
        return False
    return True


needs_renderer = pytest.mark.skipif(
    not _renderer_available(), reason="fluidsynth or the GM soundfont is missing (apt-get install fluidsynth fluid-soundfont-gm)"
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_demo.build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=2018, **SMALL)


@needs_renderer
def test_layout_and_columns(built):
    assert (built / "audio_train").is_dir() and (built / "audio_test").is_dir()
    assert (built / "README.md").read_text().startswith("# Demo dataset")
    assert _header(built / "train.csv") == ["fname", "label", "manually_verified"]
    assert _header(built / "train_clean_labels.csv") == ["fname", "label"]
    assert _header(built / "test_labels.csv") == ["fname", "label"]
    assert _header(built / "sample_submission.csv") == ["fname", "label"]
    assert not list(built.glob("render*")), "render scratch files must not be left behind"


@needs_renderer
def test_classes_counts_and_names(built):
    train = _read_csv(built / "train_clean_labels.csv")
    test = _read_csv(built / "test_labels.csv")
    classes = sorted({row["label"] for row in train})
    assert len(classes) >= 15
    assert {row["label"] for row in test} == set(classes)
    for label in classes:
        assert sum(row["label"] == label for row in train) == SMALL["clips_per_class"]
        assert sum(row["label"] == label for row in test) == SMALL["test_clips_per_class"]
    names = [row["fname"] for row in train + test]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[0-9a-f]{8}\.wav", name) for name in names)
    assert sorted(path.name for path in (built / "audio_train").iterdir()) == sorted(r["fname"] for r in train)
    assert sorted(path.name for path in (built / "audio_test").iterdir()) == sorted(r["fname"] for r in test)
    submission = _read_csv(built / "sample_submission.csv")
    assert [row["fname"] for row in submission] == [row["fname"] for row in test]
    assert all(set(row["label"].split()) <= set(classes) and len(row["label"].split()) == 3 for row in submission)


@needs_renderer
def test_durations_in_range_except_planted_short_clip(built):
    short = []
    for split in ("train", "test"):
        for path in sorted((built / f"audio_{split}").iterdir()):
            try:
                info = sf.info(str(path))
            except sf.LibsndfileError:
                continue  # the planted corrupt file, checked in test_hard_cases
            if info.duration < plan.MIN_DURATION_S:
                short.append((split, info.duration))
            else:
                assert info.duration <= plan.MAX_DURATION_S, path
    assert len(short) == 1 and short[0][0] == "train"
    assert short[0][1] == pytest.approx(hard_cases.SHORT_CLIP_S, abs=0.01)


@needs_renderer
def test_hard_cases(built):
    infos, unreadable = {}, []
    for split in ("train", "test"):
        for path in (built / f"audio_{split}").iterdir():
            try:
                infos[(split, path.name)] = sf.info(str(path))
                sf.read(str(path))
            except sf.LibsndfileError:
                unreadable.append((split, path.name))
    assert len(unreadable) == 1 and unreadable[0][0] == "test"
    corrupt = unreadable[0][1]
    assert 0 < (built / "audio_test" / corrupt).stat().st_size < 100
    assert corrupt in {row["fname"] for row in _read_csv(built / "test_labels.csv")}
    assert corrupt in {row["fname"] for row in _read_csv(built / "sample_submission.csv")}

    stereo = [key for key, info in infos.items() if info.channels == 2]
    assert len(stereo) == 1 and all(info.channels in (1, 2) for info in infos.values())
    left_right, _ = sf.read(str(built / "audio_train" / stereo[0][1]))
    assert not np.allclose(left_right[:, 0], left_right[:, 1]), "the stereo file should not be dual mono"
    rates = sorted(info.samplerate for info in infos.values() if info.samplerate != render.SAMPLE_RATE)
    assert rates == [16000, 44100]
    subtypes = sorted(info.subtype for info in infos.values() if info.subtype != "PCM_16")
    assert subtypes == ["FLOAT", "PCM_24"]

    readme = (built / "README.md").read_text()
    odd_files = [corrupt] + [name for (_, name), info in infos.items()
                             if info.channels == 2 or info.samplerate != render.SAMPLE_RATE
                             or info.subtype != "PCM_16" or info.duration < plan.MIN_DURATION_S]  # fmt: skip
    assert len(odd_files) == 7
    assert all(name in readme for name in odd_files)


@needs_renderer
def test_label_noise(built):
    noisy = _read_csv(built / "train.csv")
    clean = {row["fname"]: row["label"] for row in _read_csv(built / "train_clean_labels.csv")}
    assert set(clean) == {row["fname"] for row in noisy}
    unverified = [row for row in noisy if row["manually_verified"] == "0"]
    assert {row["manually_verified"] for row in noisy} == {"0", "1"}
    assert len(unverified) / len(noisy) == pytest.approx(plan.UNVERIFIED_SHARE, abs=0.02)
    for row in noisy:
        if row["manually_verified"] == "1":
            assert row["label"] == clean[row["fname"]], "verified rows must carry the true label"
    wrong = [row for row in unverified if row["label"] != clean[row["fname"]]]
    assert len(wrong) == round(plan.WRONG_LABEL_SHARE * len(unverified))
    assert all(row["label"] in set(clean.values()) for row in wrong)


@needs_renderer
def test_same_seed_rebuild_is_identical(built, tmp_path):
    again = build_demo.build_demo_dataset(tmp_path / "again", seed=2018, **SMALL)
    for name in ("train.csv", "train_clean_labels.csv", "test_labels.csv", "sample_submission.csv", "README.md"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    # fluidsynth's offline render is deterministic, so the audio matches byte for byte too.
    for split in ("audio_train", "audio_test"):
        for path in (built / split).iterdir():
            assert (again / split / path.name).read_bytes() == path.read_bytes(), path.name


def test_other_seed_gives_other_dataset():
    first = plan.make_plan(2018, **SMALL).clips
    second = plan.make_plan(7, **SMALL).clips
    assert [clip.fname for clip in first] != [clip.fname for clip in second]
    assert [clip.fname for clip in first] == [clip.fname for clip in plan.make_plan(2018, **SMALL).clips]


@needs_renderer
def test_cache_hit_is_fast_and_untouched(built):
    marker = built / build.MARKER_NAME
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_demo.build_demo_dataset(built, seed=2018, **SMALL) == built
    assert time.perf_counter() - started < 1.0
    assert marker.stat().st_mtime_ns == before


@needs_renderer
def test_cli_reuses_cache_and_prints_path(built, capsys):
    assert build_demo.main(["--out", str(built), "--clips-per-class", "8", "--test-clips-per-class", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(built)


@needs_renderer
def test_half_built_directory_is_rebuilt(built, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(built, half)
    (half / build.MARKER_NAME).unlink()
    victim = next((half / "audio_train").iterdir())
    victim.unlink()
    assert not build.is_complete(half, build.build_params(2018, **SMALL))
    build_demo.build_demo_dataset(half, seed=2018, **SMALL)
    assert build.is_complete(half, build.build_params(2018, **SMALL))
    assert victim.is_file()
    assert not list(tmp_path.glob(".half.building-*")) and not list(tmp_path.glob(".half.old-*"))


@needs_renderer
def test_different_parameters_are_not_a_cache_hit(built):
    assert build.is_complete(built, build.build_params(2018, **SMALL))
    assert not build.is_complete(built, build.build_params(2019, **SMALL))
    assert not build.is_complete(built, build.build_params(2018, clips_per_class=9, test_clips_per_class=2))


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="Refusing to replace"):
        build_demo.build_demo_dataset(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_fluidsynth_names_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install fluidsynth fluid-soundfont-gm"):
        build_demo.build_demo_dataset(tmp_path / "data", **SMALL)
    assert not (tmp_path / "data").exists()
    assert [path.name for path in tmp_path.iterdir()] == [".data.lock"]


def test_missing_soundfont_names_the_debian_package(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="fluid-soundfont-gm"):
        render.find_soundfont(tmp_path / "missing.sf2")
    monkeypatch.setattr(render, "SOUNDFONT_CANDIDATES", (tmp_path / "none.sf2",))
    with pytest.raises(RuntimeError, match="apt-get install fluidsynth fluid-soundfont-gm"):
        render.find_soundfont()

