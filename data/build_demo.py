"""Build the demo dataset: FSDKaggle2018 layout, clips rendered from the FluidR3 GM soundfont.

Why this design: the pipeline needs real sampled instrument and effect sounds
with the quirks of FSDKaggle2018 (noisy unverified labels, odd files), yet the
whole pipeline must run on it in minutes on 2 CPU cores. Every clip is one
"event" (a note, a melody, a chord, a drum hit or pattern) placed in its own
time slot of ONE standard MIDI file, written here with the stdlib. fluidsynth
renders that file once (loading the 150 MB soundfont is the expensive part),
and the long render is cut at the known slot boundaries. At the end of its slot a
clip's MIDI channel is muted (volume 0) and consecutive clips use different
channels, so no release tail leaks into the next clip (MIDI "All Sound Off" alone
does not do it: fluidsynth only releases the voices, and some ring on for seconds).

Usage: python -m data.build_demo --out DIR [--seed N] [--force] [--soundfont PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
from scipy import signal
from scipy.io import wavfile

LOG = logging.getLogger("data.build_demo")

# Bump when the output for a given set of parameters changes, so old caches are rebuilt.
BUILDER_VERSION = 1

SAMPLE_RATE = 22050
MIN_DURATION_S = 0.3
MAX_DURATION_S = 6.0
SHORT_CLIP_S = 0.15  # the planted too-short train clip
SILENCE_DB = 50.0  # a clip ends where its level stays this far below its peak
UNVERIFIED_SHARE = 0.4  # of train rows get manually_verified=0 ...
WRONG_LABEL_SHARE = 0.25  # ... and this share of those carries a wrong label

MARKER_NAME = ".complete"
INSTALL_HINT = "apt-get install fluidsynth fluid-soundfont-gm"
SOUNDFONT_CANDIDATES = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
    Path("/usr/share/sounds/sf2/default-GM.sf2"),
    Path("/usr/share/soundfonts/default-GM.sf2"),
    Path("/usr/share/soundfonts/default.sf2"),
)
# Names the builder writes; anything else in an existing --out dir means "not ours, do not replace".
OUTPUT_ENTRIES = frozenset(
    {
        "train.csv",
        "train_clean_labels.csv",
        "test_labels.csv",
        "sample_submission.csv",
        "audio_train",
        "audio_test",
        "README.md",
        MARKER_NAME,
    }
)

MIDI_CHANNELS = 16
XG_DRUM_BANK = 127  # bank select MSB that makes a channel a drum kit in XG mode
# Standard, Room, Power, Electronic, TR-808, Jazz, Brush. Not the Orchestra kit (48):
# it maps the hi-hat notes to timpani.
DRUM_KITS = (0, 8, 16, 24, 25, 32, 40)

RENDER_GAIN = 0.5  # float output cannot clip, so this only sets the working level
SLOT_RELEASE_S = 1.5  # time after the last note-off for the natural decay
SLOT_GAP_S = 0.2  # silence between a slot's mute and the next slot
SEGMENT_PRE_ROLL_S = 0.05  # cut this much before a slot so early onsets are not lost
LEAD_IN_S = 0.5
MAX_EVENT_S = 4.5  # notes end by then, leaving room for the release within MAX_DURATION_S
TICKS_PER_QUARTER = 1000
TEMPO_US_PER_QUARTER = 1_000_000  # with 1000 ticks per quarter: one tick = 1 ms

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)


@dataclasses.dataclass(frozen=True)
class SoundClass:
    """How one FSDKaggle2018 label is played on a General MIDI synth.

    `voices` are (0-based MIDI program = GM number minus one, lowest, highest MIDI note):
    a realistic range that FluidR3 also covers with samples (it has holes, e.g. the
    baritone sax is silent above note 72 and the violin at note 94).
    `style` picks the event generator: melodic, drum, crowd, burst or ring.
    """

    label: str
    style: str
    voices: tuple[tuple[int, int, int], ...] = ()
    max_chord_notes: int = 1
    drum_notes: tuple[int, ...] = ()
    source: str = ""


CLASSES = (
    SoundClass("Acoustic_guitar", "melodic", ((24, 40, 76), (25, 40, 76)), 4, source="GM 25 nylon / 26 steel guitar"),
    SoundClass("Applause", "crowd", ((126, 57, 67),), source="GM 127 Applause"),
    SoundClass("Bass_drum", "drum", drum_notes=(35, 36), source="drum notes 35/36"),
    SoundClass("Cello", "melodic", ((42, 36, 72),), 2, source="GM 43 Cello"),
    SoundClass("Clarinet", "melodic", ((71, 50, 84),), source="GM 72 Clarinet"),
    SoundClass("Cowbell", "drum", drum_notes=(56,), source="drum note 56"),
    SoundClass("Double_bass", "melodic", ((43, 28, 55), (32, 28, 55)), 2, source="GM 44 Contrabass / 33 Acoustic Bass"),
    SoundClass("Flute", "melodic", ((73, 60, 93),), source="GM 74 Flute"),
    SoundClass("Glockenspiel", "melodic", ((9, 79, 108),), 3, source="GM 10 Glockenspiel"),
    SoundClass("Gunshot_or_gunfire", "burst", ((127, 48, 72),), source="GM 128 Gunshot"),
    SoundClass("Hi-hat", "drum", drum_notes=(42, 42, 44, 46), source="drum notes 42/44/46"),
    SoundClass("Oboe", "melodic", ((68, 58, 89),), source="GM 69 Oboe"),
    SoundClass(
        "Saxophone", "melodic", ((64, 56, 87), (65, 49, 81), (66, 44, 76), (67, 36, 69)),
        source="GM 65-68 soprano/alto/tenor/baritone sax",
    ),
    SoundClass("Snare_drum", "drum", drum_notes=(38, 40), source="drum notes 38/40"),
    SoundClass("Tambourine", "drum", drum_notes=(54,), source="drum note 54"),
    SoundClass("Telephone", "ring", ((124, 60, 72),), source="GM 125 Telephone Ring"),
    SoundClass("Trumpet", "melodic", ((56, 54, 82),), source="GM 57 Trumpet"),
    SoundClass("Violin_or_fiddle", "melodic", ((40, 55, 93), (110, 55, 93)), 2, source="GM 41 Violin / 111 Fiddle"),
)

# Files that break the usual assumptions (mono, 22050 Hz, 16-bit, readable, >= 0.3 s).
TRAIN_HARD_CASES = ("short", "stereo", "rate_44100", "pcm_24")
TEST_HARD_CASES = ("corrupt", "float", "rate_16000")
HARD_CASE_TEXT = {
    "short": f"train clip cut to {SHORT_CLIP_S} s (below the {MIN_DURATION_S} s minimum)",
    "stereo": "train clip stored with 2 channels",
    "rate_44100": "train clip resampled to 44100 Hz",
    "pcm_24": "train clip stored as 24-bit PCM",
    "corrupt": "test file of garbage bytes that no audio reader can open (still listed in both test CSVs)",
    "float": "test clip stored as 32-bit float",
    "rate_16000": "test clip resampled to 16000 Hz",
}


@dataclasses.dataclass
class PlannedClip:
    """One clip: what to play (relative to its slot start) and how to post-process it."""

    fname: str
    label: str
    split: str
    kind: str
    drums: bool
    program: int
    notes: list[tuple[float, float, int, int]]  # onset s, duration s, MIDI pitch, velocity
    controls: list[tuple[float, int, int]]  # time s, controller number, value
    slot_length_s: float
    peak_dbfs: float
    snr_db: float
    noise_color: float
    noise_seed: int
    slot_start_s: float = 0.0
    hard_case: str = ""
    pan: int = 64  # MIDI pan; moved off centre only for the stereo hard case


# ---------------------------------------------------------------- event generators


class Event(NamedTuple):
    """What a generator plays; times are relative to the clip's slot start."""

    kind: str
    drums: bool  # True: `program` is a drum kit and the notes are drum-kit keys
    program: int
    notes: list[tuple[float, float, int, int]]  # onset s, duration s, MIDI pitch, velocity
    controls: list[tuple[float, int, int]]  # time s, controller number, value


