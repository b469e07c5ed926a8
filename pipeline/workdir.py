"""The work directory: the one place every artefact of a run lives.

See docs/DESIGN.md for the layout. Paths are computed here so no stage
spells a path twice.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd


class WorkDirError(OSError):
    """The work directory cannot be used (not a folder, not writable, full, locked)."""


#: Below this much free space a stage refuses to start (features, checkpoints
#: and tables of a small run fit in it; a real run needs far more).
MIN_FREE_BYTES = 200 * 2 ** 20


class WorkDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise WorkDirError(f"--work {self.root}: exists and is not a folder; "
                               "pass a folder (it is created if missing)") from None
        except OSError as exc:
            raise WorkDirError(f"--work {self.root}: cannot create it ({exc.strerror}); "
                               "pass a folder you can write to") from None

    def check_usable(self, min_free: int = MIN_FREE_BYTES) -> None:
        """Fail in the first second, not after an hour, when the work
        directory cannot take the run's artefacts."""
        if not self.root.is_dir():
            raise WorkDirError(f"--work {self.root}: not a folder")
        probe = self.root / f".write-probe.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise WorkDirError(f"--work {self.root}: not writable ({exc.strerror}); "
                               "pass a folder you can write to") from None
        free = shutil.disk_usage(self.root).free
        if free < min_free:
            raise WorkDirError(f"--work {self.root}: only {free / 2 ** 20:.0f} MiB free on its disk "
                               f"(at least {min_free / 2 ** 20:.0f} MiB needed); free some space or "
                               "pass a folder on another disk")

    # -- top-level tables -------------------------------------------------
    @property
    def clips_csv(self) -> Path:
        return self.root / "clips.csv"

    @property
    def folds_csv(self) -> Path:
        return self.root / "folds.csv"

    @property
    def folds_json(self) -> Path:
        """What folds.csv was made from (its fingerprint)."""
        return self.root / "folds.json"

    @property
    def labels_csv(self) -> Path:
        return self.root / "labels.csv"

    @property
    def submission_csv(self) -> Path:
        return self.root / "submission.csv"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def timings_json(self) -> Path:
        return self.root / "timings.json"

    @property
    def dataset_json(self) -> Path:
        """Identity of the dataset the work directory's artefacts were made from."""
        return self.root / "dataset.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def final_outputs(self) -> list[Path]:
        """The run's answer (what a changed input must never leave behind stale)."""
        return [self.submission_csv, self.stacking_dir / "final_test.csv", self.stacking_dir / "summary.json",
                self.report_md]

    # -- folders -----------------------------------------------------------
    def features_dir(self, feature: str, key: str) -> Path:
        return self.root / "features" / f"{feature}-{key}"

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / model

    def fold_dir(self, model: str, fold: int) -> Path:
        return self.model_dir(model) / f"fold{fold}"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def oof_csv(self, model: str) -> Path:
        return self.predictions_dir / f"{model}_oof.csv"

    def test_csv(self, model: str) -> Path:
        return self.predictions_dir / f"{model}_test.csv"

    @property
    def stacking_dir(self) -> Path:
        return self.root / "stacking"

    @property
    def pseudo_dir(self) -> Path:
        return self.root / "pseudo_label"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def require(self, path: Path, stage: str) -> Path:
        """Fail with a message naming the stage that makes ``path``."""
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `{stage}` first (or ./run_all.sh)")
        return path


#: Paths whose content a write changed in this process (see :func:`changed_paths`).
_CHANGED: list[Path] = []


def changed_paths() -> list[Path]:
    """Files this process created or changed (an identical rewrite does not
    count): how a stage knows, and says, whether it did any work."""
    return list(_CHANGED)


def note_changed(paths) -> None:
    """Count files another process changed for this one (a Ray job's outputs, :mod:`pipeline.executor`)."""
    _CHANGED.extend(Path(p) for p in paths)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as fh:
            return fh.read() == data
    except OSError:
        return False


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write to a temp file in the same folder, then rename: a reader never
    sees a half-written file, and an interrupted write leaves no file.

    A file that already holds exactly ``data`` is left alone (its mtime
    too), so an identical rerun changes nothing on disk. Returns whether the
    file changed."""
    path = Path(path)
    if _same_bytes(path, data):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + thread id make the temp name unique among concurrent writers
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _CHANGED.append(path)
    return True


def remove_outputs(paths, reason: str, logger=None) -> list[Path]:
    """Delete outputs that no longer match their inputs, before the work that
    would replace them starts: a failed run then leaves nothing stale behind."""
    gone = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            gone.append(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
            gone.append(p)
    if gone:
        _CHANGED.extend(gone)
        (logger or logging.getLogger("workdir")).info(
            "removed %d stale output(s) (%s): %s", len(gone), reason,
            ", ".join(str(p) for p in gone[:8]) + (" ..." if len(gone) > 8 else ""))
    return gone


def atomic_write_csv(df: pd.DataFrame, path: Path, **kwargs) -> bool:
    return atomic_write_bytes(Path(path), df.to_csv(index=False, **kwargs).encode())


def atomic_write_npy(path: Path, array: np.ndarray) -> bool:
    """One array in ``.npy`` format (readable with ``np.load``, memory-mappable)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return atomic_write_bytes(Path(path), buf.getvalue())


def atomic_write_npz(path: Path, arrays: dict) -> bool:
    """Named arrays in one ``.npz`` (uncompressed)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(Path(path), buf.getvalue())


def atomic_write_json(obj, path: Path) -> bool:
    return atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    with open(path) as fh:
        return json.load(fh)


class WorkLock:
    """One run per work directory at a time: an exclusive ``flock`` on
    ``<work>/.lock``, held for the life of the process (``run_all.sh`` holds
    it for the whole run and tells its stages through ``AT_WORK_LOCK``).
    ``<work>/.lock.json`` names the holder for the refusal message. A lock
    of a killed process goes away with it (the kernel releases it)."""

    ENV = "AT_WORK_LOCK"
    _held: dict = {}  # work root -> open lock file, per process: a process may run several stages

    def __init__(self, work: "WorkDir", what: str):
        self.work, self.what, self._fh = work, what, None

    def held_by_parent(self) -> bool:
        return os.environ.get(self.ENV) == str(self.work.root.resolve())

    def acquire(self) -> "WorkLock":
        key = str(self.work.root.resolve())
        if self.held_by_parent() or key in WorkLock._held:
            return self
        import fcntl
        import socket
        import time
        fh = open(self.work.lock_path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            holder = read_json(self.work.root / ".lock.json", {}) or {}
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, {holder.get('what', '?')}, "
                   f"since {holder.get('since', '?')}") if holder else "another process"
            raise WorkDirError(f"--work {self.work.root} is in use by another run ({who}); wait for it to "
                               "finish or pass another --work") from None
        self._fh = WorkLock._held[key] = fh
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.work.root / ".lock.json").write_text(json.dumps(info) + "\n")
        return self

    def release(self) -> None:
        if self._fh is not None:
            WorkLock._held.pop(str(self.work.root.resolve()), None)
            self._fh.close()
            self._fh = None
