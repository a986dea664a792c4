"""Faults and user mistakes: every case gives one line (or a clean exit code), nothing is lost or left behind.

Covered: bad and foreign inputs, outputs that would replace an input or a device, file-system
errors, interrupts, silent wrong results, option checks and the consistency of the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from calopc.cli import main
from calopc.converters import convert_file, file_info, open_points, read_points, voxelize_file, write_points
from calopc.geometry import Geometry, GeometryError
from calopc.io import (
    Interrupted,
    OutputError,
    ShowerFileError,
    check_not_input,
    check_writable,
    deferred_interrupts,
    json_dumps,
    json_safe,
    open_showers,
    progress_bar,
    shower_writer,
    sweep_stale_parts,
    write_showers,
)
from calopc.synth import generate

# the child starts with SIGINT at Python's default even when the test runner ignores it (background job)
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from calopc.cli import main; sys.exit(main())")


def _calopc(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def _one_line(err: str, cmd: str) -> str:
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"calopc {cmd}: ") and "Traceback" not in err
    return lines[0]


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.part"))


@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    """40 synthetic dataset-2 showers: HDF5 and the converted Parquet."""
    d = tmp_path_factory.mktemp("ds2")
    inc, sh = generate("2", 40, seed=3)
    write_showers(d / "ds2.hdf5", inc, sh)
    convert_file(d / "ds2.hdf5", d / "ds2.parquet", progress=False)
    return d / "ds2.hdf5", d / "ds2.parquet", inc, sh


def _rewrite_parquet(src: Path, dst: Path, *, points=None, incident=None, meta: dict | None = None,
                     drop_meta: tuple[bytes, ...] = ()) -> Path:
    """A copy of ``src`` with replaced columns and/or schema metadata (every point field stored, as older files)."""
    table = pq.read_table(src)
    events = read_points(src)[0]
    if points is not None or incident is not None:
        events = ak.zip({"incident_energy": events.incident_energy if incident is None else incident,
                         "points": events.points if points is None else points}, depth_limit=1)
    t = ak.to_arrow_table(events, extensionarray=False)
    m = {k: v for k, v in (table.schema.metadata or {}).items() if k not in (*drop_meta, b"calopc.layout")}
    m.update(meta or {})
    pq.write_table(t.replace_schema_metadata(m), dst)
    return dst


# ============================================================================ HDF5 inputs
@pytest.mark.parametrize(("sh_dtype", "inc_dtype"), [("f4", "f8"), ("f2", "f8"), ("f4", "f4")])
def test_mixed_dtypes_round_trip_exactly(tmp_path, sh_dtype, inc_dtype):
    inc, sh = generate("1-photons", 30, seed=1)
    inc = inc * 1.37  # not representable in float32 or float16: a cast would show
    src = tmp_path / "in.hdf5"
    with h5py.File(src, "w") as f:
        f["incident_energies"] = inc.reshape(-1, 1).astype(inc_dtype)
        f["showers"] = sh.astype(sh_dtype)
    convert_file(src, tmp_path / "p.parquet", progress=False)
    voxelize_file(tmp_path / "p.parquet", tmp_path / "back.hdf5", progress=False)
    with h5py.File(src) as a, h5py.File(tmp_path / "back.hdf5") as b:
        assert b["incident_energies"].dtype == a["incident_energies"].dtype
        assert b["showers"].dtype == a["showers"].dtype
        assert np.array_equal(a["incident_energies"][:], b["incident_energies"][:])
        assert np.array_equal(a["showers"][:], b["showers"][:])
    assert file_info(tmp_path / "back.hdf5")["n_showers"] == 30  # calopc reads back what it wrote


@pytest.mark.parametrize("dtype", [">f8", ">f4", "g"])
def test_big_endian_and_long_double_input(tmp_path, dtype):
    inc, sh = generate("1-photons", 12, seed=2)
    src = tmp_path / "be.hdf5"
    with h5py.File(src, "w") as f:
        f["incident_energies"] = inc.reshape(-1, 1).astype(dtype)
        f["showers"] = sh.astype(dtype)
    with open_showers(src) as f:
        e, s = f.read()
        assert s.dtype.isnative and s.dtype.itemsize <= 8 and e.dtype.isnative
    assert main(["convert", str(src), "-o", str(tmp_path / "be.parquet"), "--no-progress"]) == 0
    assert main(["voxelize", str(tmp_path / "be.parquet"), "-o", str(tmp_path / "back.hdf5"), "--no-progress"]) == 0
    with h5py.File(tmp_path / "back.hdf5") as f:
        assert np.array_equal(f["showers"][:], sh.astype(dtype).astype(np.float64).astype(f["showers"].dtype))


def test_zero_incident_energy_is_refused_everywhere(tmp_path, capsys):
    inc, sh = generate("1-photons", 5, seed=0)
    inc[3] = 0.0
    src = tmp_path / "z.hdf5"
    with h5py.File(src, "w") as f:
        f["incident_energies"] = inc.reshape(-1, 1)
        f["showers"] = sh
    for cmd in (["convert", str(src), "--no-progress"], ["info", str(src)]):
        assert main(cmd) == 2
        line = _one_line(capsys.readouterr().err, cmd[0])
        assert "z.hdf5" in line and "'incident_energies' holds zeros (first at index (3,))" in line


def test_info_prints_no_raw_runtime_warning(tmp_path):
    inc, sh = generate("1-photons", 5, seed=0)
    sh[2, 5] = 1e308
    sh[3, 5:8] = 1e308  # the sum overflows
    write_showers(tmp_path / "x.hdf5", inc, sh)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        info = file_info(tmp_path / "x.hdf5")
    assert info["n_showers"] == 5
    assert [str(w.message) for w in seen] == [f"{tmp_path / 'x.hdf5'}: a cell holds 1e+308 MeV, more than 1e+09 MeV "
                                              "(1 PeV): corrupt or wrongly scaled energies?"]


# ============================================================================ Parquet inputs
def test_points_outside_the_geometry_are_an_error(tmp_path, ds2, capsys):
    _, pqf, *_ = ds2
    ev = ak.from_parquet(pqf)
    cell = ak.to_numpy(ak.flatten(ev.points.cell)).copy()
    cell[::10] = 99999  # 10 % of the points
    pts = ak.with_field(ev.points, ak.unflatten(cell, ak.num(ev.points)), "cell")
    bad = _rewrite_parquet(pqf, tmp_path / "out.parquet", points=pts)
    for cmd in (["voxelize", str(bad), "-o", str(tmp_path / "v.hdf5")], ["info", str(bad)]):
        assert main(cmd) == 2
        line = _one_line(capsys.readouterr().err, cmd[0])
        assert "out.parquet" in line and "cell index outside geometry '2'" in line and "(10.0%)" in line
    assert not (tmp_path / "v.hdf5").exists() and not _parts(tmp_path)


@pytest.mark.parametrize("value", [-1, 6480])
def test_one_rule_for_invalid_cells_in_every_reader(tmp_path, ds2, capsys, value):
    """A single cell index outside the geometry: an error in voxelize, info and evaluate alike (train: tests/models),
    whatever --max-outside says (that limit is for continuous points only)."""
    _, pqf, *_ = ds2
    ev = ak.from_parquet(pqf)
    cell = ak.to_numpy(ak.flatten(ev.points.cell)).copy()
    cell[7] = value
    bad = _rewrite_parquet(pqf, tmp_path / "one.parquet",
                           points=ak.with_field(ev.points, ak.unflatten(cell, ak.num(ev.points)), "cell"))
    for argv in (["voxelize", str(bad), "-o", str(tmp_path / "v.hdf5"), "--max-outside", "0.5"], ["info", str(bad)],
                 ["evaluate", str(bad), str(ds2[0]), "-o", str(tmp_path / "rep"), "--metrics", "hist"]):
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert f"1 of " in line and f"cell index outside geometry '2' (0..6479; first: shower 0, cell {value})" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet"]


@pytest.mark.parametrize(("column", "values", "match"), [
    ("cell", "float", "column 'points.cell' has type double; expected integer cell indices"),
    ("E", "string", "string; expected numbers (energies in MeV"),
    ("incident_energy", "string", "string; expected numbers (incident energies in MeV"),
])
def test_columns_of_the_wrong_type_are_one_line_errors(tmp_path, ds2, capsys, column, values, match):
    _, pqf, *_ = ds2
    ev = ak.from_parquet(pqf)
    if column == "incident_energy":
        bad = _rewrite_parquet(pqf, tmp_path / "t.parquet", incident=[str(x) for x in ak.to_list(ev.incident_energy)])
    else:
        flat = ak.to_numpy(ak.flatten(ev.points[column]))
        new = flat + 0.5 if values == "float" else flat.astype(str)
        bad = _rewrite_parquet(pqf, tmp_path / "t.parquet",
                               points=ak.with_field(ev.points, ak.unflatten(new, ak.num(ev.points)), column))
    for argv in (["voxelize", str(bad), "-o", str(tmp_path / "v.hdf5")], ["info", str(bad)]):
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert "t.parquet" in line and match in line, line


def test_continuous_points_outside_are_an_error(tmp_path, ds2):
    _, pqf, *_ = ds2
    ev = read_points(pqf)[0]
    p = ev.points[["r", "alpha", "z", "E"]]
    r = ak.to_numpy(ak.flatten(p.r)).copy()
    r[::20] = 1e6  # 5 % far outside
    bad = _rewrite_parquet(pqf, tmp_path / "c.parquet", points=ak.with_field(p, ak.unflatten(r, ak.num(p)), "r"))
    match = r"c.parquet showers 0:\d+: \d+ of \d+ points \(5.0%\) lie outside geometry '2'"
    with pytest.raises(ShowerFileError, match=match):
        voxelize_file(bad, tmp_path / "v.hdf5", progress=False)


@pytest.mark.parametrize(("wrong", "match"), [("3", "geometry '3' does not match the points"),
                                              ("1-photons", "cell index outside geometry '1-photons'")])
def test_wrong_geometry_metadata_is_detected(tmp_path, ds2, capsys, wrong, match):
    _, pqf, *_ = ds2
    bad = _rewrite_parquet(pqf, tmp_path / "w.parquet",
                           meta={b"calopc.geometry": Geometry.calochallenge(wrong).to_json().encode()})
    for cmd in (["voxelize", str(bad), "-o", str(tmp_path / "v.hdf5")], ["info", str(bad)]):
        assert main(cmd) == 2
        line = _one_line(capsys.readouterr().err, cmd[0])
        assert match in line and "--geometry" in line
    assert not (tmp_path / "v.hdf5").exists()
    # --geometry overrides the metadata
    assert main(["voxelize", str(bad), "-o", str(tmp_path / "v.hdf5"), "--geometry", "2", "--no-progress"]) == 0
    with h5py.File(tmp_path / "v.hdf5") as f, h5py.File(ds2[0]) as g:
        assert np.array_equal(f["showers"][:], g["showers"][:])


@pytest.mark.parametrize(("meta", "match"), [
    (b'{"name": "2", "layer_ids', r"key 'calopc.geometry': geometry is not valid JSON"),
    (b'{"name": "2"}', r"key 'calopc.geometry': geometry is missing the field\(s\) layer_ids, r_edges, n_alpha"),
    (b'[1, 2]', r"key 'calopc.geometry': expected a geometry mapping"),
])
def test_corrupt_geometry_metadata_names_file_and_key(tmp_path, ds2, capsys, meta, match):
    bad = _rewrite_parquet(ds2[1], tmp_path / "m.parquet", meta={b"calopc.geometry": meta})
    for cmd in ("voxelize", "info"):
        argv = [cmd, str(bad)] + (["-o", str(tmp_path / "v.hdf5")] if cmd == "voxelize" else [])
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, cmd)
        assert "m.parquet" in line
        assert __import__("re").search(match, line), line


def test_geometry_from_dict_errors():
    with pytest.raises(GeometryError, match="missing the field"):
        Geometry.from_dict({"name": "x", "r_edges": [[0, 1]]})
    with pytest.raises(GeometryError, match="wrong type"):
        Geometry.from_dict({"name": "x", "layer_ids": [0], "r_edges": [["a", "b"]], "n_alpha": [1]})


@pytest.mark.parametrize("case", ["nan_E", "neg_E", "no_E", "nan_inc"])
def test_bad_point_values_name_the_file(tmp_path, ds2, capsys, case):
    _, pqf, *_ = ds2
    ev = read_points(pqf)[0]
    e = ak.to_numpy(ak.flatten(ev.points.E)).copy()
    kw = {}
    if case in ("nan_E", "neg_E"):
        e[50] = np.nan if case == "nan_E" else -1.0
        kw["points"] = ak.with_field(ev.points, ak.unflatten(e, ak.num(ev.points)), "E")
        match = "have a NaN, infinite or negative energy E (first: shower 0"
    elif case == "no_E":
        kw["points"] = ev.points[["r", "alpha", "z", "cell"]]
        match = "the points have no 'E' field"
    else:
        inc = ak.to_numpy(ev.incident_energy).copy()
        inc[7] = np.nan
        kw["incident"] = inc
        match = "incident energies are NaN, infinite or <= 0 (first: shower 7"
    bad = _rewrite_parquet(pqf, tmp_path / "b.parquet", **kw)
    for cmd in ("voxelize", "info"):
        argv = [cmd, str(bad)] + (["-o", str(tmp_path / "v.hdf5")] if cmd == "voxelize" else [])
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, cmd)
        assert "b.parquet" in line and match in line, line
    assert not (tmp_path / "v.hdf5").exists()


def _warning_lines(err: str, cmd: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith(f"calopc {cmd}: warning: ")]


def test_implausible_energies_warn_once_in_every_reader(tmp_path, ds2, capsys):
    """Cells in keV (x1000), incident energies in GeV (/1000) or a 1e30 MeV cell: one warning line naming the file,
    the value and the likely cause, in info, convert, evaluate's and train's readers; plausible files stay silent."""
    h5, pqf, inc, sh = ds2
    kev = tmp_path / "kev.hdf5"
    write_showers(kev, inc, sh * 1000)
    gev = tmp_path / "gev.parquet"
    with pytest.warns(UserWarning, match="cells in keV"):
        convert_file(kev, tmp_path / "kev.parquet", progress=False)
    events = read_points(pqf)[0]
    write_points(gev, ak.zip({"incident_energy": events.incident_energy / 1000, "points": events.points},
                             depth_limit=1), Geometry.calochallenge("2"))
    huge_sh = sh.copy()
    huge_sh[3, 17] = 1e30
    write_showers(tmp_path / "huge.hdf5", inc, huge_sh)
    capsys.readouterr()
    cases = [(["info", kev], r"kev.hdf5: median deposited / incident energy is 7\d\d(\.\d*)? .*: cells in keV, or "
                             r"incident energies in GeV\? Both must be in MeV"),
             (["convert", kev, "-o", tmp_path / "k2.parquet"], "kev.hdf5: median deposited / incident energy is 7"),
             (["info", tmp_path / "kev.parquet"], "kev.parquet: median deposited / incident energy is 7"),
             (["info", gev], r"gev.parquet: median deposited / incident energy is 7\d\d"),
             (["info", tmp_path / "huge.hdf5"], r"huge.hdf5: a cell holds 1e\+30 MeV, more than 1e\+09 MeV \(1 PeV\)"),
             (["info", h5], None), (["info", pqf], None)]
    for argv, match in cases:
        assert main([str(a) for a in argv] + ["--no-progress"]) == 0, argv
        lines = _warning_lines(capsys.readouterr().err, argv[0])
        if match is None:
            assert lines == [], lines
        else:
            assert len(lines) == 1 and re.search(match, lines[0]), lines
    from calopc.eval.samples import load_sample

    with pytest.warns(UserWarning, match="kev.hdf5: median deposited / incident energy is 7"):
        load_sample(kev, keep_voxels=False)
    torch = pytest.importorskip("torch")  # noqa: F841
    from calopc.models.data import _Sources

    src = _Sources(gev)
    with pytest.warns(UserWarning, match=r"gev.parquet: median deposited / incident energy is 7\d\d"):
        src.read_block(0)


def test_damaged_page_bytes_are_a_read_error_not_changed_energies(tmp_path, ds2, capsys):
    """Every data page carries a CRC32 that the readers verify: zeroed bytes inside the energies' page are one
    error line naming the file in info, voxelize, read_points and the training reader, not silently other values."""
    _, pqf, *_ = ds2
    bad = tmp_path / "zeroed.parquet"
    md = pq.ParquetFile(pqf).metadata
    col = next(md.row_group(0).column(i) for i in range(md.num_columns)
               if md.row_group(0).column(i).path_in_schema.endswith(".E"))
    assert col.total_compressed_size > 600
    data = bytearray(pqf.read_bytes())
    start = col.data_page_offset + col.total_compressed_size // 2
    data[start:start + 200] = bytes(200)  # inside the page's data, the page header untouched
    bad.write_bytes(bytes(data))
    with pytest.raises(ShowerFileError, match=r"zeroed.parquet: failed to read .*CRC checksum verification failed"):
        read_points(bad)
    for argv in (["info", bad], ["voxelize", bad, "-o", tmp_path / "v.hdf5"]):
        assert main([str(a) for a in argv]) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert "zeroed.parquet: failed to read row group 0 (corrupt or truncated file?)" in line and "CRC" in line
    pytest.importorskip("torch")
    from calopc.models.data import _Sources

    with pytest.raises(ShowerFileError, match="zeroed.parquet: failed to read row group 0 .*CRC"):
        _Sources(bad).read_block(0)


def test_files_without_page_checksums_still_read(tmp_path, ds2):
    _, pqf, *_ = ds2
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(pqf), plain, write_page_checksum=False)
    assert ak.array_equal(read_points(plain)[0], read_points(pqf)[0])


def test_hdf5_writer_refuses_invalid_incident_energies(tmp_path):
    out = tmp_path / "x.hdf5"
    match = r"x.hdf5: refusing to write showers 0:3: dataset 'incident_energies' holds non-finite"
    with pytest.raises(OutputError, match=match):
        with shower_writer(out, 368) as w:
            w.append(np.array([1.0, np.nan, 2.0]), np.zeros((3, 368)))
    assert not out.exists() and not _parts(tmp_path)


# ============================================================================ outputs that replace an input
def test_every_writer_refuses_its_input_as_output(tmp_path, ds2, capsys):
    h5, pqf, *_ = ds2
    link = tmp_path / "link.parquet"
    link.symlink_to(pqf)
    hard = tmp_path / "hard.hdf5"
    os.link(h5, hard)
    before = (h5.read_bytes(), pqf.read_bytes())
    cases = [
        ["voxelize", str(pqf), "-o", str(pqf)],
        ["voxelize", str(link), "-o", str(pqf)],
        ["convert", str(hard), "-o", str(h5)],
        ["evaluate", str(h5), str(pqf), "-o", str(h5)],
        ["evaluate", str(h5), str(pqf), "-o", str(h5.parent)],  # an input inside the report folder is fine...
    ]
    for argv in cases[:4]:
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert "overwrite the input" in line or "not a folder" in line, line
    assert (h5.read_bytes(), pqf.read_bytes()) == before
    # ...unless its name is one the report writes
    odd = tmp_path / "metrics.json"
    odd.write_text("{}")
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_not_input(tmp_path, [odd], folder=True, names=("metrics.json",))
    check_not_input(tmp_path, [h5], folder=True, names=("metrics.json",))


# ============================================================================ file-system errors
def test_output_is_a_folder_or_under_a_file(tmp_path, ds2, capsys):
    h5, pqf, *_ = ds2
    (tmp_path / "d.hdf5").mkdir()  # (convert -o FOLDER/ writes a dataset folder of shards: not an error)
    assert main(["voxelize", str(pqf), "-o", str(tmp_path / "d.hdf5")]) == 2
    assert "d.hdf5: is a folder; expected a file name" in _one_line(capsys.readouterr().err, "voxelize")
    (tmp_path / "f").write_text("x")
    assert main(["voxelize", str(pqf), "-o", str(tmp_path / "f" / "x.hdf5")]) == 2
    assert "is a file, but a folder is expected there" in _one_line(capsys.readouterr().err, "voxelize")
    assert main(["evaluate", str(h5), str(h5), "-o", str(tmp_path / "f")]) == 2
    assert "exists and is not a folder" in _one_line(capsys.readouterr().err, "evaluate")
    assert main(["demo", "-o", str(tmp_path / "f"), "-n", "2"]) == 2
    assert "exists and is not a folder" in _one_line(capsys.readouterr().err, "demo")


def _specials(tmp_path: Path) -> list[Path]:
    """A named pipe, and a private character device (a copy of /dev/null) where this process may create one."""
    import stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = [fifo]
    try:
        os.mknod(tmp_path / "chardev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        out.append(tmp_path / "chardev")
    except (PermissionError, OSError):
        pass  # mknod not permitted here: the FIFO case alone
    return out


def test_no_writer_replaces_a_device_or_a_named_pipe(tmp_path, ds2, capsys):
    """Every output is renamed over its target when complete: a device node or a FIFO target is refused first."""
    import stat

    h5, pqf, inc, sh = ds2
    for target in _specials(tmp_path):
        mode = os.stat(target).st_mode
        for argv in (["convert", h5, "-o", target], ["voxelize", pqf, "-o", target], ["synth", target, "-n", "2"],
                     ["demo", "-o", target, "-n", "2"]):
            assert main([str(a) for a in argv]) == 2, argv
            line = _one_line(capsys.readouterr().err, argv[0])
            assert f"{target}: exists and is a " in line and ("not a regular file" in line or "not a folder" in line)
        with pytest.raises(OutputError, match="exists and is a .*, not a regular file"):
            write_showers(target, inc[:2], sh[:2])
        with pytest.raises(OutputError, match="not a regular file"):
            write_points(target, read_points(pqf)[0][:2], Geometry.calochallenge("2"))
        assert os.stat(target).st_mode == mode and not stat.S_ISREG(mode)  # still the device / pipe
    assert not list(tmp_path.glob(".*.part"))


def test_a_device_appearing_while_the_output_is_written_is_not_replaced(tmp_path):
    """The last check before the rename: a FIFO created at the target meanwhile stays, the output is dropped."""
    from calopc._safety import atomic_output

    target = tmp_path / "o.bin"
    with pytest.raises(OutputError, match=r"o.bin: exists and is a named pipe \(FIFO\), not a regular file; the "
                                          r"output was not written"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"x")
            os.mkfifo(target)
    assert [p.name for p in tmp_path.iterdir()] == ["o.bin"]


def test_an_output_name_ending_in_slash_is_a_folder_or_refused(tmp_path, ds2, capsys):
    """convert -o NEW/ writes a dataset folder; synth and voxelize write one file and refuse a folder name."""
    h5, pqf, *_ = ds2
    assert main(["convert", str(h5), "-o", f"{tmp_path / 'newdir'}/", "--no-progress"]) == 0
    assert (tmp_path / "newdir").is_dir() and (tmp_path / "newdir" / "ds2.parquet").is_file()
    capsys.readouterr()
    for argv in (["voxelize", str(pqf), "-o", f"{tmp_path / 'vdir'}/"], ["synth", f"{tmp_path / 'sdir'}/", "-n", "2"],
                 ["synth", "-o", f"{tmp_path / 'sdir'}/", "-n", "2"]):
        assert main(argv) == 2, argv
        line = _one_line(capsys.readouterr().err, argv[0])
        assert "names a folder (it ends in /)" in line and "give a file name" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newdir"]
    with pytest.raises(OutputError, match=r"names a folder \(it ends in /\)"):
        write_showers(f"{tmp_path / 'apidir'}/", *ds2[2:])


def test_a_folder_holding_other_shards_is_named_when_converting_into_it(tmp_path, ds2, capsys):
    """Readers of a dataset folder include every shard in it: converting into one with older shards warns."""
    h5, pqf, *_ = ds2
    (tmp_path / "out").mkdir()
    shutil.copy(pqf, tmp_path / "out" / "old_run.parquet")
    assert main(["convert", str(h5), "-o", f"{tmp_path / 'out'}/", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "also holds 1 other Parquet file(s) (old_run.parquet); every reader" in err
    assert main(["convert", str(h5), "-o", f"{tmp_path / 'fresh'}/", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *, ro: bool = False):
    """A small tmpfs at ``path`` (root only); skips the test where mounting is not possible."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_or_forbidden_folder(tmp_path, ds2, capsys):
    h5, pqf, *_ = ds2
    if os.geteuid() == 0:
        ctx = _tmpfs(tmp_path / "ro", "1m", ro=True)
        reason = "read-only file system"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
        reason = "permission denied"
    with ctx as ro:
        for argv in (["convert", h5, "-o", ro / "x.parquet"], ["voxelize", pqf, "-o", ro / "x.hdf5"],
                     ["synth", ro / "s.hdf5", "-n", "2"], ["evaluate", h5, h5, "-o", ro / "rep"]):
            assert main([str(x) for x in argv]) == 2
            line = _one_line(capsys.readouterr().err, argv[0])
            assert f"{ro}" in line and reason in line and ".part" not in line, line
        assert list(ro.iterdir()) == []


