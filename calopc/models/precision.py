r"""Matmul precision for calopc's own training and generation on CUDA, scoped (not global).

:func:`fast_matmul` lets float32 matrix products and convolutions use TensorFloat-32 on CUDA
inside a ``with`` block and restores the previous settings on exit, so a program that imports
calopc keeps its own precision. On other devices it changes nothing. :func:`autocast` is bf16
autocast on CUDA (``--amp``), nothing elsewhere.

Example:
    >>> import torch
    >>> with fast_matmul(torch.device("cpu")):
    ...     pass
"""

from __future__ import annotations

__all__ = ["autocast", "fast_matmul"]

import contextlib
from collections.abc import Iterator

import torch


def _knobs() -> list[tuple[object, str, object]]:
    """``(object, attribute, TF32 value)`` of the precision settings this torch has (new API first)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        out = [(m, "fp32_precision", "tf32")]
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            out.append((conv, "fp32_precision", "tf32"))
        return out
    return [(m, "allow_tf32", True), (torch.backends.cudnn, "allow_tf32", True)]


@contextlib.contextmanager
def fast_matmul(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA inside the block (previous settings restored after)."""
    if torch.device(device).type != "cuda" or not enabled:
        yield
        return
    knobs = _knobs()
    before = [getattr(o, a) for o, a, _ in knobs]
    try:
        for o, a, v in knobs:
            setattr(o, a, v)
        yield
    finally:
        for (o, a, _), b in zip(knobs, before):
            setattr(o, a, b)


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``; a no-op otherwise."""
    dev = torch.device(device)
    if enabled and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
