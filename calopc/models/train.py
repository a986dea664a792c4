r"""Training loop shared by every registered model.

Single process: ``calopc train MODEL --data train.parquet --out run/``. Several GPUs (or CPU
processes with gloo): ``torchrun --nproc-per-node K $(which calopc) train ...``; the loop reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, wraps the model in
DistributedDataParallel and gives each rank a disjoint share of every epoch. Only rank 0
writes the run directory.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train"]

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .data import ShowerCollate, ShowerDataset, StreamingShowerDataset, iterate_batches, open_dataset
from .utils import EMA, resolve_device, seed_everything


@dataclass(frozen=True)
class TrainConfig:
    """Training options (saved resolved as ``training_options.json``)."""

    steps: int = 2000                 # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32              # showers per step (per process under torchrun)
    lr: float = 1e-3                  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    warmup: int = 100                 # linear warm-up steps, then cosine decay to lr/20
    grad_clip: float = 5.0            # max gradient norm (0: off)
    ema_decay: float = 0.999          # EMA of the weights (0: no EMA)
    seed: int = 0
    device: str = "auto"              # auto, cpu, cuda
    amp: bool = False                 # bfloat16 autocast on CUDA (ignored on CPU)
    max_showers: int | None = None    # use only the first N training showers
    stream: bool | None = None        # stream the data through a shuffle buffer (None: when > 2 GB in memory)
    buffer_showers: int = 20_000      # showers in the shuffle buffer when streaming
    time_limit: float | None = None   # stop after this many seconds of training (checkpoint first)
    log_every: int = 10               # steps between stats.jsonl records
    checkpoint_every: int = 500       # steps between checkpoints
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            msg = f"unknown training options {sorted(unknown)}; valid: {', '.join(sorted(known))}"
            raise ValueError(msg)
        return cls(**d)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def train(model_name: str, data: str | os.PathLike | Sequence[str | os.PathLike] | ShowerDataset | StreamingShowerDataset,
          out: str | os.PathLike, *,
          model_config: dict[str, Any] | None = None, config: TrainConfig | None = None,
          resume: bool = False) -> dict:
    """Train a registered model and write a run directory.

    Args:
        model_name: a name from :data:`calopc.models.MODELS`.
        data: point-cloud Parquet file(s) (``calopc convert``), or a :class:`ShowerDataset` /
            :class:`StreamingShowerDataset`.
        out: run directory.
        model_config: overrides of the model's config dataclass.
        config: training options. Defaults to :class:`TrainConfig()`.
        resume: continue from ``out/training_state.pt`` (model config and preprocessing
            come from ``out/config.json``).

    Returns:
        A summary: ``steps``, ``final_loss``, ``seconds``, ``run_dir``.
    """
    from . import get_model

    cfg = config or TrainConfig()
    rank, world, local_rank = _dist_env()
    distributed = world > 1
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
    out = Path(out)
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
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if state is not None and ema is not None and (out / ckpt.EMA_WEIGHTS).exists():
        ema.module.load_state_dict(ckpt.load(out, ema=True).model.state_dict())
    if ema is not None:
        ema.module.to(device)
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, epoch = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, epoch = int(state["step"]), int(state["epoch"])
    name = model_name.lower()
    train_meta = asdict(cfg)

    def checkpoint() -> None:
        if rank == 0:
            ckpt.save(out, name, model, prep, ema=ema.module if ema else None, train=train_meta)
            ckpt.save_training_state(out, opt, step, epoch)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with __import__("calopc.io", fromlist=["atomic_output"]).atomic_output(out / "training_options.json") as tmp:
            tmp.write_text(json.dumps({"model": name, "model_config": asdict(model.config), "train": train_meta,
                                       "data": "<dataset object>" if in_memory else [str(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else data)],
                                       "streamed": isinstance(dataset, StreamingShowerDataset),
                                       "world_size": world}, indent=2) + "\n")
    log = open(out / "stats.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc=f"train {name}")
    amp = cfg.amp and device.type == "cuda"
    t0 = time.perf_counter()
    last = float("nan")
    collate = ShowerCollate(prep, seed=cfg.seed * 1000 + rank)
    try:
        while step < cfg.steps:
            for batch in iterate_batches(dataset, collate, cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank,
                                         world_size=world):
                if step >= cfg.steps:
                    break
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * _lr_factor(step, cfg)
                batch = batch.to(device)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
                with ctx:
                    loss = net(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if torch.isfinite(gn):
                    opt.step()
                if ema is not None:
                    ema.update(model, step)
                step += 1
                last = float(loss.detach())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last:.4f}")
                if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                    log.write(json.dumps({"step": step, "epoch": epoch, "loss": last, "grad_norm": float(gn),
                                          "lr": opt.param_groups[0]["lr"],
                                          "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
                    log.flush()
                if step % cfg.checkpoint_every == 0:
                    checkpoint()
                stop = cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit
                if distributed:
                    flag = torch.tensor([float(stop)], device=device)
                    torch.distributed.all_reduce(flag)
                    stop = bool(flag.item())
                if stop:
                    break
            else:
                epoch += 1
                continue
            if cfg.time_limit is not None and step < cfg.steps:
                break
        checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if distributed:
            torch.distributed.barrier()
            if own_group:
                torch.distributed.destroy_process_group()
    return {"steps": step, "epochs": epoch, "final_loss": last, "seconds": time.perf_counter() - t0,
            "run_dir": str(out), "world_size": world}
