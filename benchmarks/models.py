r"""Model comparison on synthetic dataset-2 showers: same data, same wall-clock training budget.

Every entry ``label=model[:key=value,...]`` is trained with :func:`calopc.models.train` on the
same synthetic training showers for ``--time-limit`` seconds, generates one shower per
held-out incident energy with :func:`calopc.models.generate` (HDF5, automatic placement), and
is evaluated with :func:`calopc.eval.evaluate` against the held-out showers. One table and
``summary.json``.

Entry keys: model config keys (``alpha=model``), ``train.KEY=VALUE`` (training options),
``gen.KEY=VALUE`` (keywords of :func:`calopc.models.generate`), and ``post_train=NAME`` to
run the hook ``POST_TRAIN[NAME](entry, run_dir, context) -> run_dir`` after training (e.g.
a distillation that returns the run directory to generate from).

Usage::

    python benchmarks/models.py --time-limit 240 --train-showers 20000 --n-eval 5000 --threads 1 \
        --parallel 2 --cls-epochs 10 --cls-hidden 256 --cls-seeds 1 --out bench_models
    python benchmarks/models.py --entries "old=calopointflow:alpha=model,set_summary=false,dequantisation=uniform" \
        "ii=calopointflow" --time-limit 60 --n-eval 1000 --out /tmp/bm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: entries compared when --entries is not given
DEFAULT_ENTRIES: list[str] = [
    "cpf-II-old=calopointflow:alpha=model,set_summary=false,dequantisation=uniform",
    "cpf-II=calopointflow",
    "caloclouds=caloclouds",
    "caloclouds-cm=caloclouds:post_train=distill",
    "caloclouds-transformer=caloclouds:denoiser=transformer",
    "deeptree=deeptree:train.warmup=10,train.batch_size=16",
]

#: model config every entry of a model starts from (sized for CPU budgets of minutes); entries override
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "calopointflow": {"point_hidden": [96, 96], "point_transforms": 5, "points_per_shower_loss": 256},
    # the CaloClouds3 width of the pointwise net (32-64-128-64-32; CaloClouds II is 128-...-128) so that
    # 25 evaluations of ~1700 points per dataset-2 shower fit a CPU budget; 256 random points per shower in the loss
    "caloclouds": {"widths": [32, 64, 128, 64, 32], "points_per_shower_loss": 256, "dim": 32, "heads": 2, "mlp": 64},
    # DeepTree: the fidelity table's CPU recipe (CPU_CONFIG of benchmarks/fidelity.py, read below: one literal)
}


def fidelity_cpu_config() -> dict[str, dict[str, Any]]:
    """``CPU_CONFIG`` of ``benchmarks/fidelity.py``, read as a literal (that script imports this module)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent / "fidelity.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CPU_CONFIG":
            return ast.literal_eval(node.value)
    msg = "benchmarks/fidelity.py: no CPU_CONFIG literal"
    raise RuntimeError(msg)


BASE_CONFIG["deeptree"] = fidelity_cpu_config()["deeptree"]

#: training options every entry starts from; ``train.KEY=VALUE`` overrides
BASE_TRAIN: dict[str, Any] = {"batch_size": 32, "lr": 1e-3, "steps": 1_000_000, "checkpoint_every": 1_000_000,
                              "warmup": 20}

#: post-training hooks: ``POST_TRAIN[name](entry, run_dir, context) -> run directory to generate from``.
#: ``context`` holds ``data`` (training Parquet), ``args`` (the parsed options as a dict) and ``work`` (entry folder).
POST_TRAIN: dict[str, Callable[[Entry, Path, dict], Path]] = {}

#: consistency distillation of a caloclouds entry (``post_train=distill``): its budget as a share of --time-limit
DISTILL: dict[str, Any] = {"share": 0.5, "lr": 1e-3, "batch_size": 32, "points_per_shower": 256}


