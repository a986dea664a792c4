from __future__ import annotations

import math

import numpy as np
import pytest

from calopc.geometry import DATASETS, Geometry, GeometryError, detect_geometry, load_geometry


@pytest.mark.parametrize(
    ("name", "n_voxels", "n_layers"),
    [("1-photons", 368, 5), ("1-pions", 533, 7), ("2", 6480, 45), ("3", 40500, 45)],
)
def test_official_sizes(name, n_voxels, n_layers):
    g = Geometry.calochallenge(name)
    assert g.n_voxels == n_voxels
    assert g.n_layers == n_layers
    assert detect_geometry(n_voxels) is g
    assert g.offsets[-1] == n_voxels
    assert len(g.cell_r) == n_voxels


def test_ds1_layer_table():
    g = Geometry.calochallenge("1-pions")
    assert g.layer_ids == (0, 1, 2, 3, 12, 13, 14)
    assert list(g.offsets) == [0, 8, 108, 208, 213, 363, 523, 533]
    assert g.n_alpha == (1, 10, 10, 1, 10, 10, 1)
    assert not g.is_regular
    with pytest.raises(GeometryError, match="not regular"):
        _ = g.shape


def test_ds2_cell_order_r_fastest():
    g = Geometry.calochallenge("2")
    assert g.shape == (45, 16, 9)
    idx = np.arange(g.n_voxels)
    z, a, r = np.unravel_index(idx, g.shape)
    assert np.array_equal(g.cell_layer, z)
    assert np.array_equal(g.cell_alpha_bin, a)
    assert np.array_equal(g.cell_r_bin, r)
    assert g.cell_r[0] == pytest.approx(4.65 / 2)
    assert g.cell_r[8] == pytest.approx((37.2 + 41.85) / 2)
    assert g.cell_alpha[0] == pytest.approx(-math.pi + math.pi / 16)
    assert g.cell_alpha[9] == pytest.approx(-math.pi + 3 * math.pi / 16)
    assert g.z_mm[1] == pytest.approx(1.5 * 3.4)
    assert g.threshold == pytest.approx(0.01515, rel=1e-3)


def test_single_alpha_layers_have_alpha_zero():
    g = Geometry.calochallenge("1-photons")
    first = slice(g.offsets[0], g.offsets[1])
    assert np.all(g.cell_alpha[first] == 0.0)


def test_flat_index_and_locate_roundtrip(toy_geometry):
    g = toy_geometry
    assert g.n_voxels == 8 + 3 + 8
    assert g.layer_ids == (0, 2, 3)
    f = g.flat_index(g.cell_layer, g.cell_alpha_bin, g.cell_r_bin)
    assert np.array_equal(f, np.arange(g.n_voxels))
    assert np.array_equal(g.locate(g.cell_r, g.cell_alpha, g.cell_z), np.arange(g.n_voxels))
    # alpha is periodic, r beyond the last edge and layers out of range are outside
    assert g.locate(np.array([0.5]), np.array([g.cell_alpha[0] + 2 * math.pi]), np.array([0.0]))[0] == 0
    assert list(g.locate(np.array([3.0, 0.5, 0.5, -0.1]), np.zeros(4), np.array([0.0, -0.6, 2.6, 0.0]))) == [-1] * 4


def test_locate_bin_edges(toy_geometry):
    g = toy_geometry
    # r exactly on an inner edge goes to the upper bin; layer 1 (ordinal) has edges 0,2,5,9
    cells = g.locate(np.array([0.0, 2.0, 4.999, 5.0, 9.0]), np.zeros(5), np.ones(5))
    assert list(cells) == [8, 9, 9, 10, -1]


def test_json_roundtrip():
    for name in DATASETS:
        g = Geometry.calochallenge(name)
        assert Geometry.from_json(g.to_json()) == g


def test_a_shipped_geometry_read_back_is_the_one_instance():
    """Files carry their geometry as JSON; a shipped one read back is the cached instance (cell tables built once)."""
    import dataclasses

    for g in (Geometry.calochallenge("3"), Geometry.high_granularity()):
        assert Geometry.from_json(g.to_json()) is g
    changed = dataclasses.replace(Geometry.calochallenge("2"), threshold=1.0)
    back = Geometry.from_json(changed.to_json())
    assert back == changed and back is not Geometry.calochallenge("2")


def test_errors(tmp_path):
    with pytest.raises(GeometryError, match="known: 368"):
        detect_geometry(1234)
    with pytest.raises(GeometryError, match="dataset must be one of"):
        Geometry.calochallenge("4")
    bad = tmp_path / "bad.xml"
    bad.write_text("<Bins><Bin><Layer id='0' r_edges='0,x' n_bin_alpha='1'/></Bin></Bins>")
    with pytest.raises(GeometryError, match="bad <Layer>"):
        Geometry.from_xml(bad)
    (tmp_path / "junk.xml").write_text("not xml")
    with pytest.raises(GeometryError, match="cannot read binning XML"):
        Geometry.from_xml(tmp_path / "junk.xml")
    with pytest.raises(GeometryError, match="unknown geometry"):
        load_geometry("nonexistent-thing")


def test_load_geometry_variants(toy_xml):
    assert load_geometry("2") is Geometry.calochallenge("2")
    assert load_geometry(3).n_voxels == 40500
    assert load_geometry(toy_xml).n_voxels == 19
