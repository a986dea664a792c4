r"""Training data: point-cloud Parquet files → padded, preprocessed torch batches.

Two datasets with one interface (``len``, ``geometry``, ``fit_preprocessor``,
``iter_batches``):

* :class:`ShowerDataset` holds the showers compactly in memory (flat ``cell`` int32 and
  ``E`` float32 per point plus per-shower offsets: 8 bytes per point), read row group by
  row group; every epoch is a full shuffle.
* :class:`StreamingShowerDataset` keeps only a shuffle buffer in memory: every epoch visits
  the files' row groups in a new random order, fills a buffer of ``buffer_showers``
  showers, shuffles it and serves batches from it. Memory is bounded by the buffer,
  whatever the size of the files (a 50k-shower dataset-3 file included).

:func:`open_dataset` picks one by the size of the data. Only the ``cell`` and ``E`` columns
are read; every block is validated (cells inside the geometry, finite non-negative
energies, positive incident energies). Continuous coordinates are drawn afresh for every
batch by per-cell dequantisation, so the model never sees the same coordinates twice.

Two collates turn showers into :class:`Batch` es: :class:`DeviceCollate` (the default of
training) uploads a block of showers to the device once and builds every batch there with
torch; :class:`ShowerCollate` builds them on the host with NumPy (the older path, kept as a
baseline and for equality tests). With ``bucket=True`` the batches group showers of similar
size ("sortish" windows), so padded shapes repeat.
"""

from __future__ import annotations

__all__ = ["Batch", "DeviceCollate", "ShowerCollate", "ShowerDataset", "StreamingShowerDataset", "iterate_batches",
           "open_dataset", "pack", "validate_showers"]

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import torch

from ..geometry import Geometry
from .preprocess import Preprocessor, layer_sums
from .utils import pad


@dataclass
class Batch:
    """A padded batch of preprocessed showers.

    Shapes:
        x: ``(B, N_max, F)`` point features, preprocessed (variant I: ``(z, alpha, r, E)``,
        variant II: ``(alpha, r, E)``); mask: ``(B, N_max)`` bool; shower: ``(B, S)``
        (variant I: 2, II: 2 per layer); cond: ``(B, 1)``; n: ``(B,)`` int64;
        layer: ``(B, N_max)`` int64, the layer of each point (0 in the padding).
        The packed layout, when the collate provides it (both collates do): points ``(P, F)``
        equal to ``x[mask]``, point_shower ``(P,)`` int64 shower of each point, point_layer
        ``(P,)`` equal to ``layer[mask]``; models can use them instead of boolean indexing
        (which reads the number of points back to the host on CUDA).
    """

    x: torch.Tensor
    mask: torch.Tensor
    shower: torch.Tensor
    cond: torch.Tensor
    n: torch.Tensor
    layer: torch.Tensor
    points: torch.Tensor | None = None
    point_shower: torch.Tensor | None = None
    point_layer: torch.Tensor | None = None

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real points, flat: ``(x (P, F), shower (P,), layer (P,))``, from the packed layout when the batch
        has it (no boolean indexing, no host read on CUDA), else from the padded one (:func:`pack`)."""
        if self.points is not None and self.point_shower is not None and self.point_layer is not None:
            return self.points, self.point_shower, self.point_layer
        shower_of, x, layer = pack(self.mask, self.x, self.layer)
        return x, shower_of, layer

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.x, self.mask, self.shower, self.cond, self.n, self.layer, self.points,
                                 self.point_shower, self.point_layer)))

    def __len__(self) -> int:
        return self.x.shape[0]


def pack(mask: torch.Tensor, *padded: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The entries of padded per-point tensors where ``mask`` is set, flat, after the shower of each entry:
    ``(shower (P,), *(t[mask] for t in padded))``, in row-major order (shower by shower).

    Shapes:
        mask: ``(B, N)`` bool; each of ``padded``: ``(B, N, ...)``; returns ``(P,)`` int64, then ``(P, ...)``.
    """
    b, n = mask.shape
    shower_of = torch.arange(b, device=mask.device)[:, None].expand(b, n)[mask]
    return (shower_of, *(t[mask] for t in padded))


