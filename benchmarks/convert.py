r"""Conversion, Parquet size, read-back, HDF5 writing and lazy-reading figures, old vs new in one run.

"Old" is calopc at a baseline commit (default: the last one before the direct-chunk reader and
the compact Parquet layout), unpacked with ``git archive`` into the work folder and run in
separate processes with ``PYTHONPATH`` pointing at it; "new" is this working tree. Every
figure is a wall time of a separate process (imports included) and its peak resident memory.

Sections (``--sections``, comma separated; default all):

* ``convert``: ``calopc convert`` of the large ds3 file (``--n`` showers), old vs new; the
  outputs are compared shower by shower (must be identical); a plain single-threaded h5py
  read of the same file (``f["showers"][i:j]`` in 256 MB steps) as the floor.
* ``small``: the same on a ``--n-small``-shower ds3 file (the "≤ 2× a plain h5py read" target).
* ``sizes``: Parquet / gzip HDF5 size for ds2 and ds3, float64 and float32 showers, lossless
  and ``--energy-dtype float32``; bytes per point per column.
* ``readback``: reading the whole Parquet file back as awkward events (old file, old reader vs
  new file, new reader).
* ``writer``: writing ``--n-write`` ds3 showers to gzip HDF5 (``calopc.io.write_showers``, as
  ``voxelize`` and ``generate`` do), old vs new.
* ``read``: ``ShowerFile.read`` (dense) and ``iterate_sparse`` of a ``--n-read``-shower ds3 file, old vs new
  (``--baseline``), alternating, ``--repeat`` times each: the reader alone, without the Parquet writer.
* ``dask``: ``--n-dask`` ds3 showers in each of 2 files converted into a dataset folder
  (``--workers 2``), then hits per layer of every shower through ``calopc.open_points_lazy``
  (dask-awkward) on 1 and 2 worker processes, checked against the eager result.

Usage::

    python benchmarks/convert.py --n 50000 --workdir /tmp/bench [--sections convert,sizes]

Big files are written to the work folder; ``--clean`` removes them at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "9be3461"  # the last commit before the direct-chunk reader and the compact Parquet layout


def _run(code_or_cmd: list[str] | str, *, old: bool, workdir: Path, env: dict | None = None) -> tuple[float, float, str]:
    """Run a calopc command (list) or Python code (str) in a fresh process; (wall s, peak RSS GB, stdout)."""
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(workdir / "baseline") if old else str(ROOT)
    if isinstance(code_or_cmd, list):
        inner = [sys.executable, "-m", "calopc.cli", *code_or_cmd]
    else:
        inner = [sys.executable, "-c", code_or_cmd]
    wrap = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"r = subprocess.run({inner!r}, capture_output=True, text=True); "
        "dt = time.perf_counter() - t; sys.stderr.write(r.stderr); "
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(r.stdout); print('@@', r.returncode, dt, ru.ru_maxrss, ru.ru_utime + ru.ru_stime)"
    )
    # run in the work folder: `python -m` and `-c` put the current folder first on sys.path, so from the checkout's
    # root the "old" process would import this working tree's calopc instead of the baseline's
    out = subprocess.run([sys.executable, "-c", wrap], check=True, capture_output=True, text=True, env=e, cwd=workdir)
    lines = out.stdout.strip().splitlines()
    _, rc, dt, rss, cpu = lines[-1].split()
    if int(rc) != 0:
        raise RuntimeError(f"{code_or_cmd} failed ({rc}):\n{out.stderr[-3000:]}")
    _LAST_CPU[0] = float(cpu)
    return float(dt), float(rss) / 1e6, "\n".join(lines[:-1])


_LAST_CPU = [0.0]  # CPU seconds (user + system) of the last _run: a figure the machine's load does not inflate much


def _load() -> str:
    try:
        return "load %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load ?"


def _baseline(workdir: Path, rev: str) -> None:
    dst = workdir / "baseline"
    if (dst / "calopc" / "__init__.py").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "calopc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=arch, check=True)


def _synth(path: Path, dataset: str, n: int, dtype: str = "float64", seed: int = 1) -> Path:
    if path.exists():
        return path
    t = time.perf_counter()
    if dtype == "float64":
        subprocess.run([sys.executable, "-m", "calopc.cli", "synth", str(path), "-n", str(n), "--geometry", dataset,
                        "--seed", str(seed), "--no-progress"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    else:
        import numpy as np

        from calopc.io import open_showers, shower_writer

        src = _synth(path.with_name(path.stem.replace("_f32", "") + ".hdf5"), dataset, n)
        with open_showers(src) as f, shower_writer(path, f.n_voxels, dtype=np.float32) as w:
            for inc, sh in f.iterate("256 MB"):
                w.append(inc, sh.astype(np.float32))
    print(f"  synthesised {path.name}: {n} ds{dataset} showers, {path.stat().st_size / 1e9:.3f} GB "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return path


_H5READ = """
import h5py, sys
path, step = sys.argv[1], int(sys.argv[2])
with h5py.File(path) as f:
    ds = f["showers"]
    n = ds.shape[0]
    rows = max(1, step // (ds.shape[1] * ds.dtype.itemsize))
    for i in range(0, n, rows):
        x = ds[i:i + rows]
        f["incident_energies"][i:i + rows]
"""

_COMPARE = """
import sys, numpy as np, awkward as ak
from calopc.converters import open_points
a, b = sys.argv[1], sys.argv[2]
n = 0
with open_points(a) as fa, open_points(b) as fb:
    assert len(fa) == len(fb), (len(fa), len(fb))
    for x, y in zip(fa.iterate(1000), fb.iterate(1000)):
        assert x.type == y.type, (x.type, y.type)
        assert np.array_equal(np.asarray(x.incident_energy), np.asarray(y.incident_energy))
        assert np.array_equal(np.asarray(ak.num(x.points, axis=1)), np.asarray(ak.num(y.points, axis=1)))
        for k in ("r", "alpha", "z", "E", "cell"):
            assert np.array_equal(np.asarray(ak.flatten(x.points[k])), np.asarray(ak.flatten(y.points[k]))), k
        n += len(x)
print(n)
"""

_READBACK = """
import sys, awkward as ak
from calopc.converters import open_points
n = p = 0
with open_points(sys.argv[1]) as f:
    for ch in f.iterate(2000):
        n += len(ch)
        p += int(ak.sum(ak.num(ch.points, axis=1)))
print(n, p)
"""

_WRITE = """
import sys, time, numpy as np
from calopc.io import write_showers
from calopc.synth import generate
n = int(sys.argv[2])
inc, sh = generate("3", n, seed=3)
t, c = time.perf_counter(), time.process_time()
write_showers(sys.argv[1], inc, sh)
print(time.perf_counter() - t, sh.nbytes, time.process_time() - c)  # wall, bytes, CPU s of all threads
"""

_READ = """
import sys, time
from calopc.io import open_showers
with open_showers(sys.argv[1]) as f:
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(f), 500):
        n += len(f.read(i, min(i + 500, len(f)))[0])
    dense, dense_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    for _ in f.iterate_sparse("256 MB"):
        pass
