"""DeepTree building blocks shared by the generator and the critics: spectral normalisation with one power
iteration per weight update, fully connected networks, the number of leaves of a tree."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm


def _leaves(branches: tuple[int, ...]) -> int:
    return int(math.prod(branches))


class _OncePerUpdateSpectralNorm(_SpectralNorm):
    """torch's spectral normalisation with one power iteration per weight update instead of one per forward
    pass in train mode: the first forward after :func:`_sn_weights_changed` iterates, the others reuse
    ``u, v``. The critic runs 4 passes per training step but is updated once (same state-dict keys as
    :func:`torch.nn.utils.parametrizations.spectral_norm`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.pending = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training and self.pending:
            self._power_method(weight_mat, self.n_power_iterations)
            self.pending = False
        # u, v change in place only in the first forward after an update, before any graph of that update
        # is built, so unlike torch's version no clone is needed (a misuse fails loudly in backward)
        return weight / torch.vdot(self._u, torch.mv(weight_mat, self._v))


def spectral_norm(module: nn.Linear) -> nn.Linear:
    """``module.weight`` spectral-normalised, with power iterations once per weight update."""
    parametrize.register_parametrization(module, "weight", _OncePerUpdateSpectralNorm(module.weight))
    return module


def _sn_weights_changed(module: nn.Module) -> None:
    """Mark every spectral norm inside ``module``: its next train-mode forward runs a power iteration."""
    for m in module.modules():
        if isinstance(m, _OncePerUpdateSpectralNorm):
            m.pending = True


def _mlp(sizes: list[int], *, act: Callable[[], nn.Module] = lambda: nn.LeakyReLU(0.2), sn: bool = False,
         dropout: float = 0.0) -> nn.Sequential:
    """Fully connected network; ``sn``: spectral-normalised linear layers."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        mods.append(spectral_norm(lin) if sn else lin)
        if i < len(sizes) - 2:
            mods.append(act())
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
    return nn.Sequential(*mods)


def _linear(a: int, b: int, *, sn: bool, bias: bool = True) -> nn.Module:
    lin = nn.Linear(a, b, bias=bias)
    return spectral_norm(lin) if sn else lin
