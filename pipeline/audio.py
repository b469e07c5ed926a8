"""Audio decoding and the papers' preprocessing.

Every clip goes through the same steps before any feature is computed:
decode (any format libsndfile reads, any bit depth) -> mono (channel mean)
-> resample to the feature's rate -> trim leading/trailing silence -> peak
normalise to [-1, 1]. Clips that cannot be used raise :class:`AudioError`
with a reason, so stages can log them by name and carry on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(Exception):
    """A clip that cannot be used. ``reason`` is unreadable, empty or silent."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode to mono float32 at the file's own rate."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises several types for bad files
        raise AudioError(path, "unreadable", str(exc).splitlines()[0][:200]) from None
    if data.shape[0] == 0:
        raise AudioError(path, "empty", "no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(path, "unreadable", "non-finite samples")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


def resample(y: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    if sr == target_sr:
        return y
    return soxr.resample(y, sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def trim_silence(y: np.ndarray, top_db: float = 60.0, frame: int = 512) -> np.ndarray:
    """Cut leading/trailing frames whose RMS is ``top_db`` below the loudest
    frame (librosa.effects.trim's rule, on non-overlapping frames so it is a
    single vectorised pass)."""
    if top_db is None or len(y) <= frame:
        return y
    n_frames = len(y) // frame
    body = y[: n_frames * frame].reshape(n_frames, frame)
    rms = np.sqrt(np.mean(body * body, axis=1))
    if len(y) > n_frames * frame:  # the tail frame counts too
        rms = np.append(rms, np.sqrt(np.mean(y[n_frames * frame:] ** 2)))
    loud = np.flatnonzero(rms >= rms.max() * 10.0 ** (-top_db / 20.0))
    return y[loud[0] * frame: min(len(y), (loud[-1] + 1) * frame)]


def peak_normalize(y: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    return y / peak if peak > 0 else y


def preprocess(y: np.ndarray, sr: int, target_sr: int, *, trim_top_db: float | None = 60.0,
               silence_peak: float = 1e-4, path: str | Path = "<array>") -> np.ndarray:
    """Resample, trim and peak-normalise one decoded clip.

    ``silence_peak``: a clip whose absolute peak is below this (about -80 dBFS
    by default) is treated as all-silent and rejected.
    """
    if float(np.max(np.abs(y))) < silence_peak:
        raise AudioError(path, "silent", f"peak below {silence_peak:g}")
    y = resample(y, sr, target_sr)
    y = trim_silence(y, trim_top_db)
    if len(y) == 0:
        raise AudioError(path, "empty", "nothing left after trimming")
    return peak_normalize(y).astype(np.float32, copy=False)


def repeat_to_length(x: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    """Repeat a short array (not zero-pad, as the papers do) to ``length``
    along ``axis``; longer arrays are returned unchanged."""
    n = x.shape[axis]
    if n >= length:
        return x
    if n == 0:
        raise ValueError("cannot repeat an empty array")
    reps = [1] * x.ndim
    reps[axis] = -(-length // n)
    tiled = np.tile(x, reps)
    return np.take(tiled, np.arange(length), axis=axis)
