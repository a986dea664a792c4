r"""Training loop shared by every registered model.

Single process: ``calopc train MODEL --data train.parquet -o run/``. Several GPUs (or CPU
processes with gloo): ``torchrun --nproc-per-node K $(which calopc) train ...``; the loop reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, gives each rank a disjoint share
of every epoch and averages the gradients. Only rank 0 writes the run directory.

GPU-first: by default (``pipeline="device"``) the showers are uploaded to the device once
per shuffle buffer and batches are built there (:class:`~calopc.models.data.DeviceCollate`);
the loss, the gradient norm and the non-finite checks stay on the device and are read back
only every ``log_every`` steps (and before a checkpoint). ``pipeline="numpy"`` builds batches
on the host as before.

Two kinds of models:

* the default: one AdamW over all parameters minimising ``model.loss(batch)``;
* models with their own step (GANs) define ``configure_optimizers(train_cfg) -> {name: optimizer}``
  and ``training_step(batch, step, backward) -> {"loss": ..., ...}``; ``backward(loss, name)``
  zeroes that optimizer's gradients, back-propagates, averages the gradients over ranks, clips,
  skips the update when the gradients are not finite, steps and applies the learning-rate
  schedule. Every optimizer's state goes into ``training_state.pt``.

Safety: a non-empty run directory needs ``resume`` or ``overwrite``; a non-finite loss stops
training with an error and keeps the last good checkpoint; an interrupt (Ctrl-C, SIGTERM
turned into ``KeyboardInterrupt``) writes a checkpoint and re-raises.
"""

from __future__ import annotations

__all__ = ["RUN_FILES", "TrainConfig", "TrainingDiverged", "train", "train_config", "training_defaults"]

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..io import Interrupted, OutputError, check_writable
from . import checkpoint as ckpt
from .data import DeviceCollate, ShowerCollate, ShowerDataset, StreamingShowerDataset, iterate_batches, open_dataset
from .guards import dataset_energy_range
from .utils import EMA, resolve_device, seed_everything

OPTIMIZERS = ("adamw", "adam", "radam")
SCHEDULES = ("cosine", "constant")
EMA_WARMUPS = ("linear", "power")

#: files of a run directory that ``overwrite`` replaces
RUN_FILES = (ckpt.CONFIG, ckpt.WEIGHTS, ckpt.EMA_WEIGHTS, ckpt.STATE, "training_options.json", "stats.jsonl")


