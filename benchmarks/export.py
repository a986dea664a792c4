r"""Latency of an exported run: ONNX Runtime (one intra-op thread) against calopc's torch generation (one thread).

For one run directory on dataset 3 (``--run``, e.g. a distilled CaloClouds student) this

1. exports it with :func:`calopc.export.export_model` (``par04`` target): export time and file size;
2. times, on the same incident energies (log-uniform 1 GeV – 1 TeV, ``--seed``) and in the same process:

   * **torch**: :func:`calopc.models.generate.generate` with ``torch.set_num_threads(1)`` — the run's
     sampling and placement in cells (the ``calopc generate`` path without writing a file);
   * **onnx**: the graph through :class:`calopc.export.Par04Harness` with ``intra_op_num_threads = 1``,
     fed the input vectors Par04 builds (drawn before the clock starts), with ONNX Runtime's graph
     optimisations off (Par04's default ``setOptimizationFlag 0``) and on;

   at batch 1 (``--n1`` showers, Par04's way) and batch 100 (``--n100`` showers);
3. prints a table and writes ``OUT.json`` and ``OUT.md`` (``--out``) with ms per shower (wall and CPU),
   the ratios ONNX / torch, points per shower, the machine and its load average before and after.

The measurements run in ``--repeats`` rounds (torch, then one ONNX Runtime session at a time: a batch of
100 dataset-3 showers holds up to ~10⁶ points, GBs of activations that a session's memory arena keeps) and
report the fastest round of each: on a shared machine other processes only ever add time. CPU seconds (the process's, all paths on
one thread) are the steadier figure under load.

Usage::

    python benchmarks/export.py --run runs/cc-ds3-cm --n1 20 --n100 200 --out benchmarks/results/export-ds3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn) -> tuple[float, float]:  # noqa: ANN001
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a dataset-3 run directory (caloclouds or calopointflow)")
    ap.add_argument("--n1", type=int, default=20, help="showers timed at batch 1 (default: %(default)s)")
    ap.add_argument("--n100", type=int, default=200, help="showers timed at batch 100 (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; the fastest counts (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onnx", type=Path, default=None, help="an exported file to time instead of exporting the run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export-ds3"),
                    help="OUT.json and OUT.md (default: %(default)s)")
    ap.add_argument("--note", default="", help="a line about the run for the Markdown table")
    args = ap.parse_args(argv)

    import torch

    from calopc.export.graph import export_model
    from calopc.export.par04 import E_MAX_MEV, Par04Harness, input_vector
    from calopc.models import load
    from calopc.models.generate import generate

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    loaded = load(args.run)
    rng = np.random.default_rng(args.seed)
    n_max = max(args.n1, args.n100)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), n_max))

    tmp = tempfile.TemporaryDirectory(prefix="calopc-export-bench-")
    if args.onnx is None:
        path = Path(tmp.name) / "model.onnx"
        t = time.perf_counter()
        res = export_model(args.run, path, target="par04")
        export_s, size, latent, placement = time.perf_counter() - t, path.stat().st_size, res.latent_size, res.placement
    else:
        path = args.onnx
        from calopc.export.graph import build_graph

        g = build_graph(loaded)
        export_s, size, latent, placement = None, path.stat().st_size, g.latent_size, g.sampler.policy
    vec = input_vector(rng.standard_normal((n_max, latent)), energies, np.pi / 2, e_max=E_MAX_MEV)

    def torch_run(n: int, batch: int) -> float:
        r = generate(args.run, energies[:n], output=None, seed=args.seed, batch_size=batch, device="cpu")
        return r.n_points / n

    def onnx_run(h: Par04Harness, n: int, batch: int) -> None:
        for i in range(0, n, batch):
            h.run_vectors(vec[i:i + batch])

    # one session at a time (a batch of 100 dataset-3 showers holds ~10^5-10^6 points: GBs of activations that
    # the session's memory arena keeps), each warmed up before its clock starts
    best: dict[tuple[str, int], tuple[float, float]] = {}
    points: dict[int, float] = {}
    sizes = ((1, args.n1), (100, args.n100))

    def keep(key: tuple[str, int], t: tuple[float, float]) -> None:
        if key not in best or t[0] < best[key][0]:
            best[key] = t

    for _ in range(args.repeats):
        torch_run(min(2, n_max), 1)
        for batch, n in sizes:
            box: dict = {}
            keep(("torch", batch), _timed(lambda: box.setdefault("p", torch_run(n, batch))))  # noqa: B023
            points[batch] = box["p"]
        for name, opt in (("onnx", False), ("onnx-opt", True)):
            h = Par04Harness(path, latent_size=latent, threads=1, optimize=opt)
            onnx_run(h, min(2, n_max), 1)
            for batch, n in sizes:
                keep((name, batch), _timed(lambda: onnx_run(h, n, batch)))  # noqa: B023
            h = None  # the session and its memory arena go before the next one
    rows = []
    for batch, n in sizes:
        row = {"batch": batch, "showers": n, "points_per_shower": points[batch]}
        for name in ("torch", "onnx", "onnx-opt"):
            w, c = best[(name, batch)]
            row[f"{name}_ms_wall"] = 1e3 * w / n
            row[f"{name}_ms_cpu"] = 1e3 * c / n
        for name in ("onnx", "onnx-opt"):
            row[f"{name}_over_torch_wall"] = row[f"{name}_ms_wall"] / row["torch_ms_wall"]
            row[f"{name}_over_torch_cpu"] = row[f"{name}_ms_cpu"] / row["torch_ms_cpu"]
        rows.append(row)
    load_after = os.getloadavg()
    import onnxruntime

    cfg = loaded.model.config
    out = {"run": str(args.run), "model": loaded.name, "consistency": bool(getattr(cfg, "consistency", False)),
           "steps": getattr(cfg, "steps", None), "shower_passes": getattr(cfg, "shower_passes", None),
           "alpha": getattr(cfg, "alpha", None), "placement": placement, "latent_size": latent,
           "export_seconds": export_s, "onnx_bytes": size, "rows": rows, "note": args.note,
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                       "python": sys.version.split()[0], "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__},
           "load_avg_before": load_before, "load_avg_after": load_after,
           "energies": "log-uniform 1e3-1e6 MeV", "threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Exported {loaded.name} on dataset 3: ONNX Runtime vs torch, one thread", "",
          f"Run `{args.run}` ({args.note or 'see the JSON'}); placement {placement}; latent size {latent}; "
          f"ONNX file {size / 1e6:.2f} MB" + (f", exported in {export_s:.1f} s" if export_s is not None else "") + ".",
          f"Load average before {', '.join(f'{x:.1f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); fastest of {args.repeats} rounds.", "",
          "| batch | showers | points/shower | torch ms/shower (wall / CPU) | ONNX ms/shower, opt. off (wall / CPU) | "
          "ratio | ONNX ms/shower, opt. on (wall / CPU) | ratio |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['batch']} | {r['showers']} | {r['points_per_shower']:.0f} | {r['torch_ms_wall']:.1f} / "
                  f"{r['torch_ms_cpu']:.1f} | {r['onnx_ms_wall']:.1f} / {r['onnx_ms_cpu']:.1f} | "
                  f"{r['onnx_over_torch_wall']:.2f} / {r['onnx_over_torch_cpu']:.2f} | {r['onnx-opt_ms_wall']:.1f} / "
                  f"{r['onnx-opt_ms_cpu']:.1f} | {r['onnx-opt_over_torch_wall']:.2f} / {r['onnx-opt_over_torch_cpu']:.2f} |")
    md += ["", "Ratios are ONNX / torch (wall / CPU); below 1 the exported graph is faster. torch is "
           "`calopc.models.generate.generate` (sampling and placement, no file); ONNX is the Par04 graph "
           "(sampling, placement, threshold and the reordered 40,500 outputs) as Par04 calls it."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
