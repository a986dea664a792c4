r"""Batched generation from a run directory: point clouds (Parquet) or voxels (official HDF5)."""

from __future__ import annotations

__all__ = ["GenerateResult", "generate", "parse_energies", "sample_events"]

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import awkward as ak
import numpy as np
import torch

from .checkpoint import LoadedModel, load
from .utils import resolve_device


@dataclass
class GenerateResult:
    """Summary of a :func:`generate` call."""

    n_showers: int
    n_points: int
    seconds_sampling: float
    seconds_total: float
    output: str | None
    collisions: dict = field(default_factory=dict)

    @property
    def showers_per_second(self) -> float:
        return self.n_showers / self.seconds_sampling if self.seconds_sampling > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"n_showers": self.n_showers, "n_points": self.n_points, "seconds_sampling": self.seconds_sampling,
                "seconds_total": self.seconds_total, "showers_per_second": self.showers_per_second,
                "output": self.output, "collisions": self.collisions}


def parse_energies(spec: str, n: int | None = None, *, seed: int = 0) -> np.ndarray:
    """Incident energies (MeV) from a command-line spec.

    * ``FILE.hdf5`` / ``FILE.parquet``: the incident energies of a shower or points file
      (the first ``n`` when given);
    * ``log-uniform:LO:HI`` or ``uniform:LO:HI``: ``n`` random energies (``n`` required);
    * ``E`` or ``E1,E2,...``: fixed values, repeated up to ``n`` when ``n`` is given.
    """
    spec = str(spec).strip()
    p = Path(spec)
    if p.suffix.lower() in (".h5", ".hdf5", ".parquet", ".pq") or p.exists():
        if not p.exists():
            msg = f"--energies: {spec}: no such file"
            raise ValueError(msg)
        if p.suffix.lower() in (".parquet", ".pq"):
            from ..converters import read_points

            e = np.asarray(read_points(p)[0]["incident_energy"], dtype=np.float64)
        else:
            from ..io import open_showers

            with open_showers(p, validate=False) as f:
                e = np.asarray(f.read()[0], dtype=np.float64).reshape(-1)
        return e[:n] if n is not None else e
    kind, _, rest = spec.partition(":")
    if kind in ("log-uniform", "uniform"):
        try:
            lo, hi = (float(v) for v in rest.split(":"))
        except ValueError:
            msg = f"--energies {spec!r}: expected {kind}:LO:HI in MeV, e.g. log-uniform:1e3:1e6"
            raise ValueError(msg) from None
        if n is None:
            msg = f"--energies {spec!r} needs -n (number of showers)"
            raise ValueError(msg)
        if not 0 < lo <= hi:
            msg = f"--energies {spec!r}: need 0 < LO <= HI"
            raise ValueError(msg)
        rng = np.random.default_rng(seed)
        u = rng.random(n)
        return np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if kind == "log-uniform" else lo + u * (hi - lo)
    try:
        vals = np.array([float(v) for v in spec.split(",")], dtype=np.float64)
    except ValueError:
        msg = (f"--energies {spec!r}: expected a file (.hdf5/.parquet), log-uniform:LO:HI, uniform:LO:HI "
               "or comma-separated energies in MeV")
        raise ValueError(msg) from None
    if (vals <= 0).any() or not np.isfinite(vals).all():
        msg = f"--energies {spec!r}: energies must be positive and finite (MeV)"
        raise ValueError(msg)
    if n is not None:
        vals = np.resize(vals, n)
    return vals


@torch.no_grad()
def sample_events(loaded: LoadedModel, energies: np.ndarray, *, seed: int = 0, batch_size: int = 1000,
                  device: str | torch.device = "cpu") -> Iterator[ak.Array]:
    """Yield generated showers, ``batch_size`` at a time, as awkward events
    ``{incident_energy, points: {r, alpha, z (float32), E (float64)}}`` (no ``cell``).

    The same ``seed``, energies, batch size and device give the same showers.
    """
    device = resolve_device(device)
    model, prep = loaded.model.to(device).eval(), loaded.preprocessor
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, energies.shape[0], batch_size):
            e = energies[i:i + batch_size]
            n, zar, en = model.generate(e, prep)
            pts = ak.zip({"r": zar[:, 2].astype(np.float32), "alpha": zar[:, 1].astype(np.float32),
                          "z": zar[:, 0].astype(np.float32), "E": en})
            yield ak.zip({"incident_energy": e, "points": ak.unflatten(pts, n)}, depth_limit=1)