class TrainingDiverged(ValueError):
    """The loss became non-finite; the run directory keeps the last good checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Training options (saved resolved as ``training_options.json``)."""

    steps: int = 2000                 # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32              # showers per step (per process under torchrun)
    lr: float = 1e-3                  # peak learning rate
    weight_decay: float = 0.0
    warmup: int = 100                 # linear warm-up steps, then the schedule
    grad_clip: float = 5.0            # max gradient norm (0: off)
    ema_decay: float = 0.999          # EMA of the weights (0: no EMA)
    optimizer: str = "adamw"          # default path: adamw, adam or radam (GANs choose their own)
    schedule: str = "cosine"          # after warm-up: cosine (to lr/20 at the end of the budget) or constant
    ema_warmup: str = "linear"        # EMA decay early on: linear min(d, (1+s)/(10+s)) or power (1 - (1+s)^-2/3)
    seed: int = 0
    device: str = "auto"              # auto, cpu, cuda
    amp: bool = False                 # bfloat16 autocast on CUDA (ignored on CPU)
    max_showers: int | None = None    # use only the first N training showers
    stream: bool | None = None        # stream the data through a shuffle buffer (None: when > 2 GB in memory)
    buffer_showers: int = 20_000      # showers in the shuffle buffer when streaming
    time_limit: float | None = None   # stop after this many seconds of training (checkpoint first)
    log_every: int = 10               # steps between stats.jsonl records (and device-to-host reads)
    checkpoint_every: int = 500       # steps between checkpoints
    progress: bool = True             # progress bar (on a terminal only)
    pipeline: str = "device"          # device: batches built on the device; numpy: on the host (the older path)
    bucket: bool = False              # batches of showers of similar size, padded to a multiple of 32
    compile: bool = False             # torch.compile the loss (default path)
    fast_splines: str = "auto"        # faster spline knots (calopc.models.flows): auto (CUDA only), on, matmul, off

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            msg = f"unknown training options {sorted(unknown)}; valid: {', '.join(sorted(known))}"
            raise ValueError(msg)
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming the option when a value is out of range."""
        checks = [("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
                  ("log_every", self.log_every >= 1, ">= 1"), ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
                  ("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0, "finite and >= 0"),
                  ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"), ("warmup", self.warmup >= 0, ">= 0"),
                  ("optimizer", self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
                  ("schedule", self.schedule in SCHEDULES, ", ".join(SCHEDULES)),
                  ("ema_warmup", self.ema_warmup in EMA_WARMUPS, ", ".join(EMA_WARMUPS)),
                  ("pipeline", self.pipeline in ("device", "numpy"), "device or numpy"),
                  ("fast_splines", self.fast_splines in ("auto", "on", "matmul", "off"), "auto, on, matmul or off"),
                  ("time_limit", self.time_limit is None or (math.isfinite(self.time_limit) and self.time_limit > 0),
                   "a number of seconds > 0"),
                  ("max_showers", self.max_showers is None or self.max_showers >= 1, ">= 1"),
                  ("buffer_showers", self.buffer_showers >= 1, ">= 1")]
        for name, ok, want in checks:
            if not ok:
                msg = f"training option {name}={getattr(self, name)!r}: expected {want}"
                raise ValueError(msg)


def _lr_factor(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Learning-rate factor at ``step`` after ``elapsed`` seconds of training.

    The schedule runs over the budget that ends the run: with a ``time_limit`` the progress
    is the larger of the step fraction and the time fraction, so a run stopped by the clock
    has decayed its learning rate when it stops.
    """
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit is not None and cfg.time_limit > 0:
        t = max(t, elapsed / cfg.time_limit)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def training_defaults(model_name: str) -> dict[str, Any]:
    """The training options a model family trains with unless told otherwise (its config class's
    ``TRAINING_DEFAULTS``; empty for families that use :class:`TrainConfig`'s defaults)."""
    from . import get_model

    _, cfg_cls = get_model(model_name)
    return dict(getattr(cfg_cls, "TRAINING_DEFAULTS", {}))


def train_config(model_name: str, **overrides: Any) -> TrainConfig:
    """:class:`TrainConfig` for a model family: its :func:`training_defaults`, then ``overrides``."""
    return TrainConfig.from_dict({**training_defaults(model_name), **overrides})


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _data_paths(data: Any) -> list[Path]:
    if isinstance(data, (str, os.PathLike)):
        return [Path(data)]
    if isinstance(data, (ShowerDataset, StreamingShowerDataset)):
        return []
    return [Path(p) for p in data]


def _check_run_dir(out: Path, paths: list[Path], *, resume: bool, overwrite: bool) -> None:
    """Refuse an output that is an input, and a non-empty run directory without resume/overwrite."""
    for p in paths:
        if p.exists() and p.resolve() == out.resolve():
            msg = f"-o {out}: is also the training input {p}; choose another run directory"
            raise ValueError(msg)
    if out.exists() and not out.is_dir():
        msg = f"-o {out}: is a file; the run directory must be a directory"
        raise ValueError(msg)
    if resume and overwrite:
        msg = "--resume and --overwrite exclude each other"
        raise ValueError(msg)
    if out.is_dir() and any(out.iterdir()) and not resume and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        msg = (f"-o {out}: the run directory is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
               "continue it with --resume or replace it with --overwrite")
        raise ValueError(msg)


def _fast_splines(model: torch.nn.Module, mode: str, device: torch.device) -> int:
    from .flows import use_fast_splines

    on = mode in ("on", "matmul") or (mode == "auto" and device.type == "cuda")
    return use_fast_splines(model, on, method="matmul" if mode == "matmul" else "transpose")


