r"""The CNN classifier metric: the official CaloChallenge 3-D ResNet (``cls-resnet``), dense and sparse.

``cls-cnn`` is the ResNet of the official evaluation (``resnet.py::generate_model(18)``):
``conv1`` 7×7×7 with stride 2 and padding 3 (no bias) → batch norm → ReLU → max pool
3×3×3 / 2 → four stages of two BasicBlocks (widths 32, 64, 64, 128; stride 2 from the
second stage; 1×1×1 strided convolution + batch norm on the shortcut where the shape
changes) → global average pool; ``log10 E_inc`` goes through ``BatchNorm1d(1)`` and is
appended before the final ``Linear(128 + 1, 1)``. Input: the voxels divided by ``E_inc``
(the ``cls-low`` input) on the ``(45, 16, 9)`` (dataset 2) or ``(45, 50, 18)`` (dataset 3)
grid. It is trained with the protocol of the DNN classifiers
(:func:`calopc.eval.classifier.train_classifier`: per-class split, Adam 2e-4, BCE,
best test accuracy, isotonic calibration, AUC and JSD on the validation split).

``cls-sparse`` is the same network built from :mod:`calopc.sparse.nn` on the occupied
cells only: strided convolutions and pooling keep ``unique(cell // 2)`` as outputs,
the 3×3×3 convolutions of the blocks are submanifold, batch norm runs over the occupied
cells, and the global average is the sum over occupied cells divided by the cells of the
last grid (the dense average with empty cells counted as 0; ``sparse_pool="occupied"``
averages over the occupied cells instead). It is not numerically the dense network (a
dense convolution also writes into empty cells, and its batch norm counts them), but it
is the same architecture with the same parameters.

Options for small runs: ``widths``, ``blocks``, ``epochs``, ``batch_size``. By default
α is zero-padded as in the official network; ``periodic_alpha=True`` pads it
circularly (both variants).
"""

from __future__ import annotations

__all__ = ["CNNConfig", "CellRows", "DenseResNet", "SparseResNet", "check_dense_memory", "cnn_metric",
           "dense_activation_bytes"]

import math
import os
from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry
from .classifier import ClassifierConfig, ClassifierResult, check_sample_sizes, official_split, train_classifier


@dataclass(frozen=True)
class CNNConfig:
    widths: tuple[int, ...] | None = None  # channels per stage (None: cls-cnn (32, 64, 64, 128), official;
                                           # cls-sparse native (16, 32, 48, 64))
    blocks: tuple[int, ...] | None = None  # residual blocks per stage (None: cls-cnn (2, 2, 2, 2) = ResNet-18;
                                           # cls-sparse native (0, 1, 1, 1))
    conv1_kernel: int = 7  # cls-cnn (and sparse_arch="resnet") first convolution: kernel, stride 2, padding k // 2
    max_pool: bool = True  # max pool 3×3×3 / 2 after conv1 (official)
    periodic_alpha: bool = False  # pad α circularly instead of with zeros (official: zeros); cls-sparse native: True
    lr: float = 2e-4  # Adam learning rate (official)
    batch_size: int = 1000  # showers per step (official --cls_batch_size)
    epochs: int = 50  # official
    dtype: str | None = None  # None: float64 for cls-cnn (the official evaluation's default dtype), float32 for
                              # cls-sparse; "float32" / "float64" for either
    backend: str | None = None  # sparse backend of cls-sparse (None: $CALOPC_SPARSE_BACKEND)
    sparse_arch: str = "native"  # cls-sparse network: "native" (submanifold residual stages, strided 2×2×2
                                 # downsampling) or "resnet" (the cls-cnn network run on the occupied cells)
    sparse_pool: str = "grid"  # sparse_arch="resnet" global pool: "grid" (sum / cells of the last grid, the dense
                               # average over zero-filled cells) or "occupied" (mean over the occupied cells)
    bn_momentum: float | None = 0.1  # batch-norm running-stat momentum (official 0.1; None: cumulative average,
                                     # for short runs: the tiny input scale, voxels / E_inc, needs ~10^2 steps at 0.1)

    def resolved(self, kind: str) -> CNNConfig:
        """This configuration with the per-network defaults (widths, blocks, dtype) of ``kind`` filled in."""
        from dataclasses import replace

        native = kind == "sparse" and self.sparse_arch == "native"
        if self.sparse_arch not in ("native", "resnet"):
            msg = f"sparse_arch must be 'native' or 'resnet', got {self.sparse_arch!r}"
            raise ValueError(msg)
        widths = self.widths or ((16, 32, 48, 64) if native else (32, 64, 64, 128))
        blocks = self.blocks or (((0,) + (1,) * (len(widths) - 1)) if native else (2,) * len(widths))
        if len(blocks) != len(widths) or not widths or min(widths) < 1 or min(blocks) < 0:
            msg = f"widths and blocks need one positive entry per stage, got {widths} and {blocks}"
            raise ValueError(msg)
        return replace(self, widths=tuple(widths), blocks=tuple(blocks),
                       dtype=self.dtype or ("float32" if kind == "sparse" else "float64"))

    def classifier(self, dataset: str, n: int) -> ClassifierConfig:
        return ClassifierConfig(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs,
                                dtype=self.dtype or "float64", counts=official_split(dataset, n))


