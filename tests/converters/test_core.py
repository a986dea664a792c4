from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from calopc.converters import neighbour_table, points_to_voxels, voxels_to_points
from calopc.geometry import DATASETS, Geometry


def test_roundtrip_toy(toy_geometry, toy_showers):
    inc, v = toy_showers
    ev = voxels_to_points(v, toy_geometry, incident_energies=inc)
    assert len(ev) == 6
    assert ak.num(ev.points, axis=1).tolist() == list((v > 0).sum(axis=1))
    assert ak.num(ev.points, axis=1)[1] == 0  # empty shower kept
    assert ev.points[2].cell.tolist() == [5]
    assert np.array_equal(np.asarray(ev.incident_energy), inc)
    back = points_to_voxels(ev, toy_geometry)
    assert back.dtype == v.dtype
    assert np.array_equal(back, v)


def test_point_coordinates_are_cell_centres(toy_geometry, toy_showers):
    _, v = toy_showers
    ev = voxels_to_points(v, toy_geometry)
    g = toy_geometry
    cell = np.asarray(ak.flatten(ev.points.cell))
    assert np.allclose(ak.flatten(ev.points.r), g.cell_r[cell])
    assert np.allclose(ak.flatten(ev.points.alpha), g.cell_alpha[cell])
    assert np.array_equal(np.asarray(ak.flatten(ev.points.z)), g.cell_layer[cell].astype(np.float32))
    assert ev.points.r.type.content.content.primitive == "float32"


