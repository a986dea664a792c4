from __future__ import annotations

import numpy as np
import pytest

from calopc.eval import fpd, frechet_distance, kpd
from calopc.eval.distances import _bounded_linear_fit, mmd_poly_unbiased

scipy = pytest.importorskip("scipy")


def test_frechet_distance_analytic():
    d = 5
    m = np.arange(d, dtype=float)
    # N(0, I) vs N(m, 4I): |m|² + d·(1 + 4 − 2·2)
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(m @ m + d)
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(np.ones(2), a, np.ones(2), a) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- the official (jetnet) estimator
def _hand_fpd(real, gen, min_samples, max_samples, num_batches, num_points, seed):
    """The official recipe written out step by step (scipy's sqrtm, closed-form fit)."""
    from scipy import linalg

    scale = np.abs(real).max(0)
    x, y = real / scale, gen / scale
    sizes = (1 / np.linspace(1 / min_samples, 1 / max_samples, num_points)).astype("int32")
    rng = np.random.default_rng(seed)
    means = []
    for n in sizes:
        vals = []
        for _ in range(num_batches):
            a = x[rng.choice(len(x), size=n)]  # with replacement: n may exceed the sample
            b = y[rng.choice(len(y), size=n)]
            s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
            dm = a.mean(0) - b.mean(0)
            vals.append(dm @ dm + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
        means.append(np.mean(vals))
    inv = 1 / sizes
    design = np.vstack([np.ones_like(inv), inv]).T
    coef, *_ = np.linalg.lstsq(design, np.asarray(means), rcond=None)
    assert coef.min() > 0, "test data must give an unconstrained fit inside the bounds"
    resid = means - design @ coef
    cov = np.linalg.inv(design.T @ design) * (resid @ resid) / (len(inv) - 2)
    return coef[0], np.sqrt(cov[0, 0])


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, (400, 6)), rng.normal(0.1, 1.2, (300, 6))


def test_fpd_official_equals_hand_computation_with_bootstrap():
    real, gen = _data()
    # batches of 200-1000 from samples of 400 and 300: drawn with replacement (bootstrap)
    v, e = fpd(real, gen, min_samples=200, max_samples=1000, num_batches=5, num_points=5, seed=7)
    hv, he = _hand_fpd(real, gen, 200, 1000, 5, 5, 7)
    assert v == pytest.approx(hv, rel=1e-6)
    assert e == pytest.approx(he, rel=1e-5)


def test_fpd_kpd_official_reproduce_jetnet_numbers():
    # jetnet 0.2.5 (jetnet.evaluation.fpd / kpd, default single-thread path) on exactly these inputs
    real, gen = _data()
    v, e = fpd(real, gen, min_samples=200, max_samples=1000, num_batches=5, num_points=5, seed=7)
    assert (v, e) == pytest.approx((0.036710997291331475, 0.006112814020729201), rel=1e-6)
    v, e = kpd(real, gen, num_batches=7, batch_size=500, seed=3)
    assert (v, e) == pytest.approx((0.011487208376510516, 0.0038935668488990754), rel=1e-6)


def test_bounded_fit_clips_negative_intercept_and_slope():
    x = np.array([1e-4, 2e-4, 3e-4, 4e-4])
    a, e = _bounded_linear_fit(x, 1.0 + 500 * x)  # inside the bounds: exact line
    assert a == pytest.approx(1.0, rel=1e-6) and e == pytest.approx(0.0, abs=1e-6)
    a, _ = _bounded_linear_fit(x, -0.05 + 500 * x)  # unconstrained intercept < 0 → 0
    assert a == pytest.approx(0.0, abs=1e-9)
    a, _ = _bounded_linear_fit(x, 2.0 - 100 * x)  # negative slope → flat line at the mean
    assert a == pytest.approx(np.mean(2.0 - 100 * x), rel=1e-6)


def test_kpd_official_batches_reseeded_and_quantiles():
    real, gen = _data()
    scale = np.abs(real).max(0)
    x, y = real / scale, gen / scale
    vals = []
    for i in range(7):
        rng = np.random.default_rng(3 + 1000 * i)  # every batch has its own seed
        vals.append(mmd_poly_unbiased(x[rng.choice(len(x), size=500)], y[rng.choice(len(y), size=500)]))
    lo, hi = np.percentile(vals, [16.275, 83.725])
    v, e = kpd(real, gen, num_batches=7, batch_size=500, seed=3)
    assert v == pytest.approx(np.median(vals), rel=1e-12)
    assert e == pytest.approx((hi - lo) / 2, rel=1e-12)
    # reseeding: the first batches do not depend on how many follow
    v3, _ = kpd(real, gen, num_batches=3, batch_size=500, seed=3)
    assert v3 == pytest.approx(np.median(vals[:3]), rel=1e-12)