def _melodic_event(spec: SoundClass, rng: np.random.Generator):
    """A single note, a short melody, or a chord (a swelling long note for monophonic instruments)."""
    program, low, high = spec.voices[int(rng.integers(len(spec.voices)))]
    base_velocity = int(rng.integers(45, 121))
    kind = str(rng.choice(["single", "melody", "chord"], p=[0.4, 0.35, 0.25]))
    notes: list[tuple[float, float, int, int]] = []
    controls: list[tuple[float, int, int]] = []
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


def _drum_event(spec: SoundClass, rng: np.random.Generator):
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


def _crowd_event(spec: SoundClass, rng: np.random.Generator):
    """Applause: one or two overlapping sustained notes of the applause sample."""
    program, low, high = spec.voices[0]
    duration = float(rng.uniform(1.0, MAX_EVENT_S))
    notes = [(0.0, duration, int(rng.integers(low, high + 1)), int(rng.integers(60, 128)))]
    if rng.random() < 0.4:
        offset = float(rng.uniform(0.0, duration / 2))
        notes.append((offset, duration - offset, int(rng.integers(low, high + 1)), int(rng.integers(40, 110))))
    return Event("crowd", False, program, notes, [])


def _burst_event(spec: SoundClass, rng: np.random.Generator):
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


