"""Tagging new audio with a finished run (issue 14): ``python -m pipeline.predict``,
``Tagger`` and ``python -m pipeline.export``.

One tiny run (2 folds, 1 epoch) with a model of every kind the tagger runs:
a network on a cached feature (cnn_ref), a handcrafted model (stats_lr), a
network on per-fold embeddings (mla on vggish) and a hierarchical model on
cnn_ref's per-fold embeddings. Tagging the run's own test
folder must give its tables: ``stacking/final_test.csv`` and a single
model's ``predictions/<model>_test.csv``, from the work directory and from
an exported tagger. The test folder holds a corrupt clip, so the bad-clip
path is part of that check.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from helpers import make_tiny_dataset, synth_clip
from pipeline import export as export_stage
from pipeline import features as features_stage
from pipeline import folds as folds_stage
from pipeline import predict as predict_stage
from pipeline import train as train_stage
from pipeline.cli import UserError, run_main
from pipeline.predictions import as_written, read_table, write_table
from pipeline.submission import validate_submission
from stacking import stack as stack_stage

PRESET = {
    "inherit": "quick",
    "feature_extraction": {"n_jobs": 1, "chunk_size": 16},
    "features": {"logmel": {"n_fft": 512, "n_mels": 16}, "mfcc": {"n_mels": 20, "n_mfcc": 8}},
    "folds": {"n_folds": 2},
    "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16},
    "models": {
        "cnn_ref": {"window": 16, "params": {"filters": [4, 8]}},
        "stats_lr": {"features": ["mfcc"], "params": {"C": 1.0}},
        "vggish": {"params": {"width": 0.0625, "hidden": 8}},
        "mla": {"params": {"units": 8}},
        "hier": {"builder": "hierarchical", "window": 0, "params": {"hidden": [8], "dropout": 0.1},
                 "train": {"epochs": 2}, "hierarchy": {"sources": ["cnn_ref"], "n_meta": 2}},
    },
    "pseudo_label": {"enabled": False},
    "labels": {"source": "given"},
    "run": {"models": ["cnn_ref", "stats_lr", "vggish", "mla", "hier"]},
    "stacking": {"learners": ["geomean", "logreg", "lightgbm"], "default": "logreg", "final": "logreg",
                 "lightgbm": {"n_estimators": 10}, "logreg": {"C": 1.0}},
}
MODELS = PRESET["run"]["models"]


def _argv(run, *extra):
    return ["--config", str(run["preset"]), "--data", str(run["data"].root), "--work", str(run["work"]), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_tiny_dataset(root / "data", n_classes=3, clips_per_class=8, n_test=6, seed=3)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(PRESET))
    out = {"root": root, "data": data, "preset": preset, "work": root / "work"}
    for stage in (features_stage, folds_stage, train_stage):
        assert run_main(stage.main, _argv(out)) == 0
    assert stack_stage.cli(_argv(out)) == 0
    return out


@pytest.fixture(scope="module")
def exported(run):
    out = run["root"] / "tagger"
    assert run_main(export_stage.main, ["--work", str(run["work"]), "--out", str(out)]) == 0
    return out


def _predict(*argv) -> int:
    return run_main(predict_stage.main, list(argv) + ["--no-progress"])


def _probs(df: pd.DataFrame, fnames, classes) -> np.ndarray:
    return df.set_index("fname").loc[list(fnames), list(classes)].to_numpy(dtype=np.float64)


def _check_reproduces(result_csv: Path, expected_csv: Path, classes) -> None:
    want = pd.read_csv(expected_csv, dtype={"fname": str})
    got = pd.read_csv(result_csv, dtype={"fname": str}, keep_default_na=False)
    assert sorted(got["fname"]) == sorted(want["fname"])
    diff = np.abs(_probs(got, want["fname"], classes) - want[list(classes)].to_numpy())
    assert diff.max() < 1e-5, diff.max()


# ---------------------------------------------------------------------------
# the run's own test folder
@pytest.mark.parametrize("source", ["work", "export"])
def test_tagging_the_test_folder_reproduces_the_final_test_table(run, exported, tmp_path, source):
    where = run["work"] if source == "work" else exported
    out = tmp_path / "tags.csv"
    assert _predict("--work", str(where), "--audio-dir", str(run["data"].root / "audio_test"), "--out", str(out)) == 0
    _check_reproduces(out, run["work"] / "stacking" / "final_test.csv", run["data"].classes)
    got = pd.read_csv(out, dtype={"fname": str}, keep_default_na=False).set_index("fname")
    corrupt = run["data"].hard["corrupt"][1]
    assert got.loc[corrupt, "error"].startswith("unreadable")
    assert (got.drop(index=corrupt)["error"] == "").all()


@pytest.mark.parametrize("model", ["cnn_ref", "stats_lr", "mla", "hier"])
def test_one_model_reproduces_its_test_table(run, exported, tmp_path, model):
    for where in (run["work"], exported):
        out = tmp_path / f"{model}.csv"
        assert _predict("--work", str(where), "--model", model, "--audio-dir", str(run["data"].root / "audio_test"),
                        "--out", str(out)) == 0
        _check_reproduces(out, run["work"] / "predictions" / f"{model}_test.csv", run["data"].classes)


@pytest.mark.parametrize("final", ["lightgbm", "stats_lr"])
def test_other_final_entries(run, tmp_path, final):
    """A LightGBM final learner reads MFCC statistics of the new clips too (its extra columns);
    a single model forced as the final entry is that model's table."""
    work = tmp_path / "work"
    shutil.copytree(run["work"], work)
    argv = _argv({**run, "work": work}, "--set", f"stacking.final={final}")
    assert stack_stage.cli(argv) == 0
    out = tmp_path / "tags.csv"
    assert _predict("--work", str(work), "--audio-dir", str(run["data"].root / "audio_test"), "--out", str(out)) == 0
    _check_reproduces(out, work / "stacking" / "final_test.csv", run["data"].classes)
    assert json.loads((work / "stacking" / "summary.json").read_text())["final"] == final
    from pipeline.tagger import Tagger
    assert Tagger.load(work, progress=False).predict([]).shape == (0, 3 + len(run["data"].classes))
    if final == "stats_lr":  # a model the final entry does not use can still be tagged with alone
        out = tmp_path / "mla.csv"
        assert _predict("--work", str(work), "--model", "mla", "--audio-dir", str(run["data"].root / "audio_test"),
                        "--out", str(out)) == 0
        _check_reproduces(out, work / "predictions" / "mla_test.csv", run["data"].classes)


