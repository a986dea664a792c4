r"""One GPU check: every figure to measure on a GPU, in a few minutes, as one JSON file and one table.

Run through ``benchmarks/gpu_check.sh`` (no network; synthetic data made on the spot):

1. **train**: showers/s of one training step of the device pipeline (data already on the GPU,
   fast splines, TF32) for every model at batch 128 / 512 / 2048 on dataset 2 and 128 on
   dataset 3, without and with ``--amp`` (bf16 autocast), and with ``--compile`` where the
   training supports it (the default training path; DeepTree refuses it); peak GPU memory.
   Each measurement also records the operators and host syncs of one step of the training loop
   (dispatch-mode counter, :mod:`calopc.models.opcount`: CPU dispatch counts, which do not bound
   the CUDA kernel launches).
2. **generate**: ms/shower of :func:`calopc.models.generate.generate` to HDF5 (end to end,
   and sampling alone) at batch 100 / 1,000 / 10,000 on datasets 2 and 3 for every model,
   CaloClouds' 1-step distilled student included (untrained weights: the cost is the same).
3. **sparse**: ``benchmarks/sparse.py`` (conv layer and classifier step, dense vs sparse).
4. **evaluate**: ``calopc evaluate`` of 10k vs 10k synthetic ds2 showers, wall time.
5. **classifier**: ``benchmarks/classifier.py`` seconds per epoch.

Every part has a time share of ``--budget`` (default 460 s); a part out of time or failing is
recorded with its error and the check goes on. ``--quick`` shrinks every size (a smoke test
that runs on a CPU in a few minutes: ``--device cpu --quick``).

Usage::

    python benchmarks/gpu_check.py --device cuda --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Time shares of the whole budget."""

    def __init__(self, budget: float) -> None:
        self.t0, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_data(tmp: Path, dataset: str, n: int) -> Path:
    from calopc.converters import convert_file
    from calopc.synth import write_synthetic

    h5 = write_synthetic(tmp / f"ds{dataset}.hdf5", dataset=dataset, n=n, seed=0)
    return convert_file(h5, tmp / f"ds{dataset}.parquet", progress=False)


def _sync(dev) -> None:  # noqa: ANN001
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


_PREPS: dict = {}


