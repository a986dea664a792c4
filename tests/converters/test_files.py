from __future__ import annotations

import awkward as ak
import h5py
import numpy as np
import pytest

from calopc.converters import (
    convert_file,
    file_info,
    open_points,
    read_points,
    voxelize_file,
    voxels_to_points,
    write_points,
)
from calopc.geometry import Geometry
from calopc.io import ShowerFileError, open_showers, write_showers
from calopc.synth import generate


@pytest.fixture(scope="module")
def ds2_file(tmp_path_factory):
    inc, sh = generate("2", 300, seed=5)
    sh[17] = 0.0  # an empty shower
    p = tmp_path_factory.mktemp("data") / "ds2.hdf5"
    write_showers(p, inc, sh)
    return p, inc, sh


@pytest.mark.parametrize("step", [7, "1 MB", "256 MB"])
def test_convert_and_voxelize_roundtrip(tmp_path, ds2_file, step):
    src, inc, sh = ds2_file
    pq = convert_file(src, tmp_path / "pts.parquet", step_size=step, progress=False)
    with open_points(pq) as f:
        assert len(f) == 300
        assert f.geometry == Geometry.calochallenge("2")
        assert f.info["source"] == "ds2.hdf5"
        chunks = list(f.iterate(64))
    assert [len(c) for c in chunks] == [64, 64, 64, 64, 44]
    events, geom = read_points(pq)
    assert ak.num(events.points, axis=1)[17] == 0
    assert np.array_equal(np.asarray(events.incident_energy), inc)
    out = tmp_path / "back.hdf5"
    stats = voxelize_file(pq, out, step_size=50, progress=False)
    assert stats.n_showers == 300 and stats.n_collisions == 0 and stats.n_outside == 0
    with h5py.File(out) as f:
        assert f["incident_energies"].shape == (300, 1)
        assert f["showers"].shape == (300, 6480)
        assert f["showers"].dtype == np.float64
        assert f["showers"].compression == "gzip"
        assert np.array_equal(f["showers"][:], sh)
        assert np.array_equal(f["incident_energies"][:, 0], inc)


def test_file_info(tmp_path, ds2_file):
    src, inc, sh = ds2_file
    info = file_info(src)
    hits = (sh > 0).sum(axis=1)
    assert info["dataset"] == "2" and info["n_showers"] == 300
    assert info["hits_mean"] == pytest.approx(hits.mean())
    assert info["hits_max"] == hits.max() and info["empty_showers"] == 1
    pq = convert_file(src, tmp_path / "p.parquet", progress=False)
    info2 = file_info(pq)
    assert info2["hits_mean"] == pytest.approx(info["hits_mean"])
    assert info2["e_dep_over_e_inc_mean"] == pytest.approx(info["e_dep_over_e_inc_mean"])


def test_write_points_custom_geometry(tmp_path, toy_geometry, toy_showers):
    inc, v = toy_showers
    ev = voxels_to_points(v, toy_geometry, incident_energies=inc)
    write_points(tmp_path / "toy.parquet", ev, toy_geometry)
    back, g = read_points(tmp_path / "toy.parquet")
    assert g == toy_geometry
    assert back.tolist() == ev.tolist()


def test_empty_file_roundtrip(tmp_path):
    write_showers(tmp_path / "e.hdf5", np.zeros(0), np.zeros((0, 368)))
    pq = convert_file(tmp_path / "e.hdf5", progress=False)
    assert len(read_points(pq)[0]) == 0
    voxelize_file(pq, tmp_path / "e2.hdf5", progress=False)
    with open_showers(tmp_path / "e2.hdf5") as f:
        assert len(f) == 0 and f.geometry.name == "1-photons"