def test_a_run_stays_taggable_when_the_code_keys_its_caches_or_settings_differently(run, monkeypatch, caplog):
    """Code that changed after the run (a new feature setting, a new embeddings version, a new
    training setting) computes other cache keys and settings than the ones the folds were
    fingerprinted with; the caches on disk and the settings as logged still identify them."""
    import pipeline.cache as cache
    import pipeline.config as config
    import pipeline.embedding_store as es
    from pipeline.tagger import Tagger
    key_params, model_config = cache.feature_key_params, config.model_config
    monkeypatch.setattr(cache, "feature_key_params", lambda spec, audio: {**key_params(spec, audio), "new": 1})
    monkeypatch.setattr(es, "EMBEDDINGS_VERSION", es.EMBEDDINGS_VERSION + 100)

    def new_training_setting(cfg, model):
        spec = model_config(cfg, model)
        spec["train"]["new_setting"] = 0.5
        return spec
    monkeypatch.setattr(config, "model_config", new_training_setting)
    caplog.set_level("WARNING")
    data = run["data"]
    tagger = Tagger.load(run["work"], progress=False)
    assert "keys these settings as" in caplog.text
    got = tagger.predict([data.path("test", f) for f in data.test_fnames], list(data.test_fnames))
    want = pd.read_csv(run["work"] / "stacking" / "final_test.csv", dtype={"fname": str})
    assert np.abs(_probs(got, want["fname"], data.classes) - want[data.classes].to_numpy()).max() < 1e-5


# ---------------------------------------------------------------------------
# bad files, unfinished runs
def test_a_bad_file_among_good_ones_gets_its_error_and_the_prior(run, tmp_path, caplog):
    from pipeline.tagger import Tagger
    data = run["data"]
    good = [data.path("test", f) for f in data.test_fnames[:2]]
    empty, silent, text = tmp_path / "empty.wav", tmp_path / "silent.wav", tmp_path / "notes.txt"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    sf.write(str(silent), np.zeros(8000, dtype=np.float32), 16000)
    text.write_text("not audio")
    paths = [good[0], empty, silent, text, tmp_path / "missing.wav", good[1]]
    tagger = Tagger.load(run["work"], progress=False)
    caplog.set_level("WARNING")
    df = tagger.predict(paths)
    assert list(df["fname"]) == [str(p) for p in paths]
    errors = dict(zip(df["fname"], df["error"]))
    assert errors[str(good[0])] == "" and errors[str(good[1])] == ""
    assert errors[str(empty)].startswith("empty") and errors[str(silent)].startswith("silent")
    assert errors[str(text)].startswith("unreadable") and errors[str(paths[4])].startswith("missing")
    for p in paths[1:5]:
        assert str(p) in caplog.text
    # every bad row is what the pipeline gives an unusable clip; the good rows are unaffected by them
    bad_rows = df.loc[df["error"] != "", data.classes].to_numpy()
    assert np.allclose(bad_rows, bad_rows[0])
    alone = tagger.predict(good)
    assert np.allclose(df.loc[df["error"] == "", data.classes].to_numpy(), alone[data.classes].to_numpy(), atol=1e-9)
    prior_only, _ = tagger.predict_proba([paths[4]])
    assert np.allclose(prior_only[0], bad_rows[0])