class ShowerDataset(torch.utils.data.Dataset):
    """Showers of a point-cloud Parquet file, conditioned on incident energy.

    Items are ``(cell int64 (n,), E float64 (n,), e_inc float)``; use :class:`ShowerCollate`
    to turn a list of items into a :class:`Batch`.

    Args:
        cell, energy: flat per-point arrays; offsets: ``(N + 1,)``; e_inc: ``(N,)`` MeV.
        geometry: the binning.
    """

    def __init__(self, cell: np.ndarray, energy: np.ndarray, offsets: np.ndarray, e_inc: np.ndarray,
                 geometry: Geometry, *, validate: bool = True, where: str = "training data") -> None:
        self.cell = np.asarray(cell, dtype=np.int32)
        self.energy = np.asarray(energy, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.e_inc = np.asarray(e_inc, dtype=np.float64)
        self.geometry = geometry
        if self.offsets.shape[0] != self.e_inc.shape[0] + 1:
            msg = f"offsets must have N + 1 = {self.e_inc.shape[0] + 1} entries, got {self.offsets.shape[0]}"
            raise ValueError(msg)
        if validate:
            validate_showers(self.cell, self.energy, np.diff(self.offsets), self.e_inc, geometry, where=where)

    @classmethod
    def from_events(cls, events: ak.Array, geometry: Geometry) -> ShowerDataset:
        """From awkward events as returned by ``voxels_to_points`` (need ``points.cell`` and ``points.E``)."""
        pts = events["points"]
        if "cell" not in ak.fields(pts):
            msg = f"training points need a 'cell' field (write them with 'calopc convert'); found {ak.fields(pts)}"
            raise ValueError(msg)
        counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
        return cls(np.asarray(ak.flatten(pts["cell"], axis=None)), np.asarray(ak.flatten(pts["E"], axis=None)),
                   np.r_[0, np.cumsum(counts)], np.asarray(events["incident_energy"], dtype=np.float64), geometry)

    @classmethod
    def from_parquet(cls, path: str | os.PathLike | Sequence[str | os.PathLike], *,
                     max_showers: int | None = None) -> ShowerDataset:
        """Read one or several files written by ``calopc convert``, row group by row group (memory: 8 bytes per point)."""
        src = _sources(path, max_showers)
        cell = np.empty(src.n_points, dtype=np.int32)  # filled in place: no second copy at the end
        energy = np.empty(src.n_points, dtype=np.float32)
        counts, e_inc = [], []
        p = 0
        for k in range(len(src.blocks)):
            c, e, n, inc = src.read_block(k)
            cell[p:p + c.shape[0]], energy[p:p + c.shape[0]] = c, e
            p += c.shape[0]
            counts.append(n)
            e_inc.append(inc)
        counts_a = np.concatenate(counts)
        # every block was validated when read
        return cls(cell[:p], energy[:p], np.r_[0, np.cumsum(counts_a)], np.concatenate(e_inc), src.geometry,
                   validate=False)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.e_inc.shape[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.cell[a:b], self.energy[a:b], float(self.e_inc[i])

    def fit_preprocessor(self, *, seed: int = 0, variant: str = "I", **options: Any) -> Preprocessor:
        """Fit a :class:`Preprocessor` (``variant`` ``"I"`` or ``"II"``; other ``options`` go to
        :meth:`Preprocessor.fit`) on this data."""
        return Preprocessor.fit(self.geometry, self.cell, self.energy, self.counts, self.e_inc, seed=seed,
                                variant=variant, **options)

    def iter_batches(self, collate: ShowerCollate | DeviceCollate, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     rank: int = 0, world_size: int = 1, drop_last: bool = True, bucket: bool = False) -> Iterator[Batch]:
        """One shuffled epoch; see :func:`iterate_batches`."""
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(len(self))
        if bucket:
            idx = _bucketed(perm, self.counts, batch_size, world_size, rank, rng, drop_last)
        else:
            per_rank = len(perm) // world_size
            perm = perm[rank * per_rank:(rank + 1) * per_rank]
            stop = len(perm) - (len(perm) % batch_size if drop_last else 0)
            idx = [perm[i:i + batch_size] for i in range(0, stop, batch_size)]
        idx = [i for i in idx if len(i)]
        yield from _collate_batches(collate, _Block(self.cell, self.energy, self.offsets, self.e_inc), idx)


class _Sources:
    """The row groups ("blocks") of one or several points files with the same geometry."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, max_showers: int | None = None) -> None:
        from ..converters import open_points

        from ..converters import points_paths

        self.paths = points_paths(paths) if (isinstance(paths, (str, os.PathLike)) or len(paths)) else []  # folders, globs
        if not self.paths:
            msg = "no training files given"
            raise ValueError(msg)
        self.geometry = None
        self.blocks: list[tuple[int, int, int]] = []  # (file, row group, showers used)
        self.n_points = 0
        self._columns: list[list[str]] = []  # per file: the Parquet column paths to read
        self._first_row: list[int] = []  # per block: index of its first shower in its file
        n = 0
        for fi, p in enumerate(self.paths):
            with open_points(p) as f:
                names = f._pf.schema_arrow.field("points").type.value_type
                if "cell" not in [names.field(i).name for i in range(names.num_fields)]:
                    msg = f"{p}: points have no 'cell' field; training needs voxel-derived points ('calopc convert')"
                    raise ValueError(msg)
                if self.geometry is None:
                    self.geometry = f.geometry
                elif f.geometry != self.geometry:
                    msg = (f"{p}: geometry {f.geometry.name!r} ({f.geometry.n_voxels} voxels) differs from "
                           f"{self.paths[0]}'s {self.geometry.name!r} ({self.geometry.n_voxels} voxels)")
                    raise ValueError(msg)
                meta = f._pf.metadata
                paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
                # the list level is named by the writer ("list.element" or "list.item"): look the leaves up
                leaf = {k: next(c for c in paths if c.startswith("points.") and c.rsplit(".", 1)[1] == k)
                        for k in ("cell", "E")}
                self._columns.append(["incident_energy", leaf["cell"], leaf["E"]])
                cell_col = paths.index(leaf["cell"])
                row0 = 0
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    row0, first = row0 + rows, row0
                    if max_showers is not None:
                        rows = min(rows, max_showers - n)
                    if rows <= 0:
                        continue
                    self.blocks.append((fi, g, rows))
                    self._first_row.append(first)
                    self.n_points += meta.row_group(g).column(cell_col).num_values
                    n += rows
        self.n_showers = n
        from ..hdf5 import EnergyScale

        self._scale = [EnergyScale(p) for p in self.paths]
        if n == 0:
            msg = f"{', '.join(map(str, self.paths))}: no showers to train on"
            raise ValueError(msg)

    def read_block(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Block ``k`` as ``(cell int32 (P,), E float32 (P,), counts int64 (B,), e_inc float64 (B,))``."""
        import pyarrow as pa

        from ..converters.files import open_parquet

        fi, g, rows = self.blocks[k]
        try:
            with open_parquet(self.paths[fi]) as pf:  # page checksums verified
                t = pf.read_row_group(g, columns=self._columns[fi])
        except Exception as err:  # corrupt pages: pyarrow's own error types, without the file name
            from ..io import ShowerFileError

            msg = f"{self.paths[fi]}: failed to read row group {g} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from None
        pts = t.column("points").combine_chunks()
        offsets = np.asarray(pts.offsets, dtype=np.int64)
        start, stop = offsets[0], offsets[rows]
        values = pts.values
        cell = np.array(values.field("cell"), dtype=np.int32)[start:stop]  # copies: arrow's buffers can go
        energy = np.array(values.field("E"), dtype=np.float32)[start:stop]
        e_inc = np.array(t.column("incident_energy"), dtype=np.float64)[:rows]
        del t, pts, values
        pa.default_memory_pool().release_unused()  # the allocator would otherwise keep a row group's worth
        counts = np.diff(offsets[:rows + 1])
        validate_showers(cell, energy, counts, e_inc, self.geometry, where=str(self.paths[fi]),
                         first_shower=self._first_row[k])
        self._scale[fi].check(e_inc, counts, energy)  # one warning per file for a likely unit mistake
        return cell, energy, counts, e_inc


def _sources(paths: str | os.PathLike | Sequence[str | os.PathLike] | _Sources, max_showers: int | None) -> _Sources:
    """``paths`` opened as :class:`_Sources`, or already opened (``max_showers`` was applied then)."""
    return paths if isinstance(paths, _Sources) else _Sources(paths, max_showers=max_showers)


class StreamingShowerDataset:
    """Showers of one or several points files, streamed through a shuffle buffer.

    Every epoch visits the row groups in a random order (depending only on ``(seed, epoch)``,
    so all ranks of a distributed run agree), collects at least ``buffer_showers`` showers,
    shuffles them and serves batches; showers that do not fill a whole round of batches are
    kept for the next buffer. Memory: the buffer plus one row group.

    Args:
        paths: one or several files written by ``calopc convert`` (same geometry).
        buffer_showers: showers in the shuffle buffer.
        max_showers: use only the first N showers.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, buffer_showers: int = 20_000,
                 max_showers: int | None = None) -> None:
        self._src = _sources(paths, max_showers)
        self.geometry = self._src.geometry
        self.buffer_showers = max(1, int(buffer_showers))

    def __len__(self) -> int:
        return self._src.n_showers

    @property
    def n_points(self) -> int:
        """Points in the row groups used (from the file metadata; an upper bound with ``max_showers``)."""
        return self._src.n_points

    def fit_preprocessor(self, *, seed: int = 0, variant: str = "I", max_showers: int = 10_000,
                         **options: Any) -> Preprocessor:
        """Fit a :class:`Preprocessor` on randomly chosen row groups holding about ``max_showers`` showers."""
        order = np.random.default_rng([seed, 7]).permutation(len(self._src.blocks))
        parts, n = [], 0
        for k in order:
            if n >= max_showers:
                break
            parts.append(self._src.read_block(int(k)))
            n += len(parts[-1][3])
        cell, energy, counts, e_inc = (np.concatenate(x) for x in zip(*parts))
        return Preprocessor.fit(self.geometry, cell, energy, counts, e_inc, seed=seed, variant=variant, **options)

    def iter_batches(self, collate: ShowerCollate | DeviceCollate, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     rank: int = 0, world_size: int = 1, drop_last: bool = True, bucket: bool = False) -> Iterator[Batch]:
        """One epoch; rank ``r`` of ``world_size`` gets every ``world_size``-th batch of each shuffled buffer.

        Each buffer is handed to the collate once (:class:`DeviceCollate` uploads it to the device once).
        """
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self._src.blocks))
        round_size = batch_size * world_size
        buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        n_buf = 0
        for i, k in enumerate(order):
            part = self._src.read_block(int(k))
            buf.append(part)
            n_buf += len(part[3])
            last = i == len(order) - 1
            if n_buf < max(self.buffer_showers, round_size) and not last:
                continue
            cell, energy, counts, e_inc = (np.concatenate(x) for x in zip(*buf))
            offsets = np.r_[0, np.cumsum(counts)]
            perm = rng.permutation(n_buf)
            n_use = (n_buf // round_size) * round_size
            if last and not drop_last:
                n_use = n_buf
            if bucket:
                idx = _bucketed(perm[:n_use], counts, batch_size, world_size, rank, rng, drop_last=False)
            else:
                idx = [perm[b + rank * batch_size:min(b + (rank + 1) * batch_size, n_use)]
                       for b in range(0, n_use, round_size)]
            idx = [j for j in idx if len(j)]
            if idx:
                yield from _collate_batches(collate, _Block(cell, energy, offsets, e_inc), idx)
            keep = np.sort(perm[n_use:])
            if len(keep):
                sel = np.zeros(n_buf, dtype=bool)
                sel[keep] = True
                pmask = np.repeat(sel, counts)
                buf = [(cell[pmask], energy[pmask], counts[keep], e_inc[keep])]
            else:
                buf = []
            n_buf = len(keep)


def _bucketed(perm: np.ndarray, counts: np.ndarray, batch_size: int, world_size: int, rank: int,
              rng: np.random.Generator, drop_last: bool = True, group: int = 16) -> list[np.ndarray]:
    """Batches of showers of similar size ("sortish"): windows of ``group`` rounds of the shuffled
    order are sorted by point count and cut into rounds; the rounds are shuffled; rank ``r`` takes
    its share of every round. Shapes repeat and little padding is wasted."""
    round_size = batch_size * world_size
    n_use = (len(perm) // round_size) * round_size if drop_last else len(perm)
    perm = perm[:n_use]
    rounds = []
    w = group * round_size
    for a in range(0, n_use, w):
        win = perm[a:a + w]
        win = win[np.argsort(counts[win], kind="stable")]
        rounds += [win[b:b + round_size] for b in range(0, len(win), round_size)]
    return [rounds[j][rank * batch_size:(rank + 1) * batch_size] for j in rng.permutation(len(rounds))]


def validate_showers(cell: np.ndarray, energy: np.ndarray, counts: np.ndarray, e_inc: np.ndarray, geometry: Geometry,
                     *, where: str = "training data", first_shower: int = 0) -> None:
    """One-line ValueError for the first bad shower: cells outside the geometry, non-finite or
    negative energies, non-finite or non-positive incident energies.

    Shapes:
        cell, energy: ``(P,)`` flat; counts, e_inc: ``(N,)``.
    """
    n_vox = geometry.n_voxels

    def shower_of(point: int) -> int:
        return first_shower + int(np.searchsorted(np.cumsum(counts), point, side="right"))

    bad = np.flatnonzero((cell < 0) | (cell >= n_vox))
    if bad.size:
        i = int(bad[0])
        msg = (f"{where}: shower {shower_of(i)}: cell {int(cell[i])} is outside the geometry {geometry.name!r} "
               f"({bad.size} such points); expected cell indices 0..{n_vox - 1}")
        raise ValueError(msg)
    bad = np.flatnonzero(~np.isfinite(energy) | (energy < 0))
    if bad.size:
        i = int(bad[0])
        msg = (f"{where}: shower {shower_of(i)}: point energy E = {float(energy[i])} ({bad.size} such points); "
               "expected finite energies >= 0 MeV")
        raise ValueError(msg)
    bad = np.flatnonzero(~np.isfinite(e_inc) | (e_inc <= 0))
    if bad.size:
        i = int(bad[0])
        msg = (f"{where}: shower {first_shower + i}: incident_energy = {float(e_inc[i])} ({bad.size} such showers); "
               "expected finite energies > 0 MeV")
        raise ValueError(msg)


def _collate_batches(collate: Any, block: _Block, index: list[np.ndarray]) -> Iterator[Any]:
    """``collate.batches(block, index)``; a plain callable gets each batch's items ``[(cell, E, e_inc), ...]``."""
    if hasattr(collate, "batches"):
        yield from collate.batches(block, index)
        return
    o = block.offsets
    for idx in index:
        yield collate([(block.cell[o[j]:o[j + 1]], block.energy[o[j]:o[j + 1]], float(block.e_inc[j])) for j in idx])


@dataclass
class _Block:
    """Flat showers held together (a dataset or a shuffle buffer). Shapes: cell, energy ``(P,)``;
    offsets ``(N + 1,)``; e_inc ``(N,)``."""

    cell: np.ndarray
    energy: np.ndarray
    offsets: np.ndarray
    e_inc: np.ndarray


def open_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], *, stream: bool | None = None,
                 buffer_showers: int = 20_000, max_showers: int | None = None,
                 memory_limit: float = 2e9) -> ShowerDataset | StreamingShowerDataset:
    """Training data from points files: in memory, or streamed through a shuffle buffer.

    Args:
        stream: ``True``/``False`` to choose; ``None`` streams when the showers would take
            more than ``memory_limit`` bytes in memory (8 bytes per point).
    """
    src = _Sources(paths, max_showers=max_showers)  # read the files' metadata once, for both choices
    if stream is None:
        stream = 8 * src.n_points > memory_limit
    if stream:
        return StreamingShowerDataset(src, buffer_showers=buffer_showers)
    return ShowerDataset.from_parquet(src)