def test_disk_full_gives_one_line_no_crash_and_keeps_the_old_output(tmp_path, capsys):
    inc, sh = generate("2", 150, seed=1)
    write_showers(tmp_path / "in.hdf5", inc, sh)
    pqf = convert_file(tmp_path / "in.hdf5", tmp_path / "in.parquet", progress=False)
    with _tmpfs(tmp_path / "small", "1m") as small:
        # HDF5 writers: ENOSPC inside h5py must not end in a segfault (h5py issue 914)
        for argv in (["synth", small / "s.hdf5", "-n", "100"], ["voxelize", pqf, "-o", small / "v.hdf5"]):
            r = _calopc(*argv)
            assert r.returncode == 2, (r.returncode, r.stderr)
            line = _one_line(r.stderr, argv[0])
            assert "no space left on device" in line and ".part" not in line
            assert list(small.iterdir()) == []
        # Parquet writer over an existing target: the old file stays
        old = small / "c.parquet"
        old.write_bytes(b"old")
        write_showers(tmp_path / "mid.hdf5", inc[:80], sh[:80])  # ~1.2 MB: passes the free-space estimate
        assert main(["convert", str(tmp_path / "mid.hdf5"), "-o", str(old), "--step-size", "1 MB",
                     "--no-progress"]) == 2
        assert "no space left on device" in _one_line(capsys.readouterr().err, "convert")
        assert old.read_bytes() == b"old" and sorted(small.iterdir()) == [old]
        # too little free space for the expected output: refused before any work
        assert main(["synth", str(small / "big.hdf5"), "-n", "5000"]) == 2
        assert "not enough free space" in _one_line(capsys.readouterr().err, "synth")
        assert main(["evaluate", str(tmp_path / "mid.hdf5"), str(tmp_path / "mid.hdf5"), "-o", str(small / "rep")]) == 2
        assert "not enough free space" in _one_line(capsys.readouterr().err, "evaluate")
        assert sorted(small.iterdir()) == [old]