def test_a_missing_or_unfinished_work_directory_is_refused(run, tmp_path, capsys):
    audio = str(run["data"].path("test", run["data"].test_fnames[0]))
    assert _predict("--work", str(tmp_path / "nowhere"), audio) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run["work"], unfinished, ignore=shutil.ignore_patterns("stacking"))
    assert _predict("--work", str(unfinished), audio) == 2
    err = capsys.readouterr().err
    assert "stacking/summary.json is missing" in err and "stacking.stack" in err
    assert run_main(export_stage.main, ["--work", str(unfinished), "--out", str(tmp_path / "t")]) == 2
    assert "stacking.stack" in capsys.readouterr().err and not (tmp_path / "t").exists()
    shutil.rmtree(unfinished / "models" / "mla" / "fold1")
    shutil.copytree(run["work"] / "stacking", unfinished / "stacking")
    assert _predict("--work", str(unfinished), audio) == 2
    err = capsys.readouterr().err
    assert "fold 1 of 'mla'" in err and "pipeline.train --model mla" in err
    before = sorted(p.relative_to(run["work"]) for p in run["work"].rglob("*"))
    assert _predict("--work", str(run["work"]), audio) == 0  # tagging writes nothing into the run
    assert sorted(p.relative_to(run["work"]) for p in run["work"].rglob("*")) == before


def test_a_model_of_an_unknown_kind_is_refused_by_name():
    from pipeline.tagger_models import PREDICTORS, predictor_for
    assert list(PREDICTORS) == ["handcrafted", "embeddings", "hierarchical", "network"]
    with pytest.raises(UserError, match="'odd'.*cannot run yet"):
        predictor_for("odd", {"builder": "something_new", "window": 0})


def test_an_export_is_refused_into_a_folder_that_is_not_empty(run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_main(export_stage.main, ["--work", str(run["work"]), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# outputs
def test_sample_submission_order_and_validation(run, tmp_path, capsys):
    data = run["data"]
    order = list(reversed(data.test_fnames)) + ["not_there.wav"]
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"fname": order, "label": "x y z"}).to_csv(sample, index=False)
    out = tmp_path / "submission.csv"
    assert _predict("--work", str(run["work"]), "--audio-dir", str(data.root / "audio_test"),
                    "--sample-submission", str(sample), "--out", str(out)) == 0
    sub = pd.read_csv(out)
    assert list(sub["fname"]) == order
    validate_submission(sub, order, data.classes)
    final = read_table(run["work"] / "stacking" / "final_test.csv")
    ref = pd.read_csv(run["work"] / "submission.csv").set_index("fname")
    assert (sub.set_index("fname").loc[final["fname"], "label"] == ref.loc[final["fname"], "label"]).all()
    # files given by name, matched to the sample submission's rows
    files = [str(data.path("test", f)) for f in data.test_fnames]
    assert _predict("--work", str(run["work"]), *files, "--sample-submission", str(sample), "--out", str(out)) == 0
    assert list(pd.read_csv(out)["fname"]) == order
    capsys.readouterr()
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"fname": [order[0], order[1], order[0]]}).to_csv(dup, index=False)
    assert _predict("--work", str(run["work"]), "--audio-dir", str(data.root / "audio_test"),
                    "--sample-submission", str(dup), "--out", str(out)) == 2
    assert "line 4: duplicate fname" in capsys.readouterr().err
    assert _predict("--work", str(run["work"]), "--audio-dir", str(data.root / "audio_test"),
                    "--sample-submission", str(sample), "--out", str(out), "--top-k", "2") == 2
    assert "exactly 3 labels" in capsys.readouterr().err


