r"""Optional dependencies, imported on first use with an error that says how to install them."""

from __future__ import annotations

__all__ = ["mplhep", "plotly_io", "pooch", "sklearn", "torch"]

import importlib
from types import ModuleType


def _need(module: str, extra: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        msg = f"{what} needs {module.split('.')[0]}: pip install 'calopc[{extra}]'"
        raise ModuleNotFoundError(msg) from err


def mplhep() -> ModuleType:
    _need("matplotlib", "eval", "plotting")
    return _need("mplhep", "eval", "plotting")


def plotly_io() -> ModuleType:
    """``plotly.io`` (the ``display`` extra: 3-D shower displays)."""
    return _need("plotly.io", "display", "the 3-D shower display")


def pooch() -> ModuleType:
    """pooch (the ``download`` extra: ``calopc download``)."""
    return _need("pooch", "download", "calopc download")


def sklearn() -> ModuleType:
    return _need("sklearn", "eval", "the classifier metrics")


def torch() -> ModuleType:
    msg_extra = "torch"
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as err:
        msg = f"this needs torch: install it first (CPU: pip install torch==2.13.0), then pip install 'calopc[{msg_extra}]'"
        raise ModuleNotFoundError(msg) from err
