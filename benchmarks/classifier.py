r"""Classifier-metric speed: the official DNN set-up on CPU and, when present, CUDA.

Two independent synthetic dataset-2 samples (so AUC ≈ 0.5 is expected), the official
network (3 × 2048 hidden, batch 1000, lr 2e-4) in each precision of ``--dtypes`` (float64 is
the official one); prints seconds per epoch (training, the test accuracy of model selection;
the calibration once per training; wall and, on the CPU, the process's CPU seconds, which a
shared machine's load does not inflate) and the AUC/JSD for each device and precision, the
float32/float64 and the CUDA/CPU speed ratios (measured in the same invocation).

Usage::

    python benchmarks/classifier.py [--n 10000] [--epochs 5] [--kind low]
    python benchmarks/classifier.py --n 5000 --cpu-epochs 2 --threads 1 --dtypes float64,float32 --kind low,high
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="showers per sample (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per device (default: %(default)s)")
    ap.add_argument("--cpu-epochs", type=int, default=1, help="epochs on the CPU (default: %(default)s)")
    ap.add_argument("--kind", default="low", help="classifier inputs, comma-separated: low, low-normed, high "
                    "(default: %(default)s)")
    ap.add_argument("--dtypes", default="float64", help="precisions, comma-separated: float64 (official), float32 "
                    "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    kinds, dtypes = args.kind.split(","), args.dtypes.split(",")
    bad = [k for k in kinds if k not in ("low", "low-normed", "high")] + [d for d in dtypes if d not in ("float64", "float32")]
    if bad:
        ap.error(f"unknown --kind/--dtypes values {bad}")

    import numpy as np
    import torch

    from calopc.eval import ClassifierConfig, classifier_inputs, classifier_metric, compute_features, high_level_vector
    from calopc.geometry import Geometry
    from calopc.synth import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    g = Geometry.calochallenge("2")
    for kind in kinds:
        xs = []
        for seed in (1, 2):
            inc, sh = generate(g, args.n, seed=seed)
            sh = np.where(sh < g.threshold, 0.0, sh)
            hl = high_level_vector(compute_features(sh, inc, g)) if kind == "high" else None
            xs.append(classifier_inputs(kind, sh, inc, g, high_level=hl))
        print(f"{args.n} vs {args.n} synthetic ds2 showers, classifier '{kind}', input dim {xs[0].shape[1]}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        rates = {}
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for dev in devices:
            for dt in dtypes:
                epochs = args.cpu_epochs if dev == "cpu" else args.epochs
                cfg = ClassifierConfig(epochs=epochs, dtype=dt)
                if dev == "cuda":  # warm-up (CUDA context, cuBLAS handles)
                    classifier_metric(kind, xs[0][:2000], xs[1][:2000], config=ClassifierConfig(epochs=1, dtype=dt),
                                      device=dev)
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                r = classifier_metric(kind, xs[0], xs[1], config=cfg, device=dev)
                el, cpu = time.perf_counter() - t, time.process_time() - c
                rates[dev, dt] = (cpu if dev == "cpu" else el) / epochs     # CPU seconds: not inflated by other load
                name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
                print(f"  {dev:>4} ({name}) {dt}: {el / epochs:7.2f} s/epoch wall, {cpu / epochs:7.2f} CPU s/epoch "
                      f"over {epochs} epochs (load {os.getloadavg()[0]:.1f}); AUC {r.auc:.4f}, JSD {r.jsd:.4f}; "
                      f"50 epochs ≈ {50 * rates[dev, dt] / 60:.0f} min", flush=True)
            if len(dtypes) > 1 and (dev, "float32") in rates and (dev, "float64") in rates:
                print(f"  {dev}: float32 takes {rates[dev, 'float32'] / rates[dev, 'float64']:.2f}× the time of float64")
        for dt in dtypes:
            if ("cuda", dt) in rates:
                print(f"  {dt}: CUDA is {rates['cpu', dt] / rates['cuda', dt]:.1f}x faster per epoch; the official 50 "
                      f"epochs take {50 * rates['cuda', dt]:.0f} s on CUDA, {50 * rates['cpu', dt]:.0f} s on this CPU")


if __name__ == "__main__":
    main()
