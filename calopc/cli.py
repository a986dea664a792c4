r"""The ``calopc`` command line: a thin argparse layer over the library.

Subcommands register themselves: ``calopc.cli`` (data layer), ``calopc.eval.cli``
(evaluate) and ``calopc.models.cli`` (train, generate) each define
``register(subparsers)``; the handler is stored as ``func`` and returns an exit code.
No module imported here may import torch at import time.

The option types and conventions shared by every command live here too (``positive_int``,
``threshold_arg``, ``add_output``, :data:`COLLISIONS`, ...), so that the same flag means the
same thing everywhere:

* ``-o/--output``: what the command writes; ``--geometry``: a dataset name or binning XML.
* ``--threshold``: cells with less energy (MeV) are empty (the official evaluation's rule);
  ``official`` = the dataset's readout threshold (1 MeV for dataset 1, 15.15 keV for 2 and 3).
  ``convert`` defaults to 0 (lossless), ``voxelize`` to ``file`` (the threshold its input records:
  the one ``convert`` applied, so the round trip stays exact), ``generate`` and ``evaluate`` to
  ``official``.
* ``--collisions``: several points in one cell; ``auto`` (the default everywhere) = ``sum``
  for points that carry their cell index, ``nearest-free`` for continuous points.

:func:`main` reports every user error as one line (exit 2), Ctrl-C as exit 130 and SIGTERM as
exit 143 (the temporary output removed), and exits quietly when its output pipe is closed.
"""

from __future__ import annotations

__all__ = [
    "COLLISIONS",
    "CLIError",
    "add_output",
    "add_progress",
    "build_parser",
    "fraction",
    "main",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "threshold_arg",
]

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .geometry import DATASETS, GeometryError
from .io import Interrupted, OutputError, ShowerFileError, hdf5_write_failed

#: ``--collisions`` choices of every command that puts points into cells (the same as ``generate``'s).
COLLISIONS = ("auto", "alpha-free", "nearest-free", "sum", "max")
_FMT = argparse.RawDescriptionHelpFormatter


class CLIError(Exception):
    """An error to report as one line, without a traceback."""


# ----------------------------------------------------------------------------- option types
def _typed(name: str, check: Callable[[float], bool], conv: Callable[[str], float], what: str
           ) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = conv(s)
        except ValueError:
            msg = f"expected {what}, got {s!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if not check(v):
            msg = f"expected {what}, got {s!r}"
            raise argparse.ArgumentTypeError(msg)
        return v

    parse.__name__ = name  # argparse prints "invalid <name> value" for errors it catches itself
    return parse


positive_int = _typed("positive integer", lambda v: v > 0, int, "a positive integer")
nonneg_int = _typed("non-negative integer", lambda v: v >= 0, int, "an integer >= 0")
positive_float = _typed("positive number", lambda v: math.isfinite(v) and v > 0, float, "a finite number > 0")
nonneg_float = _typed("non-negative number", lambda v: math.isfinite(v) and v >= 0, float, "a finite number >= 0")
fraction = _typed("fraction", lambda v: 0 <= v <= 1, float, "a fraction between 0 and 1")


def threshold_arg(s: str) -> float | None:
    """``--threshold`` value: a finite number of MeV >= 0, or ``official`` (→ ``None``: the dataset's threshold)."""
    if s.strip().lower() == "official":
        return None
    return nonneg_float(s)


threshold_arg.__name__ = "threshold"


def _file_threshold_arg(s: str) -> float | str | None:
    """``voxelize --threshold``: also ``file``, the threshold recorded in the input's metadata."""
    return "file" if s.strip().lower() == "file" else threshold_arg(s)


_file_threshold_arg.__name__ = "threshold"


