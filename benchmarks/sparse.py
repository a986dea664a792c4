r"""Sparse vs dense convolution on calorimeter showers: time and memory per conv layer and per classifier step,
and the AUC of cls-cnn (dense ResNet) vs cls-sparse (the same network on occupied cells).

Synthetic showers of datasets 2 and 3 (:func:`calopc.synth.generate`, ~26 % and ~12 % occupied cells).

1. **Conv layer** (forward + backward, float32, ``C → C`` channels): a 3×3×3 submanifold convolution and a
   3×3×3 stride-2 convolution, α periodic; *dense* = ``conv3d`` on the full grid with circular α padding
   (the operation the sparse layers reproduce), *torch* = calopc's gather–GEMM–scatter with its kernel
   map built once per batch (the build time is listed separately), *minkowski* = MinkowskiEngine 0.5.4
   between the same coordinates (its map cached in its coordinate manager after the first call).
   Memory: the analytic activation bytes kept for the backward pass (dense: input + output grids;
   sparse: input + output features + kernel map) and, measured in a fresh process per case, the peak
   RSS growth (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).
2. **Classifier step**: one training step (forward + backward + Adam) of the cls-resnet network, dense vs
   sparse (torch, minkowski backends), with time per shower and peak memory, as in 1.
3. **AUC**: cls-cnn and cls-sparse trained with the same protocol on the same samples (reference vs a
   sample with cell energies scaled by ``--distort``), and their difference.

Usage::

    python benchmarks/sparse.py [--batch 16] [--channels 32] [--datasets 2,3] [--device cpu]
                                [--cls-batch 16] [--auc-n 300] [--auc-epochs 3] [--json sparse.json]
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

    from calopc.geometry import Geometry
    from calopc.synth import generate

    g = Geometry.calochallenge(dataset)
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


def _cls_case(dataset: str, backend: str, batch: int, widths: tuple, blocks: tuple, reps: int, device: str) -> dict:
    """One classifier training step (forward + backward + Adam) of cls-cnn (dense) or cls-sparse."""
    import numpy as np
    import torch

    from calopc.eval.cnn import CNNConfig, DenseResNet, SparseResNet, _Pool

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g, inc, v = _showers(dataset, batch)
    cfg = CNNConfig(widths=widths, blocks=blocks, dtype="float32",
                    backend=None if backend == "dense" else backend)
    pool = _Pool(v, inc, v, inc, g, dense=backend == "dense")
    net = (DenseResNet(g, cfg) if backend == "dense" else SparseResNet(g, cfg)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    idx = np.arange(2 * batch)[::2]
    y = torch.as_tensor((idx >= batch).astype(np.float32), device=dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

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
    out = {"dataset": dataset, "backend": backend, "batch": batch, "widths": list(widths), "blocks": list(blocks),
           "step_s": t, "showers_per_s": batch / t, "activation_bytes": act,
           "peak_rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024}
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


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
              device: str) -> dict:
    from calopc.eval.cnn import CNNConfig, cnn_metric

    g, inc_a, a = _showers(dataset, n, seed=1)
    _, inc_b, b = _showers(dataset, n, seed=2)
    cfg = CNNConfig(widths=widths, blocks=blocks, epochs=epochs, batch_size=32, lr=1e-3, dtype="float32",
                    bn_momentum=None, backend=backend)
    out = {"dataset": dataset, "n_per_sample": n, "epochs": epochs, "distort": distort, "widths": list(widths),
           "blocks": list(blocks)}
    for kind in ("cnn", "sparse"):
        t = time.perf_counter()
        r = cnn_metric(kind, a * distort, inc_a, b, inc_b, g, config=cfg, seed=0, device=device)
        out[f"auc_{kind}"] = r.auc
        out[f"time_{kind}_s"] = time.perf_counter() - t
    out["auc_difference"] = out["auc_sparse"] - out["auc_cnn"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="showers per conv-layer batch (default: %(default)s)")
    ap.add_argument("--channels", type=int, default=32, help="conv channels in and out (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default: %(default)s)")
    ap.add_argument("--datasets", default="2,3", help="comma-separated datasets (default: %(default)s)")
    ap.add_argument("--backends", default="dense,torch,minkowski", help="default: %(default)s")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (minkowski: CPU build only) (default: %(default)s)")
    ap.add_argument("--cls-batch", type=int, default=16, help="showers per classifier step (default: %(default)s)")
    ap.add_argument("--widths", default="32,64,64,128", help="classifier stage widths (default: official)")
    ap.add_argument("--blocks", default="2,2,2,2", help="classifier blocks per stage (default: ResNet-18)")
    ap.add_argument("--auc-n", type=int, default=300, help="showers per sample for the AUC comparison (0: skip)")
    ap.add_argument("--auc-epochs", type=int, default=3, help="epochs of the AUC comparison (default: %(default)s)")
    ap.add_argument("--auc-widths", default="8,16,16,32", help="widths for the AUC comparison (default: %(default)s)")
    ap.add_argument("--distort", type=float, default=1.1, help="cell-energy scale of the 'generated' sample")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: conv,cls,auc")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"conv": _conv_case, "cls": _cls_case}[spec["kind"]]
        print(json.dumps(fn(**spec["kwargs"])))
        return

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
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}"
          + ("" if torch.cuda.is_available() else "; no GPU here: GPU figures not measured"))
    report: dict = {"device": args.device, "threads": torch.get_num_threads(), "conv": [], "cls": [], "auc": []}

    if "conv" not in skip:
        print(f"\n== conv layer, forward + backward, {args.channels} -> {args.channels} channels, batch {args.batch}, "
              f"median of {args.reps} ==")
        print(f"{'ds':>3} {'layer':>5} {'backend':>9} {'occ':>6} {'ms':>9} {'x dense':>8} {'map ms':>8} "
              f"{'act MB':>8} {'act x':>7} {'RSS+ MB':>8}")
        for d in datasets:
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
                          f"{_mb(r['peak_rss_growth_bytes']):>8}")

    if "cls" not in skip:
        print(f"\n== classifier training step (cls-resnet, widths {widths}, blocks {blocks}), "
              f"batch {args.cls_batch} ==")
        print(f"{'ds':>3} {'backend':>9} {'s/step':>8} {'showers/s':>10} {'x dense':>8} {'act MB':>8} {'act x':>7} "
              f"{'RSS+ MB':>8}")
        for d in datasets:
            rows = [_in_subprocess("cls", {"dataset": d, "backend": b, "batch": args.cls_batch, "widths": widths,
                                           "blocks": blocks, "reps": max(2, args.reps // 2), "device": args.device})
                    for b in backends]
            dense = next((r for r in rows if r["backend"] == "dense" and "error" not in r), None)
            for r in rows:
                report["cls"].append(r)
                if "error" in r:
                    print(f"{d:>3} {r['backend']:>9} error: {r['error']}")
                    continue
                sp = dense["step_s"] / r["step_s"] if dense else float("nan")
                r["speedup_vs_dense"] = sp
                ax = (dense["activation_bytes"] / r["activation_bytes"]
                      if dense and r.get("activation_bytes") else float("nan"))
                r["activation_ratio_vs_dense"] = ax
                print(f"{d:>3} {r['backend']:>9} {r['step_s']:8.3f} {r['showers_per_s']:10.1f} {sp:8.2f} "
                      f"{_mb(r.get('activation_bytes')):>8} {ax:7.2f} {_mb(r['peak_rss_growth_bytes']):>8}")

    if "auc" not in skip and args.auc_n > 0:
        aw = tuple(int(x) for x in args.auc_widths.split(","))
        print(f"\n== AUC, cls-cnn vs cls-sparse on the same samples ({args.auc_n} per sample, cell energies x "
              f"{args.distort}, widths {aw}, {args.auc_epochs} epochs) ==")
        for d in datasets:
            r = _auc_case(d, args.auc_n, args.auc_epochs, aw, blocks, args.distort,
                          "minkowski" if "minkowski" in backends and "torch" not in backends else "torch", args.device)
            report["auc"].append(r)
            print(f"ds{d}: AUC cls-cnn {r['auc_cnn']:.4f} ({r['time_cnn_s']:.0f} s), cls-sparse {r['auc_sparse']:.4f} "
                  f"({r['time_sparse_s']:.0f} s), difference {r['auc_difference']:+.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
