r"""Fréchet and kernel physics distances (FPD, KPD) on feature vectors.

Definitions as used by the CaloChallenge evaluation (Kansal et al., arXiv:2211.10295):
every feature is divided by the largest absolute value it takes in the *real*
sample; FPD is the Fréchet distance between Gaussian fits, computed on random
batches at ten sizes spaced regularly in 1/N, and extrapolated linearly to N → ∞;
KPD is the unbiased squared MMD with the polynomial kernel ``(x·y/d + 1)^4`` on
batches, reported as the median with half the 16–84 % inter-quantile range.
"""

from __future__ import annotations

__all__ = ["fpd", "frechet_distance", "kpd", "mmd_poly_unbiased"]

import warnings

import numpy as np


def _sqrtm_psd_product(a: np.ndarray, b: np.ndarray) -> float:
    """trace(sqrtm(a @ b)) for symmetric positive semi-definite a, b (via eigenvalues, no scipy)."""
    wa, va = np.linalg.eigh(a)
    sa = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T  # sqrt(a)
    m = sa @ b @ sa  # similar to a @ b, symmetric PSD
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2)."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_psd_product(s1, s2))


def _normalise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = np.asarray(real, dtype=np.float64)
    gen = np.asarray(gen, dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        msg = f"real and gen must be (N, d) with the same d, got {real.shape} and {gen.shape}"
        raise ValueError(msg)
    if len(real) < 2 or len(gen) < 2:
        msg = f"need at least 2 samples in each set, got {len(real)} and {len(gen)}"
        raise ValueError(msg)
    scale = np.max(np.abs(real), axis=0)
    scale[scale == 0] = 1.0
    return real / scale, gen / scale


def fpd(real: np.ndarray, gen: np.ndarray, *, min_samples: int = 10_000, max_samples: int = 50_000,
        num_batches: int = 20, num_points: int = 10, seed: int = 42) -> tuple[float, float]:
    """Fréchet physics distance, extrapolated to infinite sample size: ``(value, error)``.

    Batch sizes are capped at the smaller sample size (with a warning when that is
    below ``min_samples``).
    """
    real, gen = _normalise(real, gen)
    n_max = min(len(real), len(gen))
    max_samples = min(max_samples, n_max)
    if min_samples >= max_samples:
        warnings.warn(f"FPD: only {n_max} samples for min_samples={min_samples}; using batch sizes "
                      f"{max(2, max_samples // 5)}–{max_samples}", RuntimeWarning, stacklevel=2)
        min_samples = max(2, max_samples // 5)
    rng = np.random.default_rng(seed)
    inv = np.linspace(1 / min_samples, 1 / max_samples, num_points)
    sizes = np.unique((1 / inv).astype(int))
    vals = []
    for n in sizes:
        v = []
        for _ in range(num_batches):
            r = real[rng.choice(len(real), n, replace=False)]
            g = gen[rng.choice(len(gen), n, replace=False)]
            v.append(frechet_distance(r.mean(0), np.cov(r, rowvar=False), g.mean(0), np.cov(g, rowvar=False)))
        vals.append(np.mean(v))
    x = 1 / sizes
    y = np.asarray(vals)
    if len(x) < 2:
        return float(y[0]), float("nan")
    a = np.vstack([x, np.ones_like(x)]).T
    coef, res, *_ = np.linalg.lstsq(a, y, rcond=None)
    dof = max(len(x) - 2, 1)
    resid = y - a @ coef
    cov = np.linalg.inv(a.T @ a) * (resid @ resid) / dof
    return float(coef[1]), float(np.sqrt(cov[1, 1]))


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, *, degree: int = 4) -> float:
    """Unbiased squared MMD between samples ``x``, ``y`` with kernel ``(a·b/d + 1)^degree``."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** degree
    kyy = (y @ y.T / d + 1) ** degree
    kxy = (x @ y.T / d + 1) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kpd(real: np.ndarray, gen: np.ndarray, *, num_batches: int = 10, batch_size: int = 10_000,
        degree: int = 4, seed: int = 42) -> tuple[float, float]:
    """Kernel physics distance: median over batches of the unbiased MMD², and half the 16–84 % range."""
    real, gen = _normalise(real, gen)
    n_max = min(len(real), len(gen))
    if n_max < 2 * batch_size:
        # batches must differ for the spread to mean anything: at most half of the smaller sample each
        warnings.warn(f"KPD: only {n_max} samples for batch_size={batch_size}; using batches of {max(2, n_max // 2)}",
                      RuntimeWarning, stacklevel=2)
        batch_size = max(2, min(batch_size, n_max // 2))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_batches):
        r = real[rng.choice(len(real), batch_size, replace=False)]
        g = gen[rng.choice(len(gen), batch_size, replace=False)]
        vals.append(mmd_poly_unbiased(r, g, degree=degree))
    vals = np.asarray(vals)
    lo, hi = np.percentile(vals, [16, 84])
    return float(np.median(vals)), float((hi - lo) / 2)