def test_check_writable_free_space(tmp_path):
    with pytest.raises(OutputError, match="not enough free space"):
        check_writable(tmp_path / "x", expected_bytes=1e18)
    check_writable(tmp_path / "new" / "deeper" / "x.hdf5", expected_bytes=1)


# ============================================================================ interrupts
def _interrupt(argv: list, part_dir: Path, sig: int, delay: float) -> subprocess.CompletedProcess | None:
    """Run ``calopc argv``, send ``sig`` ``delay`` s after its temporary file appears; None if it ended before that.

    The process is checked to be still running just before the signal (a machine fast enough to finish
    the work first gives None, and the caller retries with more work or skips), so a completed run is
    never mistaken for an ignored signal.
    """
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _parts(part_dir) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if p.poll() is not None:  # finished (or failed) before the signal
        p.communicate()
        return None
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _clear(folder: Path) -> None:
    for q in folder.iterdir():
        shutil.rmtree(q) if q.is_dir() else q.unlink()


@pytest.mark.parametrize(("sig", "code", "delay"), [(signal.SIGINT, 130, 0.3), (signal.SIGTERM, 143, 0.1)])
def test_interrupted_hdf5_writer_leaves_nothing(tmp_path, sig, code, delay):
    out = tmp_path / "s.hdf5"
    for n in (20_000, 80_000):  # enough work to outlast the delay; more if this machine was faster still
        r = _interrupt(["synth", out, "-n", n, "--no-progress"], tmp_path, sig, delay)
        if r is not None:
            break
        _clear(tmp_path)
    else:
        pytest.skip("synth finished before it could be interrupted")
    assert r.returncode == code, r.stderr
    assert "interrupted" in _one_line(r.stderr, "synth")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_convert_leaves_nothing(tmp_path):
    inc, sh = generate("2", 600, seed=0)
    for copies in (4, 16):  # the input's showers repeated: enough work to outlast the delay
        with shower_writer(tmp_path / "in.hdf5", sh.shape[1]) as w:
            for _ in range(copies):
                w.append(inc, sh)
        out = tmp_path / "out" / "o.parquet"
        out.parent.mkdir(exist_ok=True)
        r = _interrupt(["convert", tmp_path / "in.hdf5", "-o", out, "--step-size", "0.2 MB", "--no-progress"],
                       out.parent, signal.SIGTERM, 0.05)
        if r is not None:
            break
        _clear(out.parent)
    else:
        pytest.skip("convert finished before it could be interrupted")
    assert r.returncode == 143 and "interrupted (SIGTERM)" in _one_line(r.stderr, "convert")
    assert list(out.parent.iterdir()) == []


