r"""Voxel showers ⇄ ragged awkward point clouds, in memory and file to file.

No torch here: converting files works on machines without it. Layers, each importing only those
below it: :mod:`.sources` (which files a path, folder or glob names) and :mod:`.core` (in memory)
-> :mod:`.files` (one Parquet file; HDF5 -> Parquet) -> :mod:`.dataset` (several files, lazy
dask reader) -> :mod:`.api` (any source: ``open_points``, ``read_points``, ``voxelize_file``,
``file_info``). :mod:`.showerdata`: the FLC point-cloud format of the ``showerdata`` package
(``export_showerdata``, ``import_showerdata``).
"""

from __future__ import annotations

__all__ = [
    "COLLISION_POLICIES",
    "PointsDataset",
    "PointsFile",
    "VoxelizeStats",
    "convert_file",
    "convert_files",
    "export_showerdata",
    "file_info",
    "import_showerdata",
    "neighbour_table",
    "open_points",
    "open_points_lazy",
    "points_paths",
    "points_to_voxels",
    "points_writer",
    "read_points",
    "voxelize_file",
    "voxels_to_points",
    "write_points",
]

from .api import file_info, open_points, read_points, voxelize_file
from .core import COLLISION_POLICIES, VoxelizeStats, neighbour_table, points_to_voxels, voxels_to_points
from .dataset import PointsDataset, convert_files, open_points_lazy
from .files import PointsFile, convert_file, points_writer, write_points
from .showerdata import export_showerdata, import_showerdata
from .sources import points_paths


def __dir__() -> list[str]:
    return sorted(__all__)
