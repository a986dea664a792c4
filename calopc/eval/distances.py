r"""Fréchet and kernel physics distances (FPD, KPD) on feature vectors.

Definitions of Kansal et al. (arXiv:2211.10295), as used by the CaloChallenge evaluation
through the ``jetnet`` package. Two estimators are offered (``estimator=``):

``"official"`` (default, the published numbers)
    Every feature is divided by the largest absolute value it takes in the *real* sample.
    FPD: for ``num_points`` batch sizes spaced regularly in 1/N between ``min_samples`` and
    ``max_samples``, ``num_batches`` batches are drawn **with replacement** from each sample
    (so a sample smaller than a batch is bootstrapped) with one ``numpy.random.default_rng(seed)``
    stream; the mean Fréchet distance per size is fitted linearly in 1/N with intercept and slope
    bounded at ≥ 0 (``scipy.optimize.curve_fit``), and the intercept (N → ∞) and its fit error are
    reported. KPD: batch ``i`` is drawn with replacement from a generator seeded ``seed + 1000 i``;
    the unbiased squared MMD with the kernel ``(x·y/d + 1)^4`` is computed per batch and the median
    and half the 16.275–83.725 % inter-quantile range are reported. Defaults equal jetnet's
    (``min_samples=20_000, max_samples=50_000, num_batches=20, num_points=10``; KPD
    ``num_batches=10, batch_size=5_000``, seed 42); the CaloChallenge evaluation passes
    ``min_samples=10_000`` and ``batch_size=10_000``. Same inputs and seed give jetnet's numbers.

``"calopc"``
    Batches drawn **without** replacement; batch sizes capped at the smaller sample (with a warning
    below ``min_samples``), KPD batches at most half the smaller sample, all from one generator;
    unbounded least-squares fit; 16/84 % quantiles. Its small-sample values measure the samples
    themselves rather than bootstrap copies, so they are much smaller than the official ones and
    not comparable with published tables.

Neither estimator's error says whether two samples differ: at finite N the official value carries a
bias (a perfect generator does not score 0) and its error is the spread of its own resampling.
:func:`calibrated_tests` answers that question with permutation tests that read "differs" for at most
5 % of perfect-generator samples at any sample size, and otherwise "no difference found" (the readout
of ``calopc evaluate``).
"""

from __future__ import annotations

__all__ = ["ESTIMATORS", "calibrated_tests", "fpd", "frechet_distance", "kpd", "mmd_poly_unbiased"]

import warnings

import numpy as np

from .permutation import LEVEL, MAX_SHOWERS, PERMUTATIONS, draw_permutations, summarize

#: FPD/KPD estimators: ``"official"`` (jetnet, CaloChallenge) and ``"calopc"`` (without replacement)
ESTIMATORS = ("official", "calopc")


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
    bad = [name for name, x in (("real", real), ("gen", gen)) if not np.isfinite(x).all()]
    if bad:
        msg = f"FPD/KPD features of the {' and '.join(bad)} sample contain NaN or inf"
        raise ValueError(msg)
    scale = np.max(np.abs(real), axis=0)
    scale[scale == 0] = 1.0
    return real / scale, gen / scale


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        msg = f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        raise ValueError(msg)