def _ring_event(spec: SoundClass, rng: np.random.Generator):
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


# ---------------------------------------------------------------- planning (all randomness)


def _unique_hex_names(rng: np.random.Generator, count: int) -> list[str]:
    """FSDKaggle2018-style names: 8 random hex chars, unique within the dataset."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = f"{int(rng.integers(0, 2**32)):08x}.wav"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _plan(seed: int, clips_per_class: int, test_clips_per_class: int):
    """Draw everything random up front, so CSVs depend on the seed only, never on the render."""
    rng = np.random.default_rng(seed)
    per_class = clips_per_class + test_clips_per_class
    fnames = _unique_hex_names(rng, per_class * len(CLASSES))
    clips: list[PlannedClip] = []
    for class_index, spec in enumerate(CLASSES):
        for position in range(per_class):
            event = EVENT_GENERATORS[spec.style](spec, rng)
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
    labels = [spec.label for spec in CLASSES]

    unverified_count = round(UNVERIFIED_SHARE * len(train))
    unverified = rng.choice(len(train), size=unverified_count, replace=False)
    wrong = rng.choice(unverified, size=round(WRONG_LABEL_SHARE * unverified_count), replace=False)
    verified_flags = np.ones(len(train), dtype=int)
    verified_flags[unverified] = 0
    noisy_labels = [clip.label for clip in train]
    for index in wrong:
        others = [label for label in labels if label != train[index].label]
        noisy_labels[index] = str(rng.choice(others))

    verified_indices = np.flatnonzero(verified_flags == 1)
    for case, index in zip(TRAIN_HARD_CASES, rng.choice(verified_indices, len(TRAIN_HARD_CASES), replace=False)):
        train[index].hard_case = case
        if case == "stereo":  # pan it so the two channels really differ
            train[index].pan = int(rng.choice([24, 104]))
    for case, index in zip(TEST_HARD_CASES, rng.choice(len(test), len(TEST_HARD_CASES), replace=False)):
        test[index].hard_case = case

    slot_start = LEAD_IN_S
    for clip in clips:
        clip.slot_start_s = slot_start
        slot_start += clip.slot_length_s + SLOT_GAP_S
    return clips, train, test, noisy_labels, verified_flags, rng


# ---------------------------------------------------------------- MIDI writing and rendering


def _variable_length(value: int) -> bytes:
    """MIDI variable-length quantity (7 bits per byte, high bit = more follows)."""
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(groups))


def _midi_bytes(clips: list[PlannedClip]) -> bytes:
    """A format-0 standard MIDI file with every clip in its own time slot (1 tick = 1 ms)."""
    events: list[tuple[int, int, bytes]] = []  # tick, priority at equal tick, message

    def at(seconds: float) -> int:
        return int(round(seconds * 1000))

    for position, clip in enumerate(clips):
        # Consecutive clips use different channels: "All Sound Off" only releases voices
        # (slowly, for some presets), so a clip is silenced by zeroing its channel's volume,
        # and that channel is reused only 15 slots later, when every tail has long died.
        start, channel = clip.slot_start_s, position % MIDI_CHANNELS
        bank = XG_DRUM_BANK if clip.drums else 0
        events.append((at(start), 0, bytes([0xB0 | channel, 121, 0])))  # reset controllers
        events.append((at(start), 1, bytes([0xB0 | channel, 0, bank])))  # bank select MSB
        events.append((at(start), 1, bytes([0xB0 | channel, 32, 0])))  # bank select LSB
        events.append((at(start), 2, bytes([0xC0 | channel, clip.program])))
        events.append((at(start), 2, bytes([0xB0 | channel, 7, 100])))  # channel volume
        events.append((at(start), 2, bytes([0xB0 | channel, 11, 127])))  # expression
        events.append((at(start), 2, bytes([0xB0 | channel, 10, clip.pan])))
        for offset, number, value in clip.controls:
            events.append((at(start + offset), 3, bytes([0xB0 | channel, number, value])))
        for onset, duration, pitch, velocity in clip.notes:
            events.append((at(start + onset), 5, bytes([0x90 | channel, pitch, velocity])))
            events.append((at(start + onset + duration), 4, bytes([0x80 | channel, pitch, 64])))
        slot_end = at(start + clip.slot_length_s)
        events.append((slot_end, 6, bytes([0xB0 | channel, 7, 0])))  # volume 0: silence now
        events.append((slot_end, 6, bytes([0xB0 | channel, 11, 0])))  # expression 0
        events.append((slot_end, 6, bytes([0xB0 | channel, 120, 0])))  # all sound off: free voices
    last_tick = max(tick for tick, _, _ in events)
    # A harmless trailing event keeps the render running past the last slot.
    events.append((last_tick + 500, 7, bytes([0xB0, 121, 0])))
    events.sort(key=lambda event: (event[0], event[1]))

    track = bytearray(b"\x00\xff\x51\x03" + TEMPO_US_PER_QUARTER.to_bytes(3, "big"))
    previous_tick = 0
    for tick, _, message in events:
        track += _variable_length(tick - previous_tick) + message
        previous_tick = tick
    track += b"\x00\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def find_fluidsynth() -> str:
    """Path of the fluidsynth program, or a RuntimeError saying what to install."""
    path = shutil.which("fluidsynth")
    if path is None:
        raise RuntimeError(
            "The demo dataset is rendered with the 'fluidsynth' program, which is not on PATH. "
            f"Install it with: {INSTALL_HINT}"
        )
    return path


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """The soundfont to render with: the given path, else the first standard location that exists."""
    if soundfont is not None:
        path = Path(soundfont)
        if not path.is_file():
            raise RuntimeError(
                f"Soundfont {path} does not exist. For the default FluidR3 GM soundfont run: {INSTALL_HINT}"
            )
        return path
    for candidate in SOUNDFONT_CANDIDATES:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(path) for path in SOUNDFONT_CANDIDATES)
    raise RuntimeError(
        f"No General MIDI soundfont found (searched {searched}). "
        f"Install one with: {INSTALL_HINT} (or pass --soundfont PATH)"
    )


def fluidsynth_version(fluidsynth: str) -> str:
    """First line of `fluidsynth --version`, recorded so a build can be traced."""
    result = subprocess.run([fluidsynth, "--version"], capture_output=True, text=True, timeout=60)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _render(fluidsynth: str, soundfont: Path, midi_path: Path, wav_path: Path) -> None:
    """Render the MIDI file to a float WAV.

    Reverb and chorus are off so slots stay independent. XG bank selection lets any
    channel play a drum kit (bank MSB 127), which the channel rotation needs.
    """
    command = [
        fluidsynth, "-ni", "-q", "-R", "0", "-C", "0", "-o", "synth.midi-bank-select=xg",
        "-g", str(RENDER_GAIN), "-r", str(SAMPLE_RATE),
        "-O", "float", "-T", "wav", "-F", str(wav_path), str(soundfont), str(midi_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not wav_path.is_file():
        raise RuntimeError(
            f"fluidsynth failed (exit {result.returncode}) rendering {midi_path}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


# ---------------------------------------------------------------- cutting and post-processing


def _trim_bounds(mono: np.ndarray, minimum: int, maximum: int) -> tuple[int, int]:
    """Sample range that keeps the sound: from onset to where the level falls SILENCE_DB below peak."""
    frame = 256
    padded = np.pad(np.abs(mono), (0, (-len(mono)) % frame))
    envelope = padded.reshape(-1, frame).max(axis=1)
    peak = float(envelope.max())
    active = np.flatnonzero(envelope > peak * 10 ** (-SILENCE_DB / 20))
    start = max(int(active[0]) * frame - int(0.005 * SAMPLE_RATE), 0)
    end = min((int(active[-1]) + 1) * frame + int(0.01 * SAMPLE_RATE), len(mono))
    if end - start < minimum:
        end = min(start + minimum, len(mono))
        start = max(0, end - minimum)
    return start, min(end, start + maximum)


def _finish(segment: np.ndarray, clip: PlannedClip) -> np.ndarray:
    """Trim, fade, scale to the planned peak and add light coloured noise. Returns (n, channels)."""
    mono = segment.mean(axis=1)
    if not np.any(mono):
        pitches = sorted({pitch for _, _, pitch, _ in clip.notes})
        raise RuntimeError(
            f"clip {clip.fname} ({clip.label}, {'drum kit' if clip.drums else 'program'} {clip.program}, "
            f"notes {pitches}) rendered silent: the soundfont has no samples there"
        )
    if clip.hard_case == "short":
        length = int(round(SHORT_CLIP_S * SAMPLE_RATE))
        start, _ = _trim_bounds(mono, length, length)
        end = start + length
    else:
        start, end = _trim_bounds(mono, int(MIN_DURATION_S * SAMPLE_RATE), int(MAX_DURATION_S * SAMPLE_RATE))
    audio = segment[start:end].astype(np.float64)
    fade_in, fade_out = min(int(0.002 * SAMPLE_RATE), len(audio)), min(int(0.02 * SAMPLE_RATE), len(audio))
    audio[:fade_in] *= np.linspace(0.0, 1.0, fade_in)[:, None]
    audio[len(audio) - fade_out :] *= np.linspace(1.0, 0.0, fade_out)[:, None]

    scale = 10 ** (clip.peak_dbfs / 20) / max(float(np.abs(audio).max()), 1e-12)
    audio *= scale
    noise_rng = np.random.default_rng(clip.noise_seed)
    white = noise_rng.standard_normal(audio.shape)
    noise = signal.lfilter([1.0 - clip.noise_color], [1.0, -clip.noise_color], white, axis=0)
    signal_rms = float(np.sqrt(np.mean(audio.mean(axis=1) ** 2)))
    noise *= signal_rms * 10 ** (-clip.snr_db / 20) / max(float(np.sqrt(np.mean(noise**2))), 1e-12)
    audio = np.clip(audio + noise, -1.0, 1.0)
    return audio if clip.hard_case == "stereo" else audio.mean(axis=1, keepdims=True)


def _write_clip(path: Path, audio: np.ndarray, clip: PlannedClip, rng: np.random.Generator) -> None:
    """Write one clip, applying its planted hard case (if any)."""
    audio = audio[:, 0] if audio.shape[1] == 1 else audio
    if clip.hard_case == "corrupt":
        # A truncated RIFF header followed by garbage: looks like a WAV by name and magic only.
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVE" + rng.bytes(20))
    elif clip.hard_case == "rate_44100":
        sf.write(path, signal.resample_poly(audio, 2, 1, axis=0), 44100, subtype="PCM_16")
    elif clip.hard_case == "rate_16000":
        sf.write(path, signal.resample_poly(audio, 320, 441, axis=0), 16000, subtype="PCM_16")
    elif clip.hard_case == "pcm_24":
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_24")
    elif clip.hard_case == "float":
        # scipy, not libsndfile: libsndfile adds a PEAK chunk with a timestamp, breaking byte-identical rebuilds.
        wavfile.write(path, SAMPLE_RATE, audio.astype(np.float32))
    else:
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")


# ---------------------------------------------------------------- building and caching


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    """Plain CSV writer: fields never contain commas or quotes here."""
    lines = [",".join(header)] + [",".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _readme_text(params: dict, train, test, noisy_labels, verified_flags, durations, version: str) -> str:
    """Human-readable description of what was built, written next to the data."""
    lines = [
        "# Demo dataset (FSDKaggle2018 layout)",
        "",
        "Built by `python -m data.build_demo` from the FluidR3 General MIDI soundfont, rendered",
        f"with fluidsynth ({version}) at {SAMPLE_RATE} Hz, reverb and chorus off.",
        f"Seed {params['seed']}, builder version {params['builder_version']}.",
        "Rebuild: `python -m data.build_demo --out DIR --seed N --force`.",
        "",
        "Each clip is one event: a single note, a short melody, a chord (strings: double stops;",
        "monophonic winds: a long note with an expression swell), a drum hit or a drum pattern on one",
        "of 7 GM drum kits, applause, gunfire bursts or telephone rings. Pitch, velocity, duration,",
        "peak level (-20 to -1 dBFS) and light coloured noise (25-45 dB SNR) vary per clip.",
        f"Clips are trimmed where the level falls {SILENCE_DB:.0f} dB below the peak and kept within",
        f"{MIN_DURATION_S}-{MAX_DURATION_S} s (train durations {min(durations):.2f}-{max(durations):.2f} s"
        " including the planted short clip).",
        "",
        "## Files",
        "- `train.csv`: fname,label,manually_verified (labels of unverified rows may be wrong)",
        "- `train_clean_labels.csv`: fname,label with the true label of every train clip",
        "- `test_labels.csv`: fname,label (true test labels)",
        "- `sample_submission.csv`: fname,label with a placeholder label",
        "- `audio_train/`, `audio_test/`: the WAV files",
        "",
        "## Label noise",
        f"{int((verified_flags == 0).sum())} of {len(train)} train rows have manually_verified=0; "
        f"{sum(noisy != clip.label for noisy, clip in zip(noisy_labels, train))} of those carry a wrong label",
        "(drawn uniformly from the other classes). Verified rows are always correct.",
        "",
        "## Classes",
        "| label | GM source | train | test | unverified | wrong label |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for spec in CLASSES:
        rows = [index for index, clip in enumerate(train) if clip.label == spec.label]
        lines.append(
            f"| {spec.label} | {spec.source} | {len(rows)} | "
            f"{sum(clip.label == spec.label for clip in test)} | "
            f"{sum(verified_flags[index] == 0 for index in rows)} | "
            f"{sum(noisy_labels[index] != spec.label for index in rows)} |"
        )
    lines += [
        f"| total | | {len(train)} | {len(test)} | {int((verified_flags == 0).sum())} | "
        f"{sum(noisy != clip.label for noisy, clip in zip(noisy_labels, train))} |",
        "",
        "## Hard cases (planted on purpose)",
    ]
    for clip in train + test:
        if clip.hard_case:
            lines.append(f"- `{clip.split}` `{clip.fname}` ({clip.label}): {HARD_CASE_TEXT[clip.hard_case]}")
    lines += [
        "",
        "## Reproducibility",
        "All random choices (file names, events, splits, label noise, hard cases, gain and noise) come from",
        "a numpy generator seeded with the seed above, so the same seed gives identical CSVs. fluidsynth's",
        "offline render is deterministic for a given fluidsynth version and soundfont, so the audio files",
        "are byte-identical too on the same installation (checked by tests/test_demo_data.py); only the",
        "build timings in `.complete` differ.",
        "",
    ]
    return "\n".join(lines)


def _build_into(directory: Path, params: dict, soundfont: Path, fluidsynth: str) -> dict:
    """Write the whole dataset into `directory` (a fresh temporary dir). Returns build statistics."""
    started = time.perf_counter()
    clips, train, test, noisy_labels, verified_flags, rng = _plan(
        params["seed"], params["clips_per_class"], params["test_clips_per_class"]
    )
    scratch = directory / "render"
    scratch.mkdir()
    midi_path, wav_path = scratch / "all_clips.mid", scratch / "all_clips.wav"
    midi_path.write_bytes(_midi_bytes(clips))
    audio_seconds = clips[-1].slot_start_s + clips[-1].slot_length_s
    LOG.info("rendering %d clips (%.0f s of audio) with %s in one fluidsynth call", len(clips), audio_seconds, soundfont)
    render_started = time.perf_counter()
    _render(fluidsynth, soundfont, midi_path, wav_path)
    render_seconds = time.perf_counter() - render_started

    (directory / "audio_train").mkdir()
    (directory / "audio_test").mkdir()
    durations: dict[str, float] = {}
    with sf.SoundFile(wav_path) as rendered:
        for clip in clips:
            first = int(round((clip.slot_start_s - SEGMENT_PRE_ROLL_S) * rendered.samplerate))
            last = int(round((clip.slot_start_s + clip.slot_length_s) * rendered.samplerate))
            rendered.seek(first)
            segment = rendered.read(last - first, dtype="float32", always_2d=True)
            if len(segment) < last - first:  # render ended early: the rest is silence
                segment = np.pad(segment, ((0, last - first - len(segment)), (0, 0)))
            audio = _finish(segment, clip)
            durations[clip.fname] = len(audio) / SAMPLE_RATE
            _write_clip(directory / f"audio_{clip.split}" / clip.fname, audio, clip, rng)
    shutil.rmtree(scratch)

    train_order = sorted(range(len(train)), key=lambda index: train[index].fname)
    _write_csv(
        directory / "train.csv",
        ("fname", "label", "manually_verified"),
        [(train[i].fname, noisy_labels[i], int(verified_flags[i])) for i in train_order],
    )
    _write_csv(directory / "train_clean_labels.csv", ("fname", "label"), [(train[i].fname, train[i].label) for i in train_order])
    test_sorted = sorted(test, key=lambda clip: clip.fname)
    _write_csv(directory / "test_labels.csv", ("fname", "label"), [(clip.fname, clip.label) for clip in test_sorted])
    placeholder = " ".join(sorted(spec.label for spec in CLASSES)[:3])
    _write_csv(directory / "sample_submission.csv", ("fname", "label"), [(clip.fname, placeholder) for clip in test_sorted])
    version = fluidsynth_version(fluidsynth)
    train_durations = [durations[clip.fname] for clip in train]
    (directory / "README.md").write_text(
        _readme_text(params, train, test, noisy_labels, verified_flags, train_durations, version)
    )

    for spec in CLASSES:
        LOG.info(
            "  %-20s train %2d  test %2d", spec.label,
            sum(clip.label == spec.label for clip in train), sum(clip.label == spec.label for clip in test),
        )  # fmt: skip
    return {
        "train_clips": len(train),
        "test_clips": len(test),
        "classes": len(CLASSES),
        "unverified": int((verified_flags == 0).sum()),
        "wrong_labels": sum(noisy != clip.label for noisy, clip in zip(noisy_labels, train)),
        "audio_seconds": round(sum(durations.values()), 1),
        "render_seconds": round(render_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "fluidsynth": version,
        "soundfont": str(soundfont),
    }


def build_params(seed: int = 2018, clips_per_class: int = 20, test_clips_per_class: int = 6) -> dict:
    """The parameters that define a build; a cache is reused only when they match exactly."""
    return {
        "builder_version": BUILDER_VERSION,
        "seed": int(seed),
        "clips_per_class": int(clips_per_class),
        "test_clips_per_class": int(test_clips_per_class),
        "sample_rate": SAMPLE_RATE,
        "classes": [spec.label for spec in CLASSES],
    }


def is_complete(out_dir: str | os.PathLike, params: dict) -> bool:
    """True only for a finished build with these parameters (the marker is written last)."""
    try:
        marker = json.loads((Path(out_dir) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("params") == params


def _remove_leftovers(out_dir: Path) -> None:
    """Delete temporary siblings of crashed builds; safe because the caller holds the build lock."""
    for pattern in (f".{out_dir.name}.building-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            LOG.info("removing leftover of an interrupted build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory holding files this builder never writes (e.g. --out .)."""
    if out_dir.is_dir():
        foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in OUTPUT_ENTRIES)
        if foreign:
            raise RuntimeError(
                f"Refusing to replace {out_dir}: it holds files the demo builder did not write "
                f"({', '.join(foreign[:5])}). Choose another --out directory."
            )
    elif out_dir.exists():
        raise RuntimeError(f"Refusing to replace {out_dir}: it is not a directory")


