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
    "xception_ms": "models.xception_ms",
    "factorized_cnn": "models.factorized_cnn",
    "mini_segnet": "models.mini_segnet",
    "hierarchical": "models.hierarchical",
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
    """The default hyperparameters of model ``name``: its ``build`` signature's (a dict copy)."""
    return builder_defaults(name)


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


def builder_defaults(name):
    """A network builder's hyperparameters and defaults, read from its ``build``
    signature without importing the module (so config checks need no Keras).

    The signature is the one place a model's defaults live."""
    import ast
    from pathlib import Path

    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    if name not in _SIGNATURES:
        path = Path(__file__).resolve().parent / (_MODULES[name].rsplit(".", 1)[-1] + ".py")
        tree = ast.parse(path.read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
        args = fn.args.args[2:]  # after input_shape, n_classes
        defaults = fn.args.defaults[-len(args):] if args else []
        out = {a.arg: _plain(ast.literal_eval(d)) for a, d in zip(args, defaults)}
        for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
            if d is not None:
                out[a.arg] = _plain(ast.literal_eval(d))
        _SIGNATURES[name] = out
    return dict(_SIGNATURES[name])


def embedding_capable(name):
    """Whether builder ``name`` can also output an ``embedding`` (its ``build``
    takes ``embedding_output``; the model's outputs are then [probabilities,
    embedding]). Read from the signature, without Keras."""
    return "embedding_output" in builder_defaults(name)


_SIGNATURES: dict = {}


def _plain(value):
    """Tuples as lists: parameters travel through YAML and JSON fingerprints."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_param_type(name, key, value, default):
    """A hyperparameter must have the type of its default (int for float is fine, null default: any)."""
    if default is None or value is None:
        return
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, tuple)}
    ok = kinds.get(type(default), (type(default),))
    if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
        want = "/".join(t.__name__ for t in ok)
        raise ValueError(f"params.{key}: {value!r} should be {want} (as the default {default!r} of {name})")
