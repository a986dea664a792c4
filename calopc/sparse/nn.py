r"""Sparse layers on :class:`~calopc.sparse.SparseShowers`: convolution (submanifold, strided, transposed),
pooling, batch norm, activation and global pooling.

Every layer equals its dense counterpart (``conv3d`` etc. with circular α padding when
``wrap_alpha``, zero padding in layer and r) on the occupied output cells; see
:mod:`calopc.sparse.kernel` for the output-coordinate rules. The backend (pure torch or
MinkowskiEngine) is chosen per layer at construction (``backend=`` or
``$CALOPC_SPARSE_BACKEND``); weights have the same layout on both.
"""

from __future__ import annotations

__all__ = [
    "SparseAvgPool3d",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseConvTranspose3d",
    "SparseGlobalPool",
    "SparseMaxPool3d",
    "SparseReLU",
    "SubMConv3d",
]

import math

import torch
from torch import nn

from . import functional as Fs
from .backends import get_backend, resolve_backend
from .kernel import _triple, transposed_coords
from .tensor import SparseShowers


class _Base(nn.Module):
    def __init__(self, kernel_size, stride, padding, wrap_alpha: bool, backend: str | None) -> None:
        super().__init__()
        self.kernel = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        if any(s < 1 for s in self.stride) or any(k < 1 for k in self.kernel):
            msg = f"kernel_size and stride must be >= 1, got {self.kernel} and {self.stride}"
            raise ValueError(msg)
        self.padding = tuple(k // 2 for k in self.kernel) if padding is None else _triple(padding, "padding")
        self.wrap_alpha = bool(wrap_alpha)
        self.backend = resolve_backend(backend)

    @property
    def _impl(self):
        return get_backend(self.backend)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, wrap_alpha={self.wrap_alpha}, "
                f"backend={self.backend!r}")


class _Conv(_Base):
    """What the convolutions share: a kernel ``(K, C_in, C_out)`` (Kaiming-uniform, as ``nn.Conv3d``) and a bias."""

    def _init_kernel(self, in_channels: int, out_channels: int, bias: bool) -> None:
        k = math.prod(self.kernel)
        self.weight = nn.Parameter(torch.empty(k, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(k * in_channels, out_channels).T, a=math.sqrt(5))

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])


class SparseConv3d(_Conv):
    """Sparse 3-D convolution over ``(layer, α, r)``.

    Args:
        in_channels, out_channels: feature sizes.
        kernel_size, stride, padding: as ``nn.Conv3d`` (padding defaults to ``k // 2``, 0 for ``"patch"``).
        bias: add a learnable bias.
        output: output cells: ``"same"`` (submanifold; stride 1 only; the default for stride 1),
            ``"stride"`` (``unique(input // stride)``, the default for stride > 1), ``"full"``
            (every cell the dense result is non-zero on) or ``"patch"`` (kernel = stride, padding 0:
            ``unique(input // stride)`` on the grid ``ceil(D / stride)``, every input cell feeds one output).
        wrap_alpha: α is periodic (circular padding); otherwise zero padding.
        backend: ``"torch"``, ``"minkowski"`` or ``"auto"``; default ``$CALOPC_SPARSE_BACKEND``.

    Shapes:
        input feats ``(P, C_in)`` → output feats ``(P', C_out)``; weight ``(K, C_in, C_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] | None = None, *,
                 bias: bool = False, output: str | None = None, wrap_alpha: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(kernel_size, stride, padding, wrap_alpha, backend)
        if output is None:
            output = "same" if self.stride == (1, 1, 1) else "stride"
        if output not in ("same", "stride", "full", "patch"):
            msg = f"output must be 'same', 'stride', 'full' or 'patch', got {output!r}"
            raise ValueError(msg)
        if output == "same" and (self.stride != (1, 1, 1) or self.padding != tuple(k // 2 for k in self.kernel)
                                 or any(k % 2 == 0 for k in self.kernel)):
            msg = (f"output='same' (submanifold) needs stride 1, an odd kernel and padding k // 2; got kernel "
                   f"{self.kernel}, stride {self.stride}, padding {self.padding}")
            raise ValueError(msg)
        if output == "patch" and padding is None:
            self.padding = (0, 0, 0)
        self.output = output
        self._init_kernel(in_channels, out_channels, bias)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[2])

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``conv3d`` weight ``(C_out, C_in, k_l, k_a, k_r)``."""
        return Fs.dense_weight(self.weight, self.kernel)

    def forward(self, x: SparseShowers) -> SparseShowers:
        _check_channels(x, self.in_channels, self)
        y = self._impl.conv(x, self.weight, self.kernel, self.stride, self.padding, self.wrap_alpha, self.output)
        return y if self.bias is None else y.replace(y.feats + self.bias)