class _Stepper:
    """Optimizer updates without host-device syncs: clip, non-finite skip, step, lr schedule."""

    def __init__(self, opts: dict[str, torch.optim.Optimizer], cfg: TrainConfig, device: torch.device,
                 world: int) -> None:
        self.opts = opts
        self.cfg = cfg
        self.device = device
        self.world = world
        self.params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in opts.items()}
        for o in opts.values():
            for g in o.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.grad_norm = torch.zeros((), device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        # on CPU a read-back costs nothing: skip exactly; on CUDA zero the gradients instead of syncing
        self.exact_skip = device.type != "cuda"

    def set_lr(self, step: int, elapsed: float = 0.0) -> None:
        f = _lr_factor(step, self.cfg, elapsed)
        for o in self.opts.values():
            for g in o.param_groups:
                g["lr"] = g["initial_lr"] * f

    def update(self, name: str) -> None:
        """After ``loss.backward()``: average over ranks, clip, step unless the gradients are not finite."""
        params = [p for p in self.params[name] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            chunks = torch.split(flat, [g.numel() for g in grads])
            torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads)])  # noqa: SLF001
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        finite = torch.isfinite(gn)
        self.grad_norm = gn.detach()
        self.skipped = self.skipped + (~finite).to(torch.int64)
        opt = self.opts[name]
        if getattr(opt, "_step_supports_amp_scaling", False):
            # fused optimizers skip the update on the device when found_inf is set: no sync
            opt.found_inf = (~finite).to(torch.float32)
            opt.step()
            return
        if self.exact_skip:
            if bool(finite):
                opt.step()
            return
        # no sync: non-finite gradients become zeros (the step then only decays the optimizer's moments)
        # one flat copy instead of a Python loop of one nan_to_num_ per gradient
        flat = torch.cat([g.reshape(-1) for g in grads]).nan_to_num_(0.0, 0.0, 0.0)
        flat *= finite.to(flat.dtype)
        torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)])  # noqa: SLF001
        opt.step()


class _TrainStep:
    """The body of :func:`train`'s loop, shared with the operator counter (:func:`calopc.models.opcount.training_step`).

    :meth:`advance` runs one step: learning rate, forward, backward, gradient average over ranks,
    clip, non-finite skip, optimizer step(s), EMA and the running sums on the device; every
    ``log_every`` steps (and at the last step) it reads everything the record needs back to the host
    in one transfer and returns the record. Nothing else is read back.

    Args:
        model: the model (unwrapped); ``loss_fn``: what computes its loss (the DDP wrapper or the
            compiled model; default ``model``).
        opts: the optimizers by name (:func:`_optimizers`).
        cfg: the training options; ``device``: where the model lives; ``world``: processes.
        ema: the weights' moving average, or None.
        cuda_path: take CUDA's sync-free path for non-finite gradients on any device
            (default: on CUDA only; on the CPU a non-finite step is skipped exactly).
    """

    def __init__(self, model: torch.nn.Module, opts: dict[str, torch.optim.Optimizer], cfg: TrainConfig,
                 device: torch.device, *, loss_fn: Callable | None = None, world: int = 1, ema: EMA | None = None,
                 cuda_path: bool | None = None) -> None:
        self.model, self.opts, self.cfg, self.device, self.ema = model, opts, cfg, device, ema
        self.loss_fn = model if loss_fn is None else loss_fn
        self.custom = _has_own_step(model)
        self.stepper = _Stepper(opts, cfg, device, world if self.custom else 1)
        if cuda_path is not None:
            self.stepper.exact_skip = not cuda_path
        self.amp = cfg.amp and device.type == "cuda"
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.extra_sums: dict[str, torch.Tensor] = {}
        self.n_sum = 0

    def backward(self, loss: torch.Tensor, opt_name: str) -> None:
        """Zero the gradients of optimizer ``opt_name``, back-propagate ``loss``, then update (the custom-step
        contract)."""
        if opt_name not in self.opts:
            msg = f"backward(loss, {opt_name!r}): no such optimizer; configure_optimizers returned {sorted(self.opts)}"
            raise KeyError(msg)
        self.opts[opt_name].zero_grad(set_to_none=True)
        loss.backward()
        self.stepper.update(opt_name)

    def advance(self, batch: Any, step: int, epoch: int, elapsed: float) -> dict | None:
        """Train on ``batch`` as step ``step + 1``; the record when that step is a logged one (else None).

        ``elapsed``: seconds of training so far (the schedule of a time-limited run). The record
        holds ``nonfinite`` (a non-finite loss was seen) besides what ``stats.jsonl`` gets.
        """
        self.stepper.set_lr(step, elapsed)
        batch = batch.to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        if self.custom:
            with ctx:
                terms = self.model.training_step(batch, step, self.backward)
            loss = terms["loss"].detach()
            for k, v in terms.items():
                if k != "loss":
                    self.extra_sums[k] = self.extra_sums.get(k, 0) + v.detach().double()
        else:
            with ctx:
                loss = self.loss_fn(batch)
            self.backward(loss, "model")
            loss = loss.detach()
        if self.ema is not None:
            self.ema.update(self.model, step)
        self.bad |= ~torch.isfinite(loss)
        self.loss_sum += loss.double()
        self.n_sum += 1
        step += 1
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            return self.record(step, epoch, elapsed)
        return None

    def record(self, step: int, epoch: int, elapsed: float) -> dict:
        """The statistics since the last record, read back in one transfer; the sums restart."""
        names = sorted(self.extra_sums)
        vals = torch.stack([self.bad.double(), self.loss_sum, self.stepper.grad_norm.double(),
                            self.stepper.skipped.double(), *(self.extra_sums[k] for k in names)]).tolist()
        n = max(self.n_sum, 1)
        rec = {"step": step, "epoch": epoch, "loss": vals[1] / n, "grad_norm": vals[2],
               "lr": next(iter(self.opts.values())).param_groups[0]["lr"], "skipped_steps": int(vals[3]),
               "seconds": round(elapsed, 3), **{k: v / n for k, v in zip(names, vals[4:])}, "nonfinite": bool(vals[0])}
        self.loss_sum.zero_()
        self.n_sum = 0
        self.extra_sums = {}
        return rec

    def nonfinite(self) -> bool:
        """Whether a non-finite loss was seen in any step so far (one read-back)."""
        return bool(self.bad)


