"""Numerical constants shared by the NumPy and torch preprocessing (they must agree bit for bit)."""

_EPS = 1e-6  # logit clipping
_DELTA = 1e-9  # energy-fraction floor of the layer energies (variant II, empty_energy="floor")
_U_EPS = 1e-12  # probit clipping of the CDF dequantisation