def test_deferred_interrupt_raised_at_the_next_check():
    with pytest.raises(Interrupted) as err:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler only sets a flag: we get here
            reached = True
    assert reached and err.value.signum == signal.SIGTERM


def test_interrupted_evaluate_removes_what_it_wrote(tmp_path, ds2, monkeypatch, capsys):
    import importlib

    ev = importlib.import_module("calopc.eval.evaluate")  # the module (the package exports a function of that name)

    def fake(gen, ref, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "E_ratio.png").write_bytes(b"png")
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", fake)
    rep = tmp_path / "rep"
    assert main(["evaluate", str(ds2[0]), str(ds2[0]), "-o", str(rep)]) == 130
    assert not rep.exists()
    rep.mkdir()
    (rep / "mine.txt").write_text("keep")
    assert main(["evaluate", str(ds2[0]), str(ds2[0]), "-o", str(rep)]) == 130
    assert [p.name for p in rep.iterdir()] == ["mine.txt"]
    capsys.readouterr()


def test_stale_temporary_files_are_swept(tmp_path, ds2):
    from calopc.io import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".x.parquet.{pid}@{_host()}.abc123.part"
    live = tmp_path / f".y.parquet.{os.getppid()}@{_host()}.abc123.part"
    other_host = tmp_path / f".z.parquet.{pid}@someotherhost.abc123.part"
    foreign = tmp_path / ".w.parquet.abc123.part"
    for p in (stale, live, other_host, foreign):
        p.write_bytes(b"x")
    convert_file(ds2[0], tmp_path / "x.parquet", progress=False)
    assert not stale.exists() and live.exists() and other_host.exists() and foreign.exists()
    assert sweep_stale_parts(tmp_path) == []


