r"""EDM diffusion on flat point sets: denoisers, preconditioning, loss, Heun sampler, consistency distillation.

Points are *flat*: all real points of a batch in one ``(P, F)`` tensor, each with the index
of its shower and its layer, so no padding is ever computed on.

* Denoisers ``F(x_in, c_noise, ctx, shower, layer) -> (P, F)``:

  - :class:`PointwiseNet` (CaloClouds II): every point denoised on its own by a stack of
    :class:`ConcatSquashLinear` layers; the time embedding (Fourier features of
    ``c_noise``) and the per-point context drive each layer's gate and bias;
  - :class:`BandTransformer`: points attend to the points of the same shower in layers
    ``|Δlayer| ≤ band`` (:func:`band_attention`), so cost stays linear in the number of layers.

* :class:`EDMPrecond` (Karras et al. 2022): ``D(x; σ) = c_skip x + c_out F(c_in x, c_noise)``
  with ``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = σ σ_d/√(σ²+σ_d²)``, ``c_in = 1/√(σ²+σ_d²)``,
  ``c_noise = ln σ / 4``; :class:`ConsistencyPrecond` swaps in the boundary-condition
  coefficients of consistency models (``D(x; σ_min) = x``).
* :func:`edm_loss`: ``‖F(c_in x_σ) − (x − c_skip x_σ)/c_out‖²``, which equals the EDM weight
  ``λ(σ) = 1/c_out²`` times ``‖D(x_σ) − x‖²``.
* :func:`sample`: Heun's second-order sampler on the Karras schedule (13 steps = 25 network
  evaluations: the last step to ``σ = 0`` is an Euler step).
* :func:`consistency_loss` / :func:`consistency_sample`: consistency distillation with one
  Heun step of the teacher between neighbouring points of an ``N``-point Karras grid.

References:
    | EDM (Karras et al., 2022) | https://arxiv.org/abs/2206.00364
    | Consistency models (Song et al., 2023) | https://arxiv.org/abs/2303.01469
    | CaloClouds II (Buss et al., 2023) | https://arxiv.org/abs/2309.05704
"""

from __future__ import annotations

__all__ = ["BandPlan", "BandTransformer", "ConcatSquashLinear", "ConsistencyPrecond", "EDMPrecond", "FourierEmbedding",
           "PointwiseNet", "band_attention", "band_plan", "consistency_loss", "consistency_sample", "edm_loss", "heun_step",
           "karras_sigmas", "sample", "segment_mean"]

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


def _check_steps(steps: int, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        msg = f"{name} must be an integer >= 1, got {steps!r}"
        raise ValueError(msg)
    return steps


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The ``n`` noise levels of the Karras schedule, from ``sigma_max`` down to ``sigma_min``.

    ``σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``; ``n = 1`` gives ``[σ_max]``.

    Shapes:
        returns ``(n,)``.
    """
    _check_steps(n, "number of noise levels")
    if not 0 < sigma_min < sigma_max:
        msg = f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        raise ValueError(msg)
    i = torch.arange(n, dtype=dtype, device=device) / max(n - 1, 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _karras_host(n: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """:func:`karras_sigmas` as Python floats, computed on the host (the samplers' step sizes: no device read)."""
    _check_steps(n, "number of noise levels")
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / max(n - 1, 1) * (b - a)) ** rho for i in range(n)]


def segment_mean(values: Tensor, index: Tensor, n: int) -> Tensor:
    """Mean of ``values`` per segment ``index`` (empty segments: 0).

    Shapes:
        values, index: ``(P,)``; returns ``(n,)``.
    """
    tot = values.new_zeros(n).index_add_(0, index, values)
    cnt = values.new_zeros(n).index_add_(0, index, torch.ones_like(values))
    return tot / cnt.clamp(min=1)


