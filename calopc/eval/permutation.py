r"""Two-sample permutation tests: the machinery that the FPD/KPD and separation-power tests share.

A test of "the generated showers come from the reference's distribution" for any statistic
``T(pool, labels)``: the two samples are pooled, the labels reference/generated are shuffled
``P`` times keeping both sample sizes, and ``T`` is recomputed for every labelling. When the
generator is perfect the pooled showers are exchangeable, so the observed labelling is one more
uniform draw among the labellings and its statistic one more draw of the null distribution.

This module holds everything but the statistic:

* :func:`draw_permutations`: the random subsets of samples larger than ``max_showers`` and the
  label matrix ``(n_ref + n_gen, P + 1)`` (column 0 the observed labelling, 1 = reference), for
  statistics that are vectorised over labellings;
* :func:`p_value`: ``p = (1 + #{null >= observed}) / (1 + P)`` with one tie rule;
* :func:`summarize`: the dict every test reports (observed, the null's mean and standard deviation,
  the excess in units of that spread, p, the verdict).

The p-value is the estimator of Phipson & Smyth (2010), "Permutation p-values should never be
zero", Stat. Appl. Genet. Mol. Biol. 9(1), art. 39: with random permutations, counting the
observed labelling among them gives a p-value whose rejection rate under the null is at most the
level, exactly the level when ``level · (P + 1)`` is an integer and the statistic has no ties
(``P = 99`` or ``19`` at 5 %). A test is valid for any statistic that is a fixed function of the
pooled showers and the labels; a statistic that also looked at which showers were *observed* as
reference (e.g. histogram edges taken from the observed reference alone) would not be.
"""

from __future__ import annotations

__all__ = ["LEVEL", "MAX_SHOWERS", "PERMUTATIONS", "SMALL_SAMPLE", "TIE_RTOL", "Permutations", "draw_permutations",
           "p_value", "reading", "small_sample_note", "summarize", "z_score"]

from dataclasses import dataclass

import numpy as np

#: label permutations per test (with the observed labelling, 100 values: p in steps of 0.01)
PERMUTATIONS = 99
#: largest number of showers per sample that a test uses (a random subset beyond it)
MAX_SHOWERS = 5_000
#: level of the readout: a perfect generator reads "no difference found" in 1 − LEVEL of its samples
LEVEL = 0.05
#: fewer showers per sample than this: the tests stay valid but find only gross differences
SMALL_SAMPLE = 100
#: shuffled statistics within this relative distance below the observed one count as ties ("at least as large");
#: the rule of ``scipy.stats.permutation_test`` (100 machine epsilons), so rounding never makes p smaller
TIE_RTOL = 100 * np.finfo(np.float64).eps


@dataclass(frozen=True)
class Permutations:
    """The random part of a permutation test: subsets and labellings.

    Attributes:
        labels: ``(n_ref + n_gen, P + 1)`` float64 of 0/1; row ``i`` is the ``i``-th pooled shower (the
            reference's first, then the generated ones), column 0 the observed labelling (1 = reference).
        take_ref, take_gen: sorted indices of the random subset of a sample larger than ``max_showers``,
            or None when the whole sample is used.
    """

    labels: np.ndarray
    take_ref: np.ndarray | None
    take_gen: np.ndarray | None

    @property
    def n_ref(self) -> int:
        """Reference showers in the test (after the subset)."""
        return int(self.labels[:, 0].sum())

    @property
    def n_gen(self) -> int:
        """Generated showers in the test (after the subset)."""
        return len(self.labels) - self.n_ref

    @property
    def permutations(self) -> int:
        """Shuffled labellings (columns 1 … P)."""
        return self.labels.shape[1] - 1

    def ref(self, x: np.ndarray) -> np.ndarray:
        """The rows of the reference sample ``x`` that the test uses."""
        return x if self.take_ref is None else x[self.take_ref]

    def gen(self, x: np.ndarray) -> np.ndarray:
        """The rows of the generated sample ``x`` that the test uses."""
        return x if self.take_gen is None else x[self.take_gen]


def draw_permutations(n_ref: int, n_gen: int, permutations: int = PERMUTATIONS, *, seed: int = 0,
                      max_showers: int = MAX_SHOWERS) -> Permutations:
    """Random subsets (samples beyond ``max_showers``) and ``permutations`` shuffles of the labels.

    The subsets are drawn independently per sample before pooling (a valid test with less power
    than the whole samples); every shuffle keeps both sample sizes. One
    ``numpy.random.default_rng(seed)`` stream: same arguments, same labellings.

    Raises:
        ValueError: fewer than 2 showers in a sample or fewer than 1 permutation.
    """
    if min(n_ref, n_gen) < 2:
        msg = f"need at least 2 samples in each set, got {n_ref} and {n_gen}"
        raise ValueError(msg)
    if permutations < 1:
        msg = f"permutations must be >= 1, got {permutations}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    take_r = np.sort(rng.choice(n_ref, max_showers, replace=False)) if n_ref > max_showers else None
    take_g = np.sort(rng.choice(n_gen, max_showers, replace=False)) if n_gen > max_showers else None
    m, n = min(n_ref, max_showers), min(n_gen, max_showers)
    z = np.zeros((m + n, permutations + 1))
    z[:m, 0] = 1.0
    for j in range(1, permutations + 1):
        z[rng.permutation(m + n)[:m], j] = 1.0
    return Permutations(z, take_r, take_g)


