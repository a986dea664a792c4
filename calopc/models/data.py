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
are read. Continuous coordinates are drawn afresh for every batch by per-cell
dequantisation, so the model never sees the same coordinates twice.
"""

from __future__ import annotations

__all__ = ["Batch", "ShowerCollate", "ShowerDataset", "StreamingShowerDataset", "iterate_batches", "open_dataset"]

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """

    x: torch.Tensor
    mask: torch.Tensor
    shower: torch.Tensor
    cond: torch.Tensor
    n: torch.Tensor
    layer: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True)
                       for t in (self.x, self.mask, self.shower, self.cond, self.n, self.layer)))

    def __len__(self) -> int:
        return self.x.shape[0]


class ShowerDataset(torch.utils.data.Dataset):
    """Showers of a point-cloud Parquet file, conditioned on incident energy.

    Items are ``(cell int64 (n,), E float64 (n,), e_inc float)``; use :class:`ShowerCollate`
    to turn a list of items into a :class:`Batch`.

    Args:
        cell, energy: flat per-point arrays; offsets: ``(N + 1,)``; e_inc: ``(N,)`` MeV.
        geometry: the binning.
    """

    def __init__(self, cell: np.ndarray, energy: np.ndarray, offsets: np.ndarray, e_inc: np.ndarray,
                 geometry: Geometry) -> None:
        self.cell = np.asarray(cell, dtype=np.int32)
        self.energy = np.asarray(energy, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.e_inc = np.asarray(e_inc, dtype=np.float64)
        self.geometry = geometry
        if self.offsets.shape[0] != self.e_inc.shape[0] + 1:
            msg = f"offsets must have N + 1 = {self.e_inc.shape[0] + 1} entries, got {self.offsets.shape[0]}"
            raise ValueError(msg)

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
        return cls(cell[:p], energy[:p], np.r_[0, np.cumsum(counts_a)], np.concatenate(e_inc), src.geometry)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.e_inc.shape[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.cell[a:b], self.energy[a:b], float(self.e_inc[i])

    def fit_preprocessor(self, *, seed: int = 0, variant: str = "I") -> Preprocessor:
        """Fit a :class:`Preprocessor` (``variant`` ``"I"`` or ``"II"``) on this data."""
        return Preprocessor.fit(self.geometry, self.cell, self.energy, self.counts, self.e_inc, seed=seed,
                                variant=variant)

    def iter_batches(self, collate: ShowerCollate, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                     world_size: int = 1, drop_last: bool = True) -> Iterator[Batch]:
        """One shuffled epoch; see :func:`iterate_batches`."""
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))
        per_rank = len(perm) // world_size
        perm = perm[rank * per_rank:(rank + 1) * per_rank]
        stop = len(perm) - (len(perm) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) == 0:
                break
            yield collate([self[j] for j in idx])


class _Sources:
    """The row groups ("blocks") of one or several points files with the same geometry."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, max_showers: int | None = None) -> None:
        from ..converters import open_points

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            msg = "no training files given"
            raise ValueError(msg)
        self.geometry = None
        self.blocks: list[tuple[int, int, int]] = []  # (file, row group, showers used)
        self.n_points = 0
        self._columns: list[list[str]] = []  # per file: the Parquet column paths to read
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
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    if max_showers is not None:
                        rows = min(rows, max_showers - n)
                    if rows <= 0:
                        continue
                    self.blocks.append((fi, g, rows))
                    self.n_points += meta.row_group(g).column(cell_col).num_values
                    n += rows
        self.n_showers = n
        if n == 0:
            msg = f"{', '.join(map(str, self.paths))}: no showers to train on"
            raise ValueError(msg)

    def read_block(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Block ``k`` as ``(cell int32 (P,), E float32 (P,), counts int64 (B,), e_inc float64 (B,))``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fi, g, rows = self.blocks[k]
        with pq.ParquetFile(self.paths[fi]) as pf:
            t = pf.read_row_group(g, columns=self._columns[fi])
        pts = t.column("points").combine_chunks()
        offsets = np.asarray(pts.offsets, dtype=np.int64)
        start, stop = offsets[0], offsets[rows]
        values = pts.values
        cell = np.array(values.field("cell"), dtype=np.int32)[start:stop]  # copies: arrow's buffers can go
        energy = np.array(values.field("E"), dtype=np.float32)[start:stop]
        e_inc = np.array(t.column("incident_energy"), dtype=np.float64)[:rows]
        del t, pts, values
        pa.default_memory_pool().release_unused()  # the allocator would otherwise keep a row group's worth
        return cell, energy, np.diff(offsets[:rows + 1]), e_inc


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

    def fit_preprocessor(self, *, seed: int = 0, variant: str = "I", max_showers: int = 10_000) -> Preprocessor:
        """Fit a :class:`Preprocessor` on randomly chosen row groups holding about ``max_showers`` showers."""
        order = np.random.default_rng([seed, 7]).permutation(len(self._src.blocks))
        parts, n = [], 0
        for k in order:
            if n >= max_showers:
                break
            parts.append(self._src.read_block(int(k)))
            n += len(parts[-1][3])
        cell, energy, counts, e_inc = (np.concatenate(x) for x in zip(*parts))
        return Preprocessor.fit(self.geometry, cell, energy, counts, e_inc, seed=seed, variant=variant)

    def iter_batches(self, collate: ShowerCollate, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                     world_size: int = 1, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch; rank ``r`` of ``world_size`` gets every ``world_size``-th batch of each shuffled buffer."""
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
            for b in range(0, n_use, round_size):
                idx = perm[b + rank * batch_size:min(b + (rank + 1) * batch_size, n_use)]
                if len(idx) == 0:
                    continue
                yield collate([(cell[offsets[j]:offsets[j + 1]], energy[offsets[j]:offsets[j + 1]], float(e_inc[j]))
                               for j in idx])
            keep = np.sort(perm[n_use:])
            if len(keep):
                sel = np.zeros(n_buf, dtype=bool)
                sel[keep] = True
                pmask = np.repeat(sel, counts)
                buf = [(cell[pmask], energy[pmask], counts[keep], e_inc[keep])]
            else:
                buf = []
            n_buf = len(keep)


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
            y = prep.forward_points(zar, energy, np.repeat(e_inc, counts))
            e_sum = np.bincount(shower_of, weights=energy, minlength=len(items))
            s = prep.forward_shower(counts, e_sum, e_inc)
        else:
            n_layer, e_layer = layer_sums(prep.geometry, cell, energy, counts)
            y = prep.forward_points_layer(zar, energy, e_layer[shower_of, layer], layer)
            s = prep.forward_layers(n_layer, e_layer, e_inc, self.rng)
        split = counts.tolist()
        x, mask = pad(list(torch.split(torch.from_numpy(y), split)))
        lay, _ = pad(list(torch.split(torch.from_numpy(layer), split)))
        return Batch(x, mask, torch.from_numpy(s), torch.from_numpy(prep.forward_cond(e_inc)), torch.from_numpy(counts),
                     lay)


def iterate_batches(dataset: ShowerDataset | StreamingShowerDataset, collate: ShowerCollate, batch_size: int, *,
                    seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = True) -> Iterator[Batch]:
    """One shuffled epoch of batches; with ``world_size > 1`` each rank gets a disjoint share.

    The order depends only on ``(seed, epoch)``, so every rank agrees on it, and every rank
    gets the same number of batches.
    """
    return dataset.iter_batches(collate, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                drop_last=drop_last)