# ---------------------------------------------------------------- bad input
def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize(
    ("datasets", "match"),
    [
        ({"incident_energies": np.ones((2, 1))}, r"dataset 'showers' not found; expected keys .* found \['incident_energies'\]"),
        ({"showers": np.ones((2, 368))}, "dataset 'incident_energies' not found"),
        ({"incident_energies": np.ones((2, 1)), "showers": np.ones((2, 100))}, r"shape \(2, 100\): no known geometry has 100 voxels.*368 \(dataset 1-photons\)"),
        ({"incident_energies": np.ones((3, 1)), "showers": np.ones((2, 368))}, "'incident_energies' has 3 rows but 'showers' has 2"),
        ({"incident_energies": np.ones((2, 2)), "showers": np.ones((2, 368))}, r"must have shape \(N, 1\), got \(2, 2\)"),
        ({"incident_energies": np.ones((2, 1)), "showers": np.ones((2, 368, 1))}, r"must have shape \(N, n_voxels\)"),
        ({"incident_energies": np.ones((2, 1)), "showers": np.ones((2, 368), dtype=np.int32)}, "dtype int32, expected floating"),
    ],
)
def test_bad_layout(tmp_path, datasets, match):
    p = _h5(tmp_path / "bad.hdf5", **datasets)
    with pytest.raises(ShowerFileError, match=match) as err:
        open_showers(p)
    assert str(p) in str(err.value)


@pytest.mark.parametrize(("value", "match"), [(np.nan, "non-finite"), (np.inf, "non-finite"), (-1.0, "negative")])
def test_bad_values_name_key_and_index(tmp_path, value, match):
    sh = np.ones((4, 368))
    sh[2, 10] = value
    p = _h5(tmp_path / "bad.hdf5", incident_energies=np.ones((4, 1)), showers=sh)
    with pytest.raises(ShowerFileError, match=rf"bad.hdf5 rows 0:4: dataset 'showers' holds {match} values \(first at index \(2, 10\)"):
        convert_file(p, tmp_path / "out.parquet", progress=False)
    assert not (tmp_path / "out.parquet").exists()
    assert not list(tmp_path.glob("*.part"))


def test_bad_incident_energy(tmp_path):
    p = _h5(tmp_path / "bad.hdf5", incident_energies=np.array([[1.0], [np.nan]]), showers=np.ones((2, 368)))
    with pytest.raises(ShowerFileError, match="'incident_energies' holds non-finite"):
        open_showers(p).read()


def test_truncated_and_garbage_files(tmp_path, ds2_file):
    src = ds2_file[0]
    data = src.read_bytes()
    (tmp_path / "trunc.hdf5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShowerFileError, match=r"trunc.hdf5: (cannot open as HDF5|failed to read rows)"):
        with open_showers(tmp_path / "trunc.hdf5") as f:
            f.read()
    (tmp_path / "junk.hdf5").write_bytes(b"hello world" * 100)
    with pytest.raises(ShowerFileError, match="junk.hdf5: cannot open as HDF5"):
        open_showers(tmp_path / "junk.hdf5")
    with pytest.raises(FileNotFoundError, match="missing.hdf5: no such file"):
        open_showers(tmp_path / "missing.hdf5")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + b"x" * 100)
    with pytest.raises(ShowerFileError, match="cannot open as Parquet"):
        open_points(tmp_path / "junk.parquet")


def test_interrupted_convert_leaves_nothing(tmp_path, ds2_file, monkeypatch):
    from calopc.converters import files

    calls = {"n": 0}
    real = files.PointsWriter.append_sparse

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(files.PointsWriter, "append_sparse", boom)
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        convert_file(ds2_file[0], out, step_size=50, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_kept_on_failure(tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"old")
    p = _h5(tmp_path / "bad.hdf5", incident_energies=np.ones((2, 1)), showers=-np.ones((2, 368)))
    with pytest.raises(ShowerFileError):
        convert_file(p, out, progress=False)
    assert out.read_bytes() == b"old"


def test_convert_refuses_to_overwrite_input(tmp_path, ds2_file):
    with pytest.raises(ValueError, match="overwrite the input"):
        convert_file(ds2_file[0], ds2_file[0], progress=False)
