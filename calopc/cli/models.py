r"""``calopc train``, ``calopc generate`` and ``calopc distill``: argparse front-ends over
:mod:`calopc.models.train`, :mod:`calopc.models.generate` and :mod:`calopc.models.distill`.

Importing this module does not import torch (``calopc --help`` stays fast).
"""

from __future__ import annotations

__all__ = ["register", "resolve_train_args"]

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .options import FORMATTER, GENERATE_COLLISIONS, add_progress, fraction, positive_float, positive_int, threshold_arg

_TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--steps": ("steps", positive_int, "optimizer steps in total"),
    "--batch-size": ("batch_size", positive_int, "showers per step (per process under torchrun)"),
    "--lr": ("lr", positive_float, "peak learning rate"),
    "--ema-decay": ("ema_decay", fraction, "EMA decay of the weights (0: off)"),
    "--time-limit": ("time_limit", positive_float, "stop after this many seconds of training"),
    "--max-showers": ("max_showers", positive_int, "use only the first N training showers"),
    "--buffer-showers": ("buffer_showers", positive_int, "showers in the shuffle buffer when streaming"),
    "--checkpoint-every": ("checkpoint_every", positive_int, "steps between checkpoints"),
    "--log-every": ("log_every", positive_int, "steps between stats.jsonl records (and device-to-host reads)"),
    "--pipeline": ("pipeline", str, "where batches are built: device (GPU-first) or numpy (on the host)"),
    "--fast-splines": ("fast_splines", str, "faster spline knots: auto (CUDA only), on, matmul or off"),
}


