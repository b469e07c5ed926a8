"""Configuration: YAML presets (``config/quick.yaml``, ``config/full.yaml``).

A preset groups settings by concern (audio, features, folds, training,
models, labels, pseudo_label, stacking). Stage scripts load one preset and
may override single values from the command line with ``--set a.b=value``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pipeline.fingerprints import param_hash  # noqa: F401  (re-exported: caches import it from here)

import re
_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class ConfigError(ValueError):
    """A preset is missing, malformed or names something unknown."""


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(cfg: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    node[keys[-1]] = value


def load_config(name_or_path: str | Path = "quick", overrides: list[str] | None = None,
                validate: bool = True) -> dict:
    """Load a preset by name (``quick``) or by YAML path, then apply overrides.

    A preset may say ``inherit: other`` to start from another preset.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {name_or_path!r} not found (known presets: {', '.join(known)})")
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = cfg.pop("inherit", None)
    if parent:
        base = load_config(parent, validate=False)
        base.pop("preset", None)  # the child's own name, not the parent's
        cfg = _deep_merge(base, cfg)
    if validate:
        check_settings(cfg, source=str(path))
    for assignment in overrides or []:
        _apply_override(cfg, assignment)
    if validate and overrides:
        check_settings(cfg, source="--set " + " ".join(overrides))
    cfg.setdefault("preset", path.stem)
    return cfg


# -- validation ------------------------------------------------------------
# The training section's settings: name -> (accepted types, lower bound, upper bound, one-line doc).
# None as a bound: unbounded; None in the types: the setting may be null.
_NUM = (int, float)
TRAINING_SETTINGS: dict[str, tuple] = {
    "epochs": ((int,), 1, None, "training epochs per fold"),
    "batch_size": ((int,), 1, None, "clips per batch"),
    "steps_per_epoch": ((int, type(None)), 1, None, "null: one pass over the training clips"),
    "lr": (_NUM, 0.0, None, "Adam learning rate"),
    "lr_factor": (_NUM, 0.0, 1.0, "reduce-on-plateau factor"),
    "lr_patience": ((int,), 1, None, "epochs without gain before the LR is reduced"),
    "min_lr": (_NUM, 0.0, None, "floor of the learning rate"),
    "early_stop_patience": ((int,), 1, None, "epochs without gain before the fold stops"),
    "mixup_alpha": (_NUM, 0.0, None, "Beta(a, a) mixup; 0 disables"),
    "spec_augment": ((dict, type(None)), None, None, "time/frequency masks for 2D inputs"),
    "class_weight": ((str, type(None)), None, None, "null or balanced"),
    "smoothing_verified": (_NUM + (type(None),), 0.0, 1.0, "label smoothing of verified rows"),
    "smoothing_unverified": (_NUM + (type(None),), 0.0, 1.0, "label smoothing of non-verified rows"),
    "loss_masking": (_NUM + (type(None),), 0.0, 1.0, "null or the masking ratio"),
    "eval_hop_fraction": (_NUM, 0.0, 1.0, "sliding-window hop at inference, fraction of the window"),
    "eval_batch_size": ((int,), 1, None, "windows per inference batch"),
    "strict_determinism": ((bool,), None, None, "TF op determinism"),
    "bn_momentum": (_NUM + (type(None),), 0.0, 1.0, "BatchNorm momentum (null: the builder's)"),
    "batch_policy": ((str, type(None)), None, None, "balanced or unbalanced"),
    "early_stopping_split": ((str,), None, None, "heldout (the fold's held-out clips) or inner "
                                                 "(a seeded slice of the training folds)"),
    "inner_fraction": (_NUM, 0.0, 0.5, "share of the training clips in the inner early-stopping slice"),
    "callbacks": ((list, type(None)), None, None, "extra Keras callbacks per fold: [{class: CSVLogger or "
                                                   "pkg.module.Class, args: {...}}]; '{fold_dir}' in a string "
                                                   "argument is the fold's folder"),
}
_EXCLUSIVE_LOW = {"lr", "lr_factor", "inner_fraction"}
_CHOICES = {"early_stopping_split": ("heldout", "inner"), "class_weight": (None, "balanced"),
            "batch_policy": (None, "balanced", "unbalanced")}


