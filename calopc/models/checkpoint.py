r"""Checkpoints as directories: ``config.json`` + ``model.safetensors`` (+ EMA, optimizer state).

Layout of a run directory::

    config.json            {"model", "config", "geometry", "preprocessing", "train", "calopc_version"}
    model.safetensors      state_dict of the unwrapped module
    model_ema.safetensors  EMA weights (used by default for generation)
    training_state.pt      optimizer states (by name) + step, for --resume (loads with weights_only=True)
    training_options.json  the resolved training options
    stats.jsonl            one JSON record per logged step

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "LoadedModel", "checkpoint_bytes", "load", "load_training_state", "read_config", "save",
           "save_run", "save_training_state"]

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..geometry import Geometry
from ..io import atomic_output
from .preprocess import Preprocessor

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
STATE = "training_state.pt"


class CheckpointError(ValueError):
    """A run directory is missing files or does not match the model."""


@dataclass
class LoadedModel:
    """What :func:`load` returns."""

    name: str
    model: nn.Module
    preprocessor: Preprocessor
    geometry: Geometry
    meta: dict


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save(run_dir: str | os.PathLike, name: str, model: nn.Module, preprocessor: Preprocessor, *,
         ema: nn.Module | None = None, train: dict | None = None) -> Path:
    """Write ``config.json`` and the weights of ``model`` (and ``ema``) into ``run_dir``."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "module", model).config
    meta = {"model": name, "config": asdict(cfg), "geometry": preprocessor.geometry.to_dict(),
            "preprocessing": preprocessor.to_dict(), "train": train or {}, "calopc_version": __version__}
    with atomic_output(run / WEIGHTS) as tmp:
        save_file(_state(model), str(tmp), metadata={"model": name})
    if ema is not None:
        with atomic_output(run / EMA_WEIGHTS) as tmp:
            save_file(_state(ema), str(tmp), metadata={"model": name, "ema": "1"})
    with atomic_output(run / CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return run


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def checkpoint_bytes(model: nn.Module, ema: nn.Module | None = None) -> int:
    """A rough size of one checkpoint: weights, EMA weights and two optimizer moments per parameter."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int((params + buffers) * (2 if ema is None else 3) + params * 2 + 64_000)


def save_run(run_dir: str | os.PathLike, name: str, model: nn.Module, preprocessor: Preprocessor, *,
             ema: nn.Module | None = None, train: dict | None = None,
             optimizers: dict[str, torch.optim.Optimizer] | None = None, step: int = 0, epoch: int = 0) -> Path:
    """A whole checkpoint (what :func:`save` and :func:`save_training_state` write) as one transaction.

    Every file is written to a temporary first (with a free-space check of its size); only when
    all are complete are they renamed. A full disk or another write error therefore leaves the
    previous checkpoint whole and raises one :class:`~calopc.io.OutputError` naming the file.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "module", model).config
    meta = {"model": name, "config": asdict(cfg), "geometry": preprocessor.geometry.to_dict(),
            "preprocessing": preprocessor.to_dict(), "train": train or {}, "calopc_version": __version__}
    weights = _state(model)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(run / WEIGHTS, expected_bytes=_nbytes(weights)))
        save_file(weights, str(tmp), metadata={"model": name})
        if ema is not None:
            ema_w = _state(ema)
            tmp = stack.enter_context(atomic_output(run / EMA_WEIGHTS, expected_bytes=_nbytes(ema_w)))
            save_file(ema_w, str(tmp), metadata={"model": name, "ema": "1"})
        if optimizers is not None:
            states = {k: o.state_dict() for k, o in optimizers.items()}
            state = {"optimizers": states, "optimizer": next(iter(states.values())), "step": int(step),
                     "epoch": int(epoch)}
            tmp = stack.enter_context(atomic_output(run / STATE))
            torch.save(state, tmp)
        tmp = stack.enter_context(atomic_output(run / CONFIG))
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return run


