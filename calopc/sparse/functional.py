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
    "schedule",
    "segment_max",
    "sparse_weight",
]

import torch
import torch.nn.functional as F

from .kernel import KernelMap

#: padded pairs × channels of one batched gather–GEMM–scatter chunk (bounds the transient memory)
CHUNK_ELEMS = 1 << 24

#: Schedule of the gather–GEMM–scatter:
#:
#: * ``"loop"``: one gather, GEMM and scatter per kernel offset (no padding, contiguous GEMMs);
#: * ``"batched"``: offsets padded to the largest offset of a chunk: one gather, ``bmm`` and scatter per chunk;
#: * ``"grouped"``: one gather, one ``torch.nn.functional.grouped_mm`` over all offsets (jagged groups,
#:   no padding) and one scatter (float32 / bfloat16 / float16 with channel counts whose rows are multiples
#:   of 16 bytes; otherwise ``"loop"``);
#: * ``"gather"``: output-stationary over the map's neighbour table (kernels ≤ 3×3×3): ``im2col`` rows
#:   ``(P_out, K · C_in)`` times the ``(K · C_in, C_out)`` weight in chunks; no scatter and, for submanifold
#:   maps, no scatter in the backward pass either (deterministic on every device); empty neighbours are
#:   multiplied as zero rows (wasted work of ``1 − fill``);
#: * ``"auto"`` (default): ``"loop"`` on the CPU (measured fastest there: ``benchmarks/sparse.py --schedules``),
#:   ``"grouped"`` on CUDA (one kernel for all offsets instead of one launch per offset; not measured here).
#:
#: When ``"grouped"`` raises (a GPU or torch build without a working ``grouped_mm``), the convolution is
#: computed with the measured schedule instead (``"batched"`` on CUDA, ``"loop"`` elsewhere), one warning
#: says so, and the process keeps that schedule for every later convolution (:data:`GROUPED_FAILED`).
EXECUTION = "auto"
SCHEDULES = ("auto", "loop", "batched", "grouped", "gather")
#: why the ``"grouped"`` schedule failed in this process (None: it has not failed); then it is not tried again
GROUPED_FAILED: str | None = None


def _grouped_ok(feats: torch.Tensor, c_in: int, c_out: int) -> bool:
    if not hasattr(F, "grouped_mm") or feats.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per16 = 16 // feats.element_size()
    return c_in % per16 == 0 and c_out % per16 == 0


def schedule(kmap: KernelMap, feats: torch.Tensor, c_in: int, c_out: int, transpose: bool) -> str:
    """The schedule :data:`EXECUTION` gives for this map, features and channels (see there)."""
    mode = EXECUTION
    if mode not in SCHEDULES:
        msg = f"calopc.sparse.functional.EXECUTION must be one of {', '.join(SCHEDULES)}, got {mode!r}"
        raise ValueError(msg)
    if mode == "auto":
        mode = "grouped" if feats.device.type == "cuda" else "loop"
    if mode == "gather" and (transpose):
        mode = "loop"
    if mode == "grouped" and (GROUPED_FAILED is not None or not _grouped_ok(feats, c_in, c_out)):
        mode = _measured(feats)
    return mode


def _measured(feats: torch.Tensor) -> str:
    """The schedule used where ``"grouped"`` cannot run: ``"batched"`` on CUDA, ``"loop"`` elsewhere."""
    return "batched" if feats.device.type == "cuda" else "loop"


def _grouped_failed(err: Exception, feats: torch.Tensor) -> str:
    """Remember that ``"grouped"`` failed (once per process, with one warning); the schedule to use instead."""
    global GROUPED_FAILED  # one decision per process
    fallback = _measured(feats)
    if GROUPED_FAILED is None:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        GROUPED_FAILED = f"{type(err).__name__}: {first}"
        import warnings

        warnings.warn(f"sparse convolution: the grouped_mm schedule failed on {feats.device.type} ({GROUPED_FAILED}); "
                      f"using the {fallback} schedule from now on", RuntimeWarning, stacklevel=2)
    return fallback


def _rows_per_chunk(k: int, c: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, k * c))


