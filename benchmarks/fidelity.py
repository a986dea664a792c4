r"""The fidelity table: every model family trained on the same synthetic showers for the same budget,
then generated showers against held-out showers.

Every entry is trained with :func:`calopc.models.train` for ``--budget`` seconds (of wall clock, or with
``--clock process`` of the process's CPU time, which a shared machine's load does not shrink) on
the same synthetic training showers (the family's own training defaults; model sizes in
:data:`ENTRIES`), generates one shower per held-out incident energy with
:func:`calopc.models.generate` (official HDF5), and is evaluated with :func:`calopc.eval.evaluate`
against the held-out showers:

* AUC of the official DNN classifier on low-level (voxels) and high-level features, trained as the
  official evaluation trains it: width 2,048, Adam 2e-4, batch 1,000, ``--cls-epochs`` epochs (default
  the official 50; at 5,000 vs 5,000 showers the AUC keeps rising long after 10 epochs), the epoch
  with the best test accuracy, 60/20/20 split per class below 100,000 showers per sample; every row
  records its ``classifier_epochs`` and the table shows them;
* FPD and KPD (×10³) with the reference floor (held-out against a second independent held-out set);
* separation powers (E_tot/E_inc, E_layer, EC_r, width_r, sparsity: means over layers; hits);
* response ⟨E_tot/E_inc⟩ and resolution σ/⟨E_tot/E_inc⟩ of generated and held-out showers;
* collision share (points that shared a cell) and moved share (points placed elsewhere than
  their own cell) of the placement, parameters, generation showers/s.

Entries can run in separate invocations (side by side, or one after the other): every finished
entry is merged into ``RESULTS/fidelity-ds2.json`` (a list of entries, replaced by name; a lock
file keeps two invocations from writing at once) and the Markdown table
``RESULTS/fidelity-ds2.md`` is rewritten from it. A loss curve per trained entry goes to
``RESULTS/fidelity-ds2-loss-NAME.png``.

Entries are named (:data:`ENTRIES`) or given as ``NAME=MODEL[:key=value,...]`` with the keys of
``benchmarks/models.py`` (model config keys, ``train.KEY``, ``gen.KEY``) and:

* ``from=NAME``: no training, generate from entry NAME's run directory (placement policies,
  sampler steps of one trained model);
* ``post_train=distill``: consistency distillation of the run (``--distill-budget`` seconds),
  generation from the student; ``distill.KEY=VALUE`` sets an option of
  :class:`~calopc.models.distill.DistillConfig` (e.g. ``distill.moment_matching=0.1``).

``--snapshots 300,900`` keeps the model of every entry trained in the invocation after 300 and 900 s
of its training (one run, whose learning-rate schedule spans ``--budget``) and evaluates each as a
row ``NAME/300s``, ``NAME/900s`` next to the row of the whole run: quality against compute.

Usage::

    python benchmarks/fidelity.py --entries cpf-II caloclouds --budget 300 --train-showers 50000 --n-eval 3000
    python benchmarks/fidelity.py --entries deeptree caloclouds-cm --budget 300        # merged into the same table
    python benchmarks/fidelity.py --entries cpf-II@ds3 --dataset 3 --budget 240 --train-showers 5000 --n-eval 1000
    python benchmarks/fidelity.py --entries cpf-II-thin --budget 2700 --snapshots 300,900 --clock process
    python benchmarks/fidelity.py --device cuda --budget 3600 --train-showers 100000 --n-eval 10000
    python benchmarks/fidelity.py --table                                             # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: model configs sized for CPU budgets of minutes (recorded with every entry); training options are the family's
#: defaults (calopc.models.train) except the budget
CPU_CONFIG: dict[str, dict[str, Any]] = {
    # the set summary (DeepSetFlow) needs all points of a shower in the loss (points_per_shower_loss=0)
    "calopointflow": {"point_hidden": [96, 96], "point_transforms": 5, "points_per_shower_loss": 0},
    "caloclouds": {"widths": [32, 64, 128, 64, 32], "points_per_shower_loss": 256},
    # DeepTree (benchmarks/models.py reads this literal too): 4 critic heads, 16-4-1 pooling nodes (published 30-6-1:
    # 16 % more CPU per step), no critic dropout, learning rates 10x the published 1e-5 / 3e-5 (made for millions of
    # GPU steps); the shower model updated twice per GAN step (4: 10 % more CPU per step); the generator also matches
    # the batch's per-layer radial moments and their covariance with log E_inc (30 CPU-minutes, 50-epoch readout:
    # AUC 0.923 / 0.910, FPD 480; without the covariance 0.974 / 0.961, 753; weight 10: 0.988 / 0.983; no moments:
    # 0.996 / 0.999, 7,345)
    "deeptree": {"critic_heads": 4, "critic_nodes": [16, 4, 1], "critic_dropout": 0.0, "lr_generator": 1e-4,
                 "lr_critic": 3e-4, "shower_hidden": [256, 256], "shower_steps": 2, "moment_matching": 3.0,
                 "moment_condition": True},
}

#: CaloPointFlow II's CPU recipe: no set summary, so the loss can sample 256 points per shower (a step ~10x cheaper)
_THIN = "calopointflow:set_summary=false,points_per_shower_loss=256"

#: named entries (``--entries NAME``); ``{cfg}`` is replaced by the CPU config of the model unless ``--full-size``
ENTRIES: dict[str, str] = {
    "cpf-II": "calopointflow",
    "cpf-II-published": "calopointflow:preset=published",
    "cpf-II-thin": _THIN,
    # the same recipe, the encoder reading all points of every shower (the recipe before thin_encoder: 2.3x the CPU)
    "cpf-II-thin-full-encoder": _THIN + ",thin_encoder=false",
    "caloclouds": "caloclouds",
    "caloclouds-cm": "caloclouds:from=caloclouds,post_train=distill",
    "caloclouds-published": "caloclouds:preset=published",
    "deeptree": "deeptree",
    # placement policies of one trained model (no training)
    "cpf-II/likelihood": "calopointflow:from=cpf-II,gen.collisions=likelihood",
    "cpf-II/alpha-free": "calopointflow:from=cpf-II,gen.collisions=alpha-free",
    "cpf-II/nearest-free": "calopointflow:from=cpf-II,gen.collisions=nearest-free",
    "cpf-II-thin/likelihood": "calopointflow:from=cpf-II-thin,gen.collisions=likelihood",
    "cpf-II-thin/nearest-free": "calopointflow:from=cpf-II-thin,gen.collisions=nearest-free",
    "caloclouds/likelihood": "caloclouds:from=caloclouds,gen.collisions=likelihood",
    "caloclouds/merge": "caloclouds:from=caloclouds,gen.model_kwargs={\"overflow\":\"merge\"}",
    # the published CaloClouds (α modelled) placed three ways: its nearest-free cell (the row above), α drawn per
    # ring with a full ring's extra points merged, or moved to the next ring with room (least energetic first)
    "caloclouds-published/alpha-free": "caloclouds:from=caloclouds-published,gen.collisions=alpha-free",
    "caloclouds-published/energy-move": "caloclouds:from=caloclouds-published,gen.collisions=alpha-free,"
                                        "gen.model_kwargs={\"overflow\":\"move\"}",
    "caloclouds-cm/likelihood": "caloclouds:from=caloclouds-cm,gen.collisions=likelihood",
    # the distilled student's α discarded and drawn per ring, a full ring's least energetic points moved outwards
    "caloclouds-cm/energy-move": "caloclouds:from=caloclouds-cm,gen.collisions=alpha-free,"
                                 "gen.model_kwargs={\"overflow\":\"move\"}",
    # CaloClouds trained without α (drawn per ring at placement, energy-aware overflow), distilled to one step
    "caloclouds-free-cm": "caloclouds:alpha=free,post_train=distill",
    "cpf-II@ds3": "calopointflow",
    "cpf-II-thin@ds3": _THIN,
    "caloclouds-cm@ds3": "caloclouds:post_train=distill",     # trains its own teacher, then distils
}

DEFAULT_ENTRIES = ["cpf-II-thin", "cpf-II", "cpf-II-published", "caloclouds", "caloclouds-cm", "deeptree",
                   "cpf-II-thin/likelihood"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import sort_options  # noqa: E402  (benchmarks/models.py: the entry-option parsing both share)


@dataclass
class Entry:
    """One ``NAME=MODEL[:key=value,...]`` entry."""

    name: str
    model: str
    spec: str
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    gen: dict[str, Any] = field(default_factory=dict)
    source: str | None = None          # from=NAME: generate from that entry's run
    post_train: str | None = None
    snapshot: dict | None = None       # a snapshot of the source's run: {"seconds", "step", "elapsed", "path"}
    distill: dict[str, Any] = field(default_factory=dict)   # distill.KEY: DistillConfig options of post_train=distill

    @classmethod
    def parse(cls, spec: str) -> Entry:
        if "=" not in spec.split(":", 1)[0]:
            if spec not in ENTRIES:
                msg = f"--entries {spec!r}: not a named entry ({', '.join(ENTRIES)}) nor NAME=MODEL[:key=value,...]"
                raise ValueError(msg)
            spec = f"{spec}={ENTRIES[spec]}"
        name, _, rest = spec.partition("=")
        model, _, opts = rest.partition(":")
        sp, cfg, tr, gen = sort_options(spec, opts, special=("from", "post_train"))
        dist = {k[8:]: cfg.pop(k) for k in list(cfg) if k.startswith("distill.")}
        if dist and sp.get("post_train") != "distill":
            msg = f"--entries {spec!r}: distill.KEY options need post_train=distill"
            raise ValueError(msg)
        if sp.get("post_train", "distill") != "distill":
            msg = f"--entries {spec!r}: post_train must be distill, got {sp['post_train']!r}"
            raise ValueError(msg)
        return cls(name, model.strip().lower(), spec, cfg, tr, gen, sp.get("from"), sp.get("post_train"), distill=dist)


# --------------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load() -> str:
    """The 1/5/15-minute load averages and the CPUs, e.g. ``"2.10 1.95 1.80 (2 CPUs)"``."""
    try:
        a = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{a[0]:.2f} {a[1]:.2f} {a[2]:.2f} ({os.cpu_count()} CPUs)"


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    s = f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name()}"
    return s


# --------------------------------------------------------------------------------------------- data
def prepare_data(dataset: str, n_train: int, n_eval: int, work: Path, seed: int = 1) -> tuple[Path, Path, Path]:
    """Synthetic training Parquet (seed ``seed``), held-out HDF5 (seed ``seed + 1``) and a second held-out HDF5
    for the reference floor (seed ``seed + 2``) in ``work/data`` (made once, reused)."""
    from calopc.converters import convert_file
    from calopc.synth import write_synthetic

    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    train_pq = d / f"ds{dataset}_train_{n_train}_s{seed}.parquet"
    ref = d / f"ds{dataset}_ref_{n_eval}_s{seed + 1}.hdf5"
    if not train_pq.exists():
        t = time.perf_counter()
        h5 = train_pq.with_suffix(".hdf5")
        write_synthetic(h5, dataset=dataset, n=n_train, seed=seed)
        convert_file(h5, train_pq, progress=False)
        h5.unlink()
        print(f"data: {train_pq} in {time.perf_counter() - t:.0f} s", flush=True)
    ref2 = d / f"ds{dataset}_ref_{n_eval}_s{seed + 2}.hdf5"
    for path, s in ((ref, seed + 1), (ref2, seed + 2)):
        if not path.exists():
            write_synthetic(path, dataset=dataset, n=n_eval, seed=s)
    return train_pq, ref, ref2


def reference_floor(ref: Path, ref2: Path, seed: int) -> dict[str, float]:
    """FPD and KPD ×10³ of two independent held-out samples of the same size, with the estimator and
    settings of the entries (calopc estimator, FPD batches from 10,000, KPD batch min(10,000, N)): what a
    perfect generator scores at this sample size. Cached next to ``ref``."""
    cache = ref.with_name(ref.stem + f"_floor_seed{seed}.json")
    if cache.exists():
        return json.loads(cache.read_text())
    from calopc.eval.distances import fpd, kpd
    from calopc.eval.features import high_level_vector
    from calopc.eval.samples import load_sample

    a, b = (high_level_vector(load_sample(p, keep_voxels=False).features) for p in (ref, ref2))
    f, fe = fpd(a, b, estimator="calopc", seed=42 + seed, min_samples=10_000)
    k, ke = kpd(a, b, estimator="calopc", seed=42 + seed, batch_size=min(10_000, len(a)))
    out = {"fpd": f * 1e3, "fpd_err": fe * 1e3, "kpd": k * 1e3, "kpd_err": ke * 1e3, "n": len(a)}
    cache.write_text(json.dumps(out) + "\n")
    return out


def energy_response(path: Path, threshold: float) -> dict[str, float]:
    """⟨E_tot/E_inc⟩, its standard deviation and the resolution σ/⟨⟩ of a shower file (cells below
    ``threshold`` MeV not counted)."""
    from calopc.io import open_showers

    ratios = []
    with open_showers(path, validate=False) as f:
        e_inc, showers = f.read()
        e_inc = np.asarray(e_inc, dtype=np.float64).reshape(-1)
        s = np.asarray(showers, dtype=np.float64)
        s = np.where(s >= threshold, s, 0.0)
        ratios = s.sum(1) / e_inc
    m, sd = float(np.mean(ratios)), float(np.std(ratios))
    return {"mean": m, "std": sd, "resolution": sd / m if m else float("nan")}


# --------------------------------------------------------------------------------------------- one entry
def _stats(run: Path) -> list[dict]:
    p = run / "stats.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def loss_curve(name: str, runs: list[tuple[str, Path]], path: Path) -> str | None:
    """A PNG of the training (and distillation) losses of the run directories against wall seconds."""
    import matplotlib as mpl

    curves = [(label, _stats(run)) for label, run in runs]
    curves = [(label, [r for r in s if "loss" in r]) for label, s in curves]
    curves = [(label, s) for label, s in curves if s]
    if not curves:
        return None
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    with mpl.rc_context({"font.size": 9}):
        fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
        offset = 0.0
        for label, s in curves:
            t = np.array([r.get("seconds", r.get("step", 0)) for r in s], dtype=float) + offset
            loss = np.array([r["loss"] for r in s], dtype=float)
            ax.plot(t, loss, lw=0.8, label=f"{label} ({s[-1].get('step', len(s))} steps)")
            offset = float(t[-1]) if t.size else offset
        ax.set_xlabel("training seconds")
        ax.set_ylabel("loss")
        ax.set_title(name)
        ax.legend(frameon=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _classifier_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The DNN classifier's settings of an entry (those of :class:`calopc.eval.classifier.ClassifierConfig` that
    ``--cls-*`` does not set are its defaults: the official learning rate and batch size)."""
    from calopc.eval.classifier import ClassifierConfig

    c = ClassifierConfig()
    return {"hidden": args.cls_hidden, "epochs": args.cls_epochs, "seeds": args.cls_seeds, "lr": c.lr,
            "batch_size": c.batch_size, "dtype": args.cls_dtype, "split": "60/20/20 % per class (official fixed counts "
            "from 100,000 showers per sample)", "model_selection": "best test accuracy"}


