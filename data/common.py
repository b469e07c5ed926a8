"""Helpers shared by the dataset builders (`data.build_demo`, `data.variants`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


def other_label(rng: np.random.Generator, classes: Sequence[str], label: str) -> str:
    """A wrong label for a clip of class `label`: drawn uniformly from the other classes."""
    others = [name for name in classes if name != label]
    return others[int(rng.integers(len(others)))]


def swap_into_place(built: Path, out: Path) -> None:
    """Rename the finished folder `built` to `out`, replacing what is there.

    An existing `out` is first renamed aside (next to it) and deleted only after
    the swap, so `out` is never half written: it is the old folder or the new one.
    """
    built, out = Path(os.path.abspath(built)), Path(os.path.abspath(out))
    if not out.exists():
        os.rename(built, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, retired / out.name)
    os.rename(built, out)
    shutil.rmtree(retired, ignore_errors=True)
