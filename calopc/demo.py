r"""The embedded default job: synthetic dataset 2 → point clouds → voxels, with a summary.

``calopc demo`` (or ``make demo``) runs it; it needs no data and no torch.
"""

from __future__ import annotations

__all__ = ["run_demo"]

import time
from pathlib import Path

import numpy as np


def run_demo(out_dir: str | Path = "demo", *, dataset: str = "2", n: int = 1000, seed: int = 0,
             progress: bool = True) -> dict:
    """Write a synthetic file, convert it to points and back, check the round trip; return a summary."""
    from ._safety import check_writable
    from .converters import convert_file, file_info, voxelize_file
    from .hdf5 import open_showers
    from .synth import write_synthetic

    out = Path(out_dir)
    check_writable(out, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    src = out / f"ds{dataset}_synthetic.hdf5"
    pts = out / f"ds{dataset}_synthetic.parquet"
    back = out / f"ds{dataset}_roundtrip.hdf5"

    t = time.perf_counter()
    write_synthetic(src, dataset=dataset, n=n, seed=seed, progress=progress)
    t_synth = time.perf_counter() - t
    print(f"[1/3] synthetic dataset {dataset}: {n} showers -> {src} ({t_synth:.1f} s)")

    t = time.perf_counter()
    convert_file(src, pts, progress=progress)
    t_conv = time.perf_counter() - t
    info = file_info(pts)
    print(f"[2/3] point clouds -> {pts} ({t_conv:.1f} s, {pts.stat().st_size / 1e6:.1f} MB)")
    print(f"      points/shower: mean {info['hits_mean']:.0f} ± {info['hits_std']:.0f}, min {info['hits_min']}, "
          f"median {info['hits_median']:.0f}, max {info['hits_max']} (of {info['n_voxels']} cells); "
          f"E_dep/E_inc {info['e_dep_over_e_inc_mean']:.3f} ± {info['e_dep_over_e_inc_std']:.3f}")

    t = time.perf_counter()
    stats = voxelize_file(pts, back, progress=progress)
    t_vox = time.perf_counter() - t
    exact = True
    with open_showers(src) as a, open_showers(back) as b:
        for (ea, sa), (eb, sb) in zip(a.iterate(), b.iterate()):
            exact &= bool(np.array_equal(sa, sb) and np.array_equal(ea, eb))
        exact &= len(a) == len(b)
    print(f"[3/3] back to voxels -> {back} ({t_vox:.1f} s): {stats}")
    print(f"      round trip voxels -> points -> voxels: {'EXACT (bit-identical)' if exact else 'MISMATCH'}")
    if not exact:
        msg = "round trip was not exact"
        raise RuntimeError(msg)
    return {"file": str(src), "points": str(pts), "roundtrip": str(back), "exact": exact, **info}
