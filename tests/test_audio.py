"""Decoding (any bit depth, any rate, stereo) and the shared preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pipeline.audio import AudioError, peak_normalize, preprocess, read_audio, repeat_to_length, trim_silence

SR = 16000


def _ramp(n=1000):
    # distinct values in (-0.5, 0.5): exact in every format below after quantisation tolerance
    return (np.linspace(-0.5, 0.5, n, endpoint=False)).astype(np.float32)


@pytest.mark.parametrize("subtype, tol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                          ("FLOAT", 0.0), ("PCM_32", 1e-8)])
def test_read_bit_depths(tmp_path, subtype, tol):
    y = _ramp()
    path = tmp_path / f"x_{subtype}.wav"
    sf.write(str(path), y, SR, subtype=subtype)
    out, sr = read_audio(path)
    assert sr == SR
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) == len(y)
    np.testing.assert_allclose(out, y, atol=tol + 1e-7)


def test_read_stereo_is_channel_mean(tmp_path):
    left = _ramp()
    right = np.full_like(left, 0.25)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    out, _ = read_audio(path)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


def test_read_multichannel_flac(tmp_path):
    y = np.stack([_ramp(), -_ramp(), 0.5 * _ramp()], axis=1)
    path = tmp_path / "three.flac"
    sf.write(str(path), y, 22050, subtype="PCM_16")
    out, sr = read_audio(path)
    assert sr == 22050
    np.testing.assert_allclose(out, y.mean(axis=1), atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 12345])
def test_read_odd_rates(tmp_path, rate):
    path = tmp_path / f"r{rate}.wav"
    sf.write(str(path), _ramp(rate // 10), rate, subtype="PCM_16")
    out, sr = read_audio(path)
    assert sr == rate and len(out) == rate // 10


def test_unreadable_garbage(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00this is not a wave file at all" * 3)
    with pytest.raises(AudioError) as info:
        read_audio(path)
    assert info.value.reason == "unreadable"
    assert str(path) in str(info.value) and "unreadable" in str(info.value)
    assert info.value.path == str(path)


def test_unreadable_missing_file(tmp_path):
    with pytest.raises(AudioError) as info:
        read_audio(tmp_path / "nope.wav")
    assert info.value.reason == "unreadable"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioError) as info:
        read_audio(path)
    assert info.value.reason == "empty"
    assert str(path) in str(info.value) and "empty" in str(info.value)


def test_non_finite_samples_rejected(tmp_path):
    y = _ramp()
    y[10] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(str(path), y, SR, subtype="FLOAT")
    with pytest.raises(AudioError) as info:
        read_audio(path)
    assert info.value.reason == "unreadable"


# -- preprocessing -----------------------------------------------------------

def _tone(n, sr=SR, freq=440.0, amp=0.3):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


@pytest.mark.parametrize("sr, target", [(44100, 16000), (8000, 16000), (16000, 8000), (22050, 16000), (16000, 16000)])
def test_preprocess_resampling_length(sr, target):
    y = _tone(sr, sr=sr)                   # exactly 1 s
    out = preprocess(y, sr, target, trim_top_db=None)
    assert out.dtype == np.float32
    assert abs(len(out) - target) <= 1
    assert np.max(np.abs(out)) == pytest.approx(1.0)


def test_preprocess_silence_rejected():
    with pytest.raises(AudioError) as info:
        preprocess(np.zeros(SR, dtype=np.float32), SR, SR, path="clip.wav")
    assert info.value.reason == "silent" and "clip.wav" in str(info.value)
    with pytest.raises(AudioError):
        preprocess(np.full(SR, 5e-5, dtype=np.float32), SR, SR)      # below the -80 dBFS default
    out = preprocess(np.full(SR, 5e-5, dtype=np.float32), SR, SR, silence_peak=1e-5, trim_top_db=None)
    assert np.allclose(out, 1.0)


def test_trim_removes_leading_and_trailing_silence_keeps_body():
    body = _tone(8000)
    y = np.concatenate([np.zeros(4096, np.float32), body, np.zeros(6000, np.float32)])
    out = preprocess(y, SR, SR, trim_top_db=60)
    # frames are 512 long: at most one frame of the silence can stay at each end
    assert 8000 <= len(out) <= 8000 + 2 * 512
    np.testing.assert_allclose(np.max(np.abs(out)), 1.0, rtol=1e-6)
    # the leading silence is exactly 8 frames, so the body starts the output;
    # it is all there, scaled by the peak normalisation, and only zeros follow
    scaled = body / np.max(np.abs(body))
    np.testing.assert_allclose(out[:8000], scaled, atol=1e-5)
    assert not np.any(out[8000:])


def test_trim_keeps_quiet_but_audible_parts():
    loud = _tone(4096, amp=0.5)
    quiet = _tone(4096, amp=0.5 * 10 ** (-40 / 20))   # 40 dB down: inside 60 dB, kept
    y = np.concatenate([np.zeros(2048, np.float32), quiet, loud, np.zeros(2048, np.float32)])
    out = trim_silence(y, 60.0)
    assert len(out) == 8192
    out2 = trim_silence(y, 30.0)                       # 40 dB down is below a 30 dB threshold
    assert len(out2) == 4096


def test_trim_disabled_and_short_input():
    y = np.concatenate([np.zeros(3000, np.float32), _tone(3000)])
    assert len(preprocess(y, SR, SR, trim_top_db=None)) == 6000
    short = _tone(300)
    assert len(trim_silence(short, 60.0)) == 300


def test_peak_normalize():
    y = np.array([0.1, -0.4, 0.2], np.float32)
    np.testing.assert_allclose(peak_normalize(y), [0.25, -1.0, 0.5])
    np.testing.assert_array_equal(peak_normalize(np.zeros(3)), np.zeros(3))


def test_preprocess_peak_is_one():
    rng = np.random.default_rng(0)
    y = (0.01 * rng.standard_normal(SR)).astype(np.float32)
    out = preprocess(y, SR, SR)
    assert np.max(np.abs(out)) == pytest.approx(1.0, abs=1e-6)


# -- repeat_to_length ------------------------------------------------------------

def test_repeat_to_length_repeats_not_pads():
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(repeat_to_length(x, 8), [1, 2, 3, 1, 2, 3, 1, 2])
    assert not np.any(repeat_to_length(x, 100) == 0)


def test_repeat_to_length_long_input_unchanged():
    x = np.arange(10.0)
    assert repeat_to_length(x, 10) is x
    assert repeat_to_length(x, 4) is x


def test_repeat_to_length_axis_and_2d():
    x = np.arange(6).reshape(3, 2)
    out = repeat_to_length(x, 5, axis=0)
    np.testing.assert_array_equal(out, [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]])
    out1 = repeat_to_length(x, 3, axis=1)
    np.testing.assert_array_equal(out1, [[0, 1, 0], [2, 3, 2], [4, 5, 4]])
    with pytest.raises(ValueError):
        repeat_to_length(np.zeros((0, 2)), 4)
