from __future__ import annotations

import numpy as np
import pytest
import torch

from calopc.sparse import SparseShowers


def random_sparse(shape=(6, 8, 5), batch=3, channels=2, occupancy=0.25, seed=0, dtype=torch.float32,
                  seam=True) -> SparseShowers:
    """Random occupied cells (plus cells on both sides of the α seam) with random features."""
    rng = np.random.default_rng(seed)
    occ = rng.random((batch, *shape)) < occupancy
    if seam:
        occ[:, :, 0, :] |= rng.random((batch, shape[0], shape[2])) < 0.5
        occ[:, :, -1, :] |= rng.random((batch, shape[0], shape[2])) < 0.5
    vals = rng.normal(size=(batch, channels, *shape)) * occ[:, None]
    vals[:, 0][occ] = np.where(vals[:, 0][occ] == 0, 1.0, vals[:, 0][occ])
    return SparseShowers.from_dense(torch.as_tensor(vals, dtype=dtype))


@pytest.fixture
def sparse_factory():
    return random_sparse


@pytest.fixture(params=["loop", "batched", "grouped", "gather"])
def execution(request, monkeypatch):
    """Run a test with both schedules of the torch backend's gather–GEMM–scatter."""
    from calopc.sparse import functional

    monkeypatch.setattr(functional, "EXECUTION", request.param)
    monkeypatch.setattr(functional, "CHUNK_ELEMS", 4096 if request.param == "batched" else functional.CHUNK_ELEMS)
    return request.param


def pytest_collection_modifyitems(items):  # keep torch single-threaded in this directory
    torch.set_num_threads(1)