def snapshot_entries(entry: Entry, result: dict) -> list[Entry]:
    """One ``from=`` entry per snapshot of ``entry``'s training run (named ``NAME/300s``), generating with
    ``entry``'s generation options."""
    return [Entry(f"{entry.name}/{snap['seconds']:g}s", entry.model, f"{entry.spec} (snapshot at {snap['seconds']:g} s)",
                  gen=dict(entry.gen), source=entry.name, snapshot=snap)
            for snap in result.get("snapshots") or []]


def teacher_run(src: dict) -> Path:
    """The training run of finished entry ``src`` (for a distilled entry: its teacher, not the student that
    generated), so that ``from=NAME,post_train=distill`` distils NAME's teacher again."""
    if src.get("train_run_dir"):
        return Path(src["train_run_dir"])
    return Path(src["run_dir"]).parent / "run" if src.get("distill") else Path(src["run_dir"])


def run_entry(entry: Entry, args: argparse.Namespace, data: tuple[Path, Path], done: dict[str, dict]) -> dict:
    """Train (unless ``from=``), optionally distil, generate and evaluate one entry."""
    import torch

    from calopc.eval import evaluate
    from calopc.models.checkpoint import load
    from calopc.models.generate import generate, parse_energies
    from calopc.models.train import train, train_config

    torch.set_num_threads(args.threads)
    train_pq, ref, ref2 = data
    work = args.out / f"ds{args.dataset}" / entry.name.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "name": entry.name, "model": entry.model, "dataset": args.dataset, "spec": entry.spec,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"), "machine": _machine(args.device), "device": args.device,
        "threads": args.threads, "command": args.command, "load_start": _load(), "clock": args.clock,
        "n_train": args.train_showers, "n_eval": args.n_eval,
        "classifier": _classifier_settings(args), "classifier_epochs": None if args.no_classifier else args.cls_epochs,
        "budget_s": 0.0, "steps": None,
    }
    t0 = time.perf_counter()
    try:
        if entry.source is not None:
            src = done.get(entry.source)
            if not src or not src.get("run_dir") or not Path(src["run_dir"]).exists():
                msg = f"entry {entry.name}: from={entry.source} needs that entry's run (run it first in --out {args.out})"
                raise ValueError(msg)
            run = Path(src["run_dir"])            # the run that generated (a distilled student's for a -cm entry)
            res.update(source=entry.source, config=src.get("config"), train_options=src.get("train_options"),
                       budget_s=src.get("budget_s"), steps=src.get("steps"), train_seconds=src.get("train_seconds"),
                       final_loss=src.get("final_loss"), distill=src.get("distill"))
            res["train_budget_s"], res["train_steps"] = src.get("train_budget_s"), src.get("train_steps")
            res["loss_curve"] = src.get("loss_curve")
            if entry.post_train == "distill" and src.get("distill"):   # distil the source's teacher again
                run = teacher_run(src)
                res.update(budget_s=src.get("train_budget_s"), steps=src.get("train_steps"), distill=None)
            if entry.snapshot is not None:     # one snapshot of the source's training run
                snap = entry.snapshot
                run = Path(snap["path"])
                res.update(snapshot_of=entry.source, snapshot=snap, budget_s=snap["seconds"], steps=snap["step"],
                           train_seconds=snap["elapsed"], final_loss=None, run_budget_s=src.get("train_budget_s"))
                res["train_budget_s"], res["train_steps"] = snap["seconds"], snap["step"]
        else:
            run = work / "run"
            cfg = {**({} if args.full_size else CPU_CONFIG.get(entry.model, {})), **entry.config}
            topts = {"steps": 10**9, "time_limit": args.budget, "clock": args.clock, "device": args.device,
                     "seed": args.seed, "progress": False, "checkpoint_every": 10**9, **entry.train}
            snaps = [x for x in args.snapshots if x < args.budget] if entry.post_train is None else []
            r = train(entry.model, train_pq, run, model_config=cfg,
                      config=train_config(entry.model, model_config=cfg, **topts), overwrite=True, snapshots=snaps)
            res["snapshots"] = r.get("snapshots", [])
            opts = json.loads((run / "training_options.json").read_text()) if (run / "training_options.json").exists() \
                else topts
            res.update(config=cfg, train_options=opts, budget_s=args.budget, steps=r["steps"],
                       train_seconds=r["seconds"], final_loss=r["final_loss"])
            res["train_budget_s"], res["train_steps"] = args.budget, r["steps"]
            print(f"[{entry.name}] trained: {r['steps']} steps in {r['seconds']:.0f} s, loss {r['final_loss']:.4f}",
                  flush=True)
        res["train_run_dir"] = str(run) if entry.source is None else done[entry.source].get("train_run_dir", str(run))
        runs = [("train", run)]
        if entry.post_train == "distill":
            from calopc.models.distill import DistillConfig, distill

            out = work / "run_cm"
            dcfg = DistillConfig(steps=10**9, time_limit=args.distill_budget, clock=args.clock, lr=args.distill_lr,
                                 points_per_shower=256, device=args.device, seed=args.seed, progress=False,
                                 **entry.distill)
            d = distill(run, out, data=train_pq, config=dcfg, overwrite=True)
            res["distill"] = {"budget_s": args.distill_budget, "steps": d["steps"], "seconds": d["seconds"],
                              "final_loss": d["final_loss"], "lr": args.distill_lr, **entry.distill}
            res["budget_s"] = (res["budget_s"] or 0) + args.distill_budget
            res["steps"] = f"{res['train_steps']}+{d['steps']}"
            print(f"[{entry.name}] distilled: {d['steps']} steps in {d['seconds']:.0f} s", flush=True)
            run = out
            runs.append(("distill", out))
        if entry.source is None or entry.post_train:
            res["loss_curve"] = loss_curve(f"{entry.name} (ds{args.dataset}, {res['budget_s']:.0f} s)", runs,
                                           args.results / f"fidelity-ds2-loss-{entry.name.replace('/', '_')}.png")
        res["run_dir"] = str(run)
        loaded = load(run, device="cpu")
        res["parameters"] = int(sum(p.numel() for p in loaded.model.parameters()))
        energies = parse_energies(str(ref), args.n_eval)
        gen_path = work / "gen.hdf5"
        gkw = {"seed": args.seed, "batch_size": args.gen_batch_size, "device": args.device, **entry.gen}
        policy = gkw.get("collisions", "auto")
        alpha_free = getattr(loaded.model, "alpha_free", None) or getattr(loaded.model.config, "alpha", "") == "free"
        if policy == "auto":  # as calopc.models.cells.place resolves it: alpha-free for models without α
            policy = "alpha-free" if alpha_free else "nearest-free"
        # what a ring with more points than α bins does: the model's overflow (asked for, or its config's when α is
        # free); without one the placement merges them
        overflow = (gkw.get("model_kwargs") or {}).get("overflow") or \
            (getattr(loaded.model.config, "overflow", None) if alpha_free else None)
        res["placement"] = f"{policy} ({overflow})" if policy == "alpha-free" and overflow else policy
        t = time.perf_counter()
        g = generate(run, energies, output=gen_path, **gkw)
        res["generate"] = {**g.as_dict(), "options": {k: v for k, v in gkw.items() if k != "device"},
                           "wall_s": time.perf_counter() - t}
        st = g.collisions
        inside = max(1, st.get("n_points", 0) - st.get("n_outside", 0))
        res["collisions"] = st
        res["collision_share"] = st.get("collision_rate")
        moved = st.get("n_moved", 0) + st.get("n_moved_ring", 0)
        res["moved_share"] = moved / inside
        res["showers_per_s"] = g.showers_per_second_total
        res["sampling_showers_per_s"] = g.showers_per_second
        print(f"[{entry.name}] generated {args.n_eval} showers, {g.showers_per_second_total:.1f}/s; "
              f"collisions {res['collision_share']}, moved {res['moved_share']:.4f}", flush=True)
        metrics = ["hist", "fpd", "kpd", "pointcloud"] + ([] if args.no_classifier else ["cls-low", "cls-high"])
        te = time.perf_counter()
        ev = evaluate(gen_path, ref, work / "eval", metrics=metrics, cls_epochs=args.cls_epochs,
                      cls_seeds=args.cls_seeds, cls_hidden=args.cls_hidden, cls_dtype=args.cls_dtype, device=args.device,
                      kpd_batch_size=min(10_000, args.n_eval), fpd_estimator="calopc", seed=args.seed, progress=False,
                      command=args.command)
        res["evaluate_seconds"] = time.perf_counter() - te
        thr = float(ev.get("threshold_mev", 0.01515))
        res.update(_metrics(ev))
        floor = reference_floor(ref, ref2, args.seed)
        res.update(fpd_floor=floor["fpd"], fpd_floor_err=floor["fpd_err"], kpd_floor=floor["kpd"],
                   kpd_floor_err=floor["kpd_err"])
        res["response"] = {"generated": energy_response(gen_path, thr), "reference": energy_response(ref, thr)}
        res["eval_dir"] = str(work / "eval")
    except Exception as err:  # noqa: BLE001  (one broken entry must not cost the others' results)
        import traceback

        res["error"] = f"{type(err).__name__}: {err}"
        res["traceback"] = traceback.format_exc()
        print(f"[{entry.name}] failed: {res['error']}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    res["load_end"] = _load()
    (work / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def _metrics(ev: dict) -> dict[str, Any]:
    """The table's figures from :func:`calopc.eval.evaluate`'s result."""
    cls = ev.get("classifier", {})
    sep = ev.get("separation_summary", {})
    pc = ev.get("pointcloud", {})
    out: dict[str, Any] = {}
    for kind in ("low", "high"):
        c = cls.get(kind, {})
        out[f"auc_{kind}"] = c.get("auc")
        out[f"auc_{kind}_err"] = c.get("auc_std", c.get("auc_err"))
    for key, name in (("fpd_x1e3", "fpd"), ("kpd_x1e3", "kpd")):
        v = ev.get(key) or {}
        out[name] = v.get("value")
        out[f"{name}_err"] = v.get("error", v.get("err"))
    out["separation"] = {"E_tot/E_inc": sep.get("E_ratio"), "E_layer": sep.get("E_layer"), "EC_r": sep.get("EC_r"),
                         "width_r": sep.get("width_r"), "sparsity": sep.get("sparsity"),
                         "hits": pc.get("hits_separation")}
    out["separation_all"] = {k: v for k, v in sep.items()}
    per = [(k, v) for k, v in (ev.get("separation") or {}).items() if isinstance(v, float) and math.isfinite(v)]
    out["worst_features"] = dict(sorted(per, key=lambda kv: -kv[1])[:6])
    return out


# --------------------------------------------------------------------------------------------- results
@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    import hashlib
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    # the lock lives in the temporary folder (not among the results), one per results file
    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"calopc-fidelity-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        msg = f"{path}: expected a JSON list of entries, got {type(data).__name__}"
        raise ValueError(msg)
    return data


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    tmp.replace(path)


def merge(results: Path, new: list[dict]) -> list[dict]:
    """Merge ``new`` entries into the JSON list at ``results`` (replaced by ``(name, dataset)``) and rewrite
    it and the Markdown table next to it."""
    with _locked(results):
        old = read_results(results)
        keys = {(r["name"], str(r.get("dataset", "2"))) for r in new}
        allr = [r for r in old if (r["name"], str(r.get("dataset", "2"))) not in keys] + new
        for r in allr:  # entries written before worst_features existed
            m = Path(r.get("eval_dir", "")) / "metrics.json"
            if "worst_features" not in r and r.get("eval_dir") and m.exists():
                r["worst_features"] = _metrics(json.loads(m.read_text()))["worst_features"]
        _write(results, json.dumps(allr, indent=1, default=str) + "\n")
        notes = results.with_name(results.stem + "-notes.md")
        _write(results.with_suffix(".md"), markdown(allr, notes.read_text() if notes.exists() else ""))
    return allr


def _f(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def _pm(v: Any, e: Any, fmt: str) -> str:
    s = _f(v, fmt)
    return s if e is None or s == "–" else f"{s}±{_f(e, fmt)}"


def classifier_epochs(r: dict) -> int | None:
    """The epochs of the DNN classifier behind an entry's AUCs (entries written before ``classifier_epochs`` was
    recorded: from its classifier settings; None without AUCs)."""
    if r.get("auc_low") is None and r.get("auc_high") is None:
        return None
    if r.get("classifier_epochs") is not None:
        return int(r["classifier_epochs"])
    ep = (r.get("classifier") or {}).get("epochs")
    return None if ep is None else int(ep)


def table_rows(results: list[dict]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        sep = r.get("separation", {})
        resp = r.get("response", {})
        rg, rr = resp.get("generated", {}), resp.get("reference", {})
        d = r.get("distill")
        rows.append({
            "entry": f"{r['name']}" + ("" if str(r.get("dataset", "2")) == "2" else f" (ds{r['dataset']})"),
            "model": r.get("model", ""),
            "budget s": _f(r.get("budget_s"), ".0f") + (f" ({r.get('train_budget_s', 0):.0f}+{d['budget_s']:.0f})" if d else "")
            + (" CPU" if r.get("clock") == "process" else ""),
            "steps": str(r.get("steps") if r.get("steps") is not None else "–"),
            "cls epochs": _f(classifier_epochs(r), "d"),
            "placement": str(r.get("placement", "–")),
            "AUC low": _pm(r.get("auc_low"), r.get("auc_low_err"), ".3f"),
            "AUC high": _pm(r.get("auc_high"), r.get("auc_high_err"), ".3f"),
            "FPD×10³ (floor)": f"{_f(r.get('fpd'), '.3g')} ({_f(r.get('fpd_floor'), '.2g')})",
            "KPD×10³ (floor)": f"{_f(r.get('kpd'), '.3g')} ({_f(r.get('kpd_floor'), '.2g')})",
            "sep E_tot/E_inc": _f(sep.get("E_tot/E_inc"), ".4f"),
            "sep E_layer": _f(sep.get("E_layer"), ".4f"),
            "sep EC_r": _f(sep.get("EC_r"), ".4f"),
            "sep width_r": _f(sep.get("width_r"), ".4f"),
            "sep sparsity": _f(sep.get("sparsity"), ".4f"),
            "sep hits": _f(sep.get("hits"), ".4f"),
            "response gen/ref": f"{_f(rg.get('mean'), '.3f')}/{_f(rr.get('mean'), '.3f')}",
            "resolution gen/ref": f"{_f(rg.get('resolution'), '.3f')}/{_f(rr.get('resolution'), '.3f')}",
            "collisions": _f(None if r.get("collision_share") is None else 100 * r["collision_share"], ".2f") + " %",
            "moved": _f(None if r.get("moved_share") is None else 100 * r["moved_share"], ".2f") + " %",
            "params": _f(r.get("parameters"), ",d"),
            "gen shw/s": _f(r.get("showers_per_s"), ".1f"),
        })
    return rows


def markdown(results: list[dict], notes: str = "") -> str:
    """The table, ``notes`` (the hand-written reading of it, ``fidelity-ds2-notes.md``) and the settings of every
    entry as Markdown."""
    rows = table_rows(results)
    lines = ["# Fidelity table: synthetic CaloChallenge showers",
             "",
             "Generated by `benchmarks/fidelity.py` (the JSON next to this file holds every figure, the "
             "configurations and the provenance). Every model family is trained on the same synthetic training "
             "showers for the same budget (seconds of wall clock; `CPU`: of the process's CPU time), generates "
             "one shower per held-out incident energy and is "
             "compared with the held-out showers (a different synthetic seed). Separation powers: lower is "
             "better (0: identical histograms); E_layer, EC_r, width_r and sparsity are means over the layers. "
             "FPD/KPD ×10³ with the reference floor in brackets (the same distance between the held-out set and a second, independent synthetic set of the same size: what a perfect generator scores). "
             "Response: ⟨E_tot/E_inc⟩; resolution: σ/⟨E_tot/E_inc⟩, generated/held-out. Collisions: points "
             "that shared a cell with another; moved: points placed in a cell other than their own. "
             "gen shw/s: generation to HDF5 (sampling, placement, writing). cls epochs: the epochs of the DNN "
             "classifier behind the row's AUCs (the official evaluation trains 50; rows read with fewer are "
             "not comparable with them: at 5,000 vs 5,000 showers the AUCs keep rising after 10 epochs). Rows "
             "NAME/Ss: the model of NAME's training run after S seconds of it.",
             ""]
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    if notes.strip():
        lines += ["", notes.strip()]
    lines += ["", "## Settings and provenance", ""]
    for r in results:
        cls = r.get("classifier", {})
        bits = [f"model `{r.get('model')}`", f"dataset {r.get('dataset', '2')}",
                f"{r.get('n_train', '?'):,} training showers" if isinstance(r.get("n_train"), int) else "",
                f"{r.get('n_eval', '?')} generated vs {r.get('n_eval', '?')} held-out",
                (f"DNN classifier width {cls.get('hidden')}, {classifier_epochs(r)} epochs, {cls.get('seeds')} seed(s)"
                 + (f", {cls['dtype']}" if cls.get("dtype") else "") if classifier_epochs(r) is not None
                 else "no classifier"),
                f"device {r.get('device')}, {r.get('threads')} thread(s)",
                f"commit {r.get('commit')}", r.get("date", ""), f"load at start {r.get('load_start')}, "
                f"at end {r.get('load_end')}", f"entry seconds {_f(r.get('seconds'), '.0f')}"]
        if r.get("snapshot"):
            sn = r["snapshot"]
            bits.append(f"snapshot of the run of `{r.get('snapshot_of')}` after {sn['seconds']:g} s (step {sn['step']}; "
                        f"its learning-rate schedule spans the run's {_f(r.get('run_budget_s'), '.0f')} s)")
        elif r.get("source"):
            bits.append(f"generated from the run of `{r['source']}`")
        if r.get("distill"):
            d = r["distill"]
            bits.append(f"distilled {d['steps']} steps in {d['seconds']:.0f} s (lr {d['lr']})")
        if r.get("config"):
            bits.append(f"config `{json.dumps(r['config'])}`")
        if r.get("worst_features"):
            bits.append("worst separation powers " + ", ".join(f"{k} {v:.3f}" for k, v in r["worst_features"].items()))
        if r.get("loss_curve"):
            bits.append(f"loss curve `{r['loss_curve']}`")
        if r.get("error"):
            bits.append(f"**failed**: {r['error']}")
        lines.append(f"* **{r['name']}**: " + "; ".join(b for b in bits if b) + ".")
        lines.append(f"  Command: `{r.get('command', '')}`; machine: {r.get('machine', '')}.")
    return "\n".join(lines) + "\n"


def _seconds_list(text: str) -> list[float]:
    """``"300,900"`` → ``[300.0, 900.0]`` (argparse type of ``--snapshots``)."""
    try:
        out = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, e.g. 300,900; got {text!r}") from None
    if not out or any(not math.isfinite(x) or x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected seconds > 0 separated by commas, e.g. 300,900; got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", nargs="+", default=None, metavar="NAME|NAME=MODEL[:K=V,...]",
                    help=f"entries (default: {' '.join(DEFAULT_ENTRIES)}; named: {', '.join(ENTRIES)})")
    ap.add_argument("--dataset", choices=("2", "3"), default="2", help="synthetic dataset (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=900, help="training seconds per entry (default: %(default)s)")
    ap.add_argument("--distill-budget", type=float, default=None,
                    help="distillation seconds of post_train=distill entries (default: half of --budget)")
    ap.add_argument("--distill-lr", type=float, default=1e-3, help="distillation learning rate (default: %(default)s)")
    ap.add_argument("--train-showers", type=int, default=50_000, help="synthetic training showers (default: %(default)s)")
    ap.add_argument("--n-eval", type=int, default=5_000, help="generated and held-out showers (default: %(default)s)")
    ap.add_argument("--gen-batch-size", type=int, default=500, help="showers per generation batch (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="what the budgets count: wall-clock seconds, or CPU seconds of the process (on a shared "
                         "machine a CPU budget does not shrink with the load) (default: %(default)s)")
    ap.add_argument("--full-size", action="store_true", help="the families' default model sizes, not the CPU sizes")
    ap.add_argument("--cls-epochs", type=int, default=50,
                    help="classifier epochs (official 50; the table shows each row's; default: %(default)s)")
    ap.add_argument("--cls-hidden", type=int, default=2048, help="classifier width (official 2048; default: %(default)s)")
    ap.add_argument("--cls-dtype", choices=("float64", "float32"), default="float64",
                    help="classifier precision (official float64; float32 about half the CPU time; default: %(default)s)")
    ap.add_argument("--cls-seeds", type=int, default=1, help="classifier trainings per AUC (default: %(default)s)")
    ap.add_argument("--no-classifier", action="store_true", help="skip the classifier AUCs")
    ap.add_argument("--snapshots", type=_seconds_list, default=[], metavar="S1,S2,...",
                    help="also keep the model of every trained entry at these seconds of its training (one run; "
                         "the schedule spans --budget) and evaluate each as a row NAME/Ss (default: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fidelity",
                    help="work folder: data, runs, generated files (default: %(default)s)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                    help="folder of fidelity-ds2.json/.md and the loss curves (default: %(default)s)")
    ap.add_argument("--table", action="store_true", help="only rewrite the Markdown table from the JSON")
    args = ap.parse_args(argv)
    results_json = args.results / "fidelity-ds2.json"
    if args.table:
        merge(results_json, [])
        print((args.results / "fidelity-ds2.md").read_text())
        return 0
    entries = [Entry.parse(s) for s in (args.entries or DEFAULT_ENTRIES)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        msg = f"--entries: names must be distinct, got {names}"
        raise ValueError(msg)
    from calopc.models import available

    bad = [e.model for e in entries if e.model not in available()]
    if bad:
        msg = f"--entries: unknown models {bad}; available: {', '.join(available())}"
        raise ValueError(msg)
    args.threads = args.threads or os.cpu_count() or 1
    args.distill_budget = args.budget / 2 if args.distill_budget is None else args.distill_budget
    args.command = "python benchmarks/fidelity.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.dataset, args.train_showers, args.n_eval, args.out)
    # earlier entries of this work folder (from=NAME looks there), this invocation's override them
    done = {}
    for p in sorted((args.out / f"ds{args.dataset}").glob("*/result.json")):
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            r = json.loads(p.read_text())
            if "error" not in r:
                done[r["name"]] = r
    todo = list(entries)
    while todo:
        e = todo.pop(0)
        r = run_entry(e, args, data, done)
        if "error" not in r:
            done[e.name] = r
            todo[:0] = snapshot_entries(e, r)    # the snapshots of its run, evaluated next
        merge(results_json, [r])
        print(f"[{e.name}] AUC low {_f(r.get('auc_low'), '.3f')} high {_f(r.get('auc_high'), '.3f')} "
              f"FPD {_f(r.get('fpd'), '.3g')} (floor {_f(r.get('fpd_floor'), '.2g')}) -> {results_json}", flush=True)
    print((args.results / "fidelity-ds2.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
