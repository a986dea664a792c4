"""The shared permutation machinery: labellings, subsets, the p-value and its summary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from calopc.eval.permutation import TIE_RTOL, draw_permutations, p_value, summarize


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def test_p_value_equals_scipy_permutation_test_exact_and_random():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.4, 1, 5), rng.normal(0, 1, 4)
    # exact: every split of the 9 values into 5 + 4; the observed split is one of them
    pool = np.concatenate([x, y])
    obs = _mean_difference(x, y)
    null = []
    for idx in itertools.combinations(range(9), 5):
        sel = np.zeros(9, bool)
        sel[list(idx)] = True
        if idx != tuple(range(5)):
            null.append(_mean_difference(pool[sel], pool[~sel]))
    ref = stats.permutation_test((x, y), _mean_difference, permutation_type="independent", n_resamples=np.inf,
                                 alternative="greater", vectorized=True)
    assert len(null) + 1 == len(ref.null_distribution) == 126
    assert p_value(obs, np.array(null)) == pytest.approx(ref.pvalue, rel=1e-12)
    # random shuffles: scipy counts the observed labelling as we do
    ref = stats.permutation_test((x, y), _mean_difference, permutation_type="independent", n_resamples=99,
                                 alternative="greater", vectorized=True, rng=np.random.default_rng(1))
    assert p_value(obs, ref.null_distribution) == pytest.approx(ref.pvalue, rel=1e-12)
    assert summarize(obs, ref.null_distribution)["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_one_tie_rule_for_every_statistic():
    null = np.array([1.0, 2.0, 3.0 * (1 - TIE_RTOL / 2), 3.0 * (1 - 4 * TIE_RTOL)])
    assert p_value(3.0, null) == 2 / 5  # a value rounded just below the observed one counts as a tie
    neg = np.array([-5.0, -4.0, -3.0 * (1 + TIE_RTOL / 2), -3.0 * (1 + 4 * TIE_RTOL)])
    assert p_value(-3.0, neg) == 2 / 5  # negative statistics (an unbiased MMD²): the same relative rule
    assert p_value(0.0, np.zeros(9)) == 1.0  # identical samples: every shuffle ties
    assert p_value(5.0, null) == 1 / 5  # never 0


def test_summary_leaves_out_undefined_shuffles_and_reads_the_level():
    s = summarize(4.0, np.array([1.0, np.nan, 2.0, 3.0]), level=0.3, statistic="t")
    assert s["permutations"] == 3 and s["p_value"] == 0.25 and s["compatible"] is False
    assert (s["null_mean"], s["null_sd"], s["excess"], s["statistic"]) == (2.0, 1.0, 2.0, "t")


def test_labellings_keep_sizes_and_subsets_are_seeded():
    a = draw_permutations(7, 5, 30, seed=3)
    assert a.labels.shape == (12, 31) and (a.labels.sum(0) == 7).all() and (a.labels[:7, 0] == 1).all()
    assert (a.n_ref, a.n_gen, a.permutations, a.take_ref, a.take_gen) == (7, 5, 30, None, None)
    assert len({tuple(c) for c in a.labels.T}) > 25  # shuffles differ
    b = draw_permutations(50, 8, 5, seed=3, max_showers=10)
    assert (b.n_ref, b.n_gen) == (10, 8) and len(np.unique(b.take_ref)) == 10 and b.take_gen is None
    x = np.arange(50)
    assert b.ref(x).tolist() == sorted(b.take_ref.tolist()) and b.gen(x) is x
    np.testing.assert_array_equal(draw_permutations(50, 8, 5, seed=3, max_showers=10).labels, b.labels)
    with pytest.raises(ValueError, match="at least 2 samples"):
        draw_permutations(1, 5, 9)
    with pytest.raises(ValueError, match="permutations must be >= 1"):
        draw_permutations(5, 5, 0)
