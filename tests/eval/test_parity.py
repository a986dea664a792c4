"""calopc evaluate against the official CaloChallenge recipe written out by hand (histogram helper formulas)."""

from __future__ import annotations

import numpy as np
import pytest

from calopc.eval import evaluate
from calopc.geometry import Geometry
from calopc.io import write_showers
from calopc.synth import generate


def _official_separation(ref_values, gen_values, bins):
    """The official helper: density histograms times bin widths, ½ Σ (h1 − h2)² / (h1 + h2 + 1e-16)."""
    h1, _ = np.histogram(ref_values, bins=bins, density=True)
    h2, _ = np.histogram(gen_values, bins=bins, density=True)
    h1, h2 = h1 * np.diff(bins), h2 * np.diff(bins)
    return 0.5 * ((h1 - h2) ** 2 / (h1 + h2 + 1e-16)).sum()


@pytest.fixture(scope="module")
def ds1_files(tmp_path_factory):
    g = Geometry.calochallenge("1-photons")
    d = tmp_path_factory.mktemp("parity")
    ref, gen = generate(g, 300, seed=21), generate(g, 300, seed=22)
    write_showers(d / "ref.hdf5", *ref)
    write_showers(d / "gen.hdf5", gen[0], gen[1] * 1.02)
    res = evaluate(d / "gen.hdf5", d / "ref.hdf5", d / "out", metrics=("hist",), progress=False)
    return g, ref, (gen[0], gen[1] * 1.02), res


def test_voxel_spectrum_separation_as_the_official_helper(ds1_files):
    g, (_, rsh), (_, gsh), res = ds1_files
    thr = g.threshold
    r = np.where(rsh < thr, 0.0, rsh).astype(np.float64)
    s = np.where(gsh < thr, 0.0, gsh).astype(np.float64)
    bins = np.logspace(np.log10(thr), np.log10(r.max()), 50)  # official: 49 bins, all voxels flattened
    expected = _official_separation(r.ravel(), s.ravel(), bins)
    assert res["separation"]["voxel_spectrum"] == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_ds1_per_energy_separations_as_the_official_helper(ds1_files):
    g, (rinc, rsh), (ginc, gsh), res = ds1_files
    thr = g.threshold
    r_ratio = np.where(rsh < thr, 0.0, rsh).sum(1) / rinc.reshape(-1)
    g_ratio = np.where(gsh < thr, 0.0, gsh).sum(1) / ginc.reshape(-1)
    target = 2 ** np.linspace(8, 23, 16)
    bins = np.linspace(0.4, 1.4, 21)
    seen = 0
    for i in range(15):
        if i > 3:
            bins = np.linspace(0.9, 1.1, 21)  # photons from the fifth energy on
        rs = (rinc.reshape(-1) >= target[i]) & (rinc.reshape(-1) < target[i + 1])
        gs = (ginc.reshape(-1) >= target[i]) & (ginc.reshape(-1) < target[i + 1])
        got = res["separation"][f"E_ratio_einc_{int(target[i])}"]
        inside_r = ((r_ratio[rs] >= bins[0]) & (r_ratio[rs] <= bins[-1])).any()
        inside_g = ((g_ratio[gs] >= bins[0]) & (g_ratio[gs] <= bins[-1])).any()
        if not (inside_r and inside_g):
            assert got is None  # an empty histogram has no separation
            continue
        assert got == pytest.approx(_official_separation(r_ratio[rs], g_ratio[gs], bins), rel=1e-9, abs=1e-15)
        seen += 1
    assert seen >= 8
    assert "E_ratio_einc" in res["separation_summary"]
