"""Presets, inheritance, --set overrides and per-model settings."""
from __future__ import annotations

import copy

import pytest

from pipeline.handcrafted import handcrafted_features, is_handcrafted

from pipeline.config import CONFIG_DIR, ConfigError, load_config, model_config
from pipeline.fingerprints import param_hash
from pipeline.settings import Training


def _write(path, text):
    path.write_text(text)
    return path


def test_load_by_name_and_by_path():
    by_name = load_config("quick")
    by_path = load_config(CONFIG_DIR / "quick.yaml")
    by_str_path = load_config(str(CONFIG_DIR / "quick.yaml"))
    assert by_name == by_path == by_str_path
    assert by_name["preset"] == "quick"
    for section in ("audio", "features", "folds", "training", "models", "run"):
        assert isinstance(by_name[section], dict), section
    assert load_config() == by_name          # quick is the default


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config("nope")
    msg = str(info.value)
    assert "nope" in msg and "quick" in msg and "known presets" in msg


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_non_mapping_rejected(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_inherit_deep_merges(tmp_path):
    child = _write(tmp_path / "child.yaml",
                   "inherit: quick\nseed: 7\ntraining:\n  epochs: 2\nmodels:\n  cnn_ref:\n    window: 32\n")
    cfg = load_config(child)
    base = load_config("quick")
    assert cfg["seed"] == 7
    assert cfg["training"]["epochs"] == 2
    assert cfg["training"]["batch_size"] == base["training"]["batch_size"]      # untouched siblings kept
    assert cfg["models"]["cnn_ref"]["window"] == 32
    assert cfg["models"]["cnn_ref"]["params"] == base["models"]["cnn_ref"]["params"]
    assert cfg["features"] == base["features"]
    assert "inherit" not in cfg


def test_inherit_chain_by_path(tmp_path):
    mid = _write(tmp_path / "mid.yaml", "inherit: quick\nseed: 1\nfolds: {n_folds: 3}\n")
    leaf = _write(tmp_path / "leaf.yaml", f"inherit: {mid}\nseed: 2\n")
    cfg = load_config(leaf)
    assert cfg["seed"] == 2 and cfg["folds"]["n_folds"] == 3


def test_inherit_preset_name_is_the_child(tmp_path):
    child = _write(tmp_path / "child.yaml", "inherit: quick\nseed: 7\n")
    assert load_config(child)["preset"] == "child"


def test_set_overrides_with_yaml_types():
    cfg = load_config("quick", [
        "training.epochs=3",
        "training.lr=0.01",
        "training.spec_augment={time_masks: 1, time_width: 4}",
        "run.models=[cnn_ref, wave1d]",
        "training.class_weight=balanced",
        "audio.trim_top_db=null",
        "folds.n_folds = 4",
    ])
    assert cfg["training"]["epochs"] == 3 and isinstance(cfg["training"]["epochs"], int)
    assert cfg["training"]["lr"] == 0.01 and isinstance(cfg["training"]["lr"], float)
    assert cfg["training"]["spec_augment"] == {"time_masks": 1, "time_width": 4, "freq_masks": 1,
                                               "freq_width": 6}   # the rest from the schema's defaults
    assert cfg["run"]["models"] == ["cnn_ref", "wave1d"]
    assert cfg["training"]["class_weight"] == "balanced"
    assert cfg["audio"]["trim_top_db"] is None
    assert cfg["folds"]["n_folds"] == 4
    assert cfg["training"]["batch_size"] == load_config("quick")["training"]["batch_size"]


def test_set_value_may_contain_equals():
    cfg = load_config("quick", ["training.callbacks=[{class: CSVLogger, args: {separator: '='}}]"])
    assert cfg["training"]["callbacks"][0]["args"]["separator"] == "="


def test_set_scientific_notation_is_a_number():
    cfg = load_config("quick", ["training.lr=1e-4", "audio.silence_peak=1e-5"])
    assert cfg["training"]["lr"] == pytest.approx(1e-4)
    assert cfg["audio"]["silence_peak"] == pytest.approx(1e-5)


def test_set_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("quick", ["training.epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("quick", ["seed.x=1"])


def test_model_config_merges_training_defaults():
    cfg = load_config("quick")
    snapshot = copy.deepcopy(cfg)
    for name in ("wave1d", "inception2d", "cnn_ref"):
        own = cfg["models"][name].get("train", {})
        spec = model_config(cfg, name)
        assert spec["name"] == name and spec["feature"] == cfg["models"][name]["feature"]
        for key, value in cfg["training"].items():
            if key not in own:
                assert spec["train"][key] == value, (name, key)        # the shared default
        for key, value in own.items():
            if not isinstance(value, dict):
                assert spec["train"][key] == value, (name, key)        # the model's own value wins
    assert cfg == snapshot                                                # the preset itself is not modified
    # the quick preset gives wave1d its own mixup and inception2d SpecAugment
    assert model_config(cfg, "wave1d")["train"]["mixup_alpha"] != cfg["training"]["mixup_alpha"]
    assert isinstance(model_config(cfg, "inception2d")["train"]["spec_augment"], dict)


def test_model_config_deep_merges_nested_train_settings():
    cfg = {"training": {"epochs": 4, "spec_augment": {"time_masks": 2, "time_width": 8}},
           "models": {"m": {"feature": "logmel", "train": {"spec_augment": {"time_width": 4}}}}}
    spec = model_config(cfg, "m")
    assert spec["train"]["epochs"] == 4
    assert spec["train"]["spec_augment"] == {"time_masks": 2, "time_width": 4, "freq_masks": 1, "freq_width": 6}
    assert spec["train"]["batch_size"] == Training().batch_size           # every other setting: its default
    assert cfg["training"]["spec_augment"]["time_width"] == 8


def test_model_config_defaults_and_unknown():
    cfg = {"training": {"epochs": 4}, "models": {"m": {"feature": "logmel", "train": {"epochs": 1, "lr": 0.1}}}}
    spec = model_config(cfg, "m")
    assert spec["builder"] == "m" and spec["params"] == {}
    assert spec["train"]["epochs"] == 1 and spec["train"]["lr"] == 0.1
    with pytest.raises(ConfigError) as info:
        model_config(cfg, "other")
    assert "other" in str(info.value) and "m" in str(info.value)


def test_every_listed_model_resolves():
    cfg = load_config("quick")
    models = cfg["run"]["models"]
    assert models
    for name in models:
        spec = model_config(cfg, name)
        if spec.get("embeddings_from"):  # a model on another model's embeddings
            assert spec["embeddings_from"] in models[:models.index(name)], name
        elif is_handcrafted(spec):  # statistics of whole clips: several features, no window
            assert all(f in cfg["features"] for f in handcrafted_features(spec)), name
            continue
        elif spec["builder"] == "hierarchical":  # whole-clip embeddings of earlier models: no window
            assert all(s in models[:models.index(name)] for s in spec["hierarchy"]["sources"]), name
            assert spec["window"] == 0 and spec["train"]["epochs"] >= 1, name
            continue
        else:
            assert spec["feature"] in cfg["features"], name
        assert isinstance(spec["window"], int) and spec["window"] > 0, name
        assert isinstance(spec["params"], dict), name
        assert spec["train"]["epochs"] >= 1, name


def test_every_listed_model_has_a_builder():
    pytest.importorskip("keras")
    import models
    cfg = load_config("quick")
    for name in cfg["run"]["models"]:
        spec = model_config(cfg, name)
        assert spec["builder"] in models.BUILDERS or is_handcrafted(spec), name


def test_param_hash_stable():
    assert param_hash({"a": 1, "b": [1, 2]}) == param_hash({"b": [1, 2], "a": 1})
    assert param_hash({"a": 1}) != param_hash({"a": 2})
    assert len(param_hash({"a": 1})) == 10 and len(param_hash({"a": 1}, 16)) == 16


def test_full_preset_resolves_every_model_and_feature():
    cfg = load_config("full")
    assert cfg["preset"] == "full"
    assert cfg["features"]["logmel"]["sr"] == 44100 and cfg["features"]["logmel"]["n_mels"] == 128
    for name in cfg["run"]["models"]:
        spec = model_config(cfg, name)
        assert (spec.get("embeddings_from") or spec.get("hierarchy") or (is_handcrafted(spec) and
                set(handcrafted_features(spec)) <= set(cfg["features"])) or spec["feature"] in cfg["features"]), name
    assert model_config(cfg, "wave1d")["train"]["batch_size"] == 128
    assert model_config(cfg, "inception2d")["window"] == 299
    assert cfg["pseudo_label"]["enabled"] and cfg["labels"]["source"] == "pseudo"