class SubMConv3d(SparseConv3d):
    """Submanifold convolution: output on the input cells (stride 1, odd kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3, *,
                 bias: bool = False, wrap_alpha: bool = True, backend: str | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, None, bias=bias, output="same",
                         wrap_alpha=wrap_alpha, backend=backend)


class SparseConvTranspose3d(_Conv):
    """Transposed convolution: the exact adjoint of :class:`SparseConv3d` with the same kernel, stride and padding.

    The output cells are those of ``target`` (e.g. the encoder tensor of that resolution) or, without
    a target, every cell of grid ``output_shape`` that the input reaches.

    Shapes:
        input feats ``(P, C_in)`` → output feats ``(P_target, C_out)``; weight ``(K, C_in, C_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 2,
                 stride: int | tuple[int, int, int] = 2, padding: int | tuple[int, int, int] | None = None, *,
                 bias: bool = False, wrap_alpha: bool = True, backend: str | None = None) -> None:
        kern = _triple(kernel_size, "kernel_size")
        super().__init__(kern, stride, tuple(k // 2 if k % 2 else 0 for k in kern) if padding is None else padding,
                         wrap_alpha, backend)
        self._init_kernel(in_channels, out_channels, bias)

    def forward(self, x: SparseShowers, target: SparseShowers | None = None, *,
                output_shape: tuple[int, int, int] | None = None) -> SparseShowers:
        _check_channels(x, self.in_channels, self)
        if target is None:
            if output_shape is None:
                msg = "SparseConvTranspose3d needs a target tensor or an output_shape (the fine grid)"
                raise ValueError(msg)
            target = transposed_coords(x, self.kernel, self.stride, self.padding, self.wrap_alpha,
                                       tuple(int(s) for s in output_shape))
        elif target.batch_size != x.batch_size:
            msg = f"target has {target.batch_size} showers, input {x.batch_size}"
            raise ValueError(msg)
        y = self._impl.conv_transpose(x, self.weight, self.kernel, self.stride, self.padding, self.wrap_alpha, target)
        return y if self.bias is None else y.replace(y.feats + self.bias)


class _Pool(_Base):
    mode = "max"

    def __init__(self, kernel_size: int | tuple[int, int, int] = 3, stride: int | tuple[int, int, int] | None = None,
                 padding: int | tuple[int, int, int] | None = None, *, output: str = "stride",
                 wrap_alpha: bool = True, backend: str | None = None, divisor: str = "kernel") -> None:
        super().__init__(kernel_size, kernel_size if stride is None else stride, padding, wrap_alpha, backend)
        self.output = output
        self.divisor = divisor

    def forward(self, x: SparseShowers) -> SparseShowers:
        return self._impl.pool(x, self.mode, self.kernel, self.stride, self.padding, self.wrap_alpha, self.output,
                               self.divisor)


class SparseMaxPool3d(_Pool):
    """Max pooling over the occupied cells of each window (equals ``max_pool3d`` for non-negative features)."""

    mode = "max"


class SparseAvgPool3d(_Pool):
    """Average pooling; ``divisor="kernel"`` equals ``avg_pool3d`` (empty cells count as 0), ``"active"``
    averages over the occupied cells."""

    mode = "avg"


class SparseBatchNorm(nn.BatchNorm1d):
    """Batch norm over the occupied cells (statistics over all rows of the batch)."""

    def forward(self, x: SparseShowers) -> SparseShowers:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseReLU(nn.Module):
    def forward(self, x: SparseShowers) -> SparseShowers:
        return x.replace(torch.relu(x.feats))


class SparseGlobalPool(nn.Module):
    """Per-shower pooling of the occupied cells: ``"mean"``, ``"sum"`` or ``"max"`` → ``(batch_size, C)``."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in ("mean", "sum", "max"):
            msg = f"global pooling mode must be 'mean', 'sum' or 'max', got {mode!r}"
            raise ValueError(msg)
        self.mode = mode

    def forward(self, x: SparseShowers) -> torch.Tensor:
        return Fs.global_pool(x.feats, x.coords[:, 0], x.batch_size, self.mode)


def _check_channels(x: SparseShowers, c: int, layer: nn.Module) -> None:
    if x.n_channels != c:
        msg = f"{type(layer).__name__} expects {c} input channels, got features of shape {tuple(x.feats.shape)}"
        raise ValueError(msg)
