"""The feature stage's chunks three ways: joblib's loky workers (run.executor local), one Ray job per chunk
(run.executor ray, what the pipeline does), and joblib's own Ray backend (``ray.util.joblib``).

    python -m benchmarks.bench_executor --data /tmp/freshG/demo_data --tmp /tmp/ray16/bench [--cpus 2] [--repeat 2]

Each way computes every feature the quick preset needs for every clip into a fresh work directory, in this
order, ``--repeat`` times (interleaved); Ray (``--cpus`` CPUs) is started once, before the first timing, and
its start-up is reported on its own. Prints the wall seconds of each way and whether the feature arrays are
identical to loky's. Finding (README, "Running on Ray"): joblib's Ray backend refuses ``return_as=
"generator_unordered"`` (and ``"generator"``), which the stage uses to stream results into its progress bar,
so it only runs the stage's code with ``return_as="list"``; it also replaces the base class of joblib's
PicklingPool for the whole process.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import pipeline.extraction as extraction
from pipeline.cache import feature_stores
from pipeline.config import load_config
from pipeline.dataset import load_dataset
from pipeline.executor import RayExecutor, init_ray
from pipeline.workdir import WorkDir


def _run(way: str, cfg: dict, data, root: Path, cpus: int) -> tuple[float, dict]:
    work = WorkDir(root)
    stores = feature_stores(work, cfg, extraction.needed_features(cfg))
    dataset = load_dataset(data)
    start = time.perf_counter()
    if way == "loky":
        extraction.compute_missing(dataset, stores, cfg["audio"], n_jobs=cpus, progress=False)
    elif way == "ray-jobs":
        with RayExecutor(work=work.root, stage="features", progress=False) as executor:
            extraction.compute_missing(dataset, stores, cfg["audio"], progress=False, executor=executor, work=work)
    else:  # joblib's Ray backend around the stage's own joblib call, return_as changed to "list"
        from joblib import Parallel, parallel_backend
        from ray.util.joblib import register_ray
        register_ray()
        original = extraction.Parallel
        extraction.Parallel = lambda **kw: Parallel(**{**kw, "return_as": "list"})
        try:
            with parallel_backend("ray"):
                extraction.compute_missing(dataset, stores, cfg["audio"], n_jobs=cpus, progress=False)
        finally:
            extraction.Parallel = original
    return time.perf_counter() - start, stores


def _same(a: dict, b: dict) -> bool:
    for name, store in a.items():
        other = b[name]
        for split in ("train", "test"):
            if store.index(split, refresh=True).keys() != other.index(split, refresh=True).keys():
                return False
            for fname, entry in store.index(split).items():
                if "bad" not in entry and not np.array_equal(store.load(split, fname), other.load(split, fname)):
                    return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tmp", required=True, help="folder for the work directories (emptied first)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    cfg = load_config("quick")
    tmp = Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    init_ray("", num_cpus=args.cpus)
    print(f"ray start: {time.perf_counter() - start:.1f} s ({args.cpus} CPUs)", flush=True)
    times: dict[str, list[float]] = {}
    reference = None
    for r in range(args.repeat):
        for way in ("loky", "ray-jobs", "joblib-ray"):
            seconds, stores = _run(way, cfg, args.data, tmp / f"{way}-{r}", args.cpus)
            times.setdefault(way, []).append(seconds)
            reference = reference or stores
            print(f"{way} (round {r}): {seconds:.1f} s, features identical to loky's: {_same(reference, stores)}",
                  flush=True)
    for way, values in times.items():
        print(f"{way}: " + ", ".join(f"{v:.1f}" for v in values) + " s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
