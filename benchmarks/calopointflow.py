r"""CaloPointFlow benchmark on synthetic dataset-2 showers (CPU by default; not run in CI).

Steps: synthesise train/reference showers (``calopc.synth``), convert the training file to
Parquet, train CaloPointFlow for a fixed wall-clock budget, generate one shower per
reference incident energy straight to voxels (``collisions="nearest-free"``), and run
``calopc.eval.evaluate`` against the held-out showers. Prints and writes ``summary.json``.

Usage::

    python benchmarks/calopointflow.py --work-dir /tmp/cpf --time-limit 600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _raw_figures(gen: Path, ref: Path, threshold: float) -> dict:
    """Hits/shower and E_dep/E_inc of both files, plus their separation powers (own code, 50 bins)."""
    from calopc.io import open_showers

    def stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
        hits, ratio = [], []
        with open_showers(path) as f:
            for inc, sh in f.iterate("256 MB"):
                sh = np.where(sh < threshold, 0, sh)
                hits.append((sh > 0).sum(1))
                ratio.append(sh.sum(1) / inc.reshape(-1))
        return np.concatenate(hits), np.concatenate(ratio)

    def sep(a: np.ndarray, b: np.ndarray) -> float:
        lo, hi = np.quantile(b, [0.001, 0.999])
        edges = np.linspace(lo, hi, 51)
        ha, _ = np.histogram(np.clip(a, lo, hi), edges)
        hb, _ = np.histogram(np.clip(b, lo, hi), edges)
        ha, hb = ha / max(ha.sum(), 1), hb / max(hb.sum(), 1)
        s = ha + hb
        return float(0.5 * np.sum(np.where(s > 0, (ha - hb) ** 2 / np.where(s > 0, s, 1), 0)))

    gh, gr = stats(gen)
    rh, rr = stats(ref)
    return {"hits_gen_mean": float(gh.mean()), "hits_ref_mean": float(rh.mean()),
            "e_ratio_gen_mean": float(gr.mean()), "e_ratio_ref_mean": float(rr.mean()),
            "e_ratio_gen_std": float(gr.std()), "e_ratio_ref_std": float(rr.std()),
            "sep_hits": sep(gh, rh), "sep_e_ratio": sep(gr, rr)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("bench_calopointflow"), help="folder for data and results (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=20_000, help="training showers (default: %(default)s)")
    ap.add_argument("--n-ref", type=int, default=10_000, help="held-out reference showers (default: %(default)s)")
    ap.add_argument("--n-gen", type=int, default=10_000, help="generated showers (default: %(default)s)")
    ap.add_argument("--time-limit", type=float, default=600, help="training budget in seconds (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=100_000, help="max training steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="showers per step (default: %(default)s)")
    ap.add_argument("--gen-batch-size", type=int, default=500, help="showers per generation batch (default: %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device (default: %(default)s)")
    ap.add_argument("--cls-epochs", type=int, default=10, help="classifier epochs in evaluate (default: %(default)s)")
    ap.add_argument("--cls-hidden", type=int, default=512, help="classifier width in evaluate (default: %(default)s)")
    ap.add_argument("--variant", choices=("I", "II"), default="II",
                    help="CaloPointFlow I (n, ΣE) or II (points and energy per layer) (default: %(default)s)")
    ap.add_argument("--skip-train", action="store_true", help="reuse WORK_DIR/run")
    ap.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from calopc.converters import convert_file
    from calopc.geometry import Geometry
    from calopc.models.generate import generate, parse_energies
    from calopc.models.train import TrainConfig, train
    from calopc.synth import write_synthetic

    wd = args.work_dir
    wd.mkdir(parents=True, exist_ok=True)
    train_h5, train_pq, ref_h5 = wd / "train.hdf5", wd / "train.parquet", wd / "ref.hdf5"
    if not train_pq.exists():
        if not train_h5.exists():
            write_synthetic(train_h5, dataset="2", n=args.n_train, seed=1)
        convert_file(train_h5, train_pq)
    if not ref_h5.exists():
        write_synthetic(ref_h5, dataset="2", n=args.n_ref, seed=2)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    run = wd / "run"
    model_config = {"variant": args.variant, "point_hidden": (96, 96), "point_transforms": 5,
                    "points_per_shower_loss": 256, "shower_hidden": (256, 256)}
    if not args.skip_train:
        t = time.perf_counter()
        summary["train"] = train("calopointflow", train_pq, run, model_config=model_config,
                                 config=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                                                    time_limit=args.time_limit, seed=args.seed, device=args.device,
                                                    checkpoint_every=1000, progress=False))
        summary["train"]["wall_seconds"] = time.perf_counter() - t
        print("train:", summary["train"], flush=True)
    energies = parse_energies(str(ref_h5), args.n_gen)
    gen = wd / "gen.hdf5"
    res = generate(run, energies, output=gen, seed=args.seed, batch_size=args.gen_batch_size, device=args.device)
    summary["generate"] = res.as_dict()
    print("generate:", summary["generate"], flush=True)
    ref_used = ref_h5
    if args.n_gen != args.n_ref:
        from calopc.io import open_showers, write_showers

        with open_showers(ref_h5) as f:
            inc, sh = f.read(0, args.n_gen)
        ref_used = wd / "ref_used.hdf5"
        write_showers(ref_used, inc, sh)
    summary["raw"] = _raw_figures(gen, ref_used, Geometry.calochallenge("2").threshold or 0.5e-3 / 0.033)
    print("raw:", summary["raw"], flush=True)
    try:
        from calopc.eval import evaluate

        t = time.perf_counter()
        summary["evaluate"] = evaluate(gen, ref_used, wd / "eval", cls_epochs=args.cls_epochs, cls_hidden=args.cls_hidden,
                                       device=args.device, seed=args.seed, progress=False)
        summary["evaluate_seconds"] = time.perf_counter() - t
    except Exception as err:  # noqa: BLE001  (report and keep the raw figures)
        summary["evaluate_error"] = f"{type(err).__name__}: {err}"
    (wd / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: summary[k] for k in summary if k != "evaluate"}, indent=2, default=str))
    if "evaluate" in summary:
        print(json.dumps(summary["evaluate"], indent=2, default=str)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