class ShowerCollate:
    """Turns dataset items into a :class:`Batch`, dequantising cells with its own RNG.

    Args:
        prep: the fitted preprocessing.
        seed: seed of the dequantisation noise.
    """

    def __init__(self, prep: Preprocessor, seed: int = 0) -> None:
        self.prep = prep
        self.rng = np.random.default_rng(seed)

    def __call__(self, items: list[tuple[np.ndarray, np.ndarray, float]]) -> Batch:
        counts = np.array([len(c) for c, _, _ in items], dtype=np.int64)
        e_inc = np.array([e for _, _, e in items], dtype=np.float64)
        cell = np.concatenate([c for c, _, _ in items]).astype(np.int64)
        energy = np.concatenate([e for _, e, _ in items]).astype(np.float64)
        prep = self.prep
        zar = prep.dequantise(cell, self.rng)
        shower_of = np.repeat(np.arange(len(items)), counts)
        layer = np.asarray(prep.geometry.cell_layer, dtype=np.int64)[cell]
        if prep.variant == "I":
            e_sum = np.bincount(shower_of, weights=energy, minlength=len(items))
            y = prep.forward_points(zar, energy, np.repeat(e_inc, counts), np.repeat(e_sum, counts))
            s = prep.forward_shower(counts, e_sum, e_inc)
        else:
            n_layer, e_layer = layer_sums(prep.geometry, cell, energy, counts)
            y = prep.forward_points_layer(zar, energy, e_layer[shower_of, layer], layer)
            s = prep.forward_layers(n_layer, e_layer, e_inc, self.rng)
        split = counts.tolist()
        x, mask = pad(list(torch.split(torch.from_numpy(y), split)))
        lay, _ = pad(list(torch.split(torch.from_numpy(layer), split)))
        return Batch(x, mask, torch.from_numpy(s), torch.from_numpy(prep.forward_cond(e_inc)), torch.from_numpy(counts),
                     lay, torch.from_numpy(y), torch.from_numpy(shower_of.astype(np.int64)), torch.from_numpy(layer))

    def batches(self, block: _Block, index: list[np.ndarray]) -> Iterator[Batch]:
        """The batches of ``block`` selected by each index array (built on the host, one shower at a time)."""
        o = block.offsets
        for idx in index:
            yield self([(block.cell[o[j]:o[j + 1]], block.energy[o[j]:o[j + 1]], float(block.e_inc[j])) for j in idx])


