"""Planted hard cases: files that break the usual assumptions (mono, 22050 Hz, 16-bit, readable, >= 0.3 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal
from scipy.io import wavfile

from data.demo.render import SAMPLE_RATE

SHORT_CLIP_S = 0.15  # the planted too-short train clip
TRAIN_HARD_CASES = ("short", "stereo", "rate_44100", "pcm_24")
TEST_HARD_CASES = ("corrupt", "float", "rate_16000")
STEREO_PANS = (24, 104)  # MIDI pan of the stereo clip, hard left or right so the channels really differ


def assign_hard_cases(train: list, test: list, verified_flags: np.ndarray, rng: np.random.Generator) -> None:
    """Mark one verified train clip per train case and one test clip per test case (in place)."""
    verified_indices = np.flatnonzero(verified_flags == 1)
    for case, index in zip(TRAIN_HARD_CASES, rng.choice(verified_indices, len(TRAIN_HARD_CASES), replace=False)):
        train[index].hard_case = case
        if case == "stereo":
            train[index].pan = int(rng.choice(STEREO_PANS))
    for case, index in zip(TEST_HARD_CASES, rng.choice(len(test), len(TEST_HARD_CASES), replace=False)):
        test[index].hard_case = case


def write_clip(path: Path, audio: np.ndarray, hard_case: str, rng: np.random.Generator) -> None:
    """Write one finished clip (samples x channels), applying its hard case (if any)."""
    audio = audio[:, 0] if audio.shape[1] == 1 else audio
    if hard_case == "corrupt":
        # A truncated RIFF header followed by garbage: looks like a WAV by name and magic only.
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVE" + rng.bytes(20))
    elif hard_case == "rate_44100":
        sf.write(path, signal.resample_poly(audio, 2, 1, axis=0), 44100, subtype="PCM_16")
    elif hard_case == "rate_16000":
        sf.write(path, signal.resample_poly(audio, 320, 441, axis=0), 16000, subtype="PCM_16")
    elif hard_case == "pcm_24":
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_24")
    elif hard_case == "float":
        # scipy, not libsndfile: libsndfile adds a PEAK chunk with a timestamp, breaking byte-identical rebuilds.
        wavfile.write(path, SAMPLE_RATE, audio.astype(np.float32))
    else:
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