def add_output(p: argparse.ArgumentParser, help: str, *, required: bool = False, default: Path | None = None,
               aliases: Sequence[str] = ()) -> None:
    """The ``-o/--output`` option (plus old spellings in ``aliases``, e.g. ``--out``)."""
    p.add_argument("-o", "--output", *aliases, dest="output", type=Path, required=required, default=default, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``. Bars are drawn only on a terminal anyway (never into log files)."""
    p.add_argument("--no-progress", action="store_true",
                   help="do not show progress bars (they are shown only on a terminal anyway)")


def _add_threshold(p: argparse.ArgumentParser, default: float | None, extra: str = "") -> None:
    d = "official" if default is None else f"{default:g}"
    p.add_argument("--threshold", type=threshold_arg, default=default, metavar="MEV|official",
                   help=f"cells with less energy (MeV) are empty; 'official': the dataset's readout threshold "
                        f"(1 MeV ds1, 15.15 keV ds2/3){extra} (default: {d})")


def _add_collisions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collisions", choices=COLLISIONS, default="auto",
                   help="several points in one cell: auto (sum for points with a cell index, nearest-free for "
                        "continuous points), alpha-free (ignore the angle: distinct random alpha bins per (layer, r) "
                        "ring), nearest-free (move to the nearest free cell of the layer), sum, max "
                        "(default: %(default)s)")


def _add_geometry(p: argparse.ArgumentParser, help: str, *, official_only: bool = False, default: str | None = None,
                  aliases: Sequence[str] = ()) -> None:
    kw = {"choices": DATASETS} if official_only else {}
    p.add_argument("--geometry", *aliases, dest="geometry", default=default, help=help, **kw)


# ----------------------------------------------------------------------------- commands
def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_synthetic

    output = _one_output(args, "synth")
    write_synthetic(output, dataset=args.geometry, n=args.n, seed=args.seed, progress=not args.no_progress)
    print(f"wrote {args.n} synthetic dataset-{args.geometry} showers to {output}")
    return 0


def _one_output(args: argparse.Namespace, cmd: str) -> Path:
    pos, opt = args.output_pos, args.output
    if pos is not None and opt is not None and Path(pos) != Path(opt):
        msg = f"two outputs given ({pos} and -o {opt}); give one"
        raise CLIError(msg)
    if pos is None and opt is None:
        msg = f"no output file; e.g. 'calopc {cmd} showers.hdf5' or 'calopc {cmd} -o showers.hdf5'"
        raise CLIError(msg)
    return Path(pos if pos is not None else opt)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .converters import convert_file
    from .geometry import load_geometry

    geometry = load_geometry(args.geometry) if args.geometry else None
    threshold = "official" if args.threshold is None else args.threshold
    out = convert_file(args.input, args.output, geometry=geometry, step_size=args.step_size, threshold=threshold,
                       progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _cmd_voxelize(args: argparse.Namespace) -> int:
    from .converters import voxelize_file
    from .geometry import load_geometry

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
    from .converters import file_info
    from .geometry import load_geometry

    geometry = load_geometry(args.geometry) if args.geometry else None
    info = file_info(args.input, progress=not args.no_progress, geometry=geometry)
    if args.json:
        from .io import json_dumps

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
    from .demo import run_demo

    run_demo(args.output, dataset=args.geometry, n=args.n, seed=args.seed, progress=not args.no_progress)
    return 0


_EPILOG = """\
workflow:
  calopc synth showers.hdf5 -n 2000 --geometry 2         # or a CaloChallenge file
  calopc convert showers.hdf5 -o train.parquet           # voxels -> point clouds
  calopc train calopointflow --data train.parquet -o run/
  calopc generate run/ --energies showers.hdf5 -o gen.hdf5
  calopc evaluate gen.hdf5 showers.hdf5 -o report/
  calopc voxelize gen.parquet -o gen.hdf5                # point clouds -> voxels

'calopc COMMAND --help' shows each command's options and an example.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="calopc", description="Calorimeter showers as point clouds.",
                                     epilog=_EPILOG, formatter_class=_FMT)
    parser.add_argument("--version", action="version", version=f"calopc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic shower file in the official CaloChallenge format",
                       formatter_class=_FMT,
                       epilog="example:\n  calopc synth showers.hdf5 -n 2000 --geometry 2 --seed 1")
    p.add_argument("output_pos", nargs="?", type=Path, default=None, metavar="OUTPUT", help="output HDF5 file")
    add_output(p, "output HDF5 file (instead of the positional OUTPUT)")
    _add_geometry(p, "dataset geometry (default: %(default)s)", official_only=True, default="2",
                  aliases=("--dataset", "-d"))
    p.add_argument("-n", type=positive_int, default=1000, help="number of showers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_progress(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("convert", help="CaloChallenge HDF5 -> point-cloud Parquet (streams in chunks)",
                       formatter_class=_FMT,
                       epilog="example:\n  calopc convert dataset_2_1.hdf5 -o train.parquet --step-size '512 MB'")
    p.add_argument("input", type=Path, help="input HDF5 file (incident_energies, showers)")
    add_output(p, "output Parquet file (default: INPUT.parquet)")
    _add_geometry(p, "dataset name or binning XML (default: detected from the voxel count)")
    p.add_argument("--step-size", default="256 MB", help="dense input per chunk (default: %(default)s)")
    _add_threshold(p, 0.0, "; 0 keeps every non-zero cell (lossless)")
    add_progress(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("voxelize", help="point-cloud Parquet -> CaloChallenge HDF5", formatter_class=_FMT,
                       epilog="example:\n  calopc voxelize gen.parquet -o gen.hdf5 --threshold official")
    p.add_argument("input", type=Path, help="input Parquet file written by 'calopc convert' or 'calopc generate'")
    add_output(p, "output HDF5 file", required=True)
    _add_geometry(p, "dataset name or binning XML, instead of the file's metadata (default: the file's)")
    _add_collisions(p)
    p.add_argument("--threshold", type=_file_threshold_arg, default="file", metavar="MEV|official|file",
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
                       formatter_class=_FMT, epilog="example:\n  calopc info dataset_2_1.hdf5 --json")
    p.add_argument("input", type=Path, help="HDF5 or Parquet file")
    _add_geometry(p, "dataset name or binning XML (default: detected, or the Parquet file's metadata)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_progress(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the embedded default job: synthetic showers -> points -> voxels, with a summary",
                       formatter_class=_FMT, epilog="example:\n  calopc demo -o demo/ -n 500 --geometry 1-photons")
    add_output(p, "output folder (default: %(default)s)", default=Path("demo"), aliases=("--out",))
    _add_geometry(p, "dataset geometry (default: %(default)s)", official_only=True, default="2",
                  aliases=("--dataset", "-d"))
    p.add_argument("-n", type=positive_int, default=1000, help="number of showers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_progress(p)
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


# ----------------------------------------------------------------------------- main
def _raise_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm, ``timeout``, ``kill``) raises :class:`~calopc.io.Interrupted` like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _one_line_warnings(cmd: str) -> Iterator[None]:
    """Warnings are printed as ``calopc CMD: warning: ...`` (no source lines, no file paths of the library)."""
    with warnings.catch_warnings():
        def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
            with contextlib.suppress(Exception):
                print(f"calopc {cmd}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``calopc info F | head -1``): leave quietly, like other Unix tools."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
    return 128 + signal.SIGPIPE


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, OutputError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``calopc`` command line; returns the exit code.

    Exit codes: 0 success; 2 a user error, reported as one line (bad input, bad option, output not
    writable, disk full); 130 Ctrl-C and 143 SIGTERM (the incomplete output removed); 141 stdout
    closed early. ``CALOPC_DEBUG=1`` shows the traceback of unexpected errors.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.command
    code: int
    with _sigterm_as_interrupt(), _one_line_warnings(cmd):
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()
        except BrokenPipeError:
            code = _quiet_broken_pipe()
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            detail = str(err) or "no output was written"
            print(f"calopc {cmd}: interrupted ({name}); {detail}", file=sys.stderr)
            code = 128 + int(signum)
        except (ShowerFileError, GeometryError, FileNotFoundError, CLIError, ValueError, OSError) as err:
            print(f"calopc {cmd}: error: {_describe(err)}", file=sys.stderr)
            code = 2
        except Exception as err:
            if os.environ.get("CALOPC_DEBUG"):
                raise
            print(f"calopc {cmd}: internal error: {type(err).__name__}: {err} (CALOPC_DEBUG=1 shows the traceback; "
                  "please report it)", file=sys.stderr)
            code = 1
    if argv is None and hdf5_write_failed():
        # h5py can crash while the interpreter shuts down after a failed write (h5py issue 914):
        # the error is reported and the temporary file removed, so leave without that teardown
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
