"""Speed of tagging new audio with a finished run (issue 14), and the exported tagger's size.

    python -m benchmarks.bench_predict --work WORK [--audio-dir DIR] [--repeat 2] [--batch-files 256]

1. exports the run's tagger to a temporary folder (``pipeline.export``): its
   size, file count and the export's wall time;
2. in a fresh process per source (the work directory, then the export):
   the time to import the tagger code (TensorFlow included) and to load the
   tagger (every fold model, the learner, the feature settings), then one
   cold pass over the audio (the first predict traces each model's predict
   function) and ``--repeat`` warm passes: files/s, x real time (seconds of
   decoded audio / wall seconds) and where the time went (feature
   computation, each model's folds).

The audio defaults to the run's own test folder (``audio_test`` of the
dataset named in ``<work>/dataset.json``). Not a test: timings depend on the
machine and on whatever else shares its CPU. Prints one JSON line per
measurement and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(path: str, audio_dir: str, repeat: int, batch_files: int) -> dict:
    """Load the tagger at ``path`` and tag every file of ``audio_dir`` 1 + ``repeat`` times (this process)."""
    start = time.perf_counter()
    from pipeline.tagger import Tagger, audio_files
    imported = time.perf_counter() - start
    start = time.perf_counter()
    tagger = Tagger.load(path, progress=False)
    loaded = time.perf_counter() - start
    files = audio_files(Path(audio_dir))
    passes = []
    for _ in range(1 + repeat):
        tagger.predict(files, [p.name for p in files], batch_files=batch_files)
        passes.append(dict(tagger.last_run))
    warm = passes[1:] or passes
    wall = sum(p["wall_seconds"] for p in warm) / len(warm)
    audio = warm[0]["audio_seconds"]
    busy = {k: round(sum(p["busy_seconds"][k] for p in warm) / len(warm), 2) for k in warm[0]["busy_seconds"]}
    return {"source": path, "import_s": round(imported, 2), "load_s": round(loaded, 2), "files": len(files),
            "bad": warm[0]["bad"], "audio_s": round(audio, 1), "cold_s": round(passes[0]["wall_seconds"], 2),
            "warm_s": round(wall, 2), "files_per_s": round(len(files) / wall, 1), "x_real_time": round(audio / wall, 1),
            "final": tagger.final, "models": list(tagger.models), "busy_s": busy}


def _in_subprocess(path: str, audio_dir: str, repeat: int, batch_files: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_predict", "--one", path, "--audio-dir", audio_dir,
           "--repeat", str(repeat), "--batch-files", str(batch_files)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=False, help="a finished work directory")
    p.add_argument("--audio-dir", default=None, help="audio to tag (default: the run's test folder)")
    p.add_argument("--repeat", type=int, default=2, help="warm passes after the cold one (default 2)")
    p.add_argument("--batch-files", type=int, default=256)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one source, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.audio_dir, args.repeat, args.batch_files)))
        return 0
    if not args.work:
        p.error("--work is required")
    work = Path(args.work)
    audio_dir = args.audio_dir
    if audio_dir is None:
        data = json.loads((work / "dataset.json").read_text())["data"]
        audio_dir = str(Path(data) / "audio_test")
    from pipeline.export_tagger import export_tagger, folder_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = export_tagger(work, Path(tmp) / "tagger")
        export = {"export_s": round(time.perf_counter() - start, 2), "files": done["files"],
                  "mb": round(folder_size(Path(done["path"])) / 1e6, 2), "models": done["models"]}
        print(json.dumps({"export": export}), flush=True)
        for source in (str(work), done["path"]):
            row = _in_subprocess(source, audio_dir, args.repeat, args.batch_files)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nexported tagger: {export['mb']} MB in {export['files']} files ({export['export_s']} s to export); "
          f"final learner {rows[0]['final']} over {', '.join(rows[0]['models'])}\n")
    print("| tagger | import s | load s | files | audio s | cold pass s | warm pass s | files/s | x real time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in zip(("work directory", "exported"), rows):
        print(f"| {name} | {r['import_s']} | {r['load_s']} | {r['files']} | {r['audio_s']} | {r['cold_s']} | "
              f"{r['warm_s']} | {r['files_per_s']} | {r['x_real_time']} |")
    print("\nwarm pass, seconds per step: " + ", ".join(f"{k} {v}" for k, v in rows[0]["busy_s"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
