r"""``calopc download``: the CaloChallenge datasets from Zenodo, verified against their md5 sums.

:func:`register` adds the command to the ``calopc`` parser; the handler calls :func:`calopc.download.download`.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
from pathlib import Path

from .options import FORMATTER, add_progress, positive_float

_DATASETS = ("1-photons", "1-pions", "2", "3", "all")  # calopc.download.DOWNLOAD_DATASETS (not imported: --help stays light)

_EPILOG = """\
examples:
  calopc download 2 --dir data/                            # dataset_2_1.hdf5 (train), dataset_2_2.hdf5 (reference)
  calopc download 3 --dir data/ --files dataset_3_1.hdf5   # one file of dataset 3
  calopc download all --dir data/ --dry-run                # what would be downloaded, and from where

Files already in DIR are verified (md5), not downloaded again. An interrupted transfer is kept as
DIR/.NAME.partial and resumed by the next run. Mirrors: --mirror URL or CALOPC_DATA_URL (files at URL/NAME).
"""


def _cmd_download(args: argparse.Namespace) -> int:
    from ..download import file_url, select_files

    files = select_files(args.dataset, args.files)
    folder = Path(args.dir)
    if args.dry_run:
        for f in files:
            size = "size unknown" if f.size is None else f"{f.size / 1e6:,.0f} MB"
            state = "present (not verified)" if (folder / f.name).is_file() else "missing"
            print(f"{folder / f.name}  [{f.role}, {size}, md5 {f.md5}, {state}]  <- {file_url(f, args.mirror)}")
        return 0
    from ..download import download

    paths = download(args.dataset, folder, files=args.files, base_url=args.mirror, progress=not args.no_progress,
                     timeout=args.timeout)
    print(f"{len(paths)} file{'s' if len(paths) != 1 else ''} in {folder}, each matching its published md5 sum: "
          + ", ".join(p.name for p in paths))
    print(f"next: calopc info {paths[0]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``download`` to the ``calopc`` subparsers."""
    p = sub.add_parser("download", help="download the CaloChallenge datasets from Zenodo, verified against their "
                                        "md5 sums",
                       description="Download the files of a CaloChallenge 2022 dataset from its Zenodo record into "
                                   "DIR, each checked against its published md5 sum. Nothing else in calopc "
                                   "downloads anything.",
                       epilog=_EPILOG, formatter_class=FORMATTER)
    p.add_argument("dataset", choices=_DATASETS,
                   help="the dataset: 1-photons, 1-pions (Zenodo record 8099322), 2 (6366271), 3 (6366324) or all")
    p.add_argument("--dir", default=".", metavar="DIR", help="where the files go (created if missing; default: the "
                                                             "current folder)")
    p.add_argument("--files", nargs="+", metavar="NAME", default=None,
                   help="only these files of the dataset, e.g. dataset_3_1.hdf5 (default: all of them)")
    p.add_argument("--mirror", metavar="URL", default=None,
                   help="download from URL/NAME instead of Zenodo (default: $CALOPC_DATA_URL if set); the md5 sums "
                        "are checked all the same")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="seconds to wait for the server to connect or send more data (default: %(default)g)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files, their md5 sums and URLs and whether they are in DIR; download nothing")
    add_progress(p)
    p.set_defaults(func=_cmd_download)
