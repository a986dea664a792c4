r"""``calopc export``: a trained run as one ONNX graph, for Geant4's Par04 or for any framework.

Two targets (:func:`export_model`):

* ``par04``: the model as Par04's ``GetEnergies`` calls it (:mod:`.par04`): one input ``input``
  ``[batch, L + 4]`` float32 (the latent vector, ``E / E_max``, ``(θ/deg) / angle_max``, the geometry
  one-hot), one output ``energies`` ``[batch, 40500]`` float32, the cell energies as fractions of
  ``E`` in Par04's order (r, then φ, then z fastest). Dataset 3's geometry only.
* ``points``: for frameworks that place hits themselves (DD4hep/DDML-style): inputs ``energy``
  ``[batch]`` float32 (MeV) and ``latent`` ``[batch, L]`` float32 ``N(0, 1)`` draws; outputs ``cells``
  ``[batch, N]`` int64 (calopc flat cell index, ``-1`` after the last hit), ``energies`` ``[batch, N]``
  float32 MeV (most energetic first) and ``counts`` ``[batch]`` int64. Any geometry.

The whole sampler is in the graph (:class:`~calopc.export.sampler.ShowerSampler`): shower model,
point model, placement in cells with the run's collision policy, readout threshold. It is
deterministic: all randomness comes from the latent vector (:mod:`.noise`).

The graph is written with torch's ``torch.export``-based ONNX exporter (``dynamo=True``, the default of
torch 2.13), ONNX opset :data:`OPSET` (``BitwiseXor``/``BitwiseAnd`` of the noise, ``ScatterElements`` with
``max``/``min`` reductions of the placement need opset 18), with onnxscript's graph optimiser. torch's
older TorchScript-based exporter (``dynamo=False``) has no translation of ``bitwise_xor`` at opset 18.
Two things of the exporter shape the sampler's code: the number of points comes from one ``nonzero``
(a data-dependent size the exporter carries symbolically), and integer floor division is translated
through float32, so the noise shifts its 32-bit integers with exact float64 products instead. A fully
autoregressive flow (the default shower model, ``shower_passes`` unset: ``2 L`` passes, 90 for dataset 3;
CaloPointFlow's latent flow) is inverted in one ONNX ``Loop`` per transform (:mod:`.flows`), so the graph
and the export time do not grow with its passes; a coupling flow (``shower_passes=2``) keeps zuko's two
passes.
"""

from __future__ import annotations

__all__ = ["OPSET", "TARGETS", "ExportResult", "Par04Graph", "PointsGraph", "build_graph", "export_model",
           "training_counts"]

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TARGETS = ("par04", "points")
#: the ONNX opset of exported graphs
OPSET = 18
#: model families (and variants) with a traceable sampler
_EXPORTABLE = ("caloclouds", "calopointflow")


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and what a user needs to run it."""

    output: str
    target: str
    model: str
    latent_size: int
    inputs: dict
    outputs: dict
    placement: str
    placement_note: str
    notes: list[str] = field(default_factory=list)
    macro: list[str] = field(default_factory=list)
    max_points: int | None = None
    seconds: float = 0.0
    bytes: int = 0
    opset: int = OPSET

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def training_counts(run_dir: str | os.PathLike, meta: dict) -> np.ndarray | None:
    """Points per training shower of a run, read from its training files (``training_options.json``), or None
    when they are not found. Only the list lengths of the ``points`` column are read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run = Path(run_dir)
    p = run / "training_options.json"
    try:
        data = json.loads(p.read_text()).get("data") if p.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, list) or not data:
        return None
    out = []
    for d in data:
        q = Path(d)
        if not q.exists() and not q.is_absolute() and (run.parent / q).exists():
            q = run.parent / q
        files = sorted(q.glob("*.parquet")) if q.is_dir() else [q]
        if not files or not all(f.exists() for f in files):
            return None
        for f in files:
            try:
                with pq.ParquetFile(f) as pf:
                    for batch in pf.iter_batches(columns=["points"], batch_size=65536):
                        out.append(np.asarray(pc.list_value_length(batch.column(0)).fill_null(0)))
            except Exception:  # noqa: BLE001 - a file that does not read: the share is unknown
                return None
    return np.concatenate(out) if out else None


