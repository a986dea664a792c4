"""calopc showers <-> the showerdata point-cloud format, checked with the showerdata package's own reader and writer."""

from __future__ import annotations

import math
import shutil

import awkward as ak
import h5py
import numpy as np
import pytest

showerdata = pytest.importorskip("showerdata")

from calopc.cli import main  # noqa: E402
from calopc.converters import convert_file, points_to_voxels, read_points, voxels_to_points  # noqa: E402
from calopc.converters.showerdata import (  # noqa: E402
    events_to_showerdata,
    export_showerdata,
    import_showerdata,
    is_showerdata,
    open_showerdata,
    showerdata_to_events,
)
from calopc.geometry import Geometry  # noqa: E402
from calopc.io import ShowerFileError, open_showers, write_showers  # noqa: E402
from calopc.synth import generate  # noqa: E402

DS2 = Geometry.calochallenge("2")


@pytest.fixture(scope="module")
def ds2_file(tmp_path_factory):
    inc, sh = generate("2", 40, seed=3)
    sh[5] = 0.0  # an empty shower
    p = tmp_path_factory.mktemp("sd") / "ds2.hdf5"
    write_showers(p, inc, sh)
    return p, inc, sh


def _read(path):
    with open_showers(path) as f:
        inc, sh = f.read()
        return inc, sh, f.dtype, f.incident_dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_voxels_round_trip_through_showerdata_is_exact(tmp_path, ds2_file, dtype):
    """HDF5 -> showerdata -> HDF5 gives the same cells, energies, incident energies and dtypes, bit for bit."""
    _, inc, sh = ds2_file
    src = tmp_path / "in.hdf5"
    write_showers(src, inc.astype(dtype), sh.astype(dtype))
    sd = export_showerdata(src, tmp_path / "x.h5", progress=False)
    assert is_showerdata(sd)
    stats = import_showerdata(sd, tmp_path / "back.hdf5", progress=False)
    assert stats.n_collisions == 0 and stats.n_outside == 0 and stats.n_points == int((sh > 0).sum())
    inc2, sh2, dt, idt = _read(tmp_path / "back.hdf5")
    assert dt == dtype and idt == dtype
    assert np.array_equal(sh2, sh.astype(dtype)) and np.array_equal(inc2, inc.astype(dtype))


def test_parquet_round_trip_through_showerdata_is_exact(tmp_path, ds2_file):
    """calopc Parquet -> showerdata -> Parquet gives identical events (cells, energies, incident energies)."""
    src, _, _ = ds2_file
    pq = convert_file(src, tmp_path / "a.parquet", progress=False)
    sd = export_showerdata(pq, tmp_path / "a.h5", progress=False)
    import_showerdata(sd, tmp_path / "b.parquet", progress=False)
    a, ga = read_points(pq)
    b, gb = read_points(tmp_path / "b.parquet")
    assert ga == gb == DS2
    for f in ("cell", "E"):
        assert ak.all(a.points[f] == b.points[f])
        assert ak.all(ak.num(a.points[f]) == ak.num(b.points[f]))
    assert np.array_equal(np.asarray(a.incident_energy), np.asarray(b.incident_energy))


def test_non_official_geometry_travels_with_the_file(tmp_path, toy_geometry, toy_showers):
    """A binning XML geometry is recorded in the file: importing needs no --geometry and is exact."""
    _, sh = toy_showers
    inc = 1.5 * np.maximum(sh.sum(axis=1), 1.0)  # a plausible response (deposited / incident energy of order 1)
    write_showers(tmp_path / "toy.hdf5", inc, sh)
    sd = export_showerdata(tmp_path / "toy.hdf5", tmp_path / "toy.h5", geometry=toy_geometry, progress=False)
    with open_showerdata(sd) as f:
        assert f.geometry == toy_geometry and f.has_exact
    import_showerdata(sd, tmp_path / "back.hdf5", progress=False)
    with open_showers(tmp_path / "back.hdf5", geometry=toy_geometry) as f:
        assert np.array_equal(f.read()[1], sh)


