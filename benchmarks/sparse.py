r"""Sparse vs dense on calorimeter showers: conv layers, the classifier training step (dense cls-cnn, sparse-native
cls-sparse on calopc's torch backend and on MinkowskiEngine), AUCs, the gather–GEMM–scatter schedules (incl.
``torch.nn.functional.grouped_mm``), and the high-granularity geometry end to end (conversion, point-cloud model
training).

Synthetic showers (:func:`calopc.synth.generate`) of datasets 2, 3 and calopc's high-granularity geometry ``hg``
(dataset 3 with 4x finer alpha and r, 648,000 cells).

1. **Conv layer** (forward + backward, float32, ``C → C`` channels): a 3×3×3 submanifold convolution and a
   3×3×3 stride-2 convolution, α periodic; *dense* = ``conv3d`` on the full grid with circular α padding,
   *torch* = calopc's gather–GEMM–scatter (kernel-map build listed separately), *minkowski* = MinkowskiEngine.
2. **Schedules**: the submanifold layer at every resolution of cls-sparse with each schedule of
   :data:`calopc.sparse.functional.EXECUTION` (loop, batched padded ``bmm``, ``grouped_mm``, output-stationary gather).
3. **Classifier step**: one training step (forward + backward + Adam) of cls-cnn (dense, official ResNet-18) and
   cls-sparse (sparse-native; torch and minkowski backends) at ``--cls-batch``: time, showers/s, the activation
   bytes autograd keeps (+ kernel maps) and the peak RSS growth of a fresh process; at ``hg`` also against an
   ``--mem-budget`` (8 GB) with the analytic dense estimate.
4. **AUC**: cls-cnn and cls-sparse trained with the same protocol and epochs on the same samples: a distorted
   pair (cell energies × ``--distort``) and a null pair (two seeds of the same distribution).
5. **High granularity data**: synth, convert (Parquet) and file sizes for ``--hg-n`` showers, extrapolated to 10k.
6. **Point-cloud models**: training showers/s of CaloClouds (pointwise) and CaloPointFlow at ``hg`` vs ds3.

Usage::

    python benchmarks/sparse.py [--datasets 2,3,hg] [--cls-batch 16] [--auc-n 2000] [--auc-epochs 2]
                                [--skip conv,schedules,cls,auc,hgdata,models] [--json sparse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _median_time(fn, reps: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _showers(dataset: str, n: int, seed: int = 0):
    import numpy as np

    from calopc.geometry import load_geometry
    from calopc.synth import generate

    g = load_geometry(dataset)
    inc, v = generate(g, n, seed=seed)
    return g, inc, np.where(v < g.threshold, 0.0, v).astype(np.float32)


def _conv_case(dataset: str, backend: str, layer: str, batch: int, channels: int, reps: int, device: str) -> dict:
    """One conv-layer measurement (runs in its own process for the memory figure)."""
    import torch

    from calopc.sparse import SparseShowers
    from calopc.sparse import functional as Fs
    from calopc.sparse.kernel import kernel_map, output_coords
    from calopc.sparse.nn import SparseConv3d

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g, _, v = _showers(dataset, batch)
    base = SparseShowers.from_voxels(v, g, device=dev)
    x = base.replace(torch.randn(len(base), channels, device=dev))
    stride = 1 if layer == "subm" else 2
    conv = SparseConv3d(channels, channels, 3, stride, backend="torch" if backend == "dense" else backend).to(dev)
    out: dict = {"dataset": dataset, "backend": backend, "layer": layer, "batch": batch, "channels": channels,
                 "occupancy": round(base.occupancy, 4), "sites": len(base)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
    if backend == "dense":
        xd = x.to_dense().detach().requires_grad_(True)  # (N, C, L, A, R)
        w = conv.dense_weight().detach().requires_grad_(True)

        def step():
            y = Fs.dense_conv3d(xd, w, stride=conv.stride, padding=conv.padding)
            y.backward(torch.ones_like(y))

        out["time_s"] = _median_time(step, reps, sync)
        y = Fs.dense_conv3d(xd.detach(), w.detach(), stride=conv.stride, padding=conv.padding)
        out["activation_bytes"] = (xd.numel() + y.numel()) * 4
    else:
        if backend == "torch":  # kernel-map build, from a fresh cache each time
            def build():
                xi = x.to(dev)
                o = output_coords(xi, conv.kernel, conv.stride, conv.padding, True, conv.output)
                kernel_map(xi, o, conv.kernel, conv.stride, conv.padding, True)

            out["map_build_s"] = _median_time(build, max(1, reps // 2), sync)
        feats = x.feats.detach().requires_grad_(True)
        xi = x.replace(feats)
        t = time.perf_counter()
        conv(xi)
        sync()
        out["first_call_s"] = time.perf_counter() - t

        def step():
            y = conv(xi)
            y.feats.backward(torch.ones_like(y.feats))

        out["time_s"] = _median_time(step, reps, sync)
        y = conv(xi)
        n_pairs = 0
        km = [k for kk, k in xi.ctx.items() if kk[0] == "kmap"]
        if km:
            n_pairs = km[0].n_pairs
        out["out_sites"] = len(y)
        out["activation_bytes"] = (feats.numel() + y.feats.numel()) * 4 + n_pairs * 16
    out["peak_rss_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - m0
    return out


def _cls_case(dataset: str, backend: str, batch: int, widths: tuple | None, blocks: tuple | None, reps: int,
              device: str) -> dict:
    """One classifier training step (forward + backward + Adam) of cls-cnn (dense) or cls-sparse (native)."""
    import numpy as np
    import torch

    from calopc.eval.cnn import CNNConfig, DenseResNet, SparseResNet, _Pool, dense_activation_bytes

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g, inc, v = _showers(dataset, batch)
    dense = backend == "dense"
    cfg = CNNConfig(widths=widths if dense else None, blocks=blocks if dense else None, dtype="float32",
                    backend=None if dense else backend)
    pool = _Pool(v, inc, v, inc, g, dense=dense)
    del v
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net = (DenseResNet(g, cfg) if dense else SparseResNet(g, cfg)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    idx = np.arange(2 * batch)[::2]
    y = torch.as_tensor((idx >= batch).astype(np.float32), device=dev)

    def step():
        inputs = pool(idx, dev, torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(*inputs).reshape(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = _median_time(step, reps, sync)
    act = _activation_bytes(net, pool, idx, dev) if backend != "minkowski" else None
    out = {"dataset": dataset, "backend": backend, "batch": batch, "network": "cls-cnn" if dense else "cls-sparse",
           "widths": list(cfg.resolved("cnn" if dense else "sparse").widths), "step_s": t,
           "showers_per_s": batch / t, "activation_bytes": act,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_data) * 1024}
    if dense:
        out["dense_estimate_bytes"] = dense_activation_bytes(g, cfg) * batch
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _schedule_case(dataset: str, batch: int, reps: int) -> dict:
    """The submanifold 3×3×3 layer at every resolution of cls-sparse, forward + backward, per schedule."""
    import torch

    from calopc.eval.cnn import CNNConfig
    from calopc.sparse import SparseShowers
    from calopc.sparse import functional as Fs
    from calopc.sparse.nn import SparseConv3d, SubMConv3d

    torch.manual_seed(0)
    g, _, v = _showers(dataset, batch)
    x = SparseShowers.from_voxels(v, g)
    base = x.replace(torch.ones(len(x), 1))
    rows = []
    for lvl, c in enumerate(CNNConfig().resolved("sparse").widths, 1):
        base = SparseConv3d(1, 1, 2, 2, output="patch")(base.replace(base.feats[:, :1]))
        xi = base.replace(torch.randn(len(base), c).requires_grad_(True))
        conv = SubMConv3d(c, c)
        row = {"dataset": dataset, "stride": 2 ** lvl, "cells": len(base), "channels": c}
        for mode in ("loop", "batched", "grouped", "gather"):
            Fs.EXECUTION = mode

            def step():
                y = conv(xi)
                y.feats.backward(torch.ones_like(y.feats))

            row[f"{mode}_s"] = _median_time(step, reps, lambda: None)
        km = next(m for k, m in xi.ctx.items() if k[0] == "kmap" and k[1] == xi.cid and k[4] == (1, 1, 1))
        row["pairs"], row["fill"] = km.n_pairs, km.fill
        Fs.EXECUTION = "auto"
        rows.append(row)
    return {"rows": rows}


def _hgdata_case(n: int, workdir: str) -> dict:
    """Synth, convert and file sizes of ``n`` high-granularity showers."""
    from pathlib import Path

    from calopc.converters import convert_file
    from calopc.synth import write_synthetic

    d = Path(workdir)
    h5, pq = d / "hg.h5", d / "hg.parquet"
    out: dict = {"n": n}
    t = time.perf_counter()
    write_synthetic(h5, dataset="hg", n=n, seed=11)
    out["synth_s"] = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    convert_file(h5, pq)
    out["convert_s"] = time.perf_counter() - t
    out["convert_rss_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    out["hdf5_bytes"], out["parquet_bytes"] = h5.stat().st_size, pq.stat().st_size
    out["dense_float64_bytes"] = n * 648_000 * 8
    for k in ("synth_s", "convert_s", "hdf5_bytes", "parquet_bytes", "dense_float64_bytes"):
        out[f"{k}_per_10k"] = out[k] * 10_000 / n
    return out


def _models_case(dataset: str, model: str, n: int, steps: int, batch: int, workdir: str) -> dict:
    """Training showers/s of a point-cloud model (default config) on ``n`` synthetic showers (1–100 GeV)."""
    from pathlib import Path

    import numpy as np

    from calopc.converters import voxels_to_points, write_points
    from calopc.geometry import load_geometry
    from calopc.models.train import TrainConfig, train
    from calopc.synth import generate

    g = load_geometry(dataset)
    d = Path(workdir) / f"{model}-{dataset}"
    d.mkdir(parents=True, exist_ok=True)
    e = 10.0 ** np.random.default_rng(3).uniform(3.0, 5.0, n)
    pq = d / "train.parquet"
    inc, v = generate(g, n, seed=3, energies=e)
    write_points(pq, voxels_to_points(v, g, incident_energies=inc), g)
    hits = (v > 0).sum(1)
    del v
    cfg = TrainConfig(steps=steps, batch_size=batch, warmup=1, log_every=1, checkpoint_every=10**6, device="cpu",
                      progress=False)
    t = time.perf_counter()
    res = train(model, pq, d / "run", config=cfg, overwrite=True)
    dt = time.perf_counter() - t
    return {"dataset": dataset, "model": model, "n": n, "steps": steps, "batch": batch,
            "mean_points": float(hits.mean()), "seconds": dt, "train_seconds": res.get("seconds"),
            "showers_per_s": steps * batch / (res.get("seconds") or dt),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _activation_bytes(net, pool, idx, dev) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one forward, plus the kernel maps.

    (MinkowskiEngine keeps its tensors outside autograd's saved tensors, so it is not measured this way.)
    """
    import torch

    from calopc.sparse import SparseShowers
    from calopc.sparse.kernel import KernelMap

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    inputs = pool(idx, dev, torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(*inputs).sum()
    total = sum(seen.values())
    if isinstance(inputs[0], SparseShowers):
        for v in inputs[0].ctx.values():
            if isinstance(v, KernelMap):
                total += v.in_idx.nbytes + v.out_idx.nbytes
            elif torch.is_tensor(v):
                total += v.nbytes
    return total


def _auc_case(dataset: str, n: int, epochs: int, widths: tuple, blocks: tuple, distort: float, backend: str,
              device: str, batch: int = 32) -> dict:
    """cls-cnn (widths/blocks) and cls-sparse (native defaults) on the same samples: a distorted and a null pair."""
    from calopc.eval.cnn import CNNConfig, cnn_metric

    g, inc_a, a = _showers(dataset, n, seed=1)
    _, inc_b, b = _showers(dataset, n, seed=2)
    out = {"dataset": dataset, "n_per_sample": n, "epochs": epochs, "distort": distort, "batch": batch,
           "cnn_widths": list(widths), "cnn_blocks": list(blocks)}
    for pair, gen in (("distorted", a * distort), ("null", a)):
        for kind in ("cnn", "sparse"):
            cfg = CNNConfig(widths=widths if kind == "cnn" else None, blocks=blocks if kind == "cnn" else None,
                            epochs=epochs, batch_size=batch, lr=1e-3, dtype="float32", bn_momentum=None,
                            backend=backend)
            t = time.perf_counter()
            r = cnn_metric(kind, gen, inc_a, b, inc_b, g, config=cfg, seed=0, device=device)
            out[f"{pair}_auc_{kind}"] = r.auc
            out[f"{pair}_time_{kind}_s"] = time.perf_counter() - t
            print(f"  ds{dataset} {pair} pair: cls-{kind} AUC {r.auc:.4f} ({out[f'{pair}_time_{kind}_s']:.0f} s)",
                  flush=True)
        out[f"{pair}_auc_difference"] = out[f"{pair}_auc_sparse"] - out[f"{pair}_auc_cnn"]
    return out


def _in_subprocess(kind: str, kwargs: dict) -> dict:
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", json.dumps({"kind": kind, "kwargs": kwargs})]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"
        return {**kwargs, "error": err}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mb(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _uptime() -> str:
    try:
        return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "load average unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="showers per conv-layer batch (default: %(default)s)")
    ap.add_argument("--channels", type=int, default=32, help="conv channels in and out (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default: %(default)s)")
    ap.add_argument("--datasets", default="2,3,hg", help="comma-separated datasets (default: %(default)s)")
    ap.add_argument("--backends", default="dense,torch,minkowski", help="default: %(default)s")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (minkowski: CPU build only) (default: %(default)s)")
    ap.add_argument("--cls-batch", type=int, default=16, help="showers per classifier step (default: %(default)s)")
    ap.add_argument("--widths", default="32,64,64,128", help="cls-cnn stage widths (default: official)")
    ap.add_argument("--blocks", default="2,2,2,2", help="cls-cnn blocks per stage (default: ResNet-18)")
    ap.add_argument("--mem-budget", type=float, default=8.0, help="memory budget (GB) of the hg check (default: 8)")
    ap.add_argument("--auc-n", type=int, default=2000, help="showers per sample for the AUC comparison (0: skip)")
    ap.add_argument("--auc-epochs", type=int, default=2, help="epochs of the AUC comparison (default: %(default)s)")
    ap.add_argument("--auc-batch", type=int, default=32, help="batch of the AUC comparison (default: %(default)s)")
    ap.add_argument("--auc-widths", default="8,16,16,32", help="cls-cnn widths for the AUC comparison")
    ap.add_argument("--auc-datasets", default="3", help="datasets of the AUC comparison (default: %(default)s)")
    ap.add_argument("--distort", type=float, default=1.1, help="cell-energy scale of the distorted sample")
    ap.add_argument("--hg-n", type=int, default=500, help="high-granularity showers to synth and convert")
    ap.add_argument("--model-showers", type=int, default=64, help="training showers of the model section")
    ap.add_argument("--model-steps", type=int, default=4, help="training steps of the model section")
    ap.add_argument("--model-batch", type=int, default=8, help="training batch of the model section")
    ap.add_argument("--skip", default="", help="sections to skip: conv,schedules,cls,auc,hgdata,models")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"conv": _conv_case, "cls": _cls_case, "schedules": _schedule_case, "hgdata": _hgdata_case,
              "models": _models_case}[spec["kind"]]
        print(json.dumps(fn(**spec["kwargs"])))
        return

    import tempfile

    from calopc.sparse import minkowski_available

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    backends = [b for b in args.backends.split(",") if b]
    if "minkowski" in backends and not minkowski_available():
        print("MinkowskiEngine not installed: minkowski rows skipped (make minkowski)")
        backends.remove("minkowski")
    if "minkowski" in backends and args.device != "cpu":
        print("the MinkowskiEngine build is CPU-only: minkowski rows skipped on", args.device)
        backends.remove("minkowski")
    skip = set(args.skip.split(","))
    widths = tuple(int(x) for x in args.widths.split(","))
    blocks = tuple(int(x) for x in args.blocks.split(","))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, {_uptime()}"
          + ("" if torch.cuda.is_available() else "; no GPU here: GPU figures not measured"), flush=True)
    report: dict = {"device": args.device, "threads": torch.get_num_threads(), "conv": [], "schedules": [],
                    "cls": [], "auc": [], "hgdata": None, "models": []}
    work = tempfile.mkdtemp(prefix="calopc-bench-sparse-")

    if "conv" not in skip:
        print(f"\n== conv layer, forward + backward, {args.channels} -> {args.channels} channels, batch {args.batch}, "
              f"median of {args.reps} ({_uptime()}) ==")
        print(f"{'ds':>3} {'layer':>5} {'backend':>9} {'occ':>6} {'ms':>9} {'x dense':>8} {'map ms':>8} "
              f"{'act MB':>8} {'act x':>7} {'RSS+ MB':>8}")
        for d in [d for d in datasets if d != "hg"]:
            for layer in ("subm", "down"):
                rows = [_in_subprocess("conv", {"dataset": d, "backend": b, "layer": layer, "batch": args.batch,
                                                "channels": args.channels, "reps": args.reps,
                                                "device": args.device}) for b in backends]
                dense = next((r for r in rows if r["backend"] == "dense" and "error" not in r), None)
                for r in rows:
                    report["conv"].append(r)
                    if "error" in r:
                        print(f"{d:>3} {layer:>5} {r['backend']:>9} error: {r['error']}")
                        continue
                    sp = dense["time_s"] / r["time_s"] if dense else float("nan")
                    mem = dense["activation_bytes"] / r["activation_bytes"] if dense else float("nan")
                    r["speedup_vs_dense"], r["activation_ratio_vs_dense"] = sp, mem
                    mp = f"{r['map_build_s'] * 1e3:8.1f}" if "map_build_s" in r else f"{'–':>8}"
                    print(f"{d:>3} {layer:>5} {r['backend']:>9} {r['occupancy']:6.3f} {r['time_s'] * 1e3:9.1f} "
                          f"{sp:8.2f} {mp} {_mb(r['activation_bytes']):>8} {mem:7.2f} "
                          f"{_mb(r['peak_rss_growth_bytes']):>8}", flush=True)

    if "schedules" not in skip:
        print(f"\n== schedules: submanifold 3x3x3 at each cls-sparse resolution, fwd + bwd, batch {args.cls_batch} "
              f"({_uptime()}) ==")
        print(f"{'ds':>3} {'stride':>6} {'cells':>8} {'C':>4} {'fill':>5} {'loop ms':>8} {'batched':>8} "
              f"{'grouped':>8} {'gather':>8}")
        for d in datasets:
            r = _in_subprocess("schedules", {"dataset": d, "batch": args.cls_batch, "reps": max(2, args.reps // 2)})
            if "error" in r:
                print(f"{d:>3} error: {r['error']}")
                continue
            for row in r["rows"]:
                report["schedules"].append(row)
                print(f"{d:>3} {row['stride']:>6} {row['cells']:>8} {row['channels']:>4} {row['fill']:5.2f} "
                      + " ".join(f"{row[m + '_s'] * 1e3:8.1f}" for m in ("loop", "batched", "grouped", "gather")),
                      flush=True)

    if "cls" not in skip:
        print(f"\n== classifier training step: cls-cnn (dense, widths {widths}, blocks {blocks}) vs cls-sparse "
              f"(native), batch {args.cls_batch}, float32 ({_uptime()}) ==")
        print(f"{'ds':>3} {'backend':>9} {'s/step':>8} {'showers/s':>10} {'x dense':>8} {'act MB':>8} {'act x':>7} "
              f"{'RSS MB':>8} {'RSS+ MB':>8}")
        budget = args.mem_budget * 2**30
        for d in datasets:
            rows = [_in_subprocess("cls", {"dataset": d, "backend": b, "batch": args.cls_batch, "widths": widths,
                                           "blocks": blocks, "reps": max(2, args.reps // 2) if d != "hg" else 1,
                                           "device": args.device})
                    for b in backends]
            dense = next((r for r in rows if r["backend"] == "dense" and "error" not in r), None)
            for r in rows:
                report["cls"].append(r)
                if "error" in r:
                    print(f"{d:>3} {r['backend']:>9} error: {r['error']}", flush=True)
                    continue
                sp = dense["step_s"] / r["step_s"] if dense else float("nan")
                r["speedup_vs_dense"] = sp
                ax = (dense["activation_bytes"] / r["activation_bytes"]
                      if dense and r.get("activation_bytes") else float("nan"))
                r["activation_ratio_vs_dense"] = ax
                r["within_budget"] = r["peak_rss_bytes"] <= budget
                print(f"{d:>3} {r['backend']:>9} {r['step_s']:8.3f} {r['showers_per_s']:10.1f} {sp:8.2f} "
                      f"{_mb(r.get('activation_bytes')):>8} {ax:7.2f} {_mb(r['peak_rss_bytes']):>8} "
                      f"{_mb(r['peak_rss_growth_bytes']):>8}", flush=True)
            if d == "hg":
                from calopc.eval.cnn import CNNConfig, dense_activation_bytes
                from calopc.geometry import load_geometry

                est = dense_activation_bytes(load_geometry("hg"), CNNConfig(dtype="float32"))
                print(f"hg: memory budget {args.mem_budget:g} GB; cls-cnn analytic activations {est / 2**20:.0f} MB per "
                      f"shower (float32) = {est * args.cls_batch / 2**30:.2f} GB at batch {args.cls_batch}, "
                      f"{est * 1000 / 2**30:.0f} GB at the official batch 1000; within budget: "
                      + ", ".join(f"{r['backend']} {'yes' if r.get('within_budget') else 'NO'}" for r in rows
                                  if 'error' not in r), flush=True)

    if "auc" not in skip and args.auc_n > 0:
        aw = tuple(int(x) for x in args.auc_widths.split(","))
        print(f"\n== AUC, cls-cnn (widths {aw}) vs cls-sparse (native) on the same samples ({args.auc_n} per sample, "
              f"distorted pair: cell energies x {args.distort}; null pair: two seeds; {args.auc_epochs} epochs, "
              f"batch {args.auc_batch}) ({_uptime()}) ==", flush=True)
        for d in [x for x in args.auc_datasets.split(",") if x]:
            r = _auc_case(d, args.auc_n, args.auc_epochs, aw, blocks, args.distort, "torch", args.device,
                          args.auc_batch)
            report["auc"].append(r)
            print(f"ds{d}: distorted AUC cls-cnn {r['distorted_auc_cnn']:.4f} cls-sparse {r['distorted_auc_sparse']:.4f} "
                  f"(difference {r['distorted_auc_difference']:+.4f}); null AUC cls-cnn {r['null_auc_cnn']:.4f} "
                  f"cls-sparse {r['null_auc_sparse']:.4f} (difference {r['null_auc_difference']:+.4f})", flush=True)

    if "hgdata" not in skip and args.hg_n > 0:
        print(f"\n== high granularity: synth + convert {args.hg_n} showers ({_uptime()}) ==", flush=True)
        r = _in_subprocess("hgdata", {"n": args.hg_n, "workdir": work})
        report["hgdata"] = r
        if "error" in r:
            print("error:", r["error"])
        else:
            print(f"synth {r['synth_s']:.0f} s, convert {r['convert_s']:.1f} s (RSS growth "
                  f"{_mb(r['convert_rss_growth_bytes'])} MB); HDF5 {r['hdf5_bytes'] / 2**20:.0f} MB, Parquet "
                  f"{r['parquet_bytes'] / 2**20:.0f} MB, dense float64 {r['dense_float64_bytes'] / 2**30:.1f} GB; "
                  f"per 10k showers: synth {r['synth_s_per_10k'] / 60:.0f} min, convert "
                  f"{r['convert_s_per_10k'] / 60:.1f} min, HDF5 {r['hdf5_bytes_per_10k'] / 2**30:.2f} GB, Parquet "
                  f"{r['parquet_bytes_per_10k'] / 2**30:.2f} GB (extrapolated)", flush=True)

    if "models" not in skip:
        print(f"\n== point-cloud models: training showers/s, {args.model_showers} showers (1-100 GeV), "
              f"{args.model_steps} steps of batch {args.model_batch}, default configs ({_uptime()}) ==", flush=True)
        for model in ("caloclouds", "calopointflow"):
            rows = {}
            for d in ("3", "hg"):
                r = _in_subprocess("models", {"dataset": d, "model": model, "n": args.model_showers,
                                              "steps": args.model_steps, "batch": args.model_batch, "workdir": work})
                report["models"].append(r)
                rows[d] = r
                if "error" in r:
                    print(f"{model} {d}: error: {r['error']}", flush=True)
                    continue
                print(f"{model:>13} {d:>3}: {r['showers_per_s']:.2f} showers/s, mean {r['mean_points']:.0f} points "
                      f"per shower, peak RSS (synth included) {_mb(r['peak_rss_bytes'])} MB", flush=True)
            if all("error" not in r for r in rows.values()):
                print(f"{model:>13} hg / ds3 showers/s: {rows['hg']['showers_per_s'] / rows['3']['showers_per_s']:.2f}")

    print(f"\nend: {_uptime()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
