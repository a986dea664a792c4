r"""Deprecated alias of :mod:`calopc.cli.eval`, where the ``evaluate`` and ``compare`` command line lives now.

``import calopc.eval.cli`` gives that module itself (with a :class:`DeprecationWarning`), so code that
patches its functions keeps working.
"""

from __future__ import annotations

import sys
import warnings

import calopc.cli.eval as _eval

warnings.warn("calopc.eval.cli moved to calopc.cli.eval", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _eval