def test_showerdata_reads_what_calopc_writes(tmp_path, ds2_file):
    """showerdata.load sees x, y (mm), z = layer, E (GeV) at the cell centres, GeV incident energies, pdg 11."""
    src, inc, sh = ds2_file
    sd = export_showerdata(src, tmp_path / "x.h5", progress=False)
    s = showerdata.load(sd)
    hits = (sh > 0).sum(axis=1)
    assert showerdata.get_file_shape(sd) == (40, int(hits.max()), 4)
    assert len(s) == 40 and s.points.shape == (40, int(hits.max()), 4)
    assert np.array_equal(s.energies[:, 0], (inc / 1000).astype(np.float32))
    assert (s.pdg == 11).all() and np.array_equal(s.directions, np.tile([0, 0, 1], (40, 1)).astype(np.float32))
    for i in (0, 5, 17):
        cell = np.flatnonzero(sh[i])
        p = s.points[i, :hits[i]]
        r, a = DS2.cell_r[cell], DS2.cell_alpha[cell]
        assert np.allclose(p[:, 0], r * np.cos(a), atol=1e-5) and np.allclose(p[:, 1], r * np.sin(a), atol=1e-5)
        assert np.array_equal(p[:, 2], DS2.cell_layer[cell].astype(np.float32))
        assert np.array_equal(p[:, 3], (sh[i, cell] / 1000).astype(np.float32))
        assert not s.points[i, hits[i]:].any()  # padding
    per_layer = showerdata.observables.calc_energy_per_layer(s[:3], num_layers=45)
    want = sh[:3].reshape(3, 45, -1).sum(axis=2) / 1000
    assert np.allclose(per_layer, want, rtol=1e-4)
    with showerdata.ShowerDataFile(sd) as f:  # the file class reads it too
        assert f.shape == (40, int(hits.max()), 4) and f[3] == s[3]


def _flc_file(path, points, energies_gev):
    """A file written by showerdata's own writer."""
    showerdata.Showers(points=np.asarray(points, dtype=np.float32), energies=np.asarray(energies_gev, np.float32),
                       pdg=11).save(path)
    return path


def _cell(r, alpha, layer, g=DS2):
    return int(g.locate(np.array([r]), np.array([alpha]), np.array([float(layer)]))[0])


@pytest.fixture
def flc(tmp_path):
    """Two points in one dataset-2 cell (0.5 and 0.25 GeV), one point elsewhere, one outside the calorimeter."""
    pts = np.zeros((2, 4, 4), dtype=np.float32)
    for k, (r, a, z, e) in enumerate([(2.0, 0.1, 0.2, 0.5), (3.0, 0.2, -0.3, 0.25), (10.0, -1.0, 5.4, 0.125),
                                      (50.0, 0.0, 3.0, 1.0)]):
        pts[0, k] = (r * math.cos(a), r * math.sin(a), z, e)
    pts[1, 0] = (0.0, 1.0, 44.0, 0.0625)  # the second shower: one point
    return _flc_file(tmp_path / "flc.h5", pts, [[10.0], [2.0]])


def test_foreign_points_are_binned_with_the_collision_policy(tmp_path, flc):
    """Points of showerdata's writer off the cell centres land in their cells; a shared cell follows --collisions."""
    shared, other = _cell(2.0, 0.1, 0), _cell(10.0, -1.0, 5)
    lone = _cell(1.0, math.pi / 2, 44)
    assert shared == _cell(3.0, 0.2, 0)  # the two points share a cell
    out = {}
    for policy in ("sum", "max", "nearest-free"):
        stats = import_showerdata(flc, tmp_path / f"{policy}.hdf5", geometry="2", collisions=policy, max_outside=0.5,
                                  progress=False)
        assert stats.n_points == 5 and stats.n_outside == 1 and stats.n_collisions == 1
        inc, sh, _, _ = _read(tmp_path / f"{policy}.hdf5")
        assert np.array_equal(inc, [10000.0, 2000.0])
        assert sh[0, other] == 125.0 and sh[1, lone] == 62.5 and np.count_nonzero(sh[1]) == 1
        out[policy] = sh[0]
    assert out["sum"][shared] == 750.0 and np.count_nonzero(out["sum"]) == 2
    assert out["max"][shared] == 500.0 and np.count_nonzero(out["max"]) == 2
    nf = out["nearest-free"]
    moved = set(np.flatnonzero(nf)) - {shared, other}
    assert nf[shared] == 500.0 and len(moved) == 1 and nf[moved.pop()] == 250.0
    assert DS2.cell_layer[np.flatnonzero(nf)].tolist().count(0) == 2  # moved within its layer


