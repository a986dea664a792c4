from __future__ import annotations

import math

import numpy as np
import pytest

from calopc.export.par04 import (MESH, Par04Harness, check_par04_geometry, input_vector, par04_index, par04_permutation,
                                 to_calopc_order)
from calopc.geometry import Geometry


# ------------------------------------------------------------------------------------------- Par04 conventions
def test_cell_order_matches_par04_positions():
    """Every Par04 output index names the calopc cell whose centre is the one Par04's GetPositions computes
    ((i_r + ½)·2.325 mm, (i_φ + ½)·2π/50 − π, layer i_z), looping r, then φ, then z fastest."""
    geo = Geometry.calochallenge("3")
    perm = par04_permutation(geo)
    i = 0
    r_mm, n_phi = MESH["r_mm"], MESH["n_phi"]
    for i_r in range(MESH["n_r"]):
        for i_phi in range(n_phi):
            for i_z in range(MESH["n_z"]):
                c = perm[i]
                assert geo.cell_layer[c] == i_z
                assert geo.cell_r[c] == pytest.approx((i_r + 0.5) * r_mm)
                assert geo.cell_alpha[c] == pytest.approx((i_phi + 0.5) * 2 * math.pi / n_phi - math.pi)
                i += 1
    assert sorted(perm) == list(range(geo.n_voxels))


def test_hot_cell_comes_out_at_par04_index(tmp_path):
    """A hand-made shower with one hot cell (layer 7, α bin 13, r bin 5) through an exported Par04 graph and the
    harness that reads it as GetEnergies does: the energy appears at Par04's index (5·50 + 13)·45 + 7 only."""
    import torch

    from calopc.export.graph import Par04Graph, _onnx_export

    geo = Geometry.calochallenge("3")
    hot = int(geo.flat_index(7, 13, 5))

    class HandMade(torch.nn.Module):
        latent_size = 2

        def __init__(self):
            super().__init__()
            self.geometry = geo

        def split_latent(self, z):
            return z, z, z

        def forward(self, e, zs, zx, keys):
            d = torch.zeros(e.shape[0], geo.n_voxels, dtype=torch.float32)
            return d.index_fill(1, torch.tensor([hot]), 1.0) * (0.25 * e[:, None]).to(torch.float32)

    graph = Par04Graph(HandMade(), e_max=1024000.0, angle_max=90.0).eval()
    path = tmp_path / "hot.onnx"
    _onnx_export(graph, "par04", 2, path)
    h = Par04Harness(path, latent_size=2)
    out = h.energies(np.array([1e4, 5e5]))
    idx = par04_index(5, 13, 7)
    assert idx == (5 * 50 + 13) * 45 + 7
    assert np.flatnonzero(out[0]).tolist() == [idx]
    np.testing.assert_allclose(out[:, idx], [0.25e4, 0.25 * 5e5], rtol=1e-6)
    back = to_calopc_order(out, geo)
    assert np.flatnonzero(back[1]).tolist() == [hot]


def test_input_vector_is_getenergies():
    """[latent, E/1024000, (θ/deg)/90, 0, 1] as float32, for Par04's default gun along y (θ = 90°)."""
    v = input_vector(np.zeros((1, 3)), 512000.0, math.pi / 2)
    np.testing.assert_array_equal(v, np.array([[0, 0, 0, 0.5, 1.0, 0.0, 1.0]], dtype=np.float32))


def test_geometry_other_than_par04_is_refused():
    """Dataset 2's binning (9 r x 16 alpha) is not Par04's readout mesh: one line naming what was found."""
    with pytest.raises(ValueError, match=r"geometry '2' \(45 layers, alpha bins \[16\], r bins \[9\].*not Par04's"):
        check_par04_geometry(Geometry.calochallenge("2"))
    check_par04_geometry(Geometry.calochallenge("3"))
