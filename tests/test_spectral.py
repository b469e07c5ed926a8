"""Feature functions against librosa and the VGGish reference definitions."""
from __future__ import annotations

import librosa
import numpy as np
import pytest

from pipeline import spectral
from pipeline.spectral import (FEATURE_KINDS, compute_feature, deltas, log_mel, log_mel_3ch, mfcc, stft_magnitude,
                               vggish_log_mel, vggish_mel_matrix)

SR = 16000


def _signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    y = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 3000 * t) + 0.05 * rng.standard_normal(n)
    return y.astype(np.float32)


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")
@pytest.mark.parametrize("n", [SR, 5000, 700])
def test_log_mel_matches_librosa(n):
    y = _signal(n)
    ours = log_mel(y, SR, n_fft=1024, hop_length=256, n_mels=48, fmin=20, fmax=8000)
    # the module pads by reflection (librosa < 0.10's default; newer librosa pads with zeros)
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=1024, hop_length=256, n_mels=48, fmin=20, fmax=8000,
                                         power=2.0, center=True, pad_mode="reflect")
    ref = (10.0 * np.log10(np.maximum(mel, 1e-10))).T
    assert ours.shape == ref.shape == (1 + n // 256, 48)
    assert ours.dtype == np.float32
    loud = ref > ref.max() - 80          # compare where float32 rounding is not amplified by the log
    np.testing.assert_allclose(ours[loud], ref[loud], atol=0.02)


def test_stft_magnitude_matches_librosa():
    y = _signal(4000)
    ours = stft_magnitude(y, 512, 128)
    ref = np.abs(librosa.stft(y, n_fft=512, hop_length=128, center=True, pad_mode="reflect")).T
    np.testing.assert_allclose(ours, ref, atol=2e-3 * ref.max())


@pytest.mark.parametrize("n, width", [(50, 9), (9, 9), (10, 9), (12, 5), (4, 3), (7, 9), (8, 9)])
def test_deltas_match_librosa(n, width):
    rng = np.random.default_rng(n)
    spec = rng.standard_normal((n, 6)).astype(np.float32)
    ours = deltas(spec, width)
    eff = min(width, n if n % 2 else n - 1)   # short inputs use the widest odd window that fits
    ref = librosa.feature.delta(spec, width=eff, order=1, axis=0, mode="interp")
    assert ours.shape == spec.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_deltas_too_short_are_zero(n):
    spec = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    np.testing.assert_array_equal(deltas(spec, 9), np.zeros_like(spec))


def test_deltas_of_a_ramp_are_its_slope():
    spec = (2.5 * np.arange(20, dtype=np.float32))[:, None] * np.ones((1, 4), np.float32)
    np.testing.assert_allclose(deltas(spec, 9), 2.5, atol=1e-5)


def test_log_mel_3ch_channels():
    y = _signal(8000)
    out = log_mel_3ch(y, SR, delta_width=9, n_fft=512, hop_length=160, n_mels=32)
    lm = log_mel(y, SR, n_fft=512, hop_length=160, n_mels=32)
    assert out.shape == (1 + 8000 // 160, 32, 3)
    np.testing.assert_array_equal(out[..., 0], lm)
    np.testing.assert_allclose(out[..., 1], deltas(lm, 9), atol=1e-6)
    np.testing.assert_allclose(out[..., 2], deltas(deltas(lm, 9), 9), atol=1e-6)


def test_mfcc_shape_and_definition():
    y = _signal(SR)
    out = mfcc(y, SR, n_mfcc=20, n_fft=1024, hop_length=256, n_mels=40)
    assert out.shape == (1 + SR // 256, 20) and out.dtype == np.float32
    lm = log_mel(y, SR, n_fft=1024, hop_length=256, n_mels=40)
    dct = librosa.feature.mfcc(S=lm.T, n_mfcc=20, dct_type=2, norm="ortho").T
    np.testing.assert_allclose(out, dct, rtol=1e-4, atol=1e-3)


def test_vggish_frames_one_second():
    out = vggish_log_mel(_signal(SR))
    assert out.shape == (1 + (16000 - 400) // 160, 64) == (98, 64)
    assert out.dtype == np.float32
    assert np.all(out >= np.log(0.01) - 1e-6)          # log(mel + 0.01) is bounded below


def test_vggish_short_clip_is_repeated():
    half = _signal(8000)
    out = vggish_log_mel(half)
    assert out.shape[0] >= 96 and out.shape[1] == 64
    assert out.shape[0] == 96
    # repetition, not zero padding: no frame is the all-silent floor log(0.01)
    assert np.all(out.max(axis=1) > np.log(0.01) + 1.0)


def test_vggish_matches_reference_definition():
    """Frames as the AudioSet reference computes them (periodic Hann 400, fft 512, magnitude)."""
    y = _signal(SR)
    n = 1 + (len(y) - 400) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([y[i * 160: i * 160 + 400] for i in range(n)]).astype(np.float64)
    mag = np.abs(np.fft.rfft(frames * window, 512))
    ref = np.log(mag @ vggish_mel_matrix().astype(np.float64) + 0.01)
    np.testing.assert_allclose(vggish_log_mel(y), ref, atol=1e-3)


def test_vggish_mel_matrix():
    m = vggish_mel_matrix()
    assert m.shape == (257, 64)
    assert np.all(m[0] == 0)
    assert np.all(m >= 0)
    assert np.all(m.max(axis=0) > 0)        # every band has weight
    assert np.all(m.max(axis=0) <= 1.0 + 1e-6)
    # bins above 7500 Hz get no weight
    hz = np.linspace(0, 8000, 257)
    assert np.all(m[hz > 7500.0 + 1e-6] == 0)


def test_compute_feature_dispatch():
    y = _signal(4000)
    assert compute_feature("wave", y, SR, {}).shape == (4000, 1)
    assert set(FEATURE_KINDS) >= {"logmel", "mfcc", "wave", "vggish"}
    assert compute_feature("vggish", y, SR, {}).shape == (96, 64)
    with pytest.raises(ValueError, match="unknown feature kind"):
        compute_feature("cqt", y, SR, {})


def test_tiny_clip_gives_frames():
    y = _signal(100)                       # shorter than one FFT frame
    out = log_mel_3ch(y, SR, n_fft=1024, hop_length=256, n_mels=16)
    # repeated to n_fft // 2 + 1 samples before the reflection padding
    assert out.shape == (1 + (1024 // 2 + 1) // 256, 16, 3) and np.all(np.isfinite(out))
    assert spectral.FEATURE_VERSION >= 1
