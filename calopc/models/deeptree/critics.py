"""DeepTree's critics: iterative pooling (published) and mean-field attention (MDMA-style), both on the same
per-point inputs and spectral-normalised (see :mod:`calopc.models.deeptree`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..data import pack
from .layers import _linear, _mlp

if TYPE_CHECKING:
    from .config import DeepTreeConfig


class _Attention(nn.Module):
    """Multi-head attention of queries to a (masked) key/value set, with a residual feed-forward.

    Shapes:
        q: ``(B, M, H)`` (or ``(M, H)``, shared by the batch); kv: ``(B, N, H)``;
        mask: ``(B, N)`` bool (True on real entries) or None; returns ``(B, M, H)``.
    """

    def __init__(self, hidden: int, heads: int, *, sn: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (_linear(hidden, hidden, sn=sn) for _ in range(4))
        self.ff = _mlp([hidden, hidden, hidden], sn=sn)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, h = kv.shape
        qp = self.q(q)
        if q.dim() == 2:  # learned seeds, shared by the batch: project once
            q, qp = q[None].expand(b, -1, -1), qp[None].expand(b, -1, -1)
        m = q.shape[1]
        d = h // self.heads
        qh = qp.reshape(b, m, self.heads, d).transpose(1, 2)
        kh = self.k(kv).view(b, n, self.heads, d).transpose(1, 2)
        vh = self.v(kv).view(b, n, self.heads, d).transpose(1, 2)
        att = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=att).transpose(1, 2).reshape(b, m, h)
        out = q + self.o(out)
        return out + self.ff(out)

    def forward_packed(self, q: torch.Tensor, kv: torch.Tensor, chunks: tuple[torch.Tensor, ...], b: int,
                       pre: nn.Module | None = None, *, slots: bool = False) -> torch.Tensor:
        """:meth:`forward` with queries shared by the batch and the key/value set given packed: the same function.

        ``pre``: a linear layer the key/value set still has to pass (``kv`` is its input): it is folded
        into the projection, ``k(pre(x)) = x (W_k W_pre)ᵀ + (W_k b_pre + b_k)``, so the ``P`` entries
        take one product instead of three ``H → H`` ones (the same function).
        ``slots``: ``kv`` is already laid out in the chunks' slots (``(K · size, H)``, row ``i`` the entry
        ``src[i]``), as :meth:`_PointInput.embed` gives it with ``order=src``: no gather here.

        :meth:`forward` projects and attends to all ``B · N`` slots of the padded layout: 2.7×
        the real points on dataset 2, whose batches' largest shower has 2.7× the mean number of
        points. Here the attention runs over chunks of :data:`CHUNK` slots that each hold entries
        of one shower (:func:`chunk_layout`: ``P`` plus fewer than ``B · CHUNK`` slots). The
        queries are the same for every shower, so they are folded into the key projection
        (``q_h · k_h(x) = x · (W_k,hᵀ q_h) + b_k,h · q_h``): one product of the entries gives every
        head's logits, laid out head by head (no keys are formed, no per-chunk logit products
        run), and one more the values, without their bias (the weights of a softmax sum to 1, so
        ``b_v`` is added to the result). The softmax over all entries of a shower: the shower's
        largest logit (over its chunks) is subtracted as a constant (exact in value and
        gradient); per head, one batched product gives each chunk's exponential-weighted values,
        a sum its weights; both are summed over the chunks of each shower.

        Shapes:
            q: ``(M, H)``; kv: ``(P, H)``; chunks: :func:`chunk_layout`; returns ``(B, M, H)``.
        """
        owner, valid, src = chunks
        k_max, size = valid.shape
        m, h = q.shape
        heads, d = self.heads, h // self.heads
        wk, bk, wv, bv = self.k.weight, self.k.bias, self.v.weight, self.v.bias
        if pre is not None:
            wk, bk, wv, bv = wk @ pre.weight, torch.addmv(bk, wk, pre.bias), wv @ pre.weight, torch.addmv(bv, wv, pre.bias)
        qh = self.q(q).view(m, heads, d).transpose(0, 1) * (1 / math.sqrt(d))          # (heads, M, d)
        w_logit = torch.bmm(qh, wk.view(heads, d, -1)).flatten(0, 1)                    # (heads · M, H_in)
        b_logit = torch.bmm(qh, bk.view(heads, d, 1)).flatten(0, 1)                     # (heads · M, 1)
        if not slots:
            kv = kv.index_select(0, src)
        pad = torch.zeros(valid.shape, dtype=kv.dtype, device=kv.device).masked_fill_(~valid, -torch.inf)
        # out of place first: an in-place update of the product's view would copy the whole product in backward
        logits = ((w_logit @ kv.T).view(heads * m, k_max, size) + b_logit[..., None]).add_(pad)  # (heads · M, K, size)
        top = logits.detach().amax(-1)                                                   # (heads · M, K)
        top = top.new_full((heads * m, b + 1), -torch.inf).scatter_reduce(
            1, owner[None].expand_as(top), top, "amax", include_self=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))    # spare chunks (owner b), empty showers
        e = logits.sub_(top[:, owner, None]).exp_()     # in place: no gradient needs the logits themselves
        values = (kv @ wv.T).view(k_max, size, heads, d)
        per_head = zip(e.view(heads, m, k_max, size).unbind(0), values.unbind(2))
        part = torch.stack([torch.bmm(eh.transpose(0, 1), vh) for eh, vh in per_head], 1)   # (K, heads, M, d)
        acc = part.new_zeros(b + 1, heads, m, d).index_add(0, owner, part)[:b]
        weight = e.sum(-1)                                                               # (heads · M, K)
        total = weight.new_zeros(heads * m, b + 1).index_add(1, owner, weight)[:, :b]
        total = total.T.reshape(b, heads, m, 1)                  # Σ e (v + b_v) = acc + total b_v: 0 for empty showers
        out = (acc + total * bv.view(heads, 1, d)) / total.clamp_min(torch.finfo(acc.dtype).tiny)
        out = q[None].expand(b, -1, -1) + self.o(out.transpose(1, 2).reshape(b, m, h))
        return out + self.ff(out)


#: slots per chunk of :meth:`_Attention.forward_packed` (a shower of n points takes ceil(n / CHUNK) chunks); 64 was
#: the fastest of 64, 128 and 256 on one CPU thread (dataset-2 batches of 40), 1.4x faster than the padded attention
CHUNK = 64


def chunk_layout(n: torch.Tensor, total: int, size: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks of ``size`` slots holding the entries of a packed set (shower after shower), each chunk in one shower.

    Shower ``b`` takes ``ceil(n_b / size)`` consecutive chunks; the number of chunks is the bound
    ``ceil(total / size) + B``, known from the shapes (no read-back), the spare ones owned by a
    dummy shower ``B``.

    Args:
        n: ``(B,)`` entries per shower; total: ``n.sum()``, as the host knows it (the packed length).

    Returns:
        owner ``(K,)`` (the shower of each chunk, ``B`` for spare chunks), valid ``(K, size)``
        (slots that hold an entry) and src ``(K · size,)`` (the packed entry of each slot; 0 for
        empty slots, whose attention weight is zero).
    """
    b = n.shape[0]
    k_max = -(-total // size) + b
    per = torch.div(n + size - 1, size, rounding_mode="floor")
    end = torch.cumsum(per, 0)
    owner = torch.searchsorted(end, torch.arange(k_max, device=n.device), right=True)
    start = F.pad(end - per, (0, 1))
    first = F.pad(torch.cumsum(n, 0) - n, (0, 1))
    slot = (torch.arange(k_max, device=n.device) - start[owner])[:, None] * size + torch.arange(size, device=n.device)
    valid = slot < F.pad(n, (0, 1))[owner][:, None]
    src = torch.where(valid, first[owner][:, None] + slot, torch.zeros_like(slot)).reshape(-1)
    return owner, valid, src


class _PointInput(nn.Module):
    """Per-point critic input: features, transverse position ``(r cos α, r sin α)`` (``r`` as a fraction of
    the layer's extent), layer (embedding and position), that layer's shower features, condition.

    Only the real points are embedded (the padding gets zeros); the condition enters through
    a per-shower projection added to the first layer.

    Shapes:
        x: ``(B, N, 3)``; layer, mask: ``(B, N)``; cond: ``(B, C)``; shower: ``(B, 2L)``; returns ``(B, N, H)``.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        self.n_layers = cfg.n_layers
        self.register_buffer("mean", torch.tensor(cfg.point_mean[:2], dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.point_std[:2], dtype=torch.float32), persistent=False)
        self.layer_embed = nn.Embedding(max(cfg.n_layers, 1), cfg.layer_embedding)
        self.point = _linear(5 + cfg.layer_embedding + 3, cfg.critic_hidden, sn=True)
        self.cond = _linear(cond_features, cfg.critic_hidden, sn=True, bias=False)
        self.out = _linear(cfg.critic_hidden, cfg.critic_hidden, sn=True)

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``packed``: ``(points (P, 3), layer (P,), shower (P,), position in the flattened (B, N) layout (P,))``
        of the real points (no boolean indexing: no host sync on CUDA)."""
        h, _, idx = self.embed(x, layer, mask, cond, shower, packed)
        b, n = mask.shape
        return h.new_zeros(b * n, h.shape[-1]).index_copy(0, idx, h).view(b, n, -1)

    def embed(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
              shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None, *, last: bool = True,
              order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedded real points, packed: ``(h (P, H), shower (P,), position in the (B, N) layout (P,))``.

        ``last=False``: ``h`` before the output layer ``self.out`` (for a caller that folds that
        linear layer into its own, see :meth:`_Attention.forward_packed`). ``order``: the real points
        taken in this order (indices into the packed points, repeats allowed), e.g. the slots of
        :func:`chunk_layout`: the rows come out laid out as the caller needs them.

        Everything the first linear layer sees besides the point's own five features (layer
        embedding and position, the layer's two shower features, the condition projection and
        the bias) depends only on (shower, layer): it is summed once into a ``(B · L, H)`` table
        and gathered per point, the same function as the linear layer on the concatenated inputs.
        """
        b, n = mask.shape
        n_l = self.n_layers
        if packed is None:
            shower_of, lay, xm = pack(mask, layer, x)
            idx = mask.reshape(-1).nonzero().squeeze(1)
        else:
            xm, lay, shower_of, idx = packed
        if order is not None:
            xm, lay, shower_of, idx = (t.index_select(0, order) for t in (xm, lay, shower_of, idx))
        u = torch.sigmoid(xm[:, :2] * self.std + self.mean)                              # α, r in (0, 1)
        ang = (2 * u[:, 0] - 1) * math.pi
        feats = torch.cat([xm, u[:, 1:] * torch.cos(ang)[:, None], u[:, 1:] * torch.sin(ang)[:, None]], -1)
        w = self.point.weight                                     # columns: x (3), xy (2), embedding, pos, shower (2)
        e = self.layer_embed.weight.shape[1]
        pos = 2 * torch.arange(n_l, device=w.device, dtype=w.dtype) / max(n_l - 1, 1) - 1
        per_layer = self.layer_embed.weight @ w[:, 5:5 + e].T + pos[:, None] * w[:, 5 + e]        # (L, H)
        per_shower = self.cond(cond) + self.point.bias                                            # (B, H)
        table = shower.view(b, 2, n_l).transpose(1, 2) @ w[:, 6 + e:].T + per_layer + per_shower[:, None]
        h = torch.addmm(table.reshape(b * n_l, -1)[shower_of * n_l + lay], feats, w[:, :5].T)
        h = F.leaky_relu(h, 0.2)
        return (self.out(h) if last else h), shower_of, idx


class _SumCritic(nn.Module):
    """Sub-critic: per-node FFN → sum over the nodes (mean over the real ones with a mask) → FFN with the
    condition → score."""

    def __init__(self, hidden: int, cond_features: int, dropout: float) -> None:
        super().__init__()
        self.phi = _mlp([hidden, hidden, hidden], sn=True, dropout=dropout)
        self.rho = _mlp([hidden + cond_features, hidden, 1], sn=True, dropout=dropout)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            s = self.phi(h).sum(1)
        else:
            w = mask.to(h.dtype)[..., None]
            s = (self.phi(h) * w).sum(1) / w.sum(1).clamp_min(1)
        return self.rho(torch.cat([s, cond], -1)).squeeze(-1), s


class PoolCritic(nn.Module):
    r"""Iterative-pooling critic: points → ``critic_nodes`` learned nodes, one sub-critic per level.

    With ``critic_point_level`` the cloud itself is a level too (a DeepSets sub-critic, mean over the
    points; not in the published critic).

    Shapes:
        x: ``(B, N, 3)``; layer: ``(B, N)`` int64; mask: ``(B, N)``; cond: ``(B, C)``; shower: ``(B, 2L)``;
        returns scores ``(B, levels)`` and features ``(B, levels · H)`` (for feature matching).
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        hdim = cfg.critic_hidden
        self.inp = _PointInput(cfg, cond_features)
        self.seeds = nn.ParameterList(nn.Parameter(torch.randn(m, hdim) / math.sqrt(hdim)) for m in cfg.critic_nodes)
        self.pool = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in cfg.critic_nodes)
        self.sub = nn.ModuleList(_SumCritic(hdim, cond_features, cfg.critic_dropout) for _ in cfg.critic_nodes)
        self.point_sub = _SumCritic(hdim, cond_features, cfg.critic_dropout) if cfg.critic_point_level else None

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # unless a point-level sub-critic needs the embedded points themselves, the points are embedded straight
        # into the first level's chunk layout and their output layer is folded into its keys and values
        fold = self.point_sub is None
        b, n = mask.shape
        chunks = chunk_layout(mask.sum(1), packed[0].shape[0] if packed is not None else int(mask.sum()))
        h, _, idx = self.inp.embed(x, layer, mask, cond, shower, packed, last=not fold,
                                   order=chunks[2] if fold else None)
        scores, feats = [], []
        if self.point_sub is not None:
            s, f = self.point_sub(h.new_zeros(b * n, h.shape[-1]).index_copy(0, idx, h).view(b, n, -1), cond, mask)
            scores.append(s)
            feats.append(f)
        for i, (seeds, pool, sub) in enumerate(zip(self.seeds, self.pool, self.sub)):
            h = pool.forward_packed(seeds, h, chunks, b, self.inp.out if fold else None, slots=fold) if i == 0 \
                else pool(seeds, h)
            s, f = sub(h, cond)
            scores.append(s)
            feats.append(f)
        return torch.stack(scores, -1), torch.cat(feats, -1)