# ============================================================================ options
@pytest.mark.parametrize("argv", [
    ["convert", "X", "--threshold", "nan"], ["convert", "X", "--threshold", "-1"],
    ["voxelize", "X", "-o", "y.hdf5", "--threshold", "inf"], ["evaluate", "X", "X", "-o", "r", "--threshold", "-1"],
    ["evaluate", "X", "X", "-o", "r", "--max-showers", "-5"], ["evaluate", "X", "X", "-o", "r", "--cls-epochs", "0"],
    ["evaluate", "X", "X", "-o", "r", "--cls-seeds", "0"], ["synth", "x.hdf5", "-n", "abc"],
    ["voxelize", "X", "-o", "y.hdf5", "--max-outside", "2"],
])
def test_invalid_numeric_options(capsys, argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    e = capsys.readouterr().err
    assert "expected" in e and "_positive_int" not in e and "Traceback" not in e


def test_bad_step_size_and_wrong_suffix(tmp_path, ds2, capsys):
    assert main(["convert", str(ds2[0]), "-o", str(tmp_path / "x.parquet"), "--step-size", "0"]) == 2
    assert "step size must be > 0" in _one_line(capsys.readouterr().err, "convert")
    assert main(["synth", str(tmp_path / "x.parquet"), "-n", "2"]) == 2
    assert "synth writes HDF5" in _one_line(capsys.readouterr().err, "synth")
    assert main(["voxelize", str(ds2[1]), "-o", str(tmp_path / "x.parquet")]) == 2
    assert "this writes HDF5 voxels" in _one_line(capsys.readouterr().err, "voxelize")
    assert main(["evaluate", str(ds2[0]), str(ds2[0]), "-o", str(tmp_path / "r"), "--metrics", ""]) == 2
    assert "no metrics selected" in _one_line(capsys.readouterr().err, "evaluate")
    assert not (tmp_path / "r").exists()


def test_threshold_means_the_same_everywhere(tmp_path, ds2):
    """convert --threshold T then voxelize == voxelize --threshold T == the official rule (E < T → 0)."""
    h5, pqf, inc, sh = ds2
    t = float(np.quantile(sh[sh > 0], 0.3))
    t = float(sh[sh >= t].min())  # a value that occurs: '>=' and '>' differ there
    official = np.where(sh < t, 0.0, sh)
    convert_file(h5, tmp_path / "t.parquet", threshold=t, progress=False)
    voxelize_file(tmp_path / "t.parquet", tmp_path / "a.hdf5", progress=False)
    voxelize_file(pqf, tmp_path / "b.hdf5", threshold=t, progress=False)
    voxelize_file(pqf, tmp_path / "c.hdf5", threshold="official", progress=False)
    with h5py.File(tmp_path / "a.hdf5") as a, h5py.File(tmp_path / "b.hdf5") as b, h5py.File(tmp_path / "c.hdf5") as c:
        assert np.array_equal(a["showers"][:], official) and np.array_equal(b["showers"][:], official)
        g = Geometry.calochallenge("2")
        assert np.array_equal(c["showers"][:], np.where(sh < g.threshold, 0.0, sh))
    # a file that records its threshold (as 'calopc generate' would for its HDF5 output) is voxelized with it
    events = ak.from_parquet(pqf)
    write_points(tmp_path / "rec.parquet", events, Geometry.calochallenge("2"), info={"threshold": t})
    voxelize_file(tmp_path / "rec.parquet", tmp_path / "d.hdf5", progress=False)
    with h5py.File(tmp_path / "d.hdf5") as d:
        assert np.array_equal(d["showers"][:], official)


# ============================================================================ output conventions
def test_json_safe_gives_valid_json():
    res = {"sep": {"E_ratio": float("nan"), "x": np.float32(0.5)}, "n": np.int64(3), "v": np.array([1.0, np.inf]),
           "t": (1, -np.inf), "p": Path("a/b")}
    text = json_dumps(res)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"sep": {"E_ratio": None, "x": 0.5}, "n": 3, "v": [1.0, None], "t": [1, None],
                                "p": "a/b"}
    assert json_safe(float("nan")) is None