print(dense, dense_cpu, time.perf_counter() - t, time.process_time() - c, n)
"""

_DASK = """
import sys, time, numpy as np, awkward as ak, dask, dask_awkward as dak
import calopc


def per_layer(points):
    # hits per layer of every shower of one partition: (showers, 45); one fused task per row group
    z = np.asarray(ak.flatten(points.z), dtype=np.int64)
    n = len(points)
    shower = np.repeat(np.arange(n), np.asarray(ak.num(points, axis=1)))
    return ak.Array(np.bincount(shower * 45 + z, minlength=n * 45).reshape(n, 45))


if __name__ == "__main__":
    src, workers, scheduler, check = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    t = time.perf_counter()
    ev = calopc.open_points_lazy(src)
    meta = ak.Array(ak.Array(np.zeros((0, 45), np.int64)).layout.to_typetracer(forget_length=True))
    hits = dak.map_partitions(per_layer, ev.points, meta=meta).compute(scheduler=scheduler, num_workers=workers)
    dt = time.perf_counter() - t
    if check:  # against the eager reader, chunk by chunk (the whole dataset may not fit in memory)
        from calopc.converters import open_points
        i = 0
        with open_points(src) as f:
            for ch in f.iterate(2000):
                lay = ak.values_astype(ch.points.z, np.int64)
                for k in (0, 7, 22, 44):
                    assert np.array_equal(np.asarray(hits[i:i + len(ch), k]), np.asarray(ak.sum(lay == k, axis=1))), k
                i += len(ch)
        assert i == len(hits)
        print("equal", end=" ")
    print(round(dt, 1), ev.npartitions, len(hits))
