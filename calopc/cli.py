r"""The ``calopc`` command line: a thin argparse layer over the library.

Subcommands register themselves: ``calopc.cli`` (data layer), ``calopc.eval.cli``
(evaluate) and ``calopc.models.cli`` (train, generate) each define
``register(subparsers)``; the handler is stored as ``func`` and returns an exit code.
No module imported here may import torch at import time.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .geometry import DATASETS, GeometryError
from .io import ShowerFileError


class CLIError(Exception):
    """An error to report as one line, without a traceback."""


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        msg = f"must be a positive integer, got {s}"
        raise argparse.ArgumentTypeError(msg)
    return v


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_synthetic

    write_synthetic(args.output, dataset=args.dataset, n=args.n, seed=args.seed, progress=not args.no_progress)
    print(f"wrote {args.n} synthetic dataset-{args.dataset} showers to {args.output}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .converters import convert_file
    from .geometry import load_geometry

    geometry = load_geometry(args.geometry) if args.geometry else None
    out = convert_file(args.input, args.output, geometry=geometry, step_size=args.step_size,
                       threshold=args.threshold, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _cmd_voxelize(args: argparse.Namespace) -> int:
    from .converters import voxelize_file

    stats = voxelize_file(args.input, args.output, collisions=args.collisions, threshold=args.threshold,
                          progress=not args.no_progress)
    print(f"wrote {args.output}: {stats}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .converters import file_info

    info = file_info(args.input, progress=not args.no_progress)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['kind']}, dataset {info['dataset']} ({info['n_voxels']} voxels), "
          f"{info['n_showers']} showers, dtype {info['dtype']}")
    if info["n_showers"]:
        print(f"  hits/shower: mean {info['hits_mean']:.1f} ± {info['hits_std']:.1f}, min {info['hits_min']}, "
              f"median {info['hits_median']:.0f}, max {info['hits_max']}, empty showers {info['empty_showers']}")
        print(f"  occupancy {100 * info['occupancy_mean']:.1f}%, E_inc {info['e_inc_min']:.4g}–{info['e_inc_max']:.4g} MeV, "
              f"E_dep/E_inc {info['e_dep_over_e_inc_mean']:.3f} ± {info['e_dep_over_e_inc_std']:.3f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, dataset=args.dataset, n=args.n, seed=args.seed, progress=not args.no_progress)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="calopc", description="Calorimeter showers as point clouds.")
    parser.add_argument("--version", action="version", version=f"calopc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic shower file in the official CaloChallenge format")
    p.add_argument("output", type=Path, help="output HDF5 file")
    p.add_argument("--dataset", "-d", choices=DATASETS, default="2", help="dataset geometry (default: %(default)s)")
    p.add_argument("-n", type=_positive_int, default=1000, help="number of showers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("convert", help="CaloChallenge HDF5 -> point-cloud Parquet (streams in chunks)")
    p.add_argument("input", type=Path, help="input HDF5 file (incident_energies, showers)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output Parquet file (default: INPUT.parquet)")
    p.add_argument("--geometry", default=None,
                   help="dataset name or binning XML (default: detected from the voxel count)")
    p.add_argument("--step-size", default="256 MB", help="dense input per chunk (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="keep cells with energy above this, MeV (default: %(default)s = every non-zero cell)")
    _add_common(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("voxelize", help="point-cloud Parquet -> CaloChallenge HDF5")
    p.add_argument("input", type=Path, help="input Parquet file written by 'calopc convert' or 'calopc generate'")
    p.add_argument("-o", "--output", type=Path, required=True, help="output HDF5 file")
    p.add_argument("--collisions", choices=("sum", "max", "nearest-free"), default="sum",
                   help="several points in one cell: sum, keep max, or move to nearest free cell (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.0, help="zero cells below this energy, MeV (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_voxelize)

    p = sub.add_parser("info", help="dataset, number of showers and hits/shower of an HDF5 or Parquet file")
    p.add_argument("input", type=Path, help="HDF5 or Parquet file")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the embedded default job: synthetic showers -> points -> voxels, with a summary")
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: %(default)s)")
    p.add_argument("--dataset", "-d", choices=DATASETS, default="2", help="dataset geometry (default: %(default)s)")
    p.add_argument("-n", type=_positive_int, default=1000, help="number of showers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    for modname in ("calopc.eval.cli", "calopc.models.cli"):
        try:
            mod = __import__(modname, fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name is not None and err.name.startswith("calopc"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ShowerFileError, GeometryError, FileNotFoundError, CLIError, ValueError) as err:
        print(f"calopc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calopc {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
