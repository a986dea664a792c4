r"""``calopc evaluate GEN REF -o DIR`` and ``calopc compare REF GEN... -o DIR`` (registered by :mod:`calopc.cli`;
no heavy imports here: the library, :mod:`calopc.eval`, loads when a command runs)."""

from __future__ import annotations

__all__ = ["register", "register_compare"]

import argparse
from pathlib import Path

_METRICS = ("hist", "cls-low", "cls-low-normed", "cls-high", "cls-cnn", "cls-sparse", "fpd", "kpd", "prdc", "pointcloud",
            "plots", "displays")
_DEFAULT = "hist,cls-low,cls-high,fpd,kpd,pointcloud,plots"


def _metrics(s: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in _METRICS]
    if bad:
        msg = f"unknown metrics {bad}; choose from {', '.join(_METRICS)}"
        raise argparse.ArgumentTypeError(msg)
    return items


def _formats(s: str) -> tuple[str, ...]:
    items = tuple(x.strip().lower() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in ("png", "pdf", "svg")]
    if bad or not items:
        msg = f"plot formats must be a comma-separated subset of png,pdf,svg, got {s!r}"
        raise argparse.ArgumentTypeError(msg)
    return items


def _four_ints(s: str) -> tuple[int, int, int, int]:
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        v = ()
    if len(v) != 4 or min(v) < 1:
        msg = f"expected 4 comma-separated positive integers, got {s!r}"
        raise argparse.ArgumentTypeError(msg)
    return v  # type: ignore[return-value]


#: the official ``evaluate.py --mode`` values and the calopc metrics that compute them
_OFFICIAL_MODES = {
    "all": None, "avg": ("plots",), "avg-E": ("plots",), "hist-p": ("hist", "plots"), "hist-chi": ("hist",),
    "hist": ("hist", "plots"), "cls-low": ("cls-low",), "cls-low-normed": ("cls-low-normed",),
    "cls-high": ("cls-high",), "cls-resnet": ("cls-cnn",), "fpd": ("fpd",), "kpd": ("kpd",), "prdc": ("prdc",),
}
_REPORT_FILES = ("metrics.json", "report.html", "*.png", "*.pdf", "*.txt", "*.csv")
_EPILOG = """\
examples:
  calopc evaluate gen.hdf5 dataset_2_2.hdf5 -o report/ --max-showers 10000
  calopc evaluate gen.parquet ref.hdf5 -o report/ --metrics hist,fpd,kpd,plots --device cuda
  # the official evaluate.py command line works too:
  calopc evaluate -i gen.hdf5 -r dataset_2_2.hdf5 -m all -d 2 --output_dir evaluation_results/
"""


def _resolve_official(args: argparse.Namespace) -> None:
    """Turn the official evaluate.py spellings (-i, -r, -m, --no_cuda, ...) into calopc's options."""
    from .options import CLIError

    for pos, opt, flag in (("generated", "input_file", "-i/--input_file"), ("reference", "reference_file",
                                                                             "-r/--reference_file")):
        a, b = getattr(args, pos), getattr(args, opt)
        if a is not None and b is not None and a != b:
            msg = f"{pos} sample given twice ({a} and {flag} {b}); give it once"
            raise CLIError(msg)
        if a is None and b is None:
            msg = f"no {pos} sample; usage: calopc evaluate GEN REF -o DIR (or -i GEN -r REF --output_dir DIR)"
            raise CLIError(msg)
        setattr(args, pos, a if a is not None else b)
    if args.output is None:
        if args.input_file is None and args.reference_file is None:
            msg = "no report folder; pass -o/--output DIR"
            raise CLIError(msg)
        args.output = Path("evaluation_results")  # the official default
    if args.mode is not None:
        if args.metrics_given:
            msg = "give either --metrics or -m/--mode, not both"
            raise CLIError(msg)
        mapped = _OFFICIAL_MODES[args.mode]
        metrics = _metrics(_DEFAULT) if mapped is None else mapped
        missing = [m for m in metrics if m not in _METRICS]
        if missing:
            msg = f"mode {args.mode!r} needs metric(s) {', '.join(missing)}, which this calopc does not provide"
            raise CLIError(msg)
        args.metrics = metrics
    if not args.metrics:
        msg = f"no metrics selected; choose from {', '.join(_METRICS)}"
        raise CLIError(msg)
    if args.no_cuda:
        args.device = "cpu"
    elif args.which_cuda is not None:
        args.device = "cuda" if args.which_cuda == 0 else f"cuda:{args.which_cuda}"


