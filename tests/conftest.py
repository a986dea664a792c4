from __future__ import annotations

import numpy as np
import pytest

from calopc.geometry import Geometry

TOY_XML = """<Bins>
  <Bin pid="11" name="electron">
    <Layer id="0" r_edges="0,1,3" n_bin_alpha="4"/>
    <Layer id="1" r_edges="0" n_bin_alpha="1"/>
    <Layer id="2" r_edges="0,2,5,9" n_bin_alpha="1"/>
    <Layer id="3" r_edges="0,1,3" n_bin_alpha="4"/>
  </Bin>
</Bins>
"""


@pytest.fixture(scope="session")
def toy_xml(tmp_path_factory: pytest.TempPathFactory):
    p = tmp_path_factory.mktemp("geom") / "toy.xml"
    p.write_text(TOY_XML)
    return p


@pytest.fixture(scope="session")
def toy_geometry(toy_xml) -> Geometry:
    """3 layers with voxels: 4α×2r, 1α×3r, 4α×2r = 19 voxels."""
    return Geometry.from_xml(toy_xml, name="toy")


@pytest.fixture
def toy_showers(toy_geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """6 showers: one empty, one with a single hit, the others random."""
    rng = np.random.default_rng(7)
    v = np.where(rng.random((6, toy_geometry.n_voxels)) < 0.5, rng.exponential(1.0, (6, toy_geometry.n_voxels)), 0.0)
    v[1] = 0.0
    v[2] = 0.0
    v[2, 5] = 0.75
    return np.array([1e3, 2e3, 4e3, 8e3, 16e3, 32e3]), v
