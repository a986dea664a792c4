"""Data at scale: direct gzip chunk I/O, the compact Parquet layout, dataset folders and the lazy reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from calopc._h5direct import DeflateWriter, chunk_plan
from calopc.converters import (
    PointsDataset,
    convert_file,
    convert_files,
    file_info,
    open_points,
    points_paths,
    points_to_voxels,
    read_points,
    voxelize_file,
    voxels_to_points,
    write_points,
)
from calopc.geometry import Geometry
from calopc.io import ShowerFileError, open_showers, write_showers
from calopc.synth import generate

DATA = Path(__file__).parent / "data"
G2 = Geometry.calochallenge("2")


@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    inc, sh = generate("2", 230, seed=9)
    sh[5] = 0.0
    p = tmp_path_factory.mktemp("scale") / "ds2.hdf5"
    write_showers(p, inc, sh)
    return p, inc, sh


def _h5(path, showers, incident=None, **kw):
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=showers, **kw)
        inc = np.linspace(1e3, 2e3, showers.shape[0]) if incident is None else incident
        f["incident_energies"] = inc.reshape(-1, 1)
    return path


def _dense(counts, cell, e, n_vox, dtype=np.float64):
    out = np.zeros((len(counts), n_vox), dtype=dtype)
    out[np.repeat(np.arange(len(counts)), counts), cell] = e
    return out


# ============================================================================ direct chunk reading
@pytest.mark.parametrize(("chunks", "dtype"), [((7, 6480), "<f8"), ((5, 1000), "<f8"), ((16, 6480), ">f4"),
                                                ((3, 6480), "<f2")])
def test_direct_reader_equals_h5py(tmp_path, ds2, chunks, dtype):
    """Row chunks, chunks split across columns, partial edge chunks, big-endian and half floats."""
    _, inc, sh = ds2
    x = sh[:61].astype(dtype)
    p = _h5(tmp_path / "c.hdf5", x, inc[:61], chunks=chunks, compression="gzip", compression_opts=6)
    with open_showers(p) as f:
        assert f._plan is not None
        for start, stop in ((0, 61), (3, 40), (13, 14), (60, 61)):
            e, s = f.read(start, stop)
            assert s.dtype == np.dtype(dtype).newbyteorder("=") and np.array_equal(s, x[start:stop].astype(s.dtype))
            assert np.array_equal(e, inc[start:stop])
        parts = list(f.iterate_sparse(9, start=2))
    assert [p_[0] for p_ in parts] == list(range(2, 61, 9))
    back = np.concatenate([_dense(c, cell, e, 6480, x.dtype.newbyteorder("=")) for _, _, c, cell, e in parts])
    assert np.array_equal(back, x[2:].astype(back.dtype))


@pytest.mark.parametrize("fill", [0.0, 2.5])
def test_unwritten_chunks_read_as_fill_value(tmp_path, fill):
    """Chunks never written hold the dataset's fill value, zero or not, in the dense and the sparse reader."""
    p = tmp_path / "holes.hdf5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("showers", shape=(40, 368), chunks=(10, 368), compression="gzip", fillvalue=fill,
                               dtype="f8")
        ds[10:20] = 1.5  # chunks 0, 2 and 3 never written
        f["incident_energies"] = np.ones((40, 1))
        ref = ds[:]
    with open_showers(p) as f:
        assert f._plan is not None and len(f._plan._index) == 1
        _, s = f.read()
        parts = list(f.iterate_sparse(15))
    assert np.array_equal(s, ref) and s[10:20].min() == 1.5 and (s[:10] == fill).all() and (s[20:] == fill).all()
    assert np.array_equal(np.concatenate([_dense(c, cl, e, 368) for _, _, c, cl, e in parts]), ref)


def test_a_file_with_a_userblock_reads_directly_and_correctly(tmp_path):
    """HDF5 locates the raw chunks itself: a userblock before the HDF5 data shifts nothing."""
    x = np.random.default_rng(1).random((50, 368))
    p = tmp_path / "ub.hdf5"
    with h5py.File(p, "w", userblock_size=512) as f:
        f.create_dataset("showers", data=x, chunks=(10, 368), compression="gzip")
        f["incident_energies"] = np.ones((50, 1))
    with open_showers(p) as f:
        assert f._plan is not None
        _, s = f.read()
        parts = list(f.iterate_sparse(7))
    assert np.array_equal(s, x)
    assert np.array_equal(np.concatenate([_dense(c, cl, e, 368) for _, _, c, cl, e in parts]), x)


