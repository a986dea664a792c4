r"""``calopc show FILE [FILE ...]``: showers drawn in 3-D as one interactive HTML page (registered by
:mod:`calopc.cli`; plotly and the readers load only when the command runs)."""

from __future__ import annotations

__all__ = ["STYLES", "register"]

import argparse
from pathlib import Path

from .options import FORMATTER, CLIError, add_collisions, add_geometry, add_output, add_threshold, refuse_folder_name

#: ``--style`` choices (:data:`calopc.display.STYLES`, kept here so that ``--help`` imports no numpy)
STYLES = ("auto", "markers", "cells")

_EPILOG = """\
examples:
  calopc show dataset_3_1.hdf5 --index 0 1 2            # the first three showers, one 3-D view
  calopc show ref.hdf5 gen.hdf5 --index 0 1 2 -o showers.html   # reference and generated side by side
  calopc show gen.parquet --index -1 --threshold 0      # the last shower, every non-zero cell
  calopc show flc.h5 --geometry 3                       # a showerdata file, projected onto dataset 3

The page embeds its JavaScript (plotly, ~4.6 MB) and opens offline in any browser: drag to turn (all
views turn together), scroll to zoom, the slider picks the shower, hover a cell for its layer, bins
and energy. Colour: log10(E / MeV), one scale for the page; faint cells are the low-energy halo.
Depth runs along the horizontal axis in mm (datasets 2, 3, hg: 3.4 mm per layer); dataset 1
records no depths, so its layers are drawn one unit apart and labelled by their id.
"""


def _cmd_show(args: argparse.Namespace) -> int:
    from ..display import write_display
    from ..geometry import load_geometry

    out = args.output
    if args.output_slash:
        refuse_folder_name(f"{out}/", "show", "showers.html")
    if out.suffix.lower() not in (".html", ".htm"):
        msg = f"{out}: show writes an HTML page; give a name ending in .html, e.g. {out.with_suffix('.html')}"
        raise CLIError(msg)
    if len(args.files) > 4:
        msg = f"{len(args.files)} files given; show draws one to four side by side"
        raise CLIError(msg)
    if args.labels is not None and len(args.labels) != len(args.files):
        msg = f"--labels needs one label per file: {len(args.files)} files, {len(args.labels)} labels"
        raise CLIError(msg)
    geometry = load_geometry(args.geometry) if args.geometry else None
    res = write_display(out, args.files, indices=args.index, labels=args.labels, geometry=geometry,
                        threshold="official" if args.threshold is None else args.threshold, style=args.style,
                        collisions=args.collisions)
    views = f"{len(args.files)} files side by side" if len(args.files) > 1 else "1 file"
    dataset = res["geometry"] if not res["geometry"][0].isdigit() else f"dataset {res['geometry']}"
    print(f"wrote {out}: showers {', '.join(map(str, res['indices']))} of {views} ({dataset}, {res['style']}, "
          f"{res['bytes'] / 1e6:.1f} MB); open it in a browser (it works offline)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``show`` to the ``calopc`` parser."""
    p = sub.add_parser("show", help="draw showers in 3-D: an interactive HTML page (offline), files side by side",
                       formatter_class=FORMATTER, epilog=_EPILOG)
    p.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="one to four shower files of one geometry, one 3-D view each: CaloChallenge HDF5, calopc "
                        "Parquet (point clouds; continuous points are binned with --collisions) or showerdata HDF5")
    p.add_argument("--index", "-i", type=int, nargs="+", default=None, metavar="I",
                   help="the showers to draw (rows of every file; negative counts from the end; the slider steps "
                        "through them) (default: the first five)")
    add_output(p, "the HTML page (default: %(default)s)", default=Path("showers.html"))
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="a title per file (default: the file names)")
    add_geometry(p, "dataset name or binning XML (default: detected, or the file's metadata; needed for showerdata "
                    "files that calopc did not write)")
    add_threshold(p, None, "; cells below it are not drawn")
    p.add_argument("--style", choices=STYLES, default="auto",
                   help="markers: one marker per cell, sized by the cell (fast, ~50 bytes a cell); cells: the true "
                        "annular sectors (about 10x the bytes); auto: cells for geometries with full-ring layers "
                        "(dataset 1), else markers (default: %(default)s)")
    add_collisions(p)
    p.set_defaults(func=_cmd_show)
