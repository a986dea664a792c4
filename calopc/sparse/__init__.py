r"""Sparse shower tensors and sparse convolutions (pure torch, or MinkowskiEngine when asked for).

* :class:`SparseShowers`: occupied cells ``(shower, layer, α, r)`` + features, exact to/from
  dense tensors, flat voxels and point-cloud events (regular geometries: datasets 2 and 3).
* :mod:`calopc.sparse.nn`: submanifold / strided / transposed convolution, pooling, batch norm,
  global pooling, α periodic; equal to dense ``conv3d`` with circular α padding.
* Backends: ``CALOPC_SPARSE_BACKEND=torch|minkowski|auto`` (``auto`` = torch; see
  :mod:`calopc.sparse.backends`).

Example:
    >>> import numpy as np, torch
    >>> from calopc import Geometry
    >>> from calopc.sparse import SparseShowers
    >>> from calopc.sparse.nn import SubMConv3d
    >>> g = Geometry.calochallenge("2")
    >>> v = np.zeros((2, g.n_voxels)); v[0, [0, 17, 300]] = [1.0, 2.0, 3.0]; v[1, 5] = 4.0
    >>> x = SparseShowers.from_voxels(v, g)
    >>> len(x), x.shape
    (4, (45, 16, 9))
    >>> bool((x.to_voxels() == v).all())
    True
    >>> y = SubMConv3d(1, 8).double()(x)
    >>> tuple(y.feats.shape)
    (4, 8)
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "ENV",
    "SparseShowers",
    "get_backend",
    "minkowski_available",
    "require_regular",
    "resolve_backend",
]

from .backends import BACKENDS, ENV, get_backend, minkowski_available, resolve_backend
from .tensor import SparseShowers, require_regular
