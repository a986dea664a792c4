r"""Precision, recall, density and coverage (Naeem et al., arXiv:2002.09797) computed in blocks.

Definitions as in the ``prdc`` package used by the CaloChallenge evaluation, with ``r_k(x)`` the
distance from ``x`` to its k-th nearest neighbour in its own sample (the point itself not counted)
and ``d`` the Euclidean distance:

* precision: fraction of generated points ``y`` with ``d(x, y) < r_k(x)`` for some real ``x``;
* recall: fraction of real points ``x`` with ``d(x, y) < r_k(y)`` for some generated ``y``;
* density: ``1/(k M) Σ_y #{x : d(x, y) < r_k(x)}``;
* coverage: fraction of real points ``x`` whose nearest generated point is closer than ``r_k(x)``.

The official CaloChallenge mode uses ``k = 5`` on ``log10`` of the voxel energies, with empty
voxels set to 0.1 MeV first (:func:`prdc_features`). The pairwise distances are never stored: real
and generated points are processed in tiles of ``block × block`` (torch, on the GPU when there is
one), so 100k × 100k fits in memory; three passes over N² pairs (real–real, generated–generated,
real–generated).
"""

from __future__ import annotations

__all__ = ["PRDCResult", "prdc", "prdc_direct", "prdc_features"]

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PRDCResult:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    n_real: int
    n_fake: int

    def as_dict(self) -> dict:
        return asdict(self)


def prdc_features(showers: np.ndarray, *, zero: float = 0.1, dtype: type = np.float32) -> np.ndarray:
    """``log10`` of the voxel energies with empty voxels set to ``zero`` MeV first (the official PRDC input).

    Shapes:
        showers: ``(N, n_voxels)`` thresholded voxels in MeV; returns the same shape.
    """
    x = np.asarray(showers, dtype=dtype)
    return np.log10(np.where(x > 0, x, dtype(zero)))


def _sq_dist(a, b, a2, b2):
    """Squared Euclidean distances between the rows of a ``(B, d)`` and b ``(C, d)``, clipped at 0."""
    return (a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _kth_radius2(x, k: int, block: int, progress):
    """Squared distance of every row of ``x`` to its k-th nearest other row (self counted as the first)."""
    import torch

    n = x.shape[0]
    x2 = (x * x).sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    kk = min(k + 1, n)
    for i in range(0, n, block):
        a = x[i:i + block]
        best = None
        for j in range(0, n, block):
            d = _sq_dist(a, x[j:j + block], x2[i:i + block], x2[j:j + block])
            cand = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(cand, min(kk, cand.shape[1]), dim=1, largest=False).values
        out[i:i + block] = best.max(1).values
        progress(1)
    return out


def prdc(real: np.ndarray, fake: np.ndarray, *, k: int = 5, block: int = 4096, device: str = "auto",
         dtype: str | None = None, progress: bool = False) -> PRDCResult:
    """Precision, recall, density and coverage of ``fake`` against ``real``, tile by tile.

    Args:
        real, fake: feature matrices ``(N, d)``, ``(M, d)`` (e.g. :func:`prdc_features`).
        k: nearest neighbours (official: 5).
        block: rows per tile; memory is about ``block² × 8`` bytes per tile plus the two samples.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        dtype: ``"float64"`` or ``"float32"``; default float64 on the CPU (exactly the direct
            computation) and float32 on a GPU (after centring on the real mean, which keeps the
            distance error near float32 precision of the distances themselves).
    """
    import torch
    from tqdm.auto import tqdm

    real = np.asarray(real)
    fake = np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        msg = f"PRDC: real and fake must be (N, d) with the same d, got {real.shape} and {fake.shape}"
        raise ValueError(msg)
    if len(real) <= k or len(fake) <= k:
        msg = f"PRDC with k={k} needs more than {k} showers per sample, got {len(real)} real and {len(fake)} generated"
        raise ValueError(msg)
    if block < 1:
        msg = f"PRDC block must be >= 1, got {block}"
        raise ValueError(msg)
    from .classifier import _resolve_device

    dev = _resolve_device(device)
    tdt = getattr(torch, dtype) if dtype else (torch.float64 if dev.type == "cpu" else torch.float32)
    centre = torch.as_tensor(real.mean(0, dtype=np.float64), device=dev).to(tdt)
    xr = torch.as_tensor(real, device=dev).to(tdt) - centre
    xf = torch.as_tensor(fake, device=dev).to(tdt) - centre
    nr, nf = len(real), len(fake)
    nb = lambda n: (n + block - 1) // block  # noqa: E731
    with torch.no_grad(), tqdm(total=nb(nr) * 2 + nb(nf), desc="PRDC", disable=None if progress else True,
                               leave=False) as bar:
        rr = _kth_radius2(xr, k, block, bar.update)
        rf = _kth_radius2(xf, k, block, bar.update)
        r2, f2 = (xr * xr).sum(1), (xf * xf).sum(1)
        density_count = torch.zeros(nf, dtype=torch.float64, device=dev)
        in_real = torch.zeros(nf, dtype=torch.bool, device=dev)
        recalled = torch.zeros(nr, dtype=torch.bool, device=dev)
        covered = torch.zeros(nr, dtype=torch.bool, device=dev)
        for i in range(0, nr, block):
            a, a2, ra = xr[i:i + block], r2[i:i + block], rr[i:i + block]
            for j in range(0, nf, block):
                d = _sq_dist(a, xf[j:j + block], a2, f2[j:j + block])
                inside = d < ra[:, None]  # fake j inside the k-NN ball of real i
                density_count[j:j + block] += inside.sum(0, dtype=torch.float64)
                in_real[j:j + block] |= inside.any(0)
                covered[i:i + block] |= inside.any(1)
                recalled[i:i + block] |= (d < rf[None, j:j + block]).any(1)
            bar.update(1)
    return PRDCResult(
        precision=float(in_real.double().mean()),
        recall=float(recalled.double().mean()),
        density=(1.0 / k) * float(density_count.sum() / nf),
        coverage=float(covered.double().mean()),
        k=k, n_real=nr, n_fake=nf,
    )


def prdc_direct(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> PRDCResult:
    """The same metrics from full distance matrices (explicit differences, O(N²) memory; a reference for small samples)."""
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # row by row: O(N·M) memory, not O(N·M·d)
        return np.stack([np.sqrt(((row - b) ** 2).sum(1)) for row in a])

    def kth(a: np.ndarray) -> np.ndarray:
        return np.sort(dist(a, a), axis=1)[:, k]  # index 0 is the point itself

    r_real, r_fake = kth(real), kth(fake)
    d = dist(real, fake)
    inside = d < r_real[:, None]
    return PRDCResult(
        precision=float(inside.any(0).mean()),
        recall=float((d < r_fake[None, :]).any(1).mean()),
        density=(1.0 / k) * float(inside.sum(0).mean()),
        coverage=float((d.min(1) < r_real).mean()),
        k=k, n_real=len(real), n_fake=len(fake),
    )
