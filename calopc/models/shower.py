r"""The shower model shared by the point-cloud models: points and energy per layer given ``E_inc``.

A conditional neural spline flow (zuko's autoregressive NSF) over the ``2 L`` standardised
per-layer features of variant-II preprocessing (dequantised ``log n_l`` and ``log E_l/E_inc``
of every layer, see :mod:`calopc.models.preprocess`) given the standardised ``log E_inc``.
CaloPointFlow II, CaloClouds and DeepTree sample their per-layer point counts and layer
energies from it, then place points in the layers.

Example:
    >>> import torch
    >>> m = ShowerModel(3, config=ShowerModelConfig(transforms=1, hidden=(16,)))
    >>> m.sample(torch.zeros(5, 1)).shape
    torch.Size([5, 6])

References:
    | Neural spline flows (Durkan et al., 2019) | https://arxiv.org/abs/1906.04032
    | CaloPointFlow II (Schnake, Krücker, Borras, 2024) | https://arxiv.org/abs/2403.15782
"""

from __future__ import annotations

__all__ = ["ShowerModel", "ShowerModelConfig"]

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zuko
from torch import Tensor, nn


@dataclass(frozen=True)
class ShowerModelConfig:
    """Hyper-parameters of :class:`ShowerModel`."""

    transforms: int = 4                     # autoregressive spline transforms
    hidden: tuple[int, ...] = (128, 128)    # hidden layers of each transform's network
    bins: int = 8                           # spline bins
    passes: int | None = None               # None: autoregressive (2L passes to sample); 2: coupling (2 passes)

    @classmethod
    def from_dict(cls, d: dict) -> ShowerModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown shower model config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _prep_call(fn: Callable[..., Any], *args: Tensor) -> Any:
    """Call a preprocessing method with tensors; numpy-only methods get host arrays instead."""
    try:
        return fn(*args)
    except (TypeError, RuntimeError, AttributeError):  # a numpy implementation given device tensors
        return fn(*(a.detach().cpu().numpy() for a in args))


def torch_preprocessor(prep: Any, device: torch.device) -> Any:
    """``prep.to_torch(device)`` (cached on ``prep``) when it has the inverse methods generation needs, else None."""
    if not hasattr(prep, "to_torch"):
        return None
    key = f"_torch_preprocessor:{device}"
    tp = prep.__dict__.get(key)
    if tp is None:
        tp = prep.to_torch(device)
        if not all(hasattr(tp, m) for m in ("forward_cond", "inverse_layers", "inverse_points_layer")):
            return None
        prep.__dict__[key] = tp
    return tp


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype or t.dtype)


class ShowerModel(nn.Module):
    r"""Conditional flow ``p(s | c)`` over the ``2 L`` per-layer (count, energy) features.

    Args:
        n_layers: number of calorimeter layers ``L``.
        cond_features: size of the condition (1: standardised ``log E_inc``).
        config: hyper-parameters.
        features: number of shower features; defaults to ``2 * n_layers`` (CaloPointFlow I
            uses 2: ``log n`` and ``log ΣE``).

    Shapes:
        cond: ``(B, C)``; shower: ``(B, 2L)``.

    The state dict of a bare ``zuko.flows.NSF`` (keys ``transform.*``, ``base.*``) also loads,
    so run directories written before this module existed keep working.
    """

    def __init__(self, n_layers: int, cond_features: int = 1, config: ShowerModelConfig = ShowerModelConfig(), *,
                 features: int | None = None) -> None:
        super().__init__()
        features = 2 * n_layers if features is None else features
        if features < 1 or cond_features < 0:
            msg = f"ShowerModel needs n_layers >= 1 (or features >= 1), got n_layers={n_layers}, features={features}"
            raise ValueError(msg)
        self.n_layers, self.features, self.cond_features, self.config = n_layers, features, cond_features, config
        self.flow = zuko.flows.NSF(features, cond_features, bins=config.bins, transforms=config.transforms,
                                   hidden_features=tuple(config.hidden), passes=config.passes)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # keys of a bare NSF (older checkpoints) → this module's "flow." keys
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "flow.")]:
            rest = k[len(prefix):]
            if rest.split(".", 1)[0] in ("transform", "base"):
                state_dict[prefix + "flow." + rest] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, cond: Tensor) -> torch.distributions.Distribution:
        """The conditional distribution ``p(s | cond)`` (a zuko distribution, batch ``(B,)``)."""
        return self.flow(cond)

    def log_prob(self, cond: Tensor, shower: Tensor) -> Tensor:
        """``log p(shower | cond)``. Shapes: cond ``(B, C)``, shower ``(B, S)`` → ``(B,)``."""
        return self.flow(cond).log_prob(shower)

    def loss(self, cond: Tensor, shower: Tensor) -> Tensor:
        """Negative log-likelihood per feature, averaged over the batch (a scalar)."""
        return -self.log_prob(cond, shower).mean() / self.features

    @torch.no_grad()
    def sample(self, cond: Tensor) -> Tensor:
        """Standardised shower features. Shapes: cond ``(B, C)`` → ``(B, S)``."""
        return self.flow(cond).sample()

    @torch.no_grad()
    def sample_layers(self, e_inc: Tensor | np.ndarray, prep: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Sample points and energy per layer for the given incident energies.

        Args:
            e_inc: incident energies in MeV.
            prep: the fitted variant-II :class:`~calopc.models.preprocess.Preprocessor`.

        Returns:
            ``(shower, n_layer, e_layer)`` on the model's device: the standardised features,
            the points per layer (int64, capped by the cells of the layer, at least one per
            shower) and the layer energies (MeV, 0 where a layer has no point).

        Shapes:
            e_inc: ``(B,)``; shower: ``(B, 2L)``; n_layer, e_layer: ``(B, L)``.
        """
        device = next(self.parameters()).device
        e = _as_tensor(e_inc, device, torch.float64).reshape(-1)
        p = torch_preprocessor(prep, device) or prep   # torch ops on the device; numpy when there are none
        cond = _as_tensor(_prep_call(p.forward_cond, e), device, torch.float32).reshape(e.shape[0], -1)
        s = self.sample(cond)
        n_layer, e_layer = _prep_call(p.inverse_layers, s, e)
        return s, _as_tensor(n_layer, device, torch.int64), _as_tensor(e_layer, device)
