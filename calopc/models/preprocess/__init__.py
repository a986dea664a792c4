r"""Invertible coordinate preprocessing for point-cloud showers.

Point features, in order: ``(z, alpha, r, E)``.

* **Per-cell dequantisation** (CaloPointFlow II): a point of cell ``k`` gets a uniform
  position inside that cell's bounds (z ± 0.5, its α-bin, its r-bin), so every
  continuous point maps back to exactly the cell it came from (``Geometry.locate``).
* **CDF dequantisation** (variant II, ``dequantisation="cdf"``, CaloPointFlow II as
  published): instead of a logit of the scaled coordinate, the α-bin and the r-bin ``k`` of
  a point in layer ``l`` become ``Φ⁻¹(cdf_l[k] + pdf_l[k]·u)``, where ``pdf_l`` is the
  empirical distribution of the training points over the bins of that layer and ``u`` the
  point's uniform position inside its bin; each coordinate is then marginally standard
  normal. The inverse finds the bin by a search on ``cdf_l`` and the position inside it.
* Coordinates are scaled to (0, 1) with the calorimeter's extent, passed through a
  logit and standardised; energies become ``log(E / E_inc)``, standardised.
* Shower-level features, two variants:

  - ``"I"`` (CaloPointFlow): ``log n − ½ log E_inc`` and ``log(ΣE / E_inc)``; points are
    ``(z, α, r, log E/E_inc)`` with ``z`` dequantised inside its layer. CaloPointFlow II as
    published (the ``published`` preset) uses this variant with ``dequantisation="cdf"`` (``z``
    through the empirical CDF of the layers, ``α`` and ``r`` through the CDFs of their bins in the
    point's layer, each then probit) and ``energy_ref="sum"`` (energies ``log(E / ΣE)``).
  - ``"II"`` (CaloPointFlow II, the default): the number of points and the energy of every
    layer, ``log(n_l + u)`` with ``u ~ U(0, 1)`` (dequantised counts, ``n_l = ⌊exp⌋`` inverts
    it exactly) and the layer energy feature; points are ``(α, r, log E/E_l)`` and carry their layer.
    The energy feature of an empty layer carries no information (the count says the layer is
    empty), so where it sits must not distort the occupied layers (``empty_energy``):

    * ``"occupied"`` (fits since the option exists): ``log(E_l / E_inc)`` for a layer with points;
      an empty layer gets a draw ``μ_l + σ_l Φ⁻¹(v)`` from a normal with the mean and spread of
      the occupied values of that layer (fitted), so after standardisation the occupied values
      keep their full spread and the flow sees one mode per layer. The inverse gives an empty
      layer (``n_l = 0``) no energy whatever the feature says;
    * ``"floor"`` (run directories written before the option): ``log(E_l / E_inc + δ v)``
      (``δ = 1e-9``, ``v ~ U(0, 1)``; the inverse subtracts ``δ/2``). Empty layers land near
      ``log 1e-9 ≈ −21``, far below the occupied ones (about −3 … −12), and standardisation
      squeezes the occupied spread of partly empty layers to 0.2–0.4 of a unit.

  The condition is ``log E_inc``. Everything is standardised.

All statistics are fitted on training data (:meth:`Preprocessor.fit`) and saved in the
checkpoint's ``config.json`` (:meth:`Preprocessor.to_dict`).

The NumPy implementation (:class:`Preprocessor`: fitting, the forward and inverse transforms,
serialisation) is :mod:`calopc.models.preprocess.numpy`; its torch twin, which builds training
batches on a device (:class:`TorchPreprocessor`: the same features to the bit on the same inputs and noise), is
:mod:`calopc.models.preprocess.torch`.
"""

from __future__ import annotations

__all__ = ["VARIANTS", "Preprocessor", "TorchPreprocessor", "layer_sums"]

from .numpy import (  # noqa: F401  (the private names: for the tests)
    _DELTA,
    _EPS,
    _U_EPS,
    DEQUANTISATIONS,
    EMPTY_ENERGY,
    VARIANTS,
    Preprocessor,
    _cdf_forward,
    _cdf_inverse,
    _cdf_table,
    layer_sums,
)
from .torch import TorchPreprocessor, _cdf_forward_t, _cdf_inverse_t  # noqa: F401