def _parse_value(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _load_config_file(path: Path) -> dict:
    if not path.exists():
        msg = f"--config {path}: no such file"
        raise ValueError(msg)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:  # one line: the file, where, what the parser found
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            ctx, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
            if ctx and cmark is not None:  # e.g. "while parsing a flow sequence" and where it began
                what += f" ({ctx} from line {cmark.line + 1}, column {cmark.column + 1})"
            msg = f"--config {path}: not valid YAML at {where}: {what}"
            raise ValueError(msg) from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            msg = f"--config {path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            raise ValueError(msg) from None
    if not isinstance(d, dict) or set(d) - {"model", "train"}:
        msg = f"--config {path}: expected a mapping with keys 'model' and/or 'train', got {list(d) if isinstance(d, dict) else type(d).__name__}"
        raise ValueError(msg)
    return d


def resolve_train_args(args: argparse.Namespace) -> tuple[dict, dict]:
    """(model config dict, train config dict) from defaults < the family's training defaults (those of the
    model's preset, e.g. ``--set model.preset=published``) < --config < flags < --set. A time limit given
    without ``--steps`` leaves the end of the run, and its learning-rate schedule, to the clock. A ValueError echoes long values shortened (:func:`calopc.models.guards.shorten_quoted`)."""
    from ..models.guards import shorten_quoted

    try:
        return _resolve_train_args(args)
    except ValueError as err:
        raise ValueError(shorten_quoted(str(err))) from None


def _resolve_train_args(args: argparse.Namespace) -> tuple[dict, dict]:
    from ..models import get_model  # no torch: get_model imports the model module only when called
    from ..models.train import UNTIL_TIME_LIMIT, TrainConfig, training_defaults

    _, cfg_cls = get_model(args.model)
    model_cfg: dict = {}
    train_cfg: dict = {}   # what is given; the family's defaults (for the model's preset) go under it below
    if args.config is not None:
        d = _load_config_file(args.config)
        model_cfg.update(d.get("model") or {})
        train_cfg.update(d.get("train") or {})
    for flag, (name, _, _) in _TRAIN_FLAGS.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None:
            train_cfg[name] = v
    if args.stream is not None:
        train_cfg["stream"] = args.stream
    train_cfg.update(seed=args.seed, device=args.device, progress=not args.no_progress)
    for flag in ("amp", "bucket", "compile"):
        if getattr(args, flag):
            train_cfg[flag] = True
    from ..models.guards import _short, typed_options

    raw: dict[str, dict[str, str]] = {"model": {}, "train": {}}  # --set texts: string options keep them verbatim
    for item in args.set or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train"):
            msg = f"--set {_short(item)!r}: expected model.KEY=VALUE or train.KEY=VALUE"
            raise ValueError(msg)
        (model_cfg if section == "model" else train_cfg)[name] = _parse_value(value)
        raw[section][name] = value
    # every value against the field types, before any data is read (one line: key, value, expected type)
    model_cfg = typed_options(cfg_cls, model_cfg, section="model", raw=raw["model"], sizes=True)
    if train_cfg.get("time_limit") is not None and "steps" not in train_cfg:
        train_cfg["steps"] = UNTIL_TIME_LIMIT   # a time limit without --steps: the clock ends the run (and its schedule)
    train_cfg = {**training_defaults(args.model, model_cfg), **train_cfg}
    train_cfg = typed_options(TrainConfig, train_cfg, section="train", raw=raw["train"])
    model_obj = cfg_cls.from_dict(model_cfg)
    train_obj = TrainConfig.from_dict(train_cfg)
    return asdict(model_obj), asdict(train_obj)


def _cmd_train(args: argparse.Namespace) -> int:
    model_cfg, train_cfg = resolve_train_args(args)
    if args.dry_run:
        print(json.dumps({"model": args.model, "data": [str(p) for p in args.data], "out": str(args.out), "resume": args.resume,
                          "overwrite": args.overwrite, "model_config": model_cfg, "train": train_cfg}, indent=2))
        return 0
    for p in args.data:
        if not p.exists() and not any(c in str(p) for c in "*?["):  # a file, a dataset folder or a glob
            msg = f"--data {p}: no such file (make one with 'calopc convert showers.hdf5 -o train.parquet')"
            raise ValueError(msg)
    seen: dict = {}
    for p in args.data:  # the same file twice would train on every shower twice
        key = p.resolve() if p.exists() else p
        if key in seen:
            msg = f"--data {p}: given twice (also as {seen[key]}); give each file once"
            raise ValueError(msg)
        seen[key] = p
    from ..io import ShowerFileError
    from ..models.train import TrainConfig, train

    try:
        res = train(args.model, args.data, args.out, model_config=model_cfg, config=TrainConfig.from_dict(train_cfg),
                    resume=args.resume, overwrite=args.overwrite)
    except ShowerFileError as err:  # the readers' advice may name --geometry, which train does not have
        raise ShowerFileError(_without_geometry_flag(str(err))) from None
    if int(__import__("os").environ.get("RANK", 0)) == 0 and res.get("nothing_to_do"):
        print(f"train: {res['run_dir']} already holds {res['steps']} steps (train.steps {train_cfg['steps']}): "
              "nothing to do; raise --steps to train longer")
    elif int(__import__("os").environ.get("RANK", 0)) == 0:
        print(f"trained {args.model}: {res['steps']} steps in {res['seconds']:.1f} s, final loss {res['final_loss']:.4f}; "
              f"run directory {res['run_dir']}")
    return 0


def _without_geometry_flag(msg: str) -> str:
    """A reader's message without its advice to pass --geometry (train reads the geometry from the files)."""
    import re

    msg = msg.replace("Pass the geometry (--geometry) to read it anyway",
                      "write it with 'calopc convert' (which records the geometry) to train on it")
    msg = re.sub(r"\s*\([^()]*--geometry[^()]*\)", "", msg)       # "(pass --geometry to override it)"
    return re.sub(r";[^;]*--geometry[^;]*", "", msg)            # "; pass the right geometry with --geometry"


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..models.generate import parse_energies, refuse_overwriting_inputs

    refuse_overwriting_inputs(args.output, [args.energies, args.run_dir], "-o/--output")
    energies = parse_energies(args.energies, args.n, seed=args.seed)
    if args.dry_run:
        print(json.dumps({"run_dir": str(args.run_dir), "n": int(energies.shape[0]), "energies": args.energies,
                          "output": str(args.output) if args.output else None, "seed": args.seed,
                          "batch_size": args.batch_size, "device": args.device, "ema": not args.no_ema,
                          "collisions": args.collisions, "oversample": args.oversample, "threshold": args.threshold,
                          "steps": args.steps,
                          "amp": args.amp},
                         indent=2))
        return 0
    if args.strict:  # refuse before the model is loaded (without --strict, generate() warns)
        from ..models.checkpoint import read_config
        from ..models.guards import check_energy_range

        check_energy_range(read_config(args.run_dir), energies, strict=True)
    from ..models.generate import generate
    from ..models.utils import resolve_device

    res = generate(args.run_dir, energies, output=args.output, seed=args.seed, batch_size=args.batch_size,
                   device=args.device, ema=not args.no_ema, collisions=args.collisions, threshold=args.threshold,
                   progress=not args.no_progress, oversample=args.oversample,
                   model_kwargs=None if args.steps is None else {"steps": args.steps}, amp=args.amp)
    print(f"generated {res.n_showers} showers ({res.n_points} points) in {res.seconds_total:.2f} s: "
          f"{res.showers_per_second_total:.1f} showers/s end to end (sampling alone {res.seconds_sampling:.2f} s, "
          f"{res.showers_per_second:.1f} showers/s) on {resolve_device(args.device)}"
          + (f"; wrote {res.output}" if res.output else ""))
    if res.collisions:
        c = res.collisions
        print(f"cells ({args.collisions}): {c['n_collisions']} collisions ({100 * c['collision_rate']:.2f}% of points; moved {c['n_moved']}, "
              f"merged {c['n_merged']}, dropped {c['n_dropped']}), {c['n_outside']} outside, "
              f"{c['n_below_threshold']} below threshold"
              + (f"; the model moved {c['n_moved_ring']} points ({100 * c.get('moved_ring_rate', 0):.2f}%) to another "
                 "r ring before placement" if c.get("n_moved_ring") else ""))
    n_over = (res.collisions or {}).get("n_over_incident", 0)
    if n_over:
        print(f"calopc generate: warning: {n_over} of {res.n_showers} showers deposit more energy than their "
              "incident energy", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``generate`` subcommands to the ``calopc`` parser."""
    t = sub.add_parser("train", help="train a generative model on point-cloud Parquet showers",
                       description="Train a model. Several GPUs: torchrun --nproc-per-node K $(which calopc) train ...",
                       epilog="example:\n  calopc train calopointflow --data train.parquet -o runs/cpf \\\n"
                              "      --steps 20000 --batch-size 128 --device cuda",
                       formatter_class=FORMATTER)
    from ..models import available  # the registry (no torch import)

    t.add_argument("model", choices=available(), help="model to train")
    t.add_argument("--data", type=Path, nargs="+", required=True,
                   help="training Parquet file(s) from 'calopc convert' (same geometry)")
    t.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the data through a shuffle buffer instead of holding it in memory "
                        "(default: stream when the showers would take more than 2 GB, 8 bytes per point)")
    t.add_argument("-o", "--output", "--out", dest="out", type=Path, required=True,
                   help="run directory (config.json, model.safetensors, stats.jsonl); must be empty or new unless "
                        "--resume or --overwrite")
    t.add_argument("--config", type=Path, default=None, help="YAML/JSON file with 'model' and 'train' sections (default: none)")
    t.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="override one option, e.g. model.latent=32 or train.lr=3e-4 (repeatable; default: none)")
    defaults = _train_defaults()
    for flag, (name, typ, hlp) in _TRAIN_FLAGS.items():
        t.add_argument(flag, type=typ, default=None,
                       help=f"{hlp} (default: the model family's, else {defaults[name]})")
    t.add_argument("--amp", action="store_true", help="bfloat16 mixed precision on CUDA (default: off)")
    t.add_argument("--bucket", action="store_true",
                   help="batches of showers of similar size, padded to a multiple of 32 (default: off)")
    t.add_argument("--compile", action="store_true", help="torch.compile the loss (default: off)")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty run directory, replacing its run files (default: off)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/training_state.pt (default: off)")
    _add_common(t, "print the resolved configuration and exit (default: off)")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate showers from a trained run directory",
                       epilog="example:\n  calopc generate runs/cpf --energies reference.hdf5 -o generated.hdf5 \\\n"
                              "      --device cuda",
                       formatter_class=FORMATTER)
    g.add_argument("run_dir", type=Path, help="run directory written by 'calopc train'")
    g.add_argument("-n", type=positive_int, default=None, help="number of showers (default: all energies of --energies)")
    g.add_argument("--energies", required=True,
                   help="incident energies (MeV): FILE.hdf5|FILE.parquet, log-uniform:LO:HI, uniform:LO:HI or E1,E2,... (required)")
    g.add_argument("-o", "--output", type=Path, default=None,
                   help="output: .parquet (point clouds) or .hdf5 (official voxel format); default: none, only time the sampling")
    g.add_argument("--collisions", choices=GENERATE_COLLISIONS, default="auto",
                   help="points sharing a cell: alpha-free draws the α bins of each (layer, r) ring without replacement "
                        "(models without α), nearest-free moves them to the nearest free cell, sum adds, max keeps the "
                        "largest; auto picks alpha-free or nearest-free by the model; likelihood chooses each layer's "
                        "cells with the probability that the model hits them (n_l q_c, capped at 1), q integrated from "
                        "the model's density (calopointflow II with alpha=free and set_summary=false) or estimated from "
                        "--oversample candidate points (the others: caloclouds pointwise, calopointflow II) (default: "
                        "%(default)s)")
    g.add_argument("--oversample", type=positive_int, default=None, metavar="K",
                   help="--collisions likelihood: K candidate points per point estimate the cell probabilities "
                        "(default: calopointflow II with alpha=free and set_summary=false integrates its density, others 16)")
    g.add_argument("--threshold", type=threshold_arg, default=None, metavar="MEV|official",
                   help="HDF5 output: cells with less energy (MeV) are empty; 'official': the dataset's readout "
                        "threshold (1 MeV ds1, 15.15 keV ds2/3) (default: official)")
    g.add_argument("--batch-size", type=positive_int, default=1000, help="showers per model call (default: %(default)s)")
    g.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights (default: EMA)")
    g.add_argument("--steps", type=int, default=None,
                   help="sampler steps of diffusion models (caloclouds: Heun steps, 2 steps - 1 network evaluations; "
                        "a distilled run: evaluations; default: the run's, 13 and 1)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast of the sampling on CUDA (default: off)")
    g.add_argument("--strict", action="store_true",
                   help="refuse incident energies outside the run's training range (default: warn and generate)")
    _add_common(g, "print the resolved options and exit (default: off)")
    g.set_defaults(func=_cmd_generate)

    _register_distill(sub)


def _add_common(p: argparse.ArgumentParser, dry_run_help: str) -> None:
    """The options ``train`` and ``generate`` share: --seed, --device, --no-progress, --dry-run."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: %(default)s)")
    add_progress(p)  # --no-progress: no bar on a terminal, no progress lines in logs
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)


