r"""Sparse-convolution backends: calopc's pure-torch one and MinkowskiEngine.

Both compute exactly the same thing (see :mod:`calopc.sparse.kernel` for the convention):
the output coordinates always come from calopc's own code, so a network gives the same
sparsity pattern on either backend; only the convolution and pooling arithmetic (and
the kernel-map search) differ.

Choice: ``CALOPC_SPARSE_BACKEND=torch|minkowski|auto`` (or the ``backend=`` argument of
a layer). ``auto`` (the default) is ``torch``: it is exact, deterministic, runs on
every device torch supports (MinkowskiEngine builds here are CPU-only), shares one
kernel map per batch between all layers of the same resolution, keeps only
``O(P · C)`` activations for the backward pass, and fails with Python errors where ME 0.5.4
aborts or segfaults the process (edge cases below). Set ``minkowski`` to use
MinkowskiEngine; asking for it without it installed is an error that says how to
build it (``make minkowski``).

α wrap-around on MinkowskiEngine: ME has no periodic axes, so the input is padded with
*ghost* copies of the cells near the α seam (a cell at α = a also sits at a ± A), the
output coordinates are inserted explicitly (calopc's own), and ME's convolution
/ pooling runs between the two coordinate maps; ghosts contribute only as inputs. For
transposed convolutions the ghost outputs are folded back onto their cells. The
coordinate manager (and with it ME's kernel map) is cached per batch and per
(input, output, kernel, stride) in the batch's ``ctx``. ME supports padding ``k // 2``
for odd kernels and 0 for even ones (its kernel regions); other paddings are an error.
Three ME 0.5.4 behaviours are worked around: empty coordinate maps crash the process
(empty inputs/outputs never reach ME), pooling with kernel = stride aborts when an input
cell's quantised cell is not an output (such inputs lie in no window and are dropped
first), and max pooling writes ``-FLT_MAX`` into windows without an input (set to 0, as
the torch backend and the dense pooling over zero-filled cells give).
"""

from __future__ import annotations

__all__ = ["BACKENDS", "ENV", "Backend", "get_backend", "minkowski_available", "resolve_backend"]

import functools
import importlib.util
import os
import warnings
from typing import Any

import torch

from . import functional as Fs
from .kernel import Triple, kernel_map, output_coords
from .tensor import SparseShowers

#: environment variable that selects the backend
ENV = "CALOPC_SPARSE_BACKEND"
BACKENDS = ("torch", "minkowski")


def _import_minkowski():
    with warnings.catch_warnings():  # "compiled with CPU_ONLY flag" on every import of a CPU build
        warnings.simplefilter("ignore")
        import MinkowskiEngine as ME
        import MinkowskiEngineBackend._C as C
    return ME, C


@functools.cache
def minkowski_available() -> bool:
    """True if MinkowskiEngine can be imported."""
    if importlib.util.find_spec("MinkowskiEngine") is None:
        return False
    try:
        _import_minkowski()
    except Exception:
        return False
    return True


def resolve_backend(name: str | None = None) -> str:
    """The backend to use: ``name``, else ``$CALOPC_SPARSE_BACKEND``, else ``auto`` (= ``torch``).

    Raises:
        ValueError: unknown name, or ``minkowski`` requested but MinkowskiEngine is not importable.
    """
    src = "backend"
    if name is None:
        name = os.environ.get(ENV) or "auto"
        src = ENV
    name = name.strip().lower()
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        msg = f"{src}={name!r} is not a sparse backend; choose one of auto, {', '.join(BACKENDS)}"
        raise ValueError(msg)
    if name == "minkowski" and not minkowski_available():
        msg = (f"{src}=minkowski but MinkowskiEngine is not installed (or does not import); build it with "
               f"`make minkowski` (MinkowskiEngine 0.5.4 from source, CPU) or set {ENV}=torch")
        raise ValueError(msg)
    return name


class Backend:
    """The operations a sparse layer dispatches to."""

    name = "base"

    def conv(self, x: SparseShowers, weight: torch.Tensor, kernel: Triple, stride: Triple, padding: Triple,
             wrap: bool, policy: str) -> SparseShowers:
        raise NotImplementedError

    def conv_transpose(self, x: SparseShowers, weight: torch.Tensor, kernel: Triple, stride: Triple,
                       padding: Triple, wrap: bool, target: SparseShowers) -> SparseShowers:
        raise NotImplementedError

    def pool(self, x: SparseShowers, mode: str, kernel: Triple, stride: Triple, padding: Triple, wrap: bool,
             policy: str, divisor: str) -> SparseShowers:
        raise NotImplementedError


