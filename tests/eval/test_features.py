from __future__ import annotations

import math

import numpy as np
import pytest

from calopc.eval import apply_threshold, compute_features, feature_histograms, high_level_vector, separation_power
from calopc.geometry import Geometry


def test_features_by_hand(toy_geometry):
    g = toy_geometry  # layers: 4α×2r (edges 0,1,3), 1α×3r (0,2,5,9), 4α×2r
    v = np.zeros((1, g.n_voxels))
    # layer 0: cell (α bin 0, r bin 1) = 3 MeV, cell (α bin 2, r bin 0) = 1 MeV
    v[0, g.flat_index(0, 0, 1)] = 3.0
    v[0, g.flat_index(0, 2, 0)] = 1.0
    # layer 1 (single α): r bins 0 and 2 with 2 and 2 MeV
    v[0, g.flat_index(1, 0, 0)] = 2.0
    v[0, g.flat_index(1, 0, 2)] = 2.0
    f = compute_features(v, np.array([10.0]), g)
    assert f.e_tot[0] == 8.0 and f.e_ratio[0] == 0.8
    assert list(f.e_layer[0]) == [4.0, 4.0, 0.0]
    # layer 0 by hand: r mid-points 2.0 and 0.5; α centres -3π/4 and π/4
    x = np.array([2.0 * math.cos(-3 * math.pi / 4), 0.5 * math.cos(math.pi / 4)])
    y = np.array([2.0 * math.sin(-3 * math.pi / 4), 0.5 * math.sin(math.pi / 4)])
    w = np.array([3.0, 1.0])
    ecx, ecy = (w * x).sum() / 4, (w * y).sum() / 4
    assert f.ec_x[0, 0] == pytest.approx(ecx)
    assert f.ec_y[0, 0] == pytest.approx(ecy)
    assert f.width_x[0, 0] == pytest.approx(math.sqrt((w * x**2).sum() / 4 - ecx**2))
    assert f.ec_r[0, 0] == pytest.approx((3 * 2.0 + 1 * 0.5) / 4)
    # layer 1: r mid-points 1 and 7 with equal weights -> centre 4, width 3; no x/y for single-α layers
    assert f.ec_r[0, 1] == pytest.approx(4.0) and f.width_r[0, 1] == pytest.approx(3.0)
    assert f.ec_x.shape == (1, 2)  # only the two α-binned layers
    assert list(f.sparsity[0]) == pytest.approx([1 - 2 / 8, 1 - 2 / 3, 1.0])
    assert f.n_hits[0] == 4 and list(f.n_hits_layer[0]) == [2, 2, 0]
    # empty layer: centre and width are 0, no NaN
    assert f.ec_r[0, 2] == 0.0 and f.width_r[0, 2] == 0.0


def test_threshold_is_applied_before_features(toy_geometry):
    v = np.zeros((1, toy_geometry.n_voxels))
    v[0, :3] = [0.5, 1.0, 2.0]
    t = apply_threshold(v, 1.0)
    assert list(t[0, :3]) == [0.0, 1.0, 2.0] and v[0, 0] == 0.5


def test_high_level_vector_layout():
    g = Geometry.calochallenge("2")
    rng = np.random.default_rng(0)
    v = rng.exponential(1.0, (3, g.n_voxels))
    f = compute_features(v, np.array([1e3, 1e4, 1e5]), g)
    x = high_level_vector(f)
    assert x.shape == (3, 362)
    assert np.allclose(x[:, 0], [3, 4, 5])
    assert np.allclose(x[:, 1:46], np.log10(f.e_layer + 1e-8))
    assert np.allclose(x[:, 46:91], f.ec_x / 100)
    assert np.allclose(x[:, 226], np.log10(f.e_tot + 1e-8))
    assert np.allclose(x[:, 227:272], f.sparsity)
    assert np.allclose(x[:, 317:362], f.width_r / 100)
    g1 = Geometry.calochallenge("1-photons")
    f1 = compute_features(rng.exponential(1.0, (2, g1.n_voxels)), np.array([256.0, 512.0]), g1)
    assert high_level_vector(f1).shape == (2, 30)
    g2 = Geometry.calochallenge("1-pions")
    f2 = compute_features(rng.exponential(1.0, (2, g2.n_voxels)), np.array([256.0, 512.0]), g2)
    assert high_level_vector(f2).shape == (2, 46)


def test_separation_power_cases():
    a = np.array([1.0, 2.0, 3.0])
    assert separation_power(a, 2 * a) == 0.0
    assert separation_power([1, 0], [0, 1]) == pytest.approx(1.0)
    # hand: p = (0.5, 0.5), q = (1, 0) -> ½[(0.5)²/1.5 + (0.5)²/0.5] = 1/3
    assert separation_power([1, 1], [2, 0]) == pytest.approx(1 / 3)


def test_histograms_official_binnings():
    g = Geometry.calochallenge("2")
    rng = np.random.default_rng(1)
    v = rng.exponential(1.0, (20, g.n_voxels))
    f = compute_features(v, np.full(20, 1e4), g)
    hs = {h.name: h for h in feature_histograms(f, f, g, threshold=g.threshold)}
    assert len(hs["E_ratio"].edges) == 101 and hs["E_ratio"].edges[0] == 0.5 and hs["E_ratio"].edges[-1] == 1.5
    assert len(hs["E_layer_0"].edges) == 40 and hs["E_layer_0"].edges[0] == pytest.approx(g.threshold)
    assert hs["EC_x_3"].edges[0] == -30 and hs["width_y_44"].edges[-1] == 30
    assert len(hs["sparsity_10"].edges) == 21
    assert all(h.separation == 0.0 or np.isnan(h.separation) for h in hs.values())
