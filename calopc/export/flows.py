r"""Flow inversions that export small: a fully autoregressive transform inverted in one loop.

zuko inverts an autoregressive transform of ``F`` features with ``F`` full passes of its hyper network
(:class:`zuko.transforms.AutoregressiveTransform`): after pass ``k`` the features of order ``< k`` are
exact. Unrolled into a graph, the shower model's 4 transforms of 90 features make 360 copies of the
network and the spline: a graph that takes the exporter longer than half an hour. :class:`FlowInverse`
states the same inversion as one loop per transform (``torch.while_loop``, an ONNX ``Loop`` after
export) whose body is one step, traced once:

step ``k`` (``k = 0 … F - 1``), feature ``d = π(k)`` (the feature of order ``k``):

1. the hyper network on ``[x, c]`` (its masked weights, masks applied once here), where ``x`` holds the
   features of order ``< k`` (exact) and zeros elsewhere (the masks hide them from feature ``d``);
2. the last layer's rows of feature ``d`` only (``1 / F`` of the full layer);
3. the run's own spline (``transform.univariate``) inverted at ``y_d``; the result is written to ``x_d``.

After ``F`` steps ``x`` is the inverse: the value of every feature is the one zuko's pass ``k + 1`` gives it
(and every later pass repeats), so the result equals zuko's to float32 rounding (the last layer is a product
of ``F`` row blocks instead of one matrix). Transforms with fewer passes (coupling: ``passes=2``) and
anything else keep zuko's own inversion, unrolled.

Outside ``torch.export`` the loop runs in Python over the same step (the eager module and the graph do the
same arithmetic).
"""

from __future__ import annotations

__all__ = ["AutoregressiveInverse", "FlowInverse", "loop_invertible"]

from typing import Any

import torch
from torch import Tensor, nn


def _masked_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and isinstance(getattr(m, "mask", None), Tensor)


def loop_invertible(t: nn.Module) -> bool:
    """Whether a lazy zuko transform is inverted by :class:`AutoregressiveInverse`: a masked autoregressive
    transform with one feature per pass (``passes = features > 2``) and a hyper network of masked linear
    layers and parameter-free activations."""
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform

    if not isinstance(t, MaskedAutoregressiveTransform) or getattr(t, "order", None) is None:
        return False
    f = int(t.order.shape[0])
    if t.passes != f or f <= 2 or sorted(t.order.tolist()) != list(range(f)):
        return False
    layers = list(t.hyper)
    return (bool(layers) and _masked_linear(layers[-1])
            and all(_masked_linear(m) or not any(True for _ in m.parameters()) for m in layers))


class AutoregressiveInverse(nn.Module):
    """The exact inverse of one fully autoregressive zuko transform, one feature per step (module docstring).

    Args:
        t: a :class:`zuko.flows.autoregressive.MaskedAutoregressiveTransform` accepted by
            :func:`loop_invertible` (its weights are copied, masks applied).

    ``forward(c, y)``: context ``(B, C)`` (or None), values ``(B, F)`` → ``x`` ``(B, F)`` with ``t(c)(x) = y``.
    """

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.univariate, self.shapes, self.total = t.univariate, list(t.shapes), int(t.total)
        f = self.features = int(t.order.shape[0])
        layers = list(t.hyper)
        self.hidden = nn.ModuleList()     # masked linear layers (weights masked once) and activations, in order
        for m in layers[:-1]:
            if _masked_linear(m):
                lin = nn.Linear(m.in_features, m.out_features)
                with torch.no_grad():
                    lin.weight.copy_(m.mask * m.weight)
                    lin.bias.copy_(m.bias)
                lin.requires_grad_(False)
                self.hidden.append(lin)
            else:
                self.hidden.append(m)
        last = layers[-1]
        perm = torch.argsort(t.order)                                                  # step k → feature π(k)
        w = (last.mask * last.weight).detach().reshape(f, self.total, -1)[perm]        # (F, total, H)
        self.register_buffer("w_last", w.transpose(1, 2).contiguous(), persistent=False)  # (F, H, total)
        self.register_buffer("b_last", last.bias.detach().reshape(f, self.total)[perm].clone(), persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("onehot", torch.eye(f, dtype=torch.bool)[perm], persistent=False)

    def step(self, k: Tensor, x: Tensor, y: Tensor, c: Tensor | None) -> Tensor:
        """Step ``k`` (a 0-d int64 tensor): ``x`` with its feature of order ``k`` inverted. Shapes: x, y ``(B, F)``."""
        from zuko.utils import unpack

        kk = k.reshape(1)
        h = x if c is None else torch.cat([x, c.to(x.dtype).expand(x.shape[0], -1)], dim=-1)
        for m in self.hidden:
            h = m(h)
        p = h @ torch.index_select(self.w_last, 0, kk)[0] + torch.index_select(self.b_last, 0, kk)   # (B, total)
        y_d = torch.index_select(y, 1, torch.index_select(self.perm, 0, kk))[:, 0]
        x_d = self.univariate(*unpack(p, self.shapes)).inv(y_d)
        return torch.where(torch.index_select(self.onehot, 0, kk), x_d[:, None], x)

    def forward(self, c: Tensor | None, y: Tensor) -> Tensor:
        x0 = torch.zeros_like(y)
        k0 = torch.zeros((), dtype=torch.int64, device=y.device)
        if not torch.compiler.is_exporting():
            x = x0
            for k in range(self.features):
                x = self.step(k0 + k, x, y, c)
            return x
        from torch._higher_order_ops.while_loop import while_loop

        n = self.features

        def cond_fn(k: Tensor, x: Tensor) -> Tensor:
            return k < n

        def body_fn(k: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            return k + 1, self.step(k, x, y, c)

        return while_loop(cond_fn, body_fn, (k0, x0))[1]


class _Lazy(nn.Module):
    """zuko's own inversion of one lazy transform (unrolled on export)."""

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.t = t

    def forward(self, c: Tensor | None, y: Tensor) -> Tensor:
        return self.t(c).inv(y)


class FlowInverse(nn.Module):
    """``flow(c).transform.inv(z)`` of a zuko flow (e.g. :class:`zuko.flows.NSF`), each fully autoregressive
    transform inverted by :class:`AutoregressiveInverse` (one loop), the others by zuko.

    Args:
        flow: a zuko :class:`~zuko.lazy.Flow` whose ``transform`` is a composition of lazy transforms.

    Shapes:
        ``forward(c, z)``: c ``(B, C)``, z ``(B, F)`` → ``(B, F)``.
    """

    def __init__(self, flow: Any) -> None:
        super().__init__()
        ts = getattr(flow.transform, "transforms", None)
        self.whole = None if ts is not None else flow.transform
        self.parts = nn.ModuleList([] if ts is None else
                                   [AutoregressiveInverse(t) if loop_invertible(t) else _Lazy(t) for t in ts])

    @property
    def loops(self) -> int:
        """Transforms inverted in a loop."""
        return sum(isinstance(p, AutoregressiveInverse) for p in self.parts)

    def forward(self, c: Tensor, z: Tensor) -> Tensor:
        if self.whole is not None:
            return self.whole(c).inv(z)
        y = z
        for part in reversed(self.parts):
            y = part(c, y)
        return y