def _run_checked(args: argparse.Namespace) -> int:
    """:func:`_run` after the option checks, with the report folder locked."""
    from ..io import check_not_input, check_writable, lock_output

    _resolve_official(args)
    out = Path(args.output)
    check_not_input(out, [args.generated, args.reference], folder=True, names=_REPORT_FILES)
    check_writable(out, folder=True, expected_bytes=20e6)
    with lock_output(out, "report folder"):  # a second evaluate into the same folder fails at once (one line)
        return _run(args)


def _removing_new_entries(out: Path, run):
    """``run()``; if it fails or is interrupted, entries of ``out`` that it created are removed (the library builds
    its reports beside the folder and swaps them in, so normally there are none; this also covers code that writes
    into the folder directly)."""
    import shutil

    existed = out.exists()
    before = set(out.iterdir()) if existed else set()
    try:
        return run()
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for q in set(out.iterdir()) - before:
                if q.is_dir() and not q.is_symlink():
                    shutil.rmtree(q, ignore_errors=True)
                else:
                    q.unlink(missing_ok=True)
        raise


def _run(args: argparse.Namespace) -> int:
    from ..eval.evaluate import evaluate
    from ..geometry import load_geometry

    res = _removing_new_entries(Path(args.output), lambda: evaluate(
        args.generated, args.reference, args.output,
        geometry=load_geometry(args.geometry) if args.geometry else None,
        threshold=args.threshold, metrics=args.metrics, max_showers=args.max_showers,
        cls_epochs=args.cls_epochs, cls_seeds=args.cls_seeds, cls_hidden=args.cls_hidden,
        cls_batch_size=args.cls_batch_size, cls_dtype=args.cls_dtype, fpd_min_samples=args.fpd_min_samples, kpd_batch_size=args.kpd_batch_size,
        cnn_options={k: v for k, v in (("widths", args.cnn_widths), ("blocks", args.cnn_blocks)) if v is not None},
        fpd_estimator=args.fpd_estimator, test_permutations=args.test_permutations, low_normed=args.low_normed, prdc_k=args.prdc_k,
        collisions=args.collisions, device=args.device, seed=args.seed, progress=not args.no_progress,
        formats=args.formats, plot_workers=args.plot_workers,
    ))
    print(summary_lines(res, Path(args.output)))
    return 0


