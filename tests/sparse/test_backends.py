from __future__ import annotations

import pytest
import torch

from calopc.sparse import backends
from calopc.sparse.nn import SparseConv3d, SparseConvTranspose3d, SparseMaxPool3d, SubMConv3d


def test_default_and_env(monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    assert backends.resolve_backend() == "torch"
    monkeypatch.setenv(backends.ENV, "torch")
    assert SubMConv3d(1, 1).backend == "torch"
    monkeypatch.setenv(backends.ENV, "auto")
    assert backends.resolve_backend() == "torch"
    assert backends.resolve_backend("TORCH") == "torch"


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV, "spconv")
    with pytest.raises(ValueError, match=r"CALOPC_SPARSE_BACKEND='spconv' is not a sparse backend; choose one of auto"):
        SubMConv3d(1, 1)
    with pytest.raises(ValueError, match=r"backend='cuda' is not a sparse backend"):
        backends.resolve_backend("cuda")


def test_minkowski_requested_but_missing(monkeypatch):
    monkeypatch.setattr(backends, "minkowski_available", lambda: False)
    monkeypatch.setenv(backends.ENV, "minkowski")
    msg = r"CALOPC_SPARSE_BACKEND=minkowski but MinkowskiEngine is not installed.*make minkowski"
    with pytest.raises(ValueError, match=msg):
        SubMConv3d(1, 1)
    with pytest.raises(ValueError, match=r"backend=minkowski but MinkowskiEngine is not installed"):
        SparseConv3d(1, 1, backend="minkowski")


def test_minkowski_padding_limits(sparse_factory):
    pytest.importorskip("MinkowskiEngine")
    conv = SparseConv3d(2, 1, 3, 2, padding=0, backend="minkowski")
    with pytest.raises(ValueError, match=r"minkowski backend supports padding k // 2 for odd and 0 for even kernels"):
        conv(sparse_factory(channels=2))


@pytest.mark.parametrize("layer", ["subm", "down", "up", "pool"])
def test_minkowski_matches_torch_with_gradients(sparse_factory, layer):
    pytest.importorskip("MinkowskiEngine")
    assert backends.minkowski_available()
    x = sparse_factory(shape=(9, 10, 6), batch=3, channels=4, seed=11)
    outs, grads = [], []
    for b in ("torch", "minkowski"):
        torch.manual_seed(0)
        feats = x.feats.clone().requires_grad_(True)
        xi = x.replace(feats)
        if layer == "subm":
            m = SubMConv3d(4, 5, 3, backend=b)
            y = m(xi)
        elif layer == "down":
            m = SparseConv3d(4, 5, 3, 2, backend=b)
            y = m(xi)
        elif layer == "up":
            down = SparseConv3d(4, 4, 2, 2, backend="torch")
            m = SparseConvTranspose3d(4, 5, 2, 2, backend=b)
            y = m(down(xi), target=xi)
        else:
            m = SparseMaxPool3d(3, 2, 1, backend=b)
            y = m(xi.replace(xi.feats.abs()))
        w = torch.randn_like(y.feats)
        (y.feats * w).sum().backward()
        outs.append(y.feats.detach())
        grads.append([feats.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "minkowski"])
def test_empty_batch(backend):
    if backend == "minkowski":
        pytest.importorskip("MinkowskiEngine")
    import numpy as np

    from calopc import Geometry
    from calopc.sparse import SparseShowers

    g = Geometry.calochallenge("2")
    x = SparseShowers.from_voxels(np.zeros((2, g.n_voxels), np.float32), g)
    assert len(x) == 0 and x.batch_size == 2
    assert SubMConv3d(1, 3, backend=backend)(x).feats.shape == (0, 3)
    y = SparseConv3d(1, 3, 3, 2, backend=backend)(x)
    assert y.feats.shape == (0, 3)
    assert SparseConvTranspose3d(3, 2, 3, 2, backend=backend)(y, target=x).feats.shape == (0, 2)
    assert SparseMaxPool3d(3, 2, 1, backend=backend)(x).feats.shape == (0, 1)