def test_info_into_a_closed_pipe_exits_quietly(ds2):
    p = subprocess.Popen([sys.executable, "-c", _CHILD, "info", str(ds2[0]), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # like 'head' that has already exited
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert err == ""


_DATA_COMMANDS = ("synth", "convert", "voxelize", "info", "demo", "evaluate", "train", "generate")


def test_every_help_has_an_example_and_writers_take_dash_o(capsys):
    from calopc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        if name not in _DATA_COMMANDS:
            continue
        text = p.format_help()
        assert "example" in text, f"calopc {name} --help has no example"
        opts = {s for a in p._actions for s in a.option_strings}
        if name in ("synth", "convert", "voxelize", "evaluate", "demo", "generate", "train"):
            assert {"-o", "--output"} <= opts, name
        if name in ("synth", "convert", "voxelize", "evaluate", "demo", "info"):
            assert "--geometry" in opts, name
    assert "workflow" in parser.format_help()


def test_official_evaluate_command_line_is_understood(tmp_path, monkeypatch, capsys):
    import calopc.cli.eval as ecli

    seen = {}

    def fake(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(ecli, "_run", fake)
    gen, ref = tmp_path / "g.hdf5", tmp_path / "r.hdf5"
    assert main(["evaluate", "-i", str(gen), "-r", str(ref), "-m", "cls-high", "-d", "2", "--output_dir",
                 str(tmp_path / "res"), "--cls_n_epochs", "7", "--cls_n_hidden", "64", "--cls_batch_size", "10",
                 "--no_cuda", "--save_mem"]) == 0
    assert seen["generated"] == gen and seen["reference"] == ref and seen["geometry"] == "2"
    assert seen["metrics"] == ("cls-high",) and seen["output"] == tmp_path / "res"
    assert (seen["cls_epochs"], seen["cls_hidden"], seen["cls_batch_size"], seen["device"]) == (7, 64, 10, "cpu")
    seen.clear()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "-i", str(gen), "-r", str(ref), "-m", "all", "--which_cuda", "1"]) == 0
    assert seen["output"] == Path("evaluation_results") and seen["device"] == "cuda:1"
    assert main(["evaluate", str(gen), "-r", str(ref), "-m", "hist", "--metrics", "fpd", "-o", "x"]) == 2
    assert "either --metrics or -m" in _one_line(capsys.readouterr().err, "evaluate")


def test_progress_bar_only_on_a_terminal(capsys):
    with progress_bar(10, "x") as bar:  # stderr is not a terminal under pytest
        bar.update(10)
        assert bar.disable
    assert "\r" not in capsys.readouterr().err


def test_warnings_are_one_line(monkeypatch, capsys):
    import calopc.cli.data as cli

    def noisy(args):
        with np.errstate(divide="warn"):
            np.array([1.0]) / np.array([0.0])
        return 0

    monkeypatch.setattr(cli, "_cmd_info", noisy)
    assert main(["info", "whatever"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == "calopc info: warning: divide by zero encountered in divide"


def test_unexpected_errors_are_one_line(monkeypatch, capsys):
    import calopc.cli.data as cli

    def boom(args):
        raise KeyError("layer_ids")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert main(["info", "x"]) == 1
    assert "internal error: KeyError" in _one_line(capsys.readouterr().err, "info")
    monkeypatch.setenv("CALOPC_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info", "x"])


def test_write_points_foreign_parquet_with_geometry_override(tmp_path, ds2):
    _, pqf, *_ = ds2
    bare = _rewrite_parquet(pqf, tmp_path / "bare.parquet", drop_meta=(b"calopc.geometry", b"calopc.info"))
    with pytest.raises(ShowerFileError, match="no calopc geometry metadata.*--geometry"):
        open_points(bare)
    with open_points(bare, geometry=Geometry.calochallenge("2")) as f:
        assert len(f) == 40


def test_alpha_free_gives_distinct_alpha_bins_per_ring(tmp_path, capsys):
    """voxelize --collisions alpha-free: the policy generate uses for models without α, for the same result."""
    from calopc.converters import points_to_voxels

    g = Geometry.calochallenge("2")  # 16 α bins, 9 r bins
    rng = np.random.default_rng(0)
    n_pts = [20, 5, 0]  # shower 0 overfills ring (layer 3, r-bin 2): 20 points for 16 α bins
    r = [np.full(k, 0.5 * (g.r_edges[0][2] + g.r_edges[0][3])) for k in n_pts]
    ev = ak.Array([{"incident_energy": 1e3, "points": [{"r": float(x), "alpha": 0.1, "z": 3.0, "E": float(e)}
                                                        for x, e in zip(rr, rng.uniform(1, 2, len(rr)))]}
                   for rr in r])
    out, st = points_to_voxels(ev, g, collisions="alpha-free", return_stats=True, rng=1)
    e_in = ak.to_numpy(ak.sum(ev.points.E, axis=1))
    assert np.allclose(out.sum(axis=1), e_in)  # energy conserved
    ring = g.offsets[3] + 2 + np.arange(16) * 9  # the 16 cells of that ring
    assert np.count_nonzero(out[0]) == 16 and np.count_nonzero(out[0, ring]) == 16
    assert np.count_nonzero(out[1, ring]) == 5 and np.count_nonzero(out[1]) == 5
    assert st.n_collisions == st.n_merged == 4
    again = points_to_voxels(ev, g, collisions="alpha-free", rng=1)
    assert np.array_equal(out, again)  # seeded
    pqf = tmp_path / "p.parquet"
    write_points(pqf, ev, g)
    argv = ["voxelize", str(pqf), "-o", str(tmp_path / "a.hdf5"), "--collisions", "alpha-free", "--no-progress"]
    assert main(argv) == 0
    assert "4 collisions" in capsys.readouterr().out


def test_folder_or_unreadable_input_is_one_line(tmp_path, capsys):
    (tmp_path / "d.hdf5").mkdir()
    (tmp_path / "d.parquet").mkdir()
    for name in ("d.hdf5", "d.parquet"):
        argv = ["info", str(tmp_path / name)] if name.endswith("hdf5") else ["voxelize", str(tmp_path / name), "-o",
                                                                             str(tmp_path / "x.hdf5")]
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err, argv[0])  # a Parquet folder is a dataset: here an empty one
        assert "is a folder" in line or "folder holds no Parquet files" in line, line


def test_synth_output_positional_or_dash_o(tmp_path, capsys):
    assert main(["synth", "-o", str(tmp_path / "a.hdf5"), "-n", "3", "--dataset", "1-photons", "--no-progress"]) == 0
    assert main(["synth", str(tmp_path / "b.hdf5"), "-n", "3", "--geometry", "1-photons", "--no-progress"]) == 0
    assert (tmp_path / "a.hdf5").read_bytes() != b"" and (tmp_path / "b.hdf5").exists()
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "c.hdf5"), "-o", str(tmp_path / "d.hdf5")]) == 2
    assert "two outputs given" in _one_line(capsys.readouterr().err, "synth")
    assert main(["synth", "-n", "3"]) == 2
    assert "no output file" in _one_line(capsys.readouterr().err, "synth")