def _check_exportable(loaded: Any, run: str) -> None:
    name = loaded.name
    cfg = loaded.model.config
    if name not in _EXPORTABLE:
        msg = (f"{run}: a {name} run cannot be exported: calopc export has traceable samplers for caloclouds and "
               f"calopointflow (variant II); the {name} generator (a tree grown per shower with torch-geometric "
               "message passing, its leaves cut to the shower model's counts) has none yet")
        raise ValueError(msg)
    if name == "calopointflow" and cfg.variant != "II":
        msg = (f"{run}: a calopointflow variant {cfg.variant} run ({cfg.preset} preset) cannot be exported: it draws "
               "the number of points of a shower on the host (numpy), not per layer; calopc export supports variant II "
               "(the default calopc preset)")
        raise ValueError(msg)
    if name == "caloclouds" and cfg.denoiser != "pointwise":
        msg = (f"{run}: a caloclouds run with the {cfg.denoiser} denoiser cannot be exported: its band attention "
               "tiles the points with data-dependent padding; calopc export supports the pointwise denoiser")
        raise ValueError(msg)


def _check_max_points(max_points: int | None, loaded: Any, run: str, target: str) -> int | None:
    """The cap on points per shower; ValueError (one line) when it would cut training showers."""
    n_max = int(loaded.preprocessor.n_max or 0)
    if max_points is None:
        return n_max or loaded.geometry.n_voxels if target == "points" else None
    if max_points < 1:
        msg = f"--max-points {max_points}: expected a number of points >= 1"
        raise ValueError(msg)
    if n_max and max_points < n_max:
        counts = training_counts(run, loaded.meta)
        if counts is not None and counts.size:
            share = float((counts > max_points).mean())
            msg = (f"--max-points {max_points} would cut showers: {100 * share:.2f}% of the {counts.size} training "
                   f"showers of {run} have more points (up to {int(counts.max())}); use --max-points {n_max} or more")
        else:
            msg = (f"--max-points {max_points} would cut showers: the largest training shower of {run} has {n_max} "
                   "points (its training files, needed for the share, are not found); use --max-points "
                   f"{n_max} or more")
        raise ValueError(msg)
    return max_points


def build_graph(loaded: Any, *, target: str = "par04", collisions: str = "auto", threshold: float | None = None,
                steps: int | None = None, max_points: int | None = None, e_max: float | None = None,
                angle_max: float | None = None, energy_scale: float = 1.0) -> Any:
    """The torch module that is exported (:class:`Par04Graph` or :class:`PointsGraph`), on the CPU, in eval mode."""
    from .par04 import ANGLE_MAX, E_MAX_MEV
    from .sampler import ShowerSampler

    thr = loaded.geometry.threshold if threshold is None else float(threshold)
    sampler = ShowerSampler(loaded, policy=collisions, threshold=thr, steps=steps, max_points=max_points)
    if target == "par04":
        return Par04Graph(sampler, e_max=E_MAX_MEV if e_max is None else e_max,
                          angle_max=ANGLE_MAX if angle_max is None else angle_max, energy_scale=energy_scale).eval()
    return PointsGraph(sampler, max_points=int(max_points or loaded.geometry.n_voxels)).eval()


class Par04Graph(nn.Module):
    """Par04's model: ``[B, L + 4]`` float32 → ``[B, 40500]`` float32 energy fractions in Par04's cell order.

    Args:
        sampler: the run's :class:`~calopc.export.sampler.ShowerSampler`.
        e_max, angle_max: the input scales (Par04's ``fMaxEnergy`` in MeV and ``fMaxAngle`` in degrees).
        energy_scale: factor on the output fractions.
    """

    def __init__(self, sampler: Any, *, e_max: float, angle_max: float, energy_scale: float = 1.0) -> None:
        super().__init__()
        from .par04 import par04_permutation

        self.sampler = sampler
        self.e_max, self.angle_max, self.energy_scale = float(e_max), float(angle_max), float(energy_scale)
        self.register_buffer("perm", torch.as_tensor(par04_permutation(sampler.geometry)), persistent=False)

    @property
    def latent_size(self) -> int:
        return self.sampler.latent_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.sampler.latent_size
        e = x[:, n].to(torch.float64) * self.e_max
        # x[:, n + 1] (the angle) and the geometry one-hot are accepted and not used: the models are
        # conditioned on the energy only
        zs, zx, keys = self.sampler.split_latent(x[:, :n])
        dense = self.sampler(e, zs, zx, keys)
        frac = dense[:, self.perm].to(torch.float64) * (self.energy_scale / e)[:, None]
        return frac.to(torch.float32)


