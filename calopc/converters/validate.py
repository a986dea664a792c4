r"""One rule for questionable point clouds, in every command that reads them.

``voxelize``, ``info``, ``evaluate`` and ``train`` (and anything else reading a points file
through :func:`calopc.converters.open_points`) apply the same checks, each failure one line
naming the file, the column or shower, what was expected and what was found:

* **column types** (:func:`check_points_schema`, when the file is opened): ``incident_energy``
  and the point fields ``E``, ``r``, ``alpha``, ``z`` hold numbers; ``cell`` holds integers.
  A ``cell`` column of another type (floats such as ``12.5``, strings) is refused: cell
  indices are never rounded silently.
* **cell indices** (:func:`check_cells`, every chunk): a point whose ``cell`` lies outside the
  geometry (``< 0`` or ``>= n_voxels``) is an error, whatever their number. ``--max-outside``
  applies only to continuous points (``r``, ``alpha``, ``z`` without a cell), which may fall
  outside the calorimeter's acceptance; those are dropped with a warning.
* energies: incident energies finite and > 0, point energies finite and >= 0 (checked by the
  readers).
"""

from __future__ import annotations

__all__ = ["check_cells", "check_points_schema"]

import os
from typing import Any

import numpy as np

from ..hdf5 import ShowerFileError

_NUMERIC_POINT_FIELDS = ("E", "r", "alpha", "z")


def _kind(t: Any) -> str:
    """``"int"``, ``"float"`` or ``"other"`` for an Arrow type (dictionary-encoded: its values)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    return "other"


def check_points_schema(path: str | os.PathLike, schema: Any) -> None:
    """Raise :class:`ShowerFileError` when a column of a points file has the wrong type (see the module rule)."""
    import pyarrow as pa

    fields = {schema.field(i).name: schema.field(i).type for i in range(len(schema.names))}
    if "incident_energy" in fields and _kind(fields["incident_energy"]) == "other":
        msg = (f"{path}: column 'incident_energy' has type {fields['incident_energy']}; expected numbers "
               "(incident energies in MeV, float64)")
        raise ShowerFileError(msg)
    ptype = fields.get("points")
    if ptype is None:
        return
    inner = getattr(ptype, "value_type", None)
    if inner is None or not pa.types.is_struct(inner):
        return  # the reader names the missing fields
    for i in range(inner.num_fields):
        f = inner.field(i)
        kind = _kind(f.type)
        if f.name == "cell" and kind != "int":
            msg = (f"{path}: column 'points.cell' has type {f.type}; expected integer cell indices (int32): cell "
                   "indices are not rounded")
            raise ShowerFileError(msg)
        if f.name in _NUMERIC_POINT_FIELDS and kind == "other":
            what = "energies in MeV" if f.name == "E" else "coordinates"
            msg = f"{path}: column 'points.{f.name}' has type {f.type}; expected numbers ({what}, float)"
            raise ShowerFileError(msg)


def check_cells(cell: np.ndarray, counts: np.ndarray, n_voxels: int, geometry_name: str, where: str,
                first_shower: int = 0) -> None:
    """Raise :class:`ShowerFileError` when a cell index lies outside ``0..n_voxels-1`` (one line: shower, value)."""
    cell = np.asarray(cell)
    if not cell.size:
        return
    bad = (cell < 0) | (cell >= n_voxels)
    if not bad.any():
        return
    j = int(np.flatnonzero(bad)[0])
    shower = first_shower + int(np.searchsorted(np.cumsum(counts), j, side="right"))
    msg = (f"{where}: {int(bad.sum())} of {cell.size} points ({100 * bad.mean():.1f}%) have a cell index outside "
           f"geometry {geometry_name!r} (0..{n_voxels - 1}; first: shower {shower}, cell {int(cell[j])}); a wrong "
           "geometry (--geometry overrides the file's) or corrupt cell indices")
    raise ShowerFileError(msg)
