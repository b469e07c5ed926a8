"""Feature functions against librosa and the VGGish reference definitions."""
from __future__ import annotations

import warnings

import librosa
import numpy as np
import pytest
import scipy.signal

from pipeline import spectral
from pipeline.audio import repeat_to_length
from pipeline.cache import FeatureStore, feature_settings
from pipeline.config import ConfigError
from pipeline.spectral import (C1_HZ, FEATURE_KINDS, compute_feature, cqt_min_length, deltas, erb_bandwidth,
                               erb_rate_to_hz, gammatone_centres, gammatone_sos, gammatone_spectrogram,
                               hz_to_erb_rate, log_cqt, log_mel, log_mel_3ch, mfcc, stft_magnitude, vggish_log_mel,
                               vggish_mel_matrix)
from pipeline.workdir import WorkDir

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
    assert set(FEATURE_KINDS) >= {"logmel", "mfcc", "wave", "vggish", "cqt", "gammatone"}
    assert compute_feature("vggish", y, SR, {}).shape == (96, 64)
    with pytest.raises(ValueError, match="unknown feature kind"):
        compute_feature("chroma", y, SR, {})


def test_tiny_clip_gives_frames():
    y = _signal(100)                       # shorter than one FFT frame
    out = log_mel_3ch(y, SR, n_fft=1024, hop_length=256, n_mels=16)
    # repeated to n_fft // 2 + 1 samples before the reflection padding
    assert out.shape == (1 + (1024 // 2 + 1) // 256, 16, 3) and np.all(np.isfinite(out))
    assert spectral.FEATURE_VERSION >= 1


# ---------------------------------------------------------------------------
# constant-Q transform

def _librosa_log_cqt(y, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_fft=.* is too large for input signal")
        c = librosa.cqt(y, sr=SR, tuning=0.0, **kw)
    return librosa.amplitude_to_db(np.abs(c), ref=1.0, amin=1e-5, top_db=None).T


@pytest.mark.parametrize("n, params", [
    (SR, {}),                                                                       # the defaults
    (12345, {"hop_length": 128, "n_bins": 96, "bins_per_octave": 24, "fmin": 110.0}),  # 4 octaves
    (20000, {"hop_length": 64, "n_bins": 36, "bins_per_octave": 12, "fmin": 220.0}),
])
def test_cqt_matches_librosa(n, params):
    y = _signal(n)
    ours = log_cqt(y, SR, **params)
    kw = {"hop_length": 256, "n_bins": 84, "bins_per_octave": 12, "fmin": C1_HZ, **params}
    ref = _librosa_log_cqt(y, **kw)
    assert ours.shape == ref.shape == (1 + n // kw["hop_length"], kw["n_bins"])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert ours.max() > -20 and ours.min() >= -100.0 - 1e-4        # absolute dB, floor 20 log10(1e-5)


def test_cqt_short_clip_is_repeated_to_the_lowest_filter():
    lowest = librosa.filters.wavelet_lengths(freqs=librosa.cqt_frequencies(n_bins=84, fmin=C1_HZ), sr=SR)[0][0]
    assert cqt_min_length(SR, C1_HZ, 12) == int(np.ceil(lowest))
    y = _signal(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # librosa's "n_fft too large" notes are expected and silenced
        ours = log_cqt(y, SR)
    long = repeat_to_length(y, cqt_min_length(SR, C1_HZ, 12))
    assert ours.shape == (1 + len(long) // 256, 84)
    np.testing.assert_allclose(ours, _librosa_log_cqt(long, hop_length=256, n_bins=84, fmin=C1_HZ), atol=1e-3)
    assert np.all(np.isfinite(ours))
    # the low bins see the repeated signal, not silence: the 440 Hz bin is loud throughout
    assert np.all(ours[:, int(round(12 * np.log2(440 / C1_HZ)))] > -40)


@pytest.mark.parametrize("n_bins", [95, 96])
def test_cqt_settings_refuse_exactly_what_librosa_refuses_above_nyquist(n_bins):
    """At 16 kHz with C1 and 12 per octave, 95 bins fit under Nyquist and 96 do not."""
    try:
        _librosa_log_cqt(_signal(SR), hop_length=256, fmin=C1_HZ, n_bins=n_bins)
        librosa_ok = True
    except librosa.util.exceptions.ParameterError:
        librosa_ok = False
    try:
        feature_settings("c", {"kind": "cqt", "n_bins": n_bins, "hop_length": 256})
        ours_ok = True
    except ConfigError as exc:
        assert "features.c.n_bins" in str(exc) and "Nyquist" in str(exc)
        ours_ok = False
    assert ours_ok == librosa_ok == (n_bins == 95)


# ---------------------------------------------------------------------------
# gammatone

def _gm_erb_rate(f):                 # Glasberg & Moore (1990), written out again
    return 21.4 * np.log10(4.37 * np.asarray(f) / 1000.0 + 1.0)


def test_erb_scale_glasberg_moore():
    assert erb_bandwidth(1000.0) == pytest.approx(24.7 * 5.37)           # 132.6 Hz
    assert hz_to_erb_rate(1000.0) == pytest.approx(21.4 * np.log10(5.37))  # 15.6 ERBs
    f = np.array([20.0, 50.0, 440.0, 1000.0, 7999.0])
    np.testing.assert_allclose(hz_to_erb_rate(f), _gm_erb_rate(f))
    np.testing.assert_allclose(erb_rate_to_hz(hz_to_erb_rate(f)), f)


@pytest.mark.parametrize("n_bands, fmin, fmax", [(64, 50.0, 7500.0), (32, 100.0, 4000.0), (128, 20.0, 10000.0)])
def test_gammatone_centres_are_erb_spaced(n_bands, fmin, fmax):
    c = gammatone_centres(n_bands, fmin, fmax)
    assert len(c) == n_bands and np.all(np.diff(c) > 0)
    assert c[0] == pytest.approx(fmin) and c[-1] == pytest.approx(fmax)
    step = (_gm_erb_rate(fmax) - _gm_erb_rate(fmin)) / (n_bands - 1)
    np.testing.assert_allclose(np.diff(_gm_erb_rate(c)), step, rtol=1e-9)
    # at both ends: the next centre is `step` ERB-rate units on, inverting G&M's formula by hand
    inverse = lambda e: (10 ** (e / 21.4) - 1) * 1000 / 4.37
    assert c[1] == pytest.approx(inverse(_gm_erb_rate(fmin) + step))
    assert c[-2] == pytest.approx(inverse(_gm_erb_rate(fmax) - step))
    # so neighbours are the same number of bandwidths apart at both ends: with ERB(f) = 24.7 (4.37 f / 1000 + 1),
    # (c[i+1] - c[i]) / ERB(c[i]) = (10^(step / 21.4) - 1) / (24.7 * 4.37 / 1000), about `step`
    # (one ERB-rate unit is about one ERB)
    per_erb = (10 ** (step / 21.4) - 1) / (24.7 * 4.37 / 1000)
    for lo in (0, n_bands - 2):
        assert (c[lo + 1] - c[lo]) / (24.7 * (4.37 * c[lo] / 1000 + 1)) == pytest.approx(per_erb, rel=1e-9)
    assert per_erb == pytest.approx(step, rel=0.05)


def _tone(f, n=SR // 2, amp=1.0):
    return (amp * np.sin(2 * np.pi * f * np.arange(n) / SR)).astype(np.float32)


@pytest.mark.parametrize("f", [60.0, 100.0, 440.0, 1000.0, 2500.0, 6000.0, 7400.0])
def test_gammatone_tone_peaks_in_the_nearest_band(f):
    spec = gammatone_spectrogram(_tone(f), SR, n_bands=32, fmin=50.0, fmax=7500.0)
    centres = gammatone_centres(32, 50.0, 7500.0)
    assert int(np.argmax(spec[4:-4].mean(axis=0))) == int(np.argmin(np.abs(centres - f)))


def test_gammatone_gain_is_one_at_every_centre():
    """A unit sine at a band's centre reads 10 log10(1/2) = -3.01 dB there, the lowest band included
    (scipy's 8th-degree (b, a) in direct form reads +0.4 dB too much at 50 Hz)."""
    centres = gammatone_centres(16, 50.0, 7500.0)
    for k in (0, 1, 5, 10, 15):
        spec = gammatone_spectrogram(_tone(centres[k], n=SR // 2), SR, n_bands=16, fmin=50.0, fmax=7500.0)
        assert spec[10:-6, k].mean() == pytest.approx(10 * np.log10(0.5), abs=0.02)


def _hand_frames_power(x, win, hop):
    fr = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
    return 10 * np.log10(np.maximum(np.mean(fr.astype(np.float64) ** 2, axis=1), 1e-10))


def test_gammatone_band_equals_a_hand_computation_with_scipy():
    """One band by hand: scipy's own gammatone (b, a), lfilter over the centred clip, mean power per frame."""
    y = _signal(6000, seed=3)
    win, hop, n_bands = 1024, 256, 32
    ours = gammatone_spectrogram(y, SR, win_length=win, hop_length=hop, n_bands=n_bands, fmin=50.0, fmax=7500.0)
    assert ours.shape == (1 + len(y) // hop, n_bands) and ours.dtype == np.float32
    k = int(np.argmin(np.abs(gammatone_centres(n_bands, 50.0, 7500.0) - 1000.0)))
    b, a = scipy.signal.gammatone(gammatone_centres(n_bands, 50.0, 7500.0)[k], "iir", fs=SR)
    padded = np.pad(y.astype(np.float64), win // 2, mode="reflect")
    ref = _hand_frames_power(scipy.signal.lfilter(b, a, padded), win, hop)
    np.testing.assert_allclose(ours[:, k], ref, atol=1e-3)


@pytest.mark.parametrize("n, win, hop", [(5000, 1024, 256), (3001, 999, 100), (4000, 100, 256), (300, 688, 96)])
def test_gammatone_every_band_equals_sosfilt(n, win, hop):
    """The all-bands loop against scipy's sosfilt band by band, odd frames and hops, frames shorter than
    the hop, and a clip shorter than a frame (repeated to win // 2 + 1 samples first)."""
    y = _signal(n, seed=n)
    ours = gammatone_spectrogram(y, SR, win_length=win, hop_length=hop, n_bands=12, fmin=80.0, fmax=6000.0)
    padded = np.pad(repeat_to_length(y, win // 2 + 1).astype(np.float64), win // 2, mode="reflect")
    ref = np.stack([_hand_frames_power(scipy.signal.sosfilt(sos, padded), win, hop)
                    for sos in gammatone_sos(SR, 12, 80.0, 6000.0)], axis=1)
    assert ours.shape == ref.shape == (1 + (len(padded) - win) // hop, 12)
    if win % 2 == 0 and n > win // 2:
        assert ours.shape[0] == 1 + n // hop
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert np.all(np.isfinite(ours))


# ---------------------------------------------------------------------------
# both through the settings and the cache

CQT_DEFAULTS = {"kind": "cqt", "sr": 16000, "hop_length": 256, "n_bins": 84, "bins_per_octave": 12,
                "fmin": C1_HZ, "dtype": "float16"}
GT_DEFAULTS = {"kind": "gammatone", "sr": 16000, "win_length": 1024, "hop_length": 256, "n_bands": 64,
               "fmin": 50.0, "fmax": 7500.0, "dtype": "float16"}
AUDIO = {"trim_top_db": 60, "silence_peak": 1.0e-4}


@pytest.mark.parametrize("kind, defaults", [("cqt", CQT_DEFAULTS), ("gammatone", GT_DEFAULTS)])
def test_new_kinds_fill_defaults_and_compute(tmp_path, kind, defaults):
    assert feature_settings(kind, {"kind": kind}) == defaults
    assert feature_settings(kind, {}) == defaults                          # the name is the kind
    store = FeatureStore(WorkDir(tmp_path), kind, {"kind": kind}, AUDIO)
    assert store.spec == defaults and store.sr == 16000 and store.dtype == "float16"
    out = compute_feature(kind, _signal(SR), store.sr, store.compute_params())
    width = defaults.get("n_bins") or defaults.get("n_bands")
    assert out.shape == (1 + SR // 256, width) and out.dtype == np.float32


@pytest.mark.parametrize("kind, param, value", [
    ("cqt", "sr", 22050), ("cqt", "hop_length", 512), ("cqt", "n_bins", 72), ("cqt", "bins_per_octave", 24),
    ("cqt", "fmin", 55.0), ("cqt", "dtype", "float32"),
    ("gammatone", "sr", 22050), ("gammatone", "win_length", 688), ("gammatone", "hop_length", 96),
    ("gammatone", "n_bands", 128), ("gammatone", "fmin", 20.0), ("gammatone", "fmax", 7000.0),
    ("gammatone", "dtype", "float32")])
def test_new_kinds_key_changes_with_every_parameter(tmp_path, kind, param, value):
    work = WorkDir(tmp_path)
    base = FeatureStore(work, kind, {"kind": kind}, AUDIO)
    assert FeatureStore(work, kind, {"kind": kind, param: base.spec[param]}, AUDIO).key == base.key
    changed = FeatureStore(work, kind, {"kind": kind, param: value}, AUDIO)
    assert changed.key != base.key and changed.root != base.root


@pytest.mark.parametrize("spec, key, words", [
    ({"kind": "cqt", "hop_length": 250}, "hop_length", "not a multiple of 2^6 = 64"),
    ({"kind": "cqt", "hop_length": 96, "n_bins": 96, "bins_per_octave": 12, "fmin": 20.0}, "hop_length", "2^7"),
    ({"kind": "cqt", "n_bins": 96}, "n_bins", "Nyquist"),
    ({"kind": "cqt", "n_fft": 1024}, "n_fft", "unknown setting"),
    ({"kind": "gammatone", "fmax": 8000.0}, "fmax", "Nyquist"),
    ({"kind": "gammatone", "fmin": 8000.0, "sr": 22050}, "fmin", "not below fmax"),
    ({"kind": "gammatone", "n_band": 32}, "n_band", "did you mean n_bands"),
])
def test_new_kinds_refuse_bad_settings_with_the_key(tmp_path, spec, key, words):
    with pytest.raises(ConfigError, match=f"features.f.{key}") as info:
        FeatureStore(WorkDir(tmp_path), "f", spec, AUDIO)
    assert words in str(info.value)


def test_cqt_hop_of_the_right_multiple_is_accepted():
    assert feature_settings("c", {"kind": "cqt", "hop_length": 64})["hop_length"] == 64     # 2^6, 7 octaves
    assert feature_settings("c", {"kind": "cqt", "hop_length": 160, "n_bins": 48})["hop_length"] == 160  # 2^3 | 160
