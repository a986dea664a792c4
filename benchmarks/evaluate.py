r"""Time every stage of ``calopc evaluate`` on synthetic dataset-2 showers; plots serial vs parallel.

Run 1 is the full report (reading, histograms, point-cloud view, FPD, KPD, plots in parallel processes,
report); run 2 is the baseline of the plots stage in the same session: the same plots drawn in this
process (``--workers 1``). Prints a table and writes JSON.

    python benchmarks/evaluate.py                    # 10k vs 10k, all CPUs for the plots
    python benchmarks/evaluate.py -n 2000 --workers 2 --json bench-out/evaluate.json
    python benchmarks/evaluate.py --metrics hist,plots --formats png,pdf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    """CPU seconds of this process (the plot workers report theirs in ``timings_s["plots_cpu"]``)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="showers per sample (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="plot processes of the parallel run (default: all CPUs)")
    ap.add_argument("--metrics", default="hist,pointcloud,fpd,kpd,plots",
                    help="metrics of the full run (default: %(default)s; add cls-high etc. to time classifiers)")
    ap.add_argument("--formats", default="png", help="plot formats (default: %(default)s)")
    ap.add_argument("--no-serial", action="store_true", help="skip the serial plots baseline")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the reports in this folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")

    from calopc.eval import evaluate
    from calopc.eval.plots import default_workers
    from calopc.io import write_showers
    from calopc.synth import generate

    metrics = tuple(m for m in args.metrics.split(",") if m)
    formats = tuple(f for f in args.formats.split(",") if f)
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_showers(base / "ref.hdf5", *generate("2", args.n, seed=1))
        write_showers(base / "gen.hdf5", *generate("2", args.n, seed=2))
        t_synth = time.perf_counter() - t
        common = dict(progress=False, formats=formats, fpd_min_samples=min(10_000, args.n // 2),
                      kpd_batch_size=min(10_000, args.n // 2), command="benchmarks/evaluate.py")
        t, c = time.perf_counter(), _cpu()
        par = evaluate(base / "gen.hdf5", base / "ref.hdf5", base / "parallel", metrics=metrics, plot_workers=workers,
                       **common)
        wall_par = time.perf_counter() - t
        runs = {"parallel": {"workers": workers, "wall_s": wall_par, "cpu_s": _cpu() - c, "stages_s": par["timings_s"],
                             "figures": len(par.get("plots", {}))}}
        if not args.no_serial and "plots" in metrics:
            t, c = time.perf_counter(), _cpu()
            ser = evaluate(base / "gen.hdf5", base / "ref.hdf5", base / "serial", metrics=("hist", "plots"),
                           plot_workers=1, **common)
            runs["serial_plots"] = {"workers": 1, "wall_s": time.perf_counter() - t, "cpu_s": _cpu() - c,
                                    "stages_s": ser["timings_s"],
                                    "figures": len(ser.get("plots", {}))}
    out = {"n": args.n, "metrics": list(metrics), "formats": list(formats), "cpus": os.cpu_count(),
           "machine": platform.platform(), "synth_s": t_synth, "runs": runs}
    stages = sorted({k for r in runs.values() for k in r["stages_s"]}, key=lambda k: (k == "total", k))
    print(f"calopc evaluate, synthetic ds2, {args.n} vs {args.n} showers, {os.cpu_count()} CPUs, "
          f"formats {args.formats}")
    print(f"{'stage':<12}" + "".join(f"{name + ' (w=' + str(r['workers']) + ')':>22}" for name, r in runs.items()))
    for s in stages:
        print(f"{s:<12}" + "".join(f"{r['stages_s'][s]:>21.1f}s" if s in r["stages_s"] else f"{'–':>22}"
                                   for r in runs.values()))
    if "serial_plots" in runs:
        sp, pp = runs["serial_plots"]["stages_s"]["plots"], runs["parallel"]["stages_s"]["plots"]
        out["plots_speedup"] = sp / pp
        print(f"plots: {runs['parallel']['figures']} figures, serial {sp:.1f} s, {workers} workers {pp:.1f} s: "
              f"{sp / pp:.2f}x")
    print(f"full report (parallel plots): {runs['parallel']['stages_s']['total']:.1f} s wall")
    # CPU seconds do not depend on other load on the machine; wall seconds do
    for name, r in runs.items():
        pc = r["stages_s"].get("plots_cpu")
        main_cpu = r["cpu_s"] - (pc if r["workers"] == 1 and pc else 0.0)
        print(f"{name}: CPU s in this process {r['cpu_s']:.1f}" + (
            f", drawing {pc:.1f} ({pc / max(r['figures'], 1):.2f} per figure); "
            f"non-plot CPU {main_cpu:.1f}" if pc else ""))
    pc = runs["parallel"]["stages_s"].get("plots_cpu")
    if pc:
        out["projected_plots_s"] = {w: pc / w for w in (1, 2, 4, 8, 16)}
        print("plots on an idle machine (drawing CPU / workers, before start-up and imbalance): "
              + ", ".join(f"{w} workers {pc / w:.1f} s" for w in (1, 2, 4, 8, 16)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
