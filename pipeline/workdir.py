"""The work directory: the one place every artefact of a run lives.

See docs/DESIGN.md for the layout. Paths are computed here so no stage
spells a path twice.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd


class WorkDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- top-level tables -------------------------------------------------
    @property
    def clips_csv(self) -> Path:
        return self.root / "clips.csv"

    @property
    def folds_csv(self) -> Path:
        return self.root / "folds.csv"

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a reader never
    sees a half-written file, and an interrupted write leaves no file."""
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


def atomic_write_csv(df: pd.DataFrame, path: Path, **kwargs) -> None:
    atomic_write_bytes(Path(path), df.to_csv(index=False, **kwargs).encode())


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    with open(path) as fh:
        return json.load(fh)
