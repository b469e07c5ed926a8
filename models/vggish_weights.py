"""Load the reference VGGish TensorFlow checkpoint into the Keras model, and
the reference PCA / quantisation postprocessing.

The reference checkpoint ``vggish_model.ckpt`` (TF1, TF-slim) holds
``vggish/<scope>/weights`` (conv: (3, 3, in, out); fc: (in, out)) and
``vggish/<scope>/biases`` for the scopes below; Keras uses the same layouts,
so the arrays are assigned as they are. TensorFlow is needed only to read the
checkpoint (``tensorflow.train.load_checkpoint``) and is imported lazily.
Nothing is ever downloaded: pass the path of a local copy.

The optional PCA file ``vggish_pca_params.npz`` holds ``pca_eigen_vectors``
(128, 128) and ``pca_means`` (128,) or (128, 1); ``apply_pca_quantize`` is the
reference ``Postprocessor.postprocess``: (emb - means) @ eigvecs.T, clip to
[-2, 2], quantise to uint8 0..255.
"""

from __future__ import annotations

import numpy as np

# Keras layer name -> checkpoint scope.
CHECKPOINT_SCOPES = {
    "conv1": "vggish/conv1",
    "conv2": "vggish/conv2",
    "conv3_1": "vggish/conv3/conv3_1",
    "conv3_2": "vggish/conv3/conv3_2",
    "conv4_1": "vggish/conv4/conv4_1",
    "conv4_2": "vggish/conv4/conv4_2",
    "fc1_1": "vggish/fc1/fc1_1",
    "fc1_2": "vggish/fc1/fc1_2",
    "fc2": "vggish/fc2",
}

EMBEDDING_SIZE = 128
QUANTIZE_MIN_VAL = -2.0
QUANTIZE_MAX_VAL = 2.0


def _embedding_of(model):
    """Accept the embedding model itself or a classifier that contains it as layer 'vggish'."""
    try:
        model.get_layer("conv1")
        return model
    except ValueError:
        pass
    try:
        return model.get_layer("vggish")
    except ValueError as exc:
        raise ValueError(
            f"model {model.name!r} has neither VGGish layers (conv1 ...) nor a 'vggish' sub-model"
        ) from exc


def load_vggish_checkpoint(embedding_model, ckpt_path):
    """Assign the reference checkpoint's weights to ``embedding_model`` (or to the
    'vggish' sub-model of a fine-tune classifier). Every variable must exist and
    have the Keras layer's shape; otherwise a ValueError names the variable, the
    expected and the found shape, and nothing is assigned. Returns the model."""
    try:
        import tensorflow as tf  # lazy: needed only for this conversion
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading the VGGish TensorFlow checkpoint needs the 'tensorflow' package "
            "(only for this one-off weight conversion; the models themselves run on "
            "any Keras backend). Install tensorflow(-cpu) or convert the weights on "
            "a machine that has it and save them with model.save_weights()."
        ) from exc

    model = _embedding_of(embedding_model)
    try:
        reader = tf.train.load_checkpoint(str(ckpt_path))
    except Exception as exc:
        raise FileNotFoundError(f"cannot read TensorFlow checkpoint {ckpt_path!s}: {exc}") from exc
    available = reader.get_variable_to_shape_map()

    plan = []
    problems = []
    for layer_name, scope in CHECKPOINT_SCOPES.items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            problems.append(f"model has no layer {layer_name!r} (for {scope})")
            continue
        kernel, bias = layer.kernel, layer.bias
        for suffix, var in (("weights", kernel), ("biases", bias)):
            name = f"{scope}/{suffix}"
            expected = tuple(int(d) for d in var.shape)
            if name not in available:
                problems.append(f"variable {name!r} missing from checkpoint "
                                f"(expected shape {expected})")
                continue
            found = tuple(int(d) for d in available[name])
            if found != expected:
                problems.append(f"variable {name!r}: expected shape {expected} "
                                f"(layer {layer_name!r}), found {found}")
                continue
            plan.append((var, name))
    if problems:
        raise ValueError(f"VGGish checkpoint {ckpt_path!s} does not fit the model: "
                         + "; ".join(problems))
    for var, name in plan:
        var.assign(np.asarray(reader.get_tensor(name), dtype=np.float32))
    return embedding_model


def load_pca_params(npz_path):
    """Return ``(eigen_vectors (128, 128), means (128,))`` from ``vggish_pca_params.npz``."""
    with np.load(npz_path) as data:
        for key in ("pca_eigen_vectors", "pca_means"):
            if key not in data:
                raise ValueError(f"{npz_path!s}: missing array {key!r} (has {sorted(data.files)})")
        eig = np.asarray(data["pca_eigen_vectors"], dtype=np.float64)
        means = np.asarray(data["pca_means"], dtype=np.float64)
    if eig.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE):
        raise ValueError(f"{npz_path!s}: pca_eigen_vectors has shape {eig.shape}, "
                         f"expected {(EMBEDDING_SIZE, EMBEDDING_SIZE)}")
    if means.shape not in ((EMBEDDING_SIZE,), (EMBEDDING_SIZE, 1)):
        raise ValueError(f"{npz_path!s}: pca_means has shape {means.shape}, "
                         f"expected {(EMBEDDING_SIZE,)} or {(EMBEDDING_SIZE, 1)}")
    return eig, means.reshape(EMBEDDING_SIZE)


def apply_pca_quantize(embeddings, eigen_vectors, means, quantize=True):
    """Reference postprocessing of (n, 128) embeddings: PCA (whitening as in
    ``vggish_postprocess``), clip to [-2, 2], and (if ``quantize``) map to uint8
    0..255 (truncation, as the reference). Returns float32 when not quantised."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[1] != EMBEDDING_SIZE:
        raise ValueError(f"embeddings must be (n, {EMBEDDING_SIZE}), got {emb.shape}")
    pca = (emb - np.asarray(means).reshape(1, -1)) @ np.asarray(eigen_vectors).T
    clipped = np.clip(pca, QUANTIZE_MIN_VAL, QUANTIZE_MAX_VAL)
    if not quantize:
        return clipped.astype(np.float32)
    scaled = (clipped - QUANTIZE_MIN_VAL) * (255.0 / (QUANTIZE_MAX_VAL - QUANTIZE_MIN_VAL))
    return scaled.astype(np.uint8)
