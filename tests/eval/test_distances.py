from __future__ import annotations

import numpy as np
import pytest

from calopc.eval import fpd, frechet_distance, kpd
from calopc.eval.distances import mmd_poly_unbiased


def test_frechet_distance_analytic():
    d = 5
    m = np.arange(d, dtype=float)
    # N(0, I) vs N(m, 4I): |m|² + d·(1 + 4 − 2·2)
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(m @ m + d)
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(np.ones(2), a, np.ones(2), a) == pytest.approx(0.0, abs=1e-9)


def test_fpd_recovers_mean_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (20000, 3))
    real[0] = [8, 8, 8]  # fixes the normalisation scale (max |real| = 8 in every column)
    gen = rng.normal(0, 1, (20000, 3)) + [0.8, 0.0, 0.0]
    v, e = fpd(real, gen, min_samples=2000, max_samples=10000, num_batches=5, seed=1)
    assert v == pytest.approx((0.8 / 8) ** 2, rel=0.15)
    same, _ = fpd(real, rng.normal(0, 1, (20000, 3)), min_samples=2000, max_samples=10000, num_batches=5)
    assert abs(same) < 0.1 * v


def test_kpd_linear_kernel_and_identical_samples():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (4000, 4))
    y = rng.normal(0, 1, (4000, 4)) + 0.5
    # degree 1: E k = (μx·μy)/d + 1, so the unbiased MMD² estimates |μx − μy|²/d = 0.25
    assert mmd_poly_unbiased(x, y, degree=1) == pytest.approx(0.25, abs=0.03)
    v_same, _ = kpd(x, rng.normal(0, 1, (4000, 4)), batch_size=2000, num_batches=5)
    v_diff, err = kpd(x, y, batch_size=2000, num_batches=5)
    assert abs(v_same) < 0.05 * v_diff and v_diff > 0 and err >= 0


def test_distance_input_errors():
    with pytest.raises(ValueError, match="same d"):
        fpd(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        kpd(np.zeros((1, 2)), np.zeros((10, 2)))


def test_small_samples_still_extrapolate_and_spread():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (600, 3)), rng.normal(0, 1, (600, 3))
    with pytest.warns(RuntimeWarning, match="FPD: only 600"):
        v, e = fpd(a, b, min_samples=10_000)
    assert np.isfinite(e) and abs(v) < 0.01
    with pytest.warns(RuntimeWarning, match="KPD: only 600"):
        _, err = kpd(a, b, batch_size=10_000)
    assert err > 0