def summary_lines(res: dict, output: Path | None = None) -> str:
    """The summary ``calopc evaluate`` prints: each metric with its calibrated reading."""
    from ..eval.permutation import reading

    def read(t: dict | None) -> str:
        return (t.get("reading") or reading(t)) if t else "(not tested)"

    lines = [f"dataset {res['dataset']}: {res['n_generated']} generated vs {res['n_reference']} reference showers"]
    for kind, c in res.get("classifier", {}).items():
        err = "" if c.get("auc_err") is None or len(c.get("aucs") or ()) < 2 else f" ± {c['auc_err']:.4f}"
        jerr = "" if c.get("jsd_err") is None or len(c.get("jsds") or ()) < 2 else f" ± {c['jsd_err']:.4f}"
        lines.append(f"  classifier {kind:<10} AUC {c['auc']:.4f}{err}   JSD {c['jsd']:.4f}{jerr}   "
                     f"{read(c.get('test'))}")
        if c.get("jsd_note"):
            lines.append(f"    {c['jsd_note']}")
    for key, label in (("fpd_x1e3", "FPD x1e3"), ("kpd_x1e3", "KPD x1e3")):
        if key in res:
            d = res[key]
            t = d.get("test") or {}
            null = (f", same distribution at these sizes {t['null_mean']:.3f} ± {t['null_sd']:.3f}"
                    if t.get("null_mean") is not None and t.get("null_sd") is not None else "")
            lines.append(f"  {label} ({d['estimator']} estimator): {d['value']:.3f} ± {d['error']:.3f}   {read(t)}; "
                         f"test statistic {t.get('observed', float('nan')):.3f}{null}")
    if "prdc" in res:
        p = res["prdc"]
        lines.append(f"  PRDC (k={p['k']}): precision {p['precision']:.3f}, recall {p['recall']:.3f}, "
                     f"density {p['density']:.3f}, coverage {p['coverage']:.3f}")
    st = res.get("separation_test") or {}
    for key, label in (("E_ratio", "separation E_dep/E_inc"), ("mean", "separation, mean of all")):
        t = st.get(key)
        if t:
            lines.append(f"  {label}: {t['observed']:.4f} (same distribution at these sizes: {t['null_mean']:.4f} ± "
                         f"{t['null_sd']:.4f})   {read(t)}")
    summ = res.get("separation_summary", {})
    if summ:
        lines.append("  separation power: " + ", ".join(f"{k} {v:.4f}" for k, v in summ.items()))
    if "pointcloud" in res:
        pc = res["pointcloud"]["hits_mean"]
        lines.append(f"  points/shower: generated {pc['generated']:.1f}, reference {pc['reference']:.1f}")
    if output is not None:
        lines.append(f"wrote {output / 'metrics.json'} and {output / 'report.html'}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    from .options import COLLISIONS, positive_int, threshold_arg

    p = sub.add_parser("evaluate", help="compare a generated sample with a reference: CaloChallenge metrics, plots, report",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generated", type=Path, nargs="?", default=None,
                   help="generated sample: voxel HDF5 or point-cloud Parquet (official: -i/--input_file)")
    p.add_argument("reference", type=Path, nargs="?", default=None,
                   help="reference sample: voxel HDF5 or point-cloud Parquet (official: -r/--reference_file)")
    p.add_argument("-i", "--input_file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("-r", "--reference_file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", "--output_dir", dest="output", type=Path, default=None,
                   help="report folder (metrics.json, report.html, plots); required unless the official -i/-r are used "
                        "(then default: evaluation_results)")

    class _Metrics(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
            namespace.metrics, namespace.metrics_given = values, True

    p.add_argument("--metrics", type=_metrics, default=_metrics(_DEFAULT), action=_Metrics,
                   help=f"comma-separated subset of {','.join(_METRICS)} (default: {_DEFAULT}; displays: a page of "
                        "3-D shower displays, displays.html, needs plotly: pip install 'calopc[display]')")
    p.set_defaults(metrics_given=False)
    p.add_argument("-m", "--mode", choices=tuple(_OFFICIAL_MODES), default=None,
                   help="official evaluate.py mode instead of --metrics (all = the default metrics)")
    p.add_argument("--geometry", "-d", "--dataset", dest="geometry", default=None,
                   help="dataset name or binning XML (default: detected)")
    p.add_argument("--threshold", type=threshold_arg, default=None, metavar="MEV|official",
                   help="cells with less energy (MeV) are empty; 'official': the dataset's readout threshold "
                        "(1 MeV ds1, 15.15 keV ds2/3) (default: official)")
    p.add_argument("--max-showers", type=positive_int, default=None,
                   help="use only the first N showers of each file (default: all)")
    p.add_argument("--cls-epochs", "--cls_n_epochs", dest="cls_epochs", type=positive_int, default=50,
                   help="classifier epochs (default: %(default)s, official)")
    p.add_argument("--cls-seeds", type=positive_int, default=3, help="classifier trainings for mean ± std (default: %(default)s)")
    p.add_argument("--cls-hidden", "--cls_n_hidden", dest="cls_hidden", type=positive_int, default=2048,
                   help="classifier hidden units (default: %(default)s, official)")
    p.add_argument("--cls-batch-size", "--cls_batch_size", dest="cls_batch_size", type=positive_int, default=1000,
                   help="classifier batch size (default: %(default)s)")
    p.add_argument("--cls-dtype", choices=("float64", "float32"), default="float64",
                   help="DNN classifier precision: float64 (official) or float32 (about half the CPU time) "
                        "(default: %(default)s)")
    p.add_argument("--cnn-widths", type=_four_ints, default=None, metavar="W1,W2,W3,W4",
                   help="cls-cnn/cls-sparse stage widths (default: 32,64,64,128, official)")
    p.add_argument("--cnn-blocks", type=_four_ints, default=None, metavar="B1,B2,B3,B4",
                   help="cls-cnn/cls-sparse BasicBlocks per stage (default: 2,2,2,2 = ResNet-18, official)")
    p.add_argument("--fpd-min-samples", type=positive_int, default=10_000, help="smallest FPD batch (default: %(default)s)")
    p.add_argument("--kpd-batch-size", type=positive_int, default=10_000, help="KPD batch size (default: %(default)s)")
    p.add_argument("--fpd-estimator", choices=("official", "calopc"), default="official",
                   help="FPD/KPD estimator: official (jetnet: batches with replacement, bounded fit; the published "
                        "numbers) or calopc (without replacement) (default: %(default)s)")
    p.add_argument("--test-permutations", type=positive_int, default=99,
                   help="label shuffles of the calibrated 'differs / no difference found' tests of FPD, KPD and the "
                        "separation powers (default: %(default)s; at least 19 for a 5 %% test)")
    p.add_argument("--low-normed", choices=("official", "calopc"), default="official",
                   help="cls-low-normed input: official (unthresholded voxels / thresholded layer energy) or calopc "
                        "(thresholded voxels) (default: %(default)s)")
    p.add_argument("--prdc-k", "--prdc_k", dest="prdc_k", type=positive_int, default=5, help="nearest neighbours for PRDC (default: %(default)s, official)")
    p.add_argument("--collisions", choices=COLLISIONS, default="auto",
                   help="re-voxelization policy for point-cloud inputs: auto (sum for points with a cell index, "
                        "nearest-free for continuous points), alpha-free, nearest-free, sum, max, as in 'calopc "
                        "voxelize' (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="classifier device (default: %(default)s)")
    p.add_argument("--no_cuda", action="store_true", help=argparse.SUPPRESS)  # official: --device cpu
    p.add_argument("--which_cuda", type=int, default=None, help=argparse.SUPPRESS)  # official: --device cuda
    p.add_argument("--save_mem", action="store_true", help=argparse.SUPPRESS)  # official; calopc always streams
    p.add_argument("--seed", type=int, default=0, help="seed of splits and trainings (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--formats", type=_formats, default=("png",),
                   help="plot file formats, comma-separated subset of png,pdf,svg (default: png)")
    p.add_argument("--plot-workers", type=positive_int, default=None,
                   help="processes drawing the plots (default: the CPUs available, at most 16; 1 = serial)")
    p.set_defaults(func=_run_checked)
    register_compare(sub)


# ------------------------------------------------------------------------------------------ compare
def _run_compare(args: argparse.Namespace) -> int:
    """``calopc compare`` after the option checks, with the output folder locked (as evaluate's report folder)."""
    from ..eval.compare import parse_generated
    from ..io import check_not_input, check_writable, lock_output

    gens = parse_generated(args.generated)
    out = Path(args.output)
    check_not_input(out, [args.reference, *gens.values()], folder=True, names=("compare.json", "report.html", "*.png"))
    check_writable(out, folder=True, expected_bytes=20e6 * (1 + len(gens)))
    with lock_output(out, "comparison folder"):  # a second compare into the same folder fails at once (one line)
        return _compare_locked(args, gens, out)


def _compare_locked(args: argparse.Namespace, gens: dict[str, Path], out: Path) -> int:
    from ..eval.compare import MultiClassConfig, compare
    from ..geometry import load_geometry

    metrics = tuple(x.strip() for x in args.metrics.split(",") if x.strip()) if args.metrics else ()
    res = _removing_new_entries(out, lambda: compare(
        args.reference, gens, out, runs=args.runs,
        multiclass=MultiClassConfig(hidden=(args.hidden,) * 2, epochs=args.epochs, batch_size=args.batch_size),
        metrics=metrics, geometry=load_geometry(args.geometry) if args.geometry else None, threshold=args.threshold,
        max_showers=args.max_showers, collisions=args.collisions, device=args.device, seed=args.seed,
        progress=not args.no_progress, cls_epochs=args.cls_epochs, cls_seeds=args.cls_seeds, cls_hidden=args.cls_hidden,
        fpd_estimator=args.fpd_estimator, fpd_min_samples=args.fpd_min_samples, kpd_batch_size=args.kpd_batch_size,
    ))
    print(compare_lines(res, out))
    return 0


def compare_lines(res: dict, output: Path | None = None) -> str:
    """What ``calopc compare`` prints: one leaderboard line per generator and the log-posterior matrix."""
    lines = []
    for r in res["leaderboard"]:
        parts = [f"{r['name']:<16}"]
        for key, label in (("auc_low", "AUC low"), ("auc_high", "AUC high"), ("fpd_x1e3", "FPD"), ("kpd_x1e3", "KPD"),
                           ("log_p_self", "log p(self)"), ("log_p_reference", "log p(ref)")):
            if r.get(key) is not None:
                parts.append(f"{label} {r[key]:.4g}")
        lines.append("  ".join(parts))
    lp = res.get("log_posterior")
    if lp:
        runs = len(lp["runs"])
        lines.append(f"log-posterior matrix <log p(class | showers from row)> ({lp['n_validation']} validation showers "
                     f"per class, {'mean of ' + str(runs) + ' runs' if runs > 1 else 'one run'}):")
        width = max(8, *(len(n) for n in lp["names"]))
        lines.append(f"  {'showers from':<16}" + " ".join(f"{n:>{width}}" for n in lp["names"]))
        for j, n in enumerate(lp["names"]):
            lines.append(f"  {n:<16}" + " ".join(f"{v:{width}.3f}" for v in lp["mean"][j]))
    if output is not None:
        lines.append(f"wrote {output / 'compare.json'} and {output / 'report.html'}")
    return "\n".join(lines)


def register_compare(sub: argparse._SubParsersAction) -> None:
    """Add ``calopc compare`` to the CLI."""
    from .options import COLLISIONS, positive_int, threshold_arg

    leaderboard = "hist,cls-low,cls-high,fpd,kpd,pointcloud"  # calopc.eval.compare.LEADERBOARD_METRICS (no import here)

    p = sub.add_parser("compare", help="compare several generated samples with one reference: multi-class "
                                       "log-posterior and a leaderboard",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  calopc compare dataset_2_2.hdf5 flow=gen_flow.hdf5 gen_gan.parquet -o cmp/ "
                              "--runs 10 --device cuda")
    p.add_argument("reference", type=Path, help="reference sample: voxel HDF5 or point-cloud Parquet")
    p.add_argument("generated", nargs="+", help="generated samples, PATH or NAME=PATH (name: the file stem by default)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (compare.json, report.html, plots)")
    p.add_argument("--runs", type=int, default=10,
                   help="multi-class trainings for mean ± std; 0: skip (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=50, help="multi-class epochs at most (default: %(default)s)")
    p.add_argument("--hidden", type=positive_int, default=2048,
                   help="multi-class hidden units, two layers (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="multi-class batch size (default: %(default)s)")
    p.add_argument("--metrics", default=leaderboard,
                   help="evaluate metrics per generator for the leaderboard; '' for none (default: %(default)s)")
    p.add_argument("--cls-epochs", type=positive_int, default=50, help="binary classifier epochs (default: %(default)s)")
    p.add_argument("--cls-seeds", type=positive_int, default=1, help="binary classifier trainings (default: %(default)s)")
    p.add_argument("--cls-hidden", type=positive_int, default=2048, help="binary classifier hidden units (default: %(default)s)")
    p.add_argument("--fpd-estimator", choices=("official", "calopc"), default="official",
                   help="FPD/KPD estimator (default: %(default)s)")
    p.add_argument("--fpd-min-samples", type=positive_int, default=10_000, help="smallest FPD batch (default: %(default)s)")
    p.add_argument("--kpd-batch-size", type=positive_int, default=10_000, help="KPD batch size (default: %(default)s)")
    p.add_argument("--geometry", default=None, help="dataset name or binning XML (default: detected)")
    p.add_argument("--threshold", type=threshold_arg, default=None, metavar="MEV|official",
                   help="cell threshold in MeV, or 'official' (default: the dataset's)")
    p.add_argument("--max-showers", type=positive_int, default=None, help="use only the first N showers of each file")
    p.add_argument("--collisions", choices=COLLISIONS, default="auto",
                   help="re-voxelization policy for point-cloud inputs, as in 'calopc evaluate' "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=_run_compare)
