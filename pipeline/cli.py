"""What every stage script shares: arguments, logging, timing.

Each stage is ``python -m <module> --config PRESET --data DIR --work DIR``;
without ``--data`` the built-in demo dataset is used (built on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.workdir import WorkDir, atomic_write_json, read_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_DIR = REPO_ROOT / "demo_data"
DEFAULT_WORK_DIR = REPO_ROOT / "work"


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=os.environ.get("AT_PRESET", "quick"),
                   help="preset name (config/<name>.yaml) or path to a YAML file (default: quick)")
    p.add_argument("--data", default=None, help="dataset folder in the FSDKaggle2018 layout (default: demo dataset)")
    p.add_argument("--work", default=str(DEFAULT_WORK_DIR), help="work directory for every artefact (default: work/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set training.epochs=3 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_data_dir(data: str | None) -> Path:
    if data:
        return Path(data)
    from data.build_demo import build_demo_dataset  # only needed for the default
    return Path(build_demo_dataset(DEFAULT_DEMO_DIR))


def setup_logging(work: WorkDir, stage: str, verbose: bool = False) -> None:
    log_dir = work.root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    fh = logging.FileHandler(log_dir / f"{stage}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    for noisy in ("matplotlib", "numba", "PIL", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def timed_stage(work: WorkDir, stage: str):
    """Add this stage's wall time to ``timings.json`` (the report's table)."""
    start = time.time()
    try:
        yield
    finally:
        timings = read_json(work.timings_json, {}) or {}
        timings[stage] = round(timings.get(stage, 0.0) + time.time() - start, 2)
        atomic_write_json(timings, work.timings_json)


def start_stage(description: str, stage: str, argv=None, extra_args=None):
    """Parse the stage's arguments and set up logging. Returns (args, cfg, work)."""
    parser = stage_parser(description)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    work = WorkDir(args.work)
    setup_logging(work, stage, args.verbose)
    cfg = load_config(args.config, args.set)
    args.data = str(resolve_data_dir(args.data))
    logging.getLogger(stage).info("stage %s: preset=%s data=%s work=%s", stage, cfg.get("preset"), args.data, work.root)
    return args, cfg, work


def run_main(main_fn, argv=None) -> int:
    """Run a stage; known input errors print one clear line and exit 2."""
    from pipeline.audio import AudioError
    from pipeline.config import ConfigError
    from pipeline.dataset import DatasetError
    try:
        main_fn(argv)
    except (DatasetError, ConfigError, FileNotFoundError, AudioError) as exc:
        logging.getLogger("pipeline").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