def test_auto_policy_of_foreign_points_is_nearest_free(tmp_path, flc):
    """--collisions auto treats showerdata points as continuous points: nearest-free."""
    import_showerdata(flc, tmp_path / "auto.parquet", geometry="2", max_outside=0.5, progress=False)
    ev, _ = read_points(tmp_path / "auto.parquet")
    assert ak.num(ev.points, axis=1).tolist() == [3, 1]
    assert sorted(np.asarray(ev.points.E[0]).tolist()) == [125.0, 250.0, 500.0]


def test_too_many_points_outside_is_an_error(tmp_path, flc):
    """Points outside the calorimeter beyond --max-outside stop the import with one line naming the geometry."""
    with pytest.raises(ShowerFileError, match=r"flc.h5: 1 of 5 points \(20.0%\) .* outside geometry '2'"):
        import_showerdata(flc, tmp_path / "x.hdf5", geometry="2", progress=False)
    assert not (tmp_path / "x.hdf5").exists()


def test_changed_points_are_binned_not_replaced_by_the_stored_copy(tmp_path, ds2_file):
    """When the points no longer match calopc's exact copy, the points win (with a warning)."""
    src, _, sh = ds2_file
    sd = export_showerdata(src, tmp_path / "x.h5", progress=False)
    with h5py.File(sd, "a") as f:
        row = f["showers"][0].copy()
        row[3] *= 2  # double the energy of the first point of shower 0
        f["showers"][0] = row
    with pytest.warns(UserWarning, match="differ from the exact copy"):
        import_showerdata(sd, tmp_path / "back.hdf5", collisions="sum", progress=False)
    _, back, _, _ = _read(tmp_path / "back.hdf5")
    first = np.flatnonzero(sh[0])[0]
    assert back[0, first] == pytest.approx(2 * sh[0, first], rel=1e-6)
    assert np.array_equal(np.flatnonzero(back[1]), np.flatnonzero(sh[1]))  # cells still at their place
    assert np.allclose(back[1], sh[1], rtol=1e-6)  # energies now from float32 GeV


def test_in_memory_conversion_builds_a_showers_object(ds2_file):
    """events_to_showerdata gives the arrays of showerdata.Showers; showerdata_to_events puts them back in cells."""
    _, inc, sh = ds2_file
    ev = voxels_to_points(sh[:6], DS2, incident_energies=inc[:6])
    d = events_to_showerdata(ev, DS2)
    s = showerdata.Showers(**d)
    assert len(s) == 6 and np.array_equal(s._num_points, (sh[:6] > 0).sum(axis=1))  # noqa: SLF001
    back = showerdata_to_events(s.points, s.energies, d["num_points"])
    v = points_to_voxels(back, DS2, collisions="sum")
    assert np.array_equal(v > 0, sh[:6] > 0) and np.allclose(v, sh[:6], rtol=1e-6)
    assert np.allclose(np.asarray(back.incident_energy), inc[:6], rtol=1e-6)


def test_continuous_points_are_written_as_they_are(tmp_path):
    """Model output without cells is exported point by point (no exact copy, nothing binned)."""
    from calopc.converters import write_points

    ev = ak.Array([{"incident_energy": 5000.0, "points": [{"r": 1.0, "alpha": 0.5, "z": 2.25, "E": 3.0},
                                                          {"r": 1.1, "alpha": 0.5, "z": 2.5, "E": 4.0}]}])
    write_points(tmp_path / "c.parquet", ev, DS2)
    sd = export_showerdata(tmp_path / "c.parquet", tmp_path / "c.h5", progress=False)
    with h5py.File(sd) as f:
        assert "calopc" not in f
    p = showerdata.load(sd).points[0]
    assert np.allclose(p[:, 2], [2.25, 2.5]) and np.allclose(p[:, 3], [0.003, 0.004])
    assert np.allclose(np.hypot(p[:, 0], p[:, 1]), [1.0, 1.1], rtol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _edit(src, dst, fn):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        fn(f)
    return dst


def _replace(f, key, data):
    del f[key]
    f.create_dataset(key, data=data)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda f: f.__delitem__("num_points"), r"dataset 'num_points' not found; expected the showerdata keys"),
    (lambda f: _replace(f, "shape", np.array([2, 4], np.int32)),
     r"dataset 'shape': expected 3 integers \(N, max points, features\), found shape \(2,\)"),
    (lambda f: _replace(f, "shape", np.array([2, 4, 3], np.int32)),
     r"dataset 'shape': expected at least 4 features per point \(x, y, z, E\), found 3"),
    (lambda f: _replace(f, "num_points", np.array([4, 2], np.int32)),
     r"dataset 'showers', shower 1: expected num_points × 4 = 8 numbers, found 4"),
    (lambda f: _replace(f, "energies", np.array([[10.0], [-2.0]], np.float32)),
     r"dataset 'energies': expected finite incident energies > 0 GeV, found -2.0 \(shower 1"),
    (lambda f: _replace(f, "energies", np.array([[10.0]], np.float32)),
     r"dataset 'energies': expected shape \(2, 1\) floats \(incident energies, GeV\), found shape \(1, 1\)"),
])
def test_bad_files_are_one_line_naming_file_key_expected_found(tmp_path, flc, edit, expected):
    bad = _edit(flc, tmp_path / "bad.h5", edit)
    with pytest.raises(ShowerFileError, match=r"bad.h5.*" + expected):
        import_showerdata(bad, tmp_path / "out.hdf5", geometry="2", max_outside=0.5, progress=False)


