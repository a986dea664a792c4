from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import torch

from calopc.converters import voxels_to_points
from calopc.geometry import Geometry, GeometryError
from calopc.sparse import SparseShowers, require_regular


def _showers(geometry: Geometry, n: int = 4, occupancy: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.where(rng.random((n, geometry.n_voxels)) < occupancy, rng.exponential(2.0, (n, geometry.n_voxels)), 0.0)
    v[1] = 0.0  # an empty shower
    return v


@pytest.mark.parametrize("dataset", ["2", "3"])
def test_dense_sparse_points_roundtrip(dataset):
    g = Geometry.calochallenge(dataset)
    v = _showers(g)
    inc = np.array([1e3, 2e3, 5e4, 1e6])
    x = SparseShowers.from_voxels(v, g)
    assert x.shape == g.shape and x.batch_size == 4 and len(x) == np.count_nonzero(v)
    assert x.feats.dtype == torch.float64
    # dense (N, L, A, R) is the official flat order reshaped
    dense = x.to_dense()
    assert dense.shape == (4, *g.shape)
    np.testing.assert_array_equal(dense.numpy().reshape(4, -1), v)
    np.testing.assert_array_equal(x.to_voxels(), v)
    # from dense again
    y = SparseShowers.from_dense(dense, geometry=g)
    assert torch.equal(y.coords, x.coords) and torch.equal(y.feats, x.feats)
    # points: to_events writes what voxels_to_points writes, bit for bit
    ev = voxels_to_points(v, g, incident_energies=inc)
    ev2 = x.to_events(inc)
    for f in ("r", "alpha", "z", "E", "cell"):
        assert ak.all(ev.points[f] == ev2.points[f])
        assert ak.flatten(ev.points[f]).type == ak.flatten(ev2.points[f]).type
    np.testing.assert_array_equal(ak.to_numpy(ev2.incident_energy), inc)
    # and back from the events, exactly
    z = SparseShowers.from_events(ev, g)
    assert torch.equal(z.coords, x.coords) and torch.equal(z.feats, x.feats)
    # coordinates are (shower, layer, alpha, r) of the flat cell index
    cell = ak.to_numpy(ak.flatten(ev.points.cell)).astype(np.int64)
    c = z.coords[:, 1:].numpy()
    np.testing.assert_array_equal(g.flat_index(c[:, 0], c[:, 1], c[:, 2]), cell)
    np.testing.assert_array_equal(g.cell_layer[cell], c[:, 0])
    np.testing.assert_array_equal(g.cell_alpha_bin[cell], c[:, 1])


def test_from_events_without_cell_and_extra_features():
    g = Geometry.calochallenge("2")
    v = _showers(g, seed=1)
    ev = voxels_to_points(v, g)
    pts = ak.zip({"r": ev.points.r, "alpha": ev.points.alpha, "z": ev.points.z, "E": ev.points.E})
    x = SparseShowers.from_events(pts, g, features=("E", "r"))
    assert x.n_channels == 2
    np.testing.assert_array_equal(x.to_voxels(0), v)
    np.testing.assert_array_equal(x.feats[:, 1].numpy(), ak.to_numpy(ak.flatten(ev.points.r)))


def test_irregular_geometry_is_a_clear_error(toy_geometry):
    for g in (Geometry.calochallenge("1-photons"), Geometry.calochallenge("1-pions"), toy_geometry):
        with pytest.raises(GeometryError, match=r"regular \(layer, alpha, r\) grid.*n_alpha per layer"):
            require_regular(g)
        with pytest.raises(GeometryError, match="regular"):
            SparseShowers.from_voxels(np.zeros((1, g.n_voxels)), g)
    assert require_regular(Geometry.calochallenge("3")) == (45, 50, 18)


def test_bad_inputs():
    g = Geometry.calochallenge("2")
    with pytest.raises(ValueError, match=r"showers must have shape \(N, 6480\)"):
        SparseShowers.from_voxels(np.zeros((2, 40500)), g)
    with pytest.raises(ValueError, match="twice in one shower"):
        SparseShowers.from_cells([3, 3], [2], [1.0, 2.0], g)
    with pytest.raises(ValueError, match=r"\[0, 6480\)"):
        SparseShowers.from_cells([6480], [1], [1.0], g)
    with pytest.raises(ValueError, match="no field"):
        SparseShowers.from_events(voxels_to_points(np.ones((1, 6480)), g), g, features=("energy",))


def test_from_batch_recovers_cells():
    pytest.importorskip("zuko")
    from calopc.models.data import ShowerCollate, ShowerDataset

    g = Geometry.calochallenge("2")
    v = _showers(g, n=6, occupancy=0.05, seed=2)
    v[1, 7] = 1.0  # no empty shower here
    ev = voxels_to_points(v, g, incident_energies=np.full(6, 1e4))
    ds = ShowerDataset.from_events(ev, g)
    for variant in ("I", "II"):
        prep = ds.fit_preprocessor(variant=variant)
        batch = ShowerCollate(prep, seed=0)([ds[i] for i in range(6)])
        x = SparseShowers.from_batch(batch, prep)
        ref = SparseShowers.from_voxels(v, g)
        assert torch.equal(x.coords, ref.coords)
        assert x.n_channels == batch.x.shape[2]
        if variant == "I":
            e = SparseShowers.from_batch(batch, prep, features="E")
            torch.testing.assert_close(e.feats, ref.feats, rtol=1e-5, atol=0)
