"""The typed config schema: every mistake stops on load with the key, its source and a suggestion."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, defaults, deep_merge, load_config, main, resolve
from pipeline.settings import Config, describe_config


def _preset(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_typo_in_a_preset_names_file_key_and_suggestion(tmp_path):
    path = _preset(tmp_path, "training:\n  epoch: 6\n")
    msg = _error(path)
    assert msg.startswith(str(path)) and "training.epoch" in msg and "did you mean epochs" in msg


def test_typo_in_set_names_the_assignment_and_suggestion():
    msg = _error("quick", ["training.epoch=6"])
    assert msg.startswith("--set training.epoch=6") and "did you mean epochs" in msg
    msg = _error("quick", ["models.cnn_ref.params.filtres=[8]"])
    assert "models.cnn_ref.params.filtres" in msg and "filters" in msg
    msg = _error("quick", ["models.inception2d.train.mixup_alfa=0.1"])
    assert "models.inception2d.train.mixup_alfa" in msg and "mixup_alpha" in msg
    msg = _error("quick", ["features.logmel.n_mel=64"])
    assert "features.logmel.n_mel" in msg and "n_mels" in msg and "logmel." not in msg.split("features.")[0]
    msg = _error("quick", ["stacking.logreg.per_model_weight=false"])
    assert "stacking.logreg.per_model_weight" in msg and "per_model_weights" in msg
    msg = _error("quick", ["pseudo_label.gaurd=true"])
    assert "did you mean guard" in msg


def test_typo_in_an_inherited_preset_names_that_file(tmp_path):
    parent = _preset(tmp_path, "seed: 1\nfolds: {n_fold: 3}\n", "parent.yaml")
    child = _preset(tmp_path, f"inherit: {parent}\nseed: 2\n", "child.yaml")
    msg = _error(child)
    assert msg.startswith(str(parent)) and "folds.n_fold" in msg and "n_folds" in msg


@pytest.mark.parametrize("assignment, words", [
    ("training.epochs=abc", ["training.epochs", "'abc'", "integer"]),
    ("training.epochs=true", ["training.epochs", "True"]),
    ("training.epochs=2.5", ["training.epochs", "2.5"]),
    ("training.epochs=0", ["training.epochs", "greater than or equal to 1"]),
    ("training.lr_factor=1.5", ["training.lr_factor", "1.5"]),
    ("training.early_stopping_split=outer", ["training.early_stopping_split", "heldout", "inner"]),
    ("folds.n_folds=1", ["folds.n_folds"]),
    ("run.models=[cnn_ref, cnn_rf]", ["run.models", "cnn_rf", "did you mean cnn_ref"]),
    ("models.cnn_ref.params.dropout=high", ["models.cnn_ref.params.dropout", "'high'"]),
    ("models.stats_lr.params.C=big", ["models.stats_lr.params.C", "big"]),
    ("models.cnn_ref.feature=logmell", ["models.cnn_ref", "logmell", "did you mean logmel"]),
    ("pseudo_label.unresolved_epsilon=[0.4, 0.2]", ["pseudo_label.unresolved_epsilon"]),
    ("features.wave.kind=waveform", ["features.wave", "waveform"]),
])
def test_wrong_types_and_ranges_fail_with_the_key(assignment, words):
    msg = _error("quick", [assignment])
    assert msg.startswith(f"--set {assignment}")
    for word in words:
        assert word in msg, (word, msg)


def test_an_unknown_builder_and_section_are_refused():
    assert "did you mean" in _error("quick", ["models.x.builder=cnn_rf"])
    assert "unknown setting" in _error("quick", ["new.section=1"])


def test_resolved_config_fills_every_default():
    cfg = load_config("quick")
    assert cfg == resolve(cfg)                                  # resolving twice changes nothing
    assert cfg["models"]["cnn_ref"]["params"]["pooling"] == "avg"   # from the builder's signature
    assert cfg["models"]["stats_lgbm"]["params"]["max_bin"] == 63   # from StatsLgbmParams
    assert cfg["models"]["mla"]["builder"] == "mla"
    custom = load_config("quick", ["features.lm64={kind: logmel, n_mels: 64}"])
    assert custom["features"]["lm64"]["n_fft"] == 1024 and custom["features"]["lm64"]["n_mels"] == 64


def test_presets_hold_only_what_differs_from_the_defaults():
    base = defaults()
    for name in ("quick", "full"):
        layer = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        layer.pop("inherit", None)

        def walk(node, ref, path):
            for key, value in node.items():
                here = f"{path}.{key}".lstrip(".")
                if isinstance(value, dict) and isinstance(ref.get(key), dict) and key not in ("params", "train"):
                    walk(value, ref[key], here)
                elif isinstance(value, dict) and isinstance(ref.get(key), dict):
                    same = {k for k, v in value.items() if ref[key].get(k) == v}
                    assert not same, f"{name}.yaml: {here} repeats the defaults of {sorted(same)}"
                else:
                    assert ref.get(key, object()) != value, f"{name}.yaml: {here} repeats the default {value!r}"

        walk(layer, base, "")
    assert load_config("quick") == resolve({"preset": "quick"})


def test_printout_has_every_section_and_the_docs(capsys):
    assert main(["--preset", "quick"]) == 0
    out = capsys.readouterr().out
    for line in ("seed: 2018  # folds, crops, augmentation and weight init",
                 "  epochs: 8  # training epochs per fold",
                 "  guard: true  # verify:"):
        assert line in out, line
    assert yaml.safe_load(out) == yaml.safe_load(describe_config(load_config("quick")))
    assert yaml.safe_load(out)["models"]["cnn_ref"]["window"] == 64
    assert main(["--preset", "quick", "--set", "training.epoch=3"]) == 2
    assert "did you mean epochs" in capsys.readouterr().err


def test_every_field_has_a_doc():
    from pydantic import BaseModel

    from pipeline import settings

    for obj in vars(settings).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == settings.__name__:
            for name, field in obj.model_fields.items():
                if name != "kind":
                    assert field.description, f"{obj.__name__}.{name} has no doc"


def test_config_round_trips_through_the_schema():
    cfg = load_config("full")
    again = Config.model_validate(cfg).model_dump()
    assert again == cfg
    assert deep_merge(cfg, {}) == cfg


def test_triplet_loss_is_refused_where_it_cannot_train():
    msg = _error("quick", ["models.cnn_ref.train.loss=triplet"])
    assert "models.cnn_ref.train.loss" in msg and "embedding output" in msg and "factorized_cnn" in msg
    msg = _error("quick", ["models.factorized_cnn.train.mixup_alpha=0.4"])
    assert "mixup and the triplet loss do not mix" in msg
    msg = _error("quick", ["models.factorized_cnn.params.embedding_output=true"])
    assert "set by the trainer" in msg
    assert load_config("quick", ["models.xception_ms.train.loss=triplet"])["models"]["xception_ms"]["train"]["loss"] \
        == "triplet"   # xception_ms has an embedding output too
