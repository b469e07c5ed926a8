"""Cutting the long render into clips: slot segments, silence trim, fades, level and light coloured noise."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
from scipy import signal

from data.demo.hard_cases import SHORT_CLIP_S
from data.demo.plan import MAX_DURATION_S, MIN_DURATION_S, SEGMENT_PRE_ROLL_S, PlannedClip
from data.demo.render import SAMPLE_RATE

SILENCE_DB = 50.0  # a clip ends where its level stays this far below its peak
TRIM_FRAME = 256  # samples per envelope frame of the trim


def slot_segments(wav_path: Path, clips: list[PlannedClip]) -> Iterator[tuple[PlannedClip, np.ndarray]]:
    """Each clip with its slot of the render (samples x channels, float32), from a little before the slot start."""
    with sf.SoundFile(wav_path) as rendered:
        for clip in clips:
            first = int(round((clip.slot_start_s - SEGMENT_PRE_ROLL_S) * rendered.samplerate))
            last = int(round((clip.slot_start_s + clip.slot_length_s) * rendered.samplerate))
            rendered.seek(first)
            segment = rendered.read(last - first, dtype="float32", always_2d=True)
            if len(segment) < last - first:  # render ended early: the rest is silence
                segment = np.pad(segment, ((0, last - first - len(segment)), (0, 0)))
            yield clip, segment


def trim_bounds(mono: np.ndarray, minimum: int, maximum: int) -> tuple[int, int]:
    """Sample range that keeps the sound: from onset to where the level falls SILENCE_DB below peak.

    By hand (peak per 256-sample frame): librosa.effects.trim, on RMS frames, cuts 321-467 of the
    468 seed-2018 clips elsewhere (frame settings 512/128 to 2048/512), which would change the data.
    """
    padded = np.pad(np.abs(mono), (0, (-len(mono)) % TRIM_FRAME))
    envelope = padded.reshape(-1, TRIM_FRAME).max(axis=1)
    peak = float(envelope.max())
    active = np.flatnonzero(envelope > peak * 10 ** (-SILENCE_DB / 20))
    start = max(int(active[0]) * TRIM_FRAME - int(0.005 * SAMPLE_RATE), 0)
    end = min((int(active[-1]) + 1) * TRIM_FRAME + int(0.01 * SAMPLE_RATE), len(mono))
    if end - start < minimum:
        end = min(start + minimum, len(mono))
        start = max(0, end - minimum)
    return start, min(end, start + maximum)


def finish(segment: np.ndarray, clip: PlannedClip) -> np.ndarray:
    """Trim, fade, scale to the planned peak and add light coloured noise. Returns (samples, channels)."""
    mono = segment.mean(axis=1)
    if not np.any(mono):
        pitches = sorted({pitch for _, _, pitch, _ in clip.notes})
        raise RuntimeError(
            f"clip {clip.fname} ({clip.label}, {'drum kit' if clip.drums else 'program'} {clip.program}, "
            f"notes {pitches}) rendered silent: the soundfont has no samples there"
        )
    if clip.hard_case == "short":
        length = int(round(SHORT_CLIP_S * SAMPLE_RATE))
        start, _ = trim_bounds(mono, length, length)
        end = start + length
    else:
        start, end = trim_bounds(mono, int(MIN_DURATION_S * SAMPLE_RATE), int(MAX_DURATION_S * SAMPLE_RATE))
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
