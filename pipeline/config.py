"""Configuration: YAML presets (``config/quick.yaml``, ``config/full.yaml``).

A preset groups settings by concern (audio, features, folds, training,
models, labels, pseudo_label, stacking). Stage scripts load one preset and
may override single values from the command line with ``--set a.b=value``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

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


def load_config(name_or_path: str | Path = "quick", overrides: list[str] | None = None) -> dict:
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
        base = load_config(parent)
        base.pop("preset", None)  # the child's own name, not the parent's
        cfg = _deep_merge(base, cfg)
    for assignment in overrides or []:
        _apply_override(cfg, assignment)
    cfg.setdefault("preset", path.stem)
    return cfg


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


def param_hash(params: Any, length: int = 10) -> str:
    """Stable short hash of a JSON-able value, used to key caches."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]