@pytest.mark.parametrize("name", DATASETS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_roundtrip_exact_official(name, data):
    g = Geometry.calochallenge(name)
    n = data.draw(st.integers(0, 4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    values = hnp.arrays(dtype, (n, g.n_voxels),
                        elements=st.one_of(st.just(0.0), st.floats(0.0, 1e7, width=np.dtype(dtype).itemsize * 8, exclude_min=True)))
    v = data.draw(values)
    ev = voxels_to_points(v, g, incident_energies=np.arange(n, dtype=float) + 1)
    assert ev.points.E.type.content.content.primitive == np.dtype(dtype).name
    back = points_to_voxels(ev, g)
    assert back.dtype == v.dtype
    assert np.array_equal(back, v)
    # continuous path (cell centres, no cell index) lands in the same cells
    cont = ev.points[["r", "alpha", "z", "E"]]
    assert np.array_equal(points_to_voxels(cont, g), v)


def test_threshold_in_conversion(toy_geometry):
    v = np.zeros((1, toy_geometry.n_voxels))
    v[0, :3] = [0.5, 1.0, 2.0]
    ev = voxels_to_points(v, toy_geometry, threshold=1.0)
    # the same meaning as voxelize and the official evaluation: cells below the threshold are empty
    assert ev.points.E.tolist() == [[1.0, 2.0]]
    assert voxels_to_points(v, toy_geometry, threshold=1.5).points.E.tolist() == [[2.0]]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            voxels_to_points(v, toy_geometry, threshold=bad)
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            points_to_voxels(ev, toy_geometry, threshold=bad)


def _pts(r, alpha, z, e):
    return ak.zip({"r": ak.Array(r), "alpha": ak.Array(alpha), "z": ak.Array(z), "E": ak.Array(e)})


@pytest.fixture
def collide():
    # three points in the same ds2 cell (layer 0, alpha bin 8, r bin 0), one outside, one in another shower
    return _pts([[1.0, 1.5, 2.0, 50.0], [10.0]], [[0.1, 0.1, 0.1, 0.0], [0.1]], [[0.0, 0.2, -0.3, 0.0], [3.0]],
                [[1.0, 2.0, 3.0, 4.0], [5.0]])


def test_collision_sum(collide):
    g = Geometry.calochallenge("2")
    out, st_ = points_to_voxels(collide, g, collisions="sum", return_stats=True)
    cell = g.flat_index(0, 8, 0)
    assert out[0, cell] == 6.0
    assert out[0].sum() == 6.0  # the outside point is not written
    assert out[1, g.flat_index(3, 8, 2)] == 5.0
    assert (st_.n_points, st_.n_outside, st_.n_collisions, st_.n_merged) == (5, 1, 2, 2)
    assert st_.collision_rate == pytest.approx(2 / 4)


def test_collision_max(collide):
    g = Geometry.calochallenge("2")
    out, st_ = points_to_voxels(collide, g, collisions="max", return_stats=True)
    assert out[0, g.flat_index(0, 8, 0)] == 3.0
    assert np.count_nonzero(out[0]) == 1
    assert st_.n_dropped == 2


def test_collision_nearest_free(collide):
    g = Geometry.calochallenge("2")
    out, st_ = points_to_voxels(collide, g, collisions="nearest-free", return_stats=True)
    c0 = g.flat_index(0, 8, 0)
    assert out[0, c0] == 3.0
    moved = np.flatnonzero(out[0])
    assert len(moved) == 3  # one point per cell
    assert out[0].sum() == 6.0  # energy conserved
    assert set(g.cell_layer[moved]) == {0}  # stays in its layer
    nbr = neighbour_table(g)
    assert out[0, nbr[c0, 0]] == 2.0  # the second most energetic point takes the nearest free cell
    assert st_.n_moved == 2 and st_.n_merged == 0


def test_nearest_free_falls_back_to_sum_when_layer_is_full(toy_geometry):
    g = toy_geometry
    # layer ordinal 1 has 3 cells: put 5 points in it, every cell already occupied
    r = [[1.0, 3.0, 7.0, 1.0, 1.0]]
    out, st_ = points_to_voxels(_pts(r, [[0.0] * 5], [[1.0] * 5], [[1.0, 2.0, 3.0, 4.0, 5.0]]), g,
                                collisions="nearest-free", return_stats=True)
    assert out[0].sum() == 15.0
    assert np.count_nonzero(out[0]) == 3
    assert st_.n_collisions == 2 and st_.n_moved == 0 and st_.n_merged == 2


def test_nearest_free_many_collisions_one_point_per_cell():
    g = Geometry.calochallenge("2")
    rng = np.random.default_rng(1)
    n = 2000  # concentrated around the axis in a few layers: heavy collisions
    pts = _pts([rng.exponential(6.0, n).tolist()], [rng.uniform(-3.14, 3.14, n).tolist()],
               [rng.normal(10, 2, n).tolist()], [rng.exponential(1.0, n).tolist()])
    out, st_ = points_to_voxels(pts, g, collisions="nearest-free", return_stats=True)
    summed = points_to_voxels(pts, g, collisions="sum")
    assert st_.n_collisions > 500
    assert np.count_nonzero(out) == st_.n_points - st_.n_outside - st_.n_merged
    assert out.sum() == pytest.approx(summed.sum())
    # layer energies are conserved
    per_layer = np.bincount(g.cell_layer, weights=out[0], minlength=45)
    assert np.allclose(per_layer, np.bincount(g.cell_layer, weights=summed[0], minlength=45))


def test_threshold_in_voxelisation(toy_geometry):
    pts = _pts([[0.5, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.01, 1.0]])
    out, st_ = points_to_voxels(pts, toy_geometry, threshold=0.1, return_stats=True)
    assert np.count_nonzero(out) == 1 and st_.n_below_threshold == 1


def test_bad_points(toy_geometry):
    with pytest.raises(ValueError, match="non-finite energy"):
        points_to_voxels(_pts([[0.5]], [[0.0]], [[0.0]], [[np.nan]]), toy_geometry)
    with pytest.raises(ValueError, match="negative energy"):
        points_to_voxels(_pts([[0.5]], [[0.0]], [[0.0]], [[-1.0]]), toy_geometry)
    with pytest.raises(ValueError, match="collisions must be one of"):
        points_to_voxels(_pts([[0.5]], [[0.0]], [[0.0]], [[1.0]]), toy_geometry, collisions="avg")
    with pytest.raises(ValueError, match="need 'r', 'alpha' and 'z'"):
        points_to_voxels(ak.zip({"E": ak.Array([[1.0]])}), toy_geometry)
    with pytest.raises(ValueError, match=r"shape \(N, 19\)"):
        voxels_to_points(np.zeros((2, 20)), toy_geometry)
    with pytest.raises(ValueError, match="incident_energies has 1 entries"):
        voxels_to_points(np.zeros((2, 19)), toy_geometry, incident_energies=[1.0])


def test_neighbour_table_is_same_layer_and_sorted():
    g = Geometry.calochallenge("1-photons")
    nbr = neighbour_table(g)
    ok = nbr >= 0
    rows = np.repeat(np.arange(g.n_voxels)[:, None], nbr.shape[1], axis=1)
    assert np.all(g.cell_layer[nbr[ok]] == g.cell_layer[rows[ok]])
    assert np.all(nbr[ok] != rows[ok])
    # layer with 5 cells: 4 neighbours, rest padded
    last = g.offsets[-2]
    assert (nbr[last] >= 0).sum() == 4


@pytest.mark.parametrize(("value", "what"), [(np.nan, "non-finite value nan"), (-4.0, "negative value -4.0"),
                                             (np.inf, "non-finite value inf")])
def test_bad_cells_are_refused_not_dropped(toy_geometry, value, what):
    """NaN, infinite and negative cells are an error naming the first shower, cell and value, as in every reader."""
    v = np.zeros((3, toy_geometry.n_voxels))
    v[0, 1] = 2.0
    v[2, 5] = value
    v[2, 7] = -1.0
    with pytest.raises(ValueError, match=rf"showers: 2 cells hold NaN, infinite or negative energies \(first: shower 2, "
                                         rf"cell 5, {what}\); expected finite energies >= 0 MeV"):
        voxels_to_points(v, toy_geometry, incident_energies=[1e3, 1e3, 1e3])


def test_bad_incident_energies_are_refused(toy_geometry):
    v = np.zeros((2, toy_geometry.n_voxels))
    with pytest.raises(ValueError, match=r"incident_energies: 1 of 2 .* \(first: shower 1, 0.0\)"):
        voxels_to_points(v, toy_geometry, incident_energies=[1e3, 0.0])