def test_other_file_drivers_read_directly(tmp_path, ds2):
    """The direct reader asks h5py for the raw chunks: a file opened with another driver reads the same."""
    from calopc._h5direct import chunk_plan

    _, inc, sh = ds2
    p = _h5(tmp_path / "d.hdf5", sh, inc, chunks=(16, 6480), compression="gzip")
    out = np.full_like(sh, -1.0)
    with h5py.File(p, "r", driver="stdio") as f:
        plan = chunk_plan(f["showers"])
        assert plan is not None
        for _ in plan.map_bands(lambda r0, r1, band: out.__setitem__(slice(r0, r1), band), 0, len(sh), threads=2):
            pass
    assert np.array_equal(out, sh)


@pytest.mark.parametrize("kw", [{"compression": "gzip", "shuffle": True}, {"compression": "lzf"}, {},
                                {"compression": "gzip", "fletcher32": True}, {"chunks": (4, 368)}])
def test_other_layouts_fall_back_to_h5py(tmp_path, kw):
    inc, sh = generate("1-photons", 20, seed=1)
    p = _h5(tmp_path / "o.hdf5", sh, inc, **kw)
    with open_showers(p) as f:
        assert f._plan is None
        _, s = f.read()
        parts = list(f.iterate_sparse(6))
    assert np.array_equal(s, sh)
    assert np.array_equal(np.concatenate([_dense(c, cl, e, 368) for _, _, c, cl, e in parts]), sh)


def test_direct_io_can_be_switched_off(tmp_path, ds2, monkeypatch):
    monkeypatch.setenv("CALOPC_DIRECT_IO", "0")
    with open_showers(ds2[0]) as f:
        assert f._plan is None


@pytest.mark.parametrize(("value", "match"), [(np.nan, r"rows \d+:\d+: dataset 'showers' holds non-finite values "
                                                       r"\(first at index \(4, 17\): nan\)"),
                                               (-2.0, r"holds negative values \(first at index \(4, 17\): -2.0\); "
                                                      "expected energies >= 0 MeV")])
def test_sparse_scan_validates_every_value(tmp_path, value, match):
    inc, sh = generate("1-photons", 20, seed=1)
    sh[4, 17] = value
    p = _h5(tmp_path / "bad.hdf5", sh, inc, chunks=(3, 368), compression="gzip")
    with open_showers(p) as f, pytest.raises(ShowerFileError, match=match):
        list(f.iterate_sparse(100))


def test_corrupt_chunk_is_one_clear_error(tmp_path, ds2):
    p = tmp_path / "corrupt.hdf5"
    shutil.copy(ds2[0], p)
    with h5py.File(p) as f:
        info = f["showers"].id.get_chunk_info_by_coord((0, 0))
        offset, size = info.byte_offset, info.size
    with p.open("r+b") as fh:
        fh.seek(offset + size // 2)
        fh.write(b"\xff" * 64)
    with open_showers(p) as f, pytest.raises(ShowerFileError, match=r"corrupt.hdf5: failed to read rows 0:"):
        list(f.iterate_sparse(50))


def test_sparse_scan_threshold_matches_voxels_to_points(ds2):
    src, inc, sh = ds2
    with open_showers(src) as f:
        f.threads = 3
        parts = list(f.iterate_sparse("1 MB", threshold=0.5))
    counts = np.concatenate([p[2] for p in parts])
    ref = voxels_to_points(sh, G2, threshold=0.5)
    assert np.array_equal(counts, ak.num(ref.points, axis=1))
    assert np.array_equal(np.concatenate([p[3] for p in parts]), ak.flatten(ref.points.cell))
    assert np.array_equal(np.concatenate([p[4] for p in parts]), ak.flatten(ref.points.E))


# ============================================================================ parallel gzip writing
def test_deflate_writer_writes_plain_gzip_hdf5(tmp_path, ds2):
    _, inc, sh = ds2
    p = tmp_path / "w.hdf5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("showers", shape=(0, 6480), maxshape=(None, 6480), chunks=(16, 6480),
                              compression="gzip", dtype="f4")
        w = DeflateWriter(ds, threads=3)
        for a, b in ((0, 5), (5, 40), (40, 41), (41, 100)):  # partial chunks, several chunks at once
            w.append(sh[a:b])
        w.flush()  # the partial last chunk stored ...
        w.append(sh[100:230])  # ... and stored again once more rows fill it
        w.close()
    with h5py.File(p) as f:  # plain h5py (its own gzip filter) reads it
        ds = f["showers"]
        assert ds.compression == "gzip" and ds.shape == (230, 6480)
        assert np.array_equal(ds[:], sh.astype(np.float32))