class MeanFieldCritic(nn.Module):
    r"""MDMA-style mean-field critic: ``k`` global tokens read the points, the points read the tokens (``O(N k)``).

    The tokens start as learned vectors plus the mean of the embedded points; every block has
    tokens ← points attention, a condition-gated (GLU) update of the tokens, points ← tokens
    attention. The score and the feature-matching features come from the tokens. Unlike MDMA
    (weight norm, WGAN-GP) it is spectral-normalised and trained with the same hinge loss as
    :class:`PoolCritic`, so the two critics are interchangeable.

    Shapes:
        as :class:`PoolCritic`; scores ``(B, 1)``, features ``(B, H)``.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        hdim = cfg.critic_hidden
        self.inp = _PointInput(cfg, cond_features)
        self.tokens = nn.Parameter(torch.randn(cfg.meanfield_tokens, hdim) / math.sqrt(hdim))
        self.read = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in range(cfg.meanfield_blocks))
        self.gate = nn.ModuleList(_linear(hdim + cond_features, 2 * hdim, sn=True) for _ in range(cfg.meanfield_blocks))
        self.write = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in range(cfg.meanfield_blocks))
        self.out = _mlp([hdim + cond_features, hdim, 1], sn=True, dropout=cfg.critic_dropout)

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x, layer, mask, cond, shower, packed)
        w = mask.to(h.dtype)[..., None]
        mean = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        t = self.tokens[None] + mean                                                   # (B, k, H)
        k = t.shape[1]
        for read, gate, write in zip(self.read, self.gate, self.write):
            t = read(t, h, mask)
            t = t + F.glu(gate(torch.cat([t, cond[:, None, :].expand(-1, k, -1)], -1)), -1)
            h = write(h, t)
        f = t.mean(1)
        return self.out(torch.cat([f, cond], -1)), f