def _batch_sizes(min_samples: int, max_samples: int, num_points: int) -> np.ndarray:
    """Batch sizes at regular intervals in 1/N (truncated to int32, as jetnet does)."""
    if min_samples < 2 or max_samples < 2 or num_points < 1:
        msg = f"need min_samples, max_samples >= 2 and num_points >= 1, got {min_samples}, {max_samples}, {num_points}"
        raise ValueError(msg)
    return (1 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype("int32")


def _linear(x: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    return intercept + slope * x


def fpd(real: np.ndarray, gen: np.ndarray, *, estimator: str = "official", min_samples: int = 20_000,
        max_samples: int = 50_000, num_batches: int = 20, num_points: int = 10, seed: int = 42) -> tuple[float, float]:
    """Fréchet physics distance extrapolated to infinite sample size: ``(value, error)``.

    Args:
        real, gen: feature matrices ``(N, d)`` and ``(M, d)``; features are scaled by the largest
            absolute value of each column of ``real``.
        estimator: ``"official"`` (with replacement, bounded fit; jetnet) or ``"calopc"`` (see module doc).
        min_samples, max_samples, num_batches, num_points, seed: as jetnet's ``fpd``.
    """
    _check_estimator(estimator)
    real, gen = _normalise(real, gen)
    if estimator == "calopc":
        return _fpd_calopc(real, gen, min_samples=min_samples, max_samples=max_samples, num_batches=num_batches,
                           num_points=num_points, seed=seed)
    sizes = _batch_sizes(min_samples, max_samples, num_points)
    rng = np.random.default_rng(seed)
    vals = []
    for n in sizes:
        v = []
        for _ in range(num_batches):
            mr, cr = _resampled_moments(real, rng.choice(len(real), size=n))
            mg, cg = _resampled_moments(gen, rng.choice(len(gen), size=n))
            v.append(frechet_distance(mr, cr, mg, cg))
        vals.append(np.mean(v))
    return _bounded_linear_fit(1 / sizes, np.asarray(vals))


def _resampled_moments(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``ddof=1``) of the rows ``x[idx]`` (``idx`` with repeats).

    When the draw is larger than the sample (the usual case: batches of 10k–50k drawn with
    replacement from a few thousand showers), the moments are computed from the sample with
    each row weighted by how often it was drawn: the same numbers as ``np.cov(x[idx])`` up to
    rounding, at the cost of ``len(x)`` rows instead of ``len(idx)``.
    """
    if len(idx) <= len(x):
        r = x[idx]
        return r.mean(0), np.cov(r, rowvar=False)
    w = np.bincount(idx, minlength=len(x)).astype(np.float64)
    n = w.sum()
    mean = w @ x / n
    xc = x - mean
    cov = (xc * w[:, None]).T @ xc / (n - 1)
    return mean, cov


def _bounded_linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and its error of ``y = a + b x`` fitted with ``a, b >= 0`` (scipy's ``curve_fit``, as jetnet)."""
    from scipy.optimize import curve_fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "covariance could not be estimated" for exact fits
        params, cov = curve_fit(_linear, x, y, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(cov)[0]))


def _fpd_calopc(real: np.ndarray, gen: np.ndarray, *, min_samples: int, max_samples: int, num_batches: int,
                num_points: int, seed: int) -> tuple[float, float]:
    n_max = min(len(real), len(gen))
    max_samples = min(max_samples, n_max)
    if min_samples >= max_samples:
        warnings.warn(f"FPD: only {n_max} samples for min_samples={min_samples}; using batch sizes "
                      f"{max(2, max_samples // 5)}–{max_samples}", RuntimeWarning, stacklevel=3)
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
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    dof = max(len(x) - 2, 1)
    resid = y - a @ coef
    cov = np.linalg.inv(a.T @ a) * (resid @ resid) / dof
    return float(coef[1]), float(np.sqrt(cov[1, 1]))


def _kernel_sum(x: np.ndarray, y: np.ndarray, gamma: float, degree: int, block: int = 2048,
                wx: np.ndarray | None = None, wy: np.ndarray | None = None) -> float:
    """Σ_ij wx_i wy_j (x_i·y_j γ + 1)^degree (weights 1 when not given), in row blocks (no N×M
    matrix; integer power by multiplication)."""
    total = 0.0
    for i in range(0, len(x), block):
        t = x[i:i + block] @ y.T
        t *= gamma
        t += 1.0
        p = t.copy() if degree % 2 else np.ones_like(t)
        e = degree >> 1
        while e:  # square-and-multiply
            t *= t
            if e & 1:
                p *= t
            e >>= 1
        if wy is not None:
            p = p @ wy
        total += float(p.sum() if wx is None else wx[i:i + block] @ p)
    return total


def _mmd_poly_resampled(x: np.ndarray, ix: np.ndarray, y: np.ndarray, iy: np.ndarray, degree: int) -> float:
    """:func:`mmd_poly_unbiased` of ``x[ix]`` and ``y[iy]`` (draws with repeats), from the samples
    themselves with each row weighted by how often it was drawn: the same number up to rounding,
    at the cost of the sample sizes rather than the draw sizes."""
    gamma = 1.0 / x.shape[1]
    m, n = len(ix), len(iy)
    wx = np.bincount(ix, minlength=len(x)).astype(np.float64)
    wy = np.bincount(iy, minlength=len(y)).astype(np.float64)
    dx = (np.einsum("ij,ij->i", x, x) * gamma + 1.0) ** degree
    dy = (np.einsum("ij,ij->i", y, y) * gamma + 1.0) ** degree
    kxx = _kernel_sum(x, x, gamma, degree, wx=wx, wy=wx) - float(wx @ dx)
    kyy = _kernel_sum(y, y, gamma, degree, wx=wy, wy=wy) - float(wy @ dy)
    kxy = _kernel_sum(x, y, gamma, degree, wx=wx, wy=wy)
    return float(kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n))


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, *, degree: int = 4) -> float:
    """Unbiased squared MMD between samples ``x``, ``y`` with kernel ``(a·b/d + 1)^degree``.

    Shapes:
        x: ``(m, d)``, y: ``(n, d)``; computed in row blocks, memory ``O(2048 × max(m, n))``.
    """
    gamma = 1.0 / x.shape[1]
    m, n = len(x), len(y)
    kxx = _kernel_sum(x, x, gamma, degree) - float(((np.einsum("ij,ij->i", x, x) * gamma + 1.0) ** degree).sum())
    kyy = _kernel_sum(y, y, gamma, degree) - float(((np.einsum("ij,ij->i", y, y) * gamma + 1.0) ** degree).sum())
    kxy = _kernel_sum(x, y, gamma, degree)
    return float(kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n))


