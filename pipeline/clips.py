"""``clips.csv``: the feature stage's record of every clip (status, audio
identity), read by every later stage. One reader and one notion of "usable"
so no two stages disagree about which clips a run is made of."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from pipeline.workdir import WorkDir


def load_clips(work: WorkDir) -> pd.DataFrame:
    """clips.csv, refused (naming the stage to run) when missing."""
    path = work.require(work.clips_csv, "python -m pipeline.features")
    return pd.read_csv(path, dtype={"fname": str}, keep_default_na=False)


USABLE = "ok"  # the status of a clip whose every feature was computed


def usable_rows(clips: pd.DataFrame, split: str) -> pd.DataFrame:
    """The usable clips of one split, in clips.csv order (= the dataset's order)."""
    return clips[(clips.split == split) & (clips.status == USABLE)]


def split_usable(clips: pd.DataFrame, split: str, fnames: Sequence[str], clips_path) -> tuple[list[str], list[str]]:
    """(usable, unusable) of ``fnames`` in their order; a fname clips.csv does
    not list means the dataset changed after the feature stage ran."""
    rows = clips[clips.split == split]
    unknown = [f for f in fnames if f not in set(rows["fname"])]
    if unknown:
        raise FileNotFoundError(f"{clips_path} does not list {len(unknown)} {split} clip(s) (e.g. {unknown[0]}): "
                                "the dataset changed; run `python -m pipeline.features` first")
    bad = set(rows.loc[rows.status != USABLE, "fname"])
    return [f for f in fnames if f not in bad], [f for f in fnames if f in bad]
