r"""Converter throughput and memory on a synthetic dataset-3 file.

Measures, in one run:

* ``voxels_to_points`` and ``points_to_voxels`` on chunks read from the file (GB/s of
  dense input, showers/s), against a naive per-shower Python loop on the same data;
* ``calopc convert`` / ``calopc voxelize`` file to file (wall time, peak resident
  memory of the process), for two file sizes, to show memory does not grow with the file.

Usage::

    python benchmarks/convert.py [--n 5000] [--workdir bench-out] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _naive_to_points(showers, incident, geometry):
    """What one writes without thinking about speed: a Python loop over showers, building records."""
    import awkward as ak
    import numpy as np

    events = []
    for e_inc, row in zip(incident, showers):
        pts = []
        for c in np.flatnonzero(row):
            pts.append({"r": float(geometry.cell_r[c]), "alpha": float(geometry.cell_alpha[c]),
                        "z": float(geometry.cell_z[c]), "E": float(row[c]), "cell": int(c)})
        events.append({"incident_energy": float(e_inc), "points": pts})
    return ak.Array(events)


def _naive_to_voxels(events, geometry):
    import numpy as np

    out = np.zeros((len(events), geometry.n_voxels))
    for i, ev in enumerate(events.points.tolist()):
        for p in ev:
            out[i, p["cell"]] += p["E"]
    return out


def _peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in GB) of that child alone."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]) / 1e6  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="showers in the large file (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="where files go (default: %(default)s)")
    ap.add_argument("--naive", type=int, default=40, help="showers for the naive baseline (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default: %(default)s)")
    args = ap.parse_args()
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)

    import awkward as ak
    import numpy as np

    from calopc.converters import points_to_voxels, voxels_to_points
    from calopc.io import open_showers
    from calopc.synth import write_synthetic

    args.workdir.mkdir(parents=True, exist_ok=True)
    big = args.workdir / f"ds3_{args.n}.hdf5"
    small = args.workdir / "ds3_1000.hdf5"
    for path, n in ((big, args.n), (small, 1000)):
        if not path.exists():
            t = time.perf_counter()
            write_synthetic(path, dataset="3", n=n, seed=1)
            print(f"synthesised {n} ds3 showers in {time.perf_counter() - t:.1f} s -> {path} "
                  f"({path.stat().st_size / 1e9:.2f} GB on disk)")

    # ---------------------------------------------------------------- in-memory throughput
    t_read = t_v2p = t_p2v = 0.0
    dense_bytes = n_showers = n_points = 0
    with open_showers(big) as f:
        g = f.geometry
        t0 = time.perf_counter()
        for inc, sh in f.iterate("256 MB"):
            t1 = time.perf_counter()
            t_read += t1 - t0
            ev = voxels_to_points(sh, g, incident_energies=inc)
            t2 = time.perf_counter()
            back = points_to_voxels(ev, g)
            t3 = time.perf_counter()
            assert np.array_equal(back, sh), "round trip is not exact"
            del back
            t_v2p += t2 - t1
            t_p2v += t3 - t2
            dense_bytes += sh.nbytes
            n_showers += len(sh)
            n_points += int(ak.sum(ak.num(ev.points, axis=1)))
            t0 = time.perf_counter()
        naive_inc, naive_sh = f.read(0, args.naive)
    gb = dense_bytes / 1e9
    print(f"\ndata: {n_showers} ds3 showers, {gb:.2f} GB dense ({naive_sh.dtype}), "
          f"{n_points / max(n_showers, 1):.0f} points/shower; HDF5 read+gunzip {gb / t_read:.2f} GB/s")
    print(f"voxels_to_points: {gb / t_v2p:6.2f} GB/s dense, {n_showers / t_v2p:9.0f} showers/s")
    print(f"points_to_voxels: {gb / t_p2v:6.2f} GB/s dense, {n_showers / t_p2v:9.0f} showers/s")

    t = time.perf_counter()
    ev = _naive_to_points(naive_sh, naive_inc, g)
    t_nv = time.perf_counter() - t
    t = time.perf_counter()
    back = _naive_to_voxels(ev, g)
    t_nb = time.perf_counter() - t
    assert np.array_equal(back, naive_sh)
    nv_rate, nb_rate = args.naive / t_nv, args.naive / t_nb
    print(f"naive loop ({args.naive} showers): to points {nv_rate:.1f} showers/s, to voxels {nb_rate:.1f} showers/s")
    print(f"speed-up over the naive loop: to points {n_showers / t_v2p / nv_rate:.0f}x, "
          f"to voxels {n_showers / t_p2v / nb_rate:.0f}x")

    # ---------------------------------------------------------------- file to file, peak memory
    print("\nfile to file (separate processes; peak RSS of that process):")
    exe = [sys.executable, "-m", "calopc.cli"]
    for path, n in ((small, 1000), (big, args.n)):
        pq = path.with_suffix(".parquet")
        wall, rss = _peak_rss_of([*exe, "convert", str(path), "-o", str(pq), "--no-progress"])
        dense = n * g.n_voxels * 8 / 1e9
        print(f"  convert  {n:>6} showers ({dense:5.2f} GB dense): {wall:6.1f} s, {n / wall:6.0f} showers/s, "
              f"peak RSS {rss:.2f} GB; parquet {pq.stat().st_size / 1e9:.2f} GB")
        out = path.with_name(path.stem + "_back.hdf5")
        wall, rss = _peak_rss_of([*exe, "voxelize", str(pq), "-o", str(out), "--no-progress"])
        print(f"  voxelize {n:>6} showers: {wall:6.1f} s, {n / wall:6.0f} showers/s, peak RSS {rss:.2f} GB")
    print(f"\nthis process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
