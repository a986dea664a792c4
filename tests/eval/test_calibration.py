"""The calibrated "differs / no difference found" readouts of evaluate.

A perfect generator must read "differs" at the stated rate (5 %) on same-distribution pairs, and a known
distortion (×1.05 energy scale, an all-zero generator) must read "differs". The rate checks draw many pairs from
a fixed pool of features (independent draws from one distribution), so they are cheap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from calopc.eval.distances import TEST_LEVEL, calibrated_tests, frechet_distance, mmd_poly_unbiased
from calopc.eval.evaluate import auc_test
from calopc.eval.features import apply_threshold, compute_features, high_level_vector
from calopc.geometry import Geometry
from calopc.synth import generate


def _showers(name: str, n: int, seed: int, scale: float = 1.0):
    g = Geometry.calochallenge(name)
    inc, sh = generate(g, n, seed=seed)
    sh = apply_threshold(np.asarray(sh, dtype=np.float64) * scale, g.threshold)
    return compute_features(sh, np.asarray(inc, dtype=np.float64), g)


def _features(name: str, n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return high_level_vector(_showers(name, n, seed, scale))


def test_statistics_are_the_plain_distances_of_the_samples():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (60, 5)), rng.gamma(2.0, 1.0, (45, 5))
    t = calibrated_tests(x, y, permutations=9, seed=1)
    # FPD: each feature over the median, over the 10 labellings, of the largest |value| among the reference rows
    from calopc.eval.permutation import draw_permutations

    pool = np.concatenate([x, y])
    labels = draw_permutations(60, 45, 9, seed=1).labels > 0
    s = np.median([np.abs(pool[labels[:, j]]).max(0) for j in range(10)], axis=0)
    assert (s >= 0.1 * np.abs(pool).max(0)).all()  # no feature at the floor here
    a, b = x / s, y / s
    fd = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert t["fpd"]["observed"] == pytest.approx(fd, rel=1e-9) and t["fpd"]["scale_floored_features"] == 0
    s = np.abs(np.concatenate([x, y])).max(0)  # KPD: both samples (one kernel for every labelling)
    a, b = x / s, y / s
    assert t["kpd"]["observed"] == pytest.approx(mmd_poly_unbiased(a, b), rel=1e-9, abs=1e-12)
    assert (t["fpd"]["n_real"], t["fpd"]["n_gen"], t["kpd"]["permutations"]) == (60, 45, 9)
    # p: the share of the 10 labellings (observed included) with a statistic at least as large
    assert t["fpd"]["p_value"] in {k / 10 for k in range(1, 11)}
    assert t["fpd"]["compatible"] == (t["fpd"]["p_value"] > TEST_LEVEL)
    with pytest.raises(ValueError, match="permutations"):
        calibrated_tests(x, y, permutations=0)


def test_kernel_of_every_labelling_equals_direct_mmd():
    """The one-pass kernel (K @ labels for all permutations at once) gives each labelling's own MMD²."""
    from calopc.eval import distances

    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (30, 4)), rng.normal(0.2, 1, (20, 4))
    pool = np.concatenate([x, y])
    pool = pool / np.abs(pool).max(0)
    z = np.zeros((50, 3))
    z[:30, 0] = 1
    z[rng.permutation(50)[:30], 1] = 1
    z[rng.permutation(50)[:30], 2] = 1
    kz, diag = distances._kernel_times(pool, z, 4, block=7)  # blocks that do not divide the pool
    full = (pool @ pool.T / 4 + 1) ** 4
    np.testing.assert_allclose(kz, full @ z, rtol=1e-12)
    np.testing.assert_allclose(diag, np.diag(full), rtol=1e-12)


def test_subsample_beyond_max_showers():
    rng = np.random.default_rng(0)
    t = calibrated_tests(rng.normal(size=(300, 3)), rng.normal(size=(80, 3)), permutations=5, max_showers=100)
    assert (t["fpd"]["n_real"], t["fpd"]["n_gen"]) == (100, 80)


@pytest.mark.parametrize("n", [100, 300])
def test_same_distribution_pairs_read_no_difference_at_the_stated_rate_ds1(n):
    """ds1-photons features: 200 independent pairs from one distribution; the readout must say "no difference
    found" in 95 % of them (binomial spread ±1.5 %); a value-within-two-errors-of-zero rule reads almost every such
    pair as different."""
    pool = _features("1-photons", 3000, seed=11)
    rng = np.random.default_rng(n)
    ok = {"fpd": 0, "kpd": 0}
    pairs = 200
    for i in range(pairs):
        a = pool[rng.integers(0, len(pool), n)]
        b = pool[rng.integers(0, len(pool), n)]
        for k, v in calibrated_tests(a, b, permutations=19, seed=i).items():
            ok[k] += v["compatible"]
    for k, v in ok.items():
        rate = v / pairs
        assert 0.90 <= rate <= 0.99, (k, rate)