def _torch():
    from .._extras import torch

    return torch()


def _stages(block, cfg: CNNConfig) -> tuple[list, int]:
    """The ResNet stages: ``cfg.blocks[i]`` blocks of width ``cfg.widths[i]``, the first of each stage after
    the first with stride 2; returns the blocks and the width they end with."""
    layers, cin = [], cfg.widths[0]
    for i, (cout, n) in enumerate(zip(cfg.widths, cfg.blocks)):
        for j in range(n):
            layers.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    return layers, cin


def _build_dense(shape: tuple[int, int, int], cfg: CNNConfig):
    torch = _torch()
    nn = torch.nn
    F = nn.functional

    class Conv(nn.Module):
        """``nn.Conv3d`` without bias, α padded circularly when ``periodic_alpha``."""

        def __init__(self, cin: int, cout: int, k: int, s: int) -> None:
            super().__init__()
            self.p = k // 2
            self.wrap = cfg.periodic_alpha
            self.conv = nn.Conv3d(cin, cout, k, s, padding=(self.p, 0, self.p) if self.wrap else self.p, bias=False)

        def forward(self, x):
            if self.wrap and self.p:
                a = x.shape[3]
                x = x.index_select(3, torch.arange(-self.p, a + self.p, device=x.device) % a)
            return self.conv(x)

    class MaxPool(nn.Module):
        def forward(self, x):
            if cfg.periodic_alpha:
                a = x.shape[3]
                x = x.index_select(3, torch.arange(-1, a + 1, device=x.device) % a)
                return F.max_pool3d(x, 3, 2, padding=(1, 0, 1))
            return F.max_pool3d(x, 3, 2, padding=1)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, s: int) -> None:
            super().__init__()
            self.c1, self.b1 = Conv(cin, cout, 3, s), nn.BatchNorm3d(cout)
            self.c2, self.b2 = Conv(cout, cout, 3, 1), nn.BatchNorm3d(cout)
            self.down = (nn.Sequential(Conv(cin, cout, 1, s), nn.BatchNorm3d(cout))
                         if s != 1 or cin != cout else None)

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            out = self.b2(self.c2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    class DenseResNetImpl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = cfg.widths
            self.shape = shape
            self.conv1, self.bn1 = Conv(1, w[0], cfg.conv1_kernel, 2), nn.BatchNorm3d(w[0])
            self.pool = MaxPool() if cfg.max_pool else nn.Identity()
            layers, cin = _stages(Block, cfg)
            self.layers = nn.Sequential(*layers)
            self.e_norm = nn.BatchNorm1d(1)
            self.fc = nn.Linear(cin + 1, 1)
            _init(self, nn, cfg.bn_momentum)

        def forward(self, x, log_e):
            """x: ``(B, 1, L, A, R)`` voxels / E_inc; log_e: ``(B, 1)`` log10 E_inc → ``(B, 1)`` logits."""
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layers(x).mean((2, 3, 4))
            return self.fc(torch.cat([x, self.e_norm(log_e)], 1))

    return DenseResNetImpl()


def _build_sparse(cfg: CNNConfig):
    torch = _torch()
    from ..sparse import nn as snn

    nn = torch.nn
    kw = {"wrap_alpha": cfg.periodic_alpha, "backend": cfg.backend}

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, s: int) -> None:
            super().__init__()
            self.c1, self.b1 = snn.SparseConv3d(cin, cout, 3, s, **kw), snn.SparseBatchNorm(cout)
            self.c2, self.b2 = snn.SubMConv3d(cout, cout, 3, **kw), snn.SparseBatchNorm(cout)
            self.down = (nn.ModuleList([snn.SparseConv3d(cin, cout, 1, s, **kw), snn.SparseBatchNorm(cout)])
                         if s != 1 or cin != cout else None)

        def forward(self, x):
            out = self.b1(self.c1(x))
            out = self.b2(self.c2(out.replace(torch.relu(out.feats))))
            res = x if self.down is None else self.down[1](self.down[0](x))
            if res.cid != out.cid:  # both branches use the stride rule: same cells
                msg = "residual branches have different coordinates"
                raise RuntimeError(msg)
            return out.replace(torch.relu(out.feats + res.feats))

    class SparseResNetImpl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = cfg.widths
            self.conv1 = snn.SparseConv3d(1, w[0], cfg.conv1_kernel, 2, **kw)
            self.bn1 = snn.SparseBatchNorm(w[0])
            self.pool = snn.SparseMaxPool3d(3, 2, 1, **kw) if cfg.max_pool else None
            layers, cin = _stages(Block, cfg)
            self.layers = nn.Sequential(*layers)
            if cfg.sparse_pool not in ("grid", "occupied"):
                msg = f"sparse_pool must be 'grid' or 'occupied', got {cfg.sparse_pool!r}"
                raise ValueError(msg)
            self.gpool = snn.SparseGlobalPool("sum" if cfg.sparse_pool == "grid" else "mean")
            self.e_norm = nn.BatchNorm1d(1)
            self.fc = nn.Linear(cin + 1, 1)
            _init(self, nn, cfg.bn_momentum)

        def forward(self, x, log_e):
            """x: :class:`~calopc.sparse.SparseShowers`, feature E / E_inc; log_e: ``(B, 1)`` → ``(B, 1)`` logits."""
            x = self.bn1(self.conv1(x))
            x = x.replace(torch.relu(x.feats))
            if self.pool is not None:
                x = self.pool(x)
            x = self.layers(x)
            g = self.gpool(x)
            if cfg.sparse_pool == "grid":
                g = g / float(x.shape[0] * x.shape[1] * x.shape[2])
            return self.fc(torch.cat([g, self.e_norm(log_e)], 1))

    return SparseResNetImpl()