# ------------------------------------------------------------------------------------------------ embeddings
class FourierEmbedding(nn.Module):
    r"""Random Fourier features of a scalar, ``[cos 2π w x, sin 2π w x]`` with fixed ``w ~ N(0, scale²)``.

    Shapes:
        x: ``(P,)``; returns ``(P, features)``.
    """

    def __init__(self, features: int = 64, scale: float = 16.0) -> None:
        super().__init__()
        if features % 2:
            msg = f"Fourier features must be even, got {features}"
            raise ValueError(msg)
        self.register_buffer("weight", torch.randn(features // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        f = 2 * math.pi * x[:, None].to(self.weight.dtype) * self.weight
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ConcatSquashLinear(nn.Module):
    r"""``y = W x ⊙ sigmoid(G c) + H c`` (FFJORD/CaloClouds): a linear layer whose gate and bias depend on ``c``.

    With ``index``, ``ctx`` holds one row per group of points and ``index`` the group of every
    point: the gate and bias are computed once per group.

    Shapes:
        x: ``(P, in)``; ctx: ``(P, C)``, or ``(G, C)`` with index ``(P,)``; returns ``(P, out)``.
    """

    def __init__(self, features: int, out: int, context: int) -> None:
        super().__init__()
        self.layer = nn.Linear(features, out)
        self.gate = nn.Linear(context, out)
        self.bias = nn.Linear(context, out, bias=False)

    def forward(self, x: Tensor, ctx: Tensor, index: Tensor | None = None) -> Tensor:
        gate, bias = torch.sigmoid(self.gate(ctx)), self.bias(ctx)
        if index is not None:
            gate, bias = gate[index], bias[index]
        return torch.addcmul(bias, self.layer(x), gate)


def _group_context(time: Callable[[Tensor], Tensor], c_noise: Tensor, ctx: Tensor, ctx_index: Tensor | None,
                   dtype: torch.dtype) -> Tensor:
    """``[Fourier(c_noise), ctx]`` per point, or per group when ``ctx_index`` maps points to the rows of ``ctx``
    (the points of a group share their noise level)."""
    if ctx_index is None:
        return torch.cat([time(c_noise).to(dtype), ctx], dim=-1)
    c_noise_g = c_noise.new_zeros(ctx.shape[0]).scatter_(0, ctx_index, c_noise)
    return torch.cat([time(c_noise_g).to(dtype), ctx], dim=-1)


class PointwiseNet(nn.Module):
    r"""CaloClouds II denoiser: each point on its own, ConcatSquash layers ``F → widths → F``.

    The context of every layer is ``[Fourier(c_noise) (fourier), ctx (C)]``; leaky-ReLU between layers.

    Args:
        features: point features ``F``.
        context: context features ``C``.
        widths: hidden widths. Defaults to CaloClouds II's ``(128, 256, 512, 256, 128)``.
        fourier: size of the time embedding.
        time_mlp: CaloClouds II's trainable ``Linear(fourier, fourier) → LeakyReLU`` after the
            Fourier features (off: the Fourier features go to the layers directly, as in run
            directories written before the option existed).

    Shapes:
        x: ``(P, F)``; c_noise: ``(P,)``; ctx: ``(P, C)``, or ``(G, C)`` per group of points
        with ``ctx_index`` ``(P,)`` (points of a group must share ``c_noise``; the gates and
        biases are then computed once per group); returns ``(P, F)``.
    """

    def __init__(self, features: int, context: int, widths: tuple[int, ...] = (128, 256, 512, 256, 128),
                 fourier: int = 64, *, time_mlp: bool = False) -> None:
        super().__init__()
        self.time = FourierEmbedding(fourier)
        self.time_mlp = nn.Sequential(nn.Linear(fourier, fourier), nn.LeakyReLU()) if time_mlp else None
        dims = (features, *widths, features)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, fourier + context) for a, b in zip(dims[:-1], dims[1:]))

    def _time(self, c_noise: Tensor) -> Tensor:
        t = self.time(c_noise)
        return t if self.time_mlp is None else self.time_mlp(t.to(self.time_mlp[0].weight.dtype))

    def forward(self, x: Tensor, c_noise: Tensor, ctx: Tensor, shower: Tensor | None = None,
                layer: Tensor | None = None, ctx_index: Tensor | None = None, max_group: int | None = None) -> Tensor:
        c = _group_context(self._time, c_noise, ctx, ctx_index, x.dtype)
        h = x
        for i, lay in enumerate(self.layers):
            h = lay(h, c, ctx_index)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h)
        return h


