r"""Consistency distillation of a trained CaloClouds run into a one-step sampler.

``calopc distill RUN -o RUN_CM`` (:mod:`calopc.cli.models`) or :func:`distill` trains a *student* that maps any noisy
point straight to the end of the teacher's probability-flow ODE:

* the student and its *target network* start from the teacher's EMA weights; the student
  uses the boundary-condition parametrisation of consistency models
  (:class:`~calopc.models.diffusion.ConsistencyPrecond`, ``D(x; σ_min) = x``);
* each step draws, per shower, a pair of neighbouring noise levels ``σ_n > σ_{n+1}`` of an
  ``N = 18`` point Karras grid, noises the training points to ``σ_n``, lets the teacher take
  one Heun step to ``σ_{n+1}`` and pulls the student's output at ``σ_n`` towards the target
  network's output at ``σ_{n+1}`` (L2);
* the target network follows the student as an EMA with ``μ = 0.95``;
* with ``moment_matching > 0`` the student also samples the batch's points in one step from
  pure noise (the same showers, layers and point counts) and the loss adds that weight times the
  layer-moment matching term (:func:`calopc.models.moments.moment_loss`): per layer, the batch
  mean and spread of the energy-weighted radial centre and width, generated against real (with
  ``moment_condition``, also their covariance with ``log E_inc``).

Only the point model is trained; the shower model is the teacher's. The run directory is
written to a temporary directory next to ``RUN_CM`` and renamed when complete; it holds the
student (``model.safetensors``) and the target network (``model_ema.safetensors``, used by
default), loads with :func:`calopc.models.load` and samples in ``steps = 1`` network
evaluation (``calopc generate RUN_CM --steps 2`` for two).

Importing this module does not import torch.

References:
    | Consistency models (Song et al., 2023) | https://arxiv.org/abs/2303.01469
    | CaloClouds II (Buss et al., 2023) | https://arxiv.org/abs/2309.05704
"""

from __future__ import annotations

__all__ = ["DistillConfig", "distill"]

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DistillConfig:
    """Options of :func:`distill` (saved as ``distill_options.json``)."""

    steps: int = 2000                 # optimizer steps
    batch_size: int = 32              # showers per step
    lr: float = 1e-3                  # learning rate (Adam, constant; CaloClouds II used 1e-4 for 1 M steps)
    grad_clip: float = 10.0           # max gradient norm (0: off)
    mu: float = 0.95                  # EMA decay of the target network
    n_sigmas: int = 18                # points of the Karras discretisation
    time_limit: float | None = None   # stop after this many seconds (the run is written first)
    clock: str = "wall"               # seconds of time_limit: wall clock, or "process" CPU time (as TrainConfig.clock)
    max_showers: int | None = None    # use only the first N training showers
    points_per_shower: int | None = None  # random points per shower in the loss (0: all; None: the teacher's
                                          # points_per_shower_loss)
    moment_matching: float = 0.0      # weight of the layer-moment term on the student's one-step showers (0: off)
    moment_condition: bool = False    # the term also matches each moment's covariance with log E_inc
    seed: int = 0
    device: str = "auto"              # auto, cpu, cuda
    log_every: int = 10               # steps between stats.jsonl records
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                msg = f"distill {name} must be an integer >= 1, got {v!r}"
                raise ValueError(msg)
        if not isinstance(self.n_sigmas, int) or self.n_sigmas < 2:
            msg = f"distill n_sigmas must be an integer >= 2, got {self.n_sigmas!r}"
            raise ValueError(msg)
        if not 0 <= self.mu < 1:
            msg = f"distill mu (target EMA) must be in [0, 1), got {self.mu}"
            raise ValueError(msg)
        if self.clock not in ("wall", "process"):
            msg = f"distill clock must be wall or process, got {self.clock!r}"
            raise ValueError(msg)
        if not self.moment_matching >= 0:
            msg = f"distill moment_matching must be >= 0, got {self.moment_matching}"
            raise ValueError(msg)
        if self.time_limit is not None and self.time_limit <= 0:
            msg = f"distill time_limit must be > 0 seconds, got {self.time_limit}"
            raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            msg = f"unknown distillation options {sorted(unknown)}; valid: {', '.join(sorted(known))}"
            raise ValueError(msg)
        return cls(**d)