def read_config(run_dir: str | os.PathLike) -> dict:
    """``run_dir/config.json`` as a dict; one-line :class:`CheckpointError` when missing or corrupt."""
    p = Path(run_dir) / CONFIG
    if not p.exists():
        msg = f"{run_dir}: not a run directory (no {CONFIG}); train one with 'calopc train'"
        raise CheckpointError(msg)
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{p}: not valid JSON ({err}); expected the run configuration written by 'calopc train'"
        raise CheckpointError(msg) from None
    need = ("model", "config", "geometry", "preprocessing")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        msg = f"{p}: expected a run configuration with keys {', '.join(need)}; found {found}"
        raise CheckpointError(msg)
    return meta


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        msg = f"{path}: not a readable safetensors file ({type(err).__name__}: {str(err)[:120]}); expected the weights " \
              "written by 'calopc train'"
        raise CheckpointError(msg) from None


def load(run_dir: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from a run directory.

    Args:
        run_dir: directory written by :func:`save` / ``calopc train``.
        ema: use the EMA weights when present. Defaults to True.
        device: where to put the model.

    Raises:
        CheckpointError: a file is missing, corrupt or does not match the model (one line naming the file).
    """
    from . import get_model

    run = Path(run_dir)
    meta = read_config(run)
    model_cls, cfg_cls = get_model(meta["model"])
    try:
        cfg = cfg_cls.from_dict(meta["config"])
        geometry = Geometry.from_dict(meta["geometry"])
        prep = Preprocessor.from_dict(meta["preprocessing"], geometry)
        model = model_cls(cfg)
    except (TypeError, ValueError, KeyError) as err:
        msg = f"{run / CONFIG}: the {meta['model']} configuration does not load ({err})"
        raise CheckpointError(msg) from None
    path = run / (EMA_WEIGHTS if ema and (run / EMA_WEIGHTS).exists() else WEIGHTS)
    if not path.exists():
        msg = f"{run}: no weights file {path.name}"
        raise CheckpointError(msg)
    try:
        missing, unexpected = model.load_state_dict(_load_weights(path), strict=False)
    except RuntimeError as err:
        msg = f"{path}: weights do not match the {meta['model']} config ({str(err).splitlines()[0][:200]})"
        raise CheckpointError(msg) from None
    if missing or unexpected:
        msg = f"{path}: weights do not match the {meta['model']} config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        raise CheckpointError(msg)
    return LoadedModel(meta["model"], model.to(device).eval(), prep, geometry, meta)


def save_training_state(run_dir: str | os.PathLike,
                        optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer], step: int, epoch: int,
                        extra: dict[str, Any] | None = None) -> None:
    """Optimizer states (by name) and counters (plain tensors/numbers: loadable with ``weights_only=True``).

    ``optimizer``: one optimizer, or ``{name: optimizer}`` (models with their own training step).
    The first one is also stored as ``optimizer`` for older readers.
    """
    opts = optimizer if isinstance(optimizer, dict) else {"model": optimizer}
    states = {k: o.state_dict() for k, o in opts.items()}
    state = {"optimizers": states, "optimizer": next(iter(states.values())), "step": int(step), "epoch": int(epoch),
             **(extra or {})}
    with atomic_output(Path(run_dir) / STATE) as tmp:
        torch.save(state, tmp)


def load_training_state(run_dir: str | os.PathLike) -> dict | None:
    """``run_dir/training_state.pt``, or None when absent; one-line :class:`CheckpointError` when corrupt."""
    p = Path(run_dir) / STATE
    if not p.exists():
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of many kinds
        msg = (f"{p}: not a readable training state ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}); "
               "expected the optimizer state written by 'calopc train' (start without --resume)")
        raise CheckpointError(msg) from None
    if not isinstance(state, dict) or "step" not in state or not ({"optimizer", "optimizers"} & set(state)):
        msg = f"{p}: expected a training state with 'step' and 'optimizers'; found {type(state).__name__}"
        raise CheckpointError(msg)
    return state