# ------------------------------------------------------------------------------------------------ band attention
@dataclass
class BandPlan:
    """Where the queries and key windows of :func:`band_attention` lie, for one set of points (built once,
    shared by the blocks of a transformer).

    Points are sorted by ``(shower, layer)`` and cut into tiles of ``tile`` consecutive queries.
    The keys of a query lie within ``(band + 1) · max_group`` sorted positions on either side, so
    every tile reads one window of ``tile + 2 (band + 1) max_group`` keys: all shapes follow from
    ``P`` and ``max_group`` (host integers), so nothing is read back from the device.
    """

    order: Tensor      # (P,) sorted position → point
    mask: Tensor       # (T, 1, tile, W) bool: key allowed for the query
    pad: int           # keys padded on each side of the sorted sequence
    tile: int
    window: int
    n_tiles: int


def band_plan(shower: Tensor, layer: Tensor, n_layers: int, band: int = 2, *, max_group: int | None = None,
              tile: int = 64) -> BandPlan:
    """The plan of :func:`band_attention`.

    Args:
        max_group: an upper bound of the points of one ``(shower, layer)`` (e.g. the most cells of
            a layer). None: the largest group of these points (one host read).
        tile: queries per tile.
    """
    p = shower.shape[0]
    dev = shower.device
    group = shower * n_layers + layer
    order = torch.argsort(group, stable=True)
    if max_group is None:
        max_group = int(torch.zeros(int(group.max()) + 1 if p else 1, dtype=torch.int64, device=dev).index_add_(
            0, group, torch.ones_like(group)).max()) if p else 1
    tile = max(1, min(tile, p))
    pad = (band + 1) * max(int(max_group), 1)
    n_tiles = -(-p // tile)
    window = tile + 2 * pad
    sh = F.pad(shower[order], (pad, pad + n_tiles * tile - p), value=-1)       # (pad + T·tile + pad,)
    ly = F.pad(layer[order], (pad, pad + n_tiles * tile - p), value=0)
    q_sh = sh[pad:pad + n_tiles * tile].view(n_tiles, tile, 1)
    q_ly = ly[pad:pad + n_tiles * tile].view(n_tiles, tile, 1)
    k_sh = sh.unfold(0, window, tile)                                           # (T, W) overlapping windows
    k_ly = ly.unfold(0, window, tile)
    mask = (q_sh == k_sh[:, None, :]) & ((q_ly - k_ly[:, None, :]).abs() <= band)
    mask |= q_sh < 0                         # padded queries (discarded) see every key: no empty row
    return BandPlan(order, mask[:, None], pad, tile, window, n_tiles)


def band_attention(q: Tensor, k: Tensor, v: Tensor, shower: Tensor, layer: Tensor, n_layers: int, band: int = 2,
                   *, max_elements: int = 1 << 28, max_group: int | None = None, plan: BandPlan | None = None,
                   ) -> Tensor:
    r"""Attention of every point to the points of the same shower in layers ``|Δlayer| ≤ band``.

    A block mask without a ``P × P`` matrix and without a loop over groups (:class:`BandPlan`):
    points sorted by ``(shower, layer)`` are cut into tiles of consecutive queries, each tile
    attends to one window of keys around it (a view of the sorted keys), masked to its band, in
    one ``scaled_dot_product_attention`` call; the output is put back in the points' order with
    one ``index_copy``. With ``max_group`` (or a ``plan`` built with it) known on the host, no
    value is read back from the device. Cost: ``P · (tile + 2 (band + 1) max_group)`` scores per
    head. Tiles are processed in chunks of at most ``max_elements`` scores (one chunk unless the
    problem is large; the chunk bounds follow from the shapes, never from the data).

    Shapes:
        q, k, v: ``(P, H, D)``; shower, layer: ``(P,)`` int64; returns ``(P, H, D)``.
    """
    p, h, d = q.shape
    if p == 0:
        return q.clone()
    if plan is None:
        plan = band_plan(shower, layer, n_layers, band, max_group=max_group)
    n_t, tile, w, pad = plan.n_tiles, plan.tile, plan.window, plan.pad
    extra = n_t * tile - p

    def sorted_padded(t: Tensor, lo: int, hi: int) -> Tensor:
        return F.pad(t[plan.order].flatten(1), (0, 0, lo, hi)).view(-1, h, d)

    qs = sorted_padded(q, 0, extra).view(n_t, tile, h, d).transpose(1, 2)        # (T, H, tile, D)
    ks = sorted_padded(k, pad, pad + extra).unfold(0, w, tile)                    # (T, H, D, W)
    vs = sorted_padded(v, pad, pad + extra).unfold(0, w, tile)
    per_chunk = max(1, max_elements // max(1, h * tile * w))
    outs = []
    for a in range(0, n_t, per_chunk):   # bounds from the shapes only; usually one chunk
        b = min(n_t, a + per_chunk)
        outs.append(F.scaled_dot_product_attention(qs[a:b], ks[a:b].transpose(2, 3), vs[a:b].transpose(2, 3),
                                                   attn_mask=plan.mask[a:b]))
    o = (outs[0] if len(outs) == 1 else torch.cat(outs)).transpose(1, 2).reshape(n_t * tile, h, d)[:p]
    return torch.empty_like(q).index_copy_(0, plan.order, o)


class _Block(nn.Module):
    """Pre-norm transformer block with band attention and FiLM conditioning on ``(time, ctx)``."""

    def __init__(self, dim: int, heads: int, cond: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.film = nn.Linear(cond, 4 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: Tensor, c: Tensor, shower: Tensor, layer: Tensor, n_layers: int, band: int,
                plan: BandPlan | None = None) -> Tensor:
        s1, b1, s2, b2 = self.film(c).chunk(4, dim=-1)
        p, dim = h.shape
        q, k, v = self.qkv(self.norm1(h) * (1 + s1) + b1).view(p, 3, self.heads, dim // self.heads).unbind(1)
        h = h + self.proj(band_attention(q, k, v, shower, layer, n_layers, band, plan=plan).reshape(p, dim))
        return h + self.mlp(self.norm2(h) * (1 + s2) + b2)


class BandTransformer(nn.Module):
    r"""Denoiser in which points attend to the points of nearby layers of their shower.

    Each block lets a point see layers ``|Δlayer| ≤ band`` (a block mask on ``(shower, layer)``
    groups, :func:`band_attention`); with ``blocks`` blocks information travels at most
    ``blocks · band`` layers. Never across showers.

    Args:
        features: point features ``F``; context: per-point context ``C``; n_layers: layers of
        the calorimeter; dim, heads, blocks, mlp: transformer sizes; band: layers each side;
        fourier: size of the time embedding.

    Shapes:
        x: ``(P, F)``; c_noise: ``(P,)``; ctx: ``(P, C)`` or ``(G, C)`` with ``ctx_index`` (as
        :class:`PointwiseNet`); shower, layer: ``(P,)``; returns ``(P, F)``.
    """

    def __init__(self, features: int, context: int, n_layers: int, *, dim: int = 64, heads: int = 4, blocks: int = 2,
                 mlp: int = 128, band: int = 2, fourier: int = 64, max_group: int | None = None) -> None:
        super().__init__()
        self.max_group = max_group   # most points of one (shower, layer); None: read from the data (one host read)
        if dim % heads:
            msg = f"transformer dim ({dim}) must be a multiple of heads ({heads})"
            raise ValueError(msg)
        self.n_layers, self.band = n_layers, band
        self.time = FourierEmbedding(fourier)
        cond = fourier + context
        self.cond = nn.Sequential(nn.Linear(cond, dim), nn.SiLU())
        self.inp = nn.Linear(features + dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dim, mlp) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, features))

    def forward(self, x: Tensor, c_noise: Tensor, ctx: Tensor, shower: Tensor | None = None,
                layer: Tensor | None = None, ctx_index: Tensor | None = None, max_group: int | None = None) -> Tensor:
        """``max_group``: the most points of one (shower, layer) when the caller knows it (generation: the
        sampled counts), a tighter key window than the geometry's bound."""
        if shower is None or layer is None:
            msg = "the transformer denoiser needs the shower and layer of every point"
            raise ValueError(msg)
        c = self.cond(_group_context(self.time, c_noise, ctx, ctx_index, x.dtype))
        if ctx_index is not None:
            c = c[ctx_index]
        h = self.inp(torch.cat([x, c], dim=-1))
        plan = band_plan(shower, layer, self.n_layers, self.band,
                         max_group=max_group or self.max_group) if x.shape[0] else None
        for blk in self.blocks:
            h = blk(h, c, shower, layer, self.n_layers, self.band, plan)
        return self.out(h)


# ------------------------------------------------------------------------------------------------ preconditioning
class EDMPrecond(nn.Module):
    r"""EDM preconditioning ``D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, ln σ / 4, …)``.

    Args:
        net: the raw denoiser ``F(x_in, c_noise, **kw)``.
        sigma_data: standard deviation of the data (per feature). Defaults to 0.5.

    Shapes:
        x: ``(P, F)``; sigma: ``(P,)`` or a float; returns ``(P, F)``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` of noise levels ``sigma`` (same shape)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def _sigma(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma

    def forward(self, x: Tensor, sigma: Tensor | float, **kw: Tensor) -> Tensor:
        sigma = self._sigma(x, sigma)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip[:, None] * x + c_out[:, None] * self.net(c_in[:, None] * x, c_noise, **kw)


class ConsistencyPrecond(EDMPrecond):
    r"""Consistency-model parametrisation: ``c_skip = σ_d²/((σ−σ_min)²+σ_d²)``,
    ``c_out = (σ−σ_min) σ_d/√(σ²+σ_d²)``, so that ``D(x; σ_min) = x`` exactly.

    Args:
        net: the raw denoiser; sigma_data: as :class:`EDMPrecond`; sigma_min: the boundary.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__(net, sigma_data)
        self.sigma_min = sigma_min

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd, s0 = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - s0) ** 2 + sd**2)
        c_out = (sigma - s0) * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