def _teacher_data(run: Path) -> list[str]:
    """The teacher's training files from its ``training_options.json`` (relative paths: as recorded, else
    next to the run directory)."""
    p = run / "training_options.json"
    data = json.loads(p.read_text()).get("data") if p.exists() else None
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        msg = f"{run}: the training data are not recorded in training_options.json; pass them with --data"
        raise ValueError(msg)
    out = []
    for d in data:
        q = Path(d)
        if not q.exists() and not q.is_absolute() and (run.parent / q).exists():
            q = run.parent / q
        if not q.exists():
            msg = f"{run}: its training file {d} (training_options.json) is not found; pass the data with --data"
            raise ValueError(msg)
        out.append(str(q))
    return out


def distill(run_dir: str | os.PathLike, out: str | os.PathLike, *,
            data: str | os.PathLike | Sequence[str | os.PathLike] | Any = None,
            config: DistillConfig | None = None, overwrite: bool = False) -> dict:
    """Distil the CaloClouds run ``run_dir`` into a consistency model in ``out`` (locked while it runs;
    see :func:`_distill`)."""
    from ..io import check_writable, lock_output

    out = Path(out)
    check_writable(out, folder=True)  # one line naming OUT (not its temporary folder) when it cannot be written
    with lock_output(out, "run directory"):
        return _distill(run_dir, out, data=data, config=config, overwrite=overwrite)