def _build_sparse_native(cfg: CNNConfig):
    """cls-sparse: a sparse-native residual network (see the module docstring)."""
    torch = _torch()
    from ..sparse import nn as snn

    nn = torch.nn
    kw = {"wrap_alpha": True, "backend": cfg.backend}

    class Block(nn.Module):
        """Two submanifold 3×3×3 convolutions with batch norm and an identity shortcut."""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1, self.b1 = snn.SubMConv3d(c, c, 3, **kw), snn.SparseBatchNorm(c)
            self.c2, self.b2 = snn.SubMConv3d(c, c, 3, **kw), snn.SparseBatchNorm(c)

        def forward(self, x):
            out = self.b1(self.c1(x))
            out = self.b2(self.c2(out.replace(torch.relu(out.feats))))
            return out.replace(torch.relu(out.feats + x.feats))

    class Down(nn.Module):
        """2×2×2 / 2 patch convolution onto the coarse cells ``unique(cell // 2)`` (grid ``ceil(d / 2)``: no
        edge cell is lost; each cell feeds exactly one coarse cell) with batch norm and ReLU."""

        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = snn.SparseConv3d(cin, cout, 2, 2, 0, output="patch", **kw)
            self.bn = snn.SparseBatchNorm(cout)

        def forward(self, x):
            x = self.bn(self.conv(x))
            return x.replace(torch.relu(x.feats))

    class SparseNativeImpl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w, b = cfg.widths, cfg.blocks
            self.stem = Down(2, w[0])  # patch stem: the full-resolution cells are read once, by a strided conv
            stages = []
            for i, (c, n) in enumerate(zip(w, b)):
                mods = ([Down(w[i - 1], c)] if i else []) + [Block(c) for _ in range(n)]
                stages.append(nn.Sequential(*mods))
            self.stages = nn.Sequential(*stages)
            self.mean, self.max = snn.SparseGlobalPool("mean"), snn.SparseGlobalPool("max")
            self.sum = snn.SparseGlobalPool("sum")
            self.e_norm = nn.BatchNorm1d(3)
            self.fc = nn.Linear(3 * w[-1] + 3, 1)
            _init(self, nn, cfg.bn_momentum)

        def forward(self, x, log_e):
            """x: :class:`~calopc.sparse.SparseShowers`, feature E / E_inc; log_e: ``(B, 1)`` → ``(B, 1)`` logits.

            Head: mean, max and grid-average (sum / cells of the last grid, as the dense network's average)
            pooling of the last stage, with log10 E_inc, log10 of the occupied cells and log10(E_dep / E_inc).
            """
            f = x.feats[:, :1]
            u = torch.log10(f.clamp_min(1e-12))
            x = x.replace(torch.cat([(u + 4.0) / 2.0, f * 100.0], 1))  # O(1) inputs: log and linear cell energy
            n_cells = torch.log10(x.counts.to(f.dtype).clamp_min(1.0))[:, None]
            e_sum = f.new_zeros(x.batch_size).index_add(0, x.coords[:, 0], f[:, 0])
            log_sum = torch.log10(e_sum.clamp_min(1e-12))[:, None]  # log(E_dep / E_inc)
            x = self.stages(self.stem(x))
            grid = float(x.shape[0] * x.shape[1] * x.shape[2])
            scalars = self.e_norm(torch.cat([log_e, n_cells, log_sum], 1))
            g = torch.cat([self.mean(x), self.max(x), self.sum(x) / grid, scalars], 1)
            return self.fc(g)

    return SparseNativeImpl()


