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


# ---------------------------------------------------------------- parity with the official evaluation
def test_binning_xml_of_an_official_dataset_is_that_dataset(tmp_path, toy_geometry):
    from importlib import resources

    from calopc.eval.features import match_official

    for name, fname in (("2", "binning_dataset_2.xml"), ("1-pions", "binning_dataset_1_pions.xml")):
        xml = tmp_path / f"my_{name}.xml"  # any file name
        xml.write_bytes((resources.files("calopc") / "data" / fname).read_bytes())
        g = Geometry.from_xml(xml)
        assert g.name == f"my_{name}" and g.threshold == 0.0
        m = match_official(g)
        assert m == Geometry.calochallenge(name) and m.threshold == Geometry.calochallenge(name).threshold
    assert match_official(toy_geometry) is None


def test_voxel_spectrum_official_edges_and_float64():
    from calopc.eval.histograms import voxel_spectrum, voxel_spectrum_edges

    e = voxel_spectrum_edges(0.5e-3 / 0.033, 1234.5)
    assert len(e) == 50  # 49 bins
    assert e[0] == pytest.approx(0.5e-3 / 0.033, rel=1e-12) and e[-1] == pytest.approx(1234.5, rel=1e-12)
    assert np.allclose(np.diff(np.log10(e)), np.log10(1234.5 / (0.5e-3 / 0.033)) / 49)
    # a float64 value just above an edge that float32 would round below it stays in its bin
    thr = 1.0
    v = np.array([0.0, 1.0 + 1e-12, 3.0, 7.0])
    h = voxel_spectrum(v, v, thr)
    assert h.ref.sum() == 3 and h.edges.dtype == np.float64 and len(h.edges) == 50
    with pytest.raises(ValueError, match="positive threshold"):
        voxel_spectrum_edges(-1.0, 10.0)


def test_dataset1_ranges_and_per_energy_histograms():
    from calopc.eval.histograms import DS1_ENERGY_EDGES
    from calopc.synth import generate

    for name in ("1-photons", "1-pions"):
        g = Geometry.calochallenge(name)
        inc, sh = generate(g, 300, seed=2)
        f = compute_features(apply_threshold(sh, g.threshold), inc, g)
        hs = {h.name: h for h in feature_histograms(f, f, g, threshold=g.threshold)}
        for lid in g.layer_ids:
            assert hs[f"EC_r_{lid}"].edges[0] == 0 and hs[f"EC_r_{lid}"].edges[-1] == 500
            assert hs[f"width_r_{lid}"].edges[-1] == 1500 and len(hs[f"width_r_{lid}"].edges) == 101
        per = [h for n, h in hs.items() if n.startswith("E_ratio_einc_")]
        assert len(per) == 15
        energies = sorted(int(h.name.rsplit("_", 1)[1]) for h in per)
        assert energies == [int(2**n) for n in range(8, 23)]
        for h in per:
            e = int(h.name.rsplit("_", 1)[1])
            fine = name == "1-photons" and e >= 4096
            assert (h.edges[0], h.edges[-1], len(h.edges)) == ((0.9, 1.1, 21) if fine else (0.4, 1.4, 21))
            sel = (f.e_inc >= e) & (f.e_inc < 2 * e)
            assert h.ref.sum() == np.histogram(f.e_ratio[sel], h.edges)[0].sum()
        assert sum(int(((f.e_inc >= e) & (f.e_inc < 2 * e)).sum()) for e in energies) == len(f)  # one bin each
        assert sum(h.ref.sum() for h in per) > 0.5 * len(f)
        assert len(DS1_ENERGY_EDGES) == 16
    g2 = Geometry.calochallenge("2")
    f2 = compute_features(np.ones((3, g2.n_voxels)), np.full(3, 1e4), g2)
    hs2 = {h.name: h for h in feature_histograms(f2, f2, g2, threshold=g2.threshold)}
    assert not any(n.startswith("E_ratio_einc") for n in hs2)
    assert hs2["EC_r_0"].edges[-1] == 42 and hs2["width_r_0"].edges[-1] == 20


def test_custom_geometry_ranges_are_stated(toy_geometry):
    from calopc.eval.histograms import histogram_ranges

    assert "not an official dataset" in histogram_ranges(toy_geometry)
    assert "official ranges of dataset 2" in histogram_ranges(Geometry.calochallenge("2"))
    f = compute_features(np.ones((2, toy_geometry.n_voxels)), np.full(2, 10.0), toy_geometry)
    hs = {h.name: h for h in feature_histograms(f, f, toy_geometry, threshold=0.1)}
    assert hs["EC_r_2"].edges[-1] == 9 and hs["width_r_2"].edges[-1] == 4.5 and hs["EC_x_0"].edges[0] == -3
