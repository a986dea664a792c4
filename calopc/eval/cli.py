r"""``calopc evaluate GEN REF -o DIR`` (registered by :mod:`calopc.cli`; no heavy imports here)."""

from __future__ import annotations

__all__ = ["register"]

import argparse
from pathlib import Path

_METRICS = ("hist", "cls-low", "cls-low-normed", "cls-high", "fpd", "kpd", "pointcloud", "plots")
_DEFAULT = "hist,cls-low,cls-high,fpd,kpd,pointcloud,plots"


def _metrics(s: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in _METRICS]
    if bad:
        msg = f"unknown metrics {bad}; choose from {', '.join(_METRICS)}"
        raise argparse.ArgumentTypeError(msg)
    return items


def _run(args: argparse.Namespace) -> int:
    from ..geometry import load_geometry
    from .evaluate import evaluate

    res = evaluate(
        args.generated, args.reference, args.output,
        geometry=load_geometry(args.geometry) if args.geometry else None,
        threshold=args.threshold, metrics=args.metrics, max_showers=args.max_showers,
        cls_epochs=args.cls_epochs, cls_seeds=args.cls_seeds, cls_hidden=args.cls_hidden,
        cls_batch_size=args.cls_batch_size, fpd_min_samples=args.fpd_min_samples, kpd_batch_size=args.kpd_batch_size,
        collisions=args.collisions, device=args.device, seed=args.seed, progress=not args.no_progress,
    )
    print(f"dataset {res['dataset']}: {res['n_generated']} generated vs {res['n_reference']} reference showers")
    for kind, c in res.get("classifier", {}).items():
        print(f"  classifier {kind:<10} AUC {c['auc']:.4f} ± {c['auc_err'] or 0:.4f}   JSD {c['jsd']:.4f} ± {c['jsd_err'] or 0:.4f}")
    for key, label in (("fpd_x1e3", "FPD x1e3"), ("kpd_x1e3", "KPD x1e3")):
        if key in res:
            d = res[key]
            print(f"  {label}: {d['value']:.3f} ± {d['error']:.3f}   (reference-vs-reference floor {d['ref_floor']:.3f} ± {d['ref_floor_error']:.3f})")
    summ = res.get("separation_summary", {})
    if summ:
        print("  separation power: " + ", ".join(f"{k} {v:.4f}" for k, v in summ.items()))
    if "pointcloud" in res:
        pc = res["pointcloud"]["hits_mean"]
        print(f"  points/shower: generated {pc['generated']:.1f}, reference {pc['reference']:.1f}")
    print(f"wrote {Path(args.output) / 'metrics.json'} and {Path(args.output) / 'report.html'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="compare a generated sample with a reference: CaloChallenge metrics, plots, report")
    p.add_argument("generated", type=Path, help="generated sample: voxel HDF5 or point-cloud Parquet")
    p.add_argument("reference", type=Path, help="reference sample: voxel HDF5 or point-cloud Parquet")
    p.add_argument("-o", "--output", type=Path, required=True, help="report folder (metrics.json, report.html, plots)")
    p.add_argument("--metrics", type=_metrics, default=_metrics(_DEFAULT),
                   help=f"comma-separated subset of {','.join(_METRICS)} (default: {_DEFAULT})")
    p.add_argument("--geometry", default=None, help="dataset name or binning XML (default: detected)")
    p.add_argument("--threshold", type=float, default=None,
                   help="cell threshold in MeV (default: 1 for dataset 1, 0.01515 for datasets 2 and 3)")
    p.add_argument("--max-showers", type=int, default=None, help="use only the first N showers of each file (default: all)")
    p.add_argument("--cls-epochs", type=int, default=50, help="classifier epochs (default: %(default)s, official)")
    p.add_argument("--cls-seeds", type=int, default=3, help="classifier trainings for mean ± std (default: %(default)s)")
    p.add_argument("--cls-hidden", type=int, default=2048, help="classifier hidden units (default: %(default)s, official)")
    p.add_argument("--cls-batch-size", type=int, default=1000, help="classifier batch size (default: %(default)s)")
    p.add_argument("--fpd-min-samples", type=int, default=10_000, help="smallest FPD batch (default: %(default)s)")
    p.add_argument("--kpd-batch-size", type=int, default=10_000, help="KPD batch size (default: %(default)s)")
    p.add_argument("--collisions", choices=("sum", "max", "nearest-free"), default="sum",
                   help="re-voxelization policy for point-cloud inputs (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="classifier device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits and trainings (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=_run)