def p_value(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (1 + len(null))``: the permutation p-value (Phipson & Smyth 2010).

    Large statistics mean "different". Shuffled values below the observed one by at most
    :data:`TIE_RTOL` of its size count as ties, i.e. as at least as large (rounding in a
    vectorised statistic never lowers p). ``null`` must hold finite values only.
    """
    null = np.asarray(null, dtype=np.float64)
    gamma = abs(observed) * TIE_RTOL
    return float((1 + np.count_nonzero(null >= observed - gamma)) / (1 + len(null)))


def z_score(observed: float, mean: float, sd: float) -> float:
    """The excess ``(observed − mean) / sd`` in units of the null's spread (NaN without a spread)."""
    if not (np.isfinite(sd) and sd > 0 and np.isfinite(mean) and np.isfinite(observed)):
        return float("nan")
    return float((observed - mean) / sd)


def summarize(observed: float, null: np.ndarray, *, level: float = LEVEL, **info: object) -> dict:
    """The report of one permutation test, with ``info`` (e.g. ``n_ref``, ``n_gen``) as given.

    Keys: ``observed``; ``null_mean``, ``null_sd`` (the statistic over the shuffles: what samples of
    one distribution give at these sizes); ``excess`` (observed − null mean); ``z`` (the excess in
    units of ``null_sd``; NaN without a spread); ``p_value``; ``permutations`` (shuffles used);
    ``level``; ``differs`` (``p <= level``: a difference was found) and ``compatible`` (its negation,
    the older name of the same reading; kept for existing readers of metrics.json).

    Shuffles whose statistic is undefined (NaN, e.g. a histogram left without entries) are left out
    of ``null``: the observed labelling is still uniform among the labellings with a defined
    statistic, so the test stays valid.
    """
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    mean = float(null.mean()) if len(null) else float("nan")
    sd = float(null.std(ddof=1)) if len(null) > 1 else float("nan")
    p = p_value(observed, null)
    return {**info, "observed": float(observed), "null_mean": mean, "null_sd": sd, "excess": float(observed - mean),
            "z": z_score(observed, mean, sd), "p_value": p, "permutations": len(null), "level": level,
            "differs": bool(p <= level), "compatible": bool(p > level)}


def reading(t: dict, *, html: bool = False, unit: str | None = None) -> str:
    """The verdict of a test in words: ``differs (p <= 0.01; 1,000 vs 1,000 showers; excess +12.3 null sd)``
    or ``no difference found (p = 0.34; 1,000 vs 1,000 showers; excess -0.4 null sd)``.

    "No difference found" is a non-rejection: a perfect generator reads it in ``1 − level`` of its samples,
    and so does any generator whose difference these sample sizes cannot resolve. The sizes are
    generated vs reference (``n_gen``, ``n_ref`` or ``n_real``); the excess is :func:`z_score`. With
    ``permutations``, a p-value at its smallest possible value ``1/(P + 1)`` is written as a bound.
    ``html``: ``≤`` and ``−`` instead of ``<=`` and ``-``. ``unit``: what the sizes count (default
    "showers", "validation showers" for a classifier's test). ``"(not tested)"`` without a p-value.
    """
    p = t.get("p_value")
    if p is None or not np.isfinite(p):
        return "(not tested)"
    le, minus = ("≤", "−") if html else ("<=", "-")
    n_perm = t.get("permutations")
    ptxt = f"p {le} {1 / (n_perm + 1):.2g}" if n_perm and p <= 1 / (n_perm + 1) * (1 + TIE_RTOL) else f"p = {p:.2g}"
    parts = [ptxt]
    n_ref = t.get("n_ref", t.get("n_real"))
    if t.get("n_gen") is not None and n_ref is not None:
        unit = unit or ("validation showers" if "n_validation_per_class" in t else "showers")
        parts.append(f"{t['n_gen']:,} vs {n_ref:,} {unit}")
    z = t.get("z")
    if z is not None and np.isfinite(z):
        parts.append(f"excess {'+' if z >= 0 else minus}{abs(z):.1f} null sd")
    level = t.get("level", LEVEL)
    word = "differs" if p <= level else "no difference found"
    return f"{word} ({'; '.join(parts)})"


def small_sample_note(n_ref: int, n_gen: int, n_features: int | None = None) -> str | None:
    """One line when a sample has fewer than :data:`SMALL_SAMPLE` showers (else None).

    A permutation test is valid at any size, but with few showers it finds only gross differences, so
    "no difference found" says little. ``n_features``: the dimension of the FPD/KPD feature vector; with
    no more showers than features the FPD's covariance estimates are singular.
    """
    small = min(n_ref, n_gen)
    if small >= SMALL_SAMPLE:
        return None
    note = (f"the calibrated readouts compare {n_gen:,} generated with {n_ref:,} reference showers (fewer than "
            f"{SMALL_SAMPLE} in a sample): they find only large differences, so 'no difference found' says little")
    if n_features is not None and small <= n_features:
        note += f"; the FPD's {n_features}-feature covariances come from fewer showers than features"
    return note