class _GatherGemmScatter(torch.autograd.Function):
    """``out[o] += feats[i] @ weight[k]`` over the pairs of a kernel map (``transpose``: roles of i and o swapped).

    Only the features, the weight and the (cached) kernel map are kept for the backward pass. The identity
    offset of a submanifold map is a plain matrix product. See :data:`EXECUTION` for the schedules.
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transpose: bool) -> torch.Tensor:
        n_dst = kmap.n_in if transpose else kmap.n_out
        c_in, c_out = weight.shape[1], weight.shape[2]
        mode = schedule(kmap, feats, c_in, c_out, transpose)
        ctx.save_for_backward(feats, weight)
        ctx.kmap, ctx.transpose, ctx.mode = kmap, transpose, mode
        if mode == "gather":
            return _gather_forward(feats, weight, kmap)
        if mode == "grouped":
            try:
                src, dst = (kmap.out_idx, kmap.in_idx) if transpose else (kmap.in_idx, kmap.out_idx)
                y = F.grouped_mm(feats.index_select(0, src), weight, offs=kmap.offs())
                return feats.new_zeros(n_dst + 1, c_out).index_add_(0, dst.long(), y)[:n_dst]
            except Exception as err:  # noqa: BLE001 - any failure of the unmeasured schedule: the measured one
                mode = ctx.mode = _grouped_failed(err, feats)
        out = feats.new_zeros(n_dst + 1, c_out)
        if kmap.identity is not None:
            out[:n_dst] += feats @ weight[kmap.identity]
        if mode == "batched":
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
        return out[:n_dst]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap, transpose, mode = ctx.kmap, ctx.transpose, ctx.mode
        grad = grad.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if mode == "gather":
            gx, gw = _gather_backward(feats, weight, kmap, grad, need_x, need_w)
            return gx, gw, None, None
        n_src = kmap.n_out if transpose else kmap.n_in
        c_in, c_out = weight.shape[1], weight.shape[2]
        if mode == "grouped":
            try:
                src, dst = (kmap.out_idx, kmap.in_idx) if transpose else (kmap.in_idx, kmap.out_idx)
                g = grad.index_select(0, dst)
                gx = gw = None
                if need_x:
                    gx = feats.new_zeros(n_src + 1, c_in).index_add_(
                        0, src.long(), F.grouped_mm(g, weight.transpose(1, 2), offs=kmap.offs()))[:n_src]
                if need_w:
                    gw = F.grouped_mm(feats.index_select(0, src).T, g, offs=kmap.offs())
                return gx, gw, None, None
            except Exception as err:  # noqa: BLE001 - as in the forward pass
                mode = _grouped_failed(err, feats)
        gx = feats.new_zeros(n_src + 1, c_in) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        if kmap.identity is not None:
            if need_x:
                gx[:n_src] += grad @ weight[kmap.identity].T
            if need_w:
                gw[kmap.identity] = feats.T @ grad
        if mode == "batched":
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


def _gather_forward(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Output-stationary product over the neighbour table: ``out = im2col(feats) @ weight`` in row chunks."""
    k, c_in, c_out = weight.shape
    xz = torch.cat([feats, feats.new_zeros(1, c_in)])
    w2 = weight.reshape(k * c_in, c_out)
    out = feats.new_empty(kmap.n_out, c_out)
    step = _rows_per_chunk(k, c_in)
    tab = kmap.neighbour_table()
    for a in range(0, kmap.n_out, step):
        t = tab[:, a:a + step].T.reshape(-1)  # (rows · K,) output-major
        cols = xz.index_select(0, t).view(-1, k * c_in)
        torch.mm(cols, w2, out=out[a:a + step])
    return out


def _gather_backward(feats, weight, kmap: KernelMap, grad, need_x: bool, need_w: bool):
    k, c_in, c_out = weight.shape
    n_in, n_out = kmap.n_in, kmap.n_out
    tab = kmap.neighbour_table()
    gw = None
    if need_w:
        xz = torch.cat([feats, feats.new_zeros(1, c_in)])
        acc = feats.new_zeros(k * c_in, c_out)
        step = _rows_per_chunk(k, c_in)
        for a in range(0, n_out, step):
            cols = xz.index_select(0, tab[:, a:a + step].T.reshape(-1)).view(-1, k * c_in)
            acc.addmm_(cols.T, grad[a:a + step])
        gw = acc.view(k, c_in, c_out)
    gx = None
    if need_x:
        if kmap.symmetric:
            # input i is read by output tab[K-1-k][i] at offset k: a gather of the gradient, no scatter
            gz = torch.cat([grad, grad.new_zeros(1, c_out)])
            wt = weight.transpose(1, 2).reshape(k * c_out, c_in)
            gx = feats.new_empty(n_in, c_in)
            step = _rows_per_chunk(k, c_out)
            rev = tab.flip(0)
            for a in range(0, n_in, step):
                cols = gz.index_select(0, rev[:, a:a + step].T.reshape(-1)).view(-1, k * c_out)
                torch.mm(cols, wt, out=gx[a:a + step])
        else:
            gxz = feats.new_zeros(n_in + 1, c_in)
            w2t = weight.reshape(k * c_in, c_out).T
            step = _rows_per_chunk(k, c_in)
            for a in range(0, n_out, step):
                rows = (grad[a:a + step] @ w2t).view(-1, c_in)  # (rows · K, C_in) output-major
                gxz.index_add_(0, tab[:, a:a + step].T.reshape(-1).long(), rows)
            gx = gxz[:n_in]
    return gx, gw


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
        return segment_max(feats.index_select(0, kmap.in_idx), kmap.out_idx.long(), kmap.n_out)
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


class _SegmentMax(torch.autograd.Function):
    """Column-wise maximum per segment; the backward sends each segment's gradient to the rows that hold its
    maximum (split evenly between ties), with one gather: no scatter over the rows as ``scatter_reduce``'s does."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        idx = index[:, None].expand_as(feats)
        out = feats.new_zeros(n, feats.shape[1]).scatter_reduce_(0, idx, feats, "amax", include_self=False)
        if ctx.needs_input_grad[0]:
            hit = feats == out.index_select(0, index)                             # (P, C): the row holds the maximum
            ties = torch.zeros_like(out).index_add_(0, index, hit.to(feats.dtype))
            ctx.save_for_backward(index, hit, ties)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        index, hit, ties = ctx.saved_tensors
        return (grad / ties.clamp(min=1)).index_select(0, index) * hit, None, None


def segment_max(feats: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Maximum of the rows of each segment, per column; empty segments give 0.

    The same values and gradients as ``scatter_reduce(..., "amax", include_self=False)`` on zeros (a
    segment's gradient split evenly between rows that tie for its maximum), with a backward that costs one
    gather instead of a scatter over all rows (the set encoders' pooling: most of its backward time).

    Shapes:
        feats: ``(P, C)``; index: ``(P,)`` int64 in ``[0, n)``; returns ``(n, C)``.
    """
    return _SegmentMax.apply(feats, index, n)


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
        return segment_max(feats, shower, batch_size)
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
