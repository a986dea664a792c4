r"""The torch twin of :class:`~calopc.models.preprocess.numpy.Preprocessor`: :class:`TorchPreprocessor`.

It builds training batches on the device (:class:`calopc.models.data.DeviceCollate`) and inverts
the variant II features in generation without host synchronisation. Every transform computes in
float64; on the same inputs and noise the model features equal the NumPy methods' to the bit and the
inverses agree to a few units in the last place (``tests/models/test_preprocess_parity.py``).
Importing this module does not import torch.
"""

from __future__ import annotations

__all__ = ["TorchPreprocessor"]

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ._constants import _DELTA, _EPS, _U_EPS

if TYPE_CHECKING:
    import torch

    from .numpy import Preprocessor


def _cdf_forward_t(t: dict, v: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`_cdf_forward` (tables as tensors on ``v``'s device)."""
    import torch

    key = v.to(torch.float64) + layer * t["span"]
    k = (torch.searchsorted(t["E"], key, right=True) - 1 - t["start"][layer]).clamp(min=0)
    k = torch.minimum(k, t["nb"][layer] - 1)
    i = t["start"][layer] + k
    frac = ((key - t["E"][i]) / (t["E"][i + 1] - t["E"][i])).clamp(0.0, 1.0)
    u = t["C"][i] - 2.0 * layer + (t["C"][i + 1] - t["C"][i]) * frac
    return torch.special.ndtri(u.clamp(_U_EPS, 1 - _U_EPS))


def _cdf_inverse_t(t: dict, y: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`_cdf_inverse`."""
    import torch

    key = torch.special.ndtr(y.to(torch.float64)) + 2.0 * layer
    k = (torch.searchsorted(t["C"], key, right=True) - 1 - t["start"][layer]).clamp(min=0)
    k = torch.minimum(k, t["nb"][layer] - 1)
    i = t["start"][layer] + k
    frac = ((key - t["C"][i]) / (t["C"][i + 1] - t["C"][i]).clamp(min=1e-300)).clamp(0.0, 1.0)
    return t["E"][i] - layer * t["span"] + frac * (t["E"][i + 1] - t["E"][i])


class TorchPreprocessor:
    """The forward path of a :class:`Preprocessor` as torch operations on a device.

    Numerically equal to the numpy methods (computed in float64, features returned as
    float32) when given the same uniform noise; used to build training batches on the
    device (:class:`calopc.models.data.DeviceCollate`). Built by :meth:`Preprocessor.to_torch`.

    Args:
        prep: the fitted preprocessing.
        device: where the tables live and the work happens.
    """

    def __init__(self, prep: Preprocessor, device: torch.device | str) -> None:
        import torch

        self.prep = prep
        self.variant = prep.variant
        self.device = dev = torch.device(device)
        g = prep.geometry
        b = g.cell_bounds()
        f64 = torch.float64
        self.bounds = torch.as_tensor(np.stack([b["z_lo"], b["alpha_lo"], b["r_lo"]], 1), dtype=f64, device=dev)
        self.width = torch.as_tensor(np.stack([b["z_hi"] - b["z_lo"], b["alpha_hi"] - b["alpha_lo"],
                                               b["r_hi"] - b["r_lo"]], 1), dtype=f64, device=dev)
        self.cell_layer = torch.as_tensor(np.asarray(g.cell_layer, dtype=np.int64), device=dev)
        self.point_mean = torch.as_tensor(prep.point_mean, dtype=f64, device=dev)
        self.point_std = torch.as_tensor(prep.point_std, dtype=f64, device=dev)
        self.shower_mean = torch.as_tensor(prep.shower_mean, dtype=f64, device=dev)
        self.shower_std = torch.as_tensor(prep.shower_std, dtype=f64, device=dev)
        lo = [e[0] for e in g.r_edges]
        hi = [e[-1] for e in g.r_edges]
        self.layer_r0 = torch.as_tensor(lo, dtype=f64, device=dev)
        self.layer_r1 = torch.as_tensor(hi, dtype=f64, device=dev)
        self.ranges = prep._ranges
        self.n_layers = g.n_layers
        self.cap = torch.as_tensor(g.voxels_per_layer, dtype=torch.int64, device=dev)
        self.empty_floor = prep.empty_energy == "floor" or prep.variant != "II"
        if not self.empty_floor:
            mu, sd = prep._empty_stats()
            self.empty_mean = torch.as_tensor(mu, dtype=f64, device=dev)
            self.empty_std = torch.as_tensor(sd, dtype=f64, device=dev)
        self.cdf = None
        if prep.dequantisation == "cdf":  # the CDF search tables of α and r on the device
            self.cdf = tuple({k: torch.as_tensor(v, device=dev) for k, v in t.items()} for t in prep._cdf())
            if prep.variant == "I":
                self.cdf_z = {k: torch.as_tensor(v, device=dev) for k, v in prep._cdf_z().items()}

    @staticmethod
    def _logit(u: torch.Tensor) -> torch.Tensor:
        import torch

        u = u.clamp(_EPS, 1 - _EPS)
        return torch.log(u) - torch.log1p(-u)

    def dequantise(self, cell: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(z, alpha, r)`` inside each point's cell. Shapes: cell ``(P,)`` int64, u ``(P, 3)`` in [0, 1) → ``(P, 3)``."""
        import torch

        u = 1e-4 + (1 - 2e-4) * u.to(torch.float64)
        return self.bounds[cell] + u * self.width[cell]

    def forward_points(self, zar: torch.Tensor, energy: torch.Tensor, e_inc: torch.Tensor,
                       e_sum: torch.Tensor | None = None) -> torch.Tensor:
        """Variant I point features, see :meth:`Preprocessor.forward_points`. Returns ``(P, 4)`` float32."""
        import torch

        z0, z1, r0, r1 = self.ranges
        ref = e_inc if self.prep.energy_ref == "inc" else e_sum
        if ref is None:
            msg = "preprocessing energy_ref='sum' needs the shower energies (e_sum) of the points"
            raise ValueError(msg)
        e_part = torch.log(energy.to(torch.float64).clamp(min=1e-30)) - torch.log(ref.to(torch.float64).clamp(min=1e-30))
        if self.cdf is not None:
            layer = torch.floor(zar[:, 0] + 0.5).clamp(0, self.n_layers - 1).to(torch.int64)
            y = torch.stack([_cdf_forward_t(self.cdf_z, zar[:, 0], torch.zeros_like(layer)),
                             _cdf_forward_t(self.cdf[0], zar[:, 1], layer),
                             _cdf_forward_t(self.cdf[1], zar[:, 2], layer), e_part], 1)
        else:
            y = torch.stack([self._logit((zar[:, 0] - z0) / (z1 - z0)),
                             self._logit((zar[:, 1] + math.pi) / (2 * math.pi)),
                             self._logit((zar[:, 2] - r0) / (r1 - r0)), e_part], 1)
        return ((y - self.point_mean) / self.point_std).to(torch.float32)

    def forward_points_layer(self, zar: torch.Tensor, energy: torch.Tensor, e_layer: torch.Tensor,
                             layer: torch.Tensor) -> torch.Tensor:
        """Variant II point features, see :meth:`Preprocessor.forward_points_layer`. Returns ``(P, 3)`` float32."""
        import torch

        r0, r1 = self.layer_r0[layer], self.layer_r1[layer]
        if self.cdf is not None:
            ya, yr = _cdf_forward_t(self.cdf[0], zar[:, 1], layer), _cdf_forward_t(self.cdf[1], zar[:, 2], layer)
        else:
            ya, yr = self._logit((zar[:, 1] + math.pi) / (2 * math.pi)), self._logit((zar[:, 2] - r0) / (r1 - r0))
        y = torch.stack([ya, yr,
                         torch.log(energy.to(torch.float64).clamp(min=1e-30))
                         - torch.log(e_layer.to(torch.float64).clamp(min=1e-30))], 1)
        return ((y - self.point_mean) / self.point_std).to(torch.float32)

    def forward_shower(self, n: torch.Tensor, e_sum: torch.Tensor, e_inc: torch.Tensor) -> torch.Tensor:
        """Variant I shower features ``(B, 2)`` float32, see :meth:`Preprocessor.forward_shower`."""
        import torch

        e_inc = e_inc.to(torch.float64)
        s = torch.stack([torch.log(n.to(torch.float64).clamp(min=1)) - 0.5 * torch.log(e_inc),
                         torch.log(e_sum.to(torch.float64).clamp(min=1e-30)) - torch.log(e_inc)], -1)
        return ((s - self.shower_mean) / self.shower_std).to(torch.float32)

    def forward_layers(self, n_layer: torch.Tensor, e_layer: torch.Tensor, e_inc: torch.Tensor,
                       u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """Variant II shower features ``(B, 2L)`` float32, see :meth:`Preprocessor.forward_layers`.

        ``u``, ``v``: ``(B, L)`` uniform noise in [0, 1) (None: the mid-point).
        """
        import torch

        n_layer = n_layer.to(torch.float64)
        frac = e_layer.to(torch.float64) / e_inc.to(torch.float64)[:, None]
        if u is None or v is None:
            u = v = torch.full_like(n_layer, 0.5)
        else:
            u = 1e-3 + (1 - 2e-3) * u.to(torch.float64)
            v = 1e-3 + (1 - 2e-3) * v.to(torch.float64)
        if self.empty_floor:
            le = torch.log(frac + _DELTA * v)
        else:
            le = torch.where(n_layer > 0, torch.log(frac.clamp(min=1e-30)),
                             self.empty_mean + self.empty_std * torch.special.ndtri(v))
        s = torch.cat([torch.log(n_layer + u), le], 1)
        return ((s - self.shower_mean) / self.shower_std).to(torch.float32)

    def inverse_points_layer(self, y: torch.Tensor, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Variant II features → ``((z, α, r) (P, 3) float64, w = E / E_l (P,))``, see
        :meth:`Preprocessor.inverse_points_layer`."""
        import torch

        y = y.to(torch.float64) * self.point_std + self.point_mean
        if self.cdf is not None:
            alpha, r = _cdf_inverse_t(self.cdf[0], y[:, 0], layer), _cdf_inverse_t(self.cdf[1], y[:, 1], layer)
        else:
            r0, r1 = self.layer_r0[layer], self.layer_r1[layer]
            alpha = torch.sigmoid(y[:, 0]) * 2 * math.pi - math.pi
            r = r0 + torch.sigmoid(y[:, 1]) * (r1 - r0)
        zar = torch.stack([layer.to(torch.float64), alpha, r], 1)
        return zar, torch.exp(y[:, 2].clamp(-80, 80))

    def inverse_layers(self, s: torch.Tensor, e_inc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised variant II shower features → ``(n_l (B, L) int64, E_l (B, L) MeV)``, see
        :meth:`Preprocessor.inverse_layers` (no host synchronisation)."""
        import torch

        n_l = self.n_layers
        s = s.to(torch.float64) * self.shower_std + self.shower_mean
        n = torch.floor(torch.exp(s[:, :n_l].clamp(-30, 30))).to(torch.int64)
        n = torch.minimum(n.clamp(min=0), self.cap)
        if self.empty_floor:
            frac = (torch.exp(s[:, n_l:].clamp(-80, 0)) - 0.5 * _DELTA).clamp(0.01 * _DELTA, 1.0)
        else:
            frac = torch.exp(s[:, n_l:].clamp(-80, 0))
        e = frac * e_inc.to(torch.float64)[:, None]
        empty = (n.sum(1) == 0).to(torch.int64)
        n = n.scatter_add(1, e.argmax(1, keepdim=True), empty[:, None])   # one point where a shower has none
        return n, torch.where(n > 0, e, torch.zeros_like(e))

    def forward_cond(self, e_inc: torch.Tensor) -> torch.Tensor:
        """Standardised ``log E_inc``, ``(B, 1)`` float32."""
        import torch

        return ((torch.log(e_inc.to(torch.float64)) - self.prep.cond_mean) / self.prep.cond_std).to(torch.float32)[:, None]

    def encode(self, cell: torch.Tensor, energy: torch.Tensor, shower_of: torch.Tensor, e_inc: torch.Tensor,
               rand: Callable[[tuple[int, ...]], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
        """The model inputs of flat training points, in the order of :class:`calopc.models.data.ShowerCollate`.

        Args:
            cell, energy: ``(P,)`` flat points; shower_of: ``(P,)`` shower of each point (sorted).
            e_inc: ``(B,)`` MeV.
            rand: ``rand(shape)`` → uniform float64 noise on the device (called for the
                dequantisation ``(P, 3)``, then, variant II, ``(B, L)`` twice).

        Returns:
            ``(y (P, F), shower (B, S), cond (B, 1), layer (P,))``.
        """
        import torch

        b = e_inc.shape[0]
        zar = self.dequantise(cell, rand((cell.shape[0], 3)))
        layer = self.cell_layer[cell]
        energy = energy.to(torch.float64)
        if self.variant == "I":
            e_sum = torch.zeros(b, dtype=torch.float64, device=energy.device).index_add_(0, shower_of, energy)
            y = self.forward_points(zar, energy, e_inc[shower_of], e_sum[shower_of])
            n = torch.zeros(b, dtype=torch.int64, device=energy.device).index_add_(0, shower_of, torch.ones_like(shower_of))
            s = self.forward_shower(n, e_sum, e_inc)
        else:
            n_l = self.n_layers
            key = shower_of * n_l + layer
            # index_add_, not bincount: bincount reads the largest index back to the host on CUDA
            n_layer = torch.zeros(b * n_l, dtype=torch.int64, device=energy.device).index_add_(
                0, key, torch.ones_like(key)).reshape(b, n_l)
            e_layer = torch.zeros(b * n_l, dtype=torch.float64, device=energy.device).index_add_(0, key, energy)
            y = self.forward_points_layer(zar, energy, e_layer[key], layer)
            u = rand((b, n_l))
            v = rand((b, n_l))
            s = self.forward_layers(n_layer, e_layer.reshape(b, n_l), e_inc, u, v)
        return y, s, self.forward_cond(e_inc), layer