def test_official_is_default_and_estimators_validated():
    real, gen = _data()
    kw = {"min_samples": 100, "max_samples": 300, "num_batches": 2, "num_points": 3}
    assert fpd(real, gen, **kw) == fpd(real, gen, estimator="official", **kw)
    with pytest.raises(ValueError, match="estimator must be one of official, calopc"):
        fpd(real, gen, estimator="jetnet")
    with pytest.raises(ValueError, match="NaN or inf"):
        kpd(np.full((10, 2), np.nan), gen[:, :2])


# ---------------------------------------------------------------- the previous (calopc) estimator
def test_calopc_fpd_recovers_mean_shift_and_agrees_with_official_on_large_samples():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (20000, 3))
    real[0] = [8, 8, 8]  # fixes the normalisation scale (max |real| = 8 in every column)
    gen = rng.normal(0, 1, (20000, 3)) + [0.8, 0.0, 0.0]
    kw = {"min_samples": 2000, "max_samples": 10000, "num_batches": 5, "seed": 1}
    v, _ = fpd(real, gen, estimator="calopc", **kw)
    assert v == pytest.approx((0.8 / 8) ** 2, rel=0.15)
    vo, _ = fpd(real, gen, estimator="official", **kw)
    assert vo == pytest.approx(v, rel=0.1)
    same, _ = fpd(real, rng.normal(0, 1, (20000, 3)), estimator="calopc", min_samples=2000, max_samples=10000,
                  num_batches=5)
    assert abs(same) < 0.1 * v


def test_bootstrap_official_value_is_the_fd_of_the_two_finite_samples():
    # same distribution, 300 vs 300, batches of 1000-3000: the official estimator resamples the two finite
    # samples, so N → ∞ gives the Fréchet distance of their own Gaussian fits (finite-sample noise), while
    # the calopc estimator extrapolates batches within them towards the population value 0
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (300, 8))
    scale = np.abs(a).max(0)
    x, y = a / scale, b / scale
    empirical = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    off, _ = fpd(a, b, min_samples=1000, max_samples=3000, num_batches=5)
    assert off == pytest.approx(empirical, rel=0.1)
    with pytest.warns(RuntimeWarning, match="FPD: only 300"):
        cal, _ = fpd(a, b, estimator="calopc", min_samples=1000, max_samples=3000, num_batches=5)
    assert cal < 0.5 * off


def test_kpd_linear_kernel_and_identical_samples():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (4000, 4))
    y = rng.normal(0, 1, (4000, 4)) + 0.5
    # degree 1: E k = (μx·μy)/d + 1, so the unbiased MMD² estimates |μx − μy|²/d = 0.25
    assert mmd_poly_unbiased(x, y, degree=1) == pytest.approx(0.25, abs=0.03)
    for est in ("official", "calopc"):
        v_same, _ = kpd(x, rng.normal(0, 1, (4000, 4)), batch_size=1000, num_batches=5, estimator=est)
        v_diff, err = kpd(x, y, batch_size=1000, num_batches=5, estimator=est)
        assert abs(v_same) < 0.05 * v_diff and v_diff > 0 and err >= 0


def test_distance_input_errors():
    with pytest.raises(ValueError, match="same d"):
        fpd(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        kpd(np.zeros((1, 2)), np.zeros((10, 2)))


def test_calopc_small_samples_still_extrapolate_and_spread():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (600, 3)), rng.normal(0, 1, (600, 3))
    with pytest.warns(RuntimeWarning, match="FPD: only 600"):
        v, e = fpd(a, b, estimator="calopc", min_samples=10_000)
    assert np.isfinite(e) and abs(v) < 0.01
    with pytest.warns(RuntimeWarning, match="KPD: only 600"):
        _, err = kpd(a, b, estimator="calopc", batch_size=10_000)
    assert err > 0


def test_resampled_moments_and_mmd_equal_the_direct_computation():
    """Draws with replacement larger than the sample are computed from weighted rows: same numbers."""
    from calopc.eval.distances import _mmd_poly_resampled, _resampled_moments, mmd_poly_unbiased

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.3
    ix, iy = rng.choice(40, size=300), rng.choice(30, size=250)
    mean, cov = _resampled_moments(x, ix)
    np.testing.assert_allclose(mean, x[ix].mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x[ix], rowvar=False), rtol=1e-10, atol=1e-13)
    assert _mmd_poly_resampled(x, ix, y, iy, 4) == pytest.approx(mmd_poly_unbiased(x[ix], y[iy], degree=4), rel=1e-10)
