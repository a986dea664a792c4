r"""Coordinates and kernel maps of sparse convolutions (pure torch, any device), cached per batch.

Convention (that of a dense ``conv3d`` whose α axis is padded circularly): output cell
``o`` of a layer with kernel ``k``, stride ``s`` and padding ``p`` reads the input
cells ``o · s − p + j`` for ``j = 0 … k − 1`` along each axis; along α the position is
taken modulo ``A`` when ``wrap`` is set, along layer and r positions outside the grid
are empty (zero padding). The output grid has ``(D + 2p − k) // s + 1`` cells per axis.

Output coordinates (``policy``):

* ``"same"``: the input cells (submanifold convolution, stride 1);
* ``"stride"``: ``unique(input // s)`` (the rule of MinkowskiEngine and spconv for strided
  convolutions: every output cell lies under an occupied input cell);
* ``"full"``: every output cell whose receptive field holds an occupied input cell
  (exactly the support of the dense result);
* ``"patch"`` (kernel = stride, padding 0): ``unique(input // s)`` on the grid ``ceil(D / s)``, so no
  cell at the end of an axis is dropped (positions past the end of the grid are empty, also along α).
  Every input cell feeds exactly one output cell, and the map is built directly from the coordinates.

A kernel map lists, per kernel offset, the pairs ``(input row, output row)``. It is
built output-driven, on the device (one ``nonzero`` and one read of the per-offset counts per map, none
per offset; maps are cached, so a batch pays them once per resolution): for every output cell and offset the input key is computed
and looked up with ``searchsorted`` in the sorted input keys (or, for batch grids up
to :data:`DIRECT_TABLE_MAX` cells, in a direct-address table of the keys). Maps and output
coordinates are stored in the batch's shared ``ctx`` and reused by every layer with
the same coordinates, kernel, stride, padding and wrap.
"""

from __future__ import annotations

__all__ = ["KernelMap", "kernel_map", "out_size", "output_coords", "transposed_coords"]

from dataclasses import dataclass

import torch

from .tensor import SparseShowers, delinearise, linearise

Triple = tuple[int, int, int]