# ------------------------------------------------------------------------------------------------ training
def edm_loss(precond: EDMPrecond, x: Tensor, sigma: Tensor, noise: Tensor | None = None, **kw: Tensor) -> Tensor:
    r"""EDM denoising loss per point: ``mean_f (F(c_in x_σ) − (x − c_skip x_σ)/c_out)²`` with ``x_σ = x + σ n``.

    This is ``λ(σ) ‖D(x_σ; σ) − x‖²`` with the EDM weight ``λ = 1/c_out²``, computed in the
    form that does not divide by small ``c_out``.

    Args:
        precond: the preconditioned denoiser.
        x: clean points; sigma: noise level of every point; noise: ``N(0, 1)`` noise
            (drawn when None); kw: passed to the network (``ctx``, ``shower``, ``layer``).

    Shapes:
        x, noise: ``(P, F)``; sigma: ``(P,)``; returns ``(P,)``.
    """
    if noise is None:
        noise = torch.randn_like(x)
    x_noisy = x + sigma[:, None] * noise
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
    out = precond.net(c_in[:, None] * x_noisy, c_noise, **kw)
    target = (x - c_skip[:, None] * x_noisy) / c_out[:, None]
    return (out - target).pow(2).mean(-1)


# ------------------------------------------------------------------------------------------------ sampling
def heun_step(net: Callable[..., Tensor], x: Tensor, sigma: float, sigma_next: float, **kw: Tensor) -> Tensor:
    """One Heun step of the probability-flow ODE from ``sigma`` to ``sigma_next`` (Euler when ``sigma_next = 0``).

    Shapes:
        x: ``(P, F)``; returns ``(P, F)``.
    """
    d = (x - net(x, sigma, **kw)) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:
        d2 = (x_next - net(x_next, sigma_next, **kw)) / sigma_next
        x_next = x + (sigma_next - sigma) * 0.5 * (d + d2)
    return x_next