def _distill(entry: Entry, run: Path, context: dict) -> Path:
    """``calopc distill`` of a trained caloclouds run for ``DISTILL["share"] * --time-limit`` seconds."""
    from calopc.models.distill import DistillConfig, distill

    a = context["args"]
    out = Path(context["work"]) / "run_cm"
    cfg = DistillConfig(steps=10**9, time_limit=DISTILL["share"] * a["time_limit"], lr=DISTILL["lr"],
                        batch_size=DISTILL["batch_size"], points_per_shower=DISTILL["points_per_shower"],
                        device=a["device"], seed=a["seed"], progress=False)
    res = distill(run, out, data=context["data"], config=cfg, overwrite=True)
    print(f"[{entry.label}] distilled: {res['steps']} steps in {res['seconds']:.0f} s, loss {res['final_loss']:.4f}",
          flush=True)
    return out


POST_TRAIN["distill"] = _distill


def _value(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _split_options(opts: str) -> list[str]:
    """``a=1,b=[2,3]`` → ``["a=1", "b=[2,3]"]`` (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in opts:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def sort_options(spec: str, opts: str, special: tuple[str, ...] = ("post_train",)
                 ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The ``key=value,...`` options of entry ``spec`` → ``(special, config, train, gen)``: the keys named in
    ``special`` (raw strings), model-config keys, ``train.KEY`` and ``gen.KEY`` (values read as JSON when they are)."""
    sp: dict[str, str] = {}
    cfg: dict[str, Any] = {}
    tr: dict[str, Any] = {}
    gen: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in _split_options(opts))):
        key, sep, val = item.partition("=")
        if not sep:
            msg = f"--entries {spec!r}: option {item!r} is not key=value"
            raise ValueError(msg)
        if key in special:
            sp[key] = val
        elif key.startswith("train."):
            tr[key[6:]] = _value(val)
        elif key.startswith("gen."):
            gen[key[4:]] = _value(val)
        else:
            cfg[key] = _value(val)
    return sp, cfg, tr, gen


@dataclass
class Entry:
    """One ``label=model[:key=value,...]`` entry."""

    label: str
    model: str
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    gen: dict[str, Any] = field(default_factory=dict)
    post_train: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Entry:
        label, sep, rest = spec.partition("=")
        if not sep or not label or not rest:
            msg = f"--entries {spec!r}: expected label=model[:key=value,...]"
            raise ValueError(msg)
        model, _, opts = rest.partition(":")
        sp, cfg, tr, gen = sort_options(spec, opts)
        val = sp.get("post_train")
        if val is not None and val not in POST_TRAIN:
            msg = f"--entries {spec!r}: no post_train hook {val!r}; registered: {sorted(POST_TRAIN)}"
            raise ValueError(msg)
        return cls(label, model.strip().lower(), cfg, tr, gen, val)


def _data(args: argparse.Namespace) -> tuple[Path, Path]:
    """Synthetic training Parquet and held-out HDF5 in ``OUT/data`` (made once, reused)."""
    from calopc.converters import convert_file
    from calopc.synth import write_synthetic

    d = args.out / "data"
    d.mkdir(parents=True, exist_ok=True)
    train_h5 = d / f"train_{args.train_showers}.hdf5"
    train_pq = train_h5.with_suffix(".parquet")
    ref = d / f"ref_{args.n_eval}.hdf5"
    if not train_pq.exists():
        if not train_h5.exists():
            write_synthetic(train_h5, dataset="2", n=args.train_showers, seed=1)
        convert_file(train_h5, train_pq, progress=False)
        train_h5.unlink()
    if not ref.exists():
        write_synthetic(ref, dataset="2", n=args.n_eval, seed=2)
    return train_pq, ref