def _init(net, nn, momentum: float | None) -> None:
    """Kaiming-normal (fan-out) convolutions, unit batch norms (as the official network)."""
    from ..sparse.nn import SparseConv3d

    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, SparseConv3d):
            k, _, co = m.weight.shape
            std = (2.0 / (k * co)) ** 0.5
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.BatchNorm3d | nn.BatchNorm1d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
            m.momentum = momentum


def DenseResNet(geometry: Geometry, config: CNNConfig | None = None):
    """The dense ``cls-resnet`` network for a regular geometry."""
    from ..sparse import require_regular

    return _build_dense(require_regular(geometry, "the CNN classifier"), (config or CNNConfig()).resolved("cnn"))


def SparseResNet(geometry: Geometry, config: CNNConfig | None = None):
    """The cls-sparse network: sparse-native (default) or the cls-cnn ResNet on the occupied cells
    (``sparse_arch="resnet"``)."""
    from ..sparse import require_regular

    require_regular(geometry, "the sparse CNN classifier")
    cfg = (config or CNNConfig()).resolved("sparse")
    return _build_sparse_native(cfg) if cfg.sparse_arch == "native" else _build_sparse(cfg)


@dataclass
class CellRows:
    """Showers as compressed rows (CSR): the occupied cells only, what cls-sparse needs at any granularity.

    Args:
        offsets: ``(N + 1,)`` int64 start of each shower's cells.
        cells: ``(P,)`` int32 flat voxel index (official order).
        values: ``(P,)`` float32 cell energies (MeV).
    """

    offsets: np.ndarray
    cells: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_dense(cls, showers: np.ndarray, rows: int = 256) -> CellRows:
        """From ``(N, n_voxels)`` showers, ``rows`` showers at a time (no copy of the whole block)."""
        cells, vals, counts = [], [], [np.zeros(1, np.int64)]
        for i in range(0, len(showers), rows):
            b = np.asarray(showers[i:i + rows])
            nz = np.flatnonzero(b.reshape(-1))
            row, cell = np.divmod(nz, b.shape[1])
            cells.append(cell.astype(np.int32))
            vals.append(b.reshape(-1)[nz].astype(np.float32))
            counts.append(np.bincount(row, minlength=len(b)))
        return cls(np.cumsum(np.concatenate(counts)).astype(np.int64),
                   np.concatenate(cells) if cells else np.zeros(0, np.int32),
                   np.concatenate(vals) if vals else np.zeros(0, np.float32))

    @classmethod
    def concatenate(cls, parts: list[CellRows]) -> CellRows:
        offs = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(np.concatenate(offs), np.concatenate([p.cells for p in parts] or [np.zeros(0, np.int32)]),
                   np.concatenate([p.values for p in parts] or [np.zeros(0, np.float32)]))

    def head(self, n: int) -> CellRows:
        """The first ``n`` showers."""
        end = int(self.offsets[n])
        return CellRows(self.offsets[:n + 1], self.cells[:end], self.values[:end])

    def dense(self, idx: np.ndarray, n_voxels: int) -> np.ndarray:
        """``(len(idx), n_voxels)`` float32 showers ``idx``."""
        out = np.zeros((len(idx), n_voxels), np.float32)
        for r, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[r, self.cells[a:b]] = self.values[a:b]
        return out