@torch.no_grad()
def sample(net: Callable[..., Tensor], latents: Tensor, *, num_steps: int = 13, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, **kw: Tensor) -> Tensor:
    r"""Heun sampler (EDM Algorithm 1 without churn): ``2 num_steps − 1`` network evaluations.

    Args:
        net: a preconditioned denoiser ``D(x, sigma, **kw)``.
        latents: standard normal noise; the start is ``σ_max · latents``.
        num_steps: noise levels of the Karras schedule (13: 25 evaluations).
        sigma_min, sigma_max, rho: the schedule.
        kw: passed to ``net`` (``ctx``, ``shower``, ``layer``).

    Shapes:
        latents: ``(P, F)``; returns ``(P, F)``.
    """
    _check_steps(num_steps)
    sig = _karras_host(num_steps, sigma_min, sigma_max, rho) + [0.0]
    x = latents * sig[0]
    for i in range(num_steps):
        x = heun_step(net, x, sig[i], sig[i + 1], **kw)
    return x


@torch.no_grad()
def consistency_sample(net: Callable[..., Tensor], latents: Tensor, *, steps: int = 1, sigma_min: float = 0.002,
                       sigma_max: float = 80.0, rho: float = 7.0, **kw: Tensor) -> Tensor:
    r"""Sample a consistency model: ``x = f(σ_max z, σ_max)``, then ``steps − 1`` times re-noise to the
    next level of the ``steps``-point Karras schedule between ``σ_max`` and ``σ_min`` and map back.
    ``steps`` network evaluations.

    Shapes:
        latents: ``(P, F)``; returns ``(P, F)``.
    """
    _check_steps(steps)
    sig = _karras_host(steps + 1, sigma_min, sigma_max, rho)
    x = net(latents * sigma_max, sigma_max, **kw)
    for s in sig[1:steps]:
        x = net(x + math.sqrt(max(s**2 - sigma_min**2, 0.0)) * torch.randn_like(x), s, **kw)
    return x