def run_entry(spec: str, args_d: dict) -> dict:
    """Train, generate and evaluate one entry (runs in its own process with ``--parallel``)."""
    import torch

    args = argparse.Namespace(**args_d)
    torch.set_num_threads(args.threads)
    from calopc.eval import evaluate
    from calopc.models.checkpoint import load
    from calopc.models.generate import generate, parse_energies
    from calopc.models.train import TrainConfig, train

    entry = Entry.parse(spec)
    train_pq, ref = Path(args.train_pq), Path(args.ref)
    work = args.out / entry.label
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"label": entry.label, "model": entry.model, "config": entry.config, "train_options": entry.train,
                 "spec": spec}
    t0 = time.perf_counter()
    try:
        run = work / "run"
        cfg = {**BASE_CONFIG.get(entry.model, {}), **entry.config}
        tcfg = TrainConfig.from_dict({**BASE_TRAIN, "time_limit": args.time_limit, "device": args.device,
                                      "seed": args.seed, "progress": False, **entry.train})
        if args.reuse and (run / "config.json").exists():
            res["train"] = {"steps": None, "reused": str(run), "seconds": 0.0, "final_loss": float("nan")}
        else:
            res["train"] = train(entry.model, train_pq, run, model_config=cfg, config=tcfg, overwrite=True)
        print(f"[{entry.label}] trained: {res['train']['steps']} steps in {res['train']['seconds']:.0f} s, "
              f"loss {res['train']['final_loss']:.4f}", flush=True)
        if entry.post_train:
            t = time.perf_counter()
            run = Path(POST_TRAIN[entry.post_train](entry, run, {"data": train_pq, "args": args_d, "work": work}))
            res["post_train_seconds"] = time.perf_counter() - t
        loaded = load(run, device="cpu")
        res["parameters"] = int(sum(p.numel() for p in loaded.model.parameters()))
        energies = parse_energies(str(ref), args.n_eval)
        gen = work / "gen.hdf5"
        g = generate(run, energies, output=gen, **{"seed": args.seed, "batch_size": args.gen_batch_size,
                                                   "device": args.device, **entry.gen})
        res["generate"] = g.as_dict()
        res["collision_share"] = g.collisions.get("collision_rate")
        res["run_dir"] = str(run)
        print(f"[{entry.label}] generated {args.n_eval} showers; collisions {res['collision_share']}", flush=True)
        metrics = ["hist", "fpd", "kpd", "pointcloud"] + ([] if args.no_classifier else ["cls-low", "cls-high"])
        import inspect

        extra = {}
        if "fpd_estimator" in inspect.signature(evaluate).parameters:
            extra["fpd_estimator"] = args.fpd_estimator
        res["evaluate"] = evaluate(gen, ref, work / "eval", metrics=metrics, cls_epochs=args.cls_epochs,
                                   cls_seeds=args.cls_seeds, cls_hidden=args.cls_hidden, device=args.device,
                                   kpd_batch_size=args.kpd_batch_size or min(10_000, args.n_eval),
                                   seed=args.seed, progress=False, **extra)
    except Exception as err:  # noqa: BLE001  (one broken entry must not cost the others' results)
        import traceback

        res["error"] = f"{type(err).__name__}: {err}"
        res["traceback"] = traceback.format_exc()
        print(f"[{entry.label}] failed: {res['error']}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    (work / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def time_cpu(results: list[dict], args: argparse.Namespace) -> None:
    """Generation speed on the CPU, 1 thread, batch 100, to HDF5 (sampling, placement, writing), measured
    entry after entry in this process after all the training, ``--time-rounds`` times interleaved; the best
    round counts (the least disturbed by other work on the machine)."""
    import torch

    from calopc.models.generate import generate, parse_energies

    energies = parse_energies(str(args.ref), args.n_time)
    todo = [r for r in results if r.get("run_dir")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(args.time_rounds):
            for r in todo:
                entry = Entry.parse(r["spec"])
                out = Path(r["run_dir"]).parent / "timing.hdf5"
                try:
                    g = generate(r["run_dir"], energies, output=out,
                                 **{**entry.gen, "seed": args.seed + 1, "batch_size": 100, "device": "cpu"})
                except Exception as err:  # noqa: BLE001
                    r["timing_error"] = f"{type(err).__name__}: {err}"
                    continue
                finally:
                    out.unlink(missing_ok=True)
                v = {"showers_per_second": len(energies) / g.seconds_total,
                     "sampling_showers_per_second": g.showers_per_second, "n": len(energies), "round": k}
                best = r.get("cpu_1thread_bs100")
                r.setdefault("cpu_1thread_rounds", []).append(v)
                if best is None or v["showers_per_second"] > best["showers_per_second"]:
                    r["cpu_1thread_bs100"] = v
                print(f"[{r['label']}] CPU 1 thread, batch 100: {v['showers_per_second']:.2f} showers/s", flush=True)
    finally:
        torch.set_num_threads(threads)


def _row(r: dict) -> dict[str, Any]:
    ev = r.get("evaluate", {})
    cls = ev.get("classifier", {})
    sep = ev.get("separation_summary", {})
    pc = ev.get("pointcloud", {})

    def pd(key: str) -> str:
        v = ev.get(key)
        return "-" if not v else f"{v['value']:.3g} ({v['ref_floor']:.2g})"

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    return {
        "entry": r["label"],
        "steps": f(r.get("train", {}).get("steps"), "d"),
        "AUC low": f(cls.get("low", {}).get("auc"), ".3f"),
        "AUC high": f(cls.get("high", {}).get("auc"), ".3f"),
        "FPD e3 (floor)": pd("fpd_x1e3"),
        "KPD e3 (floor)": pd("kpd_x1e3"),
        "E_tot/E_inc": f(sep.get("E_ratio"), ".3f"),
        "E_layer": f(sep.get("E_layer"), ".3f"),
        "EC_r": f(sep.get("EC_r"), ".3f"),
        "width_r": f(sep.get("width_r"), ".3f"),
        "sparsity": f(sep.get("sparsity"), ".3f"),
        "hits": f(pc.get("hits_separation"), ".3f"),
        "collisions": f(None if r.get("collision_share") is None else 100 * r["collision_share"], ".2f") + "%",
        "params": f(r.get("parameters"), ",d"),
        "shw/s cpu1": f(r.get("cpu_1thread_bs100", {}).get("showers_per_second"), ".1f"),
    }


def _compare(results: list[dict], ref: Path, args: argparse.Namespace) -> dict | None:
    """The multi-class log-posterior of :func:`calopc.eval.compare.compare` over the entries that generated showers."""
    from calopc.eval.compare import MultiClassConfig, compare

    gens = {r["label"]: r["generate"]["output"] for r in results if r.get("generate", {}).get("output")}
    if not gens:
        return None
    extra = {r["label"]: {"collision_rate": r.get("collision_share")} for r in results if r["label"] in gens}
    try:
        return compare(ref, gens, args.out / "compare", runs=args.compare_runs, metrics=(), extra=extra,
                       multiclass=MultiClassConfig(hidden=(args.cls_hidden, args.cls_hidden), epochs=args.cls_epochs),
                       device=args.device, seed=args.seed, progress=False)
    except Exception as err:  # noqa: BLE001  (the table stands without it)
        return {"error": f"{type(err).__name__}: {err}"}


def table(results: list[dict]) -> str:
    """The comparison as a Markdown table (separation powers: lower is better)."""
    rows = [_row(r) for r in results]
    cols = list(rows[0]) if rows else []
    w = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["| " + " | ".join(c.ljust(w[c]) for c in cols) + " |",
             "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|"]
    lines += ["| " + " | ".join(r[c].ljust(w[c]) for c in cols) + " |" for r in rows]
    errors = [f"{r['label']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines + errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", nargs="+", default=None, metavar="LABEL=MODEL[:K=V,...]",
                    help=f"models to compare (default: {' '.join(DEFAULT_ENTRIES)})")
    ap.add_argument("--time-limit", type=float, default=240, help="training seconds per entry (default: %(default)s)")
    ap.add_argument("--train-showers", type=int, default=20_000, help="synthetic training showers (default: %(default)s)")
    ap.add_argument("--n-eval", type=int, default=5_000, help="generated and held-out showers (default: %(default)s)")
    ap.add_argument("--n-time", type=int, default=500, help="showers of the CPU timing run (default: %(default)s)")
    ap.add_argument("--time-rounds", type=int, default=2,
                    help="CPU timing rounds, entries interleaved, best counts (default: %(default)s)")
    ap.add_argument("--gen-batch-size", type=int, default=500, help="showers per generation batch (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per entry (default: %(default)s)")
    ap.add_argument("--parallel", type=int, default=1, help="entries run side by side (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--cls-epochs", type=int, default=50, help="classifier epochs (official 50; default: %(default)s)")
    ap.add_argument("--cls-hidden", type=int, default=2048, help="classifier width (official 2048; default: %(default)s)")
    ap.add_argument("--cls-seeds", type=int, default=3, help="classifier trainings per AUC (default: %(default)s)")
    ap.add_argument("--no-classifier", action="store_true", help="skip the classifier AUCs")
    ap.add_argument("--kpd-batch-size", type=int, default=None,
                    help="KPD batch size (official 10,000; default: min(10,000, --n-eval))")
    ap.add_argument("--fpd-estimator", choices=("official", "calopc"), default="calopc",
                    help="FPD estimator: official (batches of 10k-50k drawn with replacement: slow on small samples) "
                         "or calopc (batches up to the sample size, without replacement) (default: %(default)s)")
    ap.add_argument("--compare-runs", type=int, default=0,
                    help="also train the multi-class classifier of calopc.eval.compare on all entries' showers this "
                         "many times (its width/epochs from --cls-hidden/--cls-epochs; 0: skip) (default: %(default)s)")
    ap.add_argument("--reuse", action="store_true", help="reuse the entries' trained run directories in --out")
    ap.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("bench_models"), help="work folder (default: %(default)s)")
    args = ap.parse_args(argv)
    specs = args.entries or DEFAULT_ENTRIES
    entries = [Entry.parse(s) for s in specs]  # bad specs fail before any work
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        msg = f"--entries: labels must be distinct, got {labels}"
        raise ValueError(msg)
    from calopc.models import available

    bad = [e.model for e in entries if e.model not in available()]
    if bad:
        msg = f"--entries: unknown models {bad}; available: {', '.join(available())}"
        raise ValueError(msg)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    train_pq, ref = _data(args)
    print(f"data: {train_pq} ({args.train_showers} showers), {ref} ({args.n_eval}) in {time.perf_counter() - t:.0f} s",
          flush=True)
    args_d = {**vars(args), "train_pq": str(train_pq), "ref": str(ref)}
    if args.parallel > 1 and len(specs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.parallel, len(specs)), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(run_entry, specs, [args_d] * len(specs)))
    else:
        results = [run_entry(s, args_d) for s in specs]
    if args.n_time > 0 and args.time_rounds > 0:
        time_cpu(results, argparse.Namespace(**args_d))
    comparison = None
    if args.compare_runs > 0:
        comparison = _compare(results, ref, args)
    out = {"command": "python benchmarks/models.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "args": {k: str(v) for k, v in args_d.items()}, "entries": results, "table": table(results),
           "compare": comparison}
    from calopc.io import atomic_output

    with atomic_output(args.out / "summary.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(out["table"])
    for row in (comparison or {}).get("leaderboard", []):
        print(f"multi-class ⟨log p⟩ of {row['name']}'s showers: as itself {row['log_p_self']:.3f}, "
              f"as reference {row['log_p_reference']:.3f}")
    print(f"summary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