def test_deflate_writer_memory_grows_with_threads_not_with_rows(tmp_path):
    """Back-pressure: at most 2 chunks per thread + 1 wait to be stored, so the peak is a + T*b chunks, not N.

    Incompressible rows (random floats), 48 chunks appended one at a time. Per thread: the chunk being
    compressed, libdeflate's output buffer and two queued chunks (block or compressed bytes): 4 chunks; plus
    the partial-chunk buffer, the chunk being stored and one more queued: 4 chunks.
    """
    import tracemalloc

    rows, cols, n_chunks = 8, 4096, 48
    chunk = rows * cols * 8
    rng = np.random.default_rng(0)
    buf = np.empty((rows, cols))
    for threads in (1, 2, 4):
        with h5py.File(tmp_path / f"w{threads}.hdf5", "w") as f:
            ds = f.create_dataset("x", shape=(0, cols), maxshape=(None, cols), chunks=(rows, cols),
                                  compression="gzip", compression_opts=1, dtype="f8")
            tracemalloc.start()
            try:
                w = DeflateWriter(ds, threads=threads)
                for _ in range(n_chunks):
                    rng.random(out=buf)
                    w.append(buf)
                w.close()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert ds.shape == (rows * n_chunks, cols)
        assert peak <= (4 + 4 * threads) * chunk, (threads, peak / chunk)


def test_reader_memory_grows_with_threads_not_with_rows(tmp_path, monkeypatch):
    """peak(T) <= a + T*b bands for T = 1, 2, 4 inflating threads, with a consumer slower than the readers.

    Every cell is non-zero, so a band's sparse result (int32 cell + float64 E) is 1.5 bands. The consumer
    stops at the first step until the readers make no more progress. Per thread: the raw and the inflated
    chunk, the scan's temporaries (index, energies, shower offsets: about 5 bands) and two results in the
    lookahead (3 bands): 11 bands; plus the two extra lookahead results and the step being consumed: 6 bands.
    Without a lookahead bound every band of the file would be read ahead (96 bands, 144 in results).
    """
    import threading
    import time
    import tracemalloc

    from calopc._h5direct import RowChunks

    rows, n_bands = 5, 96
    band = rows * 6480 * 8
    x = np.random.default_rng(2).random((rows * n_bands, 6480)) + 0.5
    p = _h5(tmp_path / "dense.hdf5", x, chunks=(rows, 6480), compression="gzip", compression_opts=1)
    done = [0]
    lock = threading.Lock()
    real = RowChunks._band

    def counted(self, *a):
        out = real(self, *a)
        with lock:
            done[0] += 1
        return out

    monkeypatch.setattr(RowChunks, "_band", counted)

    def readers_idle() -> None:  # the first step waits here: the readers run ahead as far as they may
        deadline, last, since = time.monotonic() + 30, -1, time.monotonic()
        while time.monotonic() < deadline and done[0] < n_bands:
            if done[0] != last:
                last, since = done[0], time.monotonic()
            elif time.monotonic() - since > 0.2:
                return
            time.sleep(0.005)

    for threads in (1, 2, 4):
        done[0] = 0
        with open_showers(p) as f:
            f.threads = threads
            tracemalloc.start()
            try:
                n = 0
                for i, (_, inc, counts, cell, e) in enumerate(f.iterate_sparse(rows)):
                    if i == 0:
                        readers_idle()
                    n += len(inc)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert n == rows * n_bands
        assert peak <= (6 + 11 * threads) * band, (threads, peak / band)