class PointsGraph(nn.Module):
    """``energy [B]`` MeV, ``latent [B, L]`` → ``cells [B, N]``, ``energies [B, N]`` (MeV), ``counts [B]``.

    The ``N`` most energetic cells of every shower (``N = max_points``), ``-1`` / 0 after the last hit.
    """

    def __init__(self, sampler: Any, *, max_points: int) -> None:
        super().__init__()
        self.sampler = sampler
        self.max_points = int(min(max_points, sampler.geometry.n_voxels))

    @property
    def latent_size(self) -> int:
        return self.sampler.latent_size

    def forward(self, energy: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zs, zx, keys = self.sampler.split_latent(latent)
        dense = self.sampler(energy.to(torch.float64), zs, zx, keys)
        val, idx = torch.topk(dense, self.max_points, dim=1)
        hit = val > 0
        cells = torch.where(hit, idx, torch.full_like(idx, -1))
        return cells, val, hit.to(torch.int64).sum(1)


def export_model(run_dir: str | os.PathLike, output: str | os.PathLike, *, target: str = "par04",
                 collisions: str = "auto", max_points: int | None = None, threshold: float | None = None,
                 steps: int | None = None, e_max: float | None = None, angle_max: float | None = None,
                 energy_scale: float = 1.0, ema: bool = True, check: bool = True) -> ExportResult:
    """Export a trained run directory as one ONNX graph.

    Args:
        run_dir: a run directory of ``calopc train`` or ``calopc distill``.
        output: the ``.onnx`` file (written under a temporary name and renamed when complete).
        target: ``"par04"`` (Geant4's Par04 example, dataset 3 geometry) or ``"points"``.
        collisions: placement of points in cells: ``"auto"`` (as ``calopc generate``: ``alpha-free`` for models
            without α, else ``nearest-free``), ``"alpha-free"``, ``"nearest-free"``, ``"sum"`` or ``"max"``.
        max_points: points per shower at most (``points``: the padded output size, default the run's largest
            training shower; ``par04``: default no cap). A value below the largest training shower is refused.
        threshold: readout threshold in MeV (default: the geometry's, 15.15 keV for dataset 3).
        steps: sampler steps of diffusion models (default: the run's; a distilled student: 1).
        e_max, angle_max: the ``par04`` input scales (default: Par04's ``fMaxEnergy`` 1,024,000 MeV and
            ``fMaxAngle`` 90 degrees, fixed in Par04's source).
        energy_scale: factor on the ``par04`` output (1: the calibrated cell energies of the training data).
        ema: use the EMA weights.
        check: run ``onnx.checker`` on the written file.

    Returns:
        An :class:`ExportResult` (latent size, inputs and outputs, placement, Par04 macro lines, notes).

    Raises:
        ValueError: a run, geometry or option that cannot be exported (one line).
    """
    from ..io import atomic_output, check_writable, lock_output
    from ..models.checkpoint import load

    if target not in TARGETS:
        msg = f"--target {target!r}: expected one of {', '.join(TARGETS)}"
        raise ValueError(msg)
    if collisions == "likelihood":
        msg = ("--collisions likelihood cannot be exported: it samples K times the points and draws each layer's cells "
               "by Gumbel keys over all cells; export with auto, alpha-free, nearest-free, sum or max")
        raise ValueError(msg)
    if energy_scale <= 0 or not np.isfinite(energy_scale):
        msg = f"--energy-scale {energy_scale}: expected a finite factor > 0"
        raise ValueError(msg)
    run = str(run_dir)
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        msg = f"-o {output}: expected a .onnx file name"
        raise ValueError(msg)
    loaded = load(run_dir, ema=ema, device="cpu")
    _check_exportable(loaded, run)
    if target == "par04":
        from .par04 import check_par04_geometry

        check_par04_geometry(loaded.geometry, run)
    cap = _check_max_points(max_points, loaded, run, target)
    graph = build_graph(loaded, target=target, collisions=collisions, threshold=threshold, steps=steps,
                        max_points=cap, e_max=e_max, angle_max=angle_max, energy_scale=energy_scale)
    sampler = graph.sampler
    n = sampler.latent_size
    check_writable(output)
    t0 = time.perf_counter()
    with lock_output(output, "ONNX file"), atomic_output(output) as tmp:
        _onnx_export(graph, target, n, tmp)
        if check:
            import onnx

            onnx.checker.check_model(os.fspath(tmp), full_check=True)
    seconds = time.perf_counter() - t0
    res = ExportResult(str(output), target, loaded.name, n, *_io_spec(target, n, graph), sampler.policy,
                       _placement_note(sampler.policy, loaded), seconds=seconds, bytes=output.stat().st_size,
                       max_points=cap)
    res.notes = _notes(loaded, target, graph)
    if target == "par04":
        from .par04 import macro_lines

        res.macro = macro_lines(n, output)
    return res


def _io_spec(target: str, n: int, graph: Any) -> tuple[dict, dict]:
    if target == "par04":
        return ({"input": f"[batch, {n + 4}] float32: latent ({n} N(0,1) draws), E/E_max, (theta/deg)/angle_max, "
                          "geometry one-hot (2)"},
                {"energies": "[batch, 40500] float32: cell energy / E, Par04 order (r, phi, z fastest)"})
    m = graph.max_points
    return ({"energy": "[batch] float32: incident energy (MeV)", "latent": f"[batch, {n}] float32: N(0,1) draws"},
            {"cells": f"[batch, {m}] int64: calopc cell index (layer, alpha, r; r fastest), -1 after the last hit",
             "energies": f"[batch, {m}] float32: cell energy (MeV), most energetic first",
             "counts": "[batch] int64: hits per shower"})


def _placement_note(policy: str, loaded: Any) -> str:
    alpha_free = bool(getattr(loaded.model, "alpha_free", False))
    run_policy = "alpha-free" if alpha_free else "nearest-free"
    base = {"alpha-free": "the points of each (layer, r) ring take distinct alpha bins in a random order; only a "
                          "ring with more points than alpha bins shares cells (energies added)",
            "nearest-free": "the most energetic point keeps its cell, the others move to the nearest free cell of "
                            "their layer (24 nearest), what finds none is added to its cell",
            "sum": "points sharing a cell are added", "max": "the most energetic point of a cell is kept"}[policy]
    same = ("the same policy as 'calopc generate' uses for this run"
            if policy == run_policy else f"'calopc generate' uses {run_policy} for this run")
    exact = (" (the same cells as calopc generate for the same points)" if policy != "alpha-free"
             else " (the same distribution as calopc generate; the alpha order comes from the latent vector)")
    return f"{policy}: {base}; {same}{exact}"


def _notes(loaded: Any, target: str, graph: Any) -> list[str]:
    notes = []
    rng = (loaded.meta.get("train") or {}).get("incident_energy_range")
    if rng:
        notes.append(f"trained on incident energies {rng[0]:.6g} - {rng[1]:.6g} MeV; outside that range the model "
                     "extrapolates")
    if target == "par04":
        notes.append("the model is conditioned on the energy only: trained at normal incidence (CaloChallenge, 90 "
                     "degrees); the angle and geometry inputs are accepted and not used")
        notes.append(f"E_max = {graph.e_max:g} MeV and angle_max = {graph.angle_max:g} degrees are built into the graph "
                     "(Par04's fMaxEnergy and fMaxAngle have no macro command)")
        if graph.energy_scale != 1.0:
            notes.append(f"outputs are scaled by {graph.energy_scale:g}")
    thr = graph.sampler.threshold
    notes.append(f"cells below the readout threshold {thr * 1e3:.4g} keV are empty")
    return notes


def _onnx_export(graph: Any, target: str, n: int, path: Path) -> None:
    """torch.onnx.export (dynamo) of ``graph`` with a dynamic batch, into ``path`` (weights inside the file)."""
    import warnings

    b = 2
    dim = torch.export.Dim("batch", min=1)
    e = torch.tensor([5e3, 2e4], dtype=torch.float32)
    z = torch.randn(b, n, generator=torch.Generator().manual_seed(0))
    if target == "par04":
        x = torch.cat([z, (e / graph.e_max)[:, None], torch.ones(b, 1), torch.zeros(b, 1), torch.ones(b, 1)], 1)
        args, names, outs, shapes = (x,), ["input"], ["energies"], ({0: dim},)
    else:
        args, names, outs, shapes = (e, z), ["energy", "latent"], ["cells", "energies", "counts"], ({0: dim}, {0: dim})
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:   # the exporter's progress and advice lines are not for calopc's users
            lg.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(graph, args, dynamo=True, opset_version=OPSET, input_names=names,
                                     output_names=outs, dynamic_shapes=shapes, optimize=True, external_data=False)
            prog.save(os.fspath(path), external_data=False)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