class _Pool:
    """Generated then reference showers as CSR rows (cells, E / E_inc), and log10 E_inc."""

    def __init__(self, gen: np.ndarray | CellRows, gen_inc: np.ndarray, ref: np.ndarray | CellRows,
                 ref_inc: np.ndarray, geometry: Geometry, dense: bool) -> None:
        self.geometry = geometry
        inc = np.concatenate([np.asarray(gen_inc, np.float64).reshape(-1), np.asarray(ref_inc, np.float64).reshape(-1)])
        if not np.all(np.isfinite(inc) & (inc > 0)):
            msg = "the CNN classifier needs finite positive incident energies for every shower"
            raise ValueError(msg)
        self.log_e = np.log10(inc)
        self.inc = inc
        self.dense = dense
        self.n_gen = len(gen)
        if dense:
            self.parts = tuple(p if isinstance(p, CellRows) else np.asarray(p) for p in (gen, ref))
            return
        rows = CellRows.concatenate([p if isinstance(p, CellRows) else CellRows.from_dense(p, 1000)
                                     for p in (gen, ref)])
        self.cells, self.vals, self.offsets = rows.cells, rows.values, rows.offsets

    def __call__(self, idx: np.ndarray, device, dtype):
        torch = _torch()
        log_e = torch.as_tensor(self.log_e[idx], dtype=dtype, device=device)[:, None]
        inc = torch.as_tensor(self.inc[idx], dtype=dtype, device=device)
        if self.dense:
            g = idx < self.n_gen
            nv = self.geometry.n_voxels
            x = np.empty((len(idx), nv), dtype=np.float32)
            for sel, part, ids in ((g, self.parts[0], idx[g]), (~g, self.parts[1], idx[~g] - self.n_gen)):
                x[sel] = part.dense(ids, nv) if isinstance(part, CellRows) else part[ids]
            t = torch.as_tensor(x, device=device).to(dtype) / inc[:, None]
            return t.reshape(len(idx), 1, *self.geometry.shape), log_e
        from ..sparse import SparseShowers

        a, b = self.offsets[idx], self.offsets[idx + 1]
        counts = b - a
        sel = np.repeat(a - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        feats = torch.as_tensor(self.vals[sel], device=device).to(dtype) / torch.repeat_interleave(
            inc, torch.as_tensor(counts, device=device))
        x = SparseShowers.from_cells(torch.as_tensor(self.cells[sel], device=device),
                                     torch.as_tensor(counts, device=device), feats, self.geometry)
        return x, log_e


def cnn_metric(kind: str, gen: np.ndarray, gen_inc: np.ndarray, ref: np.ndarray, ref_inc: np.ndarray,
               geometry: Geometry, *, config: CNNConfig | None = None, seeds: int = 1, seed: int = 0,
               device: str = "auto", progress: bool = False) -> ClassifierResult:
    """Train the dense (``kind="cnn"``) or sparse (``kind="sparse"``) ResNet classifier ``seeds`` times.

    Args:
        gen, ref: ``(N, n_voxels)`` thresholded voxels (MeV) or :class:`CellRows`, equal N.
        gen_inc, ref_inc: ``(N,)`` incident energies (MeV).
        geometry: a regular geometry (datasets 2 and 3).

    Returns:
        A :class:`~calopc.eval.classifier.ClassifierResult` (``kind`` ``"cnn"`` or ``"sparse"``).
    """
    if kind not in ("cnn", "sparse"):
        msg = f"CNN classifier kind must be 'cnn' or 'sparse', got {kind!r}"
        raise ValueError(msg)
    cfg = (config or CNNConfig()).resolved(kind)
    from ..sparse import require_regular

    require_regular(geometry, f"the cls-{kind} classifier")
    check_sample_sizes(len(gen), len(ref), "the CNN classifier")
    for name, a in (("generated", gen), ("reference", ref)):
        if isinstance(a, CellRows):
            if len(a.cells) and (int(a.cells.min()) < 0 or int(a.cells.max()) >= geometry.n_voxels):
                msg = f"{name} showers have cell indices outside [0, {geometry.n_voxels}) of geometry {geometry.name!r}"
                raise ValueError(msg)
            continue
        if np.asarray(a).ndim != 2 or np.asarray(a).shape[1] != geometry.n_voxels:
            msg = (f"{name} showers must have shape (N, {geometry.n_voxels}) for geometry {geometry.name!r}, "
                   f"got {np.asarray(a).shape}")
            raise ValueError(msg)
    pool = _Pool(gen, gen_inc, ref, ref_inc, geometry, dense=kind == "cnn")
    ccfg = cfg.classifier(geometry.name, len(gen))
    aucs, jsds = [], []
    for s in range(seeds):
        _torch().manual_seed(seed + s)
        net = DenseResNet(geometry, cfg) if kind == "cnn" else SparseResNet(geometry, cfg)
        a, j = train_classifier(net, pool, len(gen), len(ref), ccfg, seed=seed + s, device=device, progress=progress,
                                desc=f"cls-{kind}")
        aucs.append(a)
        jsds.append(j)
    def err(v: list[float]) -> float:
        return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")

    n_train = (ccfg.counts[0] if ccfg.counts else int(len(gen) * ccfg.split[0])) * 2
    return ClassifierResult(kind, float(np.mean(aucs)), err(aucs), float(np.mean(jsds)), err(jsds), aucs, jsds,
                            n_train=n_train, epochs=cfg.epochs)


# ------------------------------------------------------------------ memory of the dense paths, checked up front
def dense_activation_bytes(geometry: Geometry, config: CNNConfig | None = None) -> int:
    """Bytes per shower that one cls-cnn training step keeps for the backward pass (input, convolution, batch-norm
    and ReLU outputs of every layer; a lower bound: convolution workspaces come on top)."""
    cfg = (config or CNNConfig()).resolved("cnn")
    item = 8 if cfg.dtype == "float64" else 4
    grid = tuple(int(d) for d in geometry.shape)

    def conv(g: tuple, k: int, s: int) -> tuple:
        return tuple((d + 2 * (k // 2) - k) // s + 1 for d in g)

    total = math.prod(grid)  # the input
    grid = conv(grid, cfg.conv1_kernel, 2)
    total += 3 * cfg.widths[0] * math.prod(grid)  # conv1, bn1, relu
    if cfg.max_pool:
        grid = conv(grid, 3, 2)
        total += cfg.widths[0] * math.prod(grid)
    cin = cfg.widths[0]
    for i, (c, n) in enumerate(zip(cfg.widths, cfg.blocks)):
        for j in range(n):
            if i > 0 and j == 0:
                grid = conv(grid, 3, 2)
            total += 6 * c * math.prod(grid) + (2 * c * math.prod(grid) if (cin != c or (i > 0 and j == 0)) else 0)
            cin = c
    return int(total * item)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 << 30


def check_dense_memory(metrics: tuple[str, ...] | list[str], geometry: Geometry, n_showers: int, *,
                       batch_size: int = 1000, hidden: int = 2048, n_layers: int = 2,
                       cnn_options: dict | None = None, budget: int | None = None) -> None:
    """Refuse, before any data is read, the dense metrics that cannot fit in memory on ``geometry``.

    ``cls-low`` / ``cls-low-normed`` (a DNN on every cell: an ``n_voxels × hidden`` float64 input layer with its
    gradient and Adam moments, plus both samples as dense float64 inputs) and ``cls-cnn`` (dense activations
    per shower times the batch, plus both samples' dense voxels) are estimated; if an estimate exceeds
    ``budget`` (default: the machine's physical memory) a :class:`MemoryError` says so in one line with the
    estimate and the sparse alternative (``cls-sparse``, occupied cells only).
    """
    budget = _physical_memory() if budget is None else int(budget)
    gb = 1 << 30
    nv = geometry.n_voxels
    where = f"geometry {geometry.name!r} ({nv:,} cells)"
    for m in ("cls-low", "cls-low-normed"):
        if m not in metrics:
            continue
        params = nv * hidden + (n_layers - 1) * hidden * hidden + hidden
        need = params * 8 * 4 + 2 * n_showers * nv * 4 + 2 * min(batch_size, 2 * n_showers) * nv * 8
        if need > budget:
            msg = (f"{m} on {where} would need about {need / gb:.1f} GB (a {nv:,} x {hidden} float64 input layer with "
                   f"its gradient and Adam moments: {params * 32 / gb:.1f} GB; two samples of {n_showers:,} dense "
                   f"showers: {2 * n_showers * nv * 4 / gb:.1f} GB), more than the {budget / gb:.1f} GB available; "
                   "use cls-sparse (occupied cells only) or cls-high")
            raise MemoryError(msg)
    if "cls-cnn" in metrics:
        cfg = CNNConfig(**{"batch_size": batch_size, **(cnn_options or {})}).resolved("cnn")
        per = dense_activation_bytes(geometry, cfg)
        need = per * cfg.batch_size + 2 * n_showers * nv * 4
        if need > budget:
            msg = (f"cls-cnn on {where} would need about {need / gb:.1f} GB ({per / 2**20:.0f} MB of dense "
                   f"activations per shower x batch {cfg.batch_size}, plus {2 * n_showers * nv * 4 / gb:.1f} GB of "
                   f"dense voxels), more than the {budget / gb:.1f} GB available; use cls-sparse (occupied cells "
                   "only), or a smaller --cls-batch-size")
            raise MemoryError(msg)
