r"""Training data: point-cloud Parquet files → padded, preprocessed torch batches.

Showers are held compactly in memory (flat ``cell`` int32 and ``E`` float32 per point,
plus per-shower offsets), read from the Parquet file chunk by chunk. Continuous
coordinates are drawn afresh for every batch by per-cell dequantisation, so the model
never sees the same coordinates twice.
"""

from __future__ import annotations

__all__ = ["Batch", "ShowerCollate", "ShowerDataset", "iterate_batches"]

import os
from collections.abc import Iterator
from dataclasses import dataclass

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
    def from_parquet(cls, path: str | os.PathLike, *, max_showers: int | None = None,
                     step_size: int = 5_000) -> ShowerDataset:
        """Read a file written by ``calopc convert``, chunk by chunk (memory: 8 bytes per point)."""
        from ..converters import open_points

        cells, energies, counts, incs = [], [], [], []
        n = 0
        with open_points(path) as f:
            geometry = f.geometry
            for chunk in f.iterate(step_size):
                if max_showers is not None and n >= max_showers:
                    break
                if max_showers is not None:
                    chunk = chunk[: max_showers - n]
                pts = chunk["points"]
                if "cell" not in ak.fields(pts):
                    msg = f"{path}: points have no 'cell' field; training needs voxel-derived points ('calopc convert')"
                    raise ValueError(msg)
                cells.append(np.asarray(ak.flatten(pts["cell"], axis=None), dtype=np.int32))
                energies.append(np.asarray(ak.flatten(pts["E"], axis=None), dtype=np.float32))
                counts.append(np.asarray(ak.num(pts, axis=1), dtype=np.int64))
                incs.append(np.asarray(chunk["incident_energy"], dtype=np.float64))
                n += len(chunk)
        if n == 0:
            msg = f"{path}: no showers to train on"
            raise ValueError(msg)
        counts_a = np.concatenate(counts)
        return cls(np.concatenate(cells), np.concatenate(energies), np.r_[0, np.cumsum(counts_a)],
                   np.concatenate(incs), geometry)

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
        lay, _ = pad([t[:, None] for t in torch.split(torch.from_numpy(layer), split)])
        return Batch(x, mask, torch.from_numpy(s), torch.from_numpy(prep.forward_cond(e_inc)), torch.from_numpy(counts),
                     lay[..., 0])


def iterate_batches(dataset: ShowerDataset, collate: ShowerCollate, batch_size: int, *, seed: int = 0,
                    epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True) -> Iterator[Batch]:
    """One shuffled epoch of batches; with ``world_size > 1`` each rank gets a disjoint share.

    The permutation depends only on ``(seed, epoch)``, so every rank agrees on it.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    per_rank = len(perm) // world_size
    perm = perm[rank * per_rank:(rank + 1) * per_rank]
    stop = len(perm) - (len(perm) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) == 0:
            break
        yield collate([dataset[j] for j in idx])