def generate(run_dir: str | os.PathLike, energies: np.ndarray, *, output: str | os.PathLike | None = None,
             seed: int = 0, batch_size: int = 1000, device: str = "auto", ema: bool = True,
             collisions: str = "nearest-free", threshold: float | None = None, progress: bool = False) -> GenerateResult:
    """Generate one shower per incident energy and write them.

    Args:
        run_dir: a run directory from ``calopc train``.
        energies: incident energies in MeV, ``(N,)``.
        output: ``*.parquet`` (point clouds) or ``*.hdf5``/``*.h5`` (voxels in the official
            format, after mapping points to cells with the ``collisions`` policy). None:
            sample and time only.
        seed: random seed.
        batch_size: showers per model call.
        device: ``auto``, ``cpu`` or ``cuda``.
        ema: use the EMA weights. Defaults to True.
        collisions: ``nearest-free`` (CaloPointFlow II: at most one point per cell), ``sum`` or ``max``.
        threshold: voxel threshold (MeV) for HDF5 output; default: the geometry's.

    Returns:
        A :class:`GenerateResult` with counts, timings and (HDF5) collision statistics.
    """
    from ..converters import points_to_voxels, points_writer
    from ..converters.core import COLLISION_POLICIES, VoxelizeStats
    from ..io import shower_writer

    if collisions not in COLLISION_POLICIES:
        msg = f"collisions must be one of {', '.join(COLLISION_POLICIES)}, got {collisions!r}"
        raise ValueError(msg)
    kind = None
    if output is not None:
        suf = Path(output).suffix.lower()
        kind = {".parquet": "points", ".pq": "points", ".hdf5": "voxels", ".h5": "voxels"}.get(suf)
        if kind is None:
            msg = f"output {output}: expected a .parquet (points) or .hdf5/.h5 (voxels) file name"
            raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    dev = resolve_device(device)
    loaded = load(run_dir, ema=ema, device=dev)
    geo = loaded.geometry
    thr = geo.threshold if threshold is None else threshold
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    t_start = time.perf_counter()
    t_sample = 0.0
    n_points = 0
    stats = VoxelizeStats()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=energies.shape[0], unit="shower", desc="generate")

    def chunks() -> Iterator[ak.Array]:
        nonlocal t_sample, n_points
        it = sample_events(loaded, energies, seed=seed, batch_size=batch_size, device=dev)
        while True:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            ev = next(it, None)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_sample += time.perf_counter() - t
            if ev is None:
                return
            n_points += int(ak.sum(ak.num(ev.points, axis=1)))
            if bar is not None:
                bar.update(len(ev))
            yield ev

    info = {"model": loaded.name, "run_dir": str(run_dir), "seed": seed}
    try:
        if kind == "points":
            with points_writer(output, geo, info=info) as w:
                for ev in chunks():
                    w.append(ev)
        elif kind == "voxels":
            with shower_writer(output, geo.n_voxels, dtype=np.float32) as w:
                for ev in chunks():
                    vox, st = points_to_voxels(ev, geo, collisions=collisions, threshold=thr, dtype=np.float32,
                                               return_stats=True)
                    stats += st
                    w.append(ev["incident_energy"].to_numpy(), vox)
        else:
            for _ in chunks():
                pass
    finally:
        if bar is not None:
            bar.close()
    return GenerateResult(int(energies.shape[0]), n_points, t_sample, time.perf_counter() - t_start,
                          None if output is None else str(output), stats.as_dict() if kind == "voxels" else {})