def consistency_loss(student: Callable[[Tensor, Tensor], Tensor], target: Callable[[Tensor, Tensor], Tensor],
                     teacher: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor, index: Tensor,
                     noise: Tensor | None = None) -> Tensor:
    r"""Consistency-distillation loss per point.

    For a point of noise-level index ``n`` (``sigmas`` descending, ``n ∈ [0, N−2]``):
    ``x_hi = x + σ_n z``; the teacher takes one Heun step to ``σ_{n+1}`` giving ``x̂_lo``; the
    loss is ``mean_f (f_student(x_hi, σ_n) − f_target(x̂_lo, σ_{n+1}))²`` (no gradient through
    the target and the teacher). The three networks are preconditioned denoisers called as
    ``net(x, sigma)`` (bind their other inputs, e.g. with a lambda).

    Shapes:
        x: ``(P, F)``; sigmas: ``(N,)`` descending; index: ``(P,)`` int64; returns ``(P,)``.
    """
    if noise is None:
        noise = torch.randn_like(x)
    s_hi = sigmas[index].to(x.dtype)
    s_lo = sigmas[index + 1].to(x.dtype)
    x_hi = x + s_hi[:, None] * noise
    with torch.no_grad():
        d = (x_hi - teacher(x_hi, s_hi)) / s_hi[:, None]
        x_e = x_hi + (s_lo - s_hi)[:, None] * d
        d2 = (x_e - teacher(x_e, s_lo)) / s_lo[:, None]
        x_lo = x_hi + (s_lo - s_hi)[:, None] * 0.5 * (d + d2)
        y = target(x_lo, s_lo)
    return (student(x_hi, s_hi) - y).pow(2).mean(-1)
