r"""Counter-based random numbers from a few latent entries: the same numbers in torch and in an ONNX graph.

An exported sampler takes all its randomness from its input. The per-shower noise of fixed size
(the shower model's base draw, CaloPointFlow's shower latent) is read from the latent vector
directly; the noise whose size depends on the shower (one draw per point, per cell for the α
placement) is computed from *keys*: :data:`N_KEYS` entries of the latent vector turned into
32-bit integers (:func:`keys_from_latent`), hashed with a counter (the index of the point or cell
and a stream number) by :func:`uniform`. So the graph is a deterministic function of its input:
Geant4 runs stay reproducible from their seeds (the latent vector comes from CLHEP's engine) and
the graph can be compared with torch cell for cell.

The hash is Wellons' ``lowbias32`` (xor-shift / multiply, a bijection of 32-bit integers with full
avalanche). The keys of a shower are folded into one 32-bit key ``k`` (:func:`shower_key`); the number of
counter ``c`` is ``h(h(c) ⊕ k)``, a different bijection of the counters for every key. It is written with int64 operations that
never overflow (a 32-bit product is split into two 16-bit halves), shifts as exact float64 products
(torch's ONNX exporter turns an integer division into a float32 one) and ``bitwise_xor``/``bitwise_and``
(ONNX opset 18).

Counters: ``stream · 2²⁴ + index`` with ``index < 2²⁴`` (per shower) and ``stream < 256``.
"""

from __future__ import annotations

__all__ = ["N_KEYS", "STREAMS", "keys_from_latent", "normal", "shower_key", "uniform"]

import math

import torch
from torch import Tensor

#: latent entries that seed the counter-based noise of a shower
N_KEYS = 3
#: stream numbers of the noise an exported sampler draws (one per purpose; ``consistency + i``: the re-noising
#: of a consistency model's step ``i + 2``)
STREAMS = {"points": 1, "alpha": 2, "ring_r": 3, "consistency": 16}

_M32 = (1 << 32) - 1
_INDEX_BITS = 24


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2³²`` for ``x`` in ``[0, 2³²)`` without an int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + torch.bitwise_and(x * hi, 0xFFFF) * 65536).bitwise_and(_M32)


def _shift(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` for ``x`` in ``[0, 2⁵³)``, exact in float64 (an integer division exports through float32)."""
    return torch.floor(x.to(torch.float64) * (1.0 / (1 << bits))).to(torch.int64)


def _mix(x: Tensor) -> Tensor:
    """lowbias32: a bijective 32-bit integer hash."""
    x = torch.bitwise_xor(x, _shift(x, 16))
    x = _mul32(x, 0x7FEB352D)
    x = torch.bitwise_xor(x, _shift(x, 15))
    x = _mul32(x, 0x846CA68B)
    return torch.bitwise_xor(x, _shift(x, 16))


def keys_from_latent(z: Tensor) -> Tensor:
    """32-bit keys ``(B, K)`` int64 from ``K`` latent entries ``(B, K)`` (float32 ``N(0, 1)`` draws).

    ``floor(z · 2²²)`` keeps the float32 significand of ``|z| ≳ 0.25`` whole; the hash spreads it.
    """
    k = torch.floor(z.to(torch.float64) * float(1 << 22)).to(torch.int64)
    return _mix(torch.bitwise_and(k, _M32))


def shower_key(keys: Tensor) -> Tensor:
    """One 32-bit key per shower from its ``K`` keys: ``h(…h(h(k₁) ⊕ k₂)… ⊕ k_K)``. Shapes: ``(B, K)`` → ``(B,)``."""
    h = _mix(keys[:, 0])
    for j in range(1, keys.shape[1]):
        h = _mix(torch.bitwise_xor(h, keys[:, j]))
    return h


def uniform(key: Tensor, index: Tensor, stream: int) -> Tensor:
    """Uniform numbers in ``(0, 1)`` (float64, 24 bits): ``h(h(stream · 2²⁴ + index) ⊕ key)``.

    Args:
        key: ``(N,)`` int64, the :func:`shower_key` of the shower each number belongs to.
        index: ``(N,)`` int64 in ``[0, 2²⁴)``: the counter within the shower and stream.
        stream: in ``[0, 256)``.

    Returns:
        ``(N,)`` float64.
    """
    h = _mix(torch.bitwise_xor(_mix(index + (stream << _INDEX_BITS)), key))
    return (_shift(h, 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))


def normal(key: Tensor, index: Tensor, stream: int) -> Tensor:
    """Standard normal numbers (float64, Box–Muller on two counters ``2i``, ``2i + 1``); arguments as :func:`uniform`."""
    u1 = uniform(key, 2 * index, stream)
    u2 = uniform(key, 2 * index + 1, stream)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
