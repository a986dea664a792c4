r"""Classifier-metric speed: the official DNN set-up on CPU and, when present, CUDA.

Two independent synthetic dataset-2 samples (so AUC ≈ 0.5 is expected), the official
network (3 × 2048 hidden, float64, batch 1000, lr 2e-4); prints seconds per epoch and the
AUC/JSD for each device, and the CUDA/CPU speed ratio.

Usage::

    python benchmarks/classifier.py [--n 10000] [--epochs 5] [--kind low]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="showers per sample (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per device (default: %(default)s)")
    ap.add_argument("--cpu-epochs", type=int, default=1, help="epochs on the CPU (default: %(default)s)")
    ap.add_argument("--kind", choices=("low", "low-normed", "high"), default="low", help="classifier input (default: %(default)s)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from calopc.eval import ClassifierConfig, classifier_inputs, classifier_metric, compute_features, high_level_vector
    from calopc.geometry import Geometry
    from calopc.synth import generate

    g = Geometry.calochallenge("2")
    xs = []
    for seed in (1, 2):
        inc, sh = generate(g, args.n, seed=seed)
        sh = np.where(sh < g.threshold, 0.0, sh)
        hl = high_level_vector(compute_features(sh, inc, g)) if args.kind == "high" else None
        xs.append(classifier_inputs(args.kind, sh, inc, g, high_level=hl))
    print(f"{args.n} vs {args.n} synthetic ds2 showers, classifier '{args.kind}', input dim {xs[0].shape[1]}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rates = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        epochs = args.cpu_epochs if dev == "cpu" else args.epochs
        cfg = ClassifierConfig(epochs=epochs)
        if dev == "cuda":  # warm-up (CUDA context, cuBLAS handles)
            classifier_metric(args.kind, xs[0][:2000], xs[1][:2000], config=ClassifierConfig(epochs=1), device=dev)
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = classifier_metric(args.kind, xs[0], xs[1], config=cfg, device=dev)
        dt = time.perf_counter() - t
        rates[dev] = dt / epochs
        name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
        print(f"  {dev:>4} ({name}): {dt / epochs:7.2f} s/epoch over {epochs} epochs; AUC {r.auc:.4f}, JSD {r.jsd:.4f}")
    if "cuda" in rates:
        print(f"  CUDA is {rates['cpu'] / rates['cuda']:.1f}x faster per epoch; the official 50 epochs take "
              f"{50 * rates['cuda']:.0f} s on CUDA, {50 * rates['cpu']:.0f} s on this CPU")


if __name__ == "__main__":
    main()
