"""Time one training epoch of each model on the current Keras backend.

    python -m benchmarks.bench_models [--config quick] [--models cnn_ref wave1d ...] [--steps 20]
    KERAS_BACKEND=jax python -m benchmarks.bench_models ...

Each model runs in its own subprocess (so peak memory is its own): build
with the preset's input shape, compile, one warm-up step (tracing is not
timed), then ``--steps`` training steps on random data of the preset's
batch size. Prints samples/s, peak resident memory and the parameter
count, one JSON line per model, and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def input_shape(cfg: dict, spec: dict) -> tuple:
    """The model input the preset produces: (window,) + the feature's trailing axes."""
    if spec.get("embeddings_from"):
        return (int(spec["window"]), 128)
    feat = cfg["features"][spec["feature"]]
    kind = feat.get("kind", spec["feature"])
    if kind == "logmel":
        return (int(spec["window"]), int(feat["n_mels"]), 3)
    if kind == "mfcc":
        return (int(spec["window"]), int(feat["n_mfcc"]))
    if kind == "wave":
        return (int(spec["window"]), 1)
    if kind == "vggish":
        return (int(spec["window"]), 64)
    raise ValueError(f"unknown feature kind {kind}")


def bench_one(config: str, model: str, steps: int, n_classes: int) -> dict:
    import numpy as np
    import keras
    from pipeline.config import load_config, model_config
    from pipeline.trainer import build_compiled

    cfg = load_config(config)
    spec = model_config(cfg, model)
    shape = input_shape(cfg, spec)
    batch = int(spec["train"].get("batch_size", 32))
    if spec["train"].get("batch_policy") == "balanced":
        batch = n_classes
    model_obj = build_compiled(spec, shape, n_classes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, n_classes, batch), n_classes)
    model_obj.train_on_batch(x, y)  # trace/compile outside the timing
    start = time.perf_counter()
    for _ in range(steps):
        model_obj.train_on_batch(x, y)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "backend": keras.backend.backend(), "input_shape": list(shape), "batch": batch,
            "steps": steps, "samples_per_s": round(steps * batch / seconds, 1),
            "peak_rss_mb": round(peak_mb), "params": int(model_obj.count_params())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quick")
    p.add_argument("--models", nargs="*", default=None, help="default: the preset's run.models")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classes", type=int, default=41)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one model here
    p.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(bench_one(args.config, args.one, args.steps, args.classes)))
        return
    from pipeline.config import load_config
    models = args.models or load_config(args.config)["run"]["models"]
    results = []
    for m in models:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_models", "--config", args.config,
                               "--one", m, "--steps", str(args.steps), "--classes", str(args.classes)],
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            print(f"{m}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        results.append(res)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    print("\n| model | backend | input | batch | samples/s | peak RSS MB | params |\n|---|---|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['backend']} | {tuple(r['input_shape'])} | {r['batch']} | {r['samples_per_s']} "
              f"| {r['peak_rss_mb']} | {r['params']:,} |")


if __name__ == "__main__":
    main()
