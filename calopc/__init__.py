r"""calopc: calorimeter showers as point clouds and sparse data.

Light at import: the standard library only (numpy on first use of the geometry). Subpackages (``calopc.converters``, ``calopc.eval``,
``calopc.models``) load on first use; torch is imported only when a model is used.
``calopc.open_points_lazy(path_or_glob)``: the point clouds of one or several Parquet files as a lazy
dask-awkward array (the ``dask`` extra); ``calopc.converters.open_points`` reads them eagerly.
"""

from __future__ import annotations

__all__ = ["DATASETS", "Geometry", "__version__", "converters", "eval", "load_geometry", "models", "open_points_lazy"]

import importlib
import warnings

from ._version import __version__

_LAZY = {"converters", "eval", "models", "synth", "io"}
#: attributes imported on first use (``calopc --help`` needs no numpy)
_LAZY_ATTRS = {"DATASETS": "geometry", "Geometry": "geometry", "load_geometry": "geometry"}


def __getattr__(name: str):
    if name == "open_points_lazy":  # lazy dask-awkward reader of point-cloud files, folders and globs
        from .converters.dataset import open_points_lazy

        return open_points_lazy
    if name == "open_points":  # the lazy reader's former name; calopc.converters.open_points is the eager one
        warnings.warn("calopc.open_points is renamed calopc.open_points_lazy (a lazy dask-awkward array); "
                      "calopc.converters.open_points opens files eagerly", DeprecationWarning, stacklevel=2)
        from .converters.dataset import open_points_lazy

        return open_points_lazy
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_ATTRS[name]}"), name)
    msg = f"module 'calopc' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