def _train_defaults() -> dict:
    """TrainConfig's defaults, mirrored here so that ``--help`` needs no torch (a test keeps them equal)."""
    return dict(_TRAIN_DEFAULTS)


_TRAIN_DEFAULTS = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.999, "time_limit": None,
                   "max_showers": None, "buffer_showers": 20_000, "checkpoint_every": 500, "log_every": 10,
                   "pipeline": "device", "fast_splines": "auto"}


# ------------------------------------------------------------------------------------------------ distill
_DISTILL_FLAGS = {  # flag -> (DistillConfig field, type, help)
    "--steps": ("steps", int, "optimizer steps"),
    "--batch-size": ("batch_size", int, "showers per step"),
    "--lr": ("lr", float, "learning rate (Adam, constant; default 1e-3; CaloClouds II used 1e-4 for 1 M steps)"),
    "--mu": ("mu", float, "EMA decay of the target network"),
    "--n-sigmas": ("n_sigmas", int, "points of the Karras discretisation"),
    "--time-limit": ("time_limit", float, "stop after this many seconds (the run is written first)"),
    "--max-showers": ("max_showers", int, "use only the first N training showers"),
    "--points-per-shower": ("points_per_shower", int, "random points per shower in the loss (0: all; default: the "
                            "teacher's points_per_shower_loss)"),
    "--moment-matching": ("moment_matching", float, "weight of the layer-moment term: the student's one-step showers' "
                          "per-layer radial centre and width against the batch's (0: off)"),
}
_DISTILL_SWITCHES = {  # flag -> (DistillConfig field, help)
    "--moment-condition": ("moment_condition", "the layer-moment term also matches each moment's covariance with "
                           "log E_inc"),
}