def test_top_k_and_json_output(run, tmp_path, capsys):
    data = run["data"]
    files = [str(data.path("test", f)) for f in data.test_fnames]
    out = tmp_path / "tags.json"
    assert _predict("--work", str(run["work"]), *files, "--out", str(out), "--top-k", "2") == 0
    doc = json.loads(out.read_text())
    assert doc["classes"] == data.classes and doc["top_k"] == 2 and doc["final"] == "logreg"
    assert [f["fname"] for f in doc["files"]] == files
    for rec in doc["files"]:
        probs = rec["probabilities"]
        assert list(probs) == data.classes and abs(sum(probs.values()) - 1) < 1e-5
        assert rec["labels"] == sorted(probs, key=lambda c: -probs[c])[:2]
        assert (rec["error"] is None) == (Path(rec["fname"]).name != data.hard["corrupt"][1])
    csv = tmp_path / "tags.csv"
    assert _predict("--work", str(run["work"]), *files, "--out", str(csv), "--top-k", "1") == 0
    df = pd.read_csv(csv, keep_default_na=False)
    assert list(df.columns) == ["fname", "label", "error", *data.classes]
    assert (df["label"] == df[data.classes].idxmax(axis=1)).all()
    capsys.readouterr()
    assert _predict("--work", str(run["work"]), *files, "--top-k", "4") == 2
    assert "--top-k 4" in capsys.readouterr().err
    assert _predict("--work", str(run["work"]), *files[:2]) == 0  # no --out: a line per file
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == files[:2]


def test_predict_waveform_equals_predicting_the_file(run):
    from pipeline.audio import AudioError
    from pipeline.tagger import Tagger
    tagger = Tagger.load(run["work"], progress=False)
    path = run["data"].path("test", run["data"].test_fnames[1])
    y, sr = sf.read(str(path), dtype="float32")
    probs = tagger.predict_waveform(y, sr)
    table = tagger.predict([path])
    assert probs.shape == (len(tagger.classes),) and tagger.classes == run["data"].classes
    assert np.allclose(probs, table[tagger.classes].to_numpy()[0], atol=1e-9)
    stereo = np.stack([y, y], axis=1)
    assert np.allclose(tagger.predict_waveform(stereo, sr), probs, atol=1e-6)
    with pytest.raises(AudioError, match="silent"):
        tagger.predict_waveform(np.zeros(16000, dtype=np.float32), 16000)
    rng = np.random.default_rng(0)
    assert tagger.predict_waveform(synth_clip("noise", rng, 22050), 22050).sum() == pytest.approx(1.0)


def test_the_export_is_self_contained(run, exported, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    manifest = json.loads((moved / "tagger.json").read_text())
    assert manifest["format"] == 1 and manifest["classes"] == run["data"].classes
    assert set(manifest["models"]) <= set(MODELS) and manifest["final"]["name"] == "logreg"
    assert manifest["scores"]["final"] == "logreg" and manifest["scores"]["table"]
    assert "source" in manifest and "versions" in manifest
    assert not any("shard" in p.name or p.suffix == ".npy" for p in moved.rglob("*"))  # no feature cache
    from pipeline.tagger import Tagger
    files = [run["data"].path("test", f) for f in run["data"].test_fnames]
    a = Tagger.load(moved, progress=False).predict(files)
    b = Tagger.load(run["work"], progress=False).predict(files)
    pd.testing.assert_frame_equal(a, b)


def test_as_written_is_what_a_table_holds_once_written_and_read(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5), size=7) ** 3
    p[0, 0] = 1e-9
    write_table(pd.DataFrame(p, columns=list("abcde")).assign(fname=[f"f{i}" for i in range(7)]), tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")[list("abcde")].to_numpy()
    assert np.array_equal(as_written(p), back)
    assert as_written(np.zeros((0, 5))).shape == (0, 5)


def test_a_zero_weight_model_is_not_used():
    from stacking.base import Level2Layout
    from stacking.blends import GeometricMeanBlend, LearnedGeometricBlend
    from pipeline.tagger_manifest import used_models
    layout = Level2Layout(("a", "b", "c"), ("x", "y", "z"))
    learned = LearnedGeometricBlend(layout)
    learned.models_, learned.coef_ = ["a", "b", "c"], np.array([0.5, 0.0, 1.0])
    assert used_models({"kind": "blend", "learner": learned, "models": ["a", "b", "c"]}) == ["a", "c"]
    fixed = GeometricMeanBlend(layout, weights={"a": 1.0, "c": 2.0})
    assert used_models({"kind": "blend", "learner": fixed, "models": ["a", "b", "c"]}) == ["a", "c"]
    assert used_models({"kind": "blend", "learner": GeometricMeanBlend(layout), "models": ["a", "b", "c"]}) == \
        ["a", "b", "c"]
    assert used_models({"kind": "model", "final": "b", "learner": None, "models": ["a", "b", "c"]}) == ["b"]
