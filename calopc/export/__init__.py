r"""Trained runs as ONNX graphs: for Geant4's Par04 fast-simulation example and for other frameworks.

``calopc export RUN -o model.onnx`` (:func:`export_model`) writes a run's whole sampler (shower
model, point model, placement in cells, readout threshold) as one ONNX graph:

* :mod:`.par04`: Par04's conventions (input vector, output order, macro commands) and a harness
  that runs a graph as Par04 does (numpy and onnxruntime only);
* :mod:`.noise`: counter-based random numbers, identical in torch and in the graph;
* :mod:`.sampler`: the traceable sampler that reuses the run's modules and weights;
* :mod:`.flows`: flow inversions that export small (a fully autoregressive transform in one loop);
* :mod:`.graph`: the two targets (``par04``, ``points``) and the export itself.

Importing this package imports neither torch nor onnx.
"""

from __future__ import annotations

__all__ = ["ExportResult", "Par04Harness", "export_model"]

import importlib
from typing import Any

_LAZY = {"ExportResult": "graph", "export_model": "graph", "Par04Harness": "par04"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
