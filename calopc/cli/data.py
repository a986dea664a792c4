r"""The data commands: ``calopc synth``, ``convert``, ``voxelize``, ``info`` and ``demo``.

:func:`register` adds them to the ``calopc`` parser; each handler imports the library code it
runs only when called (no torch anywhere).
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import sys
from pathlib import Path

from . import interop
from .options import (
    FORMATTER,
    CLIError,
    add_collisions,
    add_geometry,
    add_output,
    add_progress,
    add_threshold,
    file_threshold_arg,
    fraction,
    one_output,
    positive_int,
    refuse_folder_name,
)


def _synth_geometry(value: str) -> str:
    """``--geometry`` of synth: a known name or an existing XML file (argparse reports anything else)."""
    from ..geometry import DATASETS, GeometryError, load_geometry

    try:
        load_geometry(value)
    except (GeometryError, OSError) as err:
        msg = f"invalid choice: {value!r} (choose from {', '.join(DATASETS)}, hg, or a binning XML file: {err})"
        raise argparse.ArgumentTypeError(msg) from None
    return value



def _add_synth_options(p: argparse.ArgumentParser) -> None:
    """The synthetic-shower options ``synth`` and ``demo`` share: geometry, number of showers, seed, progress."""
    p.add_argument("--geometry", "--dataset", "-d", dest="geometry", default="2", type=_synth_geometry,
                   help="a dataset (1-photons, 1-pions, 2, 3), hg (calopc's high-granularity geometry: dataset 3 "
                        "with 4x finer alpha and r, 648,000 cells) or a binning XML FILE in the official format "
                        "(electromagnetic showers) (default: %(default)s)")
    p.add_argument("-n", type=positive_int, default=1000, help="number of showers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_progress(p)

def _cmd_synth(args: argparse.Namespace) -> int:
    from ..synth import write_synthetic

    output = one_output(args, "synth")
    from ..geometry import load_geometry

    geometry = load_geometry(args.geometry)
    write_synthetic(output, dataset=geometry, n=args.n, seed=args.seed, progress=not args.no_progress)
    what = (f"dataset-{geometry.name}" if geometry.name[0].isdigit() else f"{geometry.name!r} geometry "
            f"({geometry.n_voxels} cells)")
    print(f"wrote {args.n} synthetic {what} showers to {output}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .interop import run_convert

    code = run_convert(args)  # --to / --from showerdata (None: calopc's own formats)
    if code is not None:
        return code
    from ..converters import convert_file, convert_files
    from ..converters.sources import expand_globs
    from ..geometry import load_geometry

    geometry = load_geometry(args.geometry) if args.geometry else None
    threshold = "official" if args.threshold is None else args.threshold
    kw = {"geometry": geometry, "step_size": args.step_size, "threshold": threshold, "progress": not args.no_progress,
          "energy_dtype": args.energy_dtype}
    inputs = expand_globs(args.input)  # quoted globs are expanded here (the shell expands unquoted ones)
    out = args.output
    to_folder = len(inputs) > 1 or (out is not None and (out.is_dir() or args.output_slash))
    if not to_folder:
        print(f"wrote {convert_file(inputs[0], out, **kw)}")
        return 0
    if out is None:
        msg = f"{len(inputs)} inputs: name the output folder of the dataset with -o DIR/"
        raise CLIError(msg)
    from .._safety import lock_output

    with lock_output(out, "dataset folder"):  # one writer per dataset folder (each shard is locked too)
        files = convert_files(inputs, out, workers=args.workers, log=print, **kw)
    print(f"wrote {len(files)} Parquet files to {out}/")
    return 0


def _cmd_voxelize(args: argparse.Namespace) -> int:
    from ..converters import voxelize_file
    from ..geometry import load_geometry

    if args.output_slash:
        refuse_folder_name(f"{args.output}/", "voxelize", "voxels.hdf5")
    geometry = load_geometry(args.geometry) if args.geometry else None
    stats = voxelize_file(args.input, args.output, collisions=args.collisions,
                          threshold="official" if args.threshold is None else args.threshold, geometry=geometry,
                          max_outside=args.max_outside, seed=args.seed, progress=not args.no_progress)
    print(f"wrote {args.output}: {stats}")
    if stats.n_outside:
        print(f"calopc voxelize: warning: {stats.n_outside} of {stats.n_points} points lie outside the calorimeter "
              "and were dropped", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..converters import file_info
    from ..geometry import load_geometry

    geometry = load_geometry(args.geometry) if args.geometry else None
    info = file_info(args.input, progress=not args.no_progress, geometry=geometry)
    if args.json:
        from .._safety import json_dumps

        print(json_dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['kind']}, dataset {info['dataset']} ({info['n_voxels']} voxels), "
          f"{info['n_showers']} showers, dtype {info['dtype']}")
    if info["n_showers"]:
        print(f"  hits/shower: mean {info['hits_mean']:.1f} ± {info['hits_std']:.1f}, min {info['hits_min']}, "
              f"median {info['hits_median']:.0f}, max {info['hits_max']}, empty showers {info['empty_showers']}")
        print(f"  occupancy {100 * info['occupancy_mean']:.1f}%, E_inc {info['e_inc_min']:.4g}–{info['e_inc_max']:.4g} MeV, "
              f"E_dep/E_inc {info['e_dep_over_e_inc_mean']:.4g} ± {info['e_dep_over_e_inc_std']:.4g}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.output, dataset=args.geometry, n=args.n, seed=args.seed, progress=not args.no_progress)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``synth``, ``convert``, ``voxelize``, ``info`` and ``demo`` to the ``calopc`` parser."""
    p = sub.add_parser("synth", help="write a synthetic shower file in the official CaloChallenge format",
                       formatter_class=FORMATTER,
                       epilog="examples:\n  calopc synth showers.hdf5 -n 2000 --geometry 2 --seed 1\n"
                              "  calopc synth hg.hdf5 -n 100 --geometry hg          # high granularity, 648k cells")
    p.add_argument("output_pos", nargs="?", type=str, default=None, metavar="OUTPUT", help="output HDF5 file")
    add_output(p, "output HDF5 file (instead of the positional OUTPUT)")
    _add_synth_options(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("convert", help="CaloChallenge HDF5 -> point-cloud Parquet (streams in chunks)",
                       formatter_class=FORMATTER,
                       epilog="examples:\n  calopc convert dataset_2_1.hdf5 -o train.parquet --step-size '512 MB'\n"
                              "  calopc convert dataset_3_*.hdf5 -o ds3/ --workers 2     # a dataset folder\n"
                              "  calopc convert dataset_3_1.hdf5 --energy-dtype float32   # half the size\n"
                              + interop.EPILOG)
    p.add_argument("input", type=Path, nargs="+",
                   help="input HDF5 file(s) (incident_energies, showers), or a quoted glob; several inputs write a "
                        "dataset folder of Parquet files (-o DIR/)")
    add_output(p, "output Parquet file (default: INPUT.parquet), or the dataset folder for several inputs (a name "
                  "ending in / or an existing folder; other Parquet files already in it are named in a warning: "
                  "readers of the folder include them)")
    add_geometry(p, "dataset name or binning XML (default: detected from the voxel count)")
    p.add_argument("--step-size", default="256 MB", help="dense input per chunk (default: %(default)s)")
    add_threshold(p, 0.0, "; 0 keeps every non-zero cell (lossless)")
    p.add_argument("--energy-dtype", choices=("float64", "float32"), default=None,
                   help="stored point energies: float32 rounds each to 24 significant bits (relative error <= 6e-8; "
                        "exact for float32 input) and halves the file (default: the input's dtype, lossless)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="convert several inputs in parallel processes (default: %(default)s)")
    interop.add_convert_options(p)
    add_progress(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("voxelize", help="point-cloud Parquet -> CaloChallenge HDF5", formatter_class=FORMATTER,
                       epilog="example:\n  calopc voxelize gen.parquet -o gen.hdf5 --threshold official")
    p.add_argument("input", type=Path, help="input Parquet file written by 'calopc convert' or 'calopc generate', "
                                            "or a dataset folder or quoted glob of them")
    add_output(p, "output HDF5 file", required=True)
    add_geometry(p, "dataset name or binning XML, instead of the file's metadata (default: the file's)")
    add_collisions(p)
    p.add_argument("--threshold", type=file_threshold_arg, default="file", metavar="MEV|official|file",
                   help="cells with less energy (MeV) are empty; 'official': the dataset's readout threshold "
                        "(1 MeV ds1, 15.15 keV ds2/3); 'file': the one the input's metadata records ('calopc "
                        "convert' records the one it applied, so the round trip is exact; 0 when none is recorded) "
                        "(default: file)")
    p.add_argument("--max-outside", type=fraction, default=0.01,
                   help="largest share of points outside the calorimeter before it is an error (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of --collisions alpha-free (default: %(default)s)")
    add_progress(p)
    p.set_defaults(func=_cmd_voxelize)

    p = sub.add_parser("info", help="dataset, number of showers and hits/shower of an HDF5 or Parquet file",
                       formatter_class=FORMATTER, epilog="example:\n  calopc info dataset_2_1.hdf5 --json")
    p.add_argument("input", type=Path, help="HDF5 or Parquet file, or a dataset folder or quoted glob of Parquet files")
    add_geometry(p, "dataset name or binning XML (default: detected, or the Parquet file's metadata)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_progress(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the embedded default job: synthetic showers -> points -> voxels, with a summary",
                       formatter_class=FORMATTER, epilog="example:\n  calopc demo -o demo/ -n 500 --geometry 1-photons")
    add_output(p, "output folder (default: %(default)s)", default=Path("demo"), aliases=("--out",))
    _add_synth_options(p)
    p.set_defaults(func=_cmd_demo)