"""


def section_convert(args: argparse.Namespace, n: int, label: str) -> None:
    w = args.workdir
    src = _synth(w / f"ds3_{n}.hdf5", "3", n)
    dense = n * 40500 * 8 / 1e9
    print(f"\n[{label}] calopc convert, {n} ds3 showers ({dense:.1f} GB dense, {src.stat().st_size / 1e9:.2f} GB gzip "
          f"HDF5); {_load()}", flush=True)
    t_h5, rss_h5, _ = _run(_H5READ.replace("sys.argv[1]", repr(str(src))).replace("int(sys.argv[2])", "256_000_000"),
                           old=False, workdir=w)
    cpu_h5 = _LAST_CPU[0]
    print(f"  plain h5py read (one thread, 256 MB steps): {t_h5:6.1f} s, {cpu_h5:6.1f} CPU s, peak RSS {rss_h5:.2f} GB",
          flush=True)
    res = {}
    for old in (True, False):
        out = w / f"ds3_{n}_{'old' if old else 'new'}.parquet"
        t, rss, _ = _run(["convert", str(src), "-o", str(out), "--no-progress"], old=old, workdir=w)
        res[old] = (t, rss, out, _LAST_CPU[0])
        print(f"  {'old' if old else 'new'} convert: {t:6.1f} s ({n / t:6.0f} showers/s, {t / t_h5:.2f}x the h5py read), "
              f"{_LAST_CPU[0]:6.1f} CPU s ({_LAST_CPU[0] / cpu_h5:.2f}x the h5py read's), "
              f"peak RSS {rss:.2f} GB, Parquet {out.stat().st_size / 1e9:.3f} GB "
              f"({out.stat().st_size / src.stat().st_size:.2f}x the HDF5); {_load()}", flush=True)
    print(f"  new / old wall time: {res[False][0] / res[True][0]:.2f} (speed-up {res[True][0] / res[False][0]:.2f}x); "
          f"CPU time new / old {res[False][3] / res[True][3]:.2f}")
    t, _, out = _run(_COMPARE.replace("sys.argv[1]", repr(str(res[True][2]))).replace("sys.argv[2]", repr(str(res[False][2]))),
                     old=False, workdir=w)
    print(f"  outputs identical: {out.strip()} showers compared field by field ({t:.0f} s)")
    _readback(args, res)
    if args.clean:
        for old in (True, False):
            res[old][2].unlink(missing_ok=True)


def _readback(args: argparse.Namespace, res: dict) -> None:
    w = args.workdir
    if "readback" in args.sections:
        for old in (True, False):
            code = _READBACK.replace("sys.argv[1]", repr(str(res[old][2])))
            t, rss, out = _run(code, old=old, workdir=w)
            print(f"  read back ({'old file, old reader' if old else 'new file, new reader'}): {t:6.1f} s, "
                  f"{_LAST_CPU[0]:6.1f} CPU s, "
                  f"peak RSS {rss:.2f} GB ({out.strip()} showers, points)", flush=True)


def section_newconvert(args: argparse.Namespace) -> None:
    """The new convert of the large file alone: wall and CPU seconds (CPU/2 bounds the wall on 2 idle cores)."""
    w = args.workdir
    src = _synth(w / f"ds3_{args.n}.hdf5", "3", args.n)
    out = w / f"ds3_{args.n}_new.parquet"
    t, rss, _ = _run(["convert", str(src), "-o", str(out), "--no-progress"], old=False, workdir=w)
    print(f"\n[newconvert] {args.n} ds3 showers: {t:.1f} s, {_LAST_CPU[0]:.1f} CPU s (all threads), peak RSS "
          f"{rss:.2f} GB; {_load()}", flush=True)


def section_sizes(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    w = args.workdir
    print(f"\n[sizes] Parquet size / gzip HDF5 size; {_load()}")
    print(f"  {'file':<22} {'HDF5 MB':>8} {'B/pt':>6} | {'lossless':>8} {'ratio':>6} {'cell B/pt':>9} {'E B/pt':>6} | "
          f"{'E float32':>9} {'ratio':>6}")
    for ds, n in (("2", args.n_sizes * 4), ("3", args.n_sizes)):
        for dt in ("float64", "float32"):
            src = _synth(w / (f"ds{ds}_{n}" + ("_f32" if dt == "float32" else "") + ".hdf5"), ds, n, dt)
            row = []
            for edt in (None, "float32"):
                out = w / f"{src.stem}_{edt or 'same'}.parquet"
                cmd = ["convert", str(src), "-o", str(out), "--no-progress"] + (["--energy-dtype", edt] if edt else [])
                _run(cmd, old=False, workdir=w)
                md = pq.ParquetFile(out).metadata
                cols: dict[str, int] = {}
                for g in range(md.num_row_groups):
                    for c in range(md.num_columns):
                        cc = md.row_group(g).column(c)
                        cols[cc.path_in_schema.rsplit(".", 1)[-1]] = cols.get(cc.path_in_schema.rsplit(".", 1)[-1], 0) + cc.total_compressed_size
                n_pts = sum(md.row_group(g).column(1).num_values for g in range(md.num_row_groups))
                row.append((out.stat().st_size, cols, n_pts))
                out.unlink()
            h5 = src.stat().st_size
            (s0, c0, p0), (s1, _, _) = row
            print(f"  {src.name:<22} {h5 / 1e6:8.1f} {h5 / p0:6.2f} | {s0 / 1e6:8.1f} {s0 / h5:6.3f} {c0['cell'] / p0:9.2f} "
                  f"{c0['E'] / p0:6.2f} | {s1 / 1e6:9.1f} {s1 / h5:6.3f}", flush=True)


def section_writer(args: argparse.Namespace) -> None:
    w = args.workdir
    n = args.n_write
    print(f"\n[writer] write_showers of {n} ds3 showers ({n * 40500 * 8 / 1e9:.2f} GB dense) to gzip HDF5; {_load()}")
    rates, cpus = {}, {}
    for old in (True, False):
        out = w / f"write_{'old' if old else 'new'}.hdf5"
        _, rss, txt = _run(_WRITE.replace("sys.argv[1]", repr(str(out))).replace("sys.argv[2]", repr(str(n))),
                           old=old, workdir=w)
        t, nbytes, cpu = (float(x) for x in txt.split())
        rates[old] = nbytes / t / 1e9
        cpus[old] = cpu
        print(f"  {'old' if old else 'new'}: {t:6.1f} s writing, {cpu:6.1f} CPU s, {rates[old]:.2f} GB/s dense, "
              f"file {out.stat().st_size / 1e6:.0f} MB, "
              f"peak RSS {rss:.2f} GB", flush=True)
    import h5py
    import numpy as np

    with h5py.File(w / "write_old.hdf5") as a, h5py.File(w / "write_new.hdf5") as b:
        same = all(np.array_equal(a[k][:], b[k][:]) for k in ("showers", "incident_energies"))
        comp = b["showers"].compression
    print(f"  new / old rate: {rates[False] / rates[True]:.2f}x; CPU s old / new {cpus[True] / cpus[False]:.2f}x "
          f"(the old writer runs on one thread: on 2 idle cores the new one is about "
          f"{2 * cpus[True] / cpus[False]:.1f}x faster if its two threads stay busy); files hold the same data: {same}; "
          f"plain h5py reads the new file ({comp})")
    for old in (True, False):
        (w / f"write_{'old' if old else 'new'}.hdf5").unlink()


def section_read(args: argparse.Namespace) -> None:
    """The HDF5 reader alone, old vs new in alternation (the machine's load drifts less between neighbours)."""
    w = args.workdir
    n = args.n_read
    src = _synth(w / f"ds3_{n}.hdf5", "3", n)
    print(f"\n[read] {n} ds3 showers ({n * 40500 * 8 / 1e9:.2f} GB dense), dense read and sparse scan, "
          f"{args.repeat} runs each, old = {args.baseline}; {_load()}")
    res: dict[bool, list] = {True: [], False: []}
    for _ in range(args.repeat):
        for old in (True, False):
            _, rss, txt = _run(_READ.replace("sys.argv[1]", repr(str(src))), old=old, workdir=w)
            d, dc, sp, sc, _n = (float(x) for x in txt.split())
            res[old].append((d, dc, sp, sc, rss))
            print(f"  {'old' if old else 'new'}: dense {d:6.2f} s ({dc:6.2f} CPU s), sparse {sp:6.2f} s ({sc:6.2f} CPU s), "
                  f"peak RSS {rss:.2f} GB; {_load()}", flush=True)
    import statistics

    med = {old: [statistics.median(r[k] for r in res[old]) for k in range(5)] for old in (True, False)}
    print(f"  medians new / old: dense wall {med[False][0] / med[True][0]:.2f}, CPU {med[False][1] / med[True][1]:.2f}; "
          f"sparse wall {med[False][2] / med[True][2]:.2f}, CPU {med[False][3] / med[True][3]:.2f}; "
          f"peak RSS {med[False][4] / med[True][4]:.2f}")


def section_dask(args: argparse.Namespace) -> None:
    w = args.workdir
    n = args.n_dask
    srcs = [_synth(w / f"dask_{k}_{n}.hdf5", "3", n, seed=k) for k in (1, 2)]
    folder = w / f"dask_{n}"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"\n[dask] 2 x {n} ds3 showers; {_load()}")
    t, rss, _ = _run(["convert", *map(str, srcs), "-o", f"{folder}/", "--workers", "2", "--no-progress"], old=False,
                     workdir=w)
    print(f"  convert 2 files --workers 2: {t:.1f} s, peak RSS (largest process) {rss:.2f} GB", flush=True)
    script = w / "dask_hits_per_layer.py"  # a file: the process scheduler's workers import its function
    script.write_text(_DASK)
    for k, sched in ((1, "sync"), (2, "threads"), (2, "processes")):
        code = (f"import sys, runpy; sys.argv = [{str(script)!r}, {str(folder)!r}, '{k}', '{sched}', "
                f"'{int(k == 1)}']; runpy.run_path({str(script)!r}, run_name='__main__')")
        _, rss, out = _run(code, old=False, workdir=w)
        print(f"  hits per layer (45 layers) over {2 * n} showers, {k} worker(s), {sched} scheduler: {out.strip()} "
              f"[seconds, partitions, showers]; peak RSS {rss:.2f} GB; {_load()}", flush=True)
    if args.clean:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="showers in the large ds3 file (default: %(default)s)")
    ap.add_argument("--n-small", type=int, default=3000, help="showers in the small ds3 file (default: %(default)s)")
    ap.add_argument("--n-sizes", type=int, default=1000, help="ds3 showers for the size table; ds2: 4x (default: %(default)s)")
    ap.add_argument("--n-write", type=int, default=2000, help="ds3 showers for the writer (default: %(default)s)")
    ap.add_argument("--n-read", type=int, default=2000, help="ds3 showers for the reader alone (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of old and new each in 'read' (default: %(default)s)")
    ap.add_argument("--n-dask", type=int, default=20000, help="ds3 showers per file for dask (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="where files go (default: %(default)s)")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the old code (default: %(default)s)")
    ap.add_argument("--sections", default="convert,small,sizes,readback,writer,read,dask")
    ap.add_argument("--clean", action="store_true", help="remove the large files written")
    args = ap.parse_args()
    args.sections = set(args.sections.split(","))
    args.workdir = args.workdir.resolve()  # commands run inside it (see _run), so every path must be absolute
    args.workdir.mkdir(parents=True, exist_ok=True)
    _baseline(args.workdir, args.baseline)
    print(f"calopc convert benchmark: baseline {args.baseline}, {os.cpu_count()} CPUs, {_load()}", flush=True)
    if "convert" in args.sections:
        section_convert(args, args.n, "convert")
    elif "readback" in args.sections:  # the outputs of an earlier convert section
        res = {old: (0, 0, args.workdir / f"ds3_{args.n}_{'old' if old else 'new'}.parquet") for old in (True, False)}
        print(f"\n[readback] {args.n} ds3 showers; {_load()}")
        t, _, out = _run(_COMPARE.replace("sys.argv[1]", repr(str(res[True][2])))
                         .replace("sys.argv[2]", repr(str(res[False][2]))), old=False, workdir=args.workdir)
        print(f"  outputs identical: {out.strip()} showers compared field by field ({t:.0f} s)")
        _readback(args, res)
    if "newconvert" in args.sections:
        section_newconvert(args)
    if "small" in args.sections:
        section_convert(args, args.n_small, "small")
    if "sizes" in args.sections:
        section_sizes(args)
    if "writer" in args.sections:
        section_writer(args)
    if "read" in args.sections:
        section_read(args)
    if "dask" in args.sections:
        section_dask(args)


if __name__ == "__main__":
    main()
