r"""Time every stage of ``calopc evaluate`` on synthetic dataset-2 showers; plots serial vs parallel;
the FPD/KPD stage old vs new.

Run 1 is the full report (reading, histograms, point-cloud view, FPD, KPD, plots in parallel processes,
report); run 2 is the baseline of the plots stage in the same session: the same plots drawn in this
process (``--workers 1``). The FPD/KPD stage is then timed on the same features both ways: the old
stage (official FPD and KPD of the samples, plus the same two distances for a reference-vs-reference
floor of two halves and for the first half against the generated sample: six estimator calls) and the
new one (the official FPD and KPD once, plus the calibrated permutation tests that replace the floor);
the official values must agree (to BLAS rounding). Prints a table, the machine load, and writes JSON.

    python benchmarks/evaluate.py -n 1000 --official     # the audit's case: 1k vs 1k, official batch sizes
    python benchmarks/evaluate.py                        # 10k vs 10k, all CPUs for the plots
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


def _stage_compare(gen: Path, ref: Path, size: int, old_batches: int = 20) -> dict:
    """The FPD/KPD stage of evaluate, old procedure vs new, on the same features and settings.

    Old (as evaluate before issue 21): official FPD and KPD of the samples, of two reference halves (the
    floor) and of the first half against as many generated showers, numpy's BLAS with its default threads.
    New: official FPD and KPD once plus the calibrated permutation tests, BLAS on one thread (as evaluate
    now runs them). ``old_batches`` < 20 times the old FPD calls with fewer batches per size and scales
    their time by 20/old_batches (the cost is linear in the batches) on a machine too busy for the full run.
    """
    import warnings

    from calopc.eval.distances import calibrated_tests, fpd, kpd
    from calopc.eval.evaluate import one_blas_thread
    from calopc.eval.features import high_level_vector
    from calopc.eval.samples import load_sample

    hg = high_level_vector(load_sample(gen, keep_voxels=False).features)
    hr = high_level_vector(load_sample(ref, keep_voxels=False).features)
    m = min(len(hr) // 2, len(hg))
    old, times = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, func, kw in (("fpd", fpd, {"min_samples": size, "num_batches": old_batches}),
                               ("kpd", kpd, {"batch_size": size})):
            t, c = time.perf_counter(), _cpu()
            old[name] = func(hr, hg, seed=42, **kw)
            func(hr[:m], hr[m:2 * m], seed=42, **kw)  # the floor of the old readout
            func(hr[:m], hg[:m], seed=42, **kw)  # the value at the floor's size
            f = 20 / old_batches if name == "fpd" else 1.0
            times[name] = ((time.perf_counter() - t) * f, (_cpu() - c) * f)
        t, c = time.perf_counter(), _cpu()
        with one_blas_thread():
            new = {"fpd": fpd(hr, hg, seed=42, min_samples=size), "kpd": kpd(hr, hg, seed=42, batch_size=size)}
            tests = calibrated_tests(hr, hg)
        new_s, new_cpu = time.perf_counter() - t, _cpu() - c
    diff = {k: abs(old[k][0] - new[k][0]) / max(abs(new[k][0]), 1e-300) for k in old
            if k == "kpd" or old_batches == 20}
    return {"old_s": sum(v[0] for v in times.values()), "old_cpu_s": sum(v[1] for v in times.values()),
            "old_fpd_batches": old_batches, "new_s": new_s, "new_cpu_s": new_cpu,
            "official_rel_diff": diff, "values": {k: list(v) for k, v in new.items()},
            "tests": {k: {"p_value": v["p_value"], "compatible": v["compatible"]} for k, v in tests.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="showers per sample (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="plot processes of the parallel run (default: all CPUs)")
    ap.add_argument("--metrics", default="hist,cls-low,cls-high,fpd,kpd,pointcloud,plots",
                    help="metrics of the full run (default: %(default)s; add cls-high etc. to time classifiers)")
    ap.add_argument("--formats", default="png", help="plot formats (default: %(default)s)")
    ap.add_argument("--no-serial", action="store_true", help="skip the serial plots baseline")
    ap.add_argument("--official", action="store_true",
                    help="official FPD/KPD batch sizes (10,000) whatever -n (default: half the sample, at most 10,000)")
    ap.add_argument("--cls", default="2,64,1", metavar="EPOCHS,HIDDEN,SEEDS",
                    help="classifier settings when --metrics has cls-* (default: %(default)s, the audit's quick run)")
    ap.add_argument("--old-fpd-batches", type=int, default=20,
                    help="FPD batches per size of the timed old stage (default: %(default)s = the official; fewer "
                         "scales the time by 20/N on a very busy machine)")
    ap.add_argument("--no-stage-compare", action="store_true", help="skip the old-vs-new FPD/KPD stage timing")
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
        size = 10_000 if args.official else min(10_000, args.n // 2)
        ep, hid, sd = (int(x) for x in args.cls.split(","))
        common = dict(progress=False, formats=formats, fpd_min_samples=size, kpd_batch_size=size,
                      cls_epochs=ep, cls_hidden=hid, cls_seeds=sd, command="benchmarks/evaluate.py")
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
        stage = None if args.no_stage_compare else _stage_compare(base / "gen.hdf5", base / "ref.hdf5", size,
                                                                           args.old_fpd_batches)
    out = {"n": args.n, "metrics": list(metrics), "formats": list(formats), "cpus": os.cpu_count(),
           "machine": platform.platform(), "synth_s": t_synth, "runs": runs, "fpd_kpd_stage": stage,
           "load_avg": os.getloadavg()}
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
    if stage:
        proj = "" if stage["old_fpd_batches"] == 20 else f" (FPD timed with {stage['old_fpd_batches']} batches, x{20 / stage['old_fpd_batches']:g})"
        print(f"FPD/KPD stage, batch sizes {size}: old (6 official estimator calls, floor of reference halves, "
              f"default BLAS threads) {stage['old_s']:.1f} s wall / {stage['old_cpu_s']:.1f} s CPU{proj}; new (2 "
              f"official calls + calibrated permutation tests, 1 BLAS thread) {stage['new_s']:.1f} s wall / "
              f"{stage['new_cpu_s']:.1f} s CPU: {stage['old_s'] / stage['new_s']:.2f}x wall, "
              f"{stage['old_cpu_s'] / stage['new_cpu_s']:.2f}x CPU; official values, relative difference old vs new: "
              + ", ".join(f"{k} {v:.1e}" for k, v in stage["official_rel_diff"].items()))
        tot = runs["parallel"]["stages_s"]["total"]
        stages_new = sum(runs["parallel"]["stages_s"].get(k, 0.0) for k in ("fpd", "kpd", "fpd/kpd test"))
        if stages_new:
            out["old_total_projected_s"] = tot - stages_new + stage["old_s"]
            print(f"evaluate total: new {tot:.1f} s; old projected (the old FPD/KPD stage in place of the new) "
                  f"{out['old_total_projected_s']:.1f} s")
    la = os.getloadavg()
    print(f"load average during the run: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs "
          "(wall times scale with it; CPU seconds much less)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