def _cmd_distill(args: argparse.Namespace) -> int:
    from ..models.distill import DistillConfig, distill

    d: dict[str, Any] = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in _DISTILL_FLAGS.items()}
    d = {k: v for k, v in d.items() if v is not None}
    d.update({name: True for flag, (name, _) in _DISTILL_SWITCHES.items() if getattr(args, flag[2:].replace("-", "_"))})
    d.update(seed=args.seed, device=args.device, progress=not args.no_progress)
    cfg = DistillConfig.from_dict(d)
    if not args.run_dir.is_dir():
        msg = f"{args.run_dir}: no such run directory (train one with 'calopc train caloclouds')"
        raise ValueError(msg)
    if args.dry_run:
        print(json.dumps({"run_dir": str(args.run_dir), "out": str(args.out), "data": [str(p) for p in args.data or []],
                          "distill": asdict(cfg)}, indent=2))
        return 0
    res = distill(args.run_dir, args.out, data=args.data or None, config=cfg, overwrite=args.overwrite)
    print(f"distilled {args.run_dir}: {res['steps']} steps in {res['seconds']:.1f} s, final loss "
          f"{res['final_loss']:.4f}; one-step run directory {res['run_dir']}")
    return 0


def _register_distill(sub: argparse._SubParsersAction) -> None:
    """Add the ``distill`` subcommand to the ``calopc`` parser (importing no torch)."""
    from dataclasses import fields

    from ..models.distill import DistillConfig

    p = sub.add_parser("distill", help="distil a caloclouds run into a one-step consistency model",
                       description="Consistency distillation: a student that samples in one network evaluation "
                                   "('calopc generate RUN_CM'; --steps 2 for two).")
    p.add_argument("run_dir", type=Path, help="run directory of 'calopc train caloclouds' (the teacher)")
    p.add_argument("-o", "--out", type=Path, required=True, help="run directory of the student (required)")
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="training Parquet file(s) (default: the teacher's, from its training_options.json)")
    defaults = {f.name: f.default for f in fields(DistillConfig)}
    for flag, (name, typ, hlp) in _DISTILL_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=f"{hlp} (default: {defaults[name]})")
    for flag, (_, hlp) in _DISTILL_SWITCHES.items():
        p.add_argument(flag, action="store_true", help=f"{hlp} (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: %(default)s)")
    add_progress(p)  # --no-progress: no bar on a terminal, no progress lines in logs
    p.add_argument("--dry-run", action="store_true", help="print the resolved options and exit (default: off)")
    p.set_defaults(func=_cmd_distill)