def test_default_threads_are_capped(monkeypatch):
    """The default inflating threads: the usable CPUs, at most 8; CALOPC_IO_THREADS may ask for more."""
    import os

    from calopc import _h5direct

    monkeypatch.delenv("CALOPC_IO_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _h5direct.default_threads() == _h5direct.MAX_DEFAULT_THREADS == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert _h5direct.default_threads() == 2
    monkeypatch.setenv("CALOPC_IO_THREADS", "16")
    assert _h5direct.default_threads() == 16


def test_shower_writer_uses_direct_chunks_and_stays_readable(tmp_path, ds2, monkeypatch):
    _, inc, sh = ds2
    write_showers(tmp_path / "new.hdf5", inc, sh)
    monkeypatch.setenv("CALOPC_DIRECT_IO", "0")
    write_showers(tmp_path / "old.hdf5", inc, sh)
    with h5py.File(tmp_path / "new.hdf5") as a, h5py.File(tmp_path / "old.hdf5") as b:
        for k in ("showers", "incident_energies"):
            assert np.array_equal(a[k][:], b[k][:])
            assert a[k].compression == b[k].compression == "gzip" and a[k].chunks == b[k].chunks


# ============================================================================ compact Parquet
def test_compact_layout_columns_encodings_and_records(tmp_path, ds2):
    src, inc, sh = ds2
    out = convert_file(src, tmp_path / "c.parquet", progress=False, row_group_points=50_000)
    pf = pq.ParquetFile(out)
    meta = pf.schema_arrow.metadata
    assert meta[b"calopc.layout"] == b"cell-E"
    md = pf.metadata
    cols = {md.schema.column(i).path.rsplit(".", 1)[-1]: i for i in range(md.num_columns)}
    assert set(cols) == {"incident_energy", "cell", "E"}  # r, alpha, z are not stored
    rg = md.row_group(0)
    assert "DELTA_BINARY_PACKED" in rg.column(cols["cell"]).encodings
    assert "BYTE_STREAM_SPLIT" in rg.column(cols["E"]).encodings
    assert md.num_row_groups > 3  # row groups of about row_group_points points
    ev, g = read_points(out)
    ref = voxels_to_points(sh, g, incident_energies=inc)
    assert ev.type == ref.type and ak.array_equal(ev, ref)
    assert ak.fields(ev.points) == ["r", "alpha", "z", "E", "cell"]
    with open_points(out) as f:  # chunks across row groups equal the whole
        assert ak.array_equal(ak.concatenate(list(f.iterate(37))), ref)


def test_files_of_the_old_writer_still_read():
    """A file written by calopc before the compact layout (every point field stored)."""
    ref = np.load(DATA / "old_writer_ds1_photons.npz")
    ev, g = read_points(DATA / "old_writer_ds1_photons.parquet")
    assert g.name == "1-photons"
    assert ak.array_equal(ev, voxels_to_points(ref["sh"], g, incident_energies=ref["inc"]))
    with open_points(DATA / "old_writer_ds1_photons.parquet") as f:
        assert not f.compact
    assert np.array_equal(points_to_voxels(ev, g), ref["sh"])


def test_other_readers_open_the_files(tmp_path, ds2):
    src, inc, sh = ds2
    out = convert_file(src, tmp_path / "c.parquet", progress=False)
    t = pq.read_table(out)
    assert t.column("incident_energy").to_pylist() == inc.tolist()
    a = ak.from_parquet(out)
    assert str(a.type.content) == "{incident_energy: float64, points: var * {cell: int32, E: float64}}"
    assert np.array_equal(ak.num(a.points, axis=1), (sh > 0).sum(axis=1))
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(out)
    assert len(df) == 230 and list(df.columns) == ["incident_energy", "points"]


def test_continuous_points_are_stored_field_by_field(tmp_path, toy_geometry, toy_showers):
    inc, v = toy_showers
    ev = voxels_to_points(v, toy_geometry, incident_energies=inc)
    moved = ak.with_field(ev.points, ev.points.r + np.float32(0.1), "r")
    ev2 = ak.with_field(ev, moved, "points")
    write_points(tmp_path / "cont.parquet", ev2, toy_geometry)
    assert b"calopc.layout" not in pq.ParquetFile(tmp_path / "cont.parquet").schema_arrow.metadata
    back, _ = read_points(tmp_path / "cont.parquet")
    assert ak.array_equal(back, ev2)
    write_points(tmp_path / "cells.parquet", ev, toy_geometry)  # cell centres: compact
    assert pq.ParquetFile(tmp_path / "cells.parquet").schema_arrow.metadata[b"calopc.layout"] == b"cell-E"


def test_compact_file_with_cells_outside_is_an_error(tmp_path, ds2):
    src = ds2[0]
    out = convert_file(src, tmp_path / "c.parquet", progress=False)
    t = pq.read_table(out)
    pts = t.column("points").combine_chunks()
    cell = pts.values.field("cell").to_numpy().copy()
    cell[::10] = 99999
    import pyarrow as pa

    vals = pa.StructArray.from_arrays([pa.array(cell), pts.values.field("E")], fields=list(pts.type.value_type))
    new = pa.LargeListArray.from_arrays(pts.offsets, vals).cast(pts.type)
    pq.write_table(pa.Table.from_arrays([t.column("incident_energy"), new], schema=t.schema), tmp_path / "bad.parquet")
    with pytest.raises(ShowerFileError, match=r"bad.parquet showers 0:\d+: \d+ of \d+ points \(10.0%\) have a cell "
                                              r"index outside geometry '2'"):
        read_points(tmp_path / "bad.parquet")


@pytest.mark.parametrize("src_dtype", ["float64", "float32"])
def test_energy_dtype_float32(tmp_path, ds2, src_dtype):
    _, inc, sh = ds2
    x = sh.astype(src_dtype)
    src = tmp_path / "in.hdf5"
    write_showers(src, inc, x)
    out = convert_file(src, tmp_path / "f32.parquet", progress=False, energy_dtype="float32")
    ev, g = read_points(out)
    with open_points(out) as f:
        assert f.info["dtype"] == "float32"
        assert ("source_dtype" in f.info) == (src_dtype == "float64")
    e = np.asarray(ak.flatten(ev.points.E))
    ref = x[x > 0]
    assert e.dtype == np.float32
    assert np.all(np.abs(e.astype(np.float64) - ref) <= 2.0**-24 * ref)  # the documented precision
    voxelize_file(out, tmp_path / "back.hdf5", progress=False)
    with h5py.File(tmp_path / "back.hdf5") as f:
        back = f["showers"][:]
    assert back.dtype == np.float32
    if src_dtype == "float32":  # exact for float32 input
        assert np.array_equal(back, x)
    with pytest.raises(ValueError, match="energy dtype must be one of float64, float32"):
        convert_file(src, tmp_path / "x.parquet", progress=False, energy_dtype="float16")


# ============================================================================ datasets of several files
@pytest.fixture(scope="module")
def folder(tmp_path_factory, ds2):
    d = tmp_path_factory.mktemp("many")
    srcs = []
    for k in range(3):
        inc, sh = generate("2", 40 + 10 * k, seed=20 + k)
        srcs.append(d / f"part{k}.hdf5")
        write_showers(srcs[-1], inc, sh)
    out = convert_files([d / "part0.hdf5", str(d / "part[12].hdf5")], d / "ds", progress=False,
                        row_group_points=20_000)
    return d, srcs, out


def test_convert_files_writes_one_shard_per_input(folder):
    d, srcs, out = folder
    assert [p.name for p in out] == ["part0.parquet", "part1.parquet", "part2.parquet"]
    ev, g = read_points(d / "ds")
    parts = [read_points(p)[0] for p in out]
    assert len(ev) == 40 + 50 + 60 and ak.array_equal(ev, ak.concatenate(parts))
    for src, part in zip(srcs, parts):
        with open_showers(src) as f:
            inc, sh = f.read()
        assert np.array_equal(points_to_voxels(part, g), sh)


def test_folder_glob_and_list_are_the_same_dataset(folder):
    d, _, out = folder
    assert points_paths(d / "ds") == points_paths(str(d / "ds" / "*.parquet")) == out
    assert points_paths([out[2], out[0]]) == [out[2], out[0]]
    with open_points(str(d / "ds" / "part*.parquet")) as f:
        assert isinstance(f, PointsDataset) and len(f) == 150 and f.geometry == G2
        assert sum(len(c) for c in f.iterate(33)) == 150
    info = file_info(d / "ds")
    assert info["n_showers"] == 150 and "3 files" in info["kind"]
    voxelize_file(d / "ds", d / "all.hdf5", progress=False)
    with h5py.File(d / "all.hdf5") as f:
        assert f["showers"].shape == (150, 6480)


def test_dataset_errors_name_the_source(tmp_path, folder):
    d, _, out = folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: folder holds no Parquet files"):
        open_points(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"nothing\*.parquet: no file matches this pattern"):
        open_points(str(tmp_path / "nothing*.parquet"))
    mix = tmp_path / "mix"
    mix.mkdir()
    shutil.copy(out[0], mix / "a.parquet")
    inc, sh = generate("1-photons", 5, seed=1)
    write_points(mix / "b.parquet", voxels_to_points(sh, incident_energies=inc), Geometry.calochallenge("1-photons"))
    with pytest.raises(ShowerFileError, match=r"b.parquet: geometry '1-photons' \(368 voxels\) differs from"):
        open_points(mix)
    from calopc.io import OutputError

    (tmp_path / "x").mkdir()
    shutil.copy(d / "part0.hdf5", tmp_path / "x" / "part0.hdf5")
    with pytest.raises(OutputError, match="two inputs would both write"):
        convert_files([d / "part0.hdf5", tmp_path / "x" / "part0.hdf5"], tmp_path / "o", progress=False)


def test_convert_files_in_worker_processes(tmp_path, folder):
    d, srcs, out = folder
    res = convert_files(srcs[:2], tmp_path / "w", workers=2, progress=False, row_group_points=20_000)
    for a, b in zip(res, out[:2]):
        assert ak.array_equal(read_points(a)[0], read_points(b)[0])


def test_training_reads_a_dataset_folder(folder):
    pytest.importorskip("torch")
    from calopc.models.data import ShowerDataset

    d, _, out = folder
    a = ShowerDataset.from_parquet(d / "ds")
    b = ShowerDataset.from_parquet(out)
    assert len(a) == 150 and np.array_equal(a.cell, b.cell) and np.array_equal(a.offsets, b.offsets)


def test_cli_convert_many_and_read_folder(tmp_path, folder, capsys):
    from calopc.cli import main

    d, srcs, _ = folder
    assert main(["convert", str(d / "part*.hdf5"), "-o", str(tmp_path / "c") + "/", "--energy-dtype", "float32",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["part0.parquet", "part1.parquet", "part2.parquet"]
    assert main(["convert", str(srcs[0]), str(srcs[1]), "--no-progress"]) == 2
    assert "name the output folder of the dataset with -o DIR/" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_showers"] == 150 and info["dtype"] == "float32"


# ============================================================================ lazy reading
def test_lazy_dataset_equals_eager(folder):
    pytest.importorskip("dask_awkward")
    import calopc

    d, _, out = folder
    lazy = calopc.open_points_lazy(d / "ds")
    n_groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in out)
    assert lazy.npartitions == n_groups > 3
    eager, _ = read_points(d / "ds")
    assert lazy.divisions[-1] == len(eager)
    hits = ak.sum(lazy.points.z == 12, axis=1)  # hits in layer 12 per shower, lazily
    assert ak.array_equal(hits.compute(scheduler="sync"), ak.sum(eager.points.z == 12, axis=1))
    assert ak.array_equal(lazy.compute(scheduler="threads"), eager)


def test_one_name_one_meaning_lazy_reader_is_open_points_lazy():
    """``calopc.open_points_lazy`` is the lazy reader; the old top-level ``calopc.open_points`` still works but warns."""
    import calopc
    from calopc.converters import open_points, open_points_lazy

    assert calopc.open_points_lazy is open_points_lazy and open_points is not open_points_lazy
    with pytest.warns(DeprecationWarning, match=r"calopc\.open_points_lazy"):
        assert calopc.open_points is open_points_lazy
    assert "open_points_lazy" in dir(calopc) and "open_points" not in dir(calopc)


def test_lazy_reader_without_dask_says_what_to_install(folder, monkeypatch):
    import sys

    import calopc

    monkeypatch.setitem(sys.modules, "dask_awkward", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'calopc\[dask\]'"):
        calopc.open_points_lazy(folder[0] / "ds")


def test_iterate_memory_stays_bounded(tmp_path, ds2):
    """Chunks that do not end on row-group boundaries: the buffer must not grow chunk after chunk."""
    out = convert_file(ds2[0], tmp_path / "c.parquet", progress=False, row_group_points=7_000)
    with open_points(out) as f:
        assert f.num_row_groups > 20
        sizes = [len(ch.points.layout.content) for ch in f.iterate(13)]  # points held by each chunk's buffer
    assert max(sizes[len(sizes) // 2:]) < 3 * max(sizes[:3])
