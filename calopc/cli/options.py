r"""Option types and conventions shared by every ``calopc`` command.

This module sits below every command-line module (``calopc.cli.data``, ``calopc.cli.eval``,
``calopc.cli.models``, ...), so that the same flag means the same thing everywhere:

* ``-o/--output``: what the command writes; ``--geometry``: a dataset name or binning XML.
* ``--threshold``: cells with less energy (MeV) are empty (the official evaluation's rule);
  ``official`` = the dataset's readout threshold (1 MeV for dataset 1, 15.15 keV for 2 and 3).
  ``convert`` defaults to 0 (lossless), ``voxelize`` to ``file`` (the threshold its input records:
  the one ``convert`` applied, so the round trip stays exact), ``generate`` and ``evaluate`` to
  ``official``.
* ``--collisions``: several points in one cell; ``auto`` (the default everywhere) = ``sum``
  for points that carry their cell index, ``nearest-free`` for continuous points.
* ``--no-progress``: no progress bar on a terminal and no periodic log lines elsewhere.

Importing it is cheap (the standard library only): ``calopc --help`` stays fast.
"""

from __future__ import annotations

__all__ = [
    "COLLISIONS",
    "GENERATE_COLLISIONS",
    "CLIError",
    "add_collisions",
    "add_geometry",
    "add_output",
    "add_progress",
    "add_threshold",
    "file_threshold_arg",
    "fraction",
    "nonneg_float",
    "nonneg_int",
    "one_output",
    "refuse_folder_name",
    "positive_float",
    "positive_int",
    "threshold_arg",
]

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

#: ``--collisions`` choices of every command that puts points into cells (calopc.models.cells.PLACEMENT_POLICIES)
COLLISIONS = ("auto", "alpha-free", "nearest-free", "sum", "max")
#: ``calopc generate --collisions``: :data:`COLLISIONS` and ``likelihood``, the cell-likelihood placement of models
#: that sample points independently given their shower (calopc.models.cells.place_likelihood)
GENERATE_COLLISIONS = (*COLLISIONS, "likelihood")
#: the help formatter of commands with an example epilog (keeps its line breaks)
FORMATTER = argparse.RawDescriptionHelpFormatter


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


def file_threshold_arg(s: str) -> float | str | None:
    """``voxelize --threshold``: also ``file``, the threshold recorded in the input's metadata."""
    return "file" if s.strip().lower() == "file" else threshold_arg(s)


file_threshold_arg.__name__ = "threshold"


# ----------------------------------------------------------------------------- shared options
class _OutputAction(argparse.Action):
    """Stores ``-o`` as a :class:`~pathlib.Path` and whether it was written with a trailing ``/`` (``output_slash``),
    which ``Path`` drops: ``-o newdir/`` names a folder."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, Path(str(values)))
        namespace.output_slash = _ends_in_slash(str(values))


def _ends_in_slash(s: str) -> bool:
    return len(s) > 1 and s.endswith(("/", os.sep))


def add_output(p: argparse.ArgumentParser, help: str, *, required: bool = False, default: Path | None = None,
               aliases: Sequence[str] = ()) -> None:
    """The ``-o/--output`` option (plus old spellings in ``aliases``, e.g. ``--out``); ``args.output_slash`` says
    whether it ended in ``/``."""
    p.add_argument("-o", "--output", *aliases, dest="output", action=_OutputAction, required=required, default=default,
                   help=help)
    p.set_defaults(output_slash=False)


def refuse_folder_name(raw: str | os.PathLike, cmd: str, example: str) -> None:
    """:class:`CLIError` when the file output ``raw`` ends in ``/`` (a folder name): ``cmd`` writes one file."""
    if _ends_in_slash(os.fspath(raw)):
        msg = (f"{os.fspath(raw)}: names a folder (it ends in /); {cmd} writes one file: give a file name, e.g. "
               f"{Path(raw) / example}")
        raise CLIError(msg)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: no bar on a terminal, no periodic log lines elsewhere."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal and no progress lines (every ~30 s) in logs "
                        "(default: show them)")


def add_threshold(p: argparse.ArgumentParser, default: float | None, extra: str = "") -> None:
    """``--threshold MEV|official`` with ``default`` (``None``: official)."""
    d = "official" if default is None else f"{default:g}"
    p.add_argument("--threshold", type=threshold_arg, default=default, metavar="MEV|official",
                   help=f"cells with less energy (MeV) are empty; 'official': the dataset's readout threshold "
                        f"(1 MeV ds1, 15.15 keV ds2/3){extra} (default: {d})")


def add_collisions(p: argparse.ArgumentParser) -> None:
    """``--collisions`` with the choices of :data:`COLLISIONS`."""
    p.add_argument("--collisions", choices=COLLISIONS, default="auto",
                   help="several points in one cell: auto (sum for points with a cell index, nearest-free for "
                        "continuous points), alpha-free (ignore the angle: distinct random alpha bins per (layer, r) "
                        "ring), nearest-free (move to the nearest free cell of the layer), sum, max "
                        "(default: %(default)s)")


def add_geometry(p: argparse.ArgumentParser, help: str, *, official_only: bool = False, default: str | None = None,
                 aliases: Sequence[str] = ()) -> None:
    """``--geometry``: a dataset name or a binning XML (``official_only``: one of the CaloChallenge datasets)."""
    kw = {}
    if official_only:
        from ..geometry import DATASETS

        kw["choices"] = DATASETS
    p.add_argument("--geometry", *aliases, dest="geometry", default=default, help=help, **kw)


def one_output(args: argparse.Namespace, cmd: str) -> Path:
    """The output of a command that takes it as a positional ``OUTPUT`` or as ``-o`` (not both, not neither)."""
    pos, opt = args.output_pos, args.output
    if pos is not None and opt is not None and Path(pos) != Path(opt):
        msg = f"two outputs given ({pos} and -o {opt}); give one"
        raise CLIError(msg)
    if pos is None and opt is None:
        msg = f"no output file; e.g. 'calopc {cmd} showers.hdf5' or 'calopc {cmd} -o showers.hdf5'"
        raise CLIError(msg)
    refuse_folder_name(pos if pos is not None else (f"{opt}/" if args.output_slash else opt), cmd, "showers.hdf5")
    return Path(pos if pos is not None else opt)
