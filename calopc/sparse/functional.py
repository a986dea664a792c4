r"""Sparse operations of the pure-torch backend and their dense references.

The convolution is gather–GEMM–scatter: for every kernel offset, the input rows of its
pairs are gathered, multiplied by that offset's ``(C_in, C_out)`` weight and added into
the output rows. A custom autograd function keeps only the features, the weight and the
(cached) kernel map for the backward pass, so activation memory is ``O(P · C)`` instead
of ``O(pairs · C)``.

Weights are ``(K, C_in, C_out)`` with ``K = k_layer · k_alpha · k_r`` offsets in row-major
order; :func:`dense_weight` turns them into a ``conv3d`` weight.

Dense references (:func:`dense_conv3d`, :func:`dense_pool3d`) pad α circularly and layer
and r with zeros; the sparse layers equal them on the occupied output cells.
"""

from __future__ import annotations

__all__ = [
    "conv",
    "dense_conv3d",
    "dense_pool3d",
    "dense_weight",
    "global_pool",
    "pool",
    "sparse_weight",
]

import torch
import torch.nn.functional as F

from .kernel import KernelMap

#: padded pairs × channels of one batched gather–GEMM–scatter chunk (bounds the transient memory)
CHUNK_ELEMS = 1 << 24

#: ``"loop"`` (one gather, GEMM and scatter per kernel offset), ``"batched"`` (offsets padded into chunks:
#: one gather, ``bmm`` and scatter per chunk) or ``"auto"``: batched on CUDA, where the per-offset loop is
#: bound by kernel launches, loop on the CPU, where it is faster (no padding, contiguous GEMMs)
EXECUTION = "auto"


def _batched(feats: torch.Tensor) -> bool:
    return EXECUTION == "batched" or (EXECUTION == "auto" and feats.device.type == "cuda")


class _GatherGemmScatter(torch.autograd.Function):
    """``out[o] += feats[i] @ weight[k]`` over the pairs of a kernel map (``transpose``: roles of i and o swapped).

    Only the features, the weight and the (cached) kernel map are kept for the backward pass. The identity
    offset of a submanifold map is a plain matrix product. See :data:`EXECUTION` for the two schedules.
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transpose: bool) -> torch.Tensor:
        n_dst = kmap.n_in if transpose else kmap.n_out
        c_in, c_out = weight.shape[1], weight.shape[2]
        out = feats.new_zeros(n_dst + 1, c_out)
        if kmap.identity is not None:
            out[:n_dst] += feats @ weight[kmap.identity]
        if _batched(feats):
            # padding sentinels: n_in in ip, n_out in op, i.e. the extra zero row of the source / dropped output row
            xz = torch.cat([feats, feats.new_zeros(1, c_in)])
            for offs, ip, op in kmap.chunks(max(1, CHUNK_ELEMS // max(c_in, c_out))):
                src, dst = (op, ip) if transpose else (ip, op)
                cols = xz.index_select(0, src.reshape(-1)).view(*src.shape, c_in)
                out.index_add_(0, dst.reshape(-1), torch.bmm(cols, weight[offs]).reshape(-1, c_out))
        else:
            for k, i, o in kmap.groups():
                if k == kmap.identity:
                    continue
                src, dst = (o, i) if transpose else (i, o)
                # int32 maps: index_select is fast with them, index_add_ needs int64 for its fast path
                out.index_add_(0, dst.long(), feats.index_select(0, src) @ weight[k])
        ctx.save_for_backward(feats, weight)
        ctx.kmap, ctx.transpose = kmap, transpose
        return out[:n_dst]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap, transpose = ctx.kmap, ctx.transpose
        n_src = kmap.n_out if transpose else kmap.n_in
        c_in, c_out = weight.shape[1], weight.shape[2]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = feats.new_zeros(n_src + 1, c_in) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        if kmap.identity is not None:
            if need_x:
                gx[:n_src] += grad @ weight[kmap.identity].T
            if need_w:
                gw[kmap.identity] = feats.T @ grad
        if _batched(feats):
            xz = torch.cat([feats, feats.new_zeros(1, c_in)])
            gz = torch.cat([grad, grad.new_zeros(1, c_out)])
            for offs, ip, op in kmap.chunks(max(1, CHUNK_ELEMS // max(c_in, c_out))):
                src, dst = (op, ip) if transpose else (ip, op)
                g = gz.index_select(0, dst.reshape(-1)).view(*dst.shape, c_out)
                if need_x:
                    gx.index_add_(0, src.reshape(-1), torch.bmm(g, weight[offs].transpose(1, 2)).reshape(-1, c_in))
                if need_w:
                    cols = xz.index_select(0, src.reshape(-1)).view(*src.shape, c_in)
                    gw[offs] = torch.bmm(cols.transpose(1, 2), g)
        else:
            for k, i, o in kmap.groups():
                if k == kmap.identity:
                    continue
                src, dst = (o, i) if transpose else (i, o)
                g = grad.index_select(0, dst)
                if need_x:
                    gx.index_add_(0, src.long(), g @ weight[k].T)
                if need_w:
                    gw[k] = feats.index_select(0, src).T @ g
        return (gx[:n_src] if need_x else None), gw, None, None


def conv(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, *, transpose: bool = False,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse convolution over a kernel map.

    Shapes:
        feats: ``(P_in, C_in)``; weight: ``(K, C_in, C_out)``; returns ``(P_out, C_out)``
        (``P_out = kmap.n_out``, or ``kmap.n_in`` when ``transpose``).
    """
    if weight.shape[0] != len(kmap.splits):
        msg = f"weight has {weight.shape[0]} kernel offsets but the kernel map has {len(kmap.splits)}"
        raise ValueError(msg)
    out = _GatherGemmScatter.apply(feats, weight, kmap, transpose)
    return out if bias is None else out + bias


