from __future__ import annotations

import numpy as np
import pytest
import torch

from calopc.converters import read_points
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches
from calopc.models.preprocess import Preprocessor, layer_sums
from calopc.models.utils import pad, unpad


def test_pad_unpad_roundtrip():
    pts = [torch.randn(n, 3) for n in (4, 0, 7, 1)]
    x, mask = pad(pts)
    assert x.shape == (4, 7, 3)
    assert mask.sum(1).tolist() == [4, 0, 7, 1]
    assert (x[~mask] == 0).all()
    for a, b in zip(unpad(x, mask), pts):
        assert torch.equal(a, b)
    x2, m2 = pad([np.ones((5, 2))], max_points=3)
    assert x2.shape == (1, 3, 2) and bool(m2.all())
    ids = [torch.arange(n) for n in (2, 0, 3)]  # 1-d sets pad to (B, N_max)
    x3, m3 = pad(ids)
    assert x3.shape == (3, 3) and x3.dtype == torch.int64
    assert x3.tolist() == [[0, 1, 0], [0, 0, 0], [0, 1, 2]] and m3.sum(1).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="at least one"):
        pad([])


@pytest.fixture(scope="module")
def data(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    return ds, ds.fit_preprocessor(seed=0)


def test_dataset_matches_file(toy_parquet, data):
    ds, _ = data
    events, geo = read_points(toy_parquet)
    assert len(ds) == len(events)
    assert ds.geometry == geo
    cell, e, inc = ds[5]
    assert cell.tolist() == events[5].points.cell.tolist()
    np.testing.assert_allclose(e, np.asarray(events[5].points.E), rtol=1e-6)
    assert inc == events[5].incident_energy


def test_dequantisation_stays_in_cell(data):
    ds, prep = data
    rng = np.random.default_rng(0)
    cell = np.repeat(np.arange(ds.geometry.n_voxels), 50)
    zar = prep.dequantise(cell, rng)
    back = ds.geometry.locate(zar[:, 2], zar[:, 1], zar[:, 0])
    assert (back == cell).all()
    # the noise spreads over the cell (not the centre only)
    assert np.ptp(zar[cell == 0, 0]) > 0.5


def test_point_transform_is_invertible(data):
    ds, prep = data
    rng = np.random.default_rng(1)
    cell = rng.integers(0, ds.geometry.n_voxels, 500)
    zar = prep.dequantise(cell, rng)
    e = rng.exponential(10.0, 500) + 1e-3
    inc = rng.uniform(1e3, 1e5, 500)
    y = prep.forward_points(zar, e, inc)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    zar2, e2 = prep.inverse_points(y, inc)
    np.testing.assert_allclose(zar2, zar, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(e2, e, rtol=1e-4)
    assert (ds.geometry.locate(zar2[:, 2], zar2[:, 1], zar2[:, 0]) == cell).all()


def test_shower_transform_is_invertible(data):
    _ds, prep = data
    n = np.array([1, 5, 12])
    e_sum = np.array([3.0, 40.0, 800.0])
    inc = np.array([1e3, 1e4, 1e5])
    s = prep.forward_shower(n, e_sum, inc)
    n2, e2 = prep.inverse_shower(s, inc)
    assert n2.tolist() == n.tolist()
    np.testing.assert_allclose(e2, e_sum, rtol=1e-5)
    c = prep.forward_cond(inc)
    assert c.shape == (3, 1)


def test_preprocessor_is_fitted_and_serialisable(data):
    ds, prep = data
    assert prep.n_max == int(ds.counts.max())
    d = prep.to_dict()
    assert "geometry" not in d
    again = Preprocessor.from_dict(__import__("json").loads(__import__("json").dumps(d)), ds.geometry)
    assert again == prep
    # fitted features are standardised
    b = next(iterate_batches(ds, ShowerCollate(prep, seed=0), 48))
    x = b.x[b.mask]
    assert x.mean(0).abs().max() < 0.5
    assert (x.std(0) - 1).abs().max() < 0.5


def test_batches(data):
    ds, prep = data
    batches = list(iterate_batches(ds, ShowerCollate(prep, seed=0), 10, seed=1))
    assert len(batches) == len(ds) // 10
    b = batches[0]
    assert b.x.shape[:2] == b.mask.shape and b.x.shape[2] == 4
    assert b.mask.sum(1).tolist() == b.n.tolist()
    assert b.shower.shape == (10, 2) and b.cond.shape == (10, 1)
    # ranks see disjoint showers
    r0 = list(iterate_batches(ds, ShowerCollate(prep), 4, seed=1, rank=0, world_size=2))
    r1 = list(iterate_batches(ds, ShowerCollate(prep), 4, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) == (len(ds) // 2) // 4


@pytest.fixture(scope="module")
def data2(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    return ds, ds.fit_preprocessor(seed=0, variant="II")


def test_layer_sums_match_a_loop(data2):
    ds, _ = data2
    n, e = layer_sums(ds.geometry, ds.cell, ds.energy, ds.counts)
    lay = ds.geometry.cell_layer
    for i in (0, 7, len(ds) - 1):
        cell, en, _ = ds[i]
        for layer in range(ds.geometry.n_layers):
            sel = lay[cell] == layer
            assert n[i, layer] == sel.sum()
            assert e[i, layer] == pytest.approx(float(en[sel].astype(np.float64).sum()), rel=1e-12)


def test_layer_point_transform_is_invertible(data2):
    ds, prep = data2
    geo = ds.geometry
    rng = np.random.default_rng(2)
    cell = rng.integers(0, geo.n_voxels, 500)
    layer = geo.cell_layer[cell]
    zar = prep.dequantise(cell, rng)
    e = rng.exponential(10.0, 500) + 1e-3
    e_layer = e * rng.uniform(1, 20, 500)
    y = prep.forward_points_layer(zar, e, e_layer, layer)
    assert y.shape == (500, 3) and y.dtype == np.float32 and np.isfinite(y).all()
    zar2, w = prep.inverse_points_layer(y, layer)
    np.testing.assert_array_equal(zar2[:, 0], layer)  # points sit on their layer
    np.testing.assert_allclose(zar2[:, 1:], zar[:, 1:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w, e / e_layer, rtol=1e-4)
    assert (geo.locate(zar2[:, 2], zar2[:, 1], zar2[:, 0]) == cell).all()


def test_layer_shower_transform_is_invertible(data2):
    ds, prep = data2
    geo = ds.geometry
    assert prep.n_shower_features == 2 * geo.n_layers and len(prep.shower_mean) == 2 * geo.n_layers
    n, e = layer_sums(geo, ds.cell, ds.energy, ds.counts)
    inc = ds.e_inc
    for rng in (None, np.random.default_rng(0), np.random.default_rng(1)):
        s = prep.forward_layers(n, e, inc, rng)
        assert s.shape == (len(ds), 2 * geo.n_layers) and np.isfinite(s).all()
        n2, e2 = prep.inverse_layers(s, inc)
        np.testing.assert_array_equal(n2, n)  # dequantised counts come back exactly
        # exact up to float32 and the dequantisation offset (at most δ E_inc / 2, δ = 1e-9)
        np.testing.assert_allclose(e2[n > 0], e[n > 0], rtol=1e-5, atol=0.5e-9 * inc.max())
        assert (e2[n == 0] == 0).all()
    # counts are capped by the cells of a layer, and a shower keeps at least one point
    big = prep.forward_layers(np.full((1, geo.n_layers), 10**6), np.ones((1, geo.n_layers)), np.ones(1))
    assert prep.inverse_layers(big, np.ones(1))[0].tolist() == [list(geo.voxels_per_layer)]
    none = prep.forward_layers(np.zeros((1, geo.n_layers)), np.zeros((1, geo.n_layers)), np.ones(1))
    assert prep.inverse_layers(none, np.ones(1))[0].sum() == 1


def test_layer_batches(data2):
    ds, prep = data2
    b = next(iterate_batches(ds, ShowerCollate(prep, seed=0), 10, seed=1))
    assert b.x.shape[2] == 3 and b.shower.shape == (10, 2 * ds.geometry.n_layers)
    assert b.layer.shape == b.mask.shape and b.layer.dtype == torch.int64
    assert (b.layer[~b.mask] == 0).all() and int(b.layer.max()) == ds.geometry.n_layers - 1
    x = b.x[b.mask]
    assert x.mean(0).abs().max() < 0.6 and (x.std(0) - 1).abs().max() < 0.6
    with pytest.raises(ValueError, match="variant must be one of"):
        Preprocessor(ds.geometry, variant="III")
