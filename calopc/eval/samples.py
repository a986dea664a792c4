r"""Loading a sample for evaluation: voxel HDF5 or point-cloud Parquet, thresholded, in chunks."""

from __future__ import annotations

__all__ = ["Sample", "load_sample", "peek_sample"]

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..converters import VoxelizeStats
from ..geometry import Geometry
from .features import Features, apply_threshold, compute_features

_F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Sample:
    """What the metrics need from one sample, gathered in one streaming pass."""

    path: Path
    kind: str  # "voxels" or "points"
    geometry: Geometry
    features: Features
    voxel_energies: np.ndarray  # every cell energy above threshold (for the spectrum), float64 as the official one
    mean_shower: np.ndarray  # (n_voxels,) average thresholded shower
    low: np.ndarray | None = None  # (N, n_voxels) thresholded voxels, float32, if kept
    low_sparse: object | None = None  # the same as CellRows (occupied cells only), if kept sparse
    collisions: VoxelizeStats | None = None
    point_energies: np.ndarray | None = None  # energies of the points as stored (Parquet input), float32
    #: threshold, profiles, read (showers read), dropped (their rows in the file: showers left out because their
    #: cell energies overflow the features' float64 sums or float32), dropped_max_cell_mev, rows (the file rows of
    #: the showers kept, None when all are)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PAR1"