def test_generate_reports_the_resolved_device(tmp_path, monkeypatch, capsys):
    import importlib

    gen = importlib.import_module("calopc.models.generate")
    seen = {}

    def fake(run_dir, energies, **kw):
        seen.update(kw)
        return gen.GenerateResult(len(energies), 10, 0.5, 0.6, None)

    monkeypatch.setattr(gen, "generate", fake)
    assert main(["generate", str(tmp_path), "--energies", "1000,2000", "--device", "auto", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "on cpu" in out or "on cuda" in out
    assert seen["threshold"] is None  # 'official' is the default, the geometry's threshold
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path), "--energies", "1000", "--threshold", "-1"])


def test_evaluate_reused_report_folder_drops_stale_plots(tmp_path, ds2):
    """A report folder written again: the figures of an earlier (or killed) report are removed; other files stay."""
    rep = tmp_path / "rep"
    rep.mkdir()
    for name in ("EC_x_layers_0-8.png", "hits.pdf", "average_shower_ratio.svg", "custom_plot.png", "notes.png",
                 "mine.txt"):
        (rep / name).write_bytes(b"old")
    (rep / "metrics.json").write_text(json.dumps({"plots": {"custom_plot": ["custom_plot.png"]}}))
    assert main(["evaluate", str(ds2[0]), str(ds2[0]), "-o", str(rep), "--metrics", "hist", "--no-progress",
                 "--test-permutations", "19"]) == 0
    assert sorted(p.name for p in rep.iterdir()) == ["metrics.json", "mine.txt", "notes.png", "report.html"]