def _triple(v: int | tuple[int, ...], name: str) -> Triple:
    t = (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3 or any(x < 0 for x in t):
        msg = f"{name} must be an int or 3 non-negative ints (layer, alpha, r), got {v!r}"
        raise ValueError(msg)
    return t  # type: ignore[return-value]


def out_size(d: int, k: int, s: int, p: int) -> int:
    """Cells of the output grid along one axis (``conv3d`` formula)."""
    return (d + 2 * p - k) // s + 1


def _axis_fwd(d_in: int, d_out: int, k: int, s: int, p: int, wrap: bool, device: torch.device) -> torch.Tensor:
    """``(d_out, k)`` input position read by output ``o`` at offset ``j``, or -1 outside the grid."""
    o = torch.arange(d_out, device=device)[:, None]
    j = torch.arange(k, device=device)[None]
    pos = o * s - p + j
    if wrap:
        return pos % d_in
    return torch.where((pos >= 0) & (pos < d_in), pos, torch.full_like(pos, -1))


def _axis_inv(fwd: torch.Tensor, d_in: int) -> torch.Tensor:
    """``(d_in, M)`` outputs that read input position ``x`` (padded with -1)."""
    d_out, k = fwd.shape
    o = torch.arange(d_out, device=fwd.device)[:, None].expand(d_out, k).reshape(-1)
    x = fwd.reshape(-1)
    keep = x >= 0
    o, x = o[keep], x[keep]
    pairs = torch.unique(x * d_out + o)  # one entry per (input, output)
    x, o = pairs // d_out, pairs % d_out
    cnt = torch.bincount(x, minlength=d_in)
    m = int(cnt.max()) if cnt.numel() else 0
    table = torch.full((d_in, max(m, 1)), -1, dtype=torch.long, device=fwd.device)
    start = torch.cumsum(cnt, 0) - cnt
    rank = torch.arange(x.shape[0], device=fwd.device) - start[x]
    table[x, rank] = o
    return table


def _map_axes(coords: torch.Tensor, batch: int, shape: list[int], tables: list[torch.Tensor],
              new_shape: list[int]) -> torch.Tensor:
    """Map coordinates through per-axis tables (``(d, M)``, -1 = none), axis by axis, deduplicating."""
    cur = list(shape)
    for ax, table in enumerate(tables):
        cand = table[coords[:, ax + 1]]  # (P, M)
        rows, cols = torch.nonzero(cand >= 0, as_tuple=True)
        coords = coords[rows].clone()
        coords[:, ax + 1] = cand[rows, cols]
        cur[ax] = new_shape[ax]
        coords = _unique_rows(coords, batch, cur)
    return coords


def _unique_rows(coords: torch.Tensor, batch: int, shape: list[int]) -> torch.Tensor:
    key = linearise(coords, tuple(shape))
    key = torch.unique(key)
    return delinearise(key, (batch, *shape))


def _cache_key(kind: str, x: SparseShowers, *args: object) -> tuple:
    return (kind, x.cid, *args)


def output_coords(x: SparseShowers, kernel: Triple, stride: Triple, padding: Triple, wrap: bool,
                  policy: str) -> SparseShowers:
    """Output cells (as a feature-less :class:`SparseShowers` sharing ``x.ctx``) of a conv/pool on ``x``."""
    if policy == "same":
        return x.replace(x.feats[:, :0])
    if policy == "patch":
        if tuple(kernel) != tuple(stride) or any(padding):
            msg = f"output='patch' needs kernel = stride and padding 0, got kernel {kernel}, stride {stride}, padding {padding}"
            raise ValueError(msg)
        shp = [-(-d // s) for d, s in zip(x.shape, stride)]
    else:
        shp = [out_size(d, k, s, p) for d, k, s, p in zip(x.shape, kernel, stride, padding)]
    # "stride" outputs depend on the stride and the output grid only: layers that differ in kernel share them
    key = (_cache_key("coords", x, stride, tuple(shp), "stride") if policy in ("stride", "patch")
           else _cache_key("coords", x, kernel, stride, padding, wrap, policy))
    hit = x.ctx.get(key)
    if hit is not None:
        return hit
    if min(shp) < 1:
        msg = f"kernel {kernel}, stride {stride}, padding {padding} leave no output cell on grid {x.shape}"
        raise ValueError(msg)
    c = x.coords
    inverse = None
    if policy in ("stride", "patch"):
        cols = [_div(c[:, ax + 1], stride[ax]) for ax in range(3)]
        kc = ((c[:, 0] * shp[0] + cols[0]) * shp[1] + cols[1]) * shp[2] + cols[2]
        if all(-(-d // s) == n for d, s, n in zip(x.shape, stride, shp)):  # every cell has its coarse cell
            uniq, inverse = torch.unique(kc, return_inverse=True)
        else:
            inside = (cols[0] < shp[0]) & (cols[1] < shp[1]) & (cols[2] < shp[2])
            uniq = torch.unique(kc[inside])
        o = delinearise(uniq, (x.batch_size, *shp))
    elif policy == "full":
        tables = [_axis_inv(_axis_fwd(x.shape[ax], shp[ax], kernel[ax], stride[ax], padding[ax], wrap and ax == 1,
                                      c.device), x.shape[ax]) for ax in range(3)]
        o = _map_axes(c, x.batch_size, list(x.shape), tables, shp)
    else:
        msg = f"output policy must be 'same', 'stride', 'full' or 'patch', got {policy!r}"
        raise ValueError(msg)
    stride_total = tuple(a * b for a, b in zip(x.stride, stride))
    out = SparseShowers(o, x.feats.new_zeros(o.shape[0], 0), x.batch_size, tuple(shp), x.geometry, stride_total, x.ctx)
    x.ctx[key] = out
    if inverse is not None:  # the coarse cell of every input cell: the map of a patch convolution for free
        x.ctx[("inverse", x.cid, out.cid)] = inverse
    return out


def _div(v: torch.Tensor, s: int) -> torch.Tensor:
    """``v // s`` for non-negative ``v`` (a shift for powers of two)."""
    if s == 1:
        return v
    return v >> (s.bit_length() - 1) if s & (s - 1) == 0 else v // s


def _mod(v: torch.Tensor, s: int) -> torch.Tensor:
    if s == 1:
        return torch.zeros_like(v)
    return v & (s - 1) if s & (s - 1) == 0 else v % s


def transposed_coords(x: SparseShowers, kernel: Triple, stride: Triple, padding: Triple, wrap: bool,
                      shape: Triple) -> SparseShowers:
    """Every fine cell of grid ``shape`` that a transposed convolution of ``x`` reaches."""
    key = _cache_key("tcoords", x, kernel, stride, padding, wrap, shape)
    hit = x.ctx.get(key)
    if hit is not None:
        return hit
    for ax in range(3):
        if out_size(shape[ax], kernel[ax], stride[ax], padding[ax]) != x.shape[ax]:
            msg = (f"output grid {shape} is not the input of a conv with kernel {kernel}, stride {stride}, padding "
                   f"{padding} giving grid {x.shape}")
            raise ValueError(msg)
    tables = [_axis_fwd(shape[ax], x.shape[ax], kernel[ax], stride[ax], padding[ax], wrap and ax == 1,
                        x.coords.device) for ax in range(3)]
    o = _map_axes(x.coords, x.batch_size, list(x.shape), tables, list(shape))
    stride_total = tuple(a // b if b else a for a, b in zip(x.stride, stride))
    out = SparseShowers(o, x.feats.new_zeros(o.shape[0], 0), x.batch_size, tuple(shape), x.geometry, stride_total,
                        x.ctx)
    x.ctx[key] = out
    return out


#: largest batch grid (showers · cells) looked up through a direct-address table instead of a binary search
DIRECT_TABLE_MAX = 1 << 25


def _finder(x: SparseShowers):
    """``find(keys, ok) -> rows`` (-1 where absent or not ``ok``) for the cells of ``x``.

    Small grids (``batch · L · A · R ≤ DIRECT_TABLE_MAX``) use a direct-address table (one gather per
    query, built for the map and freed with it: only the maps are cached); larger ones a binary search
    (``searchsorted``) in the sorted keys.
    """
    keys = x.key
    n = len(x)
    n_grid = x.batch_size * x.shape[0] * x.shape[1] * x.shape[2]
    if n == 0:
        return lambda k, ok: torch.full_like(k, -1)
    if n_grid <= DIRECT_TABLE_MAX:
        # row of every grid cell (-1: empty), plus a last -1 entry for invalid queries
        table = torch.full((n_grid + 1,), -1, dtype=torch.int32, device=keys.device)
        table[keys] = torch.arange(n, device=keys.device, dtype=torch.int32)

        def find(k: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
            k = torch.where(ok, k, torch.full_like(k, n_grid))
            return table.index_select(0, k.reshape(-1)).view(k.shape)

        return find

    def search(k: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(keys, k.contiguous()).clamp_(max=n - 1)
        hit = ok & (keys[pos] == k)
        return torch.where(hit, pos, torch.full_like(pos, -1))

    return search


@dataclass
class KernelMap:
    """Pairs ``(in_idx[q], out_idx[q])`` grouped by kernel offset (``splits[k]`` pairs for offset ``k``).

    The indices are int32 (int64 beyond 2^31 rows).

    Offsets are numbered ``(j_layer · k_alpha + j_alpha) · k_r + j_r``. ``identity`` is the offset whose
    pairs are ``(i, i)`` for every row (the centre of a submanifold convolution), if any.

    :meth:`neighbour_table` is the same map as a ``(K, n_out)`` table (the input row each output reads at each
    offset, ``n_in`` where none). ``symmetric`` marks submanifold maps, where output ``o`` reads ``i`` at offset ``k``
    exactly when ``i`` reads ``o`` at offset ``K − 1 − k`` (so the backward pass is a gather too).
    """

    in_idx: torch.Tensor
    out_idx: torch.Tensor
    splits: list[int]
    n_in: int
    n_out: int
    identity: int | None = None
    symmetric: bool = False

    def neighbour_table(self) -> torch.Tensor:
        """``(K, n_out)`` input row that each output reads at each offset, ``n_in`` (a zero row) where none; built
        from the pairs on first use and cached (only the output-stationary schedule needs it)."""
        t = self.__dict__.get("_table")
        if t is None:
            k = len(self.splits)
            t = torch.full((k, self.n_out), self.n_in, dtype=self.in_idx.dtype, device=self.in_idx.device)
            off = torch.repeat_interleave(torch.arange(k, device=self.in_idx.device),
                                          torch.tensor(self.splits, device=self.in_idx.device),
                                          output_size=self.n_pairs)
            t.view(-1)[off * self.n_out + self.out_idx.long()] = self.in_idx
            self.__dict__["_table"] = t
        return t

    @property
    def fill(self) -> float:
        """Pairs over ``K · n_out``: the share of the neighbour table that holds a cell."""
        return self.n_pairs / max(1, len(self.splits) * self.n_out)

    def offs(self) -> torch.Tensor:
        """``(K,)`` int32 end of each offset's pairs (``cumsum(splits)``) on the map's device, cached."""
        o = self.__dict__.get("_offs")
        if o is None:
            o = torch.tensor(self.splits, dtype=torch.long).cumsum(0).to(torch.int32).to(self.in_idx.device)
            self.__dict__["_offs"] = o
        return o

    @property
    def n_pairs(self) -> int:
        return int(self.in_idx.shape[0])

    def chunks(self, max_elems: int):
        """Offsets in chunks for the batched product, each as ``(offsets, in_pad, out_pad)``, cached.

        ``in_pad``/``out_pad`` are ``(k, M)``: the pairs of ``k`` offsets padded to the largest count ``M``
        with the sentinels ``n_in`` / ``n_out`` (a zero input row / a discarded output row). A chunk holds
        at most ``max_elems`` padded pairs (at least one offset); the identity offset is left out.
        """
        key = max_elems
        cache = self.__dict__.setdefault("_chunks", {})
        if key in cache:
            return cache[key]
        starts = [0]
        for n in self.splits:
            starts.append(starts[-1] + n)
        todo = [k for k, n in enumerate(self.splits) if n and k != self.identity]
        out, cur = [], []
        for k in todo + [None]:
            if k is not None:
                m = max([self.splits[j] for j in cur + [k]])
                if not cur or m * (len(cur) + 1) <= max_elems:
                    cur.append(k)
                    continue
            if cur:
                m = max(self.splits[j] for j in cur)
                dev = self.in_idx.device
                ip = torch.full((len(cur), m), self.n_in, dtype=torch.long, device=dev)
                op = torch.full((len(cur), m), self.n_out, dtype=torch.long, device=dev)
                for r, j in enumerate(cur):
                    ip[r, :self.splits[j]] = self.in_idx[starts[j]:starts[j + 1]]
                    op[r, :self.splits[j]] = self.out_idx[starts[j]:starts[j + 1]]
                out.append((cur, ip, op))
            cur = [k] if k is not None else []
        cache[key] = out
        return out

    def groups(self):
        """Yield ``(offset, in_idx, out_idx)`` for every offset with pairs."""
        start = 0
        for k, n in enumerate(self.splits):
            if n:
                yield k, self.in_idx[start:start + n], self.out_idx[start:start + n]
            start += n


def kernel_map(x: SparseShowers, out: SparseShowers, kernel: Triple, stride: Triple, padding: Triple,
               wrap: bool) -> KernelMap:
    """Kernel map from ``x`` (input cells) to ``out`` (output cells), cached in the shared ``ctx``."""
    key = ("kmap", x.cid, out.cid, kernel, stride, padding, wrap)
    hit = x.ctx.get(key)
    if hit is not None:
        return hit
    dev = x.coords.device
    if tuple(kernel) == tuple(stride) and not any(padding) and all(
            o in (out_size(d, k, k, 0), -(-d // k)) for d, o, k in zip(x.shape, out.shape, kernel)):
        km = _patch_map(x, out, kernel)
        x.ctx[key] = km
        return km
    tabs = [_axis_fwd(x.shape[ax], out.shape[ax], kernel[ax], stride[ax], padding[ax], wrap and ax == 1, dev)
            for ax in range(3)]
    n_in, n_out = len(x), len(out)
    oc = out.coords
    L, A, R = x.shape
    kl, ka, kr = kernel
    il = tabs[0][oc[:, 1]]  # (P_out, kl)
    ia = tabs[1][oc[:, 2]]  # (P_out, ka)
    ir = tabs[2][oc[:, 3]]  # (P_out, kr)
    # int32 key arithmetic where the batch grid allows it (half the memory traffic)
    n_grid = x.batch_size * L * A * R
    kt = torch.int32 if n_grid < 2**31 - 1 else torch.long
    il, ia, ir = il.to(kt), ia.to(kt), ir.to(kt)
    base = oc[:, 0].to(kt) * L
    find = _finder(x)
    K = kl * ka * kr
    # (K, P_out) input row of every (offset, output) pair, -1 where the cell is empty or outside the grid: built
    # plane by plane of layer offsets into one preallocated table, all on the device (no host read per offset)
    idx_t = torch.int32 if n_in < 2**31 - 1 else torch.long
    table = torch.empty((K, n_out), dtype=idx_t, device=dev)
    ia_t, ir_t = ia.T, ir.T  # (ka, P_out), (kr, P_out)
    ok_ar = ((ia_t >= 0)[:, None, :] & (ir_t >= 0)[None, :, :]).reshape(ka * kr, n_out)
    for jl in range(kl):
        kbl = (base + il[:, jl]) * A
        # (ka · kr, P_out) input keys of this layer offset, offset-major
        k3 = ((kbl[None, :] + ia_t)[:, None, :] * R + ir_t[None, :, :]).reshape(ka * kr, n_out)
        ok = ok_ar & (il[:, jl] >= 0)[None, :]
        table[jl * ka * kr:(jl + 1) * ka * kr] = find(k3, ok).to(idx_t)
    # the pairs, offset-major: one nonzero and one read of the per-offset counts per map (cached per batch)
    found = table >= 0
    splits = found.sum(1).tolist()
    pos = torch.nonzero(found.reshape(-1)).squeeze(1)
    in_idx = table.reshape(-1).index_select(0, pos)
    out_idx = pos % n_out if n_out else pos
    symmetric = (x.cid == out.cid and all(s == 1 for s in stride) and all(k % 2 == 1 for k in kernel)
                 and all(p == k // 2 for p, k in zip(padding, kernel)))
    identity = None
    if x.cid == out.cid and all(s == 1 for s in stride):
        c = (kl // 2 * ka + ka // 2) * kr + kr // 2
        if all(p == k // 2 for p, k in zip(padding, kernel)) and all(k % 2 == 1 for k in kernel) and splits[c] == n_in:
            identity = c
    if max(n_in, n_out) < 2**31:  # int32 pairs: half the memory of the cached map
        in_idx, out_idx = in_idx.to(torch.int32), out_idx.to(torch.int32)
    km = KernelMap(in_idx, out_idx, splits, n_in, n_out, identity, symmetric=symmetric)
    x.ctx[key] = km
    return km


def _patch_map(x: SparseShowers, out: SparseShowers, kernel: Triple) -> KernelMap:
    """Map of a convolution with kernel = stride and padding 0: input ``c`` feeds output ``c // s`` at offset
    ``c % s`` (if that output exists), nothing else; built directly from the coordinates."""
    c = x.coords
    K = kernel[0] * kernel[1] * kernel[2]
    k = (_mod(c[:, 1], kernel[0]) * kernel[1] + _mod(c[:, 2], kernel[1])) * kernel[2] + _mod(c[:, 3], kernel[2])
    row = x.ctx.get(("inverse", x.cid, out.cid))
    if row is not None:  # every input has its output (see output_coords)
        found = None
    else:
        cols = [_div(c[:, ax + 1], kernel[ax]) for ax in range(3)]
        ok = (cols[0] < out.shape[0]) & (cols[1] < out.shape[1]) & (cols[2] < out.shape[2])
        kc = ((c[:, 0] * out.shape[0] + cols[0]) * out.shape[1] + cols[1]) * out.shape[2] + cols[2]
        row = _finder(out)(torch.where(ok, kc, torch.zeros_like(kc)), ok)
        found = row >= 0
    if found is not None:
        k = torch.where(found, k, torch.full_like(k, K))  # absent: sorted last, cut off below
    order = torch.argsort(k, stable=True)
    counts = torch.bincount(k, minlength=K + 1)
    splits = counts.tolist()
    n = sum(splits[:K])
    order = order[:n]
    it = torch.int32 if max(len(x), len(out)) < 2**31 else torch.long
    return KernelMap(order.to(it), row.index_select(0, order).to(it), splits[:K], len(x), len(out))
