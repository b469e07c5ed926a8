"""What every stage script shares: arguments, logging, timing.

Each stage is ``python -m <module> --config PRESET --data DIR --work DIR``;
without ``--data`` the built-in demo dataset is used (built on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.config import describe, load_config
from pipeline.fingerprints import dataset_identity
from pipeline.workdir import (WorkDir, WorkDirError, WorkLock, atomic_write_json, changed_paths, read_json,
                              remove_outputs)

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


def run_id() -> str:
    """The current run's name: ``run_all.sh`` gives all its stages one
    (``AT_RUN_ID``); a stage run alone gets its own."""
    global _RUN_ID
    rid = os.environ.get("AT_RUN_ID") or _RUN_ID
    if not rid:
        rid = _RUN_ID = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return rid


_RUN_ID = ""


def run_log_dir(work: WorkDir) -> Path:
    """``<work>/logs/<run id>/``: one folder of logs per run, never shared by
    two runs (``logs/latest`` points at the newest)."""
    d = work.logs_dir / run_id()
    d.mkdir(parents=True, exist_ok=True)
    latest = work.logs_dir / "latest"
    try:
        if latest.is_symlink() or not latest.exists():
            tmp = work.logs_dir / f".latest.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(d.name)
            os.replace(tmp, latest)
    except OSError:
        pass  # a filesystem without symlinks: the run folders are still there
    return d


def setup_logging(work: WorkDir, stage: str, verbose: bool = False) -> Path:
    log_dir = run_log_dir(work)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(lambda record: getattr(record, "console", True))  # run_main prints its own error line
    root.addHandler(console)
    path = log_dir / f"{stage}.log"
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    for noisy in ("matplotlib", "numba", "PIL", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


@contextlib.contextmanager
def timed_stage(work: WorkDir, stage: str):
    """Say whether the stage changed anything, and record its wall time in
    ``timings.json`` (the report's table) when it did: an idle rerun leaves
    every file as it was. A stage that did work is also listed in
    ``logs/<run>/changed.txt``, which ``run_all.sh`` reads to tell an idle
    rerun in one line."""
    start = time.time()
    before = len(changed_paths())
    yield
    changed = [p for p in changed_paths()[before:] if p != work.timings_json]
    log = logging.getLogger(stage.split(":")[0])
    if not changed:
        log.info("stage %s: up to date, nothing recomputed", stage)
        return
    log.info("stage %s: %d file(s) written or removed in %.1f s", stage, len(changed), time.time() - start)
    timings = read_json(work.timings_json, {}) or {}
    timings[stage] = round(time.time() - start, 2)
    atomic_write_json(timings, work.timings_json)
    with open(run_log_dir(work) / "changed.txt", "a") as fh:
        fh.write(f"{stage}\t{len(changed)}\n")


def check_dataset_identity(work: WorkDir, data_dir: Path) -> None:
    """Remove the run's answer (submission, final test table, stacking
    summary, report) as soon as the dataset differs from the one they were
    made from, so no stale submission survives a run that then fails; the
    stages redo what depends on the change through their own fingerprints."""
    ident = {"data": str(Path(data_dir).resolve()), "listing": dataset_identity(data_dir)}
    old = read_json(work.dataset_json)
    if old == ident:
        return
    if old is not None:
        logging.getLogger("workdir").info("the dataset changed since the last run in %s: every result that "
                                          "depends on it will be redone", work.root)
        remove_outputs(work.final_outputs(), "made from the previous dataset")
    atomic_write_json(ident, work.dataset_json)


def start_stage(description: str, stage: str, argv=None, extra_args=None):
    """Parse the stage's arguments, check the settings and the work directory,
    take the work-directory lock and set up logging. Returns (args, cfg, work).

    Everything that can fail without looking at audio fails here, in the
    first second."""
    parser = stage_parser(description)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    work = WorkDir(args.work)
    work.check_usable()
    _LOCKS.append(WorkLock(work, f"stage {stage}").acquire())
    log_path = setup_logging(work, stage, args.verbose)
    # the settings this stage ran with, for the record (a plain write: a log, not an output of the run)
    log_path.with_suffix(".config.yaml").write_text(describe(cfg) + "\n")
    args.data = str(resolve_data_dir(args.data))
    logging.getLogger(stage).info("stage %s: preset=%s data=%s work=%s log=%s", stage, cfg.get("preset"),
                                  args.data, work.root, log_path)
    if Path(args.data).is_dir():  # a mistyped --data fails in load_dataset, and removes nothing
        check_dataset_identity(work, Path(args.data))
    return args, cfg, work


_LOCKS: list[WorkLock] = []  # held until the process exits


def _known_errors() -> tuple:
    from pipeline.audio import AudioError
    from pipeline.config import ConfigError
    from pipeline.dataset import DatasetError
    return (DatasetError, ConfigError, FileNotFoundError, AudioError, WorkDirError, UserError)


class UserError(ValueError):
    """An ordinary mistake in the input or the settings: one line, no traceback."""


def _os_error_line(exc: OSError) -> str:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hints = {errno.ENOSPC: "the disk is full: free some space (or pass --work on another disk) and rerun; "
                           "finished work is kept",
             errno.EDQUOT: "the disk quota is exceeded: free some space and rerun; finished work is kept",
             errno.EACCES: "permission denied: pass a --work folder you can write to",
             errno.EPERM: "operation not permitted: pass a --work folder you can write to",
             errno.EROFS: "read-only file system: pass a --work folder on a writable disk"}
    return f"{exc.strerror or exc}{where}: {hints.get(exc.errno, 'check the path and rerun')}"


def _one_line(line: str) -> None:
    """The error on stderr once; into the stage's log file too when logging is set up
    (before that, logging's last-resort handler would print it a second time)."""
    if logging.getLogger().handlers:
        logging.getLogger("pipeline").error("%s", line, extra={"console": False})
    print(f"error: {line}", file=sys.stderr)


def run_main(main_fn, argv=None) -> int:
    """Run a stage. An anticipated error (bad input, settings, disk, permissions)
    prints one clear line and exits 2; anything else is a bug: traceback plus
    a hint to report it."""
    try:
        main_fn(argv)
    except _known_errors() as exc:
        _one_line(str(exc))
        return 2
    except OSError as exc:
        _one_line(_os_error_line(exc))
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:
        logging.getLogger("pipeline").exception("unexpected error")
        print("error: this looks like a bug in the pipeline, not in your data: please report it with the "
              "traceback above and the log under <work>/logs/latest/", file=sys.stderr)
        return 1
    finally:
        while _LOCKS:
            _LOCKS.pop().release()
    return 0