def kpd(real: np.ndarray, gen: np.ndarray, *, estimator: str = "official", num_batches: int = 10,
        batch_size: int = 5_000, degree: int = 4, seed: int = 42) -> tuple[float, float]:
    """Kernel physics distance: median over batches of the unbiased MMD², and half the inter-quantile range.

    Args:
        real, gen: feature matrices ``(N, d)`` and ``(M, d)`` (scaled as in :func:`fpd`).
        estimator: ``"official"`` (batch ``i`` drawn with replacement with seed ``seed + 1000 i``,
            16.275–83.725 % range; jetnet) or ``"calopc"`` (without replacement, 16–84 %).
        num_batches, batch_size, degree, seed: as jetnet's ``kpd``.
    """
    _check_estimator(estimator)
    real, gen = _normalise(real, gen)
    if batch_size < 2:
        msg = f"KPD batch_size must be >= 2, got {batch_size}"
        raise ValueError(msg)
    vals = []
    if estimator == "official":
        for i in range(num_batches):
            rng = np.random.default_rng(seed + i * 1000)
            ir = rng.choice(len(real), size=batch_size)
            ig = rng.choice(len(gen), size=batch_size)
            if len(real) + len(gen) < 2 * batch_size:  # draws larger than the samples: weight the rows
                vals.append(_mmd_poly_resampled(real, ir, gen, ig, degree))
            else:
                vals.append(mmd_poly_unbiased(real[ir], gen[ig], degree=degree))
        lo, hi = np.percentile(vals, [16.275, 83.725])
        return float(np.median(vals)), float((hi - lo) / 2)
    n_max = min(len(real), len(gen))
    if n_max < 2 * batch_size:
        # batches must differ for the spread to mean anything: at most half of the smaller sample each
        warnings.warn(f"KPD: only {n_max} samples for batch_size={batch_size}; using batches of {max(2, n_max // 2)}",
                      RuntimeWarning, stacklevel=2)
        batch_size = max(2, min(batch_size, n_max // 2))
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        r = real[rng.choice(len(real), batch_size, replace=False)]
        g = gen[rng.choice(len(gen), batch_size, replace=False)]
        vals.append(mmd_poly_unbiased(r, g, degree=degree))
    lo, hi = np.percentile(vals, [16, 84])
    return float(np.median(vals)), float((hi - lo) / 2)


# ------------------------------------------------------------------------------ calibrated two-sample tests
#: largest number of showers per sample that the calibrated tests use (a random subset beyond it)
TEST_MAX_SHOWERS = MAX_SHOWERS
#: label permutations of the calibrated tests (with the observed labelling, 100 values: p in steps of 0.01)
TEST_PERMUTATIONS = PERMUTATIONS
#: level of the "differs / no difference found" readout: a perfect generator reads "differs" in 5 % of samples
TEST_LEVEL = LEVEL
#: smallest per-feature scale of the FPD test statistic, relative to the feature's largest |value| in both samples:
#: every scaled feature stays within ±10
FPD_SCALE_FLOOR = 0.1


def _frechet_fast(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """:func:`frechet_distance` through a Cholesky factor ``s1 = L Lᵀ`` (``Lᵀ s2 L`` has the eigenvalues of
    ``s1 s2``): one symmetric eigenvalue problem instead of two; falls back to it for singular ``s1``."""
    try:
        low = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:
        return frechet_distance(mu1, s1, mu2, s2)
    m = low.T @ s2 @ low
    w = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


def _group_moments(x: np.ndarray, z: np.ndarray, total: np.ndarray, total_sq: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and covariance (``ddof=1``) of the rows with ``z == 1`` and of the others, from one weighted product."""
    rows = x[z > 0]
    m = len(rows)
    n = len(x) - m
    s1 = rows.sum(0)
    q1 = rows.T @ rows
    s2, q2 = total - s1, total_sq - q1
    mu1, mu2 = s1 / m, s2 / n
    c1 = (q1 - m * np.outer(mu1, mu1)) / (m - 1)
    c2 = (q2 - n * np.outer(mu2, mu2)) / (n - 1)
    return mu1, c1, mu2, c2


def _kernel_times(pool: np.ndarray, labels: np.ndarray, degree: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``K @ labels`` and ``diag(K)`` of the kernel matrix ``K = (x·y/d + 1)^degree`` of ``pool``, row block by
    row block (memory ``block × len(pool)``, never the whole matrix)."""
    gamma = 1.0 / pool.shape[1]
    out = np.empty((len(pool), labels.shape[1]))
    for i in range(0, len(pool), block):
        t = pool[i:i + block] @ pool.T
        t *= gamma
        t += 1.0
        p = t.copy() if degree % 2 else np.ones_like(t)
        e = degree >> 1
        while e:
            t *= t
            if e & 1:
                p *= t
            e >>= 1
        out[i:i + block] = p @ labels
    diag = (np.einsum("ij,ij->i", pool, pool) * gamma + 1.0) ** degree
    return out, diag


def _fpd_test_scale(pool: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-feature scale of the FPD test: the median over all labellings of the reference rows' largest
    ``|value|``, at least :data:`FPD_SCALE_FLOOR`; and the number of features at that floor.

    ``pool`` is scaled to a largest ``|value|`` of 1 per feature; ``labels`` is ``(rows, P + 1)``.
    """
    absp = np.abs(pool)
    maxima = np.stack([absp[labels[:, j] > 0].max(0) for j in range(labels.shape[1])])
    med = np.median(maxima, axis=0)
    return np.maximum(med, FPD_SCALE_FLOOR), int(np.count_nonzero(med < FPD_SCALE_FLOOR))


def calibrated_tests(real: np.ndarray, gen: np.ndarray, *, metrics: tuple[str, ...] = ("fpd", "kpd"),
                     permutations: int = TEST_PERMUTATIONS, max_showers: int = TEST_MAX_SHOWERS, degree: int = 4,
                     seed: int = 0, progress=None) -> dict[str, dict]:
    r"""Permutation tests of "same distribution" for the FPD and KPD, calibrated at every sample size.

    The official FPD/KPD values are biased at finite sample size (with replacement, a sample of N
    showers drawn into batches of 10,000–50,000 keeps its own estimation noise in the value) and their
    errors describe the resampling, not the spread from one pair of samples to the next. These tests
    measure that spread directly: the two samples are pooled, the labels "reference"/"generated" are
    shuffled ``permutations`` times keeping both sample sizes, and the statistic is recomputed each time.
    A perfect generator is exchangeable with the reference, so its observed statistic is one more draw
    of that null distribution: ``p = (1 + #{null >= observed}) / (1 + permutations)`` is an exact p-value
    and "differs" (``p <= 0.05``) is read for 5 % of perfect-generator samples, at any N. The subsets,
    labellings, p-value and summary are those of :mod:`calopc.eval.permutation`; this function supplies
    the two statistics, vectorised over the labellings.

    Statistics:

    ``fpd``: the Fréchet distance between Gaussians with the two samples' means and covariances. The
    official estimator divides every feature by its largest absolute value in the reference; the test
    divides it by the value a reference of this size typically has: the median, over all ``P + 1``
    labellings, of the largest absolute value among the rows labelled reference (a symmetric function of
    the labellings, fixed for all of them, so the test stays exact), at least :data:`FPD_SCALE_FLOOR` of
    the largest absolute value in both samples. For samples smaller than the official batches the official
    value tends to the Fréchet distance of the sample moments, and for a perfect generator the two scales
    agree closely (dataset 2, 300 and 1,000 showers: observed statistic within 5 % of the reference-scaled
    distance, inside the null's spread), so ``null_mean`` is what a perfect generator scores on the official
    value too. Rescaling every labelling by its own reference maximum instead (as the official rule would)
    lets a labelling whose reference rows barely take a feature (widths of 1e-9 mm: rounding noise of
    single-cell layers) divide the other rows by that: shuffled values reached 1e15 and an all-zero
    generator against 22 showers read as no different. The floor catches features that fewer than half
    of the reference-size subsets take (``scale_floored_features`` counts them).
    ``kpd``: the unbiased squared MMD of the two samples with the kernel ``(x·y/d + 1)^degree``, features
    scaled by the largest absolute value in both samples together (fixed for all labellings, so the
    kernel is evaluated once). The official KPD of a small sample (with replacement) is biased upwards
    by repeated showers; this statistic is not.

    Samples larger than ``max_showers`` are tested on a random subset of that size (a valid test, with
    less power than the whole sample). The kernel is evaluated once for all permutations in row blocks.

    Returns ``{"fpd": {...}, "kpd": {...}}`` with ``observed``, ``null_mean``, ``null_sd``, ``excess``
    (observed − null mean: the distance beyond what sample size alone gives), ``z`` (that excess in units
    of ``null_sd``), ``p_value``, ``differs`` / ``compatible``, ``permutations``, ``n_ref`` (also as
    ``n_real``), ``n_gen``, ``level`` (see :func:`calopc.eval.permutation.summarize`).
    ``progress``: optional callable called with the stage name ("fpd test", "kpd test").
    """
    real = np.asarray(real, dtype=np.float64)
    gen = np.asarray(gen, dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        msg = f"real and gen must be (N, d) with the same d, got {real.shape} and {gen.shape}"
        raise ValueError(msg)
    perm = draw_permutations(len(real), len(gen), permutations, seed=seed, max_showers=max_showers)
    real, gen = perm.ref(real), perm.gen(gen)
    pool = np.concatenate([real, gen])
    if not np.isfinite(pool).all():
        msg = "FPD/KPD features contain NaN or inf"
        raise ValueError(msg)
    scale = np.abs(pool).max(0)
    scale[scale == 0] = 1.0
    pool /= scale
    m, n = len(real), len(gen)
    z = perm.labels  # column 0: the observed labelling (1 = reference)
    out: dict[str, dict] = {}
    if "fpd" in metrics:
        if progress:
            progress("fpd test")
        sc, floored = _fpd_test_scale(pool, z)
        scaled = pool / sc
        total, total_sq = scaled.sum(0), scaled.T @ scaled
        vals = np.empty(permutations + 1)
        for j in range(permutations + 1):
            vals[j] = _frechet_fast(*_group_moments(scaled, z[:, j], total, total_sq))
        out["fpd"] = summarize(vals[0], vals[1:], statistic="Fréchet distance of the samples' moments", n_real=m,
                               n_ref=m, n_gen=n, scale_floored_features=floored)
    if "kpd" in metrics:
        if progress:
            progress("kpd test")
        ones = np.ones((len(pool), 1))
        kz, diag = _kernel_times(pool, np.concatenate([z, ones], axis=1), degree)
        k1 = kz[:, -1]  # K @ 1
        kz = kz[:, :-1]
        zkz = np.einsum("ij,ij->j", z, kz)  # z^T K z for every labelling
        zk1 = z.T @ k1  # 1^T K z
        one_k_one = float(k1.sum())
        zd = z.T @ diag
        kxx = zkz - zd
        kyy = one_k_one - 2 * zk1 + zkz - (diag.sum() - zd)
        kxy = zk1 - zkz
        vals = kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n)
        out["kpd"] = summarize(vals[0], vals[1:], statistic="unbiased squared MMD of the samples", n_real=m, n_ref=m,
                               n_gen=n)
    return out