def load_sample(path: str | os.PathLike, *, threshold: float | None = None, geometry: Geometry | None = None,
                keep_voxels: bool | str = True, max_showers: int | None = None, collisions: str = "sum",
                progress: bool = False) -> Sample:
    """Read ``path`` chunk by chunk, threshold it and compute its features.

    Showers with cell energies that overflow the features' float64 sums (e.g. 1e308 MeV) or the
    float32 of the classifiers' inputs (above 3.4e38 MeV) are left out of every field, without a numpy
    warning; ``extra["dropped"]`` lists their rows (the caller reports them). A sample of only such
    showers is an error (:class:`ValueError`), as is a missing or non-positive incident energy.

    Args:
        threshold: per-cell threshold (MeV); defaults to the geometry's official one.
        keep_voxels: keep the thresholded voxels (float32) for the low-level classifiers; ``"sparse"``: only
            their occupied cells, as :class:`~calopc.eval.cnn.CellRows` in ``Sample.low_sparse`` (what cls-sparse
            needs; bounded by the hits, not by ``N · n_voxels``).
        max_showers: read only the first ``max_showers`` showers.
        collisions: policy used to re-voxelize a point-cloud file.
    """
    import awkward as ak
    from tqdm.auto import tqdm

    from ..converters import open_points, points_to_voxels
    from ..io import open_showers

    path = Path(path)
    dataset = path.is_dir() or (not path.exists() and any(c in str(path) for c in "*?["))  # folder or glob of Parquet
    if not path.exists() and not dataset:
        msg = f"{path}: no such file"
        raise FileNotFoundError(msg)
    feats, spectra, lows, pes, dropped, rows = [], [], [], [], [], []
    largest = 0.0
    sum_sh = None
    stats = None
    if dataset or _is_parquet(path):
        kind = "points"
        f = open_points(path, geometry=geometry)  # --geometry also reads a file without calopc metadata
        # at most 2000 showers or 128 MB of dense float64 voxels per chunk (high-granularity geometries)
        chunks_of = lambda: f.iterate(max(1, min(2000, (128 << 20) // (8 * f.geometry.n_voxels))))
        stats = VoxelizeStats()
    else:
        kind = "voxels"
        f = open_showers(path, geometry=geometry)
        chunks_of = lambda: f.iterate("128 MB")
    with f:
        g = f.geometry
        if geometry is not None and geometry != g:
            msg = f"{path}: geometry {g.name!r} ({g.n_voxels} voxels) does not match the expected {geometry.name!r} ({geometry.n_voxels} voxels)"
            raise ValueError(msg)
        thr = g.threshold if threshold is None else threshold
        total = len(f) if max_showers is None else min(len(f), max_showers)
        if total == 0:
            msg = f"{path}: the sample is empty (0 showers)"
            raise ValueError(msg)
        done = 0
        from .profiles import ProfileAccumulator

        prof = ProfileAccumulator(g)
        with tqdm(total=total, desc=f"read {path.name}", disable=None if progress else True, leave=False) as bar:
            for chunk in chunks_of():
                if kind == "points":
                    sh, st = points_to_voxels(chunk, g, collisions=collisions, dtype=np.float64, return_stats=True)
                    stats += st
                    inc = np.asarray(chunk["incident_energy"], dtype=np.float64)
                else:
                    inc, sh = chunk
                take = min(len(inc), total - done)
                inc, sh = np.asarray(inc[:take], dtype=np.float64).reshape(-1), sh[:take]
                bad_inc = ~np.isfinite(inc) | (inc <= 0)
                if bad_inc.any():
                    msg = (f"{path}: {int(bad_inc.sum())} showers have no valid incident energy (NaN or <= 0); "
                           "evaluation needs E_inc")
                    raise ValueError(msg)
                sh = apply_threshold(np.asarray(sh, dtype=np.float64), thr)
                # cell energies near the float64 limit (e.g. 1e308 MeV) overflow the features' sums, above 3.4e38 MeV
                # the classifiers' float32 inputs: such showers are left out (counted, reported once by the caller)
                with np.errstate(over="ignore", invalid="ignore"):
                    fe = compute_features(sh, inc, g)
                    bad = fe.nonfinite() | (sh.max(axis=1, initial=0.0) > _F32_MAX)
                if bad.any():
                    dropped.append(done + np.flatnonzero(bad))
                    largest = max(largest, float(sh[bad].max()))
                    keep = ~bad
                    sh, inc, fe = sh[keep], inc[keep], fe.select(keep)
                    if kind == "points":
                        chunk = chunk[keep]
                rows.append(done + np.flatnonzero(~bad))
                if kind == "points":
                    pes.append(np.asarray(ak.flatten(chunk["points", "E"], axis=None), dtype=np.float32))
                feats.append(fe)
                sum_sh = sh.sum(axis=0) if sum_sh is None else sum_sh + sh.sum(axis=0)
                prof.update(sh, inc)
                spectra.append(sh[sh > 0])
                if keep_voxels == "sparse":
                    from .cnn import CellRows

                    lows.append(CellRows.from_dense(sh))
                elif keep_voxels:
                    lows.append(sh.astype(np.float32))
                done += take
                bar.update(take)
                if done >= total:
                    break
    features = Features.concatenate(feats)
    if len(features) == 0:
        msg = (f"{path}: none of its {done:,} showers can be evaluated: their cell energies (up to {largest:.3g} MeV) "
               "overflow the features' float64 sums")
        raise ValueError(msg)
    dropped_rows = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
    return Sample(
        path=path, kind=kind, geometry=g, features=features,
        voxel_energies=np.concatenate(spectra) if spectra else np.zeros(0, np.float64),
        mean_shower=sum_sh / max(len(features), 1),
        low=np.concatenate(lows) if keep_voxels and keep_voxels != "sparse" else None,
        low_sparse=_concat_rows(lows) if keep_voxels == "sparse" else None,
        collisions=stats,
        point_energies=np.concatenate(pes) if pes else None,
        extra={"threshold": thr, "profiles": prof.result(), "read": done, "dropped": dropped_rows,
               "dropped_max_cell_mev": largest,
               "rows": np.concatenate(rows) if dropped else None},
    )


def _concat_rows(parts: list):
    from .cnn import CellRows

    return CellRows.concatenate(parts)


def peek_sample(path: str | os.PathLike, *, geometry: Geometry | None = None) -> tuple[Geometry, int]:
    """The geometry and number of showers of a sample, without reading its showers."""
    from ..converters import open_points
    from ..io import open_showers

    path = Path(path)
    dataset = path.is_dir() or (not path.exists() and any(c in str(path) for c in "*?["))
    if not path.exists() and not dataset:
        msg = f"{path}: no such file"
        raise FileNotFoundError(msg)
    f = open_points(path, geometry=geometry) if dataset or _is_parquet(path) else open_showers(path, geometry=geometry)
    with f:
        return f.geometry, len(f)

