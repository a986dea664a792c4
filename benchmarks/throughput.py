r"""Showers per second of the shared training and generation machinery, old path vs new path.

For every registered model (``--model``, default: all) on ``--device`` this measures, on
synthetic data made like ``calopc synth`` + ``calopc convert`` in a temporary folder:

(a) **pipeline**: batches per second of the data pipeline alone, ``numpy`` (host collate, then
    a copy to the device) vs ``device`` (showers uploaded once, batches built there);
(b) **step**: the training step with the batches already on the device: ``old`` (the loop
    body as it was: AdamW for-loop, per-parameter EMA, a host read of the loss and of the
    gradient norm every step, zuko's splines) vs ``new`` (the training loop's stepper: fused
    AdamW with the non-finite skip on the device, multi-tensor EMA and clipping, no read-back,
    fast splines where they are on);
(c) **loop**: :func:`calopc.models.train.train` end to end for ``--steps`` steps,
    ``pipeline=numpy`` vs ``pipeline=device``;
(d) **generate**: generation to HDF5 of ``--n-generate`` showers from the run of (c): ``old``
    (points to the host, cells with :func:`calopc.converters.points_to_voxels`) vs ``new``
    (:func:`calopc.models.generate.generate`: cells and voxels on the device, writer thread);

(e) **revs** (GPU readiness, old code vs new code in the same run): for ``--baseline`` (a git
    revision, default: the commit before the GPU-readiness change) and for the working tree, each
    in its own subprocess on its own synthetic ds2 data: kernel-launching operators and host
    syncs of one training step of the device pipeline (dispatch-mode counter,
    :mod:`calopc.models.opcount`, with the CUDA code path: no read-back to skip non-finite
    steps), of one generation batch (model sampling; placement in cells counted apart) and of
    the shower model's sampling; CPU training showers/s (:func:`~calopc.models.train.train`)
    and end-to-end generation to HDF5 showers/s (sampling alone and the whole call); with
    ``--step-steps K``, the wall-clock and CPU seconds of one training step (median of K, one
    thread) at the family's training defaults (batch size included, ``--step-batch`` to change
    it) with the model config of ``--rev-config`` (``fidelity``: each revision's own
    ``CPU_CONFIG`` of ``benchmarks/fidelity.py``) and ``--set``; ``--rounds R`` alternates the
    two revisions R times (a shared CPU's load moves);

at batch 128 and 512 on dataset 2 and 128 on dataset 3 (``--configs``). It also counts the
operations of one training step with ``torch.profiler`` (a proxy of kernel launches: leaf
``aten::`` operators that are not views), old vs new, and the ops of building one batch on the
device. Prints a table and writes JSON (``--json``).

Usage::

    python benchmarks/throughput.py --device cpu --n-train 1024 --steps 8
    python benchmarks/throughput.py --model calopointflow --device cuda --n-train 20000 --steps 100
    python benchmarks/throughput.py --parts revs --steps 4 --n-generate 128      # old vs new: ops, syncs, rates
    python benchmarks/throughput.py --parts revs --model deeptree --baseline main --no-rates --rev-config fidelity \
        --step-steps 5 --rounds 3                                                 # DeepTree step time, old vs new
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

_VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::permute",
          "aten::transpose", "aten::t", "aten::movedim", "aten::unsqueeze", "aten::squeeze", "aten::select",
          "aten::slice", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::empty", "aten::empty_strided",
          "aten::lift_fresh", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::narrow",
          "aten::expand_as", "aten::view_as", "aten::result_type", "aten::is_nonzero", "aten::item",
          "aten::_local_scalar_dense", "aten::resolve_conj", "aten::resolve_neg", "aten::unflatten", "aten::flatten",
          "aten::contiguous", "aten::empty_like", "aten::to", "aten::_to_copy", "aten::numpy_T", "aten::dim",
          "aten::size", "aten::stride", "aten::broadcast_tensors", "aten::_has_compatible_shallow_copy_type",
          "detach", "aten::set_"}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def count_ops(fn, *, repeat: int = 1) -> dict:
    """Operators of ``fn()`` from ``torch.profiler`` on the CPU, as a proxy of kernel launches.

    ``leaf_ops``: leaf ``aten::`` operators that are not views; a multi-tensor (``_foreach_*``) or
    fused (``_fused_*``) operator counts once, as it launches one kernel per chunk of tensors on
    CUDA (its per-tensor CPU fallback is not counted). ``aten_ops``: every ``aten::`` event.
    ``cumsum``: ``aten::cumsum`` calls.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            fn()

    def multi(name: str) -> bool:
        return name.startswith(("aten::_foreach_", "aten::_fused_"))

    leaf = total = cumsum = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        total += 1
        cumsum += ev.name == "aten::cumsum"
        p, inside = ev.cpu_parent, False
        while p is not None:
            if multi(p.name):
                inside = True
                break
            p = p.cpu_parent
        if inside or ev.name in _VIEWS:
            continue
        if multi(ev.name) or not any(c.name.startswith("aten::") for c in ev.cpu_children):
            leaf += 1
    return {"leaf_ops": leaf // repeat, "aten_ops": total // repeat, "cumsum": cumsum // repeat}


def make_data(tmp: Path, dataset: str, n: int) -> Path:
    """Synthetic showers like ``calopc synth -d D -n N`` then ``calopc convert``."""
    from calopc.converters import convert_file
    from calopc.synth import write_synthetic

    h5 = tmp / f"ds{dataset}.hdf5"
    write_synthetic(h5, dataset=dataset, n=n, seed=0)
    return convert_file(h5, tmp / f"ds{dataset}.parquet", step_size="64 MB", progress=False)


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_pipeline(ds, prep, dev: torch.device, batch: int, n_batches: int, repeats: int = 3) -> dict:
    """Both pipelines, alternating, best of ``repeats`` (the CPU may be shared)."""
    from calopc.models.data import DeviceCollate, ShowerCollate, iterate_batches

    def forever(col):
        epoch = 0
        while True:
            yield from iterate_batches(ds, col, batch, seed=0, epoch=epoch)
            epoch += 1

    cols = {"numpy": ShowerCollate(prep, seed=0), "device": DeviceCollate(prep, dev, seed=0)}
    its = {k: forever(c) for k, c in cols.items()}
    out = {k: 0.0 for k in cols}
    for name, it in its.items():
        next(it).to(dev)  # warm-up (and, device: the upload of the data, once)
    for _ in range(repeats):
        for name, it in its.items():
            _sync(dev)
            t = time.perf_counter()
            for _ in range(n_batches):
                next(it).to(dev)
            _sync(dev)
            out[name] = max(out[name], _rate(n_batches * batch, time.perf_counter() - t))
    it = its["device"]
    out["device_batch_ops"] = count_ops(lambda: next(it))
    return out


def _old_step(model, opt, ema, batch, step, cfg) -> float:
    """The training-loop body before the GPU-first change (kept here as the baseline)."""
    loss = model(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
    if torch.isfinite(gn):
        opt.step()
    d = min(ema.decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
    return float(loss.detach())


def bench_step(model_name: str, ds, dev: torch.device, batch: int, n_steps: int, model_config: dict, *,
               repeats: int = 2, ops: bool = False) -> dict:
    """One training step, old vs new (alternating, best of ``repeats``); ``ops``: count the ops of one step."""
    from calopc.models import get_model
    from calopc.models.data import DeviceCollate, iterate_batches
    from calopc.models.train import TrainConfig, _adamw, _fast_splines, _Stepper
    from calopc.models.utils import EMA

    model_cls, cfg_cls = get_model(model_name)
    mcfg = cfg_cls.from_dict(model_config)
    prep = ds.fit_preprocessor(seed=0, **mcfg.preprocessing())
    torch.manual_seed(0)
    base = model_cls(mcfg.with_data(prep)).to(dev)
    cfg = TrainConfig(batch_size=batch, device=str(dev), steps=10 ** 6, warmup=0)
    batches = []
    for b in iterate_batches(ds, DeviceCollate(prep, dev, seed=0), batch, seed=0):
        batches.append(b)
        if len(batches) >= 4:
            break
    custom = callable(getattr(base, "training_step", None))
    res: dict = {}
    fns = {}
    for path in ("old", "new"):
        model = copy.deepcopy(base).train()
        ema = EMA(model, 0.999)
        if custom:  # the custom-step contract has no "old" path: both run the model's own step
            opts = dict(model.configure_optimizers(cfg))
            stepper = _Stepper(opts, cfg, dev, 1)

            def backward(loss, name, opts=opts, stepper=stepper):
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                stepper.update(name)

            def one(i, model=model, ema=ema, backward=backward):
                out = model.training_step(batches[i % len(batches)], i, backward)
                ema.update(model, i)
                return out["loss"]
        elif path == "old":
            _fast_splines(model, "off", dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

            def one(i, model=model, opt=opt, ema=ema):
                return _old_step(model, opt, ema, batches[i % len(batches)], i, cfg)
        else:
            _fast_splines(model, "auto", dev)
            opts = {"model": _adamw(model, replace_lr(cfg))}
            stepper = _Stepper(opts, cfg, dev, 1)

            def one(i, model=model, opts=opts, stepper=stepper, ema=ema):
                loss = model(batches[i % len(batches)])
                opts["model"].zero_grad(set_to_none=True)
                loss.backward()
                stepper.update("model")
                ema.update(model, i)
                return loss.detach()
        one(0)
        fns[path] = one
    for _ in range(repeats):
        for path, one in fns.items():
            _sync(dev)
            t = time.perf_counter()
            for i in range(n_steps):
                one(i)
            _sync(dev)
            res[path] = max(res.get(path, 0.0), _rate(n_steps * batch, time.perf_counter() - t))
    if ops:
        for path, one in fns.items():
            res[f"{path}_ops"] = count_ops(lambda one=one: one(0))
    return res


def replace_lr(cfg):
    from dataclasses import replace

    return replace(cfg, lr=1e-4)


def bench_loop(model_name: str, data: Path, tmp: Path, dev: torch.device, batch: int, n_steps: int,
               model_config: dict) -> tuple[dict, Path]:
    from calopc.models.train import TrainConfig, train

    res, run = {}, None
    for pipe in ("numpy", "device"):
        run = tmp / f"run_{model_name}_{pipe}_{batch}"
        cfg = TrainConfig(steps=n_steps, batch_size=batch, device=str(dev), progress=False, pipeline=pipe,
                          log_every=max(1, n_steps // 2), checkpoint_every=10 ** 9, warmup=1,
                          fast_splines="off" if pipe == "numpy" else "auto")
        r = train(model_name, data, run, model_config=model_config, config=cfg, overwrite=True)
        res[pipe] = _rate(r["steps"] * batch, r["seconds"])
    return res, run


def bench_generate(run: Path, tmp: Path, dev: torch.device, n: int, batch: int) -> dict:
    from calopc.converters import points_to_voxels
    from calopc.io import shower_writer
    from calopc.models.checkpoint import load
    from calopc.models.generate import generate, sample_showers

    energies = np.exp(np.random.default_rng(0).uniform(math.log(1e3), math.log(1e6), n))
    # old: sample, copy the points to the host, cells on the CPU, write in the same thread
    import awkward as ak

    loaded = load(run, device=dev)
    geo = loaded.geometry
    out_old = tmp / "old.hdf5"
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
            shower_writer(out_old, geo.n_voxels, dtype=np.float32) as w:
        torch.manual_seed(0)
        for i in range(0, n, batch):
            e = energies[i:i + batch]
            g = sample_showers(loaded, e, dev)
            alpha = g.alpha if g.alpha is not None else (torch.rand_like(g.r) * 2 - 1) * math.pi
            pts = ak.zip({"r": g.r.cpu().numpy(), "alpha": alpha.cpu().numpy(),
                          "z": g.layer.cpu().numpy().astype(np.float64), "E": g.E.cpu().numpy()})
            ev = ak.zip({"incident_energy": e, "points": ak.unflatten(pts, g.counts.cpu().numpy())}, depth_limit=1)
            vox = points_to_voxels(ev, geo, collisions="nearest-free", threshold=geo.threshold, dtype=np.float32)
            w.append(e, vox)
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    r = generate(run, energies, output=tmp / "new.hdf5", batch_size=batch, device=str(dev))
    t_new = time.perf_counter() - t
    return {"old": _rate(n, t_old), "new": _rate(n, t_new), "collision_rate_new": r.collisions.get("collision_rate")}


def bench_place(dataset: str, dev: torch.device, n: int, mean_points: int, repeats: int = 2) -> dict:
    """Points → voxels alone on random showers (α uniform, radii spread like a shower core):
    ``old`` :func:`~calopc.converters.points_to_voxels` on the host (nearest-free), ``new``
    :func:`~calopc.models.cells.place` + the dense scatter on ``dev`` (nearest-free and alpha-free)."""
    import awkward as ak

    from calopc.converters import points_to_voxels
    from calopc.geometry import Geometry
    from calopc.models.cells import GeneratedShowers, place

    geo = Geometry.calochallenge(dataset)
    rng = np.random.default_rng(0)
    counts = rng.poisson(mean_points, n)
    p = int(counts.sum())
    r_hi = max(e[-1] for e in geo.r_edges)
    g = GeneratedShowers(torch.as_tensor(counts), torch.as_tensor(rng.integers(0, geo.n_layers, p)),
                         torch.as_tensor(np.abs(rng.normal(0, r_hi / 6, p))),
                         torch.as_tensor(rng.uniform(-math.pi, math.pi, p)), torch.as_tensor(rng.exponential(1.0, p)))
    out: dict = {"points": p}
    for _ in range(repeats):
        t = time.perf_counter()
        pts = ak.zip({"r": g.r.numpy(), "alpha": g.alpha.numpy(), "z": g.layer.numpy().astype(np.float64),
                      "E": g.E.numpy()})
        ev = ak.zip({"incident_energy": np.ones(n), "points": ak.unflatten(pts, counts)}, depth_limit=1)
        _, st = points_to_voxels(ev, geo, collisions="nearest-free", return_stats=True)
        out["old"] = max(out.get("old", 0.0), _rate(n, time.perf_counter() - t))
        gd = g.to(dev)
        for name, gg in (("new", gd), ("new_alpha_free", GeneratedShowers(gd.counts, gd.layer, gd.r, None, gd.E))):
            _sync(dev)
            t = time.perf_counter()
            pl = place(gg, geo, generator=torch.Generator(dev).manual_seed(0))
            dense = torch.zeros(n * geo.n_voxels, dtype=torch.float32, device=dev)
            dense[pl.shower * geo.n_voxels + pl.cell] = pl.E.float()
            dense.cpu()
            _sync(dev)
            out[name] = max(out.get(name, 0.0), _rate(n, time.perf_counter() - t))
            out[f"{name}_collision_rate"] = pl.stats["collision_rate"]
        out["old_collision_rate"] = st.collision_rate
    return out


# run in a subprocess with PYTHONPATH at the calopc tree to measure (old or new); the counter is loaded from the
# working tree's calopc/models/opcount.py by path, so an old tree without it is measured the same way
_REV_SCRIPT = r"""
import importlib.util, json, math, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("_opcount", args["opcount"])
oc = importlib.util.module_from_spec(spec)
sys.modules["_opcount"] = oc
spec.loader.exec_module(oc)
from calopc.converters import convert_file
from calopc.models import get_model
from calopc.models.data import DeviceCollate, ShowerDataset, iterate_batches
import importlib
tr = importlib.import_module("calopc.models.train")
from calopc.models.utils import EMA
from calopc.synth import write_synthetic
out = {}
with tempfile.TemporaryDirectory() as tmpd:
    tmp = Path(tmpd)
    h5 = write_synthetic(tmp / "ds2.hdf5", dataset="2", n=args["n_train"], seed=0)
    pq = convert_file(h5, tmp / "ds2.parquet", progress=False)
    ds = ShowerDataset.from_parquet(pq)
    import calopc
    base_cfg = {}
    if args["config_source"] == "fidelity":   # this revision's CPU sizes of the fidelity table
        import ast
        fid = Path(calopc.__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
        for node in ast.parse(fid.read_text()).body:   # the literal, without importing the script
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CPU_CONFIG":
                base_cfg = ast.literal_eval(node.value)
    for name, mcfg in args["models"]:
        label = name + ("" if not mcfg else ":" + ",".join(f"{k}={v}" for k, v in mcfg.items()))
        r = out.setdefault(label, {})
        mcfg = {**base_cfg.get(name, {}), **mcfg}
        r["config"] = mcfg
        try:
            mc, cc = get_model(name)
            cfg = cc.from_dict(dict(mcfg))
            prep = ds.fit_preprocessor(seed=0, **cfg.preprocessing())
            torch.manual_seed(0)
            model = mc(cfg.with_data(prep)).train()
            batch = next(iter(iterate_batches(ds, DeviceCollate(prep, "cpu", seed=0), args["count_batch"], seed=0)))
            tcfg = tr.TrainConfig(batch_size=args["count_batch"], device="cpu", steps=10**6, warmup=0, lr=1e-4)
            tr._fast_splines(model, "on", torch.device("cpu"))
            custom = callable(getattr(model, "training_step", None))
            mk = getattr(tr, "_optimizer", None) or tr._adamw
            opts = dict(model.configure_optimizers(tcfg)) if custom else {"model": mk(model, tcfg)}
            for o in opts.values():
                o.step = (lambda f: lambda *a, **k: (oc.host_scalars().__enter__(), f(*a, **k))[1])(o.step)
            st = tr._Stepper(opts, tcfg, torch.device("cpu"), 1)
            st.exact_skip = False
            ema = EMA(model, 0.999)
            def backward(loss, n):
                opts[n].zero_grad(set_to_none=True)
                loss.backward()
                st.update(n)
            def one(i):
                if custom:
                    model.training_step(batch, i, backward)
                else:
                    backward(model(batch), "model")
                ema.update(model, i)
            one(0); one(1)
            c = oc.count_dispatch(lambda: one(2))
            r["train_ops"], r["train_syncs"], r["train_sync_names"] = c.ops, c.syncs, dict(c.sync_names)
            if args["step_steps"]:
                # one training step at the family's training defaults (batch size, optimizers, EMA), one thread
                td = tr.training_defaults(name) if hasattr(tr, "training_defaults") else {}
                sb = args["step_batch"] or int(td.get("batch_size", 32))
                scfg = tr.TrainConfig.from_dict({**td, "batch_size": sb, "device": "cpu", "steps": 10**6})
                torch.manual_seed(0)
                sm = mc(cfg.with_data(prep)).train()
                sbatch = next(iter(iterate_batches(ds, DeviceCollate(prep, "cpu", seed=0), sb, seed=0)))
                tr._fast_splines(sm, "on", torch.device("cpu"))
                sopts = dict(sm.configure_optimizers(scfg)) if custom else {"model": mk(sm, scfg)}
                sst = tr._Stepper(sopts, scfg, torch.device("cpu"), 1)
                sema = EMA(sm, scfg.ema_decay) if scfg.ema_decay > 0 else None
                def sback(loss, n):
                    sopts[n].zero_grad(set_to_none=True)
                    loss.backward()
                    sst.update(n)
                def sone(i):
                    if custom:
                        sm.training_step(sbatch, i, sback)
                    else:
                        sback(sm(sbatch), "model")
                    if sema is not None:
                        sema.update(sm, i)
                sone(0); sone(1)
                walls, cpus = [], []
                for i in range(args["step_steps"]):
                    t, c0 = time.perf_counter(), time.process_time()
                    sone(2 + i)
                    walls.append(time.perf_counter() - t)
                    cpus.append(time.process_time() - c0)
                r.update(step_batch=sb, step_points=int(sbatch.n.sum()), step_wall_s=sorted(walls),
                         step_cpu_s=sorted(cpus), step_params=sum(p.numel() for p in sm.parameters()))
                del sm, sopts, sst, sema
            model.eval()
            e = np.exp(np.random.default_rng(0).uniform(math.log(1e3), math.log(1e6), args["gen_batch"]))
            with torch.no_grad():
                g = model.generate(e, prep)
                torch.manual_seed(1)
                c = oc.count_dispatch(lambda: model.generate(e, prep))
                r["gen_ops"], r["gen_syncs"] = c.ops, c.syncs
                sm = getattr(model, "shower_model", None) or getattr(model, "shower", None) or model.shower_flow
                cond = torch.zeros(args["gen_batch"], 1)
                c = oc.count_dispatch(lambda: sm.sample(cond))
                r["shower_sample_ops"], r["shower_sample_syncs"] = c.ops, c.syncs
                from calopc.models.cells import place
                gg = model.generate(e, prep)
                c = oc.count_dispatch(lambda: place(gg, prep.geometry, generator=torch.Generator().manual_seed(0)))
                r["place_ops"], r["place_syncs"] = c.ops, c.syncs
            if args["rates"]:
                from calopc.models.generate import generate
                run = tmp / f"run_{label.replace(':', '_').replace(',', '_').replace('=', '_')}"
                t = time.perf_counter()
                tr.train(name, pq, run, model_config=dict(mcfg), config=tr.TrainConfig(
                    steps=args["steps"], batch_size=args["train_batch"], device="cpu", progress=False, warmup=1,
                    log_every=10**6, checkpoint_every=10**9), overwrite=True)
                r["train_showers_per_s"] = args["steps"] * args["train_batch"] / (time.perf_counter() - t)
                energies = np.exp(np.random.default_rng(1).uniform(math.log(1e3), math.log(1e6), args["n_generate"]))
                res = generate(run, energies, output=tmp / "gen.hdf5", batch_size=64, device="cpu")
                r["gen_sampling_showers_per_s"] = res.n_showers / res.seconds_sampling
                r["gen_total_showers_per_s"] = res.n_showers / res.seconds_total
        except Exception as err:
            r["error"] = f"{type(err).__name__}: {err}"
        print(json.dumps({label: r}), file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def bench_revisions(baseline: str, models: list[tuple[str, dict]], *, n_train: int, steps: int, n_generate: int,
                    count_batch: int = 8, train_batch: int = 32, gen_batch: int = 4, rates: bool = True,
                    config_source: str = "default", step_steps: int = 0, step_batch: int = 0, rounds: int = 1,
                    timeout: float = 3600) -> dict:
    """Ops, syncs and CPU rates of the ``baseline`` git revision and of the working tree (one subprocess each,
    ``rounds`` times alternating; the step times of all rounds are pooled, the other figures are the last round's)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    args = {"opcount": str(root / "calopc" / "models" / "opcount.py"), "n_train": n_train, "steps": steps,
            "n_generate": n_generate, "count_batch": count_batch, "train_batch": train_batch, "gen_batch": gen_batch,
            "models": models, "rates": rates, "config_source": config_source, "step_steps": step_steps,
            "step_batch": step_batch}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmpd:
        old = Path(tmpd) / "old"
        old.mkdir()
        arch = subprocess.run(["git", "-C", str(root), "archive", baseline], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=arch, check=True)
        for rnd in range(rounds):
            for label, tree in (("old", old), ("new", root)):
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                print(f"-- revs: {label} ({baseline if label == 'old' else 'working tree'}), round {rnd + 1}/{rounds}, "
                      f"load {_load()}", file=sys.stderr, flush=True)
                p = subprocess.run([sys.executable, "-c", _REV_SCRIPT, json.dumps(args)], env=env, cwd=tmpd,
                                   capture_output=True, text=True, timeout=timeout)
                if p.returncode != 0:
                    out[label] = {"error": p.stderr[-2000:]}
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                for m, r in res.items():   # pool the step times over the rounds
                    prev = out.get(label, {}).get(m, {})
                    for k in ("step_wall_s", "step_cpu_s"):
                        if k in r:
                            r[k] = sorted(prev.get(k, []) + r[k])
                out[label] = res
    out["load"] = _load()
    return out


def _load() -> str:
    """The 1-, 5- and 15-minute load averages and the number of CPUs (a shared CPU's load moves the timings)."""
    try:
        return f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} ({os.cpu_count()} CPUs)"
    except OSError:
        return f"n/a ({os.cpu_count()} CPUs)"


def _rev_table(res: dict, baseline: str) -> None:
    old, new = res.get("old", {}), res.get("new", {})
    for label, r in (("old", old), ("new", new)):
        if "error" in r:
            print(f"{label}: error: {r['error']}")
    print(f"GPU readiness, old = {baseline} vs new = working tree (CPU, dispatch-mode counts; showers/s one thread)")
    cols = [("train_ops", "train ops"), ("train_syncs", "train syncs"), ("gen_ops", "gen ops"),
            ("gen_syncs", "gen syncs"), ("shower_sample_ops", "shower-model sample ops"), ("place_syncs", "place syncs"),
            ("train_showers_per_s", "train showers/s"), ("gen_sampling_showers_per_s", "gen sampling showers/s"),
            ("gen_total_showers_per_s", "gen to HDF5 showers/s")]
    print(" | ".join(["model"] + [c for _, c in cols]))
    for m in sorted(set(old) | set(new)):
        a, b = old.get(m, {}), new.get(m, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        cells = [m]
        for k, _ in cols:
            va, vb = a.get(k), b.get(k)
            def fmt(v: object) -> str:
                if v is None:
                    return "-"
                if isinstance(v, float):
                    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
                return f"{v:,}" if isinstance(v, int) else str(v)

            fa, fb = fmt(va), fmt(vb)
            cells.append(f"{fa} → {fb}")
        print(" | ".join(cells))
        for lab, r in (("old", a), ("new", b)):
            if "error" in r:
                print(f"   {m} {lab}: {r['error'][:300]}")
        if a.get("step_cpu_s") and b.get("step_cpu_s"):
            def med(v: list) -> float:
                return float(np.median(v))

            print(f"   {m} training step (one thread; median of {len(a['step_cpu_s'])} / {len(b['step_cpu_s'])} steps), "
                  f"batch {a['step_batch']} / {b['step_batch']} ({a['step_points']:,} / {b['step_points']:,} points): "
                  f"wall {med(a['step_wall_s']):.3f} → {med(b['step_wall_s']):.3f} s "
                  f"({med(a['step_wall_s']) / med(b['step_wall_s']):.2f}x), "
                  f"CPU {med(a['step_cpu_s']):.3f} → {med(b['step_cpu_s']):.3f} s "
                  f"({med(a['step_cpu_s']) / med(b['step_cpu_s']):.2f}x); parameters {a['step_params']:,} → "
                  f"{b['step_params']:,}; config {a.get('config')} → {b.get('config')}")
    if "load" in res:
        print(f"load average after the runs: {res['load']}")


def main() -> int:
    from calopc.models import available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, choices=available(),
                    help="model(s) to measure (repeatable; default: all registered)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--configs", default="2:128,2:512,3:128", help="DATASET:BATCH,... (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=1024, help="synthetic training showers per dataset (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps/batches per measurement (default: %(default)s)")
    ap.add_argument("--n-generate", type=int, default=256, help="showers generated per measurement (default: %(default)s)")
    ap.add_argument("--baseline", default="7bfc57c~1",
                    help="revs: the git revision measured as 'old' (default: %(default)s, before the GPU-readiness change)")
    ap.add_argument("--no-rates", action="store_true", help="revs: counts only, no training/generation rates")
    ap.add_argument("--rev-config", choices=("default", "fidelity"), default="default",
                    help="revs: model configs, the families' defaults or each revision's CPU_CONFIG of "
                         "benchmarks/fidelity.py (then --set) (default: %(default)s)")
    ap.add_argument("--step-steps", type=int, default=0,
                    help="revs: time this many training steps at the family's training defaults (default: %(default)s)")
    ap.add_argument("--step-batch", type=int, default=0,
                    help="revs: batch size of the timed steps (default: the family's training default)")
    ap.add_argument("--rounds", type=int, default=1, help="revs: alternate old and new this many times (default: %(default)s)")
    ap.add_argument("--parts", default="pipeline,step,loop,generate,ops",
                    help="what to measure; ops: leaf aten ops of one step at the model's default size, first config "
                         "only; revs: ops, syncs and CPU rates of --baseline vs the working tree; place: points to voxels alone, old vs new, on random showers (BATCH showers) "
                         "(default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="model config override, e.g. calopointflow.point_transforms=2 (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    models = args.model or available()
    overrides: dict[str, dict] = {}
    for item in args.set:
        k, _, v = item.partition("=")
        m, _, key = k.partition(".")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        overrides.setdefault(m, {})[key] = val
    parts = set(args.parts.split(","))
    if "revs" in parts:
        rev_models = [(m, overrides.get(m, {})) for m in models]
        if "caloclouds" in models:
            rev_models.append(("caloclouds", {**overrides.get("caloclouds", {}), "denoiser": "transformer"}))
        res = bench_revisions(args.baseline, rev_models, n_train=max(args.n_train, 64), steps=args.steps,
                              n_generate=args.n_generate, rates=not args.no_rates, config_source=args.rev_config,
                              step_steps=args.step_steps, step_batch=args.step_batch, rounds=args.rounds)
        _rev_table(res, args.baseline)
        if args.json is not None:
            args.json.write_text(json.dumps({"revs": res, "baseline": args.baseline}, indent=2) + "\n")
        if parts == {"revs"}:
            return 0
        parts.discard("revs")
    configs = [(d, int(b)) for d, b in (c.split(":") for c in args.configs.split(","))]
    place_rows = []
    if "place" in parts:
        for d, batch in configs:
            r = {"dataset": d, "showers": batch, **bench_place(d, dev, batch, 1500 if d == "2" else 4000)}
            place_rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        if parts == {"place"}:
            for r in place_rows:
                print(f"place ds{r['dataset']} ({r['showers']} showers, {r['points']} points): old {r['old']:,.0f}, "
                      f"new {r['new']:,.0f} ({r['new'] / r['old']:.2f}x), alpha-free {r['new_alpha_free']:,.0f} "
                      f"({r['new_alpha_free'] / r['old']:.2f}x) showers/s; collisions {100 * r['old_collision_rate']:.1f}% "
                      f"/ {100 * r['new_alpha_free_collision_rate']:.1f}% (alpha-free)")
            if args.json is not None:
                args.json.write_text(json.dumps(place_rows, indent=2) + "\n")
            return 0
    results = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        data = {d: make_data(tmp, d, args.n_train) for d in sorted({d for d, _ in configs})}
        from calopc.models.data import ShowerDataset

        dsets = {d: ShowerDataset.from_parquet(p) for d, p in data.items()}
        for model_name in models:
            mc = overrides.get(model_name, {})
            for d, batch in configs:
                row = {"model": model_name, "dataset": d, "batch": batch, "device": str(dev)}
                print(f"-- {model_name} ds{d} batch {batch}", file=sys.stderr, flush=True)
                try:
                    if "pipeline" in parts:
                        from calopc.models import get_model

                        prep = dsets[d].fit_preprocessor(seed=0, **get_model(model_name)[1].from_dict(mc).preprocessing())
                        row["pipeline"] = bench_pipeline(dsets[d], prep, dev, batch, args.steps)
                    if "step" in parts:
                        row["step"] = bench_step(model_name, dsets[d], dev, batch, args.steps, mc)
                    if "ops" in parts and (d, batch) == configs[0]:
                        # at the model's default (benchmark) size, whatever --set says
                        row["ops"] = bench_step(model_name, dsets[d], dev, batch, 1, {}, repeats=0, ops=True)
                    run = None
                    if "loop" in parts or "generate" in parts:
                        row["loop"], run = bench_loop(model_name, data[d], tmp, dev, batch, args.steps, mc)
                    if "generate" in parts and run is not None:
                        row["generate"] = bench_generate(run, tmp, dev, args.n_generate, max(batch, 256))
                except Exception as err:  # noqa: BLE001 - one model's failure should not hide the others
                    row["error"] = f"{type(err).__name__}: {err}"
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    _table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results + place_rows, indent=2) + "\n")
    return 0


def _table(rows: list[dict]) -> None:
    def f(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{b / a:.2f}x"

    head = ("model", "ds", "batch", "pipe numpy", "pipe device", "step old", "step new", "loop numpy",
            "loop device", "gen old", "gen new", "ops old", "ops new", "batch ops")
    print("showers/s (new/old ratio in brackets); ops: leaf non-view aten ops of one training step at the model's "
          "default size (kernel-launch proxy); batch ops: of building one batch on the device")
    print(" | ".join(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['dataset']} | {r['batch']} | error: {r['error']}")
            continue
        p, s, lo, g = r.get("pipeline", {}), r.get("step", {}), r.get("loop", {}), r.get("generate", {})
        o = r.get("ops", {})
        cells = [r["model"], r["dataset"], str(r["batch"]),
                 f(p.get("numpy")), f"{f(p.get('device'))} ({ratio(p.get('numpy'), p.get('device'))})",
                 f(s.get("old")), f"{f(s.get('new'))} ({ratio(s.get('old'), s.get('new'))})",
                 f(lo.get("numpy")), f"{f(lo.get('device'))} ({ratio(lo.get('numpy'), lo.get('device'))})",
                 f(g.get("old")), f"{f(g.get('new'))} ({ratio(g.get('old'), g.get('new'))})",
                 str(o.get("old_ops", {}).get("leaf_ops", "-")), str(o.get("new_ops", {}).get("leaf_ops", "-")),
                 str(p.get("device_batch_ops", {}).get("leaf_ops", "-"))]
        print(" | ".join(cells))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