class DeviceCollate:
    """Batches built on a device: each block of showers (the whole in-memory dataset, or a
    shuffle buffer) is uploaded once as flat tensors plus offsets; gathering, padding, masks,
    dequantisation and preprocessing then run as torch operations there
    (:class:`~calopc.models.preprocess.TorchPreprocessor`). Padded shapes come from the
    host's copy of the counts, so building a batch needs no device-to-host sync. On CPU the
    same code runs (and the upload shares memory with the arrays).

    Args:
        prep: the fitted preprocessing.
        device: where batches are built.
        seed: seed of the dequantisation noise (a ``torch.Generator`` on the device).
        pad_multiple: round the padded length up to a multiple of this (shapes repeat; 1: off).
        noise: ``"auto"`` (default: NumPy's generator on the CPU, where it is faster, a
            ``torch.Generator`` on CUDA), ``"torch"``, ``"numpy"``, or a ``numpy.random.Generator``
            (noise drawn on the host in :class:`ShowerCollate`'s order, for equality tests).
    """

    def __init__(self, prep: Preprocessor, device: torch.device | str = "cpu", seed: int = 0, *,
                 pad_multiple: int = 1, noise: str | np.random.Generator = "auto") -> None:
        self.prep = prep
        self.device = torch.device(device)
        self.tp = prep.to_torch(self.device)
        self.pad_multiple = max(1, int(pad_multiple))
        if isinstance(noise, np.random.Generator):
            self._np_rng = noise
        elif noise == "numpy" or (noise == "auto" and self.device.type == "cpu"):
            self._np_rng = np.random.default_rng(int(seed))
        elif noise in ("torch", "auto"):
            self._np_rng = None
        else:
            msg = f"noise must be 'auto', 'torch', 'numpy' or a numpy Generator, got {noise!r}"
            raise ValueError(msg)
        self._gen = torch.Generator(self.device).manual_seed(int(seed))
        self._store: tuple[np.ndarray, dict] | None = None  # (the block's cell array, its tensors)

    def _rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._np_rng is not None:
            return torch.from_numpy(self._np_rng.random(shape)).to(self.device)
        return torch.rand(shape, generator=self._gen, device=self.device, dtype=torch.float64)

    def upload(self, block: _Block) -> dict[str, torch.Tensor]:
        """The block's flat tensors on the device (cached: the same block is uploaded once)."""
        if self._store is not None and self._store[0] is block.cell:
            return self._store[1]
        pin = self.device.type == "cuda"

        def up(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if pin:
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True).to(dtype)

        # the dtypes of the host arrays: on CPU the tensors share their memory (no second copy of the data)
        st = {"cell": up(block.cell, torch.int32), "energy": up(block.energy, torch.float32),
              "offsets": up(block.offsets, torch.int64), "e_inc": up(block.e_inc, torch.float64),
              "counts_host": np.diff(block.offsets)}
        self._store = (block.cell, st)
        return st

    def batches(self, block: _Block, index: list[np.ndarray]) -> Iterator[Batch]:
        st = self.upload(block)
        for idx in index:
            yield self.make(st, idx)

    def make(self, st: dict[str, torch.Tensor], idx: np.ndarray) -> Batch:
        """The batch of showers ``idx`` (host indices into the uploaded block)."""
        dev = self.device
        n_host = st["counts_host"][idx]
        b, p = len(idx), int(n_host.sum())
        n_max = int(n_host.max()) if b else 0
        n_max = -(-n_max // self.pad_multiple) * self.pad_multiple
        ti = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(dev, non_blocking=True)
        n = torch.from_numpy(n_host.astype(np.int64)).to(dev, non_blocking=True)
        starts = st["offsets"][ti]
        shower_of = torch.repeat_interleave(torch.arange(b, device=dev), n, output_size=p)
        first = torch.cumsum(n, 0) - n
        rank = torch.arange(p, device=dev) - first[shower_of]
        pos = starts[shower_of] + rank
        e_inc = st["e_inc"][ti]
        y, s, cond, layer = self.tp.encode(st["cell"][pos].long(), st["energy"][pos], shower_of, e_inc, self._rand)
        x = torch.zeros(b, n_max, y.shape[1], dtype=y.dtype, device=dev)
        x[shower_of, rank] = y
        lay = torch.zeros(b, n_max, dtype=torch.int64, device=dev)
        lay[shower_of, rank] = layer
        mask = torch.arange(n_max, device=dev)[None, :] < n[:, None]
        return Batch(x, mask, s, cond, n, lay, y, shower_of, layer)


def iterate_batches(dataset: ShowerDataset | StreamingShowerDataset, collate: ShowerCollate | DeviceCollate,
                    batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = True, bucket: bool = False) -> Iterator[Batch]:
    """One shuffled epoch of batches; with ``world_size > 1`` each rank gets a disjoint share.

    The order depends only on ``(seed, epoch)``, so every rank agrees on it, and every rank
    gets the same number of batches.
    """
    return dataset.iter_batches(collate, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                drop_last=drop_last, bucket=bucket)
