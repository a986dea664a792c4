r"""Padded batches and small torch helpers shared by every model: padding, devices, seeding, EMA."""

from __future__ import annotations

__all__ = ["EMA", "pad", "resolve_device", "seed_everything", "unpad"]

import copy
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"device {device!r} requested but torch sees no CUDA device (torch {torch.__version__}); use --device cpu"
        raise ValueError(msg)
    if device != "cpu" and not device.startswith("cuda"):
        msg = f"device must be auto, cpu or cuda[:N], got {device!r}"
        raise ValueError(msg)
    return torch.device(device)


def pad(points: Sequence[np.ndarray] | Sequence[torch.Tensor], *, max_points: int | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged ``(n_i, F)`` (or ``(n_i,)``) arrays into a padded batch (like PyG's ``to_dense_batch``).

    Args:
        points: ``B`` arrays or tensors of shape ``(n_i, F)``, or all of shape ``(n_i,)``.
        max_points: truncate to this many points. Defaults to the longest set.
        dtype, device: of the output. Default: those of the first tensor (float32 for arrays).

    Returns:
        ``(x, mask)``: zeros where padded; ``mask`` is True on real points.

    Shapes:
        x: ``(B, N_max, F)`` (``(B, N_max)`` for 1-d sets); mask: ``(B, N_max)``.

    Example:
        >>> import torch
        >>> x, m = pad([torch.ones(2, 3), torch.ones(0, 3)])
        >>> tuple(x.shape), m.sum(1).tolist()
        ((2, 2, 3), [2, 0])
    """
    if len(points) == 0:
        msg = "pad needs at least one point set"
        raise ValueError(msg)
    ts = [p if isinstance(p, torch.Tensor) else torch.as_tensor(np.asarray(p), dtype=dtype or torch.float32)
          for p in points]
    dtype = dtype or ts[0].dtype
    device = device or ts[0].device
    n_max = max(t.shape[0] for t in ts)
    if max_points is not None:
        n_max = min(n_max, max_points)
    x = torch.zeros(len(ts), n_max, *ts[0].shape[1:], dtype=dtype, device=device)
    lengths = torch.tensor([min(t.shape[0], n_max) for t in ts], device=device)
    mask = torch.arange(n_max, device=device)[None, :] < lengths[:, None]
    if n_max:
        x[mask] = torch.cat([t[:n_max] for t in ts]).to(dtype=dtype, device=device)
    return x, mask


def unpad(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pad`: the real points of each shower. Shapes: ``x (B, N, F)``, ``mask (B, N)``."""
    return [x[i, mask[i]] for i in range(x.shape[0])]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's legacy global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    Args:
        model: the module to track (the unwrapped one, not a DDP wrapper).
        decay: weight of the old average per update. Defaults to 0.999.
        warmup: the decay of early updates (when ``update`` is given the step): ``"linear"``
            ``min(decay, (1 + step) / (10 + step))``; ``"power"`` (CaloClouds II, k-diffusion's
            EMA warm-up with power 2/3) ``min(decay, 1 − (1 + step)^(−2/3))``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: str = "linear") -> None:
        if warmup not in ("linear", "power"):
            msg = f"EMA warmup must be 'linear' or 'power', got {warmup!r}"
            raise ValueError(msg)
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The warm-up decay of update ``step`` (before the cap at ``decay``)."""
        if self.warmup == "power":
            return 1.0 - (1.0 + step) ** (-2.0 / 3.0)
        return (1 + step) / (10 + step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        d = self.decay if step is None else min(self.decay, self.decay_at(step))
        ema_p = [e for e in self.module.parameters()]
        if ema_p:  # one multi-tensor op instead of one per parameter
            torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)  # noqa: SLF001
        ema_b = [e for e in self.module.buffers()]
        if ema_b:
            torch._foreach_copy_(ema_b, list(model.buffers()))  # noqa: SLF001
