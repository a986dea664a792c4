r"""Deprecated: the ``train``, ``generate`` and ``distill`` commands live in :mod:`calopc.cli.models`.

Importing this module warns (:class:`DeprecationWarning`) and re-exports that module's names.
"""

from __future__ import annotations

import warnings

from ..cli.models import _TRAIN_DEFAULTS, _TRAIN_FLAGS, register, resolve_train_args

__all__ = ["_TRAIN_DEFAULTS", "_TRAIN_FLAGS", "register", "resolve_train_args"]

warnings.warn("calopc.models.cli moved to calopc.cli.models", DeprecationWarning, stacklevel=2)
