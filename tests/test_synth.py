from __future__ import annotations

import h5py
import numpy as np
import pytest

from calopc.geometry import Geometry
from calopc.io import open_showers
from calopc.synth import generate, write_synthetic


def test_reproducible_and_seeded():
    a = generate("2", 300, seed=1)
    b = generate("2", 300, seed=1)
    c = generate("2", 300, seed=2)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_file_matches_generate_and_official_format(tmp_path):
    p = write_synthetic(tmp_path / "ds1.hdf5", dataset="1-photons", n=600, seed=4)
    inc, sh = generate("1-photons", 600, seed=4)
    with h5py.File(p) as f:
        assert sorted(f.keys()) == ["incident_energies", "showers"]
        assert f["incident_energies"].shape == (600, 1) and f["showers"].shape == (600, 368)
        assert f["showers"].dtype == np.float64 and f["incident_energies"].dtype == np.float64
        assert f["showers"].compression == "gzip"
        assert np.array_equal(f["showers"][:], sh)
    with open_showers(p) as f:
        assert f.geometry.name == "1-photons"


def test_ds1_energies_are_powers_of_two():
    inc, _ = generate("1-pions", 500, seed=0)
    k = np.log2(inc)
    assert np.allclose(k, np.round(k)) and k.min() >= 8 and k.max() <= 22
    assert len(np.unique(k)) > 8


def test_ds2_statistics_are_plausible():
    inc, sh = generate("2", 1500, seed=11)
    assert inc.min() >= 1e3 and inc.max() <= 1e6
    assert np.all(sh >= 0)
    pos = sh[sh > 0]
    assert pos.min() >= Geometry.calochallenge("2").threshold  # readout threshold applied
    hits = (sh > 0).sum(axis=1)
    assert 1300 < hits.mean() < 2000  # real ds2: ~1,600
    assert hits.max() < 6480 and hits.min() > 0
    ratio = sh.sum(axis=1) / inc
    assert 0.74 < ratio.mean() < 0.84 and 0.06 < ratio.std() < 0.16  # real: 0.79 ± 0.11
    # hits grow with energy, roughly like sqrt(E)
    lo, hi = hits[inc < 3e3].mean(), hits[inc > 3e5].mean()
    assert 5 < hi / lo < 40
    # energy-weighted depth grows with log E (shower maximum moves deeper)
    g = Geometry.calochallenge("2")
    depth = (sh * g.cell_z).sum(axis=1) / sh.sum(axis=1)
    assert depth[inc > 3e5].mean() > depth[inc < 3e3].mean() + 2


@pytest.mark.parametrize("dataset", ["1-photons", "1-pions", "3"])
def test_other_datasets_have_showers(dataset):
    inc, sh = generate(dataset, 20, seed=0)
    g = Geometry.calochallenge(dataset)
    assert sh.shape == (20, g.n_voxels)
    assert np.all((sh > 0).sum(axis=1) > 5)
    assert np.all(np.isfinite(sh))


def test_given_energies():
    e = np.array([1e3, 1e4, 1e5])
    inc, sh = generate("2", energies=e, seed=0)
    assert np.array_equal(inc, e)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        generate("2", energies=np.array([-1.0]))