def test_nan_point_is_named(tmp_path, flc):
    def nan(f):
        row = f["showers"][0].copy()
        row[5] = np.nan
        f["showers"][0] = row

    bad = _edit(flc, tmp_path / "bad.h5", nan)
    with pytest.raises(ShowerFileError, match=r"bad.h5 showers 0:2: dataset 'showers': expected finite x, y, z, "
                                              r"found point \[.*nan.*\] \(shower 0; 1 such points\)"):
        import_showerdata(bad, tmp_path / "out.hdf5", geometry="2", max_outside=0.5, progress=False)


def test_no_geometry_is_an_error(tmp_path, flc):
    with pytest.raises(ShowerFileError, match="flc.h5: a showerdata file records no CaloChallenge geometry; pass one"):
        import_showerdata(flc, tmp_path / "out.parquet", progress=False)


# ----------------------------------------------------------------------------- command line
def test_convert_to_and_from_showerdata(tmp_path, ds2_file, capsys):
    src, inc, sh = ds2_file
    assert main(["convert", str(src), "--to", "showerdata", "-o", str(tmp_path / "x.h5"), "--no-progress"]) == 0
    assert showerdata.get_file_length(tmp_path / "x.h5") == 40
    assert main(["convert", str(tmp_path / "x.h5"), "--from", "showerdata", "-o", str(tmp_path / "y.hdf5"),
                 "--no-progress"]) == 0
    assert "0 collisions" in capsys.readouterr().out
    _, back, _, _ = _read(tmp_path / "y.hdf5")
    assert np.array_equal(back, sh)


def test_convert_defaults_are_unchanged_and_refuse_showerdata_input(tmp_path, ds2_file, flc, capsys):
    src, _, _ = ds2_file
    assert main(["convert", str(src), "-o", str(tmp_path / "plain.parquet"), "--no-progress"]) == 0
    assert read_points(tmp_path / "plain.parquet")[1] == DS2
    assert main(["convert", str(flc), "-o", str(tmp_path / "z.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == (f"calopc convert: error: {flc}: is a showerdata file (FLC point clouds), not CaloChallenge voxels; "
                   "convert it with --from showerdata --geometry DATASET")
    assert main(["convert", str(flc), "--from", "showerdata", "--geometry", "2", "-o", str(tmp_path / "z.parquet"),
                 "--no-progress"]) == 2
    assert "1 of 5 points (20.0%)" in capsys.readouterr().err
    assert main(["convert", str(flc), "--from", "showerdata", "--geometry", "2", "-o", str(tmp_path / "z.parquet"),
                 "--max-outside", "0.5", "--collisions", "sum", "--no-progress"]) == 0
    assert "1 collisions" in capsys.readouterr().out


def test_a_failed_export_leaves_no_file(tmp_path, ds2_file):
    """Bad input found mid-way (a NaN cell in shower 30) stops the export; neither output nor temporary file remains."""
    _, inc, sh = ds2_file
    bad = sh.copy()
    bad[30, 7] = np.nan
    write_showers(tmp_path / "bad.hdf5", inc, bad)
    with pytest.raises(ShowerFileError, match=r"bad.hdf5 rows .*: dataset 'showers' holds non-finite values"):
        export_showerdata(tmp_path / "bad.hdf5", tmp_path / "out.h5", step_size=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.hdf5"]
