r"""How often the calibrated readouts of ``calopc evaluate`` say "no difference found" for a perfect generator, and
how often they flag a known distortion ("differs"; all cell energies ×1.05).

For each dataset and sample size, ``--pairs`` pairs of samples are drawn from one pool of synthetic
showers (independent draws from one distribution: the pool's), their features computed once; each
pair gets the permutation tests of FPD, KPD, the E_dep/E_inc separation and the mean separation
(:func:`calopc.eval.distances.calibrated_tests`, :func:`calopc.eval.histograms.separation_tests`).
The same pairs with the generated half scaled by 1.05 give the detection rate. The old readout
(official value within 2 of its quoted errors of zero) is shown for comparison on the first pairs.

    python benchmarks/calibration.py                              # ds1-photons and ds2, 1k and 5k showers
    python benchmarks/calibration.py --cases 2:1000 --pairs 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _pool(name: str, n: int, seed: int, scale: float):
    from calopc.eval.features import apply_threshold, compute_features
    from calopc.geometry import Geometry
    from calopc.synth import generate

    g = Geometry.calochallenge(name)
    parts = []
    for i in range(0, n, 2000):
        inc, sh = generate(g, min(2000, n - i), seed=seed + i)
        sh = apply_threshold(np.asarray(sh, dtype=np.float64) * scale, g.threshold)
        parts.append(compute_features(sh, np.asarray(inc, dtype=np.float64), g))
    from calopc.eval.features import Features

    return g, Features.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1-photons:1000,2:1000,2:5000",
                    help="DATASET:N[:PAIRS],... (default: %(default)s; PAIRS default --pairs)")
    ap.add_argument("--pairs", type=int, default=100, help="pairs per case (default: %(default)s)")
    ap.add_argument("--permutations", type=int, default=19,
                    help="shuffles per test (default: %(default)s; any P with 0.05 (P+1) integer is exact)")
    ap.add_argument("--old-pairs", type=int, default=5, help="pairs on which the old readout is evaluated too")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    out = {"pairs": args.pairs, "permutations": args.permutations, "cases": {}}
    from calopc.eval.evaluate import one_blas_thread

    for case in args.cases.split(","):
        name, n, *rest = case.split(":")
        n = int(n)
        pairs = int(rest[0]) if rest else args.pairs
        with one_blas_thread():  # as evaluate runs them
            out["cases"][case] = _case(name, n, pairs, args)
    la = os.getloadavg()
    out["load_avg"] = la
    print(f"load average: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def _case(name: str, n: int, pairs: int, args) -> dict:
    from calopc.eval.distances import calibrated_tests, fpd, kpd
    from calopc.eval.features import high_level_vector
    from calopc.eval.histograms import separation_tests, shower_histogram_specs

    case = f"{name}:{n}"
    t0 = time.perf_counter()
    g, pool = _pool(name, 4 * n, seed=100, scale=1.0)
    _, pool_scaled = _pool(name, 4 * n, seed=100, scale=1.05)  # the same showers, energies ×1.05
    hl, hl_s = high_level_vector(pool), high_level_vector(pool_scaled)
    rng = np.random.default_rng(7)
    counts = {"same": {}, "x1.05": {}}
    old = {"fpd_zero": 0, "kpd_zero": 0, "n": 0}
    for i in range(pairs):
        a = rng.integers(0, len(hl), n)
        b = rng.integers(0, len(hl), n)
        for label, (fb, hb) in (("same", (pool, hl)), ("x1.05", (pool_scaled, hl_s))):
            res = calibrated_tests(hl[a], hb[b], permutations=args.permutations, seed=i)
            st = separation_tests(shower_histogram_specs(pool.select(a), fb.select(b), g, threshold=g.threshold),
                                  permutations=args.permutations, seed=i)
            res["E_ratio"], res["mean_sep"] = st["E_ratio"], st["mean"]
            for k, v in res.items():
                counts[label][k] = counts[label].get(k, 0) + bool(v["compatible"])
        if i < args.old_pairs:  # the old readout: official estimator's value within 2 errors of zero
            old["n"] += 1
            v, e = fpd(hl[a], hl[b], min_samples=10_000)
            old["fpd_zero"] += abs(v / e) <= 2 if e > 0 else v == 0
            v, e = kpd(hl[a], hl[b], batch_size=10_000)
            old["kpd_zero"] += abs(v / e) <= 2 if e > 0 else v == 0
    rates = {lab: {k: c / pairs for k, c in d.items()} for lab, d in counts.items()}
    result = {"pairs": pairs, "rates_compatible": rates, "old_readout_compatible": old,
              "seconds": time.perf_counter() - t0}
    s = rates["same"]
    d = rates["x1.05"]
    print(f"{case}: same distribution, 'no difference found' in " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s.items())
          + f" of {pairs} pairs (stated 95%; binomial ±{100 * np.sqrt(0.95 * 0.05 / pairs):.1f}%)")
    print(f"{' ' * len(case)}  x1.05 energies, flagged ('differs') in "
          + ", ".join(f"{k} {100 * (1 - v):.0f}%" for k, v in d.items()))
    if old["n"]:
        print(f"{' ' * len(case)}  old readout (official value within 2 quoted errors of 0): FPD "
              f"{old['fpd_zero']}/{old['n']}, KPD {old['kpd_zero']}/{old['n']} pairs read as no difference")
    print(f"{' ' * len(case)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