def test_evaluate_geometry_reads_parquet_without_metadata(tmp_path, ds2, capsys):
    """evaluate --geometry reads a Parquet file without calopc metadata; without the flag the refusal names it."""
    nometa = _rewrite_parquet(ds2[1], tmp_path / "nometa.parquet", drop_meta=(b"calopc.geometry",))
    args = ["evaluate", str(nometa), str(ds2[0]), "--metrics", "hist", "--no-progress", "--test-permutations", "19"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 2
    assert "--geometry" in _one_line(capsys.readouterr().err, "evaluate")
    assert main([*args, "-o", str(tmp_path / "b"), "--geometry", "2"]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["dataset"] == "2" and m["n_generated"] == 40
    assert max(v for v in m["separation"].values() if v is not None) == 0.0  # the same showers as the reference


# ============================================================================ user errors, not internal ones
def test_a_symlink_loop_is_a_one_line_user_error(tmp_path, ds2, capsys):
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    for argv in (["convert", tmp_path / "loopA", "-o", tmp_path / "x.parquet"],
                 ["convert", ds2[0], "-o", tmp_path / "loopA"],
                 ["evaluate", ds2[0], ds2[0], "-o", tmp_path / "loopB"]):
        assert main([str(a) for a in argv]) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert "a loop of symbolic links" in line and "internal error" not in line, line


def test_readers_and_synth_name_a_symlink_loop(tmp_path, ds2, capsys):
    """info and voxelize say 'a loop of symbolic links', not 'no such file'; synth does not replace the link."""
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    for argv in (["info", tmp_path / "loopA"], ["voxelize", tmp_path / "loopA", "-o", tmp_path / "v.hdf5"],
                 ["synth", tmp_path / "loopA", "-n", "2"]):
        assert main([str(a) for a in argv]) == 2
        assert "loopA: a loop of symbolic links" in _one_line(capsys.readouterr().err, argv[0])
    assert (tmp_path / "loopA").is_symlink() and os.readlink(tmp_path / "loopA") == str(tmp_path / "loopB")


def test_empty_files_and_files_of_the_other_format_say_so(tmp_path, ds2, capsys):
    """A 0-byte file is called empty, whatever its name; an HDF5 voxel file given where Parquet is read says
    to convert it first; a folder of HDF5 files points to the quoted glob."""
    h5, pqf, *_ = ds2
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "empty.hdf5").write_bytes(b"")
    for name in ("empty.parquet", "empty.hdf5"):
        assert main(["info", str(tmp_path / name)]) == 2
        assert f"{name}: is empty (0 bytes)" in _one_line(capsys.readouterr().err, "info")
    assert main(["voxelize", str(tmp_path / "empty.parquet"), "-o", str(tmp_path / "v.hdf5")]) == 2
    assert "empty.parquet: is empty (0 bytes); expected a Parquet file" in _one_line(capsys.readouterr().err,
                                                                                     "voxelize")
    shutil.copy(h5, tmp_path / "h_as.parquet")
    for argv in (["voxelize", h5, "-o", tmp_path / "v.hdf5"], ["voxelize", tmp_path / "h_as.parquet", "-o",
                                                                tmp_path / "v.hdf5"]):
        assert main([str(a) for a in argv]) == 2
        line = _one_line(capsys.readouterr().err, "voxelize")
        assert "this is an HDF5 file (CaloChallenge voxels?), not point clouds in Parquet; run 'calopc convert " in line
    with pytest.raises(ShowerFileError, match="this is an HDF5 file"):
        read_points(h5)
    (tmp_path / "h5dir").mkdir()
    shutil.copy(h5, tmp_path / "h5dir" / "a.hdf5")
    for argv in (["info", tmp_path / "h5dir"], ["convert", tmp_path / "h5dir", "-o", tmp_path / "x.parquet"],
                 ["voxelize", tmp_path / "h5dir", "-o", tmp_path / "v.hdf5"]):
        assert main([str(a) for a in argv]) == 2
        line = _one_line(capsys.readouterr().err, argv[0])
        assert f"'{tmp_path / 'h5dir' / '*.hdf5'}'" in line, line


def test_an_hdf5_file_locked_by_its_writer_is_not_called_truncated(tmp_path, ds2):
    src = tmp_path / "busy.hdf5"
    src.write_bytes(ds2[0].read_bytes())
    code = ("import sys, time, h5py\nf = h5py.File(sys.argv[1], 'a')\nprint('open', flush=True)\ntime.sleep(60)")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen([sys.executable, "-c", code, str(src)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = _calopc("info", src, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2
    line = _one_line(r.stderr, "info")
    assert "another process has it open for writing" in line and "truncated" not in line, line


def test_a_second_evaluate_into_one_report_folder_is_refused(tmp_path, ds2, capsys):
    rep = tmp_path / "rep"
    code = ("import sys, time; from calopc.locking import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(rep)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["evaluate", str(ds2[0]), str(ds2[0]), "-o", str(rep), "--metrics", "hist"]) == 2
        line = _one_line(capsys.readouterr().err, "evaluate")
        assert f"this report folder is being written by another calopc process (PID {holder.pid}" in line
        assert not rep.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("column", "match"), [
    ("cell", "column 'points.cell' has type double; expected integer cell indices"),
    ("E", "string; expected numbers (energies in MeV"),
])
def test_evaluate_follows_the_rule_for_questionable_points(tmp_path, ds2, capsys, column, match):
    """Columns of the wrong type in either sample of evaluate: the readers' one-line error, no report left."""
    _, pqf, *_ = ds2
    ev = ak.from_parquet(pqf)
    flat = ak.to_numpy(ak.flatten(ev.points[column]))
    new = flat + 0.5 if column == "cell" else flat.astype(str)
    bad = _rewrite_parquet(pqf, tmp_path / "t.parquet",
                           points=ak.with_field(ev.points, ak.unflatten(new, ak.num(ev.points)), column))
    for argv in (["evaluate", str(bad), str(ds2[0])], ["evaluate", str(ds2[0]), str(bad)]):
        assert main([*argv, "-o", str(tmp_path / "rep"), "--metrics", "hist", "--no-progress"]) == 2
        line = _one_line(capsys.readouterr().err, "evaluate")
        assert "t.parquet" in line and match in line, line
        assert not (tmp_path / "rep").exists()


def test_a_second_convert_into_one_dataset_folder_is_refused(tmp_path, ds2, capsys):
    out = tmp_path / "ds"
    code = ("import sys, time; from calopc.locking import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["convert", str(ds2[0]), str(ds2[0]), "-o", f"{out}/", "--no-progress"]) == 2
        line = _one_line(capsys.readouterr().err, "convert")
        assert f"this dataset folder is being written by another calopc process (PID {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
