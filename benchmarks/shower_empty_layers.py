r"""The shared shower model's empty-layer representation: ``floor`` (before) against ``occupied`` (now).

The shower model (CaloPointFlow II, CaloClouds and DeepTree) models the points and the energy of
every layer. Where a layer is empty its energy feature was ``log(1e-9 v)``, far below the occupied
values, so standardisation squeezed the occupied spread. This script measures, on the same synthetic
dataset-2 showers, for both representations:

1. the spread of the standardised energy feature over the showers where a layer has points, for
   the partly empty layers (1 would be "no squeeze");
2. after training the same :class:`~calopc.models.shower.ShowerModel` for the same number of steps
   and seconds from the same seed, the separation power of ``log E_layer`` (occupied layers) and of
   the points per layer between sampled and held-out showers, per layer (lower is better).

Usage::

    python benchmarks/shower_empty_layers.py --steps 600 --out benchmarks/results/shower-empty-layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def _layer_sums(geometry, showers: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    lay = np.asarray(geometry.cell_layer)
    hit = showers > threshold
    n = np.zeros((showers.shape[0], geometry.n_layers), dtype=np.int64)
    e = np.zeros((showers.shape[0], geometry.n_layers))
    for l in range(geometry.n_layers):
        m = lay == l
        n[:, l] = hit[:, m].sum(1)
        e[:, l] = np.where(hit[:, m], showers[:, m], 0.0).sum(1)
    return n, e


def _points(geometry, showers: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hit = showers > threshold
    rows, cells = np.nonzero(hit)
    return cells, showers[rows, cells], hit.sum(1)


def _sep(a: np.ndarray, b: np.ndarray, bins: int = 30) -> float:
    from calopc.eval.histograms import separation_power

    both = np.concatenate([a, b])
    if both.size == 0:
        return float("nan")
    lo, hi = np.quantile(both, [0.005, 0.995])
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    return separation_power(np.histogram(np.clip(a, lo, hi), edges)[0], np.histogram(np.clip(b, lo, hi), edges)[0],
                            a.size, b.size)


def run(mode: str, data: dict, args: argparse.Namespace) -> dict:
    import torch

    from calopc.models.preprocess import Preprocessor
    from calopc.models.shower import ShowerModel

    geo = data["geometry"]
    prep = Preprocessor.fit(geo, *data["train_points"], data["train_inc"], variant="II", seed=0, empty_energy=mode)
    n_l = geo.n_layers
    n_tr, e_tr, inc_tr = data["train_n"], data["train_e"], data["train_inc"]
    rng = np.random.default_rng(1)
    s = prep.forward_layers(n_tr, e_tr, inc_tr, rng)
    # 1. the standardised spread of occupied layer energies in partly empty layers
    empty_share = (n_tr == 0).mean(0)
    partly = np.nonzero((empty_share > 0.02) & (empty_share < 0.98))[0]
    spread = {int(l): float(s[n_tr[:, l] > 0, n_l + l].std()) for l in partly}
    # 2. a short training of the shower model, the same for both modes
    torch.manual_seed(args.seed)
    model = ShowerModel(n_l)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cond_all = torch.from_numpy(prep.forward_cond(inc_tr))
    t0 = time.perf_counter()
    steps = 0
    g = torch.Generator().manual_seed(args.seed)
    while steps < args.steps and time.perf_counter() - t0 < args.time_limit:
        idx = torch.randint(0, inc_tr.shape[0], (args.batch_size,), generator=g).numpy()
        feats = torch.from_numpy(prep.forward_layers(n_tr[idx], e_tr[idx], inc_tr[idx], rng))
        f = 0.5 * (1 + np.cos(np.pi * steps / args.steps))
        for grp in opt.param_groups:
            grp["lr"] = args.lr * (0.05 + 0.95 * f)
        loss = model.loss(cond_all[idx], feats)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        steps += 1
    train_s = time.perf_counter() - t0
    model.eval()
    inc_ref, n_ref, e_ref = data["ref_inc"], data["ref_n"], data["ref_e"]
    with torch.no_grad():
        _, n_gen, e_gen = model.sample_layers(inc_ref, prep)
    n_gen, e_gen = n_gen.numpy(), e_gen.numpy()
    sep_e, sep_n = [], []
    for l in range(n_l):
        a, b = e_ref[n_ref[:, l] > 0, l], e_gen[n_gen[:, l] > 0, l]
        if a.size >= 20:
            sep_e.append(_sep(np.log(a / inc_ref[n_ref[:, l] > 0]), np.log(np.maximum(b, 1e-30) / inc_ref[n_gen[:, l] > 0])))
        sep_n.append(_sep(np.log1p(n_ref[:, l]), np.log1p(n_gen[:, l])))
    sep_e_partly = [sep_e[i] for i in range(len(sep_e)) if i in set(partly.tolist())]
    return {"mode": mode, "steps": steps, "train_seconds": round(train_s, 1), "final_loss": float(loss.detach()),
            "spread_partly_empty": {"min": min(spread.values()), "median": float(np.median(list(spread.values()))),
                                    "max": max(spread.values()), "layers": len(spread)},
            "spread_per_layer": spread,
            "sep_log_e_layer": {"mean": float(np.nanmean(sep_e)), "median": float(np.nanmedian(sep_e)),
                                "max": float(np.nanmax(sep_e)),
                                "mean_partly_empty": float(np.nanmean(sep_e_partly)) if sep_e_partly else None},
            "sep_log_n_layer": {"mean": float(np.nanmean(sep_n)), "median": float(np.nanmedian(sep_n))},
            "sep_e_per_layer": [round(v, 5) for v in sep_e]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-showers", type=int, default=5000)
    p.add_argument("--ref-showers", type=int, default=3000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per mode at most")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = p.parse_args(argv)
    import torch

    from calopc.geometry import load_geometry
    from calopc.synth import generate

    torch.set_num_threads(args.threads)
    geo = load_geometry("2")
    thr = 0.01515
    inc_tr, sh_tr = generate("2", args.train_showers, seed=11)
    inc_ref, sh_ref = generate("2", args.ref_showers, seed=12)
    n_tr, e_tr = _layer_sums(geo, sh_tr, thr)
    n_ref, e_ref = _layer_sums(geo, sh_ref, thr)
    data = {"geometry": geo, "train_points": (*_points(geo, sh_tr, thr)[:2], n_tr.sum(1)), "train_inc": inc_tr,
            "train_n": n_tr, "train_e": e_tr, "ref_inc": inc_ref, "ref_n": n_ref, "ref_e": e_ref}
    out = {"command": "python benchmarks/shower_empty_layers.py " + " ".join(argv or os.sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
           "load": os.getloadavg()[0], "threads": args.threads,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "results": []}
    for mode in ("floor", "occupied"):
        r = run(mode, data, args)
        out["results"].append(r)
        print(f"{mode:9s} spread(occupied, partly empty layers) min {r['spread_partly_empty']['min']:.2f} "
              f"median {r['spread_partly_empty']['median']:.2f} ({r['spread_partly_empty']['layers']} layers) | "
              f"{r['steps']} steps {r['train_seconds']} s loss {r['final_loss']:.3f} | sep log E_layer mean "
              f"{r['sep_log_e_layer']['mean']:.4f} median {r['sep_log_e_layer']['median']:.4f} partly-empty "
              f"{r['sep_log_e_layer']['mean_partly_empty']} | sep log n_layer mean {r['sep_log_n_layer']['mean']:.4f}",
              flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