class TorchBackend(Backend):
    """calopc's own gather–GEMM–scatter (:mod:`calopc.sparse.functional`)."""

    name = "torch"

    def conv(self, x, weight, kernel, stride, padding, wrap, policy):
        out = output_coords(x, kernel, stride, padding, wrap, policy)
        km = kernel_map(x, out, kernel, stride, padding, wrap)
        return out.replace(Fs.conv(x.feats, weight, km))

    def conv_transpose(self, x, weight, kernel, stride, padding, wrap, target):
        km = kernel_map(target, x, kernel, stride, padding, wrap)  # the forward map fine → coarse
        return target.replace(Fs.conv(x.feats, weight, km, transpose=True))

    def pool(self, x, mode, kernel, stride, padding, wrap, policy, divisor):
        out = output_coords(x, kernel, stride, padding, wrap, policy)
        km = kernel_map(x, out, kernel, stride, padding, wrap)
        return out.replace(Fs.pool(x.feats, km, mode, divisor=divisor))


class MinkowskiBackend(Backend):
    """MinkowskiEngine's convolution and pooling between calopc's coordinates (ghost cells for the α seam)."""

    name = "minkowski"

    def __init__(self) -> None:
        ME, C = _import_minkowski()
        self.ME = ME
        self.conv_mode = C.ConvolutionMode.DEFAULT
        self.pooling = {"max": C.PoolingMode.LOCAL_MAX_POOLING, "sum": C.PoolingMode.LOCAL_SUM_POOLING,
                        "avg": C.PoolingMode.LOCAL_AVG_POOLING}

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _check_padding(kernel: Triple, padding: Triple) -> None:
        for k, p in zip(kernel, padding):
            want = k // 2 if k % 2 else 0
            if p != want:
                msg = (f"the minkowski backend supports padding k // 2 for odd and 0 for even kernels (its kernel "
                       f"regions); got kernel {kernel} with padding {padding}: use the torch backend")
                raise ValueError(msg)

    @staticmethod
    def _ghosts(x: SparseShowers, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates of ``x`` plus copies shifted by multiples of A into ``[lo, hi]`` along α; source rows."""
        A = x.shape[1]
        coords, src = [x.coords], [torch.arange(len(x), device=x.coords.device)]
        m = 1
        while -m * A + A - 1 >= lo or m * A <= hi:
            for shift in (-m * A, m * A):
                a = x.coords[:, 2] + shift
                keep = torch.nonzero((a >= lo) & (a <= hi)).squeeze(1)
                if keep.numel():
                    c = x.coords[keep].clone()
                    c[:, 2] += shift
                    coords.append(c)
                    src.append(keep)
            m += 1
        return torch.cat(coords), torch.cat(src)

    def _maps(self, kind: str, fine: SparseShowers, coarse: SparseShowers, kernel: Triple, stride: Triple,
              padding: Triple, wrap: bool, ghosts_on_fine_output: bool = False) -> dict[str, Any]:
        """Coordinate manager with the fine (stride 1, α ghosts) and coarse (stride s) maps, cached in ``ctx``."""
        key = ("me", kind, fine.cid, coarse.cid, kernel, stride, padding, wrap)
        hit = fine.ctx.get(key)
        if hit is not None:
            return hit
        ME = self.ME
        if fine.device.type != "cpu":
            msg = f"the minkowski backend here is a CPU build; tensors are on {fine.device}: use the torch backend"
            raise ValueError(msg)
        A_out = coarse.shape[1]
        if wrap:
            lo = -padding[1]
            hi = (A_out - 1) * stride[1] - padding[1] + kernel[1] - 1
            fc, fsrc = self._ghosts(fine, lo, hi)
        else:
            fc, fsrc = fine.coords, torch.arange(len(fine))
        if kind == "pool" and kernel == stride:
            # ME pools with kernel == stride through a direct "stride map" that aborts the process when an
            # input's quantised cell is not an output; such inputs lie in no output window: drop them
            inside = (torch.div(fc[:, 1:], torch.tensor(stride), rounding_mode="floor")
                      < torch.tensor(coarse.shape)).all(1)
            fc, fsrc = fc[inside], fsrc[inside]
        mgr = ME.CoordinateManager(D=3, coordinate_map_type=ME.CoordinateMapType.CPU)
        fkey, (fu, _) = mgr.insert_and_map(fc.int().contiguous(), [1, 1, 1], "fine")
        cc = coarse.coords.clone()
        cc[:, 1:] *= torch.tensor(stride)
        ckey, (cu, _) = mgr.insert_and_map(cc.int().contiguous(), list(stride), "coarse")
        kg = ME.KernelGenerator(kernel_size=list(kernel), stride=list(stride), dilation=1, dimension=3)
        res = {"mgr": mgr, "fkey": fkey, "ckey": ckey, "kg": kg, "fine_rows": fsrc[fu.long()], "coarse_rows": cu.long()}
        fine.ctx[key] = res
        return res

    @staticmethod
    def _me_weight(weight: torch.Tensor, kernel: Triple) -> torch.Tensor:
        kl, ka, kr = kernel
        _, ci, co = weight.shape
        # ME numbers offsets with the first axis fastest
        return weight.reshape(kl, ka, kr, ci, co).permute(2, 1, 0, 3, 4).reshape(-1, ci, co)

    # ----------------------------------------------------------- operations
    def conv(self, x, weight, kernel, stride, padding, wrap, policy):
        self._check_padding(kernel, padding)
        out = output_coords(x, kernel, stride, padding, wrap, policy)
        if len(x) == 0 or len(out) == 0:  # MinkowskiEngine crashes on empty coordinate maps
            return out.replace(x.feats.new_zeros(len(out), weight.shape[2]))
        # a patch convolution reads nothing past the end of the grid, also along α: no ghost cells
        m = self._maps("conv", x, out, kernel, stride, padding, wrap and policy != "patch")
        ME = self.ME
        f = ME.MinkowskiConvolutionFunction.apply(
            x.feats.index_select(0, m["fine_rows"]).contiguous(), self._me_weight(weight, kernel), m["kg"],
            self.conv_mode, m["fkey"], m["ckey"], m["mgr"])
        res = f.new_empty(f.shape).index_copy(0, m["coarse_rows"], f)
        return out.replace(res)

    def conv_transpose(self, x, weight, kernel, stride, padding, wrap, target):
        self._check_padding(kernel, padding)
        if len(x) == 0 or len(target) == 0:
            return target.replace(x.feats.new_zeros(len(target), weight.shape[2]))
        m = self._maps("convT", target, x, kernel, stride, padding, wrap)
        ME = self.ME
        inp = x.feats.index_select(0, m["coarse_rows"]).contiguous()
        f = ME.MinkowskiConvolutionTransposeFunction.apply(
            inp, self._me_weight(weight, kernel), m["kg"], self.conv_mode, m["ckey"], m["fkey"], m["mgr"])
        # fold the ghost outputs onto their cells
        res = f.new_zeros(len(target), f.shape[1]).index_add(0, m["fine_rows"], f)
        return target.replace(res)

    def pool(self, x, mode, kernel, stride, padding, wrap, policy, divisor):
        self._check_padding(kernel, padding)
        out = output_coords(x, kernel, stride, padding, wrap, policy)
        if len(x) == 0 or len(out) == 0:
            return out.replace(x.feats.new_zeros(len(out), x.n_channels))
        m = self._maps("pool", x, out, kernel, stride, padding, wrap)
        ME = self.ME
        if mode not in ("max", "avg"):
            msg = f"pooling mode must be 'max' or 'avg', got {mode!r}"
            raise ValueError(msg)
        pmode = self.pooling["max" if mode == "max" else "avg" if divisor == "active" else "sum"]
        f = ME.MinkowskiLocalPoolingFunction.apply(
            x.feats.index_select(0, m["fine_rows"]).contiguous(), pmode, m["kg"], m["fkey"], m["ckey"], m["mgr"])
        res = f.new_empty(f.shape).index_copy(0, m["coarse_rows"], f)
        if mode == "max":  # ME writes -FLT_MAX into windows without an input; the torch backend (and dense) give 0
            res = torch.where(res <= -torch.finfo(res.dtype).max, torch.zeros_like(res), res)
        if mode == "avg" and divisor == "kernel":
            res = res / (kernel[0] * kernel[1] * kernel[2])
        elif mode == "avg" and divisor != "active":
            msg = f"divisor must be 'kernel' or 'active', got {divisor!r}"
            raise ValueError(msg)
        return out.replace(res)


@functools.cache
def _instance(name: str) -> Backend:
    return MinkowskiBackend() if name == "minkowski" else TorchBackend()


def get_backend(name: str | None = None) -> Backend:
    """The backend object for ``name`` (see :func:`resolve_backend`)."""
    return _instance(resolve_backend(name))
