"""DeepTree's generator: trees grown from one noise vector per shower, ancestor message passing, pruning to
the shower's points and a per-point head (see :mod:`calopc.models.deeptree`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

try:
    from torch_geometric.nn import GINConv, global_mean_pool
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    msg = "the DeepTree model needs torch-geometric: pip install 'calopc[gnn]'"
    raise ModuleNotFoundError(msg) from err

from .layers import _leaves, _mlp

if TYPE_CHECKING:
    from .config import DeepTreeConfig


def _group_log_normalise(logw: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``logw − logsumexp`` over the members of each group, so that ``exp`` sums to 1 per group.

    Shapes:
        logw, group: ``(P,)``; returns ``(P,)``.
    """
    mx = logw.new_full((n_groups,), -torch.inf).scatter_reduce(0, group, logw.detach(), "amax", include_self=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = logw.new_zeros(n_groups).index_add(0, group, torch.exp(logw - mx[group]))
    return logw - (mx + torch.log(s.clamp_min(1e-30)))[group]


class TreeGenerator(nn.Module):
    r"""Tree-growing generator: root noise → ``branches`` splits → pruned leaves → point features.

    Args:
        config: the resolved model config (``branches``, ``features``, sizes).
        cond_features: size of the per-shower condition vector.

    Shapes:
        :meth:`grow`: cond ``(B, C)``, noise ``(B, features[0])`` → leaves ``(B · prod(branches), features[-1])``.
        :meth:`points`: cond ``(B, C)``, shower ``(B, 2L)``, n_layer ``(B, L)`` → x ``(P, 3)``,
        layer ``(P,)``, shower index ``(P,)`` with ``P = n_layer.sum()``, shower after shower and layer
        after layer.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        self.branches = tuple(cfg.branches)
        self.features = tuple(cfg.features)
        self.n_layers = cfg.n_layers
        depth = len(self.branches)
        fs = self.features
        self.cond_embed = _mlp([cond_features, cfg.cond_hidden, cfg.cond_hidden])
        c = cfg.cond_hidden
        self.glob = nn.ModuleList(_mlp([fs[i] + c, cfg.n_global, cfg.n_global]) for i in range(depth))
        self.branch = nn.ModuleList(_mlp([fs[i] + c + cfg.n_global, cfg.branch_hidden, self.branches[i] * fs[i + 1]])
                                    for i in range(depth))
        # ancestor k of level t → level t's width (one bias-free projection per pair of levels)
        self.proj = nn.ModuleList(nn.ModuleList(nn.Linear(fs[k], fs[t], bias=False) for k in range(t))
                                  for t in range(1, depth + 1))
        self.gin = nn.ModuleList(GINConv(_mlp([fs[t], cfg.gin_hidden, fs[t]]), train_eps=True)
                                 for t in range(1, depth + 1))
        self.layer_embed = nn.Embedding(max(cfg.n_layers, 1), cfg.layer_embedding)
        self.leaf_noise = cfg.leaf_noise
        self.head = _mlp([fs[-1] + cfg.leaf_noise + cfg.layer_embedding + 3 + c, cfg.head_hidden, cfg.head_hidden, 3])
        # the leaf noise also reaches the output linearly, starting as the identity: the untrained generator
        # draws points from the standardised marginals (spread over the layer) instead of one spot per shower
        self.noise_skip = nn.Linear(cfg.leaf_noise, 3, bias=False) if cfg.leaf_noise else None
        if self.noise_skip is not None:
            with torch.no_grad():
                self.noise_skip.weight.copy_(torch.eye(3, cfg.leaf_noise))

    @property
    def leaves(self) -> int:
        return _leaves(self.branches)

    def ancestor_edges(self, level: int, n_showers: int, offsets: list[int], nodes: torch.Tensor | None = None,
                       ) -> torch.Tensor:
        """Edges from every ancestor to every node of ``level`` (index arithmetic, no search).

        Nodes of a level are numbered shower after shower, children of a node consecutively, so
        the ancestor at level ``k`` of node ``j`` of level ``t`` is ``j // prod(branches[k:t])``.

        Args:
            nodes: only these nodes of the level (their numbers); default: all.

        Shapes:
            returns ``(2, N_t · t)`` int64: row 0 indexes the concatenated ancestor levels (level
            ``k`` starts at ``offsets[k]``), row 1 the nodes of level ``t`` (positions in ``nodes``).
        """
        device = self.layer_embed.weight.device
        if nodes is None:
            nodes = torch.arange(n_showers * _leaves(self.branches[:level]), device=device)
        dst = torch.arange(nodes.shape[0], device=device)
        src = [offsets[k] + nodes // _leaves(self.branches[k:level]) for k in range(level)]
        return torch.stack([torch.cat(src), dst.repeat(level)])

    def grow(self, cond: torch.Tensor, noise: torch.Tensor | None = None, keep: torch.Tensor | None = None, *,
             keep_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Grow the trees; returns the leaves, shower after shower.

        Args:
            keep: ``(B · prod(branches),)`` bool, the leaves to return (pruning). Leaves see only
                their ancestors, so pruning before the last message passing changes nothing but
                the cost. Default: all leaves.
            keep_nodes: the same as leaf numbers (int64, increasing): no host sync on CUDA.
        """
        b = cond.shape[0]
        c = self.cond_embed(cond)
        h = noise if noise is not None else torch.randn(b, self.features[0], device=cond.device, dtype=cond.dtype)
        levels = [h]
        n_nodes = 1
        depth = len(self.branches)
        for i, k in enumerate(self.branches):
            shower = torch.arange(b, device=cond.device).repeat_interleave(n_nodes)   # (N_i,) shower of each node
            g = self.glob[i](torch.cat([global_mean_pool(h, shower, size=b), c], -1))  # (B, n_global)
            child = self.branch[i](torch.cat([h, c[shower], g[shower]], -1))            # (N_i, k · F_{i+1})
            h = child.reshape(h.shape[0] * k, self.features[i + 1])                     # children consecutive
            n_nodes *= k
            t = i + 1
            nodes = None
            if t == depth and (keep is not None or keep_nodes is not None):
                nodes = keep_nodes if keep_nodes is not None else keep.nonzero().squeeze(1)
                h = h[nodes]
            src = torch.cat([self.proj[i][a](levels[a]) for a in range(t)])
            offsets = np.cumsum([0] + [x.shape[0] for x in levels[:-1]]).tolist()
            h = h + self.gin[i]((src, h), self.ancestor_edges(t, b, offsets, nodes))
            levels.append(h)
        return h

    def points(self, cond: torch.Tensor, shower: torch.Tensor, n_layer: torch.Tensor,
               noise: torch.Tensor | None = None, *, energy_norm: tuple[float, float] | None = None,
               total: int | None = None, n_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grow, keep the first ``n`` leaves of each shower, give them their layers and map them to points.

        Args:
            energy_norm: ``(mean, std)`` of the standardised energy feature: when given, the
                energies of each (shower, layer) are normalised to shares that sum to 1.
            total, n_max: the number of points ``n_layer.sum()`` and an upper bound of the points of
                a shower, when the host knows them (training: the batch's shapes): then nothing is
                read back from the device.
        """
        b, n_l = n_layer.shape
        n = n_layer.sum(1)
        if n_max is None or n_max > self.leaves or total is None:
            most, tot = (int(v) for v in torch.stack([n.max(), n.sum()]).tolist())   # one read-back
            if most > self.leaves:
                msg = f"a shower of {most} points needs more than the tree's {self.leaves} leaves"
                raise ValueError(msg)
            total = tot if total is None else total
        shower_of = torch.arange(b, device=n.device).repeat_interleave(n, output_size=total)
        first = torch.cumsum(n, 0) - n
        leaf = shower_of * self.leaves + torch.arange(total, device=n.device) - first[shower_of]  # first n leaves
        h = self.grow(cond, noise, keep_nodes=leaf)                                              # (P, F)
        layer = torch.arange(n_l, device=n.device).repeat(b).repeat_interleave(n_layer.reshape(-1), output_size=total)
        pos = 2 * layer.to(h.dtype) / max(n_l - 1, 1) - 1
        per_layer = torch.stack([shower[shower_of, layer], shower[shower_of, n_l + layer]], -1)
        c = self.cond_embed(cond)
        z = torch.randn(h.shape[0], self.leaf_noise, device=h.device, dtype=h.dtype)
        x = self.head(torch.cat([h, z, self.layer_embed(layer), pos[:, None], per_layer, c[shower_of]], -1))
        if self.noise_skip is not None:
            x = x + self.noise_skip(z)
        if energy_norm is not None:
            mean, std = energy_norm
            loge = _group_log_normalise(x[:, 2] * std + mean, shower_of * n_l + layer, b * n_l)
            x = torch.cat([x[:, :2], ((loge - mean) / std)[:, None]], -1)
        return x, layer, shower_of