def _distill(run_dir: str | os.PathLike, out: str | os.PathLike, *,
             data: str | os.PathLike | Sequence[str | os.PathLike] | Any = None,
             config: DistillConfig | None = None, overwrite: bool = False) -> dict:
    """Distil the CaloClouds run ``run_dir`` into a consistency model in ``out``.

    Args:
        run_dir: a run directory of ``calopc train caloclouds``.
        out: the student's run directory (must not exist unless ``overwrite``).
        data: training data (Parquet file(s) or a dataset object); defaults to the teacher's
            training files from its ``training_options.json``.
        config: options. Defaults to :class:`DistillConfig()`.
        overwrite: replace an existing ``out``.

    Returns:
        A summary: ``steps``, ``final_loss``, ``seconds``, ``run_dir``.
    """
    import torch

    from . import checkpoint as ckpt
    from .caloclouds import CaloClouds
    from .data import DeviceCollate, ShowerDataset, StreamingShowerDataset, iterate_batches, open_dataset
    from .diffusion import consistency_loss, karras_sigmas
    from .moments import layer_moments, moment_loss, radial_share
    from .utils import resolve_device, seed_everything

    cfg = config or DistillConfig()
    run, out = Path(run_dir), Path(out)
    meta = ckpt.read_config(run)
    if meta.get("model") != "caloclouds":
        msg = f"{run}: holds a {meta.get('model')!r} model; calopc distill needs a caloclouds run"
        raise ValueError(msg)
    if meta.get("config", {}).get("consistency"):
        msg = f"{run}: is already a distilled consistency model; distil its caloclouds teacher instead"
        raise ValueError(msg)
    if not (run / ckpt.EMA_WEIGHTS).exists() and not (run / ckpt.WEIGHTS).exists():
        msg = f"{run}: no teacher weights ({ckpt.EMA_WEIGHTS} or {ckpt.WEIGHTS}); train the run first"
        raise ckpt.CheckpointError(msg)
    if out.resolve() == run.resolve():
        msg = f"--out {out}: is the teacher's run directory; choose another"
        raise ValueError(msg)
    if out.exists() and any(out.iterdir()) and not overwrite:
        msg = f"--out {out}: exists and is not empty; choose another directory or pass --overwrite"
        raise ValueError(msg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    loaded = ckpt.load(run, ema=True, device=device)
    teacher, prep = loaded.model.eval(), loaded.preprocessor
    for p in teacher.parameters():
        p.requires_grad_(False)
    in_memory = isinstance(data, (ShowerDataset, StreamingShowerDataset))
    paths = None if in_memory else ([data] if isinstance(data, (str, os.PathLike)) else data) or _teacher_data(run)
    if paths is not None:
        for p in paths:
            if not Path(p).exists():
                msg = f"--data {p}: no such file"
                raise ValueError(msg)
    dataset = data if in_memory else open_dataset(paths, max_showers=cfg.max_showers)
    if dataset.geometry != loaded.geometry:
        msg = f"--data: geometry {dataset.geometry.name!r} differs from the teacher's {loaded.geometry.name!r}"
        raise ValueError(msg)
    if len(dataset) < cfg.batch_size:
        msg = f"{len(dataset)} training showers are fewer than one batch ({cfg.batch_size})"
        raise ValueError(msg)

    if cfg.points_per_shower is None:   # the teacher's loss thinning (recorded resolved in the options)
        cfg = replace(cfg, points_per_shower=teacher.config.points_per_shower_loss)
    if cfg.moment_matching and prep.dequantisation != "uniform":
        msg = (f"{run}: distill moment_matching reads radii through the logit of the uniform dequantisation; "
               f"the teacher's preprocessing uses dequantisation={prep.dequantisation!r}")
        raise ValueError(msg)
    student = CaloClouds(replace(teacher.config, consistency=True, steps=1)).to(device)
    student.load_state_dict(teacher.state_dict())
    for p in student.shower.parameters():
        p.requires_grad_(False)
    target = CaloClouds(student.config).to(device).eval()
    target.load_state_dict(student.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    from .deeptree import _adam
    from .train import TrainConfig, _Stepper

    opt = _adam(params, lr=cfg.lr)      # fused where torch supports it
    # clip and skip non-finite steps without a host read (as train); the target EMA is one multi-tensor lerp
    stepper = _Stepper({"student": opt}, TrainConfig(grad_clip=cfg.grad_clip), device, 1)
    target_params = list(target.parameters())
    student_params = list(student.parameters())
    # the columns of the radius and the log energy share among the diffused features (α may be left out)
    r_col, e_col = student.point_dims.index(1), student.point_dims.index(2)
    p_mean, p_std = [float(v) for v in prep.point_mean[1:3]], [float(v) for v in prep.point_std[1:3]]
    n_layers = student.config.n_layers

    def moments(y: Any, so: Any, lay: Any, b: int) -> Any:
        u, w = radial_share(y[:, r_col], y[:, e_col], p_mean, p_std)
        return layer_moments(u, w, lay, so, b, n_layers)

    sigmas = karras_sigmas(cfg.n_sigmas, student.config.sigma_min, student.config.sigma_max, student.config.rho,
                           device=device)

    from ..io import OutputError, _host, check_writable, sweep_stale_parts

    check_writable(out, folder=True, expected_bytes=ckpt.checkpoint_bytes(student, target))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_parts(out.parent)  # temporary folders of killed runs (same .NAME.PID@HOST.XXXX.part scheme)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}@{_host()}.", suffix=".part", dir=out.parent))
    data_rec = "<dataset object>" if in_memory else [str(Path(p).resolve()) for p in paths]
    opts = {"teacher": str(run.resolve()), "data": data_rec,
            "distill": asdict(cfg)}
    (tmp / "distill_options.json").write_text(json.dumps(opts, indent=2) + "\n")
    (tmp / "training_options.json").write_text(json.dumps(
        {"model": "caloclouds", "model_config": asdict(student.config), "data": opts["data"],
         "distilled_from": str(run.resolve()), "distill": asdict(cfg)}, indent=2) + "\n")
    step, epoch, last = 0, 0, float("nan")

    def finish() -> None:
        try:
            ckpt.save(tmp, "caloclouds", student, prep, ema=target,
                      train={"distill": asdict(cfg), "teacher": str(run), "steps": step,
                             "incident_energy_range": (meta.get("train") or {}).get("incident_energy_range")})
        except OutputError as err:  # name the output, not its temporary folder
            raise OutputError(str(err).replace(str(tmp), str(out))) from None
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)

    bar = None
    if cfg.progress:
        from ..progress import Progress  # a bar on a terminal, a log line every ~30 s elsewhere

        bar = Progress(total=cfg.steps, unit="step", desc="distill caloclouds", per_unit=(cfg.batch_size, "showers"))
    log = open(tmp / "stats.jsonl", "a")  # noqa: SIM115
    collate = DeviceCollate(prep, device, seed=cfg.seed * 1000 + 17)   # batches built on the device
    clock = time.process_time if cfg.clock == "process" else time.perf_counter
    t0, wall0 = clock(), time.perf_counter()
    try:
        while step < cfg.steps:
            for batch in iterate_batches(dataset, collate, cfg.batch_size, seed=cfg.seed, epoch=epoch):
                batch = batch.to(device)
                x, shower_of, layer = CaloClouds.flatten(batch)
                x = x[:, student.point_dims]            # without the α column when α is free
                b = batch.cond.shape[0]
                if cfg.points_per_shower and x.shape[0] > cfg.points_per_shower:
                    keep = CaloClouds.subsample(shower_of, b, cfg.points_per_shower)
                    x, shower_of, layer = x[keep], shower_of[keep], layer[keep]

                def bind(m: CaloClouds, cond: Any = batch.cond, s: Any = batch.shower, so: Any = shower_of,
                         lay: Any = layer) -> Any:
                    kw = m.net_inputs(cond, s, so, lay)
                    return lambda xx, ss: m.denoiser(xx, ss, **kw)

                index = torch.randint(0, cfg.n_sigmas - 1, (b,), device=device)[shower_of]   # one pair per shower
                per_point = consistency_loss(bind(student), bind(target), bind(teacher), x, sigmas, index)
                loss = torch.zeros(b, dtype=per_point.dtype, device=device).index_add_(0, shower_of, per_point)
                n = torch.zeros(b, dtype=loss.dtype, device=device).index_add_(0, shower_of, torch.ones_like(per_point))
                has = (n > 0).to(loss.dtype)           # mean over the showers with points, no boolean indexing
                loss = (loss / n.clamp(min=1) * has).sum() / has.sum().clamp(min=1)
                mm = None
                if cfg.moment_matching:   # one-step showers from pure noise against the batch, layer by layer
                    s_max = x.new_full((x.shape[0],), student.config.sigma_max)
                    fake = bind(student)(torch.randn_like(x) * s_max[:, None], s_max)
                    with torch.no_grad():
                        real = moments(x, shower_of, layer, b)
                    mm = moment_loss(moments(fake, shower_of, layer, b), real,
                                     batch.cond[:, 0] if cfg.moment_condition else None)
                    loss = loss + cfg.moment_matching * mm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stepper.update("student")
                gn = stepper.grad_norm
                with torch.no_grad():
                    torch._foreach_lerp_(target_params, student_params, 1 - cfg.mu)  # noqa: SLF001
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = float(loss.detach())
                    if bar is not None:
                        bar.set_postfix(loss=last)
                    rec = {"step": step, "epoch": epoch, "loss": last, "grad_norm": float(gn),
                           "seconds": round(time.perf_counter() - wall0, 3)}
                    if mm is not None:
                        rec["moment_matching"] = float(mm.detach())
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if step >= cfg.steps or (cfg.time_limit is not None and clock() - t0 > cfg.time_limit):
                    break
            else:
                epoch += 1
                continue
            break
        if step and step % cfg.log_every:
            last = float(loss.detach())
        log.close()
        finish()
    except KeyboardInterrupt as err:
        log.close()
        if not step:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            finish()  # keep what was distilled so far
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        from ..io import Interrupted

        raise Interrupted(getattr(err, "signum", signal.SIGINT),
                          f"the student of step {step} was written to {out}") from None
    except BaseException:
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return {"steps": step, "epochs": epoch, "final_loss": last, "seconds": time.perf_counter() - wall0,
            "clock_seconds": clock() - t0, "run_dir": str(out)}


def __getattr__(name: str) -> Any:
    if name == "register":  # the command line moved to calopc.cli.models
        import warnings

        warnings.warn("calopc.models.distill.register moved to calopc.cli.models (register adds train, generate "
                      "and distill)", DeprecationWarning, stacklevel=2)
        from ..cli.models import _register_distill

        return _register_distill
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
