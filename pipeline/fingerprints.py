"""What every artefact is keyed by: hashes of the things it was made from.

A stale result is the worst bug a cached pipeline can have, so every
artefact records a fingerprint of its inputs (file lists, labels and
verification flags, classes, the audio files' identity, settings) and is
redone when that fingerprint changes. The helpers here are the one place
those hashes are computed, so two stages never disagree about what
"unchanged" means.

Audio files are identified by (size, modification time in ns): cheap enough
to check for 20,000 clips on every run (a ``stat`` each), and it changes
whenever a file is replaced or rewritten. Tables are hashed by content.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

#: Columns of clips.csv that identify a clip's audio (besides fname and split).
IDENTITY_COLUMNS = ("size", "mtime_ns")


def param_hash(params: Any, length: int = 10) -> str:
    """Stable short hash of a JSON-able value."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]


def table_hash(df: pd.DataFrame) -> str:
    """Content hash of a table (values and column names, not the index)."""
    rows = pd.util.hash_pandas_object(df, index=False).to_numpy()
    h = hashlib.sha1(rows.tobytes())
    h.update(json.dumps([str(c) for c in df.columns]).encode())
    return h.hexdigest()[:16]


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def content_hash(path: str | Path, length: int = 16) -> str | None:
    """sha1 of a file's bytes (None when missing): for the small tables a
    stage reads, where mtimes would change on an identical rewrite."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha1(fh.read()).hexdigest()[:length]
    except FileNotFoundError:
        return None


def clips_hash(clips: pd.DataFrame, split: str | None = None) -> str:
    """Hash of clips.csv's identity columns (fname, split, status, size,
    mtime_ns), optionally of one split: what a model's features were made from."""
    cols = [c for c in ("fname", "split", "status", *IDENTITY_COLUMNS) if c in clips.columns]
    part = clips if split is None else clips[clips["split"] == split]
    return table_hash(part[cols].reset_index(drop=True))


def data_hash(clips: pd.DataFrame, classes, test_fnames) -> str:
    """What a model's folds depend on besides settings, labels and folds:
    every clip's audio identity (clips.csv), the class list and the usable
    test clips in order."""
    return param_hash({"clips": clips_hash(clips), "classes": list(classes),
                       "test": param_hash(list(test_fnames), 16)}, 16)


def folder_listing(root: str | Path, max_depth: int = 2) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under ``root`` down to
    ``max_depth`` folder levels, sorted: the identity of a dataset folder
    (its CSVs and audio), computed without reading any file."""
    root = Path(root)
    out: list[tuple[str, int, int]] = []

    def walk(folder: Path, depth: int, prefix: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for e in entries:
            rel = prefix + e.name
            try:
                if e.is_dir(follow_symlinks=True):
                    if depth < max_depth:
                        walk(Path(e.path), depth + 1, rel + "/")
                    continue
                st = e.stat(follow_symlinks=True)
            except OSError:
                continue
            out.append((rel, int(st.st_size), int(st.st_mtime_ns)))

    walk(root, 0, "")
    return sorted(out)


def dataset_identity(root: str | Path) -> str:
    """One hash of a dataset folder's listing (any added, removed, replaced
    or rewritten file changes it)."""
    return param_hash(folder_listing(root), 16)


def hash_files(paths: Iterable[str | Path]) -> dict[str, str | None]:
    return {str(p): content_hash(p) for p in paths}