def _closest(name: str, known) -> str:
    import difflib
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else f" (known: {', '.join(sorted(known))})"


def _check_value(where: str, value, types, lo, hi, source: str) -> None:
    # bool is an int subclass: True must not pass as an epoch count
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join("null" if t is type(None) else t.__name__ for t in types)
        raise ConfigError(f"{source}: {where} = {value!r}: expected {names}")
    if isinstance(value, _NUM) and not isinstance(value, bool):
        exclusive = where.rsplit(".", 1)[-1] in _EXCLUSIVE_LOW
        if lo is not None and (value < lo or (exclusive and value == lo)):
            raise ConfigError(f"{source}: {where} = {value!r}: must be {'>' if exclusive else '>='} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{source}: {where} = {value!r}: must be <= {hi}")


def _check_training(section, where: str, source: str) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {where} must be a mapping")
    for key, value in section.items():
        if key not in TRAINING_SETTINGS:
            raise ConfigError(f"{source}: unknown setting {where}.{key}{_closest(key, TRAINING_SETTINGS)}")
        types, lo, hi, _doc = TRAINING_SETTINGS[key]
        _check_value(f"{where}.{key}", value, types, lo, hi, source)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{source}: {where}.{key} = {value!r}: must be one of "
                              f"{', '.join('null' if c is None else c for c in _CHOICES[key])}")


def check_settings(cfg: dict, source: str = "config") -> None:
    """Types and ranges of the settings a long run depends on, so a typo or
    a bad value stops the run in its first second with the key named."""
    seed = cfg.get("seed", 2018)
    _check_value("seed", seed, (int,), 0, None, source)
    folds = cfg.get("folds") or {}
    if not isinstance(folds, dict):
        raise ConfigError(f"{source}: folds must be a mapping")
    unknown = set(folds) - {"n_folds"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting folds.{sorted(unknown)[0]} (known: n_folds)")
    _check_value("folds.n_folds", folds.get("n_folds", 5), (int,), 2, None, source)
    _check_training(cfg.get("training"), "training", source)
    models = cfg.get("models") or {}
    for name, spec in models.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: models.{name} must be a mapping")
        _check_training(spec.get("train"), f"models.{name}.train", source)
        if "window" in spec:
            _check_value(f"models.{name}.window", spec["window"], (int,), 0, None, source)
    pl = cfg.get("pseudo_label") or {}
    if isinstance(pl, dict):
        _check_training(pl.get("train"), "pseudo_label.train", source)
        for name, spec in (pl.get("models") or {}).items():
            if isinstance(spec, dict):
                _check_training(spec.get("train"), f"pseudo_label.models.{name}.train", source)
    run_models = (cfg.get("run") or {}).get("models") or []
    if not isinstance(run_models, list):
        raise ConfigError(f"{source}: run.models must be a list of model names")
    for m in run_models:
        if m not in models:
            raise ConfigError(f"{source}: run.models names {m!r}, which models does not define"
                              f"{_closest(str(m), models)}")


def model_config(cfg: dict, model: str) -> dict:
    """The full settings of one model: the shared ``training`` defaults
    overridden by the model's own ``train`` section."""
    models = cfg.get("models", {})
    if model not in models:
        raise ConfigError(f"model {model!r} is not defined in the preset (defined: {', '.join(models)})")
    spec = copy.deepcopy(models[model])
    spec["train"] = _deep_merge(cfg.get("training", {}), spec.get("train", {}))
    spec.setdefault("builder", model)
    spec.setdefault("params", {})
    spec["name"] = model
    return spec


