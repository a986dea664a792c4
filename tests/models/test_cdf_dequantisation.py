from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calopc.models.preprocess import Preprocessor, _cdf_forward, _cdf_inverse


@pytest.fixture(scope="module")
def fitted(toy_geometry):
    """CDF preprocessing fitted on 4000 points spread very unevenly over the toy cells."""
    geo = toy_geometry
    rng = np.random.default_rng(0)
    w = rng.exponential(1.0, geo.n_voxels) ** 3
    n = 4000
    cell = rng.choice(geo.n_voxels, n, p=w / w.sum())
    counts = np.full(100, n // 100)
    e_inc = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 100))
    energy = rng.exponential(1.0, n)
    prep = Preprocessor.fit(geo, cell, energy, counts, e_inc, variant="II", dequantisation="cdf")
    return prep, cell, energy, counts, rng


def test_cdf_forward_inverse_is_exact(fitted):
    prep, cell, _, _, rng = fitted
    zar = prep.dequantise(cell, rng)
    layer = np.asarray(prep.geometry.cell_layer)[cell]
    ta, tr = prep._cdf()
    for t, v in ((ta, zar[:, 1]), (tr, zar[:, 2])):
        y = _cdf_forward(t, v, layer)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(_cdf_inverse(t, y, layer), v, rtol=0, atol=1e-9)


def test_cdf_features_are_marginally_standard_normal(fitted):
    prep = fitted[0]
    # the fitted standardisation is that of the probit features themselves: ~N(0, 1)
    assert np.allclose(prep.point_mean[:2], 0.0, atol=0.08)
    assert np.allclose(prep.point_std[:2], 1.0, atol=0.08)
    # the bin distributions: one row per layer, one entry per bin, normalised
    geo = prep.geometry
    assert [len(q) for q in prep.pdf_alpha] == list(geo.n_alpha)
    assert [len(q) for q in prep.pdf_r] == list(geo.n_r)
    assert np.allclose([sum(q) for q in prep.pdf_r], 1.0) and min(min(q) for q in prep.pdf_r) > 0


def test_points_map_back_to_their_cells_numpy_and_torch(fitted):
    prep, cell, energy, _, rng = fitted
    geo = prep.geometry
    zar = prep.dequantise(cell, rng)
    layer = np.asarray(geo.cell_layer)[cell]
    y = prep.forward_points_layer(zar, energy, np.ones_like(energy), layer)
    back, w = prep.inverse_points_layer(y, layer)
    np.testing.assert_array_equal(geo.locate(back[:, 2], back[:, 1], back[:, 0]), cell)
    np.testing.assert_allclose(w, energy, rtol=1e-5)
    # the torch path gives the same features and the same inverse
    tp = prep.to_torch("cpu")
    lt = torch.from_numpy(layer)
    yt = tp.forward_points_layer(torch.from_numpy(zar), torch.from_numpy(energy), torch.ones(len(energy)), lt)
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)
    bt, wt = tp.inverse_points_layer(torch.from_numpy(y), lt)
    np.testing.assert_allclose(bt.numpy(), back, atol=1e-9)
    np.testing.assert_allclose(wt.numpy(), w, rtol=1e-9)


def test_cdf_preprocessing_round_trips_through_json(fitted):
    prep, cell, energy, _, rng = fitted
    d = json.loads(json.dumps(prep.to_dict()))
    again = Preprocessor.from_dict(d, prep.geometry)
    assert again == prep and again.dequantisation == "cdf"
    zar = prep.dequantise(cell[:50], rng)
    layer = np.asarray(prep.geometry.cell_layer)[cell[:50]]
    np.testing.assert_array_equal(again.forward_points_layer(zar, energy[:50], energy[:50], layer),
                                  prep.forward_points_layer(zar, energy[:50], energy[:50], layer))
    # preprocessing saved before the option existed: uniform
    old = {k: v for k, v in d.items() if k not in ("dequantisation", "pdf_alpha", "pdf_r")}
    assert Preprocessor.from_dict(old, prep.geometry).dequantisation == "uniform"


def test_cdf_errors(toy_geometry):
    p1 = Preprocessor(toy_geometry, variant="I", dequantisation="cdf")   # the published CaloPointFlow II points
    with pytest.raises(ValueError, match="needs pdf_alpha and pdf_r"):
        p1.forward_points(np.zeros((1, 3)), np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="dequantisation must be one of"):
        Preprocessor(toy_geometry, variant="II", dequantisation="gauss")
    p = Preprocessor(toy_geometry, variant="II", dequantisation="cdf", point_mean=[0.0] * 3, point_std=[1.0] * 3)
    with pytest.raises(ValueError, match="needs pdf_alpha and pdf_r"):
        p.forward_points_layer(np.zeros((1, 3)), np.ones(1), np.ones(1), np.zeros(1, dtype=int))
