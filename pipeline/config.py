"""Loading a configuration: schema defaults, a preset over them, ``--set`` on top.

The settings, their defaults and docs are in :mod:`pipeline.settings` (the
defaults are the ``quick`` settings); a preset (``config/<name>.yaml``, or a
path) holds only what differs, and may say ``inherit: other``. Every layer is
validated as it is applied, so an error names the file or the ``--set`` that
brought the bad key. The result is a plain dict with every default filled in.

    python -m pipeline.config --preset quick [--set key=value ...]

prints the resolved config with each setting's doc.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.settings import Config, ModelSpec, Training, describe_error
from pipeline.settings import merge_dicts

_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class ConfigError(ValueError):
    """A preset is missing, malformed or names something unknown."""


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for mappings; neither is modified."""
    return copy.deepcopy(merge_dicts(base, override))


def yaml_numbers(value):
    """YAML 1.1 reads 1e-4 (no dot) as a string; every such string is a number."""
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml_numbers(v) for v in value]
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


def _apply_override(cfg: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted.strip()}: {key!r} is not a section")
    node[keys[-1]] = yaml_numbers(yaml.safe_load(raw))


def _preset_path(name_or_path) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {name_or_path!r} not found (known presets: {', '.join(known)})")
    return path


def _preset_layers(name_or_path, seen=()) -> list[tuple[str, dict]]:
    """[(source, settings)] from the farthest ``inherit`` ancestor to the preset itself."""
    path = _preset_path(name_or_path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit loops back to itself")
    try:
        with open(path) as fh:
            layer = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    layer = yaml_numbers(layer)
    parent = layer.pop("inherit", None)
    layer.pop("preset", None)
    above = _preset_layers(parent, seen + (path.resolve(),)) if parent else []
    return above + [(str(path), layer)]


def defaults() -> dict:
    """Every setting at its default (the ``quick`` values)."""
    return Config().model_dump()


def resolve(cfg: dict, source: str = "config") -> dict:
    """Validate a (partial) config over the defaults; the plain dict with every default filled in."""
    try:
        return Config.model_validate(deep_merge(defaults(), cfg)).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc)}") from None


def section(cfg: dict, name: str) -> dict:
    """One top-level section of a (possibly partial) config, validated, defaults filled in."""
    model = Config.model_fields[name].annotation
    try:
        return model.model_validate(cfg.get(name) or {}).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"{name}.{describe_error(exc, model=model)}") from None


def load_config(name_or_path: str | Path = "quick", overrides: list[str] | None = None) -> dict:
    """Load a preset by name (``quick``) or by YAML path, then apply ``--set`` overrides."""
    layers = _preset_layers(name_or_path)
    merged = defaults()
    for source, layer in layers:
        merged = deep_merge(merged, layer)
        resolve(merged, source)
    for assignment in overrides or []:
        _apply_override(merged, assignment)
        resolve(merged, f"--set {assignment}")
    merged["preset"] = _preset_path(name_or_path).stem
    return resolve(merged)


#: model settings that say how a model's jobs are run, not what they compute (``resources``: what a
#: Ray job requests); :func:`model_config` leaves them out, so no fingerprint ever includes them
EXECUTOR_ONLY = ("resources",)


def without_executor_settings(spec: dict) -> dict:
    """A model entry without :data:`EXECUTOR_ONLY`: what its results depend on."""
    return {k: v for k, v in spec.items() if k not in EXECUTOR_ONLY}


def model_config(cfg: dict, model: str) -> dict:
    """The full settings of one model: the shared ``training`` settings
    overridden by the model's own ``train`` section (without the executor-only
    settings: :func:`pipeline.executor.job_resources` reads those)."""
    models = cfg.get("models", {})
    if model not in models:
        raise ConfigError(f"model {model!r} is not defined in the preset (defined: {', '.join(models)})")
    spec = without_executor_settings(copy.deepcopy(models[model]))
    train = deep_merge(cfg.get("training") or {}, spec.get("train") or {})
    try:
        spec["train"] = Training.model_validate(train).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"models.{model}.train: {describe_error(exc, model=Training)}") from None
    spec["builder"] = spec.get("builder") or model
    spec.setdefault("params", {})
    spec["name"] = model
    return spec


def training_settings(train: dict | None) -> dict:
    """A (possibly partial) training section, validated, every default filled in."""
    try:
        return Training.model_validate(train or {}).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"training.{describe_error(exc, model=Training)}") from None


def model_settings(spec: dict) -> dict:
    """A model entry (as :func:`model_config` returns it, or made by hand) with every
    default filled in: the model-level fields and the whole training section."""
    fields = {k: v for k, v in spec.items() if k in ModelSpec.model_fields and k != "train"}
    try:
        out = {**spec, **ModelSpec.model_validate(fields).model_dump(exclude={"train", *EXECUTOR_ONLY})}
    except ValidationError as exc:
        raise ConfigError(f"models.{spec.get('name', '?')}.{describe_error(exc, model=ModelSpec)}") from None
    out["train"] = training_settings(spec.get("train"))
    out["builder"] = out.get("builder") or spec.get("name")
    return out


def verifier_config(cfg: dict, name: str) -> dict:
    """Full settings of one pseudo-label verifier: a model of ``models`` or of
    ``pseudo_label.models`` (verifier-only entries), with ``pseudo_label.train``
    over its training settings."""
    pl = cfg.get("pseudo_label") or {}
    merged = dict(cfg)
    merged["models"] = {**(cfg.get("models") or {}), **(pl.get("models") or {})}
    if name in merged["models"]:
        merged["models"][name] = deep_merge(merged["models"][name],
                                            {"train": deep_merge(merged["models"][name].get("train") or {},
                                                                 pl.get("train") or {})})
    return model_config(merged, name)


# ---------------------------------------------------------------- the printout
def describe(cfg: dict) -> str:
    """The resolved config as YAML, each setting followed by its doc."""
    from pipeline.settings import describe_config
    return describe_config(cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.config",
                                description="Print a preset's resolved settings with each one's doc.")
    p.add_argument("--preset", "--config", dest="preset", default="quick", help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