def test_auc_readout_is_calibrated_on_chance_scores():
    """A perfect generator's classifier scores are independent of the validation labels."""
    from scipy.stats import rankdata

    def roc_auc_score(y, score):  # Mann-Whitney AUC, ties counted 1/2 (as sklearn)
        r = rankdata(score)
        n1 = int(y.sum())
        return (r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1))

    rng = np.random.default_rng(0)
    n = 40
    y = np.r_[np.zeros(n), np.ones(n)]
    ok = sum(auc_test(float(roc_auc_score(y, rng.random(2 * n))), n)["compatible"] for _ in range(1000))
    assert 0.93 <= ok / 1000 <= 0.975
    # isotonic calibration gives tied scores: still at least the stated rate
    ok = sum(auc_test(float(roc_auc_score(y, rng.integers(0, 4, 2 * n))), n)["compatible"] for _ in range(1000))
    assert ok / 1000 >= 0.93
    t = auc_test(0.7, 200)
    assert t["compatible"] is False and t["p_value"] < 1e-6 and t["null_sd"] == pytest.approx(
        math.sqrt(401 / (12 * 200**2)))
    assert auc_test(float("nan"), 10)["compatible"] is None


def test_ds2_same_generator_no_difference_and_energy_scale_flagged():
    """Two synthetic samples of one generator (seeds 2 and 3, 1k vs 1k, dataset 2): no readout finds a difference;
    ×1.05 energies: the E_dep/E_inc separation test finds it. (FPD and KPD on the official feature vector barely
    move: their energy features are log10 E over three decades of E_inc, where 5 % is 0.02.)"""
    from calopc.eval.histograms import separation_tests, shower_histogram_specs

    g = Geometry.calochallenge("2")
    ref, gen, scaled = _showers("2", 1000, 2), _showers("2", 1000, 3), _showers("2", 1000, 3, scale=1.05)
    same = calibrated_tests(high_level_vector(ref), high_level_vector(gen), permutations=19)
    assert same["fpd"]["compatible"] and same["kpd"]["compatible"]
    assert abs(same["fpd"]["excess"]) < 3 * same["fpd"]["null_sd"]
    st = separation_tests(shower_histogram_specs(ref, gen, g, threshold=g.threshold), permutations=19)
    assert st["E_ratio"]["compatible"] and st["mean"]["compatible"]
    off = separation_tests(shower_histogram_specs(ref, scaled, g, threshold=g.threshold), permutations=19)
    assert not off["E_ratio"]["compatible"]
    assert off["E_ratio"]["observed"] > off["E_ratio"]["null_mean"] + 5 * off["E_ratio"]["null_sd"]


def test_separation_tests_refill_the_official_histograms_and_flag_the_energy_scale():
    from calopc.eval.histograms import feature_histograms, separation_tests, shower_histogram_specs

    g = Geometry.calochallenge("1-photons")

    def feats(seed, scale=1.0):
        inc, sh = generate(g, 600, seed=seed)
        return compute_features(apply_threshold(np.asarray(sh, dtype=np.float64) * scale, g.threshold),
                                np.asarray(inc, dtype=np.float64), g)

    ref, gen, scaled = feats(1), feats(2), feats(2, 1.05)
    st = separation_tests(shower_histogram_specs(ref, gen, g, threshold=g.threshold), permutations=19)
    direct = {h.name: h.separation for h in feature_histograms(ref, gen, g, threshold=g.threshold)}
    for name, t in st["per_histogram"].items():  # the official S beside the tested one where the binning differs
        assert t.get("official", t["observed"]) == pytest.approx(direct[name], abs=1e-12)
        assert (t.get("binning") == "pooled") == name.startswith("E_layer_")
    assert st["E_ratio"]["compatible"] and st["mean"]["compatible"]
    assert st["E_ratio"]["null_mean"] > 0.01  # 600 showers in 100 bins: a perfect generator is not at 0
    off = separation_tests(shower_histogram_specs(ref, scaled, g, threshold=g.threshold), permutations=19)
    assert not off["E_ratio"]["compatible"]
    assert off["E_ratio"]["observed"] > off["E_ratio"]["null_mean"] + 5 * off["E_ratio"]["null_sd"]


def test_all_zero_sample_separates_fully():
    """An all-zero generator: the histograms without any entry in range give S = 1, not NaN."""
    from calopc.eval.histograms import feature_histograms, separation_power, voxel_spectrum

    assert separation_power([3, 4], [0, 0], 7, 5) == 1.0
    assert separation_power([0, 0], [3, 4], 5, 7) == 1.0
    assert math.isnan(separation_power([3, 4], [0, 0]))  # no showers behind the empty one: nothing to compare
    assert math.isnan(separation_power([0, 0], [0, 0], 3, 3))
    g = Geometry.calochallenge("2")
    inc, sh = generate(g, 50, seed=1)
    inc = np.asarray(inc, dtype=np.float64)
    ref = compute_features(apply_threshold(np.asarray(sh, dtype=np.float64), g.threshold), inc, g)
    zero = compute_features(np.zeros((50, g.n_voxels)), inc, g)
    sep = {h.name: h.separation for h in feature_histograms(ref, zero, g, threshold=g.threshold)}
    assert sep["E_ratio"] == 1.0 and sep["E_layer_10"] == 1.0
    sh = np.asarray(sh, dtype=np.float64)
    assert voxel_spectrum(sh[sh > g.threshold], np.zeros(0), g.threshold, n_ref=50, n_gen=50).separation == 1.0