def _has_own_step(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains through its own ``training_step`` and ``configure_optimizers`` (GANs)."""
    return callable(getattr(model, "training_step", None)) and callable(getattr(model, "configure_optimizers", None))


def _optimizers(model: torch.nn.Module, cfg: TrainConfig, name: str = "") -> dict[str, torch.optim.Optimizer]:
    """The optimizers of ``model`` by name: its ``configure_optimizers`` or ``{"model": cfg.optimizer}``."""
    if not _has_own_step(model):
        return {"model": _optimizer(model, cfg)}
    opts = dict(model.configure_optimizers(cfg))
    if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts.values()):
        msg = (f"{name or type(model).__name__}.configure_optimizers must return a non-empty dict of torch "
               f"optimizers, got {opts!r}")
        raise TypeError(msg)
    return opts


def _fast_matmul_on_cuda(fn: Callable) -> Callable:
    """Run ``train`` with TF32 matmuls when it trains on CUDA (scoped: the caller's settings come back)."""
    import functools

    @functools.wraps(fn)
    def wrapper(model_name: str, data: Any, out: Any, *, config: TrainConfig | None = None, **kw: Any) -> dict:
        from .precision import fast_matmul

        dev = resolve_device((config or train_config(model_name)).device)
        with fast_matmul(dev):
            return fn(model_name, data, out, config=config, **kw)

    return wrapper


def rank_seed(seed: int, rank: int) -> int:
    """The seed of the model's random draws (noise levels, latents, GAN noise) on DDP rank ``rank``."""
    return seed + 1000 * rank


@_fast_matmul_on_cuda
def train(model_name: str, data: str | os.PathLike | Sequence[str | os.PathLike] | ShowerDataset | StreamingShowerDataset,
          out: str | os.PathLike, *,
          model_config: dict[str, Any] | None = None, config: TrainConfig | None = None,
          resume: bool = False, overwrite: bool = False) -> dict:
    """Train a registered model and write a run directory (locked for the run: see :func:`_train`)."""
    from ..io import lock_output

    rank = _dist_env()[0]
    out = Path(out)
    kw = {"model_config": model_config, "config": config, "resume": resume, "overwrite": overwrite}
    cfg = config or train_config(model_name)
    if resume and (out / ckpt.STATE).exists():  # every rank decides alike (no rank waits for another)
        done = int(ckpt.load_training_state(out)["step"])
        if done >= cfg.steps:  # nothing to do: say so instead of a "final loss nan"
            return {"steps": done, "epochs": None, "final_loss": None, "seconds": 0.0, "run_dir": str(out),
                    "world_size": _dist_env()[1], "skipped_steps": 0, "nothing_to_do": True}
    if rank != 0:
        return _train(model_name, data, out, **kw)
    with lock_output(out, "run directory"):  # a second writer of the same run directory fails at once
        existed = out.is_dir()
        before = set(out.iterdir()) if existed else set()
        try:
            return _train(model_name, data, out, **kw)
        except BaseException:
            if not resume and not (out / ckpt.STATE).exists():
                # a fresh run that wrote no checkpoint: leave no half run directory behind (it would block a re-run)
                for p in (set(out.iterdir()) if out.is_dir() else set()) - before:
                    if not p.is_dir():
                        p.unlink(missing_ok=True)
                if not existed:
                    with contextlib.suppress(OSError):
                        out.rmdir()
            raise


def _train(model_name: str, data: str | os.PathLike | Sequence[str | os.PathLike] | ShowerDataset | StreamingShowerDataset,
           out: str | os.PathLike, *,
           model_config: dict[str, Any] | None = None, config: TrainConfig | None = None,
           resume: bool = False, overwrite: bool = False) -> dict:
    """Train a registered model and write a run directory.

    Args:
        model_name: a name from :data:`calopc.models.MODELS`.
        data: point-cloud Parquet file(s) (``calopc convert``), or a :class:`ShowerDataset` /
            :class:`StreamingShowerDataset`.
        out: run directory. Must be empty or absent unless ``resume`` or ``overwrite``.
        model_config: overrides of the model's config dataclass.
        config: training options. Defaults to the family's (:func:`train_config`).
        resume: continue from ``out/training_state.pt`` (model config and preprocessing
            come from ``out/config.json``).
        overwrite: start afresh in a non-empty run directory (its run files are replaced).

    Returns:
        A summary: ``steps``, ``final_loss``, ``seconds``, ``run_dir``, ``skipped_steps``.

    Raises:
        TrainingDiverged: the loss became non-finite (the last good checkpoint is kept).
    """
    from . import get_model

    cfg = config or train_config(model_name)
    cfg.validate()
    rank, world, local_rank = _dist_env()
    distributed = world > 1
    out = Path(out)
    if rank == 0:
        _check_run_dir(out, _data_paths(data), resume=resume, overwrite=overwrite)
    device = resolve_device(cfg.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        own_group = not dist.is_initialized()
        if own_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(cfg.seed)
    in_memory = isinstance(data, (ShowerDataset, StreamingShowerDataset))
    dataset = data if in_memory else open_dataset(data, stream=cfg.stream, buffer_showers=cfg.buffer_showers,
                                                 max_showers=cfg.max_showers)
    if len(dataset) < cfg.batch_size * world:
        msg = f"{len(dataset)} training showers are fewer than one batch ({cfg.batch_size} x {world} processes)"
        raise ValueError(msg)

    state = ckpt.load_training_state(out) if resume else None
    if resume and state is None:
        msg = f"--resume: {out} has no {ckpt.STATE}; start without --resume"
        raise ValueError(msg)
    if state is not None:
        loaded = ckpt.load(out, ema=False)
        if get_model(loaded.name) != get_model(model_name):
            msg = f"--resume: {out} holds a {loaded.name!r} model, not {model_name!r}"
            raise ValueError(msg)
        model, prep = loaded.model.train(), loaded.preprocessor
        if loaded.geometry != dataset.geometry:
            msg = f"--resume: the data geometry {dataset.geometry.name!r} differs from the run's {loaded.geometry.name!r}"
            raise ValueError(msg)
    else:
        model_cls, cfg_cls = get_model(model_name)
        model_cfg = cfg_cls.from_dict(model_config or {})
        prep = dataset.fit_preprocessor(seed=cfg.seed, **model_cfg.preprocessing())
        model = model_cls(model_cfg.with_data(prep))
    model.to(device)
    _fast_splines(model, cfg.fast_splines, device)
    if distributed:  # the model was built under the common seed; each rank then draws its own model noise
        seed_everything(rank_seed(cfg.seed, rank))
    ema = _ema(model, cfg)
    if state is not None and ema is not None and (out / ckpt.EMA_WEIGHTS).exists():
        ema.module.load_state_dict(ckpt.load(out, ema=True).model.state_dict())
    if ema is not None:
        ema.module.to(device)
    custom = _has_own_step(model)
    net: Any = model
    if distributed and not custom:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opts = _optimizers(model, cfg, model_name)
    step, epoch = 0, 0
    if state is not None:
        _load_optimizers(out, opts, state)
        step, epoch = int(state["step"]), int(state["epoch"])
    name = model_name.lower()
    # the training range of the incident energies: generation warns outside it (calopc.models.guards)
    train_meta = {**asdict(cfg), "incident_energy_range": dataset_energy_range(dataset)}
    loss_fn: Callable = net
    if cfg.compile and not custom:
        loss_fn = torch.compile(net, dynamic=True)  # the number of points changes every batch
    elif cfg.compile:
        msg = (f"--compile: the {name} model trains through its own training_step (several optimizers), which "
               "calopc does not compile; train without --compile")
        raise ValueError(msg)

    good = {"step": step if state is not None else None}

    def checkpoint() -> None:
        if rank == 0:
            try:  # every file to a temporary first: a full disk leaves the previous checkpoint whole
                ckpt.save_run(out, name, model, prep, ema=ema.module if ema else None, train=train_meta,
                              optimizers=opts, step=step, epoch=epoch)
            except OutputError as err:
                kept = (f"the last good checkpoint (step {good['step']}) is kept in {out}" if good["step"] is not None
                        else "no checkpoint was written")
                raise OutputError(f"checkpoint of step {step}: {err}; {kept}") from None
            good["step"] = step

    if rank == 0:  # room for the first checkpoint (weights, EMA, optimizer state), before any training
        check_writable(out, folder=True, expected_bytes=ckpt.checkpoint_bytes(model, ema.module if ema else None))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = f"-o {out}: cannot create the run directory ({err.strerror or err})"
            raise ValueError(msg) from None
        if overwrite and state is None:
            for f in RUN_FILES:
                (out / f).unlink(missing_ok=True)
        if state is not None:  # records after the checkpoint are written again by this run
            _trim_stats(out / "stats.jsonl", step)
        from ..io import atomic_output

        with atomic_output(out / "training_options.json") as tmp:
            tmp.write_text(json.dumps({"model": name, "model_config": asdict(model.config), "train": train_meta,
                                       "data": "<dataset object>" if in_memory else [str(p) for p in _data_paths(data)],
                                       "streamed": isinstance(dataset, StreamingShowerDataset),
                                       "custom_training_step": custom, "world_size": world}, indent=2) + "\n")
    log = open(out / "stats.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    bar = None
    if cfg.progress and rank == 0:
        from ..progress import Progress  # a bar on a terminal, a log line every ~30 s elsewhere

        bar = Progress(total=cfg.steps, initial=step, unit="step", desc=f"train {name}",
                       per_unit=(cfg.batch_size * world, "showers"), time_limit=cfg.time_limit)
    t0 = time.perf_counter()
    last = float("nan")
    if cfg.pipeline == "device":
        collate: ShowerCollate | DeviceCollate = DeviceCollate(prep, device, seed=cfg.seed * 1000 + rank,
                                                               pad_multiple=32 if cfg.bucket else 1)
    else:
        collate = ShowerCollate(prep, seed=cfg.seed * 1000 + rank)
    run = _TrainStep(model, opts, cfg, device, loss_fn=loss_fn, world=world, ema=ema)
    stepper = run.stepper
    since = step

    def check_finite(nonfinite: bool | None = None) -> None:
        """Raise TrainingDiverged when a non-finite loss was seen (``None``: read it back now)."""
        if run.nonfinite() if nonfinite is None else nonfinite:
            where = f"the last good checkpoint (step {good['step']}) is kept in {out}" if good["step"] is not None \
                else f"no checkpoint was written to {out}"
            msg = (f"training stopped: non-finite loss between steps {since + 1} and {step}; {where}. "
                   "Lower the learning rate (--lr), check the data or resume from the checkpoint")
            raise TrainingDiverged(msg)

    try:
        while step < cfg.steps:
            for batch in iterate_batches(dataset, collate, cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank,
                                         world_size=world, bucket=cfg.bucket):
                if step >= cfg.steps:
                    break
                rec = run.advance(batch, step, epoch, time.perf_counter() - t0)
                step += 1
                if bar is not None:
                    bar.update(1)
                if rec is not None:  # every log_every steps: the one read-back of the record
                    check_finite(rec.pop("nonfinite"))
                    last = rec["loss"]
                    if log is not None:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    if bar is not None:
                        bar.set_postfix(loss=last)
                    since = step
                if step % cfg.checkpoint_every == 0:
                    check_finite()
                    checkpoint()
                stop = cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit
                if distributed and (rec is not None or step % cfg.checkpoint_every == 0):
                    # the ranks agree on stopping where they read back anyway (not every step)
                    flag = torch.tensor([float(stop)], device=device)
                    torch.distributed.all_reduce(flag)
                    stop = bool(flag.item())
                elif distributed:
                    stop = False
                if stop:
                    break
            else:
                epoch += 1
                continue
            if cfg.time_limit is not None and step < cfg.steps:
                break
        check_finite()
        if run.n_sum:
            last = run.record(step, epoch, time.perf_counter() - t0)["loss"]
        checkpoint()
    except KeyboardInterrupt as err:
        if rank == 0 and not run.nonfinite() and step > (good["step"] or 0):
            checkpoint()
        # one line from the command line: what the run directory holds now
        detail = "" if good["step"] is None else \
            f"{out} holds the checkpoint of step {good['step']} (continue with --resume)"
        raise Interrupted(getattr(err, "signum", signal.SIGINT), detail) from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if distributed:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()
            if own_group:
                torch.distributed.destroy_process_group()
    return {"steps": step, "epochs": epoch, "final_loss": last, "seconds": time.perf_counter() - t0,
            "run_dir": str(out), "world_size": world, "skipped_steps": int(stepper.skipped)}


def _trim_stats(path: Path, step: int) -> None:
    """Drop from ``stats.jsonl`` the records of steps after ``step`` (the checkpoint a resumed run starts
    from: a crash or a full disk stopped the run after writing them) and lines a crash cut short; the
    file is replaced atomically, and left alone when there is nothing to drop."""
    if not path.exists():
        return
    from ..io import atomic_output

    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep == lines:
        return
    with atomic_output(path) as tmp:
        tmp.write_text("".join(keep))


def _ema(model: torch.nn.Module, cfg: TrainConfig) -> EMA | None:
    """The moving average of the weights that ``cfg`` asks for (None: ``ema_decay`` 0)."""
    return EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of the default path: ``cfg.optimizer`` over all parameters. None of them reads a
    value back to the host in its step: AdamW and Adam fused where torch supports it (:func:`_adamw`),
    RAdam with host-side step counts (:class:`calopc.models.optim.RAdam`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "radam":
        from .optim import RAdam

        return RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _adamw(model, cfg, torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)


def _adamw(model: torch.nn.Module, cfg: TrainConfig, cls: type = torch.optim.AdamW) -> torch.optim.Optimizer:
    """AdamW (or Adam: ``cls``) over all parameters: fused (one kernel per step, skips non-finite steps on
    the device) where torch supports it for the parameters, else the multi-tensor (foreach) implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params):
        with contextlib.suppress(RuntimeError, ValueError):
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def _load_optimizers(out: Path, opts: dict[str, torch.optim.Optimizer], state: dict) -> None:
    """Optimizer states from a training state (``optimizers`` by name; older files: one ``optimizer``)."""
    saved = state.get("optimizers")
    if saved is None:
        saved = {next(iter(opts)): state["optimizer"]} if "optimizer" in state and len(opts) == 1 else {}
    if set(saved) != set(opts):
        msg = (f"--resume: {out / ckpt.STATE} holds optimizers {sorted(saved)}, the model has {sorted(opts)}; "
               "expected the same names")
        raise ckpt.CheckpointError(msg)
    for k, o in opts.items():
        try:
            o.load_state_dict(saved[k])
        except (ValueError, KeyError) as err:
            msg = f"--resume: {out / ckpt.STATE}: optimizer {k!r} does not match the model ({err})"
            raise ckpt.CheckpointError(msg) from None
        for g in o.param_groups:
            g.setdefault("initial_lr", g["lr"])