def build_demo_dataset(
    out_dir: str | os.PathLike,
    seed: int = 2018,
    force: bool = False,
    *,
    soundfont: str | os.PathLike | None = None,
    clips_per_class: int = 20,
    test_clips_per_class: int = 6,
) -> Path:
    """Build the demo dataset into `out_dir` unless a complete build with the same parameters is there.

    The build goes to a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never looks finished. A lock file next to `out_dir`
    serialises concurrent builders. The soundfont is not part of the cache key: pass
    force=True after changing it.
    """
    if clips_per_class < 1 or test_clips_per_class < 1:
        raise ValueError("clips_per_class and test_clips_per_class must be at least 1")
    out_dir = Path(out_dir).absolute()
    params = build_params(seed, clips_per_class, test_clips_per_class)
    if not force and is_complete(out_dir, params):
        LOG.info("demo dataset already built in %s (seed %d)", out_dir, seed)
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_complete(out_dir, params):  # another process finished it meanwhile
            return out_dir
        _check_replaceable(out_dir)
        _remove_leftovers(out_dir)
        fluidsynth = find_fluidsynth()
        soundfont_path = find_soundfont(soundfont)
        building = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            stats = _build_into(building, params, soundfont_path, fluidsynth)
            (building / MARKER_NAME).write_text(json.dumps({"params": params, "stats": stats}, indent=2) + "\n")
            if out_dir.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.rename(out_dir, retired / out_dir.name)
                os.rename(building, out_dir)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(building, out_dir)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    LOG.info(
        "built %d train + %d test clips (%d classes, %d unverified, %d wrong labels, %.0f s audio) "
        "in %.1f s (render %.1f s) into %s",
        stats["train_clips"], stats["test_clips"], stats["classes"], stats["unverified"],
        stats["wrong_labels"], stats["audio_seconds"], stats["build_seconds"], stats["render_seconds"], out_dir,
    )  # fmt: skip
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or reuse) the demo dataset and print its path on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m data.build_demo",
        description="Render a small FSDKaggle2018-style dataset from the FluidR3 GM soundfont.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=2018, help="random seed (default 2018)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--soundfont", help=f"soundfont path (default: first of {SOUNDFONT_CANDIDATES[0]} and similar)")
    parser.add_argument("--clips-per-class", type=int, default=20, help="train clips per class (default 20)")
    parser.add_argument("--test-clips-per-class", type=int, default=6, help="test clips per class (default 6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_demo_dataset(
            args.out,
            seed=args.seed,
            force=args.force,
            soundfont=args.soundfont,
            clips_per_class=args.clips_per_class,
            test_clips_per_class=args.test_clips_per_class,
        )
    except (RuntimeError, ValueError) as error:
        LOG.error("%s", error)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