def test_separation_tests_subsample_large_samples():
    from calopc.eval.histograms import separation_tests

    rng = np.random.default_rng(0)
    edges = np.linspace(-3, 3, 21)
    specs = [("a", "", edges, rng.normal(size=500), rng.normal(size=300), False)]
    st = separation_tests(specs, permutations=19, max_showers=200)
    assert (st["n_ref"], st["n_gen"]) == (200, 200) and st["per_histogram"]["a"]["permutations"] == 19
    full = separation_tests(specs, permutations=19)
    assert (full["n_ref"], full["n_gen"]) == (500, 300)


def test_separation_statistic_is_a_function_of_the_pool_and_the_labels():
    """A shuffled labelling's statistic equals the observed statistic of the two samples split that way, for every
    histogram (E_layer's official range ends at the reference maximum, which a relabelling moves): the condition
    for the permutation test to be exact."""
    from calopc.eval.features import Features
    from calopc.eval.histograms import separation_statistic, shower_histogram_specs
    from calopc.eval.permutation import draw_permutations

    g = Geometry.calochallenge("1-photons")
    ref, gen = _showers("1-photons", 80, 1), _showers("1-photons", 80, 2)
    pool = Features.concatenate([ref, gen])
    specs = shower_histogram_specs(ref, gen, g, threshold=g.threshold)
    perm = draw_permutations(80, 80, 12, seed=5)
    stats = {s.name: separation_statistic(s, perm) for s in specs}
    observed_only = draw_permutations(80, 80, 1, seed=0)
    moved = 0
    for j in range(1, 13):
        lab = perm.labels[:, j] > 0
        split = shower_histogram_specs(pool.select(np.flatnonzero(lab)), pool.select(np.flatnonzero(~lab)), g,
                                       threshold=g.threshold)
        for s in split:
            assert separation_statistic(s, observed_only)[0] == pytest.approx(stats[s.name][j], rel=1e-9, abs=1e-15), (
                s.name, j)
        moved += any(pool.e_layer[lab, l].max() < pool.e_layer[:, l].max() for l in range(g.n_layers))
    assert moved  # some relabellings move a reference maximum: the case a reference-only range gets wrong


def _toy_layers(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """``k`` layer energies per shower for ``n`` showers (MeV): log-normal, a fifth of the layers empty."""
    x = rng.lognormal(0.0, 1.5, (k, n))
    x[rng.random((k, n)) < 0.2] = 0.0
    return x


def test_separation_tests_reject_a_perfect_generator_at_the_level():
    """Pairs of samples of one distribution, E_layer-like histograms with the official range rule: the 5 % tests
    reject in 5 % of the pairs, within 3 binomial standard deviations (19 shuffles: exact for tie-free statistics)."""
    from calopc.eval.histograms import HistSpec, _log_edges_to_max, separation_tests

    rule = _log_edges_to_max(0.01)
    rng = np.random.default_rng(0)
    pairs, k, n = 600, 6, 50
    mean_rejected = hist_rejected = 0
    for i in range(pairs):
        r, g = _toy_layers(rng, k, n), _toy_layers(rng, k, n)
        specs = [HistSpec(f"E_layer_{j}", "", rule(r[j]), r[j], g[j], True, rule) for j in range(k)]
        st = separation_tests(specs, permutations=19, seed=i)
        assert all(t["binning"] == "pooled" for t in st["per_histogram"].values())
        mean_rejected += st["mean"]["p_value"] <= 0.05
        hist_rejected += sum(t["p_value"] <= 0.05 for t in st["per_histogram"].values())
    for rejected, tests in ((mean_rejected, pairs), (hist_rejected, pairs * k)):
        assert abs(rejected / tests - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / tests), (rejected, tests)


@pytest.mark.parametrize(("n_ref", "n_gen"), [(22, 50), (50, 50), (100, 100), (300, 300)])
def test_all_zero_generator_differs_at_every_size(n_ref, n_gen):
    """An all-zero generator against dataset-2 showers: FPD and KPD tests both find the difference, and the FPD
    null stays bounded (a shuffle whose reference rows barely take a feature does not blow the statistic up)."""
    g = Geometry.calochallenge("2")
    ref = _features("2", n_ref, 22)
    inc, _ = generate(g, n_gen, seed=5)
    zero = high_level_vector(compute_features(np.zeros((n_gen, g.n_voxels)), np.asarray(inc, dtype=np.float64), g))
    t = calibrated_tests(ref, zero, permutations=19, seed=1)
    for k in ("fpd", "kpd"):
        assert t[k]["p_value"] == 0.05 and not t[k]["compatible"], (k, t[k])
    d = ref.shape[1]
    assert t["fpd"]["null_mean"] + t["fpd"]["null_sd"] < 1e3 * d  # every scaled feature within ±10
