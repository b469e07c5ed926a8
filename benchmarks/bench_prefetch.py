"""Throughput of the prefetching input pipeline (issue 15). Not a test: the numbers depend on the
machine and on whatever else shares its CPU.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_prefetch produce [--presets quick full] [--workers 0 1 2]
        [--kinds thread process] [--models ...] [--seconds 2] [--rounds 3]
    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_prefetch train [--preset quick] [--models ...]
        [--steps 8] [--rounds 15] [--loaders 0 1:thread 1:process]
    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_prefetch predict [--preset quick] [--models ...] [--rounds 3]

``produce``: samples/s (median of ``--rounds`` interleaved rounds) of training-batch production
(``WindowBatches``: random windows, normalisation, SpecAugment, mixup, targets, exactly as the
trainer makes them) for every network of ``run.models`` at the preset's shapes, with 0 workers
(made inline, today's path), and 1, 2, ... worker threads or processes filling the bounded queue
(processes: the batch crosses the pipe to this process; startup excluded, a fold pays it once).
``train``: the fold loop's samples/s (``train_on_batch`` on batches made inline vs ahead by the
loader), blocks of steps of each loader interleaved round by round (A B C A B C ...), median of the
rounds and of the per-round ratios to inline.
``predict``: sliding-window prediction (``predict_clips``) windows/s, inline vs ahead.

The features are synthetic, in a real feature store (sharded ``.npy``, memory-mapped): the
preset's feature shapes and dtypes, 41 classes x 5 clips of 1-12 s (uniform; FSDKaggle2018's
clips are 0.3-30 s, 6.7 s on average), written once to a temporary folder. Prints one JSON line per
measurement and Markdown tables at the end.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CLASSES, CLIPS_PER_CLASS = 41, 5


def _frame_shape(feature: dict, spec: dict, cfg: dict) -> tuple[tuple, float, str]:
    """(per-frame shape, frames per second, dtype) of a feature (or of a model's embeddings)."""
    kind = feature["kind"]
    if kind == "logmel":
        return (feature["n_mels"], 3), feature["sr"] / feature["hop_length"], feature["dtype"]
    if kind == "wave":
        return (1,), float(feature["sr"]), feature["dtype"]
    if kind == "vggish":
        return (64,), 100.0, "float32"
    if kind == "mfcc":
        return (feature["n_mfcc"],), feature["sr"] / feature["hop_length"], feature["dtype"]
    if kind == "cqt":
        return (feature["n_bins"],), feature["sr"] / feature["hop_length"], feature["dtype"]
    if kind == "gammatone":
        return (feature["n_bands"],), feature["sr"] / feature["hop_length"], feature["dtype"]
    if kind == "embeddings":
        return (int(feature["size"]),), 1 / 0.96, "float32"
    raise ValueError(kind)


def _feature_store_class():
    from pipeline.cache import FeatureStore
    return FeatureStore


class SyntheticStore(_feature_store_class()):
    """A feature store whose settings are taken as given (no kind's schema: embeddings too)."""

    def settings(self, name, spec):
        return dict(spec)


def synthetic_store(root: Path, name: str, feature: dict, spec: dict, cfg: dict, seed: int = 0):
    """A feature store of random clips with ``feature``'s shape and dtype (``train`` split)."""
    from benchmarks.bench_prefetch import SyntheticStore  # by module name, so worker processes can unpickle it
    from pipeline.workdir import WorkDir
    store = SyntheticStore(WorkDir(root), name, dict(feature), cfg["audio"])
    shape, fps, dtype = _frame_shape(feature, spec, cfg)
    labels = np.repeat(np.arange(N_CLASSES), CLIPS_PER_CLASS)
    fnames = [f"clip{i:04d}.wav" for i in range(len(labels))]
    if not (store.root / "stats.json").exists():
        store.ensure_dir()
        rng = np.random.default_rng(seed)
        for start in range(0, len(fnames), 32):
            arrays = {}
            for f in fnames[start:start + 32]:
                frames = max(1, int(rng.uniform(1.0, 12.0) * fps))
                arrays[f] = rng.standard_normal((frames,) + shape, dtype=np.float32).astype(dtype)
            store.write_shard("train", arrays, {})
        store.compute_stats(fnames, max_clips=20)
    return store, fnames, labels


def model_inputs(cfg: dict, name: str, root: Path):
    """(spec, store, WindowBatches) of model ``name`` on synthetic features."""
    from pipeline.config import model_config
    from pipeline.batches import TrainRows, WindowBatches
    from pipeline.normalize import Normalizer
    spec = model_config(cfg, name)
    if spec.get("embeddings_from"):
        source = model_config(cfg, spec["embeddings_from"])
        feature = {"kind": "embeddings", "size": int(source["params"].get("embedding_size", 128))}
        fname = f"embeddings-{spec['embeddings_from']}"
    else:
        feature = cfg["features"][spec["feature"]]
        fname = spec["feature"]
    store, fnames, labels = synthetic_store(root, fname, feature, spec, cfg)
    rows = TrainRows(fnames, labels, np.full(len(fnames), 0.05, np.float32), np.ones(len(fnames), int))
    normalizer = Normalizer(store.stats() if spec["normalize"] else None)
    batches = WindowBatches(store, rows, N_CLASSES, int(spec["window"]), spec["train"], normalizer, seed=1)
    return spec, store, batches


def networks(cfg: dict, models: list[str] | None) -> list[str]:
    from pipeline.config import model_config
    out = []
    for name in models or cfg["run"]["models"]:
        spec = model_config(cfg, name)
        if spec.get("feature") or spec.get("embeddings_from"):
            out.append(name)
    return out


def _tasks(batches, first_epoch: int = 0):
    return ((e, i) for e in itertools.count(first_epoch) for i in range(len(batches)))


def _cpu_seconds(loader) -> float:
    """CPU seconds used so far by this process (every thread) and the loader's worker processes."""
    total = time.process_time()
    for worker in getattr(getattr(loader, "_pool", None), "workers", []):
        try:
            fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except OSError:
            pass
    return total


def produce_rate(batches, workers: int, kind: str, seconds: float) -> tuple[float, float]:
    """(samples/s, samples per CPU-second) of batches taken from the loader by an idle consumer
    (steady state). The CPU seconds count every thread of this process and the worker processes, so
    the second figure is what one core makes, whatever else shares the machine."""
    from pipeline.prefetch import Prefetch
    with Prefetch(batches, workers, max(2, 2 * workers), kind=kind) as loader:
        made = loader.map(_tasks(batches))
        for _ in range(max(2, 2 * workers)):  # startup, first orders, page cache
            next(made)
        n, start, cpu = 0, time.perf_counter(), _cpu_seconds(loader)
        while time.perf_counter() - start < seconds or n < 3:
            next(made)
            n += 1
        wall, cpu = time.perf_counter() - start, _cpu_seconds(loader) - cpu
        made.close()
    samples = n * batches.batch_size
    return samples / wall, samples / max(cpu, 1e-9)


def cmd_produce(args) -> list[dict]:
    """Per model, every loader measured ``--rounds`` times, interleaved (A B C A B C ...), median kept."""
    from pipeline.config import load_config
    rows = []
    for preset in args.presets:
        cfg = load_config(preset)
        for name in networks(cfg, args.models):
            spec, store, batches = model_inputs(cfg, name, Path(args.tmp) / preset)
            shape = [int(spec["window"])] + list(store.load("train", batches.rows.fnames[0]).shape[1:])
            loaders = [(w, k) for w in args.workers for k in (["thread"] if w == 0 else args.kinds)]
            rates: dict[tuple, list[tuple[float, float]]] = {lo: [] for lo in loaders}
            for _ in range(args.rounds):
                for workers, kind in loaders:
                    rates[(workers, kind)].append(produce_rate(batches, workers, kind, args.seconds))
            for (workers, kind), values in rates.items():
                row = {"preset": preset, "model": name, "feature": store.kind, "shape": shape,
                       "dtype": str(store.dtype), "batch": batches.batch_size, "workers": workers,
                       "kind": "inline" if workers == 0 else kind,
                       "samples_per_s": round(statistics.median(v[0] for v in values), 1),
                       "samples_per_cpu_s": round(statistics.median(v[1] for v in values), 1),
                       "rounds": [round(v[0]) for v in values]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _loaders(specs: list[str]) -> list[tuple[int, str]]:
    out = []
    for s in specs:
        workers, _, kind = s.partition(":")
        out.append((int(workers), kind or "thread"))
    return out


def _vs_inline(values: list[float], base: list[float]) -> dict:
    """The median of the per-round ratios to the inline loader's rate, and their quartiles (the spread).
    Python's default (exclusive) quartiles; with under 4 rounds, which they would extrapolate past, inclusive."""
    ratios = [v / b for v, b in zip(values, base)]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="exclusive" if len(ratios) >= 4 else "inclusive")
    else:
        q1 = q3 = ratios[0]
    return {"vs_inline": round(statistics.median(ratios), 3), "vs_inline_quartiles": [round(q1, 3), round(q3, 3)]}


def cmd_train(args) -> list[dict]:
    """The fold loop's samples/s with batches made inline vs by the loader.

    Paired and interleaved: every round runs a block of ``--steps`` steps with each loader in turn
    (A B C A B C ...), so a change in the machine's load hits every loader alike; each loader's pool
    lives for the whole measurement (as for a fold), but each block starts with an empty queue (as an
    epoch does: its first batch is made while the step waits). Reported: the median over rounds of
    each block's samples/s, and the median of the per-round ratios to the inline block."""
    from pipeline.config import load_config
    from pipeline.prefetch import Prefetch
    from pipeline.trainer import build_compiled, sample_weights
    cfg = load_config(args.preset)
    loaders = _loaders(args.loaders)
    rows = []
    for name in networks(cfg, args.models):
        spec, store, batches = model_inputs(cfg, name, Path(args.tmp) / args.preset)
        model = build_compiled(spec, batches.make(0, 0)[0].shape[1:], N_CLASSES)
        for i in range(2):  # trace the train step
            b = batches.make(0, i)
            model.train_on_batch(*b[:2], sample_weight=sample_weights(model, b))
        pools = {lo: Prefetch(batches, lo[0], max(2, 2 * lo[0]), kind=lo[1]) for lo in loaders}
        rates: dict[tuple, list[float]] = {lo: [] for lo in loaders}
        task = itertools.count(len(batches))  # flat batch numbers, past the traced ones
        try:
            for pool in pools.values():
                pool.start()
            for _ in range(args.rounds):
                for lo in loaders:
                    tasks = [divmod(next(task), len(batches)) for _ in range(args.steps)]
                    made = pools[lo].map(tasks)
                    start, n = time.perf_counter(), 0
                    for batch in made:
                        model.train_on_batch(*batch[:2], sample_weight=sample_weights(model, batch))
                        n += len(batch[0])
                    rates[lo].append(n / (time.perf_counter() - start))
        finally:
            for pool in pools.values():
                pool.close()
        base = rates[loaders[0]]
        for (workers, kind), values in rates.items():
            row = {"preset": args.preset, "model": name, "batch": batches.batch_size, "workers": workers,
                   "kind": "inline" if workers == 0 else kind, "samples_per_s": round(statistics.median(values), 1),
                   "rounds": len(values), "steps": args.steps, **_vs_inline(values, base)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
    return rows


def cmd_predict(args) -> list[dict]:
    """predict_clips windows/s (every clip's sliding windows), inline vs ahead, interleaved."""
    from pipeline.config import load_config
    from pipeline.trainer import build_compiled, eval_window_hop, predict_clips
    from pipeline.windows import window_starts
    cfg = load_config(args.preset)
    rows = []
    for name in networks(cfg, args.models):
        spec, store, batches = model_inputs(cfg, name, Path(args.tmp) / args.preset)
        window, hop = eval_window_hop(spec)
        fnames = batches.rows.fnames[:args.clips]
        model = build_compiled(spec, batches.make(0, 0)[0].shape[1:], N_CLASSES)
        bs = int(spec["train"]["eval_batch_size"])
        n_windows = sum(len(window_starts(store.length("train", f), window, hop)) for f in fnames)
        predict_clips(model, store, "train", fnames[:4], window, hop, batches.normalizer, bs)  # trace
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        for _ in range(args.rounds):
            for workers in args.workers:
                start = time.perf_counter()
                predict_clips(model, store, "train", fnames, window, hop, batches.normalizer, bs,
                              workers=workers, depth=max(2, 2 * workers))
                rates[workers].append(n_windows / (time.perf_counter() - start))
        base = rates[args.workers[0]]
        for workers, values in rates.items():
            row = {"preset": args.preset, "model": name, "windows": n_windows, "workers": workers,
                   "windows_per_s": round(statistics.median(values), 1), "rounds": len(values),
                   **_vs_inline(values, base)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def tables(mode: str, rows: list[dict]) -> str:
    if mode == "produce":
        cols = sorted({(r["workers"], r["kind"]) for r in rows}, key=lambda c: (c[0] != 0, c[1] != "thread", c[0]))
        def label(workers, kind):
            plural = "" if workers == 1 else "es" if kind == "process" else "s"
            return "inline" if workers == 0 else f"{workers} {kind}{plural}"
        head = ("| preset | model | input (dtype) | batch | "
                + " | ".join(f"{label(w, k)}: samples/s (per CPU-s)" for w, k in cols) + " |")
        lines = [head, "|" + "---|" * (4 + len(cols))]
        for (preset, model), group in itertools.groupby(rows, key=lambda r: (r["preset"], r["model"])):
            group = list(group)
            by = {(r["workers"], r["kind"] if r["workers"] else "inline"): r["samples_per_s"] for r in group}
            cpu = {(r["workers"], r["kind"] if r["workers"] else "inline"): r["samples_per_cpu_s"] for r in group}
            cells = [f"{by.get((w, 'inline' if w == 0 else k), float('nan')):,.0f} "
                     f"({cpu.get((w, 'inline' if w == 0 else k), float('nan')):,.0f})" for w, k in cols]
            g = group[0]
            lines.append(f"| {preset} | {model} | {' x '.join(map(str, g['shape']))} ({g['dtype']}) | {g['batch']} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines)
    key = "samples_per_s" if mode == "train" else "windows_per_s"
    lines = [f"| preset | model | loader | {key.replace('_', ' ')} (median) | rounds | vs inline | quartiles |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        loader = "inline" if r["workers"] == 0 else f"{r['workers']} {r.get('kind', 'thread')}"
        q = r.get("vs_inline_quartiles")
        lines.append(f"| {r['preset']} | {r['model']} | {loader} | {r[key]:,.1f} | {r['rounds']} | "
                     f"{r['vs_inline']:.3f} | {f'{q[0]:.3f}-{q[1]:.3f}' if q else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_prefetch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("produce")
    a.add_argument("--presets", nargs="+", default=["quick", "full"])
    a.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("--kinds", nargs="+", default=["thread", "process"])
    a.add_argument("--seconds", type=float, default=2.0)
    a.add_argument("--rounds", type=int, default=3)
    b = sub.add_parser("train")
    b.add_argument("--preset", default="quick")
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--rounds", type=int, default=15)
    b.add_argument("--loaders", nargs="+", default=["0", "1:thread", "1:process"])
    c = sub.add_parser("predict")
    c.add_argument("--preset", default="quick")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--clips", type=int, default=120)
    c.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    for q in (a, b, c):
        q.add_argument("--models", nargs="+", default=None)
        q.add_argument("--tmp", default=None, help="folder for the synthetic features (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bench_prefetch_") as tmp:
        args.tmp = args.tmp or tmp
        rows = {"produce": cmd_produce, "train": cmd_train, "predict": cmd_predict}[args.mode](args)
    print()
    print(tables(args.mode, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
