"""Event generators: what one clip plays, drawn at random for its class's style.

Times are seconds relative to the clip's slot start. Every generator draws from
the build's one random generator in a fixed order, so a seed fixes every event.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from data.demo.classes import DRUM_KITS, SoundClass

MAX_EVENT_S = 4.5  # notes end by then, leaving room for the release within the longest clip
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)

Note = tuple[float, float, int, int]  # onset s, duration s, MIDI pitch, velocity
Control = tuple[float, int, int]  # time s, controller number, value


class Event(NamedTuple):
    """What a generator plays; times are relative to the clip's slot start."""

    kind: str
    drums: bool  # True: `program` is a drum kit and the notes are drum-kit keys
    program: int
    notes: list[Note]
    controls: list[Control]


def _melodic_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """A single note, a short melody, or a chord (a swelling long note for monophonic instruments)."""
    program, low, high = spec.voices[int(rng.integers(len(spec.voices)))]
    base_velocity = int(rng.integers(45, 121))
    kind = str(rng.choice(["single", "melody", "chord"], p=[0.4, 0.35, 0.25]))
    notes: list[Note] = []
    controls: list[Control] = []
    if kind == "single":
        notes.append((0.0, float(rng.uniform(0.3, 4.0)), int(rng.integers(low, high + 1)), base_velocity))
    elif kind == "melody":
        scale = MAJOR_SCALE if rng.random() < 0.6 else MINOR_SCALE
        root = int(rng.integers(low, max(low, high - 12) + 1))
        # The playable scale notes of this instrument from the root upwards; the melody walks on them.
        ladder = [root + 12 * octave + step for octave in range(8) for step in scale if root + 12 * octave + step <= high]
        degree = int(rng.integers(0, min(8, len(ladder))))
        beat = float(rng.uniform(0.12, 0.45))
        legato = float(rng.uniform(0.6, 1.0))
        onset = 0.0
        for _ in range(int(rng.integers(3, 9))):
            length = beat * float(rng.choice([0.5, 1.0, 1.0, 2.0]))
            if onset + length > MAX_EVENT_S:
                break
            velocity = int(np.clip(base_velocity + rng.integers(-15, 16), 1, 127))
            notes.append((onset, length * legato, ladder[degree], velocity))
            onset += length
            step = int(rng.choice([-2, -1, -1, 1, 1, 2, 3]))
            if not 0 <= degree + step < len(ladder):
                step = -step  # bounce off the ends of the instrument's range
            degree = int(np.clip(degree + step, 0, len(ladder) - 1))
    elif spec.max_chord_notes >= 2:
        intervals = (0, 4, 7, 12) if rng.random() < 0.5 else (0, 3, 7, 12)
        size = int(rng.integers(2, spec.max_chord_notes + 1))
        if size == 2:
            intervals = (0, int(rng.choice([3, 4, 7, 12])))
        root = int(rng.integers(low, max(low, high - intervals[size - 1]) + 1))
        duration = float(rng.uniform(0.5, 3.5))
        strum_step = float(rng.uniform(0.0, 0.04))
        for position, interval in enumerate(intervals[:size]):
            onset = position * strum_step
            velocity = int(np.clip(base_velocity + rng.integers(-10, 11), 1, 127))
            notes.append((onset, duration - onset, min(root + interval, high), velocity))
    else:
        kind = "swell"
        duration = float(rng.uniform(1.0, 4.0))
        notes.append((0.0, duration, int(rng.integers(low, high + 1)), base_velocity))
        start, middle, end = (int(v) for v in rng.integers(30, 128, size=3))
        for t in np.arange(0.0, duration, 0.05):
            phase = t / duration
            value = start + (middle - start) * 2 * phase if phase < 0.5 else middle + (end - middle) * (2 * phase - 1)
            controls.append((float(t), 11, int(value)))
    return Event(kind, False, program, notes, controls)


def _drum_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """A single hit or a short pattern, on a randomly chosen drum kit."""
    kit = int(rng.choice(DRUM_KITS))
    base_velocity = int(rng.integers(50, 128))
    if rng.random() < 0.45:
        return Event("hit", True, kit, [(0.0, 0.1, int(rng.choice(spec.drum_notes)), base_velocity)], [])
    interval = float(rng.uniform(0.12, 0.5))
    notes, onset = [], 0.0
    for position in range(int(rng.integers(2, 9))):
        accent = 1.0 if position % 4 == 0 else float(rng.uniform(0.55, 0.95))
        velocity = int(np.clip(base_velocity * accent, 1, 127))
        notes.append((onset, 0.1, int(rng.choice(spec.drum_notes)), velocity))
        onset += interval * float(rng.choice([1.0, 1.0, 1.0, 0.5, 2.0]))
        if onset > MAX_EVENT_S:
            break
    return Event("pattern", True, kit, notes, [])


def _crowd_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """Applause: one or two overlapping sustained notes of the applause sample."""
    program, low, high = spec.voices[0]
    duration = float(rng.uniform(1.0, MAX_EVENT_S))
    notes = [(0.0, duration, int(rng.integers(low, high + 1)), int(rng.integers(60, 128)))]
    if rng.random() < 0.4:
        offset = float(rng.uniform(0.0, duration / 2))
        notes.append((offset, duration - offset, int(rng.integers(low, high + 1)), int(rng.integers(40, 110))))
    return Event("crowd", False, program, notes, [])


def _burst_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """Gunfire: one shot, automatic fire, or irregular shots."""
    program, low, high = spec.voices[0]
    pitch = int(rng.integers(low, high + 1))
    count = int(rng.integers(1, 7))
    automatic = rng.random() < 0.4
    notes, onset = [], 0.0
    for _ in range(count):
        velocity = int(rng.integers(60, 128))
        notes.append((onset, 0.15, int(np.clip(pitch + rng.integers(-2, 3), 0, 127)), velocity))
        onset += float(rng.uniform(0.07, 0.13) if automatic else rng.uniform(0.15, 0.8))
        if onset > MAX_EVENT_S:
            break
    kind = "single_shot" if len(notes) == 1 else ("automatic" if automatic else "shots")
    return Event(kind, False, program, notes, [])


def _ring_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """Telephone: one to three rings separated by pauses."""
    program, low, high = spec.voices[0]
    pitch = int(rng.integers(low, high + 1))
    velocity = int(rng.integers(60, 128))
    ring, pause = float(rng.uniform(0.6, 1.6)), float(rng.uniform(0.3, 1.0))
    notes, onset = [], 0.0
    for _ in range(int(rng.integers(1, 4))):
        if onset + ring > MAX_EVENT_S:
            break
        notes.append((onset, ring, pitch, velocity))
        onset += ring + pause
    return Event("ring", False, program, notes, [])


EVENT_GENERATORS = {
    "melodic": _melodic_event,
    "drum": _drum_event,
    "crowd": _crowd_event,
    "burst": _burst_event,
    "ring": _ring_event,
}


def draw_event(spec: SoundClass, rng: np.random.Generator) -> Event:
    """One event for a clip of class `spec`."""
    return EVENT_GENERATORS[spec.style](spec, rng)
