"""Targets, mixup, SpecAugment, class weights and windowing (hand-computed)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.augment import balanced_sample_weights, mixup, smoothed_targets, spec_augment
from pipeline.windows import random_window, sliding_windows, window_starts


# -- label smoothing --------------------------------------------------------------

def test_smoothed_targets_scalar_eps():
    t = smoothed_targets(np.array([2, 0]), 4, 0.3)
    np.testing.assert_allclose(t[0], [0.075, 0.075, 0.775, 0.075], atol=1e-7)
    np.testing.assert_allclose(t[1], [0.775, 0.075, 0.075, 0.075], atol=1e-7)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    assert t.dtype == np.float32


def test_smoothed_targets_per_row_eps():
    t = smoothed_targets(np.array([1, 1, 3]), 4, np.array([0.0, 0.3, 0.05]))
    np.testing.assert_allclose(t[0], [0, 1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(t[1], [0.075, 0.775, 0.075, 0.075], atol=1e-7)
    np.testing.assert_allclose(t[2], [0.0125, 0.0125, 0.0125, 0.9625], atol=1e-7)


# -- mixup ---------------------------------------------------------------------

def test_mixup_matches_drawn_lambda_and_partner():
    rng_x = np.random.default_rng(0)
    x = rng_x.standard_normal((6, 5, 3)).astype(np.float32)
    y = smoothed_targets(np.array([0, 1, 2, 3, 0, 1]), 4, 0.0)
    verified = np.array([1, 0, 1, 1, 0, 1], dtype=np.float32)
    xm, ym, vm = mixup(x, y, 0.4, np.random.default_rng(42), verified)
    # replay the same draws
    rng = np.random.default_rng(42)
    lam = rng.beta(0.4, 0.4, size=6).astype(np.float32)
    partner = rng.permutation(6)
    for i in range(6):
        j = partner[i]
        np.testing.assert_allclose(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[j], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ym[i], lam[i] * y[i] + (1 - lam[i]) * y[j], rtol=1e-5, atol=1e-6)
        assert vm[i] == min(verified[i], verified[j])
    assert xm.shape == x.shape and xm.dtype == x.dtype
    np.testing.assert_allclose(ym.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(xm, x)


def test_mixup_rows_are_convex_combinations():
    x = np.eye(4, dtype=np.float32) * 10            # each row identifies itself
    y = np.eye(4, dtype=np.float32)
    xm, ym, _ = mixup(x, y, 1.0, np.random.default_rng(3))
    for i in range(4):
        w = ym[i]
        assert np.all(w >= -1e-7) and w.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.count_nonzero(w > 1e-7) <= 2
        np.testing.assert_allclose(xm[i], 10 * w, atol=1e-5)   # x mixed with the same weights as y
        assert w[i] > 0 or np.count_nonzero(w > 1e-7) == 1


def test_mixup_disabled():
    x, y = np.ones((3, 2)), np.eye(3)
    extra = np.array([1, 0, 1])
    for alpha in (0, 0.0, None):
        xo, yo, eo = mixup(x, y, alpha, np.random.default_rng(0), extra)
        assert xo is x and yo is y and eo is extra
    xo, yo, _ = mixup(x[:1], y[:1], 1.0, np.random.default_rng(0))
    assert xo.shape == (1, 2)


def test_mixup_verified_min():
    x = np.zeros((2, 3), np.float32)
    y = np.eye(2, dtype=np.float32)
    # with two rows the partner permutation is either identity or a swap
    for seed in range(10):
        _, _, v = mixup(x, y, 1.0, np.random.default_rng(seed), np.array([1.0, 0.0]))
        rng = np.random.default_rng(seed)
        rng.beta(1.0, 1.0, size=2)
        swapped = rng.permutation(2)[0] == 1
        np.testing.assert_array_equal(v, [0.0, 0.0] if swapped else [1.0, 0.0])


# -- SpecAugment -----------------------------------------------------------------------

def test_spec_augment_zeroes_stripes_only():
    x = np.random.default_rng(0).uniform(1.0, 2.0, (8, 30, 20, 3)).astype(np.float32)   # no zeros anywhere
    out = spec_augment(x, np.random.default_rng(1), time_masks=2, time_width=5, freq_masks=1, freq_width=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out is not x and np.all(x >= 1.0)                  # input untouched
    changed = out != x
    assert np.all(out[changed] == 0.0)                        # only zeroing
    z = (out == 0)
    assert np.array_equal(z.all(axis=3), z.any(axis=3))        # all channels together
    z = z.all(axis=3)                                          # (B, T, F)
    assert z.any()
    for b in range(len(x)):
        rows = z[b].all(axis=1)                               # zeroed time steps
        cols = z[b].all(axis=0)                               # zeroed frequency bins
        # every zero lies in a whole time stripe or a whole frequency stripe
        np.testing.assert_array_equal(z[b], rows[:, None] | cols[None, :])
        if not cols.all():
            assert rows.sum() <= 2 * 5
        if not rows.all():
            assert cols.sum() <= 4
        if cols.any() and not rows.all():
            idx = np.flatnonzero(cols)
            assert idx[-1] - idx[0] + 1 == len(idx)           # one frequency mask: contiguous


def test_spec_augment_2d_and_value():
    x = np.ones((2, 10, 6), np.float32)
    out = spec_augment(x, np.random.default_rng(5), time_masks=1, time_width=10, freq_masks=0, value=-1.0)
    assert set(np.unique(out)) <= {1.0, -1.0}
    assert spec_augment(x, np.random.default_rng(0), time_masks=0, freq_masks=0).tolist() == x.tolist()


# -- class weights -------------------------------------------------------------------

def test_balanced_sample_weights():
    w = balanced_sample_weights(np.array([0, 0, 0, 1]), 2)
    np.testing.assert_allclose(w, [4 / 6, 4 / 6, 4 / 6, 2.0], rtol=1e-6)
    w3 = balanced_sample_weights(np.array([0, 1, 1, 1, 1, 2]), 3)
    np.testing.assert_allclose(w3, [2.0, 0.5, 0.5, 0.5, 0.5, 2.0], rtol=1e-6)
    # an absent class does not divide by zero; every class carries total weight n/K
    w4 = balanced_sample_weights(np.array([0, 0, 1]), 4)
    np.testing.assert_allclose(w4, [3 / 8, 3 / 8, 3 / 4], rtol=1e-6)


# -- windows --------------------------------------------------------------------------

def test_random_window_length_and_range():
    arr = np.arange(100)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        w = random_window(arr, 10, rng)
        assert w.shape == (10,)
        np.testing.assert_array_equal(w, np.arange(w[0], w[0] + 10))
        starts.add(int(w[0]))
    assert min(starts) == 0 and max(starts) == 90       # every offset reachable, never past the end


def test_random_window_repeats_short_clips():
    arr = np.arange(1, 4).reshape(3, 1)
    w = random_window(arr, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(w[:, 0], [1, 2, 3, 1, 2, 3, 1, 2])
    same = np.arange(5)
    np.testing.assert_array_equal(random_window(same, 5, np.random.default_rng(0)), same)


def test_window_starts_cover_the_end():
    np.testing.assert_array_equal(window_starts(10, 4, 2), [0, 2, 4, 6])
    np.testing.assert_array_equal(window_starts(11, 4, 3), [0, 3, 6, 7])   # last aligned to the end
    np.testing.assert_array_equal(window_starts(4, 4, 2), [0])
    np.testing.assert_array_equal(window_starts(3, 4, 2), [0])
    np.testing.assert_array_equal(window_starts(10, 4, 0), [0, 1, 2, 3, 4, 5, 6])   # hop 0 -> 1
    for length in range(5, 40):
        s = window_starts(length, 5, 3)
        assert s[0] == 0 and s[-1] == length - 5 and np.all(np.diff(s) > 0)


def test_sliding_windows_shapes():
    arr = np.arange(22 * 3).reshape(22, 3)
    win = sliding_windows(arr, 8, 4)
    starts = window_starts(22, 8, 4)
    assert win.shape == (len(starts), 8, 3)
    for k, s in enumerate(starts):
        np.testing.assert_array_equal(win[k], arr[s:s + 8])
    short = sliding_windows(np.arange(3), 7, 2)
    assert short.shape == (1, 7)
    np.testing.assert_array_equal(short[0], [0, 1, 2, 0, 1, 2, 0])
    assert sliding_windows(np.zeros((8, 4, 2)), 8, 4).shape == (1, 8, 4, 2)
