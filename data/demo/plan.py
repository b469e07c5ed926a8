"""Planning a build: every random draw up front, so the CSVs depend on the seed only, never on the render."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from data.common import other_label
from data.demo.classes import CLASSES, LABELS
from data.demo.events import Control, Note, draw_event
from data.demo.hard_cases import assign_hard_cases

MIN_DURATION_S = 0.3
MAX_DURATION_S = 6.0
UNVERIFIED_SHARE = 0.4  # of train rows get manually_verified=0 ...
WRONG_LABEL_SHARE = 0.25  # ... and this share of those carries a wrong label

LEAD_IN_S = 0.5  # silence before the first slot
SLOT_RELEASE_S = 1.5  # time after the last note-off for the natural decay
SLOT_GAP_S = 0.2  # silence between a slot's mute and the next slot
SEGMENT_PRE_ROLL_S = 0.05  # a slot is cut this much early so early onsets are not lost


@dataclasses.dataclass
class PlannedClip:
    """One clip: what to play (relative to its slot start) and how to post-process it."""

    fname: str
    label: str
    split: str
    kind: str
    drums: bool
    program: int
    notes: list[Note]
    controls: list[Control]
    slot_length_s: float
    peak_dbfs: float
    snr_db: float
    noise_color: float
    noise_seed: int
    slot_start_s: float = 0.0
    hard_case: str = ""
    pan: int = 64  # MIDI pan; moved off centre only for the stereo hard case


class Plan(NamedTuple):
    """A planned build. `rng` is the generator after planning (the writers draw on from it)."""

    clips: list[PlannedClip]  # slot order: class by class, each class's train clips then its test clips
    train: list[PlannedClip]
    test: list[PlannedClip]
    noisy_labels: list[str]  # the train.csv label of each train clip
    verified_flags: np.ndarray  # manually_verified of each train clip
    rng: np.random.Generator


def unique_hex_names(rng: np.random.Generator, count: int) -> list[str]:
    """FSDKaggle2018-style names: 8 random hex chars, unique within the dataset."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = f"{int(rng.integers(0, 2**32)):08x}.wav"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_plan(seed: int, clips_per_class: int, test_clips_per_class: int) -> Plan:
    """Draw everything random of a build (the draw order is part of the output: do not reorder)."""
    rng = np.random.default_rng(seed)
    per_class = clips_per_class + test_clips_per_class
    fnames = unique_hex_names(rng, per_class * len(CLASSES))
    clips: list[PlannedClip] = []
    for class_index, spec in enumerate(CLASSES):
        for position in range(per_class):
            event = draw_event(spec, rng)
            notes_end = max(onset + duration for onset, duration, _, _ in event.notes)
            clips.append(
                PlannedClip(
                    fname=fnames[class_index * per_class + position],
                    label=spec.label,
                    split="train" if position < clips_per_class else "test",
                    kind=event.kind,
                    drums=event.drums,
                    program=event.program,
                    notes=event.notes,
                    controls=event.controls,
                    slot_length_s=min(notes_end + SLOT_RELEASE_S, MAX_DURATION_S - SEGMENT_PRE_ROLL_S - 0.05),
                    peak_dbfs=float(rng.uniform(-20.0, -1.0)),
                    snr_db=float(rng.uniform(25.0, 45.0)),
                    noise_color=float(rng.uniform(0.0, 0.95)),
                    noise_seed=int(rng.integers(0, 2**63)),
                )
            )
    train = [clip for clip in clips if clip.split == "train"]
    test = [clip for clip in clips if clip.split == "test"]

    unverified_count = round(UNVERIFIED_SHARE * len(train))
    unverified = rng.choice(len(train), size=unverified_count, replace=False)
    wrong = rng.choice(unverified, size=round(WRONG_LABEL_SHARE * unverified_count), replace=False)
    verified_flags = np.ones(len(train), dtype=int)
    verified_flags[unverified] = 0
    noisy_labels = [clip.label for clip in train]
    for index in wrong:
        noisy_labels[index] = other_label(rng, LABELS, train[index].label)

    assign_hard_cases(train, test, verified_flags, rng)

    slot_start = LEAD_IN_S
    for clip in clips:
        clip.slot_start_s = slot_start
        slot_start += clip.slot_length_s + SLOT_GAP_S
    return Plan(clips, train, test, noisy_labels, verified_flags, rng)