def pool(feats: torch.Tensor, kmap: KernelMap, mode: str, *, divisor: str = "kernel") -> torch.Tensor:
    """Max or average pooling over a kernel map.

    ``mode="avg"`` with ``divisor="kernel"`` divides by the kernel volume (dense ``avg_pool3d`` with
    ``count_include_pad=True``, empty cells counting as 0); ``divisor="active"`` by the number of
    occupied input cells (MinkowskiEngine's average pooling). ``mode="max"`` takes the maximum over the
    occupied cells only (equal to the dense ``max_pool3d`` for non-negative features).

    Shapes:
        feats: ``(P_in, C)``; returns ``(P_out, C)``.
    """
    c = feats.shape[1]
    if mode == "max":
        src = feats.index_select(0, kmap.in_idx)
        idx = kmap.out_idx.long()[:, None].expand(-1, c)
        out = feats.new_zeros(kmap.n_out, c)
        return out.scatter_reduce(0, idx, src, "amax", include_self=False)
    if mode == "avg":
        out = feats.new_zeros(kmap.n_out, c).index_add(0, kmap.out_idx.long(), feats.index_select(0, kmap.in_idx))
        if divisor == "kernel":
            return out / len(kmap.splits)
        if divisor == "active":
            n = torch.bincount(kmap.out_idx, minlength=kmap.n_out).clamp_(min=1)
            return out / n[:, None].to(out.dtype)
        msg = f"divisor must be 'kernel' or 'active', got {divisor!r}"
        raise ValueError(msg)
    msg = f"pooling mode must be 'max' or 'avg', got {mode!r}"
    raise ValueError(msg)


def global_pool(feats: torch.Tensor, shower: torch.Tensor, batch_size: int, mode: str = "mean") -> torch.Tensor:
    """Pool the cells of each shower: ``"mean"`` (over occupied cells), ``"sum"`` or ``"max"``; empty showers give 0.

    Shapes:
        feats: ``(P, C)``; shower: ``(P,)`` int64; returns ``(batch_size, C)``.
    """
    c = feats.shape[1]
    if mode in ("mean", "sum"):
        out = feats.new_zeros(batch_size, c).index_add(0, shower, feats)
        if mode == "mean":
            n = torch.bincount(shower, minlength=batch_size).clamp_(min=1)
            out = out / n[:, None].to(out.dtype)
        return out
    if mode == "max":
        return feats.new_zeros(batch_size, c).scatter_reduce(0, shower[:, None].expand(-1, c), feats, "amax",
                                                             include_self=False)
    msg = f"global pooling mode must be 'mean', 'sum' or 'max', got {mode!r}"
    raise ValueError(msg)


# ------------------------------------------------------------------------ weights and dense references
def dense_weight(weight: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """``(K, C_in, C_out)`` sparse weight → ``(C_out, C_in, k_l, k_a, k_r)`` ``conv3d`` weight."""
    k = weight.shape
    return weight.reshape(*kernel, k[1], k[2]).permute(4, 3, 0, 1, 2)


def sparse_weight(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dense_weight`."""
    co, ci = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, ci, co)


def _pad_alpha(x: torch.Tensor, p: int, wrap: bool, value: float = 0.0) -> torch.Tensor:
    if p == 0:
        return x
    if not wrap:
        return F.pad(x, (0, 0, p, p), value=value)
    a = x.shape[3]
    idx = torch.arange(-p, a + p, device=x.device) % a
    return x.index_select(3, idx)


def dense_conv3d(x: torch.Tensor, weight: torch.Tensor, *, stride: tuple[int, int, int] = (1, 1, 1),
                 padding: tuple[int, int, int] = (1, 1, 1), wrap: bool = True,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``conv3d`` with circular α padding (``wrap``) and zero padding in layer and r.

    Shapes:
        x: ``(N, C_in, L, A, R)``; weight: ``(C_out, C_in, k_l, k_a, k_r)``; returns ``(N, C_out, L', A', R')``.
    """
    x = _pad_alpha(x, padding[1], wrap)
    return F.conv3d(x, weight, bias, stride=stride, padding=(padding[0], 0, padding[2]))


def dense_pool3d(x: torch.Tensor, mode: str, *, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                 padding: tuple[int, int, int], wrap: bool = True) -> torch.Tensor:
    """Dense max/avg pooling (``count_include_pad=True``) with circular α padding (``wrap``).

    Shapes:
        x: ``(N, C, L, A, R)``; returns ``(N, C, L', A', R')``.
    """
    if mode == "max":
        x = _pad_alpha(x, padding[1], wrap, value=float("-inf"))
        return F.max_pool3d(x, kernel, stride, padding=(padding[0], 0, padding[2]))
    x = _pad_alpha(x, padding[1], wrap)
    return F.avg_pool3d(x, kernel, stride, padding=(padding[0], 0, padding[2]), count_include_pad=True)
