"""Network builders: ``build(input_shape, n_classes, **params) -> keras.Model``
whose output is class probabilities (softmax, float32).

``import models`` is cheap: the builder modules (and Keras) are imported on
first use. Models with custom layers (``mla``'s ``AttentionPooling``) must have
their module imported before ``keras.saving.load_model``; ``models.load_model``
does that for you.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "cnn_ref": "models.cnn_ref",
    "wave1d": "models.wave1d",
    "inception2d": "models.inception2d",
    "vggish": "models.vggish",
    "mla": "models.mla",
}


def _lazy_builder(name, module_name):
    def build(input_shape, n_classes, **params):
        return importlib.import_module(module_name).build(input_shape, n_classes, **params)

    build.__name__ = f"build_{name}"
    build.__qualname__ = build.__name__
    build.__doc__ = f"Lazy alias of ``{module_name}.build`` (see that module's docstring)."
    build.module = module_name
    return build


BUILDERS = {name: _lazy_builder(name, mod) for name, mod in _MODULES.items()}


def build_model(name, input_shape, n_classes, **params):
    """Build model ``name`` (a key of ``BUILDERS``) with the given hyperparameters."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](tuple(input_shape), int(n_classes), **params)


def default_params(name):
    """The documented default hyperparameters of model ``name`` (a dict copy)."""
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    return dict(importlib.import_module(_MODULES[name]).DEFAULTS)


def register_custom_objects():
    """Import every builder module so their custom layers are registered with
    Keras (package ``audio_tagging``) before a saved model is loaded."""
    for mod in _MODULES.values():
        importlib.import_module(mod)


def load_model(path, compile=True, **kwargs):
    """``keras.saving.load_model`` with this package's custom layers registered."""
    register_custom_objects()
    import keras

    return keras.saving.load_model(path, compile=compile, **kwargs)
