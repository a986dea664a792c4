r"""``calopc convert --to showerdata`` and ``--from showerdata``: the FLC point-cloud format of the
``showerdata`` package (AllShowers, PointCountFM), next to calopc's own formats.

:func:`add_convert_options` adds ``--to``, ``--from`` and the binning options of ``--from showerdata``
to the ``convert`` parser; :func:`run_convert` runs a conversion that involves showerdata and
returns None for the others (``convert``'s defaults are unchanged: CaloChallenge HDF5 -> Parquet).
"""

from __future__ import annotations

__all__ = ["FORMATS", "add_convert_options", "run_convert"]

import argparse
from pathlib import Path

from .options import CLIError, add_collisions, fraction

#: ``--to`` / ``--from`` choices: calopc's formats (voxel HDF5 in, Parquet out) and showerdata
FORMATS = ("calopc", "showerdata")

EPILOG = """\
  calopc convert dataset_3_1.hdf5 --to showerdata -o ds3.showerdata.h5    # for AllShowers / PointCountFM
  calopc convert flc.h5 --from showerdata --geometry 3 -o flc.parquet      # onto the dataset-3 cells
  calopc convert flc.h5 --from showerdata --geometry 3 -o flc.hdf5         # ... as CaloChallenge voxels"""


def add_convert_options(p: argparse.ArgumentParser) -> None:
    """``--to``, ``--from`` and, for ``--from showerdata``, ``--collisions``, ``--max-outside``, ``--seed``."""
    p.add_argument("--to", choices=FORMATS, default="calopc",
                   help="output format: calopc (point-cloud Parquet) or showerdata (the FLC point-cloud HDF5 of the "
                        "showerdata package: x, y in mm, z = layer, E in GeV; exact cells and energies kept in a "
                        "'calopc' group, so converting back is lossless); input: CaloChallenge HDF5 or calopc "
                        "Parquet (default: %(default)s)")
    p.add_argument("--from", dest="from_format", choices=FORMATS, default="calopc",
                   help="input format: calopc (CaloChallenge HDF5) or showerdata (points projected onto --geometry: "
                        "r = hypot(x, y), alpha = atan2(y, x), layer round(z), binned with --collisions; output "
                        ".parquet or .hdf5) (default: %(default)s)")
    add_collisions(p)
    p.add_argument("--max-outside", type=fraction, default=0.01,
                   help="--from showerdata: largest share of points outside the calorimeter before it is an error "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="--from showerdata: random seed of --collisions alpha-free (default: %(default)s)")


def _is_showerdata(path: Path) -> bool:
    from ..converters.showerdata import is_showerdata

    return is_showerdata(path)


def run_convert(args: argparse.Namespace) -> int | None:
    """Run ``convert`` when ``--to`` or ``--from`` names showerdata (exit code); None: an ordinary conversion.

    An ordinary conversion of a showerdata file is refused with the option that reads it.
    """
    to, frm = args.to, args.from_format
    if to == "calopc" and frm == "calopc":
        for p in args.input:
            if p.suffix.lower() in (".h5", ".hdf5", ".hdf") and _is_showerdata(p):
                msg = (f"{p}: is a showerdata file (FLC point clouds), not CaloChallenge voxels; convert it with "
                       f"--from showerdata --geometry DATASET")
                raise CLIError(msg)
        return None
    if to == frm:
        msg = "--to showerdata and --from showerdata together convert nothing; give one of them"
        raise CLIError(msg)
    if len(args.input) != 1:
        msg = f"{len(args.input)} inputs given; --{'to' if to != 'calopc' else 'from'} showerdata converts one file"
        raise CLIError(msg)
    from ..geometry import load_geometry

    src = args.input[0]
    geometry = load_geometry(args.geometry) if args.geometry else None
    threshold = "official" if args.threshold is None else args.threshold
    if to == "showerdata":
        from ..converters.showerdata import export_showerdata

        if args.energy_dtype is not None:
            msg = "--energy-dtype applies to Parquet output; showerdata stores float32 GeV (and the exact energies)"
            raise CLIError(msg)
        out = args.output if args.output is not None else src.with_suffix(".showerdata.h5")
        if args.output_slash or out.is_dir():
            msg = f"{out}: is a folder; --to showerdata writes one file, e.g. {out / (src.stem + '.showerdata.h5')}"
            raise CLIError(msg)
        export_showerdata(src, out, geometry=geometry, threshold=threshold, step_size=args.step_size,
                          progress=not args.no_progress)
        print(f"wrote {out}")
        return 0
    from ..converters.showerdata import import_showerdata

    out = args.output if args.output is not None else src.with_suffix(".parquet")
    if args.output_slash or out.is_dir():
        msg = f"{out}: is a folder; --from showerdata writes one file, e.g. {out / (src.stem + '.parquet')}"
        raise CLIError(msg)
    stats = import_showerdata(src, out, geometry=geometry, collisions=args.collisions, threshold=threshold,
                              max_outside=args.max_outside, seed=args.seed, energy_dtype=args.energy_dtype,
                              progress=not args.no_progress)
    print(f"wrote {out}: {stats}")
    return 0
