"""Build every model and run one training step on the current Keras backend.

    KERAS_BACKEND=jax python -m benchmarks.backend_smoke      # needs `pip install jax` in the venv
    KERAS_BACKEND=torch python -m benchmarks.backend_smoke    # needs torch

Uses the project's own loss (with loss masking too) so the losses are
checked as well. Tiny widths: this checks that the code runs, not speed.
The focal and triplet losses through the trainer (one fold of xception_ms
and factorized_cnn each) are checked on a backend with
``KERAS_BACKEND=jax python -m pytest -q tests/test_trainer_losses.py``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import models
from pipeline.losses import TaggingCrossEntropy

CASES = {
    "cnn_ref": ((64, 32, 3), dict(filters=(8, 16))),
    "wave1d": ((4096, 1), dict(widths=(8, 16, 24, 32))),
    "inception2d": ((64, 64, 3), dict(width=0.25)),
    "vggish": ((96, 64), dict(width=1 / 16, hidden=16)),
    "xception_ms": ((32, 48, 3), dict(width=0.125, middle_blocks=1)),
    "factorized_cnn": ((32, 48, 3), dict(channels=(8, 16), fc_units=16)),
    "mla": ((6, 128), dict(units=32)),
}


def main():
    print("backend:", keras.backend.backend())
    n = 5
    y = np.eye(n, dtype="float32")[[0, 1, 2, 3]]
    for name, (shape, params) in CASES.items():
        start = time.time()
        for mask in (None, 0.8):
            model = models.build_model(name, shape, n, **params)
            x = np.random.default_rng(0).random((4, *shape)).astype("float32")
            target = y if mask is None else np.concatenate([y, [[1], [0], [1], [0]]], axis=1).astype("float32")
            model.compile(optimizer="adam", loss=TaggingCrossEntropy(mask_ratio=mask))
            loss = float(np.ravel(model.train_on_batch(x, target))[0])
            probs = keras.ops.convert_to_numpy(model(x))
            assert probs.shape == (4, n) and np.allclose(probs.sum(1), 1, atol=1e-5)
            assert np.isfinite(loss)
        print(f"{name}: one training step ok (loss {loss:.3f}, {model.count_params():,} params, "
              f"{time.time() - start:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mla.keras"
        model.save(path)
        again = models.load_model(path)
        diff = np.abs(keras.ops.convert_to_numpy(again(x)) - probs).max()
        print(f"mla saved and reloaded: max difference {diff:.2g}")


if __name__ == "__main__":
    main()
