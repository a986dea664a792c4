r"""Parity and speed figures of the evaluation: FPD/KPD estimators, blocked PRDC, ``calopc compare``.

Parts (``--part``, default all):

* ``fpd``: FPD and KPD (×10³) of two *same-distribution* synthetic dataset-2 samples of ``--n-fpd``
  showers each (362 high-level features), with the official estimator (jetnet's, with replacement,
  batches 10k–50k) and with calopc's (without replacement), both with the CaloChallenge settings
  (``min_samples=10_000``, ``batch_size=10_000``); wall time of each.
* ``prdc``: blocked PRDC (``calopc.eval.prdc.prdc``) on ``--n-prdc`` × ``--n-prdc`` synthetic
  dataset-2 showers (6480 log10 voxels) on the CPU, float64 and float32, and on CUDA when there is
  one; at ``--n-small`` also the direct O(N²) computation (and the ``prdc`` package when importable)
  as the baseline of the same run, with the ratio.
* ``compare``: wall time of ``calopc.eval.compare.compare`` on three tiny generators
  (``--n-compare`` dataset-1 photon showers each; leaderboard metrics with FPD/KPD batches of
  ``--batch`` and ``--runs`` multi-class trainings of ``--epochs`` epochs, ``--hidden`` units).

Prints one line per figure and writes ``parity.json`` into ``--workdir``.

Usage::

    python benchmarks/parity.py [--part fpd,prdc,compare] [--n-fpd 4000] [--n-prdc 10000] [--workdir bench-parity]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def _hl(n: int, seed: int):
    from calopc.eval.features import apply_threshold, compute_features, high_level_vector
    from calopc.geometry import Geometry
    from calopc.synth import generate

    g = Geometry.calochallenge("2")
    inc, sh = generate(g, n, seed=seed)
    return high_level_vector(compute_features(apply_threshold(sh, g.threshold), inc, g))


def part_fpd(args, out: dict) -> None:
    import warnings

    from calopc.eval.distances import fpd, kpd

    a, b = _hl(args.n_fpd, 101), _hl(args.n_fpd, 202)
    res = {}
    for est in ("official", "calopc"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = time.perf_counter()
            fv, fe = fpd(a, b, estimator=est, min_samples=10_000)
            tf = time.perf_counter() - t
            t = time.perf_counter()
            kv, ke = kpd(a, b, estimator=est, batch_size=10_000)
            tk = time.perf_counter() - t
        res[est] = {"fpd_x1e3": fv * 1e3, "fpd_err_x1e3": fe * 1e3, "fpd_s": tf,
                    "kpd_x1e3": kv * 1e3, "kpd_err_x1e3": ke * 1e3, "kpd_s": tk}
        print(f"[fpd] {est:>8}: FPD×1e3 {fv * 1e3:9.3f} ± {fe * 1e3:.3f} ({tf:.1f} s)   "
              f"KPD×1e3 {kv * 1e3:8.4f} ± {ke * 1e3:.4f} ({tk:.1f} s)   "
              f"[{args.n_fpd} vs {args.n_fpd} ds2, same distribution]")
    r = res["official"]["fpd_x1e3"] / res["calopc"]["fpd_x1e3"] if res["calopc"]["fpd_x1e3"] else float("nan")
    print(f"[fpd] official / calopc FPD ratio: {r:.2f}")
    out["fpd"] = {"n": args.n_fpd, **res, "official_over_calopc": r}


def part_prdc(args, out: dict) -> None:
    import numpy as np
    import torch

    from calopc.eval.prdc import prdc, prdc_direct, prdc_features
    from calopc.geometry import Geometry
    from calopc.synth import generate

    torch.set_num_threads(args.threads)
    g = Geometry.calochallenge("2")

    def feats(n, seed):
        inc, sh = generate(g, n, seed=seed)
        return prdc_features(np.where(sh < g.threshold, 0.0, sh))

    res: dict = {}
    a, b = feats(args.n_small, 1), feats(args.n_small, 2)
    t = time.perf_counter()
    d = prdc_direct(a, b)
    td = time.perf_counter() - t
    t = time.perf_counter()
    p = prdc(a, b, device="cpu")
    tb = time.perf_counter() - t
    res["small"] = {"n": args.n_small, "direct_s": td, "blocked_s": tb, "equal": d == p, "direct_over_blocked": td / tb}
    print(f"[prdc] {args.n_small}×{args.n_small}: direct O(N²) {td:.2f} s, blocked float64 {tb:.2f} s "
          f"(×{td / tb:.1f}), identical results: {d == p}")
    try:
        from prdc import compute_prdc  # the reference package, when installed

        t = time.perf_counter()
        ref = compute_prdc(a.astype(np.float64), b.astype(np.float64), 5)
        tr = time.perf_counter() - t
        same = all(abs(float(ref[k]) - getattr(p, k)) < 1e-12 for k in ("precision", "recall", "density", "coverage"))
        res["small"].update({"prdc_package_s": tr, "prdc_package_equal": same, "package_over_blocked": tr / tb})
        print(f"[prdc] {args.n_small}×{args.n_small}: prdc package {tr:.2f} s (×{tr / tb:.1f} of blocked), "
              f"equal: {same}")
    except ImportError:
        pass
    a, b = feats(args.n_prdc, 3), feats(args.n_prdc, 4)
    devices = [("cpu", "float64"), ("cpu", "float32")] + ([("cuda", "float32")] if torch.cuda.is_available() else [])
    for dev, dt in devices:
        t = time.perf_counter()
        r = prdc(a, b, device=dev, dtype=dt, block=args.block)
        if dev == "cuda":
            torch.cuda.synchronize()
        el = time.perf_counter() - t
        pairs = 3 * args.n_prdc**2
        res[f"{dev}_{dt}"] = {"s": el, "pairs_per_s": pairs / el, **r.as_dict()}
        print(f"[prdc] {args.n_prdc}×{args.n_prdc} on {dev} {dt}: {el:.1f} s ({pairs / el / 1e6:.1f} M pairs/s), "
              f"P {r.precision:.3f} R {r.recall:.3f} D {r.density:.3f} C {r.coverage:.3f}")
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    res["threads"] = args.threads
    out["prdc"] = res


def part_compare(args, out: dict) -> None:
    import tempfile

    from calopc.eval.compare import MultiClassConfig, compare
    from calopc.geometry import Geometry
    from calopc.io import write_showers
    from calopc.synth import generate

    g = Geometry.calochallenge("1-photons")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_showers(tmp / "ref.hdf5", *generate(g, args.n_compare, seed=1))
        gens = {}
        for i, scale in enumerate((1.0, 1.05, 1.3)):
            inc, sh = generate(g, args.n_compare, seed=10 + i)
            gens[f"gen{i}"] = tmp / f"gen{i}.hdf5"
            write_showers(gens[f"gen{i}"], inc, sh * scale)
        t = time.perf_counter()
        res = compare(tmp / "ref.hdf5", gens, Path(args.workdir) / "compare", runs=args.runs,
                      multiclass=MultiClassConfig(hidden=(args.hidden,) * 2, epochs=args.epochs),
                      cls_epochs=args.epochs, cls_seeds=1, cls_hidden=args.hidden, fpd_min_samples=args.batch,
                      kpd_batch_size=args.batch, device="cpu", progress=False)
        el = time.perf_counter() - t
    print(f"[compare] 3 generators × {args.n_compare} ds1-photon showers, {args.runs} multi-class runs × {args.epochs} "
          f"epochs, hidden {args.hidden}: {el:.1f} s")
    for k, v in res["timings_s"].items():
        print(f"[compare]   {k}: {v:.1f} s")
    lp = res["log_posterior"]
    diag = ", ".join(f"{n} {lp['mean'][i][i]:.3f}" for i, n in enumerate(lp["names"]))
    print(f"[compare] log-posterior diagonal: {diag}")
    out["compare"] = {"s": el, "timings_s": res["timings_s"], "n": args.n_compare, "runs": args.runs,
                      "epochs": args.epochs, "hidden": args.hidden}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="fpd,prdc,compare", help="comma-separated parts (default: %(default)s)")
    ap.add_argument("--n-fpd", type=int, default=4000, help="showers per sample for FPD/KPD (default: %(default)s)")
    ap.add_argument("--n-prdc", type=int, default=10_000, help="showers per sample for PRDC (default: %(default)s)")
    ap.add_argument("--n-small", type=int, default=1000,
                    help="PRDC size with the direct baseline (default: %(default)s)")
    ap.add_argument("--block", type=int, default=4096, help="PRDC tile size (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--n-compare", type=int, default=1000, help="showers per sample for compare (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="multi-class runs for compare (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs for compare's networks (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=256,
                    help="hidden units for compare's networks (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1000,
                    help="FPD smallest batch and KPD batch size for compare (official 10,000) (default: %(default)s)")
    ap.add_argument("--workdir", default="bench-parity", help="output folder (default: %(default)s)")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    out: dict = {}
    parts = {"fpd": part_fpd, "prdc": part_prdc, "compare": part_compare}
    for name in (x.strip() for x in args.part.split(",") if x.strip()):
        if name not in parts:
            ap.error(f"unknown part {name!r}; choose from {', '.join(parts)}")
        parts[name](args, out)
    (Path(args.workdir) / "parity.json").write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {Path(args.workdir) / 'parity.json'}")


if __name__ == "__main__":
    main()