def bench_train(name: str, mcfg: dict, ds, dev, batch: int, *, amp: bool, compile_: bool, seconds: float,
                min_steps: int = 3) -> dict:
    """Showers/s of the training step (batches prebuilt on the device), ops and syncs of one step."""
    import torch

    from calopc.models import get_model
    from calopc.models.data import DeviceCollate, iterate_batches
    from calopc.models.opcount import count_dispatch, training_step
    from calopc.models.precision import autocast, fast_matmul

    model_cls, cfg_cls = get_model(name)
    cfg = cfg_cls.from_dict(dict(mcfg))
    key = (json.dumps(cfg.preprocessing(), sort_keys=True), id(ds))
    prep = _PREPS.get(key)
    if prep is None:  # fitted once per preprocessing and dataset
        prep = _PREPS[key] = ds.fit_preprocessor(seed=0, **cfg.preprocessing())
    torch.manual_seed(0)
    model = model_cls(cfg.with_data(prep)).to(dev).train()
    batches = []
    for b in iterate_batches(ds, DeviceCollate(prep, dev, seed=0), batch, seed=0):
        batches.append(b)
        if len(batches) >= 3:
            break
    if not batches:
        return {"error": f"fewer than {batch} training showers"}
    custom = callable(getattr(model, "training_step", None))
    if compile_ and custom:
        return {"skipped": "custom training step: --compile refused"}
    one = training_step(model, batches[0], device=dev)
    if compile_:  # what train(--compile) does: the loss compiled, shapes dynamic
        model.forward = torch.compile(model.forward, dynamic=True)
    res: dict = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with fast_matmul(dev), autocast(dev, amp):
        for i in range(2):
            one(i)
        c = count_dispatch(lambda: one(2)) if not compile_ else None
        _sync(dev)
        t, n = time.perf_counter(), 0
        while n < min_steps or time.perf_counter() - t < seconds:
            one(3 + n)
            n += 1
            if n >= 200:
                break
        _sync(dev)
        dt = time.perf_counter() - t
    res.update(showers_per_s=n * batch / dt, ms_per_step=1e3 * dt / n, steps=n,
               points_per_batch=int(batches[0].mask.sum()))
    if c is not None:
        res.update(ops=c.ops, syncs=c.syncs)
    if dev.type == "cuda":
        res["peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return res


def bench_generate(run: Path, tmp: Path, dev, dataset: str, batches: list[int], *, amp: bool, seconds: float,
                   model_kwargs: dict | None = None) -> dict:
    """ms/shower of generate() to HDF5 for one batch of each size (after a warm-up batch)."""
    from calopc.models.generate import generate

    out = {}
    t_start = time.perf_counter()
    for bs in batches:
        if time.perf_counter() - t_start > seconds:
            out[str(bs)] = {"skipped": "out of time"}
            continue
        e = np.exp(np.random.default_rng(bs).uniform(math.log(1e3), math.log(1e6), bs))
        try:
            generate(run, e[: min(bs, 16)], output=None, batch_size=bs, device=str(dev), amp=amp,
                     model_kwargs=model_kwargs)  # warm-up
            r = generate(run, e, output=tmp / f"gen_{dataset}_{bs}.hdf5", batch_size=bs, device=str(dev), amp=amp,
                         model_kwargs=model_kwargs)
            out[str(bs)] = {"ms_per_shower": 1e3 * r.seconds_total / bs,
                            "ms_per_shower_sampling": 1e3 * r.seconds_sampling / bs,
                            "showers_per_s": bs / r.seconds_total}
        except Exception as err:  # noqa: BLE001
            out[str(bs)] = _err(err)
            if "out of memory" in str(err).lower():
                _free()
    return out


def bench_classifier(dev, n: int, epochs: int) -> dict:  # noqa: ANN001
    """Seconds per epoch of the official low-level classifier, n vs n synthetic ds2 showers (as benchmarks/classifier.py,
    on ``dev`` only)."""
    import torch

    from calopc.eval import ClassifierConfig, classifier_inputs, classifier_metric
    from calopc.geometry import Geometry
    from calopc.synth import generate as synth

    g = Geometry.calochallenge("2")
    xs = []
    for seed in (1, 2):
        inc, sh = synth(g, n, seed=seed)
        xs.append(classifier_inputs("low", np.where(sh < g.threshold, 0.0, sh), inc, g))
    classifier_metric("low", xs[0][:500], xs[1][:500], config=ClassifierConfig(epochs=1), device=str(dev))  # warm-up
    _sync(dev)
    t = time.perf_counter()
    r = classifier_metric("low", xs[0], xs[1], config=ClassifierConfig(epochs=epochs), device=str(dev))
    _sync(dev)
    dt = time.perf_counter() - t
    del torch
    return {"s_per_epoch": dt / epochs, "epochs": epochs, "showers": n, "auc": float(r.auc)}


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _err(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def make_run(name: str, mcfg: dict, data: Path, tmp: Path, dev, batch: int) -> Path:
    from calopc.models.train import TrainConfig, train

    run = tmp / f"run_{name}_{data.stem}"
    train(name, data, run, model_config=dict(mcfg), overwrite=True,
          config=TrainConfig(steps=2, batch_size=batch, device=str(dev), progress=False, warmup=1, log_every=1,
                             checkpoint_every=10**9))
    return run


def run_cmd(cmd: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - t}
    r = {"seconds": time.perf_counter() - t, "rc": p.returncode, "stdout_tail": p.stdout[-3000:]}
    if p.returncode:
        r["error"] = p.stderr[-1500:]
    return r


MODELS = [("calopointflow", {}), ("caloclouds", {}), ("caloclouds", {"denoiser": "transformer"}), ("deeptree", {})]


def label(name: str, mcfg: dict) -> str:
    return name + "".join(f":{k}={v}" for k, v in mcfg.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole check (CPU: minutes)")
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for the whole check (default: %(default)s)")
    ap.add_argument("--parts", default="train,generate,sparse,evaluate,classifier", help="default: %(default)s")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON output (default: %(default)s)")
    args = ap.parse_args()

    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --quick for a smoke test)", file=sys.stderr)
        return 2
    clock = Clock(args.budget)
    parts = args.parts.split(",")
    share = {"train": 0.35, "generate": 0.22, "sparse": 0.08, "evaluate": 0.25, "classifier": 0.10}
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "quick": args.quick, "budget_s": args.budget, "train": {}, "generate": {}}
    try:
        run_parts(args, res, clock, parts, share, dev)
    except KeyboardInterrupt:  # the wrapper's time limit (SIGINT): keep what was measured
        res["interrupted"] = True
        log("interrupted: writing what was measured")
    res["total_s"] = args.budget - clock.left()
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    table(res)
    print(f"\nJSON: {args.out}")
    return 0


def run_parts(args: argparse.Namespace, res: dict, clock: Clock, parts: list[str], share: dict, dev) -> None:  # noqa: ANN001
    import torch  # noqa: F401

    q = args.quick
    train_cfgs = [("2", 8), ("2", 16)] if q else [("2", 128), ("2", 512), ("2", 2048), ("3", 128)]
    gen_batches = [4, 16] if q else [100, 1000, 10000]
    n_data = {"2": 48, "3": 24} if q else {"2": 6000, "3": 600}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        from calopc.models.data import ShowerDataset

        t = time.perf_counter()
        datasets = sorted({d for d, _ in train_cfgs} | {"2", "3"})
        data = {d: make_data(tmp, d, n_data[d]) for d in datasets}
        dsets = {d: ShowerDataset.from_parquet(p) for d, p in data.items()}
        res["data_s"] = time.perf_counter() - t
        log(f"data: {', '.join(f'ds{d} {len(v)} showers' for d, v in dsets.items())} in {res['data_s']:.0f} s")

        if "train" in parts:
            end = clock.left() - args.budget * (1 - share["train"])
            jobs = [(m, c, d, b, amp, False) for m, c in MODELS for d, b in train_cfgs for amp in (False, True)]
            # --compile last (compilation takes minutes): ds2 at the second batch size, without and with amp
            jobs += [(m, c, train_cfgs[1][0], train_cfgs[1][1], amp, True) for m, c in MODELS for amp in (False, True)]
            per = max(0.5, 0.5 * (end - (args.budget - clock.left())) / max(len(jobs), 1)) if not q else 0.2
            for m, c, d, b, amp, comp in jobs:
                key = f"{label(m, c)} ds{d} b{b}" + (" amp" if amp else "") + (" compile" if comp else "")
                train_left = clock.left() - args.budget * (1 - share["train"])
                if (train_left <= 0 and not q) or (comp and (q or train_left < 90)):
                    res["train"][key] = {"skipped": "--quick" if q and comp else "out of time"}
                    continue
                try:
                    res["train"][key] = bench_train(m, c, dsets[d], dev, b, amp=amp, compile_=comp, seconds=per)
                except Exception as err:  # noqa: BLE001
                    res["train"][key] = _err(err)
                    if "out of memory" not in str(err).lower():
                        traceback.print_exc()
                    _free()
                log(f"train {key}: {res['train'][key]}")

        if "generate" in parts:
            stop_at = args.budget * (1 - share["train"] - share["generate"])
            runs = {}
            for d in ("2", "3"):
                for m, c in MODELS:
                    key = f"{label(m, c)} ds{d}"
                    if q and d == "3" and c:   # --quick: the transformer's ds3 sampling takes minutes on a CPU
                        res["generate"][key] = {"skipped": "--quick"}
                        continue
                    if clock.left() < stop_at and not q:
                        res["generate"][key] = {"skipped": "out of time"}
                        continue
                    try:
                        run = runs[(m, str(c), d)] = make_run(m, c, data[d], tmp, dev, 8)
                        per = max(5.0, (clock.left() - stop_at) / 8)
                        for amp in (False, True):
                            res["generate"][key + (" amp" if amp else "")] = bench_generate(
                                run, tmp, dev, d, gen_batches, amp=amp, seconds=per)
                        if m == "caloclouds" and not c:   # the distilled 1-step student
                            from calopc.models.distill import DistillConfig, distill

                            stu = tmp / f"student_{d}"
                            distill(run, stu, data=data[d], overwrite=True,
                                    config=DistillConfig(steps=2, batch_size=4, device=str(dev), progress=False))
                            res["generate"][f"caloclouds-student(1 step) ds{d}"] = bench_generate(
                                stu, tmp, dev, d, gen_batches, amp=False, seconds=per)
                    except Exception as err:  # noqa: BLE001
                        res["generate"][key] = _err(err)
                        traceback.print_exc()
                        _free()
                    log(f"generate {key}: {res['generate'].get(key)}")

        py = sys.executable
        if "sparse" in parts:
            cmd = [py, "benchmarks/sparse.py", "--device", str(dev.type), "--backends", "dense,torch",
                   "--reps", "2" if q else "3", "--auc-n", "0", "--json", str(tmp / "sparse.json")]
            if q:
                cmd += ["--batch", "2", "--channels", "8", "--cls-batch", "2", "--widths", "4,4,4,4", "--datasets", "2"]
            r = run_cmd(cmd, 900 if q else min(clock.left() - args.budget * (share["evaluate"] + share["classifier"]),
                                               args.budget * share["sparse"] * 1.5))
            if (tmp / "sparse.json").exists():
                r["figures"] = json.loads((tmp / "sparse.json").read_text())
            res["sparse"] = r
            log(f"sparse: {r.get('seconds', 0):.0f} s {'error' if 'error' in r else 'ok'}")

        if "evaluate" in parts:
            from calopc.synth import write_synthetic

            n = 200 if q else 10_000
            a = write_synthetic(tmp / "eval_a.hdf5", dataset="2", n=n, seed=11)
            b = write_synthetic(tmp / "eval_b.hdf5", dataset="2", n=n, seed=12)
            cmd = [py, "-m", "calopc", "evaluate", str(a), str(b), "-o", str(tmp / "eval"), "--device", dev.type,
                   "--no-progress", "--plot-workers", str(min(8, os.cpu_count() or 1))] + (["--cls-epochs", "1"] if q else [])
            r = run_cmd(cmd, 900 if q else clock.left() - args.budget * share["classifier"])
            r["showers"] = n
            res["evaluate"] = r
            log(f"evaluate {n} vs {n}: {r.get('seconds', 0):.0f} s {'error' if 'error' in r else 'ok'}")

        if "classifier" in parts:
            t = time.perf_counter()
            try:
                r = bench_classifier(dev, 500 if q else 10_000, 1 if q else 3)
            except Exception as err:  # noqa: BLE001
                r = _err(err)
            r["seconds"] = time.perf_counter() - t
            res["classifier"] = r
            log(f"classifier: {r}")


def _cell(text: object, limit: int = 200) -> str:
    """``text`` as one Markdown table cell: one line, no column separator, at most about ``limit`` characters
    (a longer text keeps its start, e.g. the exception type, and its end, e.g. a traceback's message)."""
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= limit else f"{t[: limit // 3]} ... {t[-(limit - limit // 3 - 5):]}"


def _status(r: object) -> str:
    """Why an entry (or one batch size of it) has no figures: its error, why it was skipped, or what it holds."""
    if isinstance(r, dict) and "error" in r:
        return "error: " + _cell(r["error"])
    if isinstance(r, dict) and "skipped" in r:
        return "skipped: " + _cell(r["skipped"])
    return "no result: " + _cell(r, 80)


def table(res: dict) -> None:
    """Print the Markdown table of a result (entries with figures, and a row saying why for every other:
    failed, skipped for time or by ``--quick``, whole entries or single batch sizes)."""
    def f(x, nd: int = 0) -> str:  # noqa: ANN001
        return "-" if not isinstance(x, (int, float)) else f"{x:,.{nd}f}"

    print(f"# GPU check: {res.get('device', '?')}, torch {res.get('torch', '?')}{' (quick)' if res.get('quick') else ''}, "
          f"{res.get('total_s', 0):.0f} s\n")
    print("| training | showers/s | ms/step | ops/step (CPU dispatch count) | syncs/step | peak GB |")
    print("|---|---|---|---|---|---|")
    for k, r in res.get("train", {}).items():
        if isinstance(r, dict) and "showers_per_s" in r:
            print(f"| {k} | {f(r['showers_per_s'])} | {f(r.get('ms_per_step'), 1)} | {f(r.get('ops'))} | "
                  f"{f(r.get('syncs'))} | {f(r.get('peak_gb'), 1)} |")
        else:
            print(f"| {k} | {_status(r)} | | | | |")
    print("\n| generation to HDF5 | batch | ms/shower (end to end) | ms/shower (sampling) | showers/s |")
    print("|---|---|---|---|---|")
    for k, per in res.get("generate", {}).items():
        if not isinstance(per, dict) or "error" in per or "skipped" in per:   # the whole entry
            print(f"| {k} | | {_status(per)} | | |")
            continue
        for bs, r in per.items():
            if isinstance(r, dict) and "ms_per_shower" in r:
                print(f"| {k} | {bs} | {f(r['ms_per_shower'], 3)} | {f(r.get('ms_per_shower_sampling'), 3)} | "
                      f"{f(r.get('showers_per_s'), 1)} |")
            else:
                print(f"| {k} | {bs} | {_status(r)} | | |")
    print("\n| other | seconds | status |")
    print("|---|---|---|")
    for k in ("sparse", "evaluate", "classifier"):
        r = res.get(k)
        if isinstance(r, dict):
            print(f"| {k} | {f(r.get('seconds'), 1)} | {_status(r) if 'error' in r else 'ok'} |")
    cl = res.get("classifier", {})
    if isinstance(cl, dict) and "s_per_epoch" in cl:
        print(f"\nclassifier (low-level, {cl['showers']} vs {cl['showers']} ds2): {cl['s_per_epoch']:.2f} s/epoch")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
