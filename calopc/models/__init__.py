r"""Generative models on point clouds, and the machinery they share (data, training, generation).

``import calopc.models`` imports no torch; a model module is imported when it is used.

Registry::

    >>> from calopc.models import available
    >>> available()
    ['calopointflow']

Every model implements the same interface (see :mod:`calopc.models.calopointflow`):

* ``Config.from_dict(d)``, ``config.preprocessing()`` (options of the data preprocessing it
  needs) and ``config.with_data(prep)`` (the sizes that depend on the data);
* ``model.loss(batch) -> Tensor``: scalar to minimise (``forward`` calls it, for DDP);
* ``model.generate(e_inc, prep) -> GeneratedShowers`` (:mod:`calopc.models.cells`): flat points
  on the model's device with their layer, radius, angle (or None) and energy in MeV; the older
  ``(counts, zar, E)`` numpy tuple is still accepted;
* optionally ``configure_optimizers(train_cfg)`` and ``training_step(batch, step, backward)``
  for models with their own training step (GANs; see :mod:`calopc.models.train`).

A trained run directory is loaded with :func:`load` (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

__all__ = ["MODELS", "available", "generate", "get_model", "load", "train"]

import importlib
import os
from typing import Any

#: model name -> (module, model class, config class); strings, so nothing heavy is imported here
MODELS: dict[str, tuple[str, str, str]] = {
    "calopointflow": ("calopc.models.calopointflow", "CaloPointFlow", "CaloPointFlowConfig"),
    "caloclouds": ("calopc.models.caloclouds", "CaloClouds", "CaloCloudsConfig"),
    "deeptree": ("calopc.models.deeptree", "DeepTree", "DeepTreeConfig"),
}

_LAZY_MODULES = {"calopointflow", "checkpoint", "cli", "data", "generate", "preprocess", "train", "utils",
                 "caloclouds", "diffusion", "distill", "deeptree", "cells", "flows"}


def available() -> list[str]:
    """Registered model names."""
    return sorted(MODELS)


def get_model(name: str) -> tuple[type, type]:
    """``(ModelClass, ConfigClass)`` of a registered model; the error lists the valid names."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in MODELS:
        msg = f"unknown model {name!r}; available: {', '.join(available())}"
        raise ValueError(msg)
    mod, cls, cfg = MODELS[key]
    m = importlib.import_module(mod)
    return getattr(m, cls), getattr(m, cfg)


def load(run_dir: str | os.PathLike, *, ema: bool = True, device: str = "cpu") -> Any:
    """Rebuild a trained model from its run directory (see :func:`calopc.models.checkpoint.load`)."""
    from .checkpoint import load as _load

    return _load(run_dir, ema=ema, device=device)


def train(*args: Any, **kw: Any) -> dict:
    """See :func:`calopc.models.train.train`."""
    from .train import train as _train

    return _train(*args, **kw)


def generate(*args: Any, **kw: Any) -> Any:
    """See :func:`calopc.models.generate.generate`."""
    from .generate import generate as _generate

    return _generate(*args, **kw)


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
